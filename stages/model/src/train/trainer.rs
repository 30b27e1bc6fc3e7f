//! The loop itself: resume, steps with accumulation, evaluation, checkpoints, metrics.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::Instant;

use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use burn::tensor::TensorData;

use super::adamw::{AdamW, Layout};
use super::checkpoint::{self, CHECKPOINT_FORMAT, CheckpointState};
use super::config::{TrainConfig, TrainPlan};
use super::data::TrainData;
use super::metrics::{EvalReport, MetricsLog, MetricsRecord, StepReport};
use super::parallel::{GradReducer, Rank};
use super::params::{count_params, load_params, trainable_params, trainable_sizes};
use super::plot::write_loss_curve;
use super::rng::SplitMix64;
use super::{CausalLm, CausalLoss, NoHooks, TrainError, TrainHooks, TrainRun, TrainSummary};
use crate::grads::ParamGrads;

/// Where the data stream stands: steps done, and the next micro-batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Position {
    step: usize,
    epoch: usize,
    micro: usize,
}

/// `NEWT_PROFILE=1`: the device is synchronized after each phase of a step (forward, backward,
/// gradient norm, optimizer) and the phases' times go to stderr, one line per step. The syncs
/// cost a little speed, so it is off by default; it is how the GPU benchmarks split a step.
struct PhaseClock {
    last: Option<Instant>,
    phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    fn new() -> Self {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let on = *ON.get_or_init(|| std::env::var("NEWT_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"));
        PhaseClock { last: on.then(Instant::now), phases: Vec::new() }
    }

    /// Waits for the device and charges the time since the last mark to `phase`.
    fn mark<B: Backend>(&mut self, phase: &'static str, device: &B::Device) {
        if let Some(last) = self.last {
            B::sync(device).expect("device sync");
            let now = Instant::now();
            self.phases.push((phase, (now - last).as_secs_f64() * 1e3));
            self.last = Some(now);
        }
    }

    fn report(&self, step: usize) {
        if self.last.is_some() {
            let mut totals: Vec<(&str, f64)> = Vec::new();
            for (name, ms) in &self.phases {
                match totals.iter_mut().find(|(n, _)| n == name) {
                    Some((_, t)) => *t += ms,
                    None => totals.push((name, *ms)),
                }
            }
            let parts: Vec<String> = totals.iter().map(|(n, ms)| format!("{n} {ms:.1} ms")).collect();
            eprintln!("profile step {step}: {}", parts.join(", "));
        }
    }
}

/// Result of one optimizer step.
struct StepOut {
    loss_sum: f64,
    trained_tokens: usize,
    grad_norm: f64,
}

/// Trains `model` on `data` as `cfg` says, resuming from the newest checkpoint in
/// `run.checkpoint_dir` if there is one, and returns the trained model.
///
/// Per step: the backend RNG is reseeded from (seed, step) so dropout is reproducible across a
/// resume; `gradient_accumulation_steps` micro-batches are run (fewer at an epoch's end);
/// gradients are divided by the step's trained-token count, clipped to `max_grad_norm` by
/// global norm, and applied by AdamW at `schedule(step)`. Cancellation is checked between steps.
/// An out-of-memory panic from the backend becomes [`TrainError::OutOfMemory`]; other panics
/// propagate. The backend RNG is process-wide (Flex keeps one generator), so two trainings
/// running at once in one process make each other's dropout irreproducible.
pub fn train<B, M>(
    model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    run: &TrainRun,
    hooks: &mut dyn TrainHooks<M>,
    device: &B::Device,
) -> Result<(M, TrainSummary), TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: newt_kernels::KernelBackend,
    M: CausalLm<B>,
{
    replica(Rank::alone(), model, data, cfg, run, hooks, device)
}

/// [`train`] on `replicas.len()` replicas at once, one thread each, through `reducer`
/// (see [`super::parallel`]): `cfg.gradient_accumulation_steps` counts the micro-batches of one
/// optimizer step over all replicas, so the run takes the steps a single process would, and a
/// checkpoint written with one world size resumes with another. Rank 0 runs on the calling
/// thread: it alone calls `hooks`, writes checkpoints and metrics, and its model is returned.
/// Every replica must start from the same weights. A replica that fails stops the others; the
/// first failure is returned.
pub fn train_data_parallel<B, M>(
    replicas: Vec<(M, B::Device)>,
    data: &TrainData,
    cfg: &TrainConfig,
    run: &TrainRun,
    hooks: &mut dyn TrainHooks<M>,
    reducer: &dyn GradReducer<B::InnerBackend>,
) -> Result<(M, TrainSummary), TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: newt_kernels::KernelBackend,
    M: CausalLm<B> + Send,
{
    if replicas.len() != reducer.world() || replicas.is_empty() {
        return Err(TrainError::Config(format!(
            "{} replicas for a reducer of world size {}",
            replicas.len(),
            reducer.world()
        )));
    }
    std::thread::scope(|scope| {
        let mut replicas = replicas.into_iter();
        let (lead_model, lead_device) = replicas.next().expect("checked: not empty");
        let others: Vec<_> = replicas
            .enumerate()
            .map(|(i, (model, device))| {
                let rank = Rank { rank: i + 1, reducer: Some(reducer) };
                std::thread::Builder::new()
                    .name(format!("newt-train-rank-{}", i + 1))
                    .spawn_scoped(scope, move || {
                        let out = catch_unwind(AssertUnwindSafe(|| {
                            replica(rank, model, data, cfg, run, &mut NoHooks, &device).map(|_| ())
                        }));
                        fail_peers(reducer, rank.rank, &out);
                        out
                    })
                    .expect("spawning a training thread")
            })
            .collect();
        let rank = Rank { rank: 0, reducer: Some(reducer) };
        let lead = catch_unwind(AssertUnwindSafe(|| replica(rank, lead_model, data, cfg, run, hooks, &lead_device)));
        fail_peers(reducer, 0, &lead);
        let others: Vec<_> = others.into_iter().map(|h| h.join().unwrap_or_else(Err)).collect();
        // A panic (not out-of-memory: that is an error by now) propagates, as in one process.
        let lead = lead.unwrap_or_else(|p| resume_unwind(p));
        let mut errors = Vec::new();
        for (i, out) in others.into_iter().enumerate() {
            match out {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push((i + 1, e)),
                Err(p) => resume_unwind(p),
            }
        }
        match lead {
            Ok(done) if errors.is_empty() => Ok(done),
            // The root cause, not "another replica failed".
            Err(TrainError::PeerFailed { rank, message }) => Err(errors
                .into_iter()
                .find(|(r, _)| *r == rank)
                .map(|(_, e)| e)
                .unwrap_or(TrainError::PeerFailed { rank, message })),
            Err(e) => Err(e),
            Ok(_) => Err(errors.remove(0).1),
        }
    })
}

/// Tells the other replicas that `rank` failed (with an error or a panic), so none waits for it.
fn fail_peers<T, E: std::fmt::Display, R: Backend>(
    reducer: &dyn GradReducer<R>,
    rank: usize,
    out: &std::thread::Result<Result<T, E>>,
) {
    let why = match out {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(p) => panic_message(p.as_ref()).unwrap_or_else(|| "panicked".into()),
    };
    reducer.abort(rank, &why);
}

/// The message of a panic's payload (`panic!` with a literal or a formatted string).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
}

/// The loop of one replica ([`train`] is rank 0 of a world of one).
fn replica<B, M>(
    rank: Rank<'_, B::InnerBackend>,
    model: M,
    data: &TrainData,
    cfg: &TrainConfig,
    run: &TrainRun,
    hooks: &mut dyn TrainHooks<M>,
    device: &B::Device,
) -> Result<(M, TrainSummary), TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: newt_kernels::KernelBackend,
    M: CausalLm<B>,
{
    let warnings = cfg.validate()?;
    let plan = cfg.plan(data.len())?;
    let started = Instant::now();
    let schedule = cfg.schedule(&plan)?;
    let counts = count_params(&model);
    if counts.trainable == 0 {
        return Err(TrainError::Config("the model has no trainable parameters (none requires grad)".into()));
    }

    let mut model = model;
    let mut opt = AdamW::<B::InnerBackend>::new(cfg.adamw());
    let mut pos = Position::default();
    let mut last_checkpoint = None;
    let mut prior_metrics = Vec::new();
    if let Some(dir) = checkpoint::latest(&run.checkpoint_dir)? {
        let ck = checkpoint::load(&dir)?;
        check_compatible(&ck.state, &plan, data.len(), cfg.seed, &dir)?;
        model = load_params(model, &ck.params, device)?;
        opt.import(ck.optimizer, device);
        pos = Position { step: ck.state.step, epoch: ck.state.epoch, micro: ck.state.micro_batch };
        last_checkpoint = Some(pos.step);
        prior_metrics = ck.metrics;
    }
    opt.prepare::<B, M>(&model, device);
    let resumed_from = last_checkpoint;
    let metrics_path = if rank.leads() { run.metrics_jsonl.as_deref() } else { None };
    let mut log = MetricsLog::open(metrics_path, prior_metrics)?;
    let mut order = data.epoch_order(cfg.seed, pos.epoch, cfg.shuffle);
    let mut summary = TrainSummary {
        plan: plan.clone(),
        resumed_from,
        final_loss: None,
        eval_loss: None,
        tokens: 0,
        train_s: 0.0,
        params: counts,
        warnings,
    };

    while pos.step < plan.total_steps {
        let stop = match rank.reducer {
            Some(reducer) => reducer.any(rank.rank, hooks.cancelled())?,
            None => hooks.cancelled(),
        };
        if stop {
            // A stop asked for between steps (Ctrl-C, or SIGTERM before a preemption) keeps the
            // steps done: the position is saved, so a rerun continues exactly here.
            if rank.leads() && pos.step > 0 && last_checkpoint != Some(pos.step) {
                let dir = save_checkpoint(run, cfg, &plan, data.len(), pos, &model, &opt, &log, summary.final_loss)?;
                last_checkpoint = Some(pos.step);
                hooks.on_checkpoint(pos.step, &dir);
            }
            return Err(TrainError::Cancelled { step: pos.step, checkpoint: last_checkpoint });
        }
        let step_seed = SplitMix64::mix(cfg.seed, pos.step as u64);
        B::seed(device, if rank.rank == 0 { step_seed } else { SplitMix64::mix(step_seed, rank.rank as u64) });
        let lr = schedule.lr(pos.step);
        let mut next = pos;
        let mut micro_batches = Vec::new();
        while micro_batches.len() < cfg.gradient_accumulation_steps && next.micro < plan.micro_batches_per_epoch {
            let start = next.micro * cfg.micro_batch_size;
            let end = (start + cfg.micro_batch_size).min(data.len());
            micro_batches.push(order[start..end].to_vec());
            next.micro += 1;
        }
        let stats: Vec<_> = micro_batches.iter().map(|m| data.stats(m)).collect();
        let tokens: usize = stats.iter().map(|s| s.tokens).sum();
        let sum_sq: u64 = stats.iter().map(|s| s.sum_sq_sample_len).sum();

        let t0 = Instant::now();
        let jit0 = newt_kernels::jit_stats();
        let (stream_errors0, sync_allocations0) = (newt_kernels::stream_errors(), newt_kernels::sync_allocations());
        let step_no = pos.step + 1;
        let max_norm = cfg.max_grad_norm;
        let opt_ref = &mut opt;
        let mut clock = PhaseClock::new();
        let clock_ref = &mut clock;
        // Each micro-batch's dropout seed depends on its place in the step, not on the rank
        // that runs it.
        let seeds: Vec<u64> = (0..micro_batches.len() as u64).map(|k| SplitMix64::mix(step_seed, k)).collect();
        let (mine, my_seeds) = (rank.share(&micro_batches), rank.share(&seeds));
        let (new_model, out) = guard_oom(step_no, cfg, move || {
            let out =
                optimizer_step::<B, M>(model, data, &mine, &my_seeds, rank, max_norm, opt_ref, lr, device, clock_ref);
            // The step's loss has been read, so every task it queued has run on the device thread.
            if let Some(failure) = device_thread_failure() {
                panic!("{failure}");
            }
            out
        })?;
        clock.report(step_no);
        model = new_model;
        let step_s = t0.elapsed().as_secs_f64();
        let jit = newt_kernels::jit_stats().since(&jit0);
        let stream_errors = newt_kernels::stream_errors() - stream_errors0;
        let sync_allocations = newt_kernels::sync_allocations() - sync_allocations0;
        if sync_allocations > 0 {
            eprintln!(
                "note: step {step_no}: {sync_allocations} device allocation(s) were refused by the stream-ordered \
                 allocator and made with cuMemAlloc instead: the GPU is close to full"
            );
        }
        if stream_errors > 0 {
            eprintln!(
                "warning: step {step_no}: the CUDA backend recorded {stream_errors} stream error(s) during this step \
                 (the first are printed above, `cubecl-cuda: stream error`); a kernel that failed to launch \
                 leaves its output unwritten, so this step's gradients may be wrong"
            );
        }
        let memory = <B::InnerBackend as newt_kernels::KernelBackend>::memory_usage(device);

        next.step += 1;
        if next.micro >= plan.micro_batches_per_epoch {
            next.epoch += 1;
            next.micro = 0;
            order = data.epoch_order(cfg.seed, next.epoch, cfg.shuffle);
        }
        pos = next;

        let loss = if out.trained_tokens > 0 { out.loss_sum / out.trained_tokens as f64 } else { 0.0 };
        let epoch = pos.epoch as f64 + pos.micro as f64 / plan.micro_batches_per_epoch as f64;
        let mfu =
            run.flops.map(|f| f.step_flops(counts.trainable as u64, tokens as u64, sum_sq) / step_s / f.peak_flops);
        let report = StepReport {
            step: pos.step,
            total_steps: plan.total_steps,
            epoch,
            loss,
            lr,
            grad_norm: out.grad_norm,
            tokens,
            trained_tokens: out.trained_tokens,
            tokens_per_s: tokens as f64 / step_s,
            mfu,
            step_s,
            elapsed_s: started.elapsed().as_secs_f64(),
            kernel_compiles: jit.compiles,
            kernel_jit_s: (jit.compile + jit.load).as_secs_f64(),
            device_in_use_bytes: memory.map(|m| m.0),
            device_reserved_bytes: memory.map(|m| m.1),
            log_line: pos.step % plan.log_every == 0 || pos.step == plan.total_steps,
        };
        summary.tokens += tokens as u64;
        summary.train_s += step_s;
        summary.final_loss = Some(loss);
        log.push(MetricsRecord::Train(report.clone()))?;
        hooks.on_step(&report);

        let last = pos.step == plan.total_steps;
        if (pos.step % plan.eval_every == 0 || last)
            && let Some(eval_loss) = hooks.evaluate(&model, pos.step)
        {
            let report = EvalReport { step: pos.step, epoch, eval_loss };
            summary.eval_loss = Some(eval_loss);
            log.push(MetricsRecord::Eval(report.clone()))?;
            hooks.on_eval(&report);
        }

        if rank.leads() && pos.step % plan.save_every == 0 {
            let dir = save_checkpoint(run, cfg, &plan, data.len(), pos, &model, &opt, &log, Some(loss))?;
            last_checkpoint = Some(pos.step);
            hooks.on_checkpoint(pos.step, &dir);
        }
    }

    if let Some(png) = run.loss_curve_png.as_ref().filter(|_| rank.leads()) {
        write_loss_curve(log.records(), png)?;
    }
    Ok((model, summary))
}

/// Writes `checkpoint-<step>` (trainable weights, optimizer state, metrics so far) and keeps
/// the newest `save_total_limit` of them.
#[allow(clippy::too_many_arguments)]
fn save_checkpoint<B, M>(
    run: &TrainRun,
    cfg: &TrainConfig,
    plan: &TrainPlan,
    rows: usize,
    pos: Position,
    model: &M,
    opt: &AdamW<B::InnerBackend>,
    log: &MetricsLog,
    last_loss: Option<f64>,
) -> Result<std::path::PathBuf, TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: newt_kernels::KernelBackend,
    M: CausalLm<B>,
{
    let state = CheckpointState {
        format: CHECKPOINT_FORMAT,
        step: pos.step,
        epoch: pos.epoch,
        micro_batch: pos.micro,
        seed: cfg.seed,
        rows,
        plan: plan.clone(),
        last_loss,
    };
    let keep = cfg.save_total_limit.unwrap_or(2);
    checkpoint::save(&run.checkpoint_dir, &state, &trainable_params(model), &opt.export(), log.records(), keep)
}

/// Gradients of one optimizer step, already divided by the step's trained-token count.
#[derive(Debug)]
pub struct StepGradients<B: Backend> {
    /// Σ over micro-batches of ∂(Σ token loss)/∂θ, divided by `trained_tokens`.
    pub grads: ParamGrads<B>,
    /// Σ token losses over all micro-batches.
    pub loss_sum: f64,
    /// Tokens that carried a label, over all micro-batches.
    pub trained_tokens: usize,
}

impl<B: Backend> StepGradients<B> {
    /// The step's loss: Σ token losses / trained tokens (0 when nothing was trained).
    pub fn loss(&self) -> f64 {
        if self.trained_tokens == 0 { 0.0 } else { self.loss_sum / self.trained_tokens as f64 }
    }
}

/// Runs forward and backward over `micro_batches` (row indices of each) and accumulates the
/// gradients with HF's normalisation: one division by all trained tokens of the step.
pub fn step_gradients<B, M>(
    model: &M,
    data: &TrainData,
    micro_batches: &[Vec<usize>],
    device: &B::Device,
) -> StepGradients<B::InnerBackend>
where
    B: AutodiffBackend,
    M: CausalLm<B>,
{
    let seeds: Vec<u64> = (0..micro_batches.len() as u64).map(|k| SplitMix64::mix(0x5eed, k)).collect();
    let (mut grads, loss_sum, trained_tokens) =
        queue_step_gradients::<B, M>(model, data, micro_batches, &seeds, device, &mut PhaseClock::new());
    if trained_tokens > 0 {
        grads.scale(1.0 / trained_tokens as f64);
    }
    let loss_sum = loss_sum.map(newt_kernels::read_f64).unwrap_or(0.0);
    StepGradients { grads, loss_sum, trained_tokens }
}

/// Gradient sums by path, the loss sum (on the device), and the trained-token count.
type Queued<B> = (ParamGrads<B>, Option<Tensor<B, 1>>, usize);

/// [`step_gradients`] without reading anything back and without the division by the
/// trained-token count: the gradient sums and the loss sum stay on the device, queued.
fn queue_step_gradients<B, M>(
    model: &M,
    data: &TrainData,
    micro_batches: &[Vec<usize>],
    seeds: &[u64],
    device: &B::Device,
    clock: &mut PhaseClock,
) -> Queued<B::InnerBackend>
where
    B: AutodiffBackend,
    M: CausalLm<B>,
{
    let mut grads = ParamGrads::<B::InnerBackend>::default();
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut trained_tokens = 0usize;
    for (rows, seed) in micro_batches.iter().zip(seeds) {
        let batch = data.micro_batch::<B>(rows, device);
        clock.mark::<B>("batch", device);
        // The model's own backward pass (gradient checkpointing), or Burn's on its loss; the
        // seed makes the dropout masks of a recomputed layer the ones its forward pass drew.
        let _turn = autodiff_turn();
        let (tokens, step_grads, value) = super::rng::with_batch_seed(*seed, || match model.self_backward(&batch) {
            Some(out) => {
                clock.mark::<B>("forward+backward", device);
                (out.tokens, out.grads, out.loss_sum)
            }
            None => {
                let out = model.loss(&batch);
                clock.mark::<B>("forward", device);
                let mut backward = out.sum.backward();
                let grads = ParamGrads::collect::<B, M>(&mut backward, model);
                clock.mark::<B>("backward", device);
                (out.tokens, grads, out.sum.inner())
            }
        });
        trained_tokens += tokens;
        grads.accumulate(step_grads);
        loss_sum = Some(match loss_sum {
            Some(acc) => acc + value,
            None => value,
        });
    }
    (grads, loss_sum, trained_tokens)
}

/// Burn 0.21's autodiff keeps one process-wide graph server, and two threads building and
/// back-propagating graphs at once can deadlock inside it (seen on the CPU with two replicas:
/// one thread's `backward` waiting in `GraphCleaner::init` while another's forward waits in
/// `register_step`, both on the server's locks, forever). Replicas in one process therefore take
/// turns: a micro-batch's forward and backward, and an AdamW step (which maps the autodiff
/// module's parameters), hold this lock; waiting for the other replicas (the all-reduce) never
/// does, so a turn cannot wait on a rank that needs the lock. Uncontended with one replica.
fn autodiff_turn() -> std::sync::MutexGuard<'static, ()> {
    static AUTODIFF: std::sync::Mutex<()> = std::sync::Mutex::new(());
    AUTODIFF.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One optimizer step over `micro_batches` (this replica's share of the step): gradients, the
/// sum over replicas, clipping, AdamW.
#[allow(clippy::too_many_arguments)]
fn optimizer_step<B, M>(
    model: M,
    data: &TrainData,
    micro_batches: &[Vec<usize>],
    seeds: &[u64],
    rank: Rank<'_, B::InnerBackend>,
    max_grad_norm: f64,
    opt: &mut AdamW<B::InnerBackend>,
    lr: f64,
    device: &B::Device,
    clock: &mut PhaseClock,
) -> Result<(M, StepOut), TrainError>
where
    B: AutodiffBackend,
    B::InnerBackend: newt_kernels::KernelBackend,
    M: CausalLm<B>,
{
    let (grads, loss_sum, trained_tokens) =
        queue_step_gradients::<B, M>(&model, data, micro_batches, seeds, device, clock);
    let flat = grads.flatten();
    let (flat, loss_sum, trained_tokens) = match rank.reducer {
        None => (flat, loss_sum, trained_tokens),
        Some(reducer) => {
            // A replica with no micro-batch this step (an epoch's short last step) adds zeros.
            let (layout, grad) = flat.unwrap_or_else(|| {
                let layout: Layout = trainable_sizes(&model).into_iter().collect();
                let n = layout.iter().map(|(_, n)| n).sum::<usize>();
                let zeros = TensorData::new(vec![0f32; n], [n]);
                (layout, Tensor::from_data(zeros, (device, burn::tensor::DType::F32)))
            });
            let local_loss = loss_sum.map(newt_kernels::read_f64).unwrap_or(0.0);
            let (grad, [loss, tokens]) = reducer.all_reduce(rank.rank, grad, [local_loss, trained_tokens as f64])?;
            clock.mark::<B>("all-reduce", device);
            let loss = Tensor::from_data(TensorData::new(vec![loss as f32], [1]), (device, burn::tensor::DType::F32));
            (Some((layout, grad)).filter(|(l, _)| !l.is_empty()), Some(loss), tokens as usize)
        }
    };
    if trained_tokens == 0 || flat.is_none() {
        // Every label masked: nothing to learn, and HF's 0/0 would poison the weights.
        let loss_sum = loss_sum.map(newt_kernels::read_f64).unwrap_or(0.0);
        let out = StepOut { loss_sum, trained_tokens, grad_norm: 0.0 };
        return Ok((model, out));
    }
    // All gradients as one vector: the division, the norm, the clipping and AdamW are then a
    // few operations each, not a few per parameter.
    let (layout, grad) = flat.expect("checked above");
    let grad = grad.mul_scalar(1.0 / trained_tokens as f64);
    let norm_sq = crate::grads::sum_squares(grad.clone());
    // One read for the loss and the gradient norm: each read waits for the device.
    let (loss_sum, grad_norm) = match loss_sum {
        Some(loss) => {
            let both = Tensor::cat(vec![loss.cast(burn::tensor::DType::F32), norm_sq], 0).into_data();
            let v: Vec<f64> = both.iter::<f64>().collect();
            (v[0], v[1].sqrt())
        }
        None => (0.0, newt_kernels::read_f64(norm_sq).sqrt()),
    };
    clock.mark::<B>("norm", device);
    // Applied even when it is 1, so clipped and unclipped steps run the same operations.
    let grad = grad.mul_scalar(crate::grads::clip_coefficient(grad_norm, max_grad_norm));
    let loss = loss_sum / trained_tokens as f64;
    if !loss.is_finite() || !grad_norm.is_finite() {
        return Err(TrainError::NonFinite { step: 0, loss, grad_norm });
    }
    let model = {
        let _turn = autodiff_turn();
        opt.step_flat::<B, M>(model, layout, grad, lr)
    };
    clock.mark::<B>("optimizer", device);
    let out = StepOut { loss_sum, trained_tokens, grad_norm };
    Ok((model, out))
}

/// Runs `f`, turning a backend out-of-memory panic into [`TrainError::OutOfMemory`] and
/// filling in the step number of errors raised inside.
fn guard_oom<T>(step: usize, cfg: &TrainConfig, f: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Err(TrainError::NonFinite { loss, grad_norm, .. })) => Err(TrainError::NonFinite { step, loss, grad_norm }),
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_message(payload.as_ref()).unwrap_or_default();
            if is_out_of_memory(&msg) {
                Err(TrainError::OutOfMemory { step, hint: out_of_memory_hint(cfg) })
            } else {
                resume_unwind(payload)
            }
        }
    }
}

/// What stops a step (or a CUDA stage, `backend::dispatch`) when a CubeCL device thread panicked
/// ([`newt_kernels::watch_device_threads`]); the panics are taken, so they are reported once. An
/// out-of-memory there reads as one ([`is_out_of_memory`]), so a training run ends with the
/// memory estimate and its remedies instead of training on tensors that were never computed.
pub fn device_thread_failure() -> Option<String> {
    let panics = newt_kernels::take_device_thread_panics();
    // An out-of-memory panic leads on to others (tensors it left unbound), so name it first.
    let cause = panics.iter().find(|p| is_out_of_memory(p)).or(panics.first())?;
    Some(format!("the CUDA device thread failed ({} panic(s); the cause: {cause})", panics.len()))
}

/// Whether a backend panic message reports device memory exhaustion (CubeCL's
/// `OutOfMemory` / `BufferTooBig`, CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, allocator messages).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "out of memory",
        "out-of-memory",
        "outofmemory",
        "cuda_error_out_of_memory",
        "buffertoobig",
        "can't allocate buffer",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The settings that reduce training memory, cheapest first.
pub fn out_of_memory_hint(cfg: &TrainConfig) -> String {
    let mbs = cfg.micro_batch_size;
    let lower = (mbs / 2).max(1);
    let gas = cfg.gradient_accumulation_steps * mbs / lower;
    format!(
        "settings that reduce memory, cheapest first:\n\
         \x20 1. micro_batch_size: {lower} (now {mbs}); gradient_accumulation_steps: {gas} keeps the batch\n\
         \x20 2. gradient_checkpointing: true (recompute activations in the backward pass)\n\
         \x20 3. sequence_len: a shorter one (activations grow with it)\n\
         \x20 4. adapter: qlora (4-bit base weights)\n\
         the last checkpoint is kept; re-running resumes from it"
    )
}

fn check_compatible(
    state: &CheckpointState,
    plan: &TrainPlan,
    rows: usize,
    seed: u64,
    dir: &std::path::Path,
) -> Result<(), TrainError> {
    let same = state.rows == rows
        && state.seed == seed
        && state.plan.micro_batches_per_epoch == plan.micro_batches_per_epoch
        && state.plan.steps_per_epoch == plan.steps_per_epoch
        && state.plan.total_steps == plan.total_steps
        && state.plan.warmup_steps == plan.warmup_steps;
    if same {
        Ok(())
    } else {
        Err(TrainError::Checkpoint(format!(
            "{} was written by a different run (rows {} vs {rows}, seed {} vs {seed}, plan {:?} vs \
             {plan:?}); remove it or use the run's own checkpoint directory",
            dir.display(),
            state.rows,
            state.seed,
            state.plan
        )))
    }
}

/// Mean token loss of `model` over `data` (micro-batches of `batch_size` rows, in order):
/// Σ token losses / Σ tokens. Pass an inference module (`model.valid()`), where dropout is off.
pub fn eval_loss<B: Backend, M: CausalLoss<B>>(
    model: &M,
    data: &TrainData,
    batch_size: usize,
    device: &B::Device,
) -> f64 {
    let order: Vec<usize> = (0..data.len()).collect();
    let mut sum = 0.0;
    let mut tokens = 0usize;
    for rows in order.chunks(batch_size.max(1)) {
        let out = model.loss(&data.micro_batch::<B>(rows, device));
        tokens += out.tokens;
        sum += newt_kernels::read_f64(out.sum);
    }
    if tokens == 0 { f64::NAN } else { sum / tokens as f64 }
}
