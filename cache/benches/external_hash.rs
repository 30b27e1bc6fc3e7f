//! Benchmark: hashing a large external input (a 2 GiB file by default) the first time, then
//! again through the stat cache, in-process and from a freshly opened cache (as the next
//! `newt run` would). The file was just written, so it is in the page cache: the first figure is
//! CPU-bound, not disk-bound.
//!
//! Run (dev profile, as every build here):
//!   CARGO_TARGET_DIR=/var/tmp/newt-target cargo test -p newt-cache --bench external_hash
//! Size: NEWT_BENCH_BYTES (default 2147483648). Directory: NEWT_BENCH_DIR (default the system
//! temp directory).

use std::io::Write;
use std::time::{Duration, Instant};

use newt_cache::{Cache, RACY_WINDOW_NS};

fn main() {
    let bytes: u64 = std::env::var("NEWT_BENCH_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(2 << 30);
    let parent = std::env::var_os("NEWT_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(&parent).expect("create a temp dir");
    let input = dir.path().join("weights.bin");
    let cache_root = dir.path().join("cache");

    write_pseudo_random(&input, bytes);
    // A file modified within the racy window is not trusted by the stat cache; real weights
    // were written long before a run, so wait it out instead of measuring a re-hash.
    std::thread::sleep(Duration::from_nanos(RACY_WINDOW_NS as u64) + Duration::from_millis(100));

    let cache = Cache::open(&cache_root).expect("open cache");
    let gib = bytes as f64 / (1u64 << 30) as f64;

    let t = Instant::now();
    let first = cache.hash_external(&input).expect("hash");
    let first_s = t.elapsed().as_secs_f64();
    println!("external_hash first ({gib:.2} GiB, stat cache empty): {first_s:.3} s ({:.2} GiB/s)", gib / first_s);

    let t = Instant::now();
    let second = cache.hash_external(&input).expect("hash");
    println!("external_hash second (stat-cache hit, same process): {:.6} s", t.elapsed().as_secs_f64());

    let reopened = Cache::open(&cache_root).expect("reopen cache");
    let t = Instant::now();
    let third = reopened.hash_external(&input).expect("hash");
    println!(
        "external_hash reopened cache (stat-cache hit, record read from disk): {:.6} s",
        t.elapsed().as_secs_f64()
    );

    // Reference: single-threaded streaming blake3 of the same (page-cached) file.
    let t = Instant::now();
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(&input).expect("open input")).expect("read input");
    let reference = newt_cache::Digest::from(hasher.finalize());
    let ref_s = t.elapsed().as_secs_f64();
    println!("reference single-thread blake3 of the same file: {ref_s:.3} s ({:.2} GiB/s)", gib / ref_s);

    assert_eq!(first, reference, "parallel file hash must equal blake3::hash");
    assert_eq!(first, second);
    assert_eq!(first, third);
    let stats = cache.stats();
    assert_eq!((stats.files_hashed, stats.stat_cache_hits), (1, 1), "second call must not re-read the file");
    assert_eq!(reopened.stats().files_hashed, 0, "a reopened cache must use the persisted stat record");
}

/// Writes `bytes` of xorshift output (not zeros, so no filesystem can store it sparsely).
fn write_pseudo_random(path: &std::path::Path, bytes: u64) {
    let mut file = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).expect("create input"));
    let mut block = vec![0u64; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut written = 0u64;
    while written < bytes {
        for w in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *w = x;
        }
        let raw: Vec<u8> = block.iter().flat_map(|w| w.to_le_bytes()).collect();
        let n = (bytes - written).min(raw.len() as u64) as usize;
        file.write_all(&raw[..n]).expect("write input");
        written += n as u64;
    }
    file.into_inner().expect("flush input").sync_all().expect("fsync input");
}
