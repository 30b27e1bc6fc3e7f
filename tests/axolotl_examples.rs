//! Axolotl's own example configs, as forms: `tests/fixtures/axolotl/` holds newt's fixtures that
//! exercise every key and value form those examples use for the architectures newt runs (model
//! and data swapped for local files; see its README). Each says on its first line what newt must
//! do: `# newt-expect: plan`, or `# newt-expect: error: <feature>` — exit 2 at load with an
//! error naming the feature newt lacks. None may fail on a key or a value form.

use std::path::Path;
use std::process::Command;

#[test]
fn axolotl_example_forms_plan_or_name_the_feature_newt_lacks() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/axolotl");
    let cache = tempfile::tempdir().unwrap();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "the corpus is missing: {}", dir.display());
    let mut tally: std::collections::BTreeMap<String, usize> = Default::default();
    let mut wrong = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# newt-expect: "))
            .unwrap_or_else(|| panic!("{}: no `# newt-expect:` first line", file.display()))
            .trim()
            .to_string();
        let out = Command::new(env!("CARGO_BIN_EXE_newt"))
            .args(["plan", file.to_str().unwrap()])
            .env("NEWT_CACHE_DIR", cache.path())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let ok = match expect.strip_prefix("error: ") {
            None => out.status.success(),
            Some(feature) => {
                out.status.code() == Some(2)
                    && stderr.to_lowercase().contains(&feature.to_lowercase())
                    && stderr.contains("not supported by newt")
            }
        };
        *tally.entry(expect.clone()).or_default() += 1;
        if !ok {
            wrong.push(format!("{name}: expected {expect}, got exit {:?}: {}", out.status.code(), stderr.trim()));
        }
    }
    eprintln!("Axolotl example forms: {} fixtures", files.len());
    for (expect, n) in &tally {
        eprintln!("  {n:3}  {expect}");
    }
    assert!(wrong.is_empty(), "{} of {} fixtures misbehave:\n{}", wrong.len(), files.len(), wrong.join("\n"));
}
