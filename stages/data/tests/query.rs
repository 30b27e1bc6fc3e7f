//! The `sql` stage, `newt query` and `newt inspect` over artifacts.

mod common;

use newt_data::{FetchOptions, fetch_dataset, inspect_tokens, pack, query, run_sql, tokenize};
use newt_graph::config::{Config, DatasetConfig};
use serde_json::json;

#[test]
fn sql_stage_output_is_a_dataset_that_fetch_and_tokenize_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = DatasetConfig { path: "a.jsonl".into(), type_: Some("alpaca".into()), ..Default::default() };
    let rows = [
        json!({"instruction": "keep", "input": "", "output": "one"}),
        json!({"instruction": "drop", "input": "", "output": "two"}),
        json!({"instruction": "keep", "input": "", "output": "one"}),
    ];
    common::write_jsonl(&tmp.path().join("a.jsonl"), &rows);
    fetch_dataset(&ds, &[tmp.path().join("a.jsonl")], &tmp.path().join("fetch"), &FetchOptions::default()).unwrap();
    let tables = vec![("fetch_0".to_string(), tmp.path().join("fetch/data.parquet"))];
    let summary =
        run_sql(&tables, "SELECT DISTINCT * FROM fetch_0 WHERE instruction <> 'drop'", &tmp.path().join("sql"))
            .unwrap();
    assert_eq!(summary.rows, 1);
    assert_eq!(summary.columns, vec!["instruction", "input", "output"]);
    // The result goes through fetch (re-validated against the type) and tokenize like any dataset.
    let fetched = fetch_dataset(
        &ds,
        &[tmp.path().join("sql/data.parquet")],
        &tmp.path().join("refetch"),
        &FetchOptions::default(),
    )
    .unwrap();
    assert_eq!(fetched.rows, 1);
    let t = tokenize(
        &tmp.path().join("refetch/data.parquet"),
        &ds,
        &Config::default(),
        &common::smollm2_dir(),
        &tmp.path().join("tok"),
    )
    .unwrap();
    assert_eq!(t.samples, 1);
}

#[test]
fn query_renders_a_table_and_says_how_many_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = DatasetConfig { path: "a.jsonl".into(), type_: Some("completion".into()), ..Default::default() };
    common::write_jsonl(
        &tmp.path().join("a.jsonl"),
        &(0..1500).map(|i| json!({"text": format!("row {i}")})).collect::<Vec<_>>(),
    );
    fetch_dataset(&ds, &[tmp.path().join("a.jsonl")], &tmp.path().join("f"), &FetchOptions::default()).unwrap();
    let tables = vec![("d".to_string(), tmp.path().join("f"))]; // a folder is a table too
    let text = query(&tables, "SELECT count(*) AS n FROM d").unwrap();
    assert!(text.contains("| n    |") && text.contains("| 1500 |") && text.ends_with("1 row"), "{text}");
    let text = query(&tables, "SELECT text FROM d").unwrap();
    assert!(
        text.contains("row 999") && !text.contains("row 1000 ") && text.contains("500 more rows not shown"),
        "{}",
        &text[text.len() - 200..]
    );
    let err = query(&tables, "SELECT nope FROM d").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn inspect_marks_trained_tokens_and_reports_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = DatasetConfig { path: "c.jsonl".into(), type_: Some("chat_template".into()), ..Default::default() };
    common::write_jsonl(&tmp.path().join("c.jsonl"), &(0..20).map(common::conversation).collect::<Vec<_>>());
    fetch_dataset(&ds, &[tmp.path().join("c.jsonl")], &tmp.path().join("f"), &FetchOptions::default()).unwrap();
    let cfg = Config { sequence_len: 1024, sample_packing: true, ..Default::default() };
    let t =
        tokenize(&tmp.path().join("f/data.parquet"), &ds, &cfg, &common::smollm2_dir(), &tmp.path().join("t")).unwrap();
    let plain = inspect_tokens(&tmp.path().join("t/tokens.parquet"), &common::smollm2_dir(), 2, false).unwrap();
    assert!(plain.contains("<|im_start|>assistant\n⟦About"), "{plain}");
    assert!(plain.contains("⟧\n<|im_start|>user") || plain.contains("<|im_end|>⟧"), "{plain}");
    assert!(!plain.contains('\x1b'));
    let stats = plain.lines().last().unwrap();
    let share = 100.0 * t.trained_tokens as f64 / t.tokens as f64;
    assert!(
        stats.contains(&format!("rows {}  samples {}  tokens {}", t.samples, t.samples, t.tokens))
            && stats.contains(&format!("({share:.1}%)")),
        "{stats}"
    );
    let colored = inspect_tokens(&tmp.path().join("t/tokens.parquet"), &common::smollm2_dir(), 1, true).unwrap();
    assert!(colored.contains("\x1b[32mAbout") && colored.contains("\x1b[2m"), "{colored}");
    // A pack artifact shows its samples one by one.
    pack(&[tmp.path().join("t/tokens.parquet")], &[], &cfg, &tmp.path().join("p")).unwrap();
    let packed = inspect_tokens(&tmp.path().join("p/train.parquet"), &common::smollm2_dir(), 1, false).unwrap();
    assert!(packed.contains("· sample 1"), "{packed}");
    assert!(packed.lines().last().unwrap().contains(&format!("samples {}", t.samples)));
}
