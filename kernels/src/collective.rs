//! Device collectives for data-parallel training: NCCL's all-reduce, queued on the CUDA stream
//! the kernels use, through cudarc (whose `nccl` feature the vendored cubecl-cuda compiles in).
//!
//! One process drives every GPU (one thread each), so the communicators come from
//! `ncclCommInitAll` over devices `0..W`. The library is loaded at run time: cudarc looks for
//! `libnccl.so` and CUDA-versioned names (`libnccl.so.13`), not NCCL's own soname `libnccl.so.2`,
//! and panics when none loads; [`Collective::cuda`] checks first and says what to do instead.

use std::sync::Arc;

use cudarc::nccl::{result, sys};

/// One NCCL communicator per device of this process.
pub struct Collective {
    comms: Vec<Comm>,
}

#[derive(Clone, Copy)]
struct Comm(sys::ncclComm_t);

impl Comm {
    /// The handle (a method, so a closure captures the whole `Send` wrapper, not the pointer).
    fn raw(self) -> sys::ncclComm_t {
        self.0
    }
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time per
// communicator; each rank's calls come from its own device thread, in order.
unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

impl std::fmt::Debug for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collective").field("world", &self.comms.len()).finish()
    }
}

impl Collective {
    /// Communicators over CUDA devices `0..world` (after `CUDA_VISIBLE_DEVICES`), or why not.
    pub fn cuda(world: usize) -> Result<Arc<Self>, String> {
        check_library()?;
        let mut comms = vec![std::ptr::null_mut(); world];
        let devices: Vec<i32> = (0..world as i32).collect();
        // SAFETY: `comms` has room for `world` communicators and `devices` lists `world` ids.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), world as i32, devices.as_ptr()) }
            .map_err(|e| format!("NCCL: ncclCommInitAll over {world} GPUs failed: {e:?}"))?;
        Ok(Arc::new(Collective { comms: comms.into_iter().map(Comm).collect() }))
    }

    /// Ranks in the group.
    pub fn world(&self) -> usize {
        self.comms.len()
    }

    /// The NCCL version in use, as `2.27.3`.
    pub fn version() -> Result<String, String> {
        check_library()?;
        let v = result::get_nccl_version().map_err(|e| format!("{e:?}"))?;
        Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
    }

    fn comm(&self, rank: usize) -> sys::ncclComm_t {
        self.comms[rank].0
    }
}

impl Drop for Collective {
    fn drop(&mut self) {
        for c in &self.comms {
            // SAFETY: each communicator was created by ncclCommInitAll and is destroyed once,
            // after the training threads that used it have joined.
            let _ = unsafe { result::comm_destroy(c.0) };
        }
    }
}

/// Whether cudarc will find the NCCL library, with what to do when it will not.
fn check_library() -> Result<(), String> {
    static CHECK: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    CHECK
        .get_or_init(|| {
            let candidates = cudarc::get_lib_name_candidates("nccl");
            // SAFETY: loading NCCL runs its initialisers, as linking against it would.
            if candidates.iter().any(|name| unsafe { libloading::Library::new(name) }.is_ok()) {
                return Ok(());
            }
            let soname = unsafe { libloading::Library::new("libnccl.so.2") }.is_ok();
            Err(if soname {
                "NCCL: libnccl.so.2 is on the library path, but cudarc loads `libnccl.so` (or a \
                 CUDA-versioned name), not libnccl.so.2: link it, e.g. \
                 `ln -s /path/to/libnccl.so.2 DIR/libnccl.so`, and put DIR on LD_LIBRARY_PATH \
                 (or set NEWT_REDUCER=host to sum gradients through host memory)"
                    .to_string()
            } else {
                format!(
                    "NCCL: no NCCL library on the library path (tried {} and libnccl.so.2): install \
                     NCCL 2 (pip's nvidia-nccl-cu13 has one) and put its folder on LD_LIBRARY_PATH, \
                     or set NEWT_REDUCER=host to sum gradients through host memory",
                    candidates.join(", ")
                )
            })
        })
        .clone()
}

pub(crate) mod cuda {
    use std::ffi::c_void;
    use std::sync::Arc;

    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use cudarc::nccl::{result, sys};

    use super::Collective;
    use crate::cuda_op::{Fus, contiguous, custom_op, empty};

    /// `x` (f32 `[n]`) summed over the group by `ncclAllReduce` into a new vector, queued on
    /// this device's stream.
    pub(crate) fn fusion_all_reduce<F: FloatElement>(
        x: FloatTensor<Fus<F>>,
        group: Arc<Collective>,
        rank: usize,
    ) -> FloatTensor<Fus<F>> {
        assert_eq!(x.dtype, DType::F32, "all_reduce_sum takes f32 vectors");
        let n = x.shape.num_elements();
        let comm = super::Comm(group.comm(rank));
        let mut out = custom_op::<F>("nccl_all_reduce_sum", vec![x], vec![(Shape::new([n]), DType::F32)], move |t| {
            let x = contiguous(t.into_iter().next().expect("one input"));
            let out = empty(&x, &[n], DType::F32);
            let buffers = vec![x.handle.clone().binding(), out.handle.clone().binding()];
            // Keeps the communicators alive until the call has run on the device thread.
            let group = group.clone();
            cubecl_cuda::external::launch_external(
                &x.client,
                buffers,
                Box::new(move |ptrs: &[u64], stream| {
                    let _alive = &group;
                    // SAFETY: the two addresses are live f32 buffers of `n` elements, resolved by
                    // CubeCL for this launch; the stream is this device's; the communicator is
                    // this rank's, used by this thread only.
                    let r = unsafe {
                        result::all_reduce(
                            ptrs[0] as *const c_void,
                            ptrs[1] as *mut c_void,
                            n,
                            sys::ncclDataType_t::ncclFloat32,
                            sys::ncclRedOp_t::ncclSum,
                            comm.raw(),
                            stream as sys::cudaStream_t,
                        )
                    };
                    if let Err(e) = r {
                        panic!("ncclAllReduce of {n} floats on rank {rank} failed: {e:?}");
                    }
                }),
            );
            vec![out]
        });
        out.pop().expect("one output")
    }
}
