//! Typed views of artifacts for `newt inspect`.

use std::path::Path;

/// A human view of an artifact of `kind` at `dir`, when its kind has one.
pub fn inspect(kind: &str, dir: &Path, n: usize, color: bool) -> anyhow::Result<Option<String>> {
    match kind {
        "tokenize" => {
            Ok(Some(newt_data::inspect_tokens(&dir.join("tokens.parquet"), &model_dir_hint(dir)?, n, color)?))
        }
        "pack" => Ok(Some(newt_data::inspect_tokens(&dir.join("train.parquet"), &model_dir_hint(dir)?, n, color)?)),
        "evaluate" => Ok(Some(std::fs::read_to_string(dir.join("metrics.json"))?)),
        "train" => {
            let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
            let lines: Vec<&str> = metrics.lines().collect();
            let mut out = format!("{} metric lines", lines.len());
            for l in lines.iter().take(3).chain(lines.iter().rev().take(3).rev()) {
                out.push('\n');
                out.push_str(l);
            }
            Ok(Some(out))
        }
        _ => Ok(None),
    }
}

/// Token artifacts record which model folder tokenized them (`model_dir.txt` beside the data).
fn model_dir_hint(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let hint = dir.join("tokenizer.json");
    if hint.exists() {
        return Ok(dir.to_path_buf());
    }
    anyhow::bail!("{} does not carry its tokenizer (tokenizer.json)", dir.display())
}
