//! Helpers shared by the newt-data integration tests: tokenizer fixtures, dataset files, and
//! reading artifacts back.

#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The committed SmolLM2 tokenizer folder (tokenizer.json + tokenizer_config.json).
pub fn smollm2_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2")
}

/// Builds the Llama-3 stand-in tokenizer (SmolLM2's with Llama 3's special tokens, BOS
/// prepended) in `dir`, from the recipe scripts/data_goldens.py also follows.
pub fn llama3_dir(dir: &Path) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let recipe: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("llama3_smollm2/recipe.json")).unwrap()).unwrap();
    let mut tok = Tokenizer::from_file(smollm2_dir().join("tokenizer.json")).unwrap();
    let added: Vec<AddedToken> = recipe["add_special_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| AddedToken::from(t.as_str().unwrap().to_string(), true))
        .collect();
    tok.add_special_tokens(&added);
    let bos = recipe["prepend_bos"].as_str().unwrap();
    let bos_id = tok.token_to_id(bos).unwrap();
    let template = TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .unwrap()
        .try_pair(format!("{bos} $A {bos} $B"))
        .unwrap()
        .special_tokens(vec![(bos.to_string(), bos_id)])
        .build()
        .unwrap();
    tok.with_post_processor(Some(template));
    let out = dir.join("llama3_smollm2");
    std::fs::create_dir_all(&out).unwrap();
    tok.save(out.join("tokenizer.json"), false).unwrap();
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&recipe["tokenizer_config"]).unwrap(),
    )
    .unwrap();
    out
}

/// The tokenizer folder a golden case names.
pub fn tokenizer_dir(name: &str, tmp: &Path) -> PathBuf {
    match name {
        "smollm2" => smollm2_dir(),
        "llama3_smollm2" => llama3_dir(tmp),
        other => panic!("unknown tokenizer fixture {other}"),
    }
}

/// Writes rows as JSON Lines.
pub fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{}\n", serde_json::to_string(r).unwrap())).collect();
    std::fs::write(path, text).unwrap();
}

/// Reads every value of an int32 list column of a Parquet file, row by row.
pub fn int_lists(path: &Path, column: &str) -> Vec<Vec<i32>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap().build().unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = batch.column_by_name(column).unwrap_or_else(|| panic!("{} has no column {column}", path.display()));
        let list = col.as_list::<i32>();
        for i in 0..list.len() {
            out.push(list.value(i).as_primitive::<Int32Type>().values().to_vec());
        }
    }
    out
}

/// (input_ids, labels) of every row of a tokens or packed Parquet file.
pub fn samples(path: &Path) -> Vec<(Vec<i32>, Vec<i32>)> {
    int_lists(path, "input_ids").into_iter().zip(int_lists(path, "labels")).collect()
}

/// A generated multi-turn conversation dataset row (deterministic in `i`).
pub fn conversation(i: usize) -> Value {
    let topics = ["the weather", "Rust lifetimes", "bread baking", "orbital mechanics", "chess openings", "tea"];
    let turns = 1 + i % 4;
    let mut messages =
        vec![serde_json::json!({"role": "system", "content": format!("You are assistant number {i}. Be concise.")})];
    for t in 0..turns {
        let topic = topics[(i + t) % topics.len()];
        messages.push(serde_json::json!({"role": "user", "content": format!("Question {t} about {topic}: what should I know first? {}", "Please explain. ".repeat(i % 5))}));
        messages.push(serde_json::json!({"role": "assistant", "content": format!("About {topic}: start with the basics. {}", "Here is one more detail. ".repeat((i * 7 + t) % 9))}));
    }
    serde_json::json!({ "messages": messages })
}
