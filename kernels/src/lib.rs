//! newt-kernels: the tensor operations of a Llama-family transformer, as Burn functions generic
//! over any backend.
//!
//! Each op has a *reference*, written for clarity and numerical fidelity to Hugging Face
//! transformers (f32 where transformers upcasts) and tested against naive formulas
//! ([`rms_norm_reference`], [`apply_rope`], [`attention()`], ...).
//!
//! Fast paths are Burn backend extensions ([`KernelBackend`]), each one autodiff node with its own
//! backward pass and a default written in Burn tensor operations: [`flash`] (attention; on CUDA
//! the FlashAttention-2 kernels of [`flash_cuda`]), [`matmul`] (cuBLASLt on CUDA), [`lora`] (a
//! LoRA linear as one operation, its products cuBLASLt calls on CUDA), [`norm`], [`mod@rope`] and
//! [`mod@swiglu`] (one CUDA kernel per pass), [`multi`] (the optimizer's flat vector, a few CUDA launches), and
//! [`decode`] (a whole decoding step of `newt serve` as one operation).
//! [`check`] compares them with their references on the machine at hand (`newt kernels`).
//!
//! ```text
//!  norm::rms_norm ─┐
//!  rope::{inv_freq, RopeTables, rope} ─┼─> flash::flash_attention ─> lora::lora_linear, swiglu
//!                                     └─> loss::chunked_cross_entropy (never all logits)
//! ```
pub mod attention;
pub mod check;
pub mod collective;
mod cpu_attention;
mod cpu_matmul;
mod cuda_op;
pub mod decode;
pub mod flash;
pub mod flash_cuda;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod multi;
pub mod nf4;
pub mod norm;
pub mod rope;
pub mod seed;
pub mod swiglu;

pub use attention::{AttentionMask, attention};
pub use flash::{FlashOptions, KernelBackend, flash_attention};
pub use lora::{lora_linear, lora_linear_for_backward};
pub use loss::chunked_cross_entropy;
pub use matmul::{dense_matmul, dense_matmul_for_backward};
pub use multi::{flat_gather, flat_scatter};
pub use norm::{rms_norm, rms_norm_reference};
pub use rope::{RopeScaling, RopeTables, apply_rope, rope, rope_inv_freq};
pub use seed::backward_with;
pub use swiglu::swiglu;

/// The value of a one-element tensor as `f64`, read in the tensor's own dtype.
///
/// `Tensor::into_scalar` converts to the backend's default float element first: bf16 on newt's
/// CUDA backend, so an f32 loss sum or squared gradient norm read that way keeps 8 bits of
/// mantissa (a loss of 60,000 summed tokens is then off by up to 128).
pub fn read_f64<B: Backend, const D: usize>(t: Tensor<B, D>) -> f64 {
    assert_eq!(t.shape().num_elements(), 1, "read_f64 reads a one-element tensor, not {:?}", t.dims());
    t.into_data().iter::<f64>().next().expect("one element")
}

/// `x` in `dtype`, with no operation recorded when it already is (Burn records a cast, and an
/// autodiff node, even from a dtype to itself).
pub fn in_dtype<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
    dtype: burn::tensor::DType,
) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

/// A fast path of newt's kernels that a pipeline can set aside for its reference in Burn's tensor
/// operations (`kernels: {reference: [...]}`, part of the train key): to measure one against the
/// other, or to rule a kernel out when results look wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPath {
    /// The CUDA flash-attention kernels ([`flash_cuda`]).
    FlashAttention,
    /// The fused RMSNorm passes ([`norm`]).
    RmsNorm,
    /// The fused rotary embedding ([`rope`]).
    Rope,
    /// The multi-tensor gather and scatter of the optimizer ([`multi`]).
    MultiTensor,
    /// cuBLASLt for the dense matmuls ([`matmul`]); the reference is CubeCL's matmul.
    DenseMatmul,
    /// The NF4/int8 dequantization kernel ([`nf4`]).
    Nf4Dequant,
    /// The decoding step as one operation ([`decode`]); the reference runs the model's layers
    /// in Burn operations.
    DecodeStep,
    /// The loss's cross-entropy rows as one kernel ([`loss`]); the reference is Burn operations.
    CrossEntropy,
    /// The MLP's SwiGLU gating as one kernel a pass ([`mod@swiglu`]).
    Swiglu,
    /// A prompt's attention on the CPU (Flex) as blocks of queries over the keys they see
    /// (`cpu_attention`); the reference is [`attention::attention_reference`].
    PromptAttention,
}

static REFERENCE_PATHS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// Sets, for this process, which fast paths run as their Burn-op reference instead (none by
/// default). The stages that build a model call it from their params before they do.
pub fn set_reference_paths(paths: &[FastPath]) {
    let bits = paths.iter().fold(0u16, |bits, &p| bits | 1 << p as u16);
    REFERENCE_PATHS.store(bits, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `path` is set aside for its reference ([`set_reference_paths`]).
pub fn uses_reference(path: FastPath) -> bool {
    REFERENCE_PATHS.load(std::sync::atomic::Ordering::Relaxed) & (1 << path as u16) != 0
}

/// Kernel compilations and module loads of the CUDA backend so far in this process (zeros when
/// CUDA is not used); see `kernels/vendor/README.md`.
pub use cubecl_cuda::jit_stats::{JitStats, jit_stats, stream_errors, sync_allocations};

/// CubeCL runs each device's work on a thread of its own (named `DSU-…` / `DSD-…`) that catches
/// a panic in a task, logs it and goes on. An allocation that runs out of memory there (its
/// `initialize_memory` unwraps the error) leaves the new tensor unbound, every later task that
/// touches it panics in turn, and the kernels they would have launched never run: a training run
/// near the GPU's limit went on with wrong gradients and no error (`bench/results/gpu_8b.md`).
/// [`watch_device_threads`] installs a panic hook (kept in front of the existing one) that
/// records such panics; [`take_device_thread_panics`] hands them over, so a caller can stop
/// instead (and the one that reports them takes them, so they are reported once).
static DEVICE_PANICS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static WATCH_DEVICE_THREADS: std::sync::Once = std::sync::Once::new();

/// Whether a thread name is one of CubeCL's device-service threads.
pub fn is_device_thread(name: &str) -> bool {
    name.starts_with("DSU-") || name.starts_with("DSD-")
}

/// Starts recording panics of CubeCL's device threads (idempotent; see [`take_device_thread_panics`]).
pub fn watch_device_threads() {
    WATCH_DEVICE_THREADS.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(is_device_thread) {
                let payload = info.payload();
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(a panic without a message)".into());
                let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
                let mut panics = DEVICE_PANICS.lock().unwrap_or_else(|p| p.into_inner());
                if panics.len() < 64 {
                    panics.push(format!("{message}{at}"));
                }
            }
            previous(info);
        }));
    });
}

/// The panics of CubeCL's device threads recorded since [`watch_device_threads`] or the last
/// call (at most 64), taken off the record.
pub fn take_device_thread_panics() -> Vec<String> {
    std::mem::take(&mut *DEVICE_PANICS.lock().unwrap_or_else(|p| p.into_inner()))
}

use burn::tensor::{Tensor, backend::Backend};

#[cfg(test)]
pub(crate) mod test_util {
    /// The CPU backend every reference test runs on.
    pub type TestBackend = burn::backend::Flex;
    /// The same, with autodiff.
    pub type TestAutodiff = burn::backend::Autodiff<TestBackend>;

    /// Deterministic pseudo-random values in [-1, 1) (splitmix64), so tests need no RNG crate.
    pub fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Largest absolute difference between two slices.
    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::{FastPath, set_reference_paths, uses_reference};

    #[test]
    fn cuda_pool_layouts_parse_smallest_first_after_the_tiny_pool() {
        let cubecl_cuda::pools::MemoryConfiguration::Custom { pool_options } =
            cubecl_cuda::pools::parse("sliced:32m:1m, sliced:1g:256m,exclusive:20g", 512).unwrap()
        else {
            panic!("a list is a custom layout")
        };
        let kinds: Vec<String> = pool_options.iter().map(|p| format!("{:?}", p.pool_type)).collect();
        assert_eq!(kinds.len(), 4);
        assert!(kinds[0].contains("max_alloc_size: 0"));
        assert!(kinds[1].contains(&format!("page_size: {}", 32u64 << 20)));
        assert!(kinds[2].contains(&format!("max_slice_size: {}", 256u64 << 20)));
        assert!(kinds[3].contains(&format!("max_alloc_size: {}", 20u64 << 30)));
    }

    #[test]
    fn cuda_pool_sizes_round_up_to_the_alignment_and_bad_layouts_are_errors() {
        let layout = format!("{:?}", cubecl_cuda::pools::parse("exclusive:1000", 512).unwrap());
        assert!(layout.contains("max_alloc_size: 1024"), "{layout}");
        assert!(cubecl_cuda::pools::parse("sliced:1m:2m", 512).is_err());
        assert!(cubecl_cuda::pools::parse("sliced:1m", 512).is_err());
        assert!(cubecl_cuda::pools::parse("exclusive:0", 512).is_err());
        assert!(cubecl_cuda::pools::parse("exclusive:4x", 512).is_err());
        assert!(matches!(
            cubecl_cuda::pools::parse("subslices", 512),
            Ok(cubecl_cuda::pools::MemoryConfiguration::SubSlices)
        ));
        let newt = format!("{:?}", cubecl_cuda::pools::parse(cubecl_cuda::pools::NEWT_LAYOUT, 512).unwrap());
        assert!(newt.contains(&format!("page_size: {}, max_slice_size: {}", 512u64 << 20, 512u64 << 20)), "{newt}");
        assert!(newt.contains(&format!("max_alloc_size: {}", 1u64 << 30)), "{newt}");
    }

    #[test]
    fn no_kernel_reads_the_environment() {
        // Kernel choices come from the pipeline (`kernels:`, part of the keys), never from hidden
        // environment switches; the walk is checked to have seen this very file.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut seen = Vec::new();
        let mut dirs = vec![src];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let needle = ["env::", "var("].concat();
                    assert!(!text.contains(&needle), "{} reads the environment", path.display());
                    seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
                }
            }
        }
        assert!(seen.iter().any(|f| f == "lib.rs") && seen.iter().any(|f| f == "flash_cuda.rs"), "{seen:?}");
    }

    #[test]
    fn reference_paths_are_set_per_path_and_cleared() {
        let all = [
            FastPath::FlashAttention,
            FastPath::RmsNorm,
            FastPath::Rope,
            FastPath::MultiTensor,
            FastPath::DenseMatmul,
            FastPath::Nf4Dequant,
            FastPath::DecodeStep,
            FastPath::CrossEntropy,
            FastPath::Swiglu,
            FastPath::PromptAttention,
        ];
        set_reference_paths(&[FastPath::Rope, FastPath::Nf4Dequant, FastPath::Swiglu]);
        let on: Vec<_> = all.into_iter().filter(|&p| uses_reference(p)).collect();
        set_reference_paths(&[]);
        assert_eq!(on, [FastPath::Rope, FastPath::Nf4Dequant, FastPath::Swiglu]);
        assert!(all.into_iter().all(|p| !uses_reference(p)));
    }

    use super::test_util::*;
    use super::*;
    use burn::tensor::{DType, TensorData};

    #[test]
    fn read_f64_reads_f32_and_bf16_tensors_in_their_own_precision() {
        let dev = Default::default();
        let x = 60417.0f32;
        let f32_t = Tensor::<TestBackend, 1>::from_data(TensorData::new(vec![x], [1]), (&dev, DType::F32));
        assert_eq!(read_f64(f32_t), 60417.0);
        // A bf16 tensor holds the nearest bf16 value, and read_f64 gives that value exactly.
        let bf16_t = Tensor::<TestBackend, 1>::from_data(TensorData::new(vec![x], [1]), (&dev, DType::BF16));
        assert_eq!(read_f64(bf16_t), 60416.0);
        let two = Tensor::<TestBackend, 2>::from_data(TensorData::new(vec![1.5f32], [1, 1]), &dev);
        assert_eq!(read_f64(two), 1.5);
    }

    #[test]
    #[should_panic(expected = "one-element tensor")]
    fn read_f64_refuses_a_tensor_of_several_elements() {
        let dev = Default::default();
        read_f64(Tensor::<TestBackend, 1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &dev));
    }

    #[test]
    fn stream_errors_count_what_cubecl_hands_over_even_when_the_caller_drops_it() {
        use burn_cubecl::cubecl::server::ServerError;
        let skipped =
            |what: &str| ServerError::Generic { reason: format!("test: {what}"), backtrace: Default::default() };
        let before = crate::stream_errors();
        cubecl_cuda::jit_stats::record_stream_errors(&[skipped("launch skipped"), skipped("launch skipped")]);
        cubecl_cuda::jit_stats::record_stream_errors(&[]);
        cubecl_cuda::jit_stats::record_stream_errors(&[skipped("allocation failed")]);
        // Other tests of this binary run no CUDA stream, so nothing else adds to the count.
        assert_eq!(crate::stream_errors() - before, 3);
    }

    /// Uploading more than 4 GiB with no kernel in between (what loading an 8B model does)
    /// overflowed cubecl-cuda's u32 count of staged upload bytes: the device thread's `push`
    /// panicked (debug assertions; it catches the panic and goes on) and dropped the pinned host
    /// buffer while its asynchronous copy could still be reading it — 587 such panics in every
    /// 8B LoRA run of bench/results/gpu_8b.md's H200 run. 72 tensors of 64 MiB (each small enough
    /// for the pinned staging path), each with its own values, must all read back exactly.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn uploads_past_4_gib_without_a_kernel_between_read_back_exactly() {
        type B = burn::backend::Cuda<f32, i32>;
        let device = Default::default();
        let n = 16 << 20;
        let value = |k: usize, i: usize| ((i * 7 + k * 13) % 1021) as f32;
        let tensors: Vec<Tensor<B, 1>> = (0..72)
            .map(|k| {
                Tensor::from_data(TensorData::new((0..n).map(|i| value(k, i)).collect::<Vec<f32>>(), [n]), &device)
            })
            .collect();
        for (k, t) in tensors.into_iter().enumerate() {
            let got = t.into_data().into_vec::<f32>().unwrap();
            let bad = (0..n).filter(|&i| got[i] != value(k, i)).count();
            assert_eq!(bad, 0, "tensor {k}: {bad} of {n} values differ from what was uploaded");
        }
    }

    #[test]
    fn a_panic_caught_on_a_device_thread_is_recorded_and_others_are_not() {
        watch_device_threads();
        take_device_thread_panics();
        // What CubeCL's device thread does with a task that fails: catch it and go on.
        let run = |name: &str, message: &'static str| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    let caught = std::panic::catch_unwind(|| panic!("{message}"));
                    assert!(caught.is_err());
                })
                .unwrap()
                .join()
                .unwrap();
        };
        run("DSD-0-0", "can't allocate buffer of size: 83024896");
        run("worker-1", "not a device thread");
        let after = take_device_thread_panics();
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(after[0].starts_with("can't allocate buffer of size: 83024896 at "), "{}", after[0]);
        assert!(take_device_thread_panics().is_empty(), "taken once");
        assert!(!is_device_thread("main") && is_device_thread("DSU-3-1"));
    }
}
