//! Run-time choice of the Burn backend (`backend: auto | cuda | cpu`) and the persistent CubeCL
//! kernel caches.
//!
//! Burn backends are types, so code that runs a model is written once, generic over
//! `B: Backend`, and [`dispatch`] / [`dispatch_autodiff`] pick the concrete type at run time.
//! CPU is Burn's Flex backend in f32; CUDA is `Cuda<bf16>` (adapters are created in f32 on
//! either). CUDA detection loads the driver library and asks it for devices, so a machine
//! without one answers "no" instead of panicking.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;

use burn::tensor::backend::AutodiffBackend;
pub use newt_kernels::KernelBackend;

/// The CPU backend: Flex, f32.
pub type CpuBackend = burn::backend::Flex;
/// The CUDA backend: bf16 activations and base weights (with operation fusion).
pub type CudaBackend = burn::backend::Cuda<half::bf16, i32>;
/// [`CpuBackend`] with autodiff, for training.
pub type CpuTrainBackend = burn::backend::Autodiff<CpuBackend>;
/// [`CudaBackend`] with autodiff, for training.
pub type CudaTrainBackend = burn::backend::Autodiff<CudaBackend>;

/// Why a backend could not be chosen or set up.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `backend:` is not one of the accepted names.
    #[error("backend `{0}` is not known; use auto, cuda or cpu")]
    Unknown(String),
    /// `backend: cuda` on a machine without a usable GPU.
    #[error("backend: cuda was asked for, but no CUDA device is usable here ({0}); use backend: cpu or auto")]
    NoCuda(String),
    /// The kernel cache directory could not be created.
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// CubeCL's configuration was fixed before newt could point its caches somewhere.
    #[error("the CubeCL runtime was configured before the kernel cache could be set to {0}")]
    CacheTooLate(PathBuf),
}

/// The `backend:` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// CUDA when a device is usable, else CPU.
    #[default]
    Auto,
    /// CUDA, or an error.
    Cuda,
    /// CPU.
    Cpu,
}

impl FromStr for BackendChoice {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "cuda" | "gpu" => Ok(BackendChoice::Cuda),
            "cpu" => Ok(BackendChoice::Cpu),
            _ => Err(BackendError::Unknown(s.to_string())),
        }
    }
}

/// The backend a run will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedBackend {
    /// [`CpuBackend`].
    Cpu,
    /// [`CudaBackend`] on device `index`.
    Cuda {
        /// CUDA device ordinal.
        index: usize,
    },
}

impl ResolvedBackend {
    /// `cpu` or `cuda` (for stage keys and logs).
    pub fn name(self) -> &'static str {
        match self {
            ResolvedBackend::Cpu => "cpu",
            ResolvedBackend::Cuda { .. } => "cuda",
        }
    }

    /// The dtype of base weights and activations on it.
    pub fn dtype_name(self) -> &'static str {
        match self {
            ResolvedBackend::Cpu => "f32",
            ResolvedBackend::Cuda { .. } => "bf16",
        }
    }
}

/// Whether `device` is one of Burn's CUDA devices (so far every non-CPU backend newt runs).
pub fn on_cuda<B: burn::tensor::backend::Backend>(device: &B::Device) -> bool {
    B::name(device).to_lowercase().contains("cuda")
}

/// Number of CUDA devices the driver reports; 0 when there is no driver or no device.
pub fn cuda_device_count() -> usize {
    probed().as_ref().map_or(0, |p| p.0)
}

/// Total memory of CUDA device 0 in bytes, when there is one.
pub fn cuda_device_memory() -> Option<u64> {
    probed().as_ref().ok().and_then(|p| p.1)
}

fn probed() -> &'static Result<(usize, Option<u64>), String> {
    static PROBE: OnceLock<Result<(usize, Option<u64>), String>> = OnceLock::new();
    PROBE.get_or_init(probe_cuda)
}

/// Asks the CUDA driver API directly (`cuInit`, `cuDeviceGetCount`) through `dlopen`, so a
/// missing driver is an `Err`, never a panic inside a backend's lazy initialisation.
fn probe_cuda() -> Result<(usize, Option<u64>), String> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, i32) -> i32;
    let names: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };
    let mut last = String::from("no CUDA driver library");
    for name in names {
        // SAFETY: loading the NVIDIA driver library runs its initialisers, which is what any
        // CUDA program does; the two symbols are called with their documented signatures.
        unsafe {
            let lib = match libloading::Library::new(*name) {
                Ok(lib) => lib,
                Err(e) => {
                    last = format!("{name}: {e}");
                    continue;
                }
            };
            let result = {
                let init: libloading::Symbol<CuInit> = lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
                let count: libloading::Symbol<CuDeviceGetCount> =
                    lib.get(b"cuDeviceGetCount\0").map_err(|e| e.to_string())?;
                let mut n = 0i32;
                // Device 0's memory, when the driver says (newt's plan compares its estimate with it).
                let memory = || -> Option<u64> {
                    let get: libloading::Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").ok()?;
                    let total: libloading::Symbol<CuDeviceTotalMem> = lib.get(b"cuDeviceTotalMem_v2\0").ok()?;
                    let (mut dev, mut bytes) = (0i32, 0usize);
                    (get(&mut dev, 0) == 0 && total(&mut bytes, dev) == 0).then_some(bytes as u64)
                };
                match init(0) {
                    0 => match count(&mut n) {
                        0 if n > 0 => Ok((n as usize, memory())),
                        0 => Ok((0, None)),
                        rc => Err(format!("cuDeviceGetCount failed with CUDA error {rc}")),
                    },
                    rc => Err(format!("cuInit failed with CUDA error {rc}")),
                }
            };
            // Keep the driver loaded for the process: CubeCL loads it again and unloading a
            // driver that has been initialised is never useful.
            std::mem::forget(lib);
            return result;
        }
    }
    Err(last)
}

/// Turns `backend:` into the backend this machine will use.
pub fn resolve(choice: BackendChoice) -> Result<ResolvedBackend, BackendError> {
    match choice {
        BackendChoice::Cpu => Ok(ResolvedBackend::Cpu),
        BackendChoice::Auto if cuda_device_count() > 0 => Ok(ResolvedBackend::Cuda { index: 0 }),
        BackendChoice::Auto => Ok(ResolvedBackend::Cpu),
        BackendChoice::Cuda => match probed() {
            Ok((n, _)) if *n > 0 => Ok(ResolvedBackend::Cuda { index: 0 }),
            Ok(_) => Err(BackendError::NoCuda("the driver reports no device".into())),
            Err(why) => Err(BackendError::NoCuda(why.clone())),
        },
    }
}

/// Code generic over an inference backend, run by [`dispatch`].
pub trait WithBackend {
    /// What the code returns.
    type Output;
    /// Runs on backend `B`, device `device`.
    fn run<B: KernelBackend>(self, device: B::Device) -> Self::Output;
}

/// Code generic over a training (autodiff) backend, run by [`dispatch_autodiff`].
pub trait WithAutodiffBackend {
    /// What the code returns.
    type Output;
    /// Runs on backend `B`, device `device`.
    fn run<B: AutodiffBackend + KernelBackend>(self, device: B::Device) -> Self::Output
    where
        B::InnerBackend: KernelBackend;
}

/// Runs `work` on the resolved inference backend.
pub fn dispatch<W: WithBackend>(backend: ResolvedBackend, work: W) -> W::Output {
    match backend {
        ResolvedBackend::Cpu => work.run::<CpuBackend>(Default::default()),
        ResolvedBackend::Cuda { index } => {
            newt_kernels::watch_device_threads();
            let out = work.run::<CudaBackend>(burn::backend::cuda::CudaDevice::new(index));
            fail_on_device_thread_panics();
            out
        }
    }
}

/// Runs `work` on the resolved backend with autodiff.
pub fn dispatch_autodiff<W: WithAutodiffBackend>(backend: ResolvedBackend, work: W) -> W::Output {
    match backend {
        ResolvedBackend::Cpu => work.run::<CpuTrainBackend>(Default::default()),
        ResolvedBackend::Cuda { index } => {
            newt_kernels::watch_device_threads();
            let out = work.run::<CudaTrainBackend>(burn::backend::cuda::CudaDevice::new(index));
            fail_on_device_thread_panics();
            out
        }
    }
}

/// Stops the process's work when a CubeCL device thread panicked and nothing reported it yet:
/// CubeCL catches the panic and skips what depended on it, so results computed after it cannot be
/// trusted ([`newt_kernels::watch_device_threads`]). The trainer reports (and takes) them after
/// every step, so a training run's out-of-memory error comes through unchanged; this catches the
/// other stages.
fn fail_on_device_thread_panics() {
    if let Some(first) = newt_kernels::take_device_thread_panics().first() {
        panic!("the CUDA device thread failed, so this stage's results cannot be trusted: {first}");
    }
}

/// Points CubeCL's persistent caches (compiled PTX and autotune results) at
/// `cache_dir/cubecl`, so the second process on a machine neither recompiles kernels nor
/// re-runs autotuning. Returns that directory.
///
/// Must run before the first CUDA operation of the process (CubeCL reads its configuration
/// once); calling it again with the same directory is a no-op. Settings from a `cubecl.toml`
/// and `CUBECL_*` variables are kept; only the cache locations are replaced.
pub fn configure_kernel_cache(cache_dir: &Path) -> Result<PathBuf, BackendError> {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};

    static SET: OnceLock<PathBuf> = OnceLock::new();
    let dir = cache_dir.join("cubecl");
    if let Some(done) = SET.get() {
        return if *done == dir { Ok(dir) } else { Err(BackendError::CacheTooLate(dir)) };
    }
    std::fs::create_dir_all(&dir).map_err(|source| BackendError::Cache { path: dir.clone(), source })?;
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return Err(BackendError::CacheTooLate(dir));
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.compilation.cache = Some(CacheConfig::File(dir.clone()));
    config.autotune.cache = CacheConfig::File(dir.clone());
    {
        // `set` panics when a value is present; check and set under one lock.
        let mut slot = CubeClRuntimeConfig::storage().lock();
        if slot.is_some() {
            return Err(BackendError::CacheTooLate(dir));
        }
        *slot = Some(std::sync::Arc::new(config));
    }
    let _ = SET.set(dir.clone());
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names_parse() {
        assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert_eq!("CUDA".parse::<BackendChoice>().unwrap(), BackendChoice::Cuda);
        assert_eq!("cpu".parse::<BackendChoice>().unwrap(), BackendChoice::Cpu);
        let err = "tpu".parse::<BackendChoice>().unwrap_err().to_string();
        assert!(err.contains("tpu") && err.contains("auto, cuda or cpu"), "{err}");
    }

    #[test]
    fn detection_never_panics_and_cpu_is_always_available() {
        let n = cuda_device_count();
        assert_eq!(resolve(BackendChoice::Cpu).unwrap(), ResolvedBackend::Cpu);
        let auto = resolve(BackendChoice::Auto).unwrap();
        assert_eq!(auto == ResolvedBackend::Cpu, n == 0);
        assert_eq!(resolve(BackendChoice::Cuda).is_ok(), n > 0);
    }

    #[test]
    fn kernel_cache_is_set_once_per_process() {
        let tmp = std::env::temp_dir().join(format!("newt-kc-{}", std::process::id()));
        let dir = configure_kernel_cache(&tmp).unwrap();
        assert!(dir.is_dir());
        assert_eq!(configure_kernel_cache(&tmp).unwrap(), dir);
        assert!(configure_kernel_cache(&tmp.join("other")).is_err());
        use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
        let c = CubeClRuntimeConfig::get();
        assert!(matches!(&c.autotune.cache, cubecl_runtime::config::cache::CacheConfig::File(p) if *p == dir));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
