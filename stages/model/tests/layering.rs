//! The model and the training loop do not import each other: `train/` uses the model (llama,
//! lora, grads, rng), and no model file outside `train/` names `crate::train` in its code. A
//! source scan, so a new import fails here rather than in a review.

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_model_file_outside_train_imports_the_training_loop() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let (mut model_files, mut train_uses_model) = (0, false);
    let mut offenders = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let code: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect();
        if f.starts_with(src.join("train")) {
            train_uses_model |= code.iter().any(|l| l.contains("crate::llama") || l.contains("crate::grads"));
            continue;
        }
        model_files += 1;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim_start().starts_with("//")) {
            if line.contains("crate::train") || line.contains("super::train") {
                offenders.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    // The scan is real: it read the model's files, and the loop does use the model.
    assert!(model_files >= 8, "only {model_files} model files found under {}", src.display());
    assert!(train_uses_model, "train/ should use the model (crate::llama / crate::grads)");
    assert!(offenders.is_empty(), "model code imports the training loop:\n{}", offenders.join("\n"));
}
