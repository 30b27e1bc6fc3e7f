//! Dense 2-D matmul for the frozen base linears and the LM head, through cuBLASLt on CUDA.
//!
//! Burn 0.21's CubeCL matmul ran bf16 8192³ at 93–95 TFLOP/s on an H200, where cuBLASLt (what
//! PyTorch calls) runs it at ~790, and every new shape paid an autotune. [`KernelBackend::dense_matmul`]
//! is `[m, k] · [k, n]`: Burn's `float_matmul` on every backend by default; on CUDA it is a fusion
//! custom operation that hands Burn's buffers to cuBLASLt, queued in order on the CUDA stream
//! CubeCL itself uses for them, from CubeCL's device thread (a patched cubecl-cuda runs it there:
//! `kernels/vendor/README.md`), so nothing is synchronized or copied and the calling thread never
//! waits. Transposed views (`w.transpose()` of a `[out, in]` weight) are read in place as
//! cuBLASLt's `T` operand. Under autodiff it is one operation whose backward pass is two more
//! `dense_matmul`s (`dA = dC·Bᵀ`, `dB = Aᵀ·dC`), each computed only for an input that needs it: a
//! frozen weight gets no gradient matmul at all. `kernels: {reference: [dense_matmul]}` turns cuBLASLt off
//! (to compare in the same binary).
//!
//! The part that can be wrong without a GPU — which operand, transpose flag and leading
//! dimension cuBLASLt gets for a row-major or transposed view — is [`GemmPlan`], a plain function
//! tested on the CPU against a column-major GEMM with cuBLAS's semantics.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::KernelBackend;

/// `lhs · rhs` for `[m, k] · [k, n]` through [`KernelBackend::dense_matmul`].
pub fn dense_matmul<B: KernelBackend>(lhs: Tensor<B, 2>, rhs: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::dense_matmul(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
    )))
}

/// [`dense_matmul`] for a pass that wants only its backward: zeros `[m, n]`, recorded under
/// autodiff as `dense_matmul`'s node (the same gradients reach `lhs` and `rhs`), with no product
/// computed forward (see [`crate::lora::lora_linear_for_backward`]).
pub fn dense_matmul_for_backward<B: KernelBackend>(lhs: Tensor<B, 2>, rhs: Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_primitive(TensorPrimitive::Float(B::dense_matmul_for_backward(
        lhs.into_primitive().tensor(),
        rhs.into_primitive().tensor(),
    )))
}

static CUBLASLT_CALLS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_CALLS: AtomicU64 = AtomicU64::new(0);

/// How many CUDA [`KernelBackend::dense_matmul`] calls went to cuBLASLt, and how many fell back to
/// CubeCL's matmul (cuBLASLt not loadable, or a dtype/layout it is not given), in this process.
pub fn cuda_dense_matmul_calls() -> (u64, u64) {
    (CUBLASLT_CALLS.load(Ordering::Relaxed), FALLBACK_CALLS.load(Ordering::Relaxed))
}

/// How a row-major 2-D view `[rows, cols]` with element strides `strides` lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// The view is the transpose of a row-major buffer (`w.transpose()`).
    pub transposed: bool,
    /// Elements between consecutive rows of the stored (untransposed) buffer.
    pub ld: usize,
}

impl View {
    /// `None` when the view is neither row-major nor a transposed row-major buffer (it must be
    /// made contiguous first).
    pub fn of(shape: [usize; 2], strides: [usize; 2]) -> Option<View> {
        let [rows, cols] = shape;
        if (strides[1] == 1 || cols == 1) && (strides[0] >= cols.max(1) || rows == 1) {
            return Some(View { transposed: false, ld: if rows == 1 { cols.max(1) } else { strides[0] } });
        }
        if (strides[0] == 1 || rows == 1) && (strides[1] >= rows.max(1) || cols == 1) {
            return Some(View { transposed: true, ld: if cols == 1 { rows.max(1) } else { strides[1] } });
        }
        None
    }
}

/// One cuBLASLt call, in its column-major terms: `D (n × m, ld n) = op(A) · op(B)`.
///
/// Row-major `C[m, n] = L[m, k] · R[k, n]` is column-major `Cᵀ = Rᵀ · Lᵀ`, and a row-major buffer
/// read column-major is its transpose, so cuBLAS's `A` is the right operand's buffer and `B` the
/// left's; a transposed view becomes the `T` operation on its untransposed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmPlan {
    /// Output rows in column-major terms (`n`).
    pub m: usize,
    /// Output columns in column-major terms (`m`).
    pub n: usize,
    /// The reduced dimension.
    pub k: usize,
    /// `A` (the right operand's buffer) is transposed.
    pub trans_a: bool,
    /// `B` (the left operand's buffer) is transposed.
    pub trans_b: bool,
    /// Stored rows of `A`, stored columns of `A`, and its leading dimension.
    pub a: (usize, usize, usize),
    /// The same for `B`.
    pub b: (usize, usize, usize),
    /// Leading dimension of `D`.
    pub ldd: usize,
}

impl GemmPlan {
    /// The call that computes `lhs [m, k] · rhs [k, n]` into a contiguous `[m, n]`.
    pub fn new(m: usize, k: usize, n: usize, lhs: View, rhs: View) -> GemmPlan {
        let a = if rhs.transposed { (k, n, rhs.ld) } else { (n, k, rhs.ld) };
        let b = if lhs.transposed { (m, k, lhs.ld) } else { (k, m, lhs.ld) };
        GemmPlan { m: n, n: m, k, trans_a: rhs.transposed, trans_b: lhs.transposed, a, b, ldd: n }
    }
}

/// [`KernelBackend::dense_matmul`] under autodiff: one operation, its backward two more.
/// Without `value` it is [`KernelBackend::dense_matmul_for_backward`]: the same node, valued
/// zeros, with no product computed forward.
pub(crate) fn autodiff_dense_matmul<B: KernelBackend, C: CheckpointStrategy>(
    lhs: FloatTensor<Autodiff<B, C>>,
    rhs: FloatTensor<Autodiff<B, C>>,
    value: bool,
) -> FloatTensor<Autodiff<B, C>> {
    {
        #[derive(Debug)]
        struct DenseMatmulBackward;

        impl<B: KernelBackend> Backward<B, 2> for DenseMatmulBackward {
            /// The left operand when the right needs a gradient, and the other way round.
            type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

            fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
                let [node_lhs, node_rhs] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (lhs, rhs) = ops.state;
                if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
                    grads.register::<B>(node.id, B::dense_matmul(grad.clone(), B::float_transpose(rhs)));
                }
                if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
                    grads.register::<B>(node.id, B::dense_matmul(B::float_transpose(lhs), grad));
                }
            }
        }

        let lhs_tracked = !lhs.node.requirement.is_none();
        let rhs_tracked = !rhs.node.requirement.is_none();
        let product = |lhs: FloatTensor<B>, rhs: FloatTensor<B>| match value {
            true => B::dense_matmul(lhs, rhs),
            false => crate::seed::zeros_rows::<B>(&lhs, rhs.shape()[1]),
        };
        match DenseMatmulBackward.prepare::<C>([lhs.node.clone(), rhs.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let state = (rhs_tracked.then(|| lhs.primitive.clone()), lhs_tracked.then(|| rhs.primitive.clone()));
                prep.finish(state, product(lhs.primitive, rhs.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(product(lhs.primitive, rhs.primitive)),
        }
    }
}

/// The CUDA implementation: a Burn fusion custom operation over cuBLASLt.
///
/// The call is prepared on the calling thread (layouts, the heuristic's algorithm; once per
/// shape) and run on CubeCL's device thread, in launch order, through the patched
/// cubecl-cuda's `external::launch_external`: the training thread never waits for the GPU or
/// for the device thread.
pub(crate) mod cuda {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex, OnceLock};

    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;
    use cudarc::cublaslt::{result as lt, sys};

    use super::{GemmPlan, View};
    use crate::cuda_op::{Cube, Fus, custom_op};

    /// Bytes of cuBLASLt workspace (one buffer on the device thread, reused by every call, all
    /// of them on one stream).
    const WORKSPACE: usize = 32 << 20;

    /// [`crate::KernelBackend::dense_matmul`] for `Cuda<F>` (Burn's CUDA backend with fusion).
    pub(crate) fn fusion_dense_matmul<F: FloatElement>(
        lhs: FloatTensor<Fus<F>>,
        rhs: FloatTensor<Fus<F>>,
    ) -> FloatTensor<Fus<F>> {
        let outputs = vec![(Shape::new([lhs.shape[0], rhs.shape[1]]), lhs.dtype)];
        custom_op::<F>("newt_dense_matmul", vec![lhs, rhs], outputs, |ins| {
            let [lhs, rhs] = <[_; 2]>::try_from(ins).unwrap_or_else(|_| unreachable!("two inputs"));
            vec![cube_dense_matmul::<F>(lhs, rhs)]
        })
        .into_iter()
        .next()
        .expect("the product")
    }

    /// cuBLASLt on CubeCL tensors, or CubeCL's own matmul when cuBLASLt cannot take the call.
    pub(crate) fn cube_dense_matmul<F: FloatElement>(
        lhs: CubeTensor<CudaRuntime>,
        rhs: CubeTensor<CudaRuntime>,
    ) -> CubeTensor<CudaRuntime> {
        cube_gemm::<F>(lhs, rhs, 1.0, None)
    }

    /// `alpha·(lhs · rhs)`, plus `acc` when given (`acc` is then overwritten with the result and
    /// returned: the caller owns it, nothing else reads it), through cuBLASLt or, when it cannot
    /// take the call, CubeCL's matmul and elementwise ops.
    pub(crate) fn cube_gemm<F: FloatElement>(
        lhs: CubeTensor<CudaRuntime>,
        rhs: CubeTensor<CudaRuntime>,
        alpha: f32,
        acc: Option<CubeTensor<CudaRuntime>>,
    ) -> CubeTensor<CudaRuntime> {
        use burn::tensor::ops::FloatTensorOps;
        match gemm(&lhs, &rhs, alpha, acc.as_ref()) {
            Some(out) => {
                super::CUBLASLT_CALLS.fetch_add(1, Ordering::Relaxed);
                out
            }
            None => {
                super::FALLBACK_CALLS.fetch_add(1, Ordering::Relaxed);
                let mut out = Cube::<F>::float_matmul(lhs, rhs);
                if alpha != 1.0 {
                    out = Cube::<F>::float_mul_scalar(out, alpha.into());
                }
                match acc {
                    Some(acc) => Cube::<F>::float_add(acc, out),
                    None => out,
                }
            }
        }
    }

    fn view(t: &CubeTensor<CudaRuntime>) -> Option<View> {
        let (shape, strides) = (t.meta.shape(), t.meta.strides());
        if shape.num_dims() != 2 {
            return None;
        }
        View::of([shape[0], shape[1]], [strides[0], strides[1]])
    }

    fn data_type(dtype: DType) -> Option<sys::cudaDataType> {
        match dtype {
            DType::BF16 => Some(sys::cudaDataType::CUDA_R_16BF),
            DType::F16 => Some(sys::cudaDataType::CUDA_R_16F),
            DType::F32 => Some(sys::cudaDataType::CUDA_R_32F),
            _ => None,
        }
    }

    /// `None` (fall back) for shapes, dtypes or layouts cuBLASLt is not given, or when the
    /// library cannot be loaded. With `acc` (a contiguous `[m, n]` of the operands' dtype), the
    /// product is added to it in place (`beta = 1`) and `acc` returned.
    fn gemm(
        lhs: &CubeTensor<CudaRuntime>,
        rhs: &CubeTensor<CudaRuntime>,
        alpha: f32,
        acc: Option<&CubeTensor<CudaRuntime>>,
    ) -> Option<CubeTensor<CudaRuntime>> {
        // `kernels: {reference: [dense_matmul]}` measures CubeCL's matmul in the same binary.
        if crate::uses_reference(crate::FastPath::DenseMatmul) {
            return None;
        }
        if lhs.dtype != rhs.dtype || lhs.qparams.is_some() || rhs.qparams.is_some() {
            return None;
        }
        let ty = data_type(lhs.dtype)?;
        let (lv, rv) = (view(lhs)?, view(rhs)?);
        let (m, k, n) = (lhs.meta.shape()[0], lhs.meta.shape()[1], rhs.meta.shape()[1]);
        if m == 0 || k == 0 || n == 0 || rhs.meta.shape()[0] != k {
            return None;
        }
        if let Some(acc) = acc {
            let contiguous = acc.meta.shape().num_dims() == 2
                && acc.meta.shape()[0] == m
                && acc.meta.shape()[1] == n
                && acc.meta.strides()[1] == 1
                && acc.meta.strides()[0] == n;
            if !contiguous || acc.dtype != lhs.dtype {
                return None;
            }
        }
        let prepared = prepared(Key { plan: GemmPlan::new(m, k, n, lv, rv), ty: ty as i32 }, ty)?;
        let (out, beta) = match acc {
            Some(acc) => (acc.clone(), 1.0f32),
            None => (
                burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
                    lhs.client.clone(),
                    lhs.device.clone(),
                    Shape::new([m, n]),
                    lhs.dtype,
                ),
                0.0,
            ),
        };
        let buffers = vec![rhs.handle.clone().binding(), lhs.handle.clone().binding(), out.handle.clone().binding()];
        cubecl_cuda::external::launch_external(
            &lhs.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| run(&prepared, ptrs, alpha, beta, stream)),
        );
        Some(out)
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    struct Key {
        plan: GemmPlan,
        ty: i32,
    }

    /// Descriptors and the heuristic's algorithms for one [`Key`]: one for buffers aligned to 16
    /// bytes (all of them in practice), one that assumes only element alignment.
    struct Prepared {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        d: sys::cublasLtMatrixLayout_t,
        aligned: sys::cublasLtMatmulAlgo_t,
        unaligned: sys::cublasLtMatmulAlgo_t,
    }

    // SAFETY: the descriptors are created once, never modified, and only read by cuBLASLt calls;
    // they are never destroyed (one per shape, kept for the process).
    unsafe impl Send for Prepared {}
    unsafe impl Sync for Prepared {}

    type LtResult<T> = Result<T, Box<dyn std::error::Error>>;

    /// The calling threads' handle, for heuristics (`None`: cuBLASLt is not loadable here).
    struct Planner(sys::cublasLtHandle_t);
    // SAFETY: used under the PLANS lock only.
    unsafe impl Send for Planner {}
    unsafe impl Sync for Planner {}

    static PLANNER: OnceLock<Option<Planner>> = OnceLock::new();
    static PLANS: Mutex<Option<HashMap<Key, Option<Arc<Prepared>>>>> = Mutex::new(None);

    fn prepared(key: Key, ty: sys::cudaDataType) -> Option<Arc<Prepared>> {
        let planner = PLANNER
            .get_or_init(|| {
                // cudarc panics when it cannot load libcublasLt: that means "use CubeCL's matmul".
                std::panic::catch_unwind(lt::create_handle).ok().and_then(Result::ok).map(Planner)
            })
            .as_ref()?;
        let mut plans = PLANS.lock().unwrap();
        plans
            .get_or_insert_with(HashMap::new)
            .entry(key)
            .or_insert_with(|| prepare(planner.0, &key, ty).ok().map(Arc::new))
            .clone()
    }

    fn prepare(handle: sys::cublasLtHandle_t, key: &Key, ty: sys::cudaDataType) -> LtResult<Prepared> {
        let p = key.plan;
        let elem: u32 = if ty == sys::cudaDataType::CUDA_R_32F { 4 } else { 2 };
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)?;
        unsafe {
            for (attr, t) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, p.trans_a),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, p.trans_b),
            ] {
                let op = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                lt::set_matmul_desc_attribute(desc, attr, &op as *const i32 as *const c_void, 4)?;
            }
        }
        let layout =
            |(rows, cols, ld): (usize, usize, usize)| lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64);
        let (a, b, d) = (layout(p.a)?, layout(p.b)?, layout((p.m, p.n, p.ldd))?);
        let heuristic = |align: u32| -> LtResult<sys::cublasLtMatmulAlgo_t> {
            use sys::cublasLtMatmulPreferenceAttributes_t as P;
            let pref = lt::create_matmul_pref()?;
            let result = unsafe {
                let ws = WORKSPACE as u64;
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                )?;
                for attr in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    lt::set_matmul_pref_attribute(pref, attr, &align as *const u32 as *const c_void, 4)?;
                }
                let r = lt::get_matmul_algo_heuristic(handle, desc, a, b, d, d, pref);
                lt::destroy_matmul_pref(pref)?;
                r?
            };
            Ok(result.algo)
        };
        Ok(Prepared { desc, a, b, d, aligned: heuristic(16)?, unaligned: heuristic(elem)? })
    }

    /// The device thread's handle and workspace.
    struct Runner {
        handle: sys::cublasLtHandle_t,
        workspace: u64,
    }

    thread_local! {
        static RUNNER: RefCell<Option<Runner>> = const { RefCell::new(None) };
    }

    /// On the device thread: `ptrs` are `[A (rhs), B (lhs), D (out)]`; `D = alpha·A·B + beta·D`.
    fn run(p: &Prepared, ptrs: &[u64], alpha: f32, beta: f32, stream: cudarc::driver::sys::CUstream) {
        RUNNER.with(|cell| {
            let mut slot = cell.borrow_mut();
            let runner = slot.get_or_insert_with(|| Runner {
                handle: lt::create_handle().expect("cuBLASLt loaded on the calling thread"),
                // SAFETY: the device thread has CubeCL's (primary) context current.
                workspace: unsafe { cudarc::driver::result::malloc_sync(WORKSPACE) }.expect("cuBLASLt workspace"),
            });
            let [a, b, d] = [ptrs[0], ptrs[1], ptrs[2]];
            let algo = if (a | b | d) % 16 == 0 { &p.aligned } else { &p.unaligned };
            // SAFETY: the pointers are live CubeCL buffers of the sizes the layouts describe,
            // resolved by CubeCL for this launch; the call is queued on their stream.
            let result = unsafe {
                lt::matmul(
                    runner.handle,
                    p.desc,
                    &alpha as *const f32 as *const c_void,
                    &beta as *const f32 as *const c_void,
                    a as *const c_void,
                    p.a,
                    b as *const c_void,
                    p.b,
                    d as *const c_void,
                    p.d,
                    d as *mut c_void,
                    p.d,
                    algo,
                    runner.workspace as *mut c_void,
                    WORKSPACE,
                    stream as sys::cudaStream_t,
                )
            };
            // A failure here would leave the output unwritten: never continue silently.
            if let Err(e) = result {
                panic!("cuBLASLt matmul failed after its plan was accepted: {e:?}");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    /// cuBLAS's GEMM on column-major buffers: `D = op(A)·op(B)`, `D` being `m × n` with leading
    /// dimension `ldd`; `op(A)` is `m × k`, `op(B)` is `k × n`.
    fn colmajor_gemm(p: &GemmPlan, a: &[f32], b: &[f32]) -> Vec<f32> {
        let at = |i: usize, l: usize| if p.trans_a { a[l + i * p.a.2] } else { a[i + l * p.a.2] };
        let bt = |l: usize, j: usize| if p.trans_b { b[j + l * p.b.2] } else { b[l + j * p.b.2] };
        let mut d = vec![0.0; p.ldd * p.n];
        for j in 0..p.n {
            for i in 0..p.m {
                d[i + j * p.ldd] = (0..p.k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        d
    }

    /// A row-major `[rows, cols]` matrix stored either directly or as the transpose of a stored
    /// `[cols, rows]` buffer, padded to a wider leading dimension to catch `ld` mix-ups.
    fn stored(values: &[f32], rows: usize, cols: usize, transposed: bool, pad: usize) -> (Vec<f32>, View) {
        let (srows, scols) = if transposed { (cols, rows) } else { (rows, cols) };
        let ld = scols + pad;
        let mut buf = vec![f32::NAN; srows * ld];
        for r in 0..rows {
            for c in 0..cols {
                let (sr, sc) = if transposed { (c, r) } else { (r, c) };
                buf[sr * ld + sc] = values[r * cols + c];
            }
        }
        let strides = if transposed { [1, ld] } else { [ld, 1] };
        (buf, View::of([rows, cols], strides).expect("a plain or transposed view"))
    }

    #[test]
    fn gemm_plan_computes_the_row_major_product_for_every_layout() {
        for (m, k, n) in [(3, 4, 5), (1, 7, 2), (6, 1, 3), (4, 3, 1)] {
            let lhs = values(m * k, 1);
            let rhs = values(k * n, 2);
            let want: Vec<f32> =
                (0..m * n).map(|ij| (0..k).map(|l| lhs[(ij / n) * k + l] * rhs[l * n + ij % n]).sum()).collect();
            for (lt, rt, pad) in
                [(false, false, 0), (false, true, 0), (true, false, 2), (true, true, 3), (false, true, 1)]
            {
                let (lbuf, lv) = stored(&lhs, m, k, lt, pad);
                let (rbuf, rv) = stored(&rhs, k, n, rt, pad);
                let plan = GemmPlan::new(m, k, n, lv, rv);
                // D is column-major n × m with ld n: exactly the row-major [m, n] result.
                let got = colmajor_gemm(&plan, &rbuf, &lbuf);
                assert!(max_abs_diff(&got, &want) < 1e-5, "{m}x{k}x{n} lhsT={lt} rhsT={rt} pad={pad}: {plan:?}");
            }
        }
    }

    #[test]
    fn views_that_are_neither_plain_nor_transposed_are_refused() {
        assert_eq!(View::of([4, 3], [3, 1]), Some(View { transposed: false, ld: 3 }));
        assert_eq!(View::of([4, 3], [1, 4]), Some(View { transposed: true, ld: 4 }));
        // Every other row of a buffer (a strided slice) is still plain, with a wider ld.
        assert_eq!(View::of([4, 3], [6, 1]), Some(View { transposed: false, ld: 6 }));
        // Columns two apart have no cuBLAS form.
        assert_eq!(View::of([4, 3], [6, 2]), None);
        // Broadcast rows (stride 0) neither.
        assert_eq!(View::of([4, 3], [0, 1]), None);
    }

    use burn::tensor::backend::Backend;

    fn mats<Bk: Backend>(m: usize, k: usize, n: usize) -> (Tensor<Bk, 2>, Tensor<Bk, 2>) {
        let dev = Default::default();
        (
            Tensor::from_data(TensorData::new(values(m * k, 3), [m, k]), &dev),
            Tensor::from_data(TensorData::new(values(n * k, 4), [n, k]), &dev),
        )
    }

    fn vec2<Bk: Backend>(t: Tensor<Bk, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// `x·Wᵀ` for a `[out, in]` weight, as the linears use it, with gradients for both (and for
    /// the frozen case, only for `x`), against Burn's matmul; [`dense_matmul_for_backward`] is
    /// valued zeros and sends the same gradients.
    #[test]
    fn dense_matmul_and_its_gradients_equal_burn_matmul() {
        type A = TestAutodiff;
        let (m, k, n) = (5, 7, 3);
        for weight_trained in [true, false] {
            // 0: Burn's matmul, 1: dense_matmul, 2: dense_matmul_for_backward.
            let run = |op: usize| {
                let (x, w) = mats::<A>(m, k, n);
                let x = x.require_grad();
                let w = if weight_trained { w.require_grad() } else { w };
                let y = match op {
                    0 => x.clone().matmul(w.clone().transpose()),
                    1 => dense_matmul(x.clone(), w.clone().transpose()),
                    _ => dense_matmul_for_backward(x.clone(), w.clone().transpose()),
                };
                let probe = Tensor::<A, 2>::from_data(TensorData::new(values(m * n, 9), [m, n]), &Default::default());
                let g = (y.clone() * probe).sum().backward();
                (vec2(y), vec2(x.grad(&g).unwrap()), w.grad(&g).map(vec2))
            };
            let (y0, dx0, dw0) = run(0);
            for op in [1, 2] {
                let (y1, dx1, dw1) = run(op);
                match op {
                    1 => assert!(max_abs_diff(&y0, &y1) < 1e-5),
                    _ => assert!(y1.len() == m * n && y1.iter().all(|v| *v == 0.0), "{y1:?}"),
                }
                assert!(max_abs_diff(&dx0, &dx1) < 1e-5, "op {op}");
                assert_eq!(dw0.is_some(), weight_trained);
                assert_eq!(dw1.is_some(), weight_trained, "a frozen weight must get no gradient");
                if let (Some(a), Some(b)) = (&dw0, dw1) {
                    assert!(max_abs_diff(a, &b) < 1e-5, "op {op}");
                }
            }
            assert!(dx0.iter().any(|v| v.abs() > 1e-3));
        }
    }
}
