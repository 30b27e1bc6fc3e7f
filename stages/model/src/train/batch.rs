//! The model contract the loop trains against: `crate::llama`'s batch and loss types, and
//! [`CausalLoss`](super::CausalLoss) for [`Llama`].

use newt_kernels::KernelBackend;

use crate::llama::Llama;
pub use crate::llama::{LossOutput, TrainBatch};

impl<B: KernelBackend> super::CausalLoss<B> for Llama<B> {
    fn loss(&self, batch: &TrainBatch<B>) -> LossOutput<B> {
        Llama::loss(self, batch)
    }
}
