//! Tokenize and pack end to end: packing keeps every token and label, respects sequence_len,
//! splits off the evaluation set, and artifacts are deterministic.

mod common;

use std::path::{Path, PathBuf};

use newt_config::params::{PackParams, TokenizeParams};
use newt_config::{Config, DatasetConfig, DatasetType, SpecialTokens};
use newt_data::pack::pack_with_buckets;
use newt_data::tokenize::tokenize_with_partitions;
use newt_data::{FetchOptions, fetch_dataset, pack, tokenize};

fn chat_ds() -> DatasetConfig {
    DatasetConfig { path: "chats.jsonl".into(), type_: Some(DatasetType::ChatTemplate), ..Default::default() }
}

fn config(sequence_len: usize, packing: bool) -> Config {
    Config { sequence_len, sample_packing: packing, chat_template: Some("chatml".into()), ..Default::default() }
}

/// Fetches and tokenizes `n` generated conversations; returns the tokens.parquet path.
fn tokenized(dir: &Path, n: usize, cfg: &Config) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let data = dir.join("chats.jsonl");
    common::write_jsonl(&data, &(0..n).map(common::conversation).collect::<Vec<_>>());
    fetch_dataset(&chat_ds(), &[data], &dir.join("fetch"), &FetchOptions::default()).unwrap();
    let summary = tokenize(
        &dir.join("fetch/data.parquet"),
        &TokenizeParams::from_config(cfg, &chat_ds()),
        &common::smollm2_dir(),
        &dir.join("tok"),
    )
    .unwrap();
    assert_eq!(summary.rows, n);
    assert!(summary.samples > 0);
    dir.join("tok/tokens.parquet")
}

/// Splits packed rows back into samples using seq_lens.
fn unpack(path: &Path) -> Vec<(Vec<i32>, Vec<i32>)> {
    let ids = common::int_lists(path, "input_ids");
    let labels = common::int_lists(path, "labels");
    let lens = common::int_lists(path, "seq_lens");
    let mut out = Vec::new();
    for ((ids, labels), lens) in ids.iter().zip(&labels).zip(&lens) {
        let mut at = 0;
        for &l in lens {
            let l = l as usize;
            out.push((ids[at..at + l].to_vec(), labels[at..at + l].to_vec()));
            at += l;
        }
        assert_eq!(at, ids.len(), "seq_lens add up to the row length");
    }
    out
}

#[test]
fn packed_and_unpacked_hold_same_tokens_and_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(512, true);
    let tokens = tokenized(tmp.path(), 300, &cfg);
    let mut original = common::samples(&tokens);
    pack(
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&cfg, vec![], vec![]),
        &tmp.path().join("packed"),
    )
    .unwrap();
    pack(
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&config(512, false), vec![], vec![]),
        &tmp.path().join("unpacked"),
    )
    .unwrap();
    let mut packed = unpack(&tmp.path().join("packed/train.parquet"));
    let mut unpacked = common::samples(&tmp.path().join("unpacked/train.parquet"));
    assert!(
        packed.len() > common::int_lists(&tmp.path().join("packed/train.parquet"), "input_ids").len(),
        "rows hold several samples"
    );
    original.sort();
    packed.sort();
    unpacked.sort();
    assert_eq!(packed, original);
    assert_eq!(unpacked, original);
}

#[test]
fn no_bin_exceeds_sequence_len_and_positions_restart_per_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(256, true);
    let tokens = tokenized(tmp.path(), 200, &cfg);
    let summary = pack(
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&cfg, vec![], vec![]),
        &tmp.path().join("packed"),
    )
    .unwrap();
    let path = tmp.path().join("packed/train.parquet");
    let ids = common::int_lists(&path, "input_ids");
    let positions = common::int_lists(&path, "position_ids");
    let lens = common::int_lists(&path, "seq_lens");
    assert_eq!(ids.len(), summary.rows);
    let mut tokens_total = 0;
    for ((ids, pos), lens) in ids.iter().zip(&positions).zip(&lens) {
        assert!(ids.len() <= 256, "a row of {} tokens", ids.len());
        let expected: Vec<i32> = lens.iter().flat_map(|&l| 0..l).collect();
        assert_eq!(pos, &expected);
        tokens_total += ids.len();
    }
    assert_eq!(tokens_total, summary.tokens);
    let efficiency = tokens_total as f64 / (summary.rows as f64 * 256.0);
    assert!((summary.efficiency - efficiency).abs() < 1e-12);
    assert!(summary.efficiency > 0.8, "first-fit-decreasing fills rows: {}", summary.efficiency);
}

/// Pack reorders samples through spill buckets on disk (memory stays flat); how many buckets
/// there are must not change a byte of the output, and the spill files must not stay behind.
#[test]
fn packed_bytes_do_not_depend_on_spill_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(512, true);
    cfg.val_set_size = 0.05;
    let tokens = tokenized(tmp.path(), 300, &cfg);
    let one = pack(
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&cfg, vec![], vec![]),
        &tmp.path().join("one"),
    )
    .unwrap();
    let many = pack_with_buckets(
        2000,
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&cfg, vec![], vec![]),
        &tmp.path().join("many"),
    )
    .unwrap();
    assert!(one.tokens + one.val_tokens > 10 * 2000, "the small buckets are many");
    assert_eq!(one, many);
    for file in ["train.parquet", "val.parquet"] {
        let a = std::fs::read(tmp.path().join("one").join(file)).unwrap();
        let b = std::fs::read(tmp.path().join("many").join(file)).unwrap();
        assert!(a == b, "{file} differs");
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("many")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only train.parquet and val.parquet remain: {left:?}");
    // The summary goes into the manifest as structured JSON.
    let json = serde_json::to_value(&many).unwrap();
    assert_eq!(json["rows"], many.rows);
    assert_eq!(json["efficiency"].as_f64(), Some(many.efficiency));
}

#[test]
fn val_set_size_splits_off_a_disjoint_eval_set() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(512, false);
    let tokens = tokenized(tmp.path(), 120, &cfg);
    let all = common::samples(&tokens);
    cfg.val_set_size = 0.1;
    let summary =
        pack(std::slice::from_ref(&tokens), &[], &PackParams::from_config(&cfg, vec![], vec![]), &tmp.path().join("p"))
            .unwrap();
    assert_eq!(summary.val_samples, (0.1f64 * all.len() as f64).ceil() as usize);
    assert_eq!(summary.samples + summary.val_samples, all.len());
    let mut both = common::samples(&tmp.path().join("p/train.parquet"));
    both.extend(common::samples(&tmp.path().join("p/val.parquet")));
    let mut all_sorted = all.clone();
    all_sorted.sort();
    both.sort();
    assert_eq!(both, all_sorted, "train and val partition the samples");
    // A count instead of a fraction.
    cfg.val_set_size = 7.0;
    let summary =
        pack(std::slice::from_ref(&tokens), &[], &PackParams::from_config(&cfg, vec![], vec![]), &tmp.path().join("q"))
            .unwrap();
    assert_eq!(summary.val_samples, 7);
}

#[test]
fn test_datasets_become_the_eval_split_and_val_is_always_written() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(512, true);
    let train = tokenized(&tmp.path().join("a"), 40, &cfg);
    let test = tokenized(&tmp.path().join("b"), 10, &cfg);
    let summary = pack(
        std::slice::from_ref(&train),
        std::slice::from_ref(&test),
        &PackParams::from_config(&cfg, vec![], vec![]),
        &tmp.path().join("p"),
    )
    .unwrap();
    assert_eq!(summary.samples, common::samples(&train).len());
    assert_eq!(summary.val_samples, common::samples(&test).len());
    let mut val = unpack(&tmp.path().join("p/val.parquet"));
    let mut expected = common::samples(&test);
    val.sort();
    expected.sort();
    assert_eq!(val, expected);
    let summary =
        pack(std::slice::from_ref(&train), &[], &PackParams::from_config(&cfg, vec![], vec![]), &tmp.path().join("q"))
            .unwrap();
    assert_eq!(summary.val_rows, 0);
    assert!(tmp.path().join("q/val.parquet").is_file(), "an empty val.parquet is written");
}

#[test]
fn artifacts_do_not_depend_on_partitions_and_pack_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(512, true);
    let n = 1500; // several tokenize batches, so partitions interleave
    let data = tmp.path().join("chats.jsonl");
    common::write_jsonl(&data, &(0..n).map(common::conversation).collect::<Vec<_>>());
    fetch_dataset(&chat_ds(), &[data], &tmp.path().join("fetch"), &FetchOptions::default()).unwrap();
    let input = tmp.path().join("fetch/data.parquet");
    let mut digests = Vec::new();
    for partitions in [1, 4, 7] {
        let out = tmp.path().join(format!("tok{partitions}"));
        tokenize_with_partitions(
            partitions,
            &input,
            &TokenizeParams::from_config(&cfg, &chat_ds()),
            &common::smollm2_dir(),
            &out,
        )
        .unwrap();
        digests.push(blake3::hash(&std::fs::read(out.join("tokens.parquet")).unwrap()));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "tokens.parquet bytes differ across partition counts");
    let tokens = tmp.path().join("tok1/tokens.parquet");
    let digest = |dir: &str| blake3::hash(&std::fs::read(tmp.path().join(dir).join("train.parquet")).unwrap());
    pack(std::slice::from_ref(&tokens), &[], &PackParams::from_config(&cfg, vec![], vec![]), &tmp.path().join("p1"))
        .unwrap();
    pack(std::slice::from_ref(&tokens), &[], &PackParams::from_config(&cfg, vec![], vec![]), &tmp.path().join("p2"))
        .unwrap();
    assert_eq!(digest("p1"), digest("p2"));
    let reseeded = Config { seed: 7, ..cfg.clone() };
    pack(
        std::slice::from_ref(&tokens),
        &[],
        &PackParams::from_config(&reseeded, vec![], vec![]),
        &tmp.path().join("p3"),
    )
    .unwrap();
    assert_ne!(digest("p1"), digest("p3"), "the seed changes the shuffle");
}

#[test]
fn eos_differs_from_eot_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::llama3_dir(tmp.path());
    let data = tmp.path().join("chats.jsonl");
    common::write_jsonl(&data, &(0..5).map(common::conversation).collect::<Vec<_>>());
    fetch_dataset(&chat_ds(), &[data], &tmp.path().join("fetch"), &FetchOptions::default()).unwrap();
    let input = tmp.path().join("fetch/data.parquet");
    let mut cfg = Config { chat_template: Some("llama3".into()), ..Default::default() };
    let summary =
        tokenize(&input, &TokenizeParams::from_config(&cfg, &chat_ds()), &model, &tmp.path().join("a")).unwrap();
    let warning = summary
        .warnings
        .iter()
        .find(|w| w.contains("EOS"))
        .unwrap_or_else(|| panic!("no EOS warning in {:?}", summary.warnings));
    assert!(
        warning.contains("<|eot_id|>")
            && warning.contains("<|end_of_text|>")
            && warning.contains("special_tokens: {eos_token: \"<|eot_id|>\"}"),
        "{warning}"
    );
    cfg.special_tokens = SpecialTokens { eos_token: Some("<|eot_id|>".into()), ..Default::default() };
    let summary =
        tokenize(&input, &TokenizeParams::from_config(&cfg, &chat_ds()), &model, &tmp.path().join("b")).unwrap();
    assert!(summary.warnings.iter().all(|w| !w.contains("EOS")), "{:?}", summary.warnings);
    // SmolLM2's own template ends turns with its EOS token: nothing to warn about.
    let cfg = Config { chat_template: Some("tokenizer_default".into()), ..Default::default() };
    let summary =
        tokenize(&input, &TokenizeParams::from_config(&cfg, &chat_ds()), &common::smollm2_dir(), &tmp.path().join("c"))
            .unwrap();
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
}

#[test]
fn template_errors_name_the_row_or_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("chats.jsonl");
    let mut rows: Vec<_> = (0..4).map(common::conversation).collect();
    rows[2] = serde_json::json!({"messages": [{"role": "assistant", "content": "I speak first"}]});
    common::write_jsonl(&data, &rows);
    fetch_dataset(&chat_ds(), &[data], &tmp.path().join("fetch"), &FetchOptions::default()).unwrap();
    let template = "{% for m in messages %}{% if loop.first and m.role == 'assistant' %}{{ raise_exception('conversations start with the user') }}{% endif %}{{ m.role + ': ' + m.content + '<|im_end|>' }}{% endfor %}";
    let mut cfg = Config {
        chat_template: Some("jinja".into()),
        chat_template_jinja: Some(template.into()),
        ..Default::default()
    };
    let input = tmp.path().join("fetch/data.parquet");
    let err =
        tokenize(&input, &TokenizeParams::from_config(&cfg, &chat_ds()), &common::smollm2_dir(), &tmp.path().join("a"))
            .unwrap_err()
            .to_string();
    assert!(err.contains("row 3") && err.contains("conversations start with the user"), "{err}");
    assert!(!tmp.path().join("a/tokens.parquet").exists());
    cfg.skip_invalid_rows = true;
    let summary =
        tokenize(&input, &TokenizeParams::from_config(&cfg, &chat_ds()), &common::smollm2_dir(), &tmp.path().join("b"))
            .unwrap();
    assert_eq!((summary.rows, summary.skipped_rows, summary.samples), (4, 1, 3));
}
