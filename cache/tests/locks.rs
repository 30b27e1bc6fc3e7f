//! Per-key locks between threads (cross-process variants are in processes.rs).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{key, meta, temp_cache};

#[test]
fn two_threads_lock_same_key_serialize() {
    let (_dir, cache) = temp_cache();
    let k = key("train");
    let inside = AtomicUsize::new(0);
    let max_inside = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..5 {
                    let _lock = cache.lock_key(&k).unwrap();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(max_inside.load(Ordering::SeqCst), 1, "never two holders at once");
}

#[test]
fn racing_threads_compute_a_stage_once() {
    // The executor protocol: lookup, lock, lookup again, compute only on a second miss.
    let (_dir, cache) = temp_cache();
    let k = key("pack");
    let computed = AtomicUsize::new(0);
    let barrier = Barrier::new(4);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                barrier.wait();
                if cache.lookup(&k).unwrap().is_hit() {
                    return;
                }
                let _lock = cache.lock_key(&k).unwrap();
                if cache.lookup(&k).unwrap().is_hit() {
                    return;
                }
                computed.fetch_add(1, Ordering::SeqCst);
                let staging = cache.staging(&k).unwrap();
                std::fs::write(staging.out_dir().join("packed.parquet"), b"rows").unwrap();
                std::thread::sleep(Duration::from_millis(20));
                cache.publish(staging, meta(k, "pack"), &["packed.parquet"]).unwrap();
            });
        }
    });
    assert_eq!(computed.load(Ordering::SeqCst), 1);
    assert!(cache.lookup(&k).unwrap().is_hit());
}

#[test]
fn try_lock_key_reports_a_held_lock_and_different_keys_do_not_block() {
    let (_dir, cache) = temp_cache();
    let held = cache.lock_key(&key("a")).unwrap();
    assert!(cache.try_lock_key(&key("a")).unwrap().is_none());
    assert!(cache.try_lock_key(&key("b")).unwrap().is_some());
    drop(held);
    assert!(cache.try_lock_key(&key("a")).unwrap().is_some(), "released on drop");
}

#[test]
fn blocked_locker_proceeds_when_the_holder_releases() {
    let (_dir, cache) = temp_cache();
    let cache = Arc::new(cache);
    let held = cache.lock_key(&key("a")).unwrap();
    let c = Arc::clone(&cache);
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let _lock = c.lock_key(&key("a")).unwrap();
        t.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    drop(held);
    let waited = waiter.join().unwrap();
    assert!(waited >= Duration::from_millis(150), "waiter got the lock after {waited:?}, while it was held");
}
