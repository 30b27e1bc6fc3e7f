//! Safetensors reader/writer: round trips, sharding, and clear errors on bad files.

use std::fs;
use std::path::Path;

use newt_model::tensors::{Dtype, ShardedWriter, TensorError, TensorStore, decode_f32, encode_f32, write_single};

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 - n as f32 / 2.0) * scale).collect()
}

#[test]
fn single_file_round_trip_preserves_names_shapes_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let a = ramp(6, 0.25);
    let b = ramp(8, 0.5);
    let c = ramp(4, 1.0);
    write_single(
        &dir.path().join("model.safetensors"),
        &[
            ("a".into(), Dtype::F32, vec![2, 3], encode_f32(Dtype::F32, &a)),
            ("b".into(), Dtype::BF16, vec![8], encode_f32(Dtype::BF16, &b)),
            ("c".into(), Dtype::F16, vec![2, 2], encode_f32(Dtype::F16, &c)),
        ],
    )
    .unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.names(), vec!["a", "b", "c"]);
    assert_eq!(store.info("a"), Some((Dtype::F32, vec![2, 3])));
    assert_eq!(store.info("b"), Some((Dtype::BF16, vec![8])));
    // Values on these ramps are exactly representable in f16/bf16, so the round trip is exact.
    assert_eq!(store.read_f32("a").unwrap(), a);
    assert_eq!(store.read_f32("b").unwrap(), b);
    assert_eq!(store.read_f32("c").unwrap(), c);
    let (dt, shape, raw) = store.read_raw("c").unwrap();
    assert_eq!((dt, shape, raw.len()), (Dtype::F16, vec![2, 2], 8));
    assert!(matches!(store.read_f32("zz"), Err(TensorError::NotFound(_))));
}

#[test]
fn files_we_write_are_read_by_the_reference_safetensors_crate() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let v = ramp(10, 0.1);
    write_single(&p, &[("w".into(), Dtype::F32, vec![2, 5], encode_f32(Dtype::F32, &v))]).unwrap();
    let bytes = fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("w").unwrap();
    assert_eq!(t.shape(), &[2, 5]);
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    assert_eq!(decode_f32(Dtype::F32, t.data()), v);
    // transformers refuses files without metadata format=pt.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let fmt = meta.metadata().as_ref().and_then(|m| m.get("format").cloned());
    assert_eq!(fmt.as_deref(), Some("pt"));
}

#[test]
fn sharded_writer_rolls_shards_at_the_byte_limit_and_writes_an_index() {
    let dir = tempfile::tempdir().unwrap();
    // 5 tensors of 40 bytes with a 100-byte limit: two per shard -> 3 shards.
    let mut w = ShardedWriter::new(dir.path(), 100).unwrap();
    let mut expect = Vec::new();
    for i in 0..5 {
        let v = ramp(10, i as f32 + 1.0);
        w.add(&format!("t{i}"), Dtype::F32, &[10], &encode_f32(Dtype::F32, &v)).unwrap();
        expect.push(v);
    }
    let files = w.finish().unwrap();
    let names: Vec<String> = files.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        vec![
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json"
        ]
    );
    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let index: serde_json::Value = serde_json::from_str(&fs::read_to_string(&files[3]).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"], 200);
    assert_eq!(index["weight_map"]["t4"], "model-00003-of-00003.safetensors");
    assert_eq!(index["weight_map"]["t1"], "model-00001-of-00003.safetensors");
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.names(), vec!["t0", "t1", "t2", "t3", "t4"]);
    for (i, v) in expect.iter().enumerate() {
        assert_eq!(&store.read_f32(&format!("t{i}")).unwrap(), v);
    }
    for f in &files[..3] {
        let bytes = fs::read(f).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).expect("reference reader accepts shard");
    }
}

#[test]
fn one_shard_is_written_as_model_safetensors_without_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardedWriter::new(dir.path(), 1 << 30).unwrap();
    w.add("a", Dtype::BF16, &[3], &encode_f32(Dtype::BF16, &[1.0, 2.0, 3.0])).unwrap();
    let files = w.finish().unwrap();
    assert_eq!(files, vec![dir.path().join("model.safetensors")]);
    assert!(!dir.path().join("model.safetensors.index.json").exists());
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.read_f32("a").unwrap(), vec![1.0, 2.0, 3.0]);
}

#[test]
fn a_tensor_larger_than_the_limit_gets_its_own_shard() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardedWriter::new(dir.path(), 16).unwrap();
    w.add("small", Dtype::F32, &[1], &encode_f32(Dtype::F32, &[1.0])).unwrap();
    w.add("big", Dtype::F32, &[8], &encode_f32(Dtype::F32, &[2.0; 8])).unwrap();
    w.add("small2", Dtype::F32, &[1], &encode_f32(Dtype::F32, &[3.0])).unwrap();
    assert_eq!(w.finish().unwrap().len(), 4); // 3 shards + index
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.read_f32("big").unwrap(), vec![2.0; 8]);
}

#[test]
fn writer_rejects_wrong_byte_counts_and_duplicate_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardedWriter::new(dir.path(), 1000).unwrap();
    let err = w.add("a", Dtype::F32, &[3], &[0u8; 8]).unwrap_err();
    assert!(err.to_string().contains("`a`"), "{err}");
    w.add("a", Dtype::F32, &[2], &[0u8; 8]).unwrap();
    let err = w.add("a", Dtype::F32, &[2], &[0u8; 8]).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn an_abandoned_writer_leaves_no_files() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = ShardedWriter::new(dir.path(), 8).unwrap();
        w.add("a", Dtype::F32, &[2], &[0u8; 8]).unwrap();
        w.add("b", Dtype::F32, &[2], &[0u8; 8]).unwrap();
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn write_fixture(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("model.safetensors");
    write_single(&p, &[("w".into(), Dtype::F32, vec![64], encode_f32(Dtype::F32, &ramp(64, 1.0)))]).unwrap();
    p
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_fixture(dir.path());
    let len = fs::metadata(&p).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len - 10).unwrap();
    drop(f);
    let err = TensorStore::open(dir.path()).err().expect("truncated file must fail");
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("truncated"), "{msg}");
    assert!(msg.contains("`w`"), "{msg}");
}

#[test]
fn header_length_past_end_of_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_fixture(dir.path());
    let mut bytes = fs::read(&p).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&p, &bytes).unwrap();
    let msg = TensorStore::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors") && msg.contains("header"), "{msg}");
}

#[test]
fn unsupported_dtype_is_an_error_naming_tensor_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let header = br#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    let msg = TensorStore::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("`ids`") && msg.contains("I64"), "{msg}");
}

#[test]
fn empty_folder_error_says_what_was_tried() {
    let dir = tempfile::tempdir().unwrap();
    let msg = TensorStore::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("model.safetensors.index.json") && msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn index_naming_a_tensor_its_shard_lacks_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardedWriter::new(dir.path(), 8).unwrap();
    w.add("a", Dtype::F32, &[2], &[0u8; 8]).unwrap();
    w.add("b", Dtype::F32, &[2], &[0u8; 8]).unwrap();
    w.finish().unwrap();
    let ip = dir.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&fs::read_to_string(&ip).unwrap()).unwrap();
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors".into();
    fs::write(&ip, index.to_string()).unwrap();
    let msg = TensorStore::open(dir.path()).err().unwrap().to_string();
    assert!(msg.contains("ghost"), "{msg}");
}

#[test]
fn bf16_and_f16_encoding_round_to_nearest_even() {
    // bf16 keeps 7 mantissa bits: neighbours of 1.0 are 1 and 1 + 2^-7.
    let ulp = f32::powi(2.0, -7);
    let below_half = 1.0 + ulp / 4.0;
    assert_eq!(decode_f32(Dtype::BF16, &encode_f32(Dtype::BF16, &[below_half])), vec![1.0]);
    // 1 + 1.5 ulp is a tie between 1 + ulp (odd mantissa) and 1 + 2 ulp (even): even wins.
    let tie = 1.0 + 1.5 * ulp;
    assert_eq!(decode_f32(Dtype::BF16, &encode_f32(Dtype::BF16, &[tie])), vec![1.0 + 2.0 * ulp]);
    assert_eq!(decode_f32(Dtype::F16, &encode_f32(Dtype::F16, &[65504.0])), vec![65504.0]);
}

#[test]
fn a_tensor_streamed_in_chunks_equals_one_added_whole() {
    let dir = tempfile::tempdir().unwrap();
    let v = ramp(100, 0.5);
    let bytes = encode_f32(Dtype::F32, &v);
    let mut w = ShardedWriter::new(dir.path(), 1 << 20).unwrap();
    w.begin_tensor("s", Dtype::F32, &[10, 10]).unwrap();
    for c in bytes.chunks(64) {
        w.write_chunk(c).unwrap();
    }
    w.end_tensor().unwrap();
    w.add("whole", Dtype::F32, &[10, 10], &bytes).unwrap();
    w.finish().unwrap();
    let store = TensorStore::open(dir.path()).unwrap();
    assert_eq!(store.read_f32("s").unwrap(), v);
    assert_eq!(store.read_f32("whole").unwrap(), v);
}

#[test]
fn streaming_too_many_or_too_few_bytes_is_an_error_that_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ShardedWriter::new(dir.path(), 1 << 20).unwrap();
    w.begin_tensor("a", Dtype::F32, &[2]).unwrap();
    w.write_chunk(&[0u8; 4]).unwrap();
    let err = w.end_tensor().unwrap_err().to_string();
    assert!(err.contains("4 of its 8"), "{err}");
    // The partial bytes are in the shard: nothing more may be written, and no file appears.
    assert!(w.begin_tensor("b", Dtype::F32, &[1]).unwrap_err().to_string().contains("earlier error"));
    assert!(w.finish().is_err());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);

    let mut w = ShardedWriter::new(dir.path(), 1 << 20).unwrap();
    w.begin_tensor("c", Dtype::F32, &[1]).unwrap();
    assert!(w.write_chunk(&[0u8; 8]).unwrap_err().to_string().contains("more than"));
    let mut w = ShardedWriter::new(dir.path(), 1 << 20).unwrap();
    w.begin_tensor("d", Dtype::F32, &[1]).unwrap();
    let err = w.finish().unwrap_err().to_string();
    assert!(err.contains("`d`") && err.contains("never ended"), "{err}");
}
