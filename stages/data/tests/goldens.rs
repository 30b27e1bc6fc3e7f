//! newt's fetch + tokenize equal transformers' apply_chat_template plus Axolotl's masking rules
//! on every case of tests/goldens/*.json (regenerate with `python3 scripts/data_goldens.py`).

mod common;

use std::path::Path;

use newt_config::{Config, DatasetConfig};
use newt_data::{FetchOptions, fetch_dataset, tokenize};
use serde_json::Value;

/// Decodes a sample with trained spans in ⟦ ⟧, to show where a mismatch is.
fn show(tok: &tokenizers::Tokenizer, ids: &[i32], labels: &[i32]) -> String {
    ids.iter()
        .zip(labels)
        .map(|(&id, &l)| {
            let t = tok.decode(&[id as u32], false).unwrap();
            if l == -100 { t } else { format!("⟦{t}⟧") }
        })
        .collect()
}

fn run_golden_file(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens").join(format!("{name}.json"));
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    let mut failures = Vec::new();
    for case in cases {
        let case_name = case["name"].as_str().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let model = common::tokenizer_dir(case["tokenizer"].as_str().unwrap(), tmp.path());
        let data = tmp.path().join("data.jsonl");
        common::write_jsonl(&data, case["rows"].as_array().unwrap());
        let ds: DatasetConfig = serde_json::from_value(case["dataset"].clone()).unwrap();
        let cfg: Config = serde_json::from_value(case["config"].clone()).unwrap();
        fetch_dataset(&ds, &[data], &tmp.path().join("fetch"), &FetchOptions::default())
            .unwrap_or_else(|e| panic!("{case_name}: fetch: {e}"));
        let summary = tokenize(
            &tmp.path().join("fetch/data.parquet"),
            &newt_config::params::TokenizeParams::from_config(&cfg, &ds),
            &model,
            &tmp.path().join("tok"),
        )
        .unwrap_or_else(|e| panic!("{case_name}: tokenize: {e}"));
        let got = common::samples(&tmp.path().join("tok/tokens.parquet"));
        let expected: Vec<(Vec<i32>, Vec<i32>)> = case["expected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let ints =
                    |k: &str| s[k].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect::<Vec<_>>();
                (ints("input_ids"), ints("labels"))
            })
            .collect();
        assert_eq!(summary.samples, got.len(), "{case_name}: summary counts the samples written");
        if got != expected {
            let tok =
                newt_data::HfTokenizer::load_for(&model, &cfg.special_tokens, &cfg.tokens.to_vec()).unwrap().tokenizer;
            let mut msg = format!("{case_name}: {} samples, expected {}\n", got.len(), expected.len());
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                if g != e {
                    msg += &format!(
                        "  sample {i}\n    got      {}\n    expected {}\n",
                        show(&tok, &g.0, &g.1),
                        show(&tok, &e.0, &e.1)
                    );
                    break;
                }
            }
            failures.push(msg);
        }
    }
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn chat_template_matches_transformers_and_axolotl_masking() {
    run_golden_file("chat_template");
}

#[test]
fn alpaca_matches_axolotl_with_and_without_input() {
    run_golden_file("alpaca");
}

#[test]
fn completion_chunks_match_axolotl() {
    run_golden_file("completion");
}

#[test]
fn input_output_matches_axolotl() {
    run_golden_file("input_output");
}
