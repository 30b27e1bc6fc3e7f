//! Data parallelism: W replicas of the model, one thread each, that split every optimizer step's
//! micro-batches (rank r takes r, r+W, …) and add their gradients together before the same AdamW
//! runs on every replica.
//!
//! ```text
//!  step s: micro-batches m0 m1 m2 m3 (gradient_accumulation_steps × W of them, as one process)
//!  rank 0: m0 m2 ─ Σ grads, Σ loss, tokens ─┐
//!  rank 1: m1 m3 ─ Σ grads, Σ loss, tokens ─┴─ all-reduce (sum) ─ ÷ tokens ─ clip ─ AdamW (each rank)
//! ```
//! Because the reduction sums what one process would have accumulated, W replicas with
//! `gradient_accumulation_steps = g` take the same steps as one process with `g × W`, up to the
//! order of the float additions. The reducer is the seam: [`HostReducer`] sums through host
//! memory (any backend; CPU runs and tests); a collective library (NCCL) would sum on the devices.

use std::sync::{Arc, Condvar, Mutex};

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

use super::TrainError;

/// What one rank adds to a step: its gradient sums (flat, f32, in layout order), and scalars
/// (the loss sum and the trained-token count).
pub type Contribution<B> = (Tensor<B, 1>, [f64; 2]);

/// Sums each step's gradients over the replicas.
///
/// Every rank calls the same methods in the same order; a call returns when all ranks have made
/// it. A rank that fails calls [`GradReducer::abort`], and every call on any rank then returns
/// [`TrainError::PeerFailed`] instead of waiting for it.
pub trait GradReducer<B: Backend>: Send + Sync {
    /// Number of ranks.
    fn world(&self) -> usize;
    /// The element-wise sum of every rank's `grad`, and the sums of their `scalars`; every rank
    /// receives the same values (bit for bit).
    fn all_reduce(&self, rank: usize, grad: Tensor<B, 1>, scalars: [f64; 2]) -> Result<Contribution<B>, TrainError>;
    /// True when any rank passes true (a stop asked for between steps reaches every rank).
    fn any(&self, rank: usize, flag: bool) -> Result<bool, TrainError>;
    /// Rank `rank` failed with `why`: wakes and fails every other rank's pending and later calls.
    fn abort(&self, rank: usize, why: &str);
}

/// A reduction round's value, shared by every rank that takes part in it.
#[derive(Debug, Clone)]
struct Sum {
    grad: Arc<Vec<f32>>,
    scalars: [f64; 2],
    any: bool,
}

#[derive(Debug, Default)]
struct Round {
    /// Increases when a round completes.
    generation: u64,
    /// What each rank brought to the round in progress.
    slots: Vec<Option<(Vec<f32>, [f64; 2], bool)>>,
    arrived: usize,
    /// The last completed round's sum.
    done: Option<Sum>,
    /// The first failure: (rank, message).
    aborted: Option<(usize, String)>,
}

/// A [`GradReducer`] through host memory: each rank copies its gradient vector to the host, the
/// last rank to arrive adds them in rank order (so every rank gets identical bits), and each rank
/// copies the sum back to its device. One copy out and one in per step: for LoRA's few million
/// gradients that is milliseconds; a collective library on the devices is the fast path.
#[derive(Debug)]
pub struct HostReducer {
    world: usize,
    round: Mutex<Round>,
    wake: Condvar,
}

impl HostReducer {
    /// A reducer for `world` ranks (at least 1).
    pub fn new(world: usize) -> Self {
        let world = world.max(1);
        HostReducer {
            world,
            round: Mutex::new(Round { slots: vec![None; world], ..Default::default() }),
            wake: Condvar::new(),
        }
    }

    /// Rank `rank` failed: every pending and later round fails with its message.
    pub fn abort(&self, rank: usize, why: &str) {
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        if r.aborted.is_none() {
            r.aborted = Some((rank, why.to_string()));
        }
        self.wake.notify_all();
    }

    /// One barrier round: brings `(values, scalars, flag)`, returns the round's sum.
    fn exchange(&self, rank: usize, values: Vec<f32>, scalars: [f64; 2], flag: bool) -> Result<Sum, TrainError> {
        assert!(rank < self.world, "rank {rank} of a world of {}", self.world);
        let mut r = self.round.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((who, why)) = &r.aborted {
            return Err(TrainError::PeerFailed { rank: *who, message: why.clone() });
        }
        assert!(r.slots[rank].is_none(), "rank {rank} entered a reduction twice");
        r.slots[rank] = Some((values, scalars, flag));
        r.arrived += 1;
        let generation = r.generation;
        if r.arrived == self.world {
            let parts: Vec<_> = r.slots.iter_mut().map(|s| s.take().expect("every rank arrived")).collect();
            let len = parts[0].0.len();
            if let Some((i, p)) = parts.iter().enumerate().find(|(_, p)| p.0.len() != len) {
                let why = format!("rank {i} brought {} gradient values, rank 0 brought {len}", p.0.len());
                r.aborted = Some((i, why.clone()));
                self.wake.notify_all();
                return Err(TrainError::PeerFailed { rank: i, message: why });
            }
            let mut parts = parts.into_iter();
            let (mut grad, mut sums, mut any) = parts.next().expect("world ≥ 1");
            for (g, s, f) in parts {
                for (a, b) in grad.iter_mut().zip(&g) {
                    *a += b;
                }
                sums[0] += s[0];
                sums[1] += s[1];
                any |= f;
            }
            r.done = Some(Sum { grad: Arc::new(grad), scalars: sums, any });
            r.arrived = 0;
            r.generation += 1;
            self.wake.notify_all();
        } else {
            while r.generation == generation && r.aborted.is_none() {
                r = self.wake.wait(r).unwrap_or_else(|p| p.into_inner());
            }
            if r.generation == generation
                && let Some((who, why)) = &r.aborted
            {
                return Err(TrainError::PeerFailed { rank: *who, message: why.clone() });
            }
        }
        // The round this rank took part in is the last completed one: the next cannot complete
        // before this rank brings its part to it.
        Ok(r.done.clone().expect("a completed round"))
    }
}

impl<B: Backend> GradReducer<B> for HostReducer {
    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, rank: usize, grad: Tensor<B, 1>, scalars: [f64; 2]) -> Result<Contribution<B>, TrainError> {
        let device = grad.device();
        let values = grad
            .cast(burn::tensor::FloatDType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| TrainError::Data(format!("gradient to host: {e:?}")))?;
        let sum = self.exchange(rank, values, scalars, false)?;
        let n = sum.grad.len();
        let grad = Tensor::from_data(TensorData::new(sum.grad.as_ref().clone(), [n]), (&device, DType::F32));
        Ok((grad, sum.scalars))
    }

    fn any(&self, rank: usize, flag: bool) -> Result<bool, TrainError> {
        Ok(self.exchange(rank, Vec::new(), [0.0; 2], flag)?.any)
    }

    fn abort(&self, rank: usize, why: &str) {
        HostReducer::abort(self, rank, why)
    }
}

/// A [`GradReducer`] on the devices: the gradient vector is summed by NCCL's all-reduce on each
/// GPU's stream (no copy through the host); the two scalars, and the failure of a rank, go
/// through a [`HostReducer`] first, so a rank whose peer failed stops before it would wait in
/// the collective for it.
#[derive(Debug)]
pub struct DeviceReducer {
    group: Arc<newt_kernels::collective::Collective>,
    host: HostReducer,
}

impl DeviceReducer {
    /// A reducer over CUDA devices `0..world` (NCCL), or why not.
    pub fn cuda(world: usize) -> Result<Self, String> {
        Ok(DeviceReducer { group: newt_kernels::collective::Collective::cuda(world)?, host: HostReducer::new(world) })
    }
}

impl<B: newt_kernels::KernelBackend> GradReducer<B> for DeviceReducer {
    fn world(&self) -> usize {
        self.group.world()
    }

    fn all_reduce(&self, rank: usize, grad: Tensor<B, 1>, scalars: [f64; 2]) -> Result<Contribution<B>, TrainError> {
        let sums = self.host.exchange(rank, Vec::new(), scalars, false)?.scalars;
        let grad = grad.cast(burn::tensor::FloatDType::F32).into_primitive().tensor();
        let summed = B::all_reduce_sum(grad, &self.group, rank);
        Ok((Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(summed)), sums))
    }

    fn any(&self, rank: usize, flag: bool) -> Result<bool, TrainError> {
        Ok(self.host.exchange(rank, Vec::new(), [0.0; 2], flag)?.any)
    }

    fn abort(&self, rank: usize, why: &str) {
        self.host.abort(rank, why)
    }
}

/// This replica's place: its rank, and the reducer shared by all (`None` for one process alone).
pub(crate) struct Rank<'a, B: Backend> {
    pub rank: usize,
    pub reducer: Option<&'a dyn GradReducer<B>>,
}

impl<B: Backend> Clone for Rank<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for Rank<'_, B> {}

impl<B: Backend> Rank<'_, B> {
    pub(crate) fn alone() -> Self {
        Rank { rank: 0, reducer: None }
    }
    pub(crate) fn world(&self) -> usize {
        self.reducer.map(|r| r.world()).unwrap_or(1)
    }
    /// Rank 0 writes the checkpoints, the metrics and the result; it alone calls the hooks.
    pub(crate) fn leads(&self) -> bool {
        self.rank == 0
    }
    /// The step's micro-batches this rank runs: r, r+W, ….
    pub(crate) fn share<T: Clone>(&self, all: &[T]) -> Vec<T> {
        all.iter().skip(self.rank).step_by(self.world()).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_reducer_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        let r = Arc::new(HostReducer::new(3));
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    let r = r.clone();
                    s.spawn(move || {
                        let mut got = Vec::new();
                        for round in 0..50 {
                            let v = vec![rank as f32 + round as f32 * 0.5, 1e-8 * rank as f32];
                            let sum = r.exchange(rank, v, [rank as f64, 1.0], rank == 2 && round == 7).unwrap();
                            got.push((sum.grad.as_ref().clone(), sum.scalars, sum.any));
                        }
                        got
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for round in 0..50 {
            let (g, s, any) = &outs[0][round];
            assert_eq!(g[0], (0.0 + round as f32 * 0.5) + (1.0 + round as f32 * 0.5) + (2.0 + round as f32 * 0.5));
            assert_eq!(*s, [3.0, 3.0]);
            assert_eq!(*any, round == 7);
            for rank in 1..3 {
                assert_eq!(&outs[rank][round], &outs[0][round], "rank {rank} round {round}");
            }
        }
    }

    #[test]
    fn an_aborted_rank_fails_the_waiting_ones_instead_of_hanging() {
        let r = Arc::new(HostReducer::new(2));
        let waiting = {
            let r = r.clone();
            std::thread::spawn(move || r.exchange(0, vec![1.0], [0.0; 2], false))
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        r.abort(1, "out of memory on the device at step 3");
        match waiting.join().unwrap() {
            Err(TrainError::PeerFailed { rank: 1, message }) => assert!(message.contains("out of memory")),
            other => panic!("expected PeerFailed, got {other:?}"),
        }
        assert!(matches!(r.exchange(0, vec![1.0], [0.0; 2], false), Err(TrainError::PeerFailed { .. })));
    }

    #[test]
    fn ranks_bringing_different_lengths_is_an_error_not_a_wrong_sum() {
        let r = Arc::new(HostReducer::new(2));
        let other = {
            let r = r.clone();
            std::thread::spawn(move || r.exchange(1, vec![1.0, 2.0], [0.0; 2], false))
        };
        let mine = r.exchange(0, vec![1.0], [0.0; 2], false);
        let theirs = other.join().unwrap();
        assert!(mine.is_err() && theirs.is_err());
    }
}
