//! Many f32 tensors as one flat vector and back: how the optimizer and the gradient norm see all
//! trainable parameters at once (a LoRA of 30 layers has 420 of them).
//!
//! Burn's `cat` of n tensors is n slice-assign launches, and cutting the vector back is n slices
//! and n reshapes, each a fusion operation: on the H200 the two took 10–25 ms of a SmolLM2 step
//! whose forward pass takes 45 ms. [`KernelBackend::flat_gather`] and
//! [`KernelBackend::flat_scatter`] default to exactly that; on CUDA each is one fusion custom
//! operation launching `kernels/cuda/multi_tensor.cu` once per [`MAX_PER_LAUNCH`] tensors, their
//! addresses passed by value in the kernel's parameter (as PyTorch's `multi_tensor_apply` does);
//! `kernels: {reference: [multi_tensor]}` keeps Burn's operations.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive, backend::Backend};

use crate::KernelBackend;

/// Tensors per launch (`MT_MAX` in the source).
pub const MAX_PER_LAUNCH: usize = 48;

/// The tensors' elements, in order, as one `[Σ n]` vector (all f32).
pub fn flat_gather<B: KernelBackend>(tensors: Vec<Tensor<B, 1>>) -> Tensor<B, 1> {
    assert!(!tensors.is_empty(), "flat_gather: no tensors");
    let prims = tensors.into_iter().map(|t| t.into_primitive().tensor()).collect();
    Tensor::from_primitive(TensorPrimitive::Float(B::flat_gather(prims)))
}

/// `flat` cut into consecutive pieces of `sizes` elements (all f32).
pub fn flat_scatter<B: KernelBackend>(flat: Tensor<B, 1>, sizes: &[usize]) -> Vec<Tensor<B, 1>> {
    assert_eq!(flat.dims()[0], sizes.iter().sum::<usize>(), "flat_scatter: pieces of {sizes:?}");
    B::flat_scatter(flat.into_primitive().tensor(), sizes)
        .into_iter()
        .map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
        .collect()
}

/// [`KernelBackend::flat_gather`] in Burn operations: `cat`.
pub fn default_flat_gather<B: Backend>(tensors: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    let flat: Vec<Tensor<B, 1>> = tensors
        .into_iter()
        .map(|t| {
            let t = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
            let n = t.shape().num_elements();
            t.reshape([n])
        })
        .collect();
    Tensor::cat(flat, 0).into_primitive().tensor()
}

/// [`KernelBackend::flat_scatter`] in Burn operations: slices.
pub fn default_flat_scatter<B: Backend>(flat: FloatTensor<B>, sizes: &[usize]) -> Vec<FloatTensor<B>> {
    let flat = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(flat));
    let mut at = 0;
    sizes
        .iter()
        .map(|n| {
            let piece = flat.clone().slice(at..at + n);
            at += n;
            piece.into_primitive().tensor()
        })
        .collect()
}

/// One launch's table, laid out as `MtTable` in the source.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Table {
    pub(crate) ptr: [u64; MAX_PER_LAUNCH],
    pub(crate) start: [i64; MAX_PER_LAUNCH + 1],
    pub(crate) base: i64,
    pub(crate) count: i32,
}

/// The launches for tensors of `sizes` elements at addresses `ptrs`: at most [`MAX_PER_LAUNCH`]
/// tensors each, offsets within the launch's part, the part's base in the flat vector.
pub(crate) fn tables(ptrs: &[u64], sizes: &[usize]) -> Vec<Table> {
    assert_eq!(ptrs.len(), sizes.len());
    let mut out = Vec::new();
    let mut base = 0i64;
    for (p, s) in ptrs.chunks(MAX_PER_LAUNCH).zip(sizes.chunks(MAX_PER_LAUNCH)) {
        let mut t = Table { ptr: [0; MAX_PER_LAUNCH], start: [0; MAX_PER_LAUNCH + 1], base, count: p.len() as i32 };
        let mut at = 0i64;
        for (i, (ptr, n)) in p.iter().zip(s).enumerate() {
            t.ptr[i] = *ptr;
            t.start[i] = at;
            at += *n as i64;
        }
        t.start[p.len()] = at;
        base += at;
        out.push(t);
    }
    out
}

/// The CUDA passes.
pub(crate) mod cuda {
    use std::ffi::c_void;

    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;
    use cudarc::driver::sys;

    use super::{Table, tables};
    use crate::cuda_op::{Fus, contiguous, custom_op, empty};
    use crate::flash_cuda::{Functions, functions};

    const THREADS: u32 = 256;

    /// Whether the kernels take these tensors: all f32, unless `kernels: {reference: [multi_tensor]}`.
    pub(crate) fn takes(dtypes: impl IntoIterator<Item = DType>) -> bool {
        let burn_only = crate::uses_reference(crate::FastPath::MultiTensor);
        !burn_only && dtypes.into_iter().all(|d| d == DType::F32)
    }

    /// On the device thread: one launch per table, `flat` the other buffer.
    fn launch(f: usize, tables: Vec<Table>, flat: u64, stream: sys::CUstream, what: &str) {
        for mut t in tables {
            let total = t.start[t.count as usize] as usize;
            if total == 0 {
                continue;
            }
            let mut flat = flat;
            let mut params = [&mut t as *mut Table as *mut c_void, &mut flat as *mut u64 as *mut c_void];
            let grid = (total.div_ceil(THREADS as usize).min(4096) as u32, 1, 1);
            // SAFETY: the parameters are `MtTable` (by value, `Table` has its layout) and a
            // pointer, as the kernel declares; the table's addresses are live f32 buffers of the
            // sizes it gives, resolved by CubeCL for this launch on this stream.
            let result = unsafe {
                cudarc::driver::result::launch_kernel(
                    f as sys::CUfunction,
                    grid,
                    (THREADS, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
            if let Err(e) = result {
                panic!("{what} kernel launch failed: {e:?}");
            }
        }
    }

    /// Queues `kernel` (gather or scatter) over the table of `tensors` and the vector `flat`.
    fn queue(
        kernel: fn(&Functions) -> usize,
        tensors: &[CubeTensor<CudaRuntime>],
        flat: &CubeTensor<CudaRuntime>,
        what: &'static str,
    ) {
        let sizes: Vec<usize> = tensors.iter().map(|t| t.meta.shape().num_elements()).collect();
        let mut buffers: Vec<_> = tensors.iter().map(|t| t.handle.clone().binding()).collect();
        buffers.push(flat.handle.clone().binding());
        cubecl_cuda::external::launch_external(
            &flat.client,
            buffers,
            Box::new(move |ptrs: &[u64], stream| {
                let (table, flat) = ptrs.split_at(ptrs.len() - 1);
                launch(kernel(&functions()), tables(table, &sizes), flat[0], stream, what);
            }),
        );
    }

    fn cube_gather(tensors: Vec<CubeTensor<CudaRuntime>>) -> CubeTensor<CudaRuntime> {
        let tensors: Vec<_> = tensors.into_iter().map(contiguous).collect();
        let n = tensors.iter().map(|t| t.meta.shape().num_elements()).sum();
        let flat = empty(&tensors[0], &[n], DType::F32);
        queue(|f| f.flat_gather, &tensors, &flat, "flat gather");
        flat
    }

    fn cube_scatter(flat: CubeTensor<CudaRuntime>, sizes: &[usize]) -> Vec<CubeTensor<CudaRuntime>> {
        let flat = contiguous(flat);
        let pieces: Vec<_> = sizes.iter().map(|n| empty(&flat, &[*n], DType::F32)).collect();
        queue(|f| f.flat_scatter, &pieces, &flat, "flat scatter");
        pieces
    }

    /// [`crate::KernelBackend::flat_gather`] for `Cuda<F>` (f32 tensors).
    pub(crate) fn fusion_gather<F: FloatElement>(tensors: Vec<FloatTensor<Fus<F>>>) -> FloatTensor<Fus<F>> {
        let n: usize = tensors.iter().map(|t| t.shape.num_elements()).sum();
        let outputs = vec![(Shape::new([n]), DType::F32)];
        custom_op::<F>("newt_flat_gather", tensors, outputs, |ins| vec![cube_gather(ins)])
            .into_iter()
            .next()
            .expect("flat")
    }

    /// [`crate::KernelBackend::flat_scatter`] for `Cuda<F>` (an f32 vector).
    pub(crate) fn fusion_scatter<F: FloatElement>(
        flat: FloatTensor<Fus<F>>,
        sizes: &[usize],
    ) -> Vec<FloatTensor<Fus<F>>> {
        let outputs = sizes.iter().map(|n| (Shape::new([*n]), DType::F32)).collect();
        let sizes = sizes.to_vec();
        custom_op::<F>("newt_flat_scatter", vec![flat], outputs, move |ins| {
            let [flat] = <[_; 1]>::try_from(ins).unwrap_or_else(|_| unreachable!("one input"));
            cube_scatter(flat, &sizes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    #[test]
    fn gather_then_scatter_gives_the_tensors_back_in_order() {
        let dev = Default::default();
        let sizes = [3usize, 1, 5, 2];
        let parts: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, n)| values(*n, i as u64 + 40)).collect();
        let tensors: Vec<Tensor<TestBackend, 1>> =
            parts.iter().map(|p| Tensor::from_data(TensorData::new(p.clone(), [p.len()]), &dev)).collect();
        let flat = flat_gather(tensors);
        assert_eq!(flat.clone().into_data().to_vec::<f32>().unwrap(), parts.concat());
        let back = flat_scatter(flat, &sizes);
        for (b, p) in back.into_iter().zip(&parts) {
            assert_eq!(&b.into_data().to_vec::<f32>().unwrap(), p);
        }
    }

    /// The launch tables the CUDA kernels search: at most MAX_PER_LAUNCH tensors each, offsets
    /// relative to the launch, bases adding up to every element exactly once.
    #[test]
    fn tables_cover_every_element_once_in_order() {
        let sizes: Vec<usize> = (0..100).map(|i| (i * 37) % 11 + 1).collect();
        let ptrs: Vec<u64> = (0..100).map(|i| 0x1000 * (i + 1)).collect();
        let t = tables(&ptrs, &sizes);
        assert_eq!(t.len(), 100usize.div_ceil(MAX_PER_LAUNCH));
        let mut flat_at = 0i64;
        let mut tensor = 0usize;
        for table in &t {
            assert_eq!(table.base, flat_at);
            for i in 0..table.count as usize {
                assert_eq!(table.ptr[i], ptrs[tensor]);
                assert_eq!(table.start[i + 1] - table.start[i], sizes[tensor] as i64);
                tensor += 1;
            }
            assert_eq!(table.start[0], 0);
            flat_at += table.start[table.count as usize];
        }
        assert_eq!((tensor, flat_at), (100, sizes.iter().sum::<usize>() as i64));
        // The layout the kernel's `MtTable` has: 48 addresses, 49 offsets, base, count (+ padding).
        assert_eq!(std::mem::size_of::<Table>(), 8 * 48 + 8 * 49 + 8 + 8);
    }

    /// The source declares the table the Rust side lays out.
    #[test]
    fn the_source_table_matches() {
        let src = crate::flash_cuda::SOURCE;
        assert!(src.contains(&format!("#define MT_MAX {MAX_PER_LAUNCH}")));
        assert!(src.contains(
            "unsigned long long ptr[MT_MAX];\n  long long start[MT_MAX + 1];\n  long long base;\n  int count;"
        ));
    }
}
