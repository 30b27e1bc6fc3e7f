//! The `sql` stage, `newt query` and `newt inspect` over artifacts.

mod common;

use newt_config::{Config, DatasetConfig, DatasetType};
use newt_data::{FetchOptions, fetch_dataset, inspect_tokens, pack, query, run_sql, tokenize};
use serde_json::json;

#[test]
fn sql_stage_output_is_a_dataset_that_fetch_and_tokenize_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = DatasetConfig { path: "a.jsonl".into(), type_: Some(DatasetType::Alpaca), ..Default::default() };
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
        &newt_config::params::TokenizeParams::from_config(&Config::default(), &ds),
        &common::smollm2_dir(),
        &tmp.path().join("tok"),
    )
    .unwrap();
    assert_eq!(t.samples, 1);
}

#[test]
fn query_renders_a_table_and_says_how_many_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = DatasetConfig { path: "a.jsonl".into(), type_: Some(DatasetType::Completion), ..Default::default() };
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
    let ds = DatasetConfig { path: "c.jsonl".into(), type_: Some(DatasetType::ChatTemplate), ..Default::default() };
    common::write_jsonl(&tmp.path().join("c.jsonl"), &(0..20).map(common::conversation).collect::<Vec<_>>());
    fetch_dataset(&ds, &[tmp.path().join("c.jsonl")], &tmp.path().join("f"), &FetchOptions::default()).unwrap();
    let cfg = Config { sequence_len: 1024, sample_packing: true, ..Default::default() };
    let t = tokenize(
        &tmp.path().join("f/data.parquet"),
        &newt_config::params::TokenizeParams::from_config(&cfg, &ds),
        &common::smollm2_dir(),
        &tmp.path().join("t"),
    )
    .unwrap();
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
    let params = newt_config::params::PackParams::from_config(&cfg, vec![], vec![]);
    pack(&[tmp.path().join("t/tokens.parquet")], &[], &params, &tmp.path().join("p")).unwrap();
    let packed = inspect_tokens(&tmp.path().join("p/train.parquet"), &common::smollm2_dir(), 1, false).unwrap();
    assert!(packed.contains("· sample 1"), "{packed}");
    assert!(packed.lines().last().unwrap().contains(&format!("samples {}", t.samples)));
}

/// A three-row table `d` (one `text` column) in `tmp/d.parquet`, as `(tables, parquet file)`.
fn small_table(tmp: &std::path::Path) -> (Vec<(String, std::path::PathBuf)>, std::path::PathBuf) {
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    let schema = std::sync::Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
    let column = std::sync::Arc::new(StringArray::from(vec!["row 0", "row 1", "row 2"]));
    let batch = RecordBatch::try_new(schema.clone(), vec![column]).unwrap();
    let file = tmp.join("d.parquet");
    let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&file).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    (vec![("d".to_string(), file.clone())], file)
}

#[test]
fn query_refuses_copy_to_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (tables, _) = small_table(tmp.path());
    let target = tmp.path().join("written.csv");
    let sql = format!("COPY (SELECT 'x' AS a) TO '{}' STORED AS CSV", target.display());
    let err = query(&tables, &sql).unwrap_err().to_string();
    assert!(err.contains("newt query runs read-only SQL") && err.contains("COPY"), "{err}");
    assert!(!target.exists(), "COPY wrote {}", target.display());
}

#[test]
fn query_refuses_copy_onto_the_queried_parquet() {
    let tmp = tempfile::tempdir().unwrap();
    let (tables, file) = small_table(tmp.path());
    let before = std::fs::read(&file).unwrap();
    let sql = format!("COPY (SELECT 'x' AS text) TO '{}' STORED AS PARQUET", file.display());
    assert!(query(&tables, &sql).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), before, "the artifact was overwritten");
    assert!(query(&tables, "SELECT count(*) AS n FROM d").unwrap().contains("| 3 |"));
}

#[test]
fn query_refuses_create_table_insert_and_set() {
    let tmp = tempfile::tempdir().unwrap();
    let (tables, _) = small_table(tmp.path());
    let external = tmp.path().join("ext");
    for sql in [
        "CREATE TABLE t (x INT)".to_string(),
        "CREATE TABLE t AS SELECT * FROM d".to_string(),
        format!("CREATE EXTERNAL TABLE e (x INT) STORED AS CSV LOCATION '{}'", external.display()),
        "INSERT INTO d VALUES ('y')".to_string(),
        "DROP TABLE d".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ] {
        let err = query(&tables, &sql).unwrap_err().to_string();
        assert!(err.contains("read-only SQL"), "{sql}: {err}");
    }
    assert!(!external.exists());
    let text = query(&tables, "WITH x AS (SELECT text FROM d) SELECT count(*) AS n FROM x").unwrap();
    assert!(text.contains("| 3 |"), "{text}");
}

#[test]
fn sql_stage_refuses_copy_to() {
    let tmp = tempfile::tempdir().unwrap();
    let (tables, _) = small_table(tmp.path());
    let target = tmp.path().join("stage-wrote.csv");
    let sql = format!("COPY (SELECT * FROM d) TO '{}' STORED AS CSV", target.display());
    let err = run_sql(&tables, &sql, &tmp.path().join("out")).unwrap_err().to_string();
    assert!(err.contains("the sql stage runs read-only SQL"), "{err}");
    assert!(!target.exists());
}
