//! One Burn fusion custom operation over float tensors, for the CUDA paths of this crate: the
//! operation's inputs, its outputs' shapes and dtypes, and the work to run on the CubeCL tensors
//! (on CUDA, queued through `cubecl_cuda::external::launch_external` or CubeCL's own kernels).
//! Burn's fusion sees an opaque operation; nothing waits on the host.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, FloatElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl_cuda::CudaRuntime;

pub(crate) type Cube<F> = CubeBackend<CudaRuntime, F, i32, u8>;
pub(crate) type Fus<F> = Fusion<Cube<F>>;
type Handles<F> = HandleContainer<<<Cube<F> as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// The work of a [`custom_op`]: the inputs' CubeCL tensors in, the outputs' out, in order.
pub(crate) trait Work:
    Fn(Vec<CubeTensor<CudaRuntime>>) -> Vec<CubeTensor<CudaRuntime>> + Send + Sync + 'static
{
}
impl<W: Fn(Vec<CubeTensor<CudaRuntime>>) -> Vec<CubeTensor<CudaRuntime>> + Send + Sync + 'static> Work for W {}

struct Op<F, W> {
    desc: CustomOpIr,
    work: W,
    _f: std::marker::PhantomData<F>,
}

impl<F, W> std::fmt::Debug for Op<F, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomOp").field("desc", &self.desc).finish()
    }
}

impl<F: FloatElement, W: Work> Operation<<Cube<F> as FusionBackend>::FusionRuntime> for Op<F, W> {
    fn execute(&self, handles: &mut Handles<F>) {
        let inputs = self
            .desc
            .inputs
            .iter()
            .map(|ir| {
                if ir.dtype.is_float() {
                    handles.get_float_tensor::<Cube<F>>(ir)
                } else {
                    handles.get_int_tensor::<Cube<F>>(ir)
                }
            })
            .collect();
        let outputs = (self.work)(inputs);
        assert_eq!(outputs.len(), self.desc.outputs.len(), "{}: one tensor per declared output", self.desc.id);
        for (ir, t) in self.desc.outputs.iter().zip(outputs) {
            handles.register_float_tensor::<Cube<F>>(&ir.id, t);
        }
    }
}

/// Registers `work` as one operation named `name` over `inputs` (float tensors, or integer ones:
/// both are fusion tensors), returning its `outputs` (shape and dtype each) in order.
pub(crate) fn custom_op<F: FloatElement>(
    name: &'static str,
    inputs: Vec<FloatTensor<Fus<F>>>,
    outputs: Vec<(Shape, DType)>,
    work: impl Work,
) -> Vec<FloatTensor<Fus<F>>> {
    let client = inputs.first().expect("a custom operation has inputs").client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outputs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = Op::<F, _> { desc: desc.clone(), work, _f: std::marker::PhantomData };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// A new contiguous tensor of `dims` and `dtype` on `like`'s device (its values unset).
pub(crate) fn empty(like: &CubeTensor<CudaRuntime>, dims: &[usize], dtype: DType) -> CubeTensor<CudaRuntime> {
    burn_cubecl::ops::numeric::empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims.to_vec()),
        dtype,
    )
}

/// `t` as every kernel of this crate reads a tensor: contiguous and starting on 16 bytes (the
/// bf16 kernels load eight values at a time), or a contiguous copy when it is not.
pub(crate) fn contiguous(t: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    let aligned = t.handle.offset_start.unwrap_or(0).is_multiple_of(16);
    if t.is_contiguous() && aligned { t } else { burn_cubecl::kernel::into_contiguous(t) }
}
