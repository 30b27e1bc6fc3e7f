//! Fetch: every supported format gives the same normalized rows, and bad records are errors
//! that name the file, the line or row and the field (or are counted with skip_invalid_rows),
//! with no artifact left behind.

mod common;

use std::path::{Path, PathBuf};

use newt_config::{DatasetConfig, DatasetType, StringOrList};
use newt_data::{DataError, FetchOptions, fetch_dataset, source_files};
use serde_json::json;

fn ds(type_: &str) -> DatasetConfig {
    let type_ = serde_json::from_value(serde_json::json!(type_)).expect("a dataset type");
    DatasetConfig { path: "data".into(), type_: Some(type_), ..Default::default() }
}

fn fetch(ds: &DatasetConfig, files: &[PathBuf], out: &Path, skip: bool) -> Result<newt_data::FetchSummary, DataError> {
    fetch_dataset(ds, files, out, &FetchOptions { skip_invalid_rows: skip })
}

fn no_artifact(out: &Path) -> bool {
    !out.exists() || std::fs::read_dir(out).unwrap().next().is_none()
}

#[test]
fn invalid_json_line_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("broken.jsonl");
    std::fs::write(&file, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"\n{\"text\": \"d\"}\n").unwrap();
    let out = tmp.path().join("out");
    let err = fetch(&ds("completion"), std::slice::from_ref(&file), &out, false).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Json { .. }), "{msg}");
    assert!(msg.contains("broken.jsonl") && msg.contains("line 3"), "{msg}");
    assert!(no_artifact(&out), "a failed fetch leaves no file in {}", out.display());
}

#[test]
fn missing_field_names_row_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("alpaca.json");
    let rows = json!([
        {"instruction": "a", "output": "b"},
        {"instruction": "c", "input": "d"},
    ]);
    std::fs::write(&file, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    let err = fetch(&ds("alpaca"), &[file], &tmp.path().join("out"), false).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("alpaca.json") && msg.contains("row 2") && msg.contains("`output`") && msg.contains("missing"),
        "{msg}"
    );
}

#[test]
fn wrong_value_type_names_the_nested_field() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("chat.jsonl");
    common::write_jsonl(
        &file,
        &[json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]})],
    );
    let err = fetch(&ds("chat_template"), &[file], &tmp.path().join("out"), false).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("line 1")
            && msg.contains("messages[1].content")
            && msg.contains("expected a string, found a number"),
        "{msg}"
    );
}

#[test]
fn skip_policy_counts_skipped_rows_and_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("mixed.jsonl");
    std::fs::write(&file, "{\"text\": \"a\"}\nnot json\n{\"text\": 5}\n{\"other\": \"x\"}\n{\"text\": \"e\"}\n")
        .unwrap();
    let out = tmp.path().join("out");
    let summary = fetch(&ds("completion"), &[file], &out, true).unwrap();
    assert_eq!((summary.rows, summary.skipped), (2, 3));
    assert_eq!(summary.skipped_examples.len(), 3);
    assert!(summary.skipped_examples[0].contains("line 2"), "{:?}", summary.skipped_examples);
    let texts = read_text_column(&out.join("data.parquet"));
    assert_eq!(texts, vec!["a", "e"]);
}

#[test]
fn all_rows_invalid_is_an_error_even_when_skipping() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("bad.jsonl");
    std::fs::write(&file, "{\"text\": 1}\n{\"text\": 2}\n").unwrap();
    let err = fetch(&ds("completion"), &[file], &tmp.path().join("out"), true).unwrap_err();
    assert!(matches!(err, DataError::NoValidRows { rows: 2, .. }), "{err}");
}

#[test]
fn wrong_type_dataset_errors_before_tokenizing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("chat.jsonl");
    common::write_jsonl(&file, &[common::conversation(0), common::conversation(1)]);
    // Even with skipping on: a dataset of another shape is a configuration error, not bad rows.
    let err = fetch(&ds("alpaca"), &[file], &tmp.path().join("out"), true).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::WrongType { .. }), "{msg}");
    assert!(
        msg.contains("found fields [messages]") && msg.contains("expected [instruction, input (optional), output]"),
        "{msg}"
    );
    assert!(msg.contains("type: chat_template"), "suggests the type that fits: {msg}");
}

fn read_text_column(path: &Path) -> Vec<String> {
    use arrow::array::AsArray;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
    reader
        .flat_map(|b| {
            let b = b.unwrap();
            b.column(0).as_string::<i32>().iter().map(|s| s.unwrap().to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_format_gives_the_same_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = [
        json!({"instruction": "Add 1+1", "input": "", "output": "2"}),
        json!({"instruction": "Say \"hi\", twice", "input": "x,y", "output": "hi\nhi"}),
    ];
    let d = tmp.path();
    common::write_jsonl(&d.join("a.jsonl"), &rows);
    std::fs::write(d.join("b.json"), serde_json::to_string_pretty(&json!(rows)).unwrap()).unwrap();
    std::fs::write(d.join("c.json"), serde_json::to_string(&json!({"version": 1, "data": rows})).unwrap()).unwrap();
    std::fs::write(
        d.join("d.csv"),
        "instruction,input,output\nAdd 1+1,,2\n\"Say \"\"hi\"\", twice\",\"x,y\",\"hi\nhi\"\n",
    )
    .unwrap();
    let reference = fetch(&ds("alpaca"), &[d.join("a.jsonl")], &d.join("ref"), false).unwrap();
    assert_eq!(reference.rows, 2);
    let expected = common_rows(&d.join("ref/data.parquet"));
    for f in ["b.json", "c.json", "d.csv"] {
        let out = d.join(format!("out-{f}"));
        fetch(&ds("alpaca"), &[d.join(f)], &out, false).unwrap_or_else(|e| panic!("{f}: {e}"));
        let mut got = common_rows(&out.join("data.parquet"));
        // CSV has no empty string apart from null: an empty input reads as no input.
        if f == "d.csv" {
            got[0][1] = Some(String::new());
        }
        assert_eq!(got, expected, "{f}");
    }
    // And a fetched Parquet file reads back as the same dataset.
    fetch(&ds("alpaca"), &[d.join("ref/data.parquet")], &d.join("again"), false).unwrap();
    assert_eq!(common_rows(&d.join("again/data.parquet")), expected);
}

fn common_rows(path: &Path) -> Vec<Vec<Option<String>>> {
    use arrow::array::AsArray;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
            .unwrap()
            .build()
            .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        for i in 0..b.num_rows() {
            out.push(
                (0..b.num_columns())
                    .map(|c| {
                        b.column(c)
                            .as_string_opt::<i32>()
                            .and_then(|s| (!arrow::array::Array::is_null(s, i)).then(|| s.value(i).to_string()))
                    })
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn text_files_give_one_row_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("corpus.txt");
    std::fs::write(&file, "first line\nsecond line\r\nthird\n").unwrap();
    let summary = fetch(&ds("completion"), &[file], &tmp.path().join("out"), false).unwrap();
    assert_eq!(summary.rows, 3);
    assert_eq!(read_text_column(&tmp.path().join("out/data.parquet")), vec!["first line", "second line", "third"]);
}

#[test]
fn folders_expand_to_the_requested_split_and_data_files_select() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("corpus");
    std::fs::create_dir_all(root.join("data")).unwrap();
    for f in ["data/train-00001.jsonl", "data/train-00000.jsonl", "data/test-00000.jsonl", ".hidden.jsonl", "README.md"]
    {
        std::fs::write(root.join(f), "{\"text\": \"x\"}\n").unwrap();
    }
    let mut d = DatasetConfig { path: "corpus".into(), type_: Some(DatasetType::Completion), ..Default::default() };
    let names = |files: Vec<PathBuf>| {
        files.iter().map(|f| f.strip_prefix(&root).unwrap().display().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(names(source_files(&d, tmp.path()).unwrap()), vec!["data/train-00000.jsonl", "data/train-00001.jsonl"]);
    d.split = Some("test".into());
    assert_eq!(names(source_files(&d, tmp.path()).unwrap()), vec!["data/test-00000.jsonl"]);
    d.data_files = Some(StringOrList::Many(vec!["data/test-00000.jsonl".into(), "data/train-00001.jsonl".into()]));
    assert_eq!(names(source_files(&d, tmp.path()).unwrap()), vec!["data/test-00000.jsonl", "data/train-00001.jsonl"]);
}

#[test]
fn unknown_dataset_says_what_was_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let d = DatasetConfig {
        path: "no-such-org/no-such-dataset".into(),
        type_: Some(DatasetType::Alpaca),
        ..Default::default()
    };
    let msg = source_files(&d, tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("local path") && msg.contains("Hugging Face Hub") && msg.contains("downloads it"), "{msg}");
}
