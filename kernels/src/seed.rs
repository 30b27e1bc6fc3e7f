//! A backward pass started from a given gradient: [`backward_with`]`(y, g)` gives every input
//! behind `y` the gradient that `(y·g).sum().backward()` gives it, without computing the
//! product, its sum, or the product's backward (`1·g`) — over a decoder layer's `[2, 4096, 4096]`
//! output, passes over 64 MiB saved per layer. Gradient checkpointing starts each recomputed
//! layer's backward pass from the gradient of its output this way (`Llama::self_backward` in
//! newt-model).
//!
//! The root is one autodiff node ([`KernelBackend::gradient_root`]) whose backward hands `g` to
//! `y` as it is: it ignores the gradient it receives, which is right only when it is the root of
//! the pass (the ones `backward()` starts from). So it is not exposed as a tensor: the function
//! makes it and runs the pass at once.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};

use crate::KernelBackend;

/// The gradients of a backward pass from `y` with `g` as `y`'s gradient (same shape; cast to
/// `y`'s dtype): what `(y·g).sum().backward()` gives, without computing the product.
///
/// # Panics
/// When the shapes differ.
pub fn backward_with<B: AutodiffBackend + KernelBackend, const D: usize>(
    y: Tensor<B, D>,
    g: Tensor<B, D>,
) -> B::Gradients {
    assert_eq!(y.dims(), g.dims(), "backward_with: y and its gradient must have one shape");
    let (y, g) = (y.into_primitive().tensor(), g.into_primitive().tensor());
    Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(B::gradient_root(y, g))).backward()
}

/// A `[1]` f32 zero on `x`'s device.
pub(crate) fn zero<B: Backend>(x: &FloatTensor<B>) -> FloatTensor<B> {
    Tensor::<B, 1>::zeros([1], (&B::float_device(x), DType::F32)).into_primitive().tensor()
}

/// Zeros `[rows of x, n]` in `x`'s dtype, on its device: the value of the `*_for_backward`
/// operations.
pub(crate) fn zeros_rows<B: Backend>(x: &FloatTensor<B>, n: usize) -> FloatTensor<B> {
    let rows = x.shape()[0];
    let zeros = Tensor::<B, 2>::zeros([rows, n], (&B::float_device(x), x.dtype()));
    zeros.into_primitive().tensor()
}

/// [`KernelBackend::gradient_root`] under autodiff: one node, `g` its state.
pub(crate) fn autodiff_gradient_root<B: KernelBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    g: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    #[derive(Debug)]
    struct RootBackward;

    impl<B: KernelBackend> Backward<B, 1> for RootBackward {
        type State = FloatTensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x] = ops.parents;
            // The root's own gradient (the ones `backward()` starts from) is consumed; `g` goes
            // on unchanged.
            let _ = grads.consume::<B>(&ops.node);
            if let Some(node) = node_x {
                grads.register::<B>(node.id, ops.state);
            }
        }
    }

    let zero = zero::<B>(&x.primitive);
    let dtype = x.primitive.dtype();
    let g = match g.primitive.dtype() == dtype {
        true => g.primitive,
        false => B::float_cast(g.primitive, dtype.into()),
    };
    match RootBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(g, zero),
        OpsKind::UnTracked(prep) => prep.finish(zero),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use burn::tensor::TensorData;

    type A = TestAutodiff;

    fn t<Bk: Backend>(v: Vec<f32>, shape: [usize; 3]) -> Tensor<Bk, 3> {
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    fn vec<const D: usize>(t: Tensor<TestBackend, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// The pass gives what `(y·g).sum().backward()` gives every input behind `y` (here through a
    /// product and a sum of two parameters).
    #[test]
    fn the_pass_gives_what_the_sum_of_products_gives() {
        let shape = [2, 3, 4];
        let n = 24;
        let (av, bv, gv) = (values(n, 1), values(n, 2), values(n, 3));
        let run = |rooted: bool| {
            let a = t::<A>(av.clone(), shape).require_grad();
            let b = t::<A>(bv.clone(), shape).require_grad();
            let y = a.clone() * b.clone() + a.clone();
            let g = t::<A>(gv.clone(), shape);
            let grads = match rooted {
                true => backward_with(y, g),
                false => (y * g).sum().backward(),
            };
            (vec(a.grad(&grads).unwrap()), vec(b.grad(&grads).unwrap()))
        };
        let ((da, db), (da_r, db_r)) = (run(false), run(true));
        assert!(max_abs_diff(&da, &da_r) < 1e-6, "{da:?} vs {da_r:?}");
        assert!(max_abs_diff(&db, &db_r) < 1e-6, "{db:?} vs {db_r:?}");
        assert!(da.iter().any(|v| v.abs() > 1e-3));
    }

    /// A bf16 tensor given an f32 gradient gets it in bf16; an untracked one gets none.
    #[test]
    fn the_gradient_takes_the_tensors_dtype_and_an_untracked_tensor_gets_none() {
        let shape = [1, 2, 3];
        let x = t::<A>(values(6, 4), shape).cast(DType::BF16).require_grad();
        let grads = backward_with(x.clone(), t::<A>(values(6, 5), shape));
        let dx = x.grad(&grads).unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        let want = vec(t::<TestBackend>(values(6, 5), shape).cast(DType::BF16));
        assert_eq!(vec(dx), want);
        let frozen = t::<A>(values(6, 4), shape);
        let grads = backward_with(frozen.clone(), t::<A>(values(6, 5), shape));
        assert!(frozen.grad(&grads).is_none());
    }

    #[test]
    #[should_panic(expected = "one shape")]
    fn shapes_must_agree() {
        let x = t::<A>(values(6, 4), [1, 2, 3]);
        let g = t::<A>(values(6, 5), [1, 3, 2]);
        backward_with(x, g);
    }
}
