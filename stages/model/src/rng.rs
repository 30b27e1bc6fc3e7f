//! A tiny, version-stable random generator (SplitMix64) for epoch shuffles and per-step seeds.
//!
//! Kept in-crate on purpose: a resumed run must reproduce the same order even if a dependency's
//! generator changes between versions.

/// SplitMix64 (Steele, Lea, Flood 2014).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (n > 0), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Derives an independent seed from a base seed and a stream number (epoch, step).
    pub fn mix(seed: u64, stream: u64) -> u64 {
        SplitMix64::new(seed ^ stream.wrapping_mul(0xd6e8_feb8_6659_fd93)).next_u64()
    }
}

thread_local! {
    static BATCH_SEED: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The backend's random generator is process-wide: a layer that seeds it and draws its dropout
/// masks holds this lock, so a replica on another thread cannot draw in between.
static LAYER_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `f` with `seed` as this thread's micro-batch seed: each decoder layer then seeds its
/// dropout masks from (seed, layer), so gradient checkpointing's recomputation of a layer draws
/// the masks its forward pass drew. Set by the training loop around each micro-batch.
pub fn with_batch_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    scoped(&BATCH_SEED, Some(seed), f)
}

/// Runs `f` with the thread-local `cell` set to `value`, restoring the old value afterwards
/// (also when `f` panics).
pub(crate) fn scoped<V: Copy + 'static, T>(
    cell: &'static std::thread::LocalKey<std::cell::Cell<V>>,
    value: V,
    f: impl FnOnce() -> T,
) -> T {
    struct Restore<V: Copy + 'static>(&'static std::thread::LocalKey<std::cell::Cell<V>>, V);
    impl<V: Copy + 'static> Drop for Restore<V> {
        fn drop(&mut self) {
            self.0.set(self.1);
        }
    }
    let _restore = Restore(cell, cell.replace(value));
    f()
}

/// This thread's micro-batch seed, inside [`with_batch_seed`].
pub fn batch_seed() -> Option<u64> {
    BATCH_SEED.get()
}

/// Runs `f` (one layer's forward pass) with the backend's generator seeded from (`seed`,
/// `layer`), holding the process-wide lock while it draws. A lazy backend (Burn's fusion on
/// CUDA) only queues `f`'s random ops; they are drained here, before the lock is let go, so
/// they draw under this layer's seed and not a later layer's or another replica's.
pub fn seeded_layer<B: burn::tensor::backend::Backend, T>(
    device: &B::Device,
    seed: u64,
    layer: usize,
    f: impl FnOnce() -> T,
) -> T {
    let _lock = LAYER_RNG.lock().unwrap_or_else(|p| p.into_inner());
    B::seed(device, SplitMix64::mix(seed, layer as u64));
    let out = f();
    // The sync hands over (and clears) the errors CubeCL recorded on the stream so far: a
    // failed launch or allocation must stop the step here, or no later read would see it.
    if let Err(e) = B::sync(device) {
        panic!("the device failed during layer {layer}'s forward pass: {e:?}");
    }
    out
}
