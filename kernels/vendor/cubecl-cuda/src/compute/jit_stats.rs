//! newt patch: process-wide counts and times of kernel compilations and module loads, so a
//! caller can see how much of a slow step was JIT work (and whether the kernel cache served it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static COMPILES: AtomicU64 = AtomicU64::new(0);
static COMPILE_NS: AtomicU64 = AtomicU64::new(0);
static CACHE_HITS: AtomicU64 = AtomicU64::new(0);
static LOADS: AtomicU64 = AtomicU64::new(0);
static LOAD_NS: AtomicU64 = AtomicU64::new(0);

/// Totals since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitStats {
    /// Kernels compiled (CubeCL IR to C++ to NVRTC), cache misses.
    pub compiles: u64,
    /// Time spent in those compilations.
    pub compile: Duration,
    /// Kernels found in the persistent compilation cache.
    pub cache_hits: u64,
    /// Modules loaded into the CUDA context (after a compile or a cache hit).
    pub loads: u64,
    /// Time spent loading them (includes the driver's PTX compilation for PTX modules).
    pub load: Duration,
}

impl JitStats {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &JitStats) -> JitStats {
        JitStats {
            compiles: self.compiles - earlier.compiles,
            compile: self.compile.saturating_sub(earlier.compile),
            cache_hits: self.cache_hits - earlier.cache_hits,
            loads: self.loads - earlier.loads,
            load: self.load.saturating_sub(earlier.load),
        }
    }
}

/// The totals so far.
pub fn jit_stats() -> JitStats {
    JitStats {
        compiles: COMPILES.load(Ordering::Relaxed),
        compile: Duration::from_nanos(COMPILE_NS.load(Ordering::Relaxed)),
        cache_hits: CACHE_HITS.load(Ordering::Relaxed),
        loads: LOADS.load(Ordering::Relaxed),
        load: Duration::from_nanos(LOAD_NS.load(Ordering::Relaxed)),
    }
}

/// Counts a compilation (also newt's own NVRTC kernels, `newt_kernels::flash_cuda`).
pub fn record_compile(took: Duration) {
    COMPILES.fetch_add(1, Ordering::Relaxed);
    COMPILE_NS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
}

pub(crate) fn record_cache_hit() {
    CACHE_HITS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn record_load(took: Duration) {
    LOADS.fetch_add(1, Ordering::Relaxed);
    LOAD_NS.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
}

static STREAM_ERRORS: AtomicU64 = AtomicU64::new(0);
static SHOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Distinct stream errors written to stderr at most; later ones are only counted.
const SHOW_AT_MOST: usize = 8;

/// Errors taken off a stream's error list so far. CubeCL records a failed launch, allocation or
/// copy on its stream and carries on; the list is handed to whoever next flushes the stream, and
/// some callers drop it (the autotuner's benchmark flush does), so a skipped kernel could
/// otherwise go unseen.
pub fn stream_errors() -> u64 {
    STREAM_ERRORS.load(Ordering::Relaxed)
}

/// Counts `errors` and writes the first distinct ones to stderr (without their backtraces).
pub fn record_stream_errors(errors: &[cubecl_core::server::ServerError]) {
    if errors.is_empty() {
        return;
    }
    STREAM_ERRORS.fetch_add(errors.len() as u64, Ordering::Relaxed);
    let mut shown = SHOWN.lock().unwrap_or_else(|p| p.into_inner());
    for error in errors {
        let full = error.to_string();
        let text: String = full.split("Backtrace").next().unwrap_or_default().trim().chars().take(600).collect();
        if shown.len() < SHOW_AT_MOST && !shown.contains(&text) {
            eprintln!("cubecl-cuda: stream error (counted in stream_errors()): {text}");
            shown.push(text);
        }
    }
}

static SYNC_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Device allocations that `cuMemAllocAsync` refused and that were retried with `cuMemAlloc`
/// (newt patch: the storage falls back silently otherwise); the first is written to stderr.
pub fn sync_allocations() -> u64 {
    SYNC_ALLOCATIONS.load(Ordering::Relaxed)
}

pub(crate) fn record_sync_allocation(size: u64, error: &dyn std::fmt::Debug) {
    if SYNC_ALLOCATIONS.fetch_add(1, Ordering::Relaxed) == 0 {
        eprintln!(
            "cubecl-cuda: cuMemAllocAsync of {size} bytes failed ({error:?}); retrying with cuMemAlloc (counted in sync_allocations())"
        );
    }
}
