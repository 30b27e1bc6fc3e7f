//! One decoding step of a Llama-family model for a few sequences at once (`newt serve`'s
//! concurrent answers): every row feeds one token at its own position against its own KV cache.
//!
//! Layer by layer in Burn operations a step is hundreds of small operations, each registered,
//! fused and launched from the host: at SmolLM2's size the GPU waits on the host (about 0.9 ms a
//! layer on an H100, `bench/results/serve_decode.md`). [`KernelBackend::decode_step`] takes the
//! whole step instead — the weights, the caches, the tokens — as one operation; on CUDA
//! (`kernels/cuda/decode.cu`) that operation queues about a dozen kernels a layer from the device
//! thread (gemv per linear and per adapter factor, RMSNorm, RoPE + cache write, attention over
//! the cache, SwiGLU) with no host work between them. Backends without it return `None` and the
//! model runs its layers in Burn operations ([`crate::FastPath::DecodeStep`] forces that).
//!
//! [`KernelBackend::decode_step`]: crate::KernelBackend::decode_step

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};

/// A linear layer of the step: `weight` `[out, in]` (Hugging Face layout), an optional `bias`
/// `[out]` and LoRA adapter.
pub struct DecodeLinear<B: Backend> {
    /// `[out, in]`.
    pub weight: FloatTensor<B>,
    /// `[out]`.
    pub bias: Option<FloatTensor<B>>,
    /// The adapter: `y += scale·(x·Aᵀ)·Bᵀ`.
    pub lora: Option<DecodeLora<B>>,
}

/// A LoRA adapter beside a [`DecodeLinear`].
pub struct DecodeLora<B: Backend> {
    /// `A`, `[r, in]`.
    pub a: FloatTensor<B>,
    /// `B`, `[out, r]`.
    pub b: FloatTensor<B>,
    /// `alpha/r` (or `alpha/√r`).
    pub scale: f32,
}

/// One pre-norm decoder layer and its KV cache.
pub struct DecodeLayer<B: Backend> {
    /// `input_layernorm`, `[hidden]`.
    pub input_norm: FloatTensor<B>,
    /// `post_attention_layernorm`, `[hidden]`.
    pub post_norm: FloatTensor<B>,
    /// `q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj`, in that order.
    pub linears: [DecodeLinear<B>; 7],
    /// Keys, `[rows, kv_heads, capacity, head_dim]`; the step writes each row's new key at the
    /// row's length, in place.
    pub k_cache: FloatTensor<B>,
    /// Values, as `k_cache`.
    pub v_cache: FloatTensor<B>,
}

/// The shape of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeDims {
    /// Sequences advanced by this step.
    pub rows: usize,
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// Rows of the LM head.
    pub vocab: usize,
    /// Positions each row's cache holds.
    pub capacity: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Sliding window (keys a query sees), 0 for none.
    pub window: usize,
}

/// Everything one decoding step reads: `meta` is int `[2·rows]` (each row's token, then each
/// row's length: the position its token takes), `rope` f32 `[rows, head_dim]` ([`rope_table`]).
pub struct DecodeStep<B: Backend> {
    /// The shape.
    pub dims: DecodeDims,
    /// Tokens, then lengths.
    pub meta: IntTensor<B>,
    /// Per row: cos of each rotary frequency at the row's position, then its sin.
    pub rope: FloatTensor<B>,
    /// `embed_tokens`, `[vocab, hidden]`.
    pub embed: FloatTensor<B>,
    /// The decoder layers.
    pub layers: Vec<DecodeLayer<B>>,
    /// The final norm, `[hidden]`.
    pub norm: FloatTensor<B>,
    /// The LM head, `[vocab, hidden]` (the embedding when tied).
    pub lm_head: FloatTensor<B>,
}

static FUSED_STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Decoding steps run as one operation so far in this process.
pub fn fused_steps() -> u64 {
    FUSED_STEPS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `(host µs, GPU µs)` of the last timed step run as one operation: the host's time queuing its
/// kernels, and the GPU's between its first and last kernel (CUDA events; known once the next
/// step starts). `None` before two steps.
pub fn last_step_timing() -> Option<(f64, f64)> {
    cuda::TIMING.lock().unwrap_or_else(|e| e.into_inner()).last
}

/// [`DecodeStep::meta`]'s values: `tokens` then `lens`.
pub fn meta_values(tokens: &[u32], lens: &[usize]) -> Vec<i32> {
    assert_eq!(tokens.len(), lens.len(), "one length per token");
    tokens.iter().map(|&t| t as i32).chain(lens.iter().map(|&l| l as i32)).collect()
}

/// [`DecodeStep::rope`]'s values for rows at positions `lens`: per row, `cos(pos·f)` for each of
/// `inv_freq`'s frequencies, then `sin(pos·f)` (the angle in f32, as [`crate::RopeTables`]).
pub fn rope_table(lens: &[usize], inv_freq: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(lens.len() * inv_freq.len() * 2);
    for &pos in lens {
        let angles: Vec<f32> = inv_freq.iter().map(|f| pos as f32 * f).collect();
        out.extend(angles.iter().map(|a| a.cos()));
        out.extend(angles.iter().map(|a| a.sin()));
    }
    out
}

/// The CUDA step (`kernels/cuda/decode.cu`).
pub(crate) mod cuda {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, Shape};
    use burn_cubecl::FloatElement;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl_cuda::CudaRuntime;
    use cudarc::driver::sys;

    use super::{DecodeDims, DecodeLinear, DecodeStep};
    use crate::cuda_op::{Fus, custom_op, empty};
    use crate::flash_cuda::{Args, functions, launch_block};

    /// The step's timing ([`super::last_step_timing`]): events recorded around the launches.
    pub(crate) struct Timing {
        /// `(start, end)` events, created on first use.
        events: Option<(usize, usize)>,
        /// Host µs of the step whose events are pending.
        pending: Option<f64>,
        pub(crate) last: Option<(f64, f64)>,
    }

    pub(crate) static TIMING: std::sync::Mutex<Timing> =
        std::sync::Mutex::new(Timing { events: None, pending: None, last: None });

    /// Runs `launch` between two events on `stream`; reads the previous step's GPU time first.
    fn timed(stream: sys::CUstream, launch: impl FnOnce()) {
        use cudarc::driver::result::event;
        let mut t = TIMING.lock().unwrap_or_else(|e| e.into_inner());
        if t.events.is_none() {
            let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
            if let (Ok(a), Ok(b)) = (event::create(flags), event::create(flags)) {
                t.events = Some((a as usize, b as usize));
            }
        }
        let Some((start, end)) = t.events else {
            return launch();
        };
        let (start, end) = (start as sys::CUevent, end as sys::CUevent);
        if let Some(host) = t.pending.take() {
            // SAFETY: both events were recorded on this context's stream by the previous step.
            if let Ok(ms) = unsafe { event::elapsed(start, end) } {
                t.last = Some((host, 1e3 * ms as f64));
            }
        }
        let clock = std::time::Instant::now();
        // SAFETY: events of this context, recorded on the stream the kernels run on.
        let recorded = unsafe { event::record(start, stream) }.is_ok();
        launch();
        let recorded = recorded && unsafe { event::record(end, stream) }.is_ok();
        if recorded {
            t.pending = Some(1e6 * clock.elapsed().as_secs_f64());
        }
    }

    /// Rows one gemv launch takes (`DK_MAX_ROWS` in the source).
    pub(crate) const MAX_ROWS: usize = 8;
    /// Outputs per gemv block of 256 threads (`DK_GEMV_WARPS`).
    const GEMV_WARPS: usize = 8;

    /// The kernels of `decode.cu`.
    #[derive(Clone, Copy)]
    pub(crate) struct DecodeFunctions {
        pub(crate) gemv_bf16: usize,
        pub(crate) gemv_f32: usize,
        pub(crate) embed: usize,
        pub(crate) rms: usize,
        pub(crate) rope_cache: usize,
        pub(crate) attn: usize,
        pub(crate) attn_hd128: usize,
        pub(crate) swiglu: usize,
    }

    /// Whether the kernels take this step: bf16 weights and caches, f32 or bf16 adapters, head
    /// dim 64 or 128.
    pub(crate) fn takes<F: FloatElement>(step: &DecodeStep<Fus<F>>) -> bool {
        let d = &step.dims;
        let bf16 = |t: &FloatTensor<Fus<F>>| t.dtype == DType::BF16;
        let linear = |l: &DecodeLinear<Fus<F>>| {
            bf16(&l.weight)
                && l.bias.as_ref().is_none_or(bf16)
                && l.lora
                    .as_ref()
                    .is_none_or(|a| [&a.a, &a.b].iter().all(|t| matches!(t.dtype, DType::F32 | DType::BF16)))
        };
        matches!(d.head_dim, 64 | 128)
            && d.rows > 0
            && d.kv_heads > 0
            && d.q_heads.is_multiple_of(d.kv_heads)
            && step.meta.dtype == DType::I32
            && step.rope.dtype == DType::F32
            && [&step.embed, &step.norm, &step.lm_head].into_iter().all(bf16)
            && step.layers.iter().all(|l| {
                [&l.input_norm, &l.post_norm, &l.k_cache, &l.v_cache].into_iter().all(bf16)
                    && l.linears.iter().all(linear)
            })
    }

    /// Where a linear's tensors sit among the operation's inputs.
    #[derive(Debug, Clone, Copy)]
    struct LinearAt {
        weight: usize,
        out: usize,
        input: usize,
        bias: Option<usize>,
        /// `(A, A is f32, B, B is f32, scale, r)`.
        lora: Option<(usize, bool, usize, bool, f32, usize)>,
    }

    #[derive(Debug, Clone)]
    struct LayerAt {
        input_norm: usize,
        post_norm: usize,
        k_cache: usize,
        v_cache: usize,
        linears: [LinearAt; 7],
    }

    /// The step's launches, by input index; the scratch and the logits come after the inputs.
    #[derive(Debug, Clone)]
    struct Plan {
        dims: DecodeDims,
        meta: usize,
        rope: usize,
        embed: usize,
        norm: usize,
        lm_head: usize,
        layers: Vec<LayerAt>,
        scratch: Scratch,
        inputs: usize,
    }

    /// Offsets (in f32 elements, each a multiple of 4: 16-byte aligned) of the step's f32
    /// activations in one scratch buffer.
    #[derive(Debug, Clone, Copy)]
    struct Scratch {
        x: usize,
        xn: usize,
        q: usize,
        k: usize,
        v: usize,
        attn: usize,
        tmp: usize,
        gate: usize,
        up: usize,
        t: usize,
        len: usize,
    }

    impl Scratch {
        fn new(d: &DecodeDims, rank: usize) -> Self {
            let mut at = 0;
            let mut take = |n: usize| {
                let here = at;
                at += (d.rows * n).next_multiple_of(4);
                here
            };
            let (qw, kw) = (d.q_heads * d.head_dim, d.kv_heads * d.head_dim);
            let x = take(d.hidden);
            let xn = take(d.hidden);
            let q = take(qw);
            let k = take(kw);
            let v = take(kw);
            let attn = take(qw);
            let tmp = take(d.hidden.max(qw));
            let gate = take(d.intermediate);
            let up = take(d.intermediate);
            let t = take(rank.max(1));
            Scratch { x, xn, q, k, v, attn, tmp, gate, up, t, len: at }
        }
    }

    /// The arguments of `newt_dec_gemv_*`: x, w, bias, prev, res, out, rows, n, k, scale.
    pub(crate) fn gemv_args(ptrs: [u64; 6], rows: usize, n: usize, k: usize, scale: f32) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(rows as i32).i32(n as i32).i32(k as i32).f32(scale);
        args
    }

    /// The arguments of `newt_dec_embed`: meta, embed, x, hidden.
    pub(crate) fn embed_args(ptrs: [u64; 3], hidden: usize) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(hidden as i32);
        args
    }

    /// The arguments of `newt_dec_rms`: x, w, y, n, eps.
    pub(crate) fn rms_args(ptrs: [u64; 3], n: usize, eps: f32) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(n as i32).f32(eps);
        args
    }

    /// The arguments of `newt_dec_rope_cache`: q, k, v, meta, rope, k cache, v cache, rows, q
    /// heads, kv heads, head dim, capacity.
    pub(crate) fn rope_cache_args(ptrs: [u64; 7], d: &DecodeDims) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(d.rows as i32).i32(d.q_heads as i32).i32(d.kv_heads as i32);
        args.i32(d.head_dim as i32).i32(d.capacity as i32);
        args
    }

    /// The arguments of `newt_dec_attn*`: q, meta, k cache, v cache, out, rows, q heads, kv
    /// heads, capacity, scale, window.
    pub(crate) fn attn_args(ptrs: [u64; 5], d: &DecodeDims) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(d.rows as i32).i32(d.q_heads as i32).i32(d.kv_heads as i32).i32(d.capacity as i32);
        args.f32(1.0 / (d.head_dim as f32).sqrt()).i32(d.window as i32);
        args
    }

    /// The arguments of `newt_dec_swiglu`: gate, up, n.
    pub(crate) fn swiglu_args(ptrs: [u64; 2], n: usize) -> Args {
        let mut args = Args::with_ptrs(&ptrs);
        args.i32(n as i32);
        args
    }

    impl Plan {
        /// Queues the step's kernels on `stream` (from the device thread), `p` the device
        /// pointers of the inputs, then the scratch, then the logits.
        fn run(&self, f: &super::cuda::DecodeFunctions, p: &[u64], stream: sys::CUstream) {
            let d = &self.dims;
            let rows = d.rows as u32;
            let base = p[self.inputs];
            let logits = p[self.inputs + 1];
            let s = &self.scratch;
            let at = |off: usize| base + 4 * off as u64;
            let (x, xn, q, k, v, attn, tmp, gate, up, t) =
                (at(s.x), at(s.xn), at(s.q), at(s.k), at(s.v), at(s.attn), at(s.tmp), at(s.gate), at(s.up), at(s.t));
            let mut a = embed_args([p[self.meta], p[self.embed], x], d.hidden);
            launch_block(f.embed, (rows, 1, 1), 256, &mut a, stream, "decode embedding");
            let rms = |input: u64, w: usize, out: u64| {
                let mut a = rms_args([input, p[w], out], d.hidden, d.eps);
                launch_block(f.rms, (rows, 1, 1), 256, &mut a, stream, "decode rms_norm");
            };
            // out = [res +] (x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ), through `tmp` when both a residual
            // and an adapter are there.
            let linear = |l: &LinearAt, input: u64, out: u64, res: Option<u64>| {
                let bias = l.bias.map_or(0, |i| p[i]);
                match l.lora {
                    None => self.gemv(f, stream, [input, p[l.weight], bias, 0, res.unwrap_or(0), out], false, l, 1.0),
                    Some((ai, a_f32, bi, b_f32, scale, r)) => {
                        let first = if res.is_some() { tmp } else { out };
                        self.gemv(f, stream, [input, p[l.weight], bias, 0, 0, first], false, l, 1.0);
                        let la = LinearAt { out: r, ..*l };
                        self.gemv(f, stream, [input, p[ai], 0, 0, 0, t], a_f32, &la, 1.0);
                        let lb = LinearAt { input: r, ..*l };
                        self.gemv(f, stream, [t, p[bi], 0, first, res.unwrap_or(0), out], b_f32, &lb, scale);
                    }
                }
            };
            for layer in &self.layers {
                let [lq, lk, lv, lo, lg, lu, ld] = &layer.linears;
                rms(x, layer.input_norm, xn);
                linear(lq, xn, q, None);
                linear(lk, xn, k, None);
                linear(lv, xn, v, None);
                let (kc, vc) = (p[layer.k_cache], p[layer.v_cache]);
                let mut a = rope_cache_args([q, k, v, p[self.meta], p[self.rope], kc, vc], d);
                launch_block(f.rope_cache, (rows, 1, 1), 128, &mut a, stream, "decode rope");
                let mut a = attn_args([q, p[self.meta], kc, vc, attn], d);
                let kernel = if d.head_dim == 128 { f.attn_hd128 } else { f.attn };
                launch_block(kernel, (d.q_heads as u32, rows, 1), 128, &mut a, stream, "decode attention");
                linear(lo, attn, x, Some(x));
                rms(x, layer.post_norm, xn);
                linear(lg, xn, gate, None);
                linear(lu, xn, up, None);
                let n = d.rows * d.intermediate;
                let mut a = swiglu_args([gate, up], n);
                launch_block(f.swiglu, (n.div_ceil(256) as u32, 1, 1), 256, &mut a, stream, "decode swiglu");
                linear(ld, gate, x, Some(x));
            }
            rms(x, self.norm, xn);
            let head = LinearAt { weight: self.lm_head, out: d.vocab, input: d.hidden, bias: None, lora: None };
            self.gemv(f, stream, [xn, p[self.lm_head], 0, 0, 0, logits], false, &head, 1.0);
        }

        /// One gemv over every row, [`MAX_ROWS`] rows a launch: `ptrs` are x, w, bias, prev,
        /// res, out (0 for none), the row-major f32 ones advanced per chunk.
        #[allow(clippy::too_many_arguments)]
        fn gemv(
            &self,
            f: &DecodeFunctions,
            stream: sys::CUstream,
            [x, w, bias, prev, res, out]: [u64; 6],
            w_f32: bool,
            l: &LinearAt,
            scale: f32,
        ) {
            let (n, k) = (l.out, l.input);
            let kernel = if w_f32 { f.gemv_f32 } else { f.gemv_bf16 };
            let grid = (n.div_ceil(GEMV_WARPS) as u32, 1, 1);
            for first in (0..self.dims.rows).step_by(MAX_ROWS) {
                let rows = MAX_ROWS.min(self.dims.rows - first);
                let shift = |ptr: u64, width: usize| if ptr == 0 { 0 } else { ptr + (4 * first * width) as u64 };
                let ptrs = [shift(x, k), w, bias, shift(prev, n), shift(res, n), shift(out, n)];
                let mut a = gemv_args(ptrs, rows, n, k, scale);
                launch_block(kernel, grid, 256, &mut a, stream, "decode gemv");
            }
        }
    }

    /// The step as one fusion operation: `[rows, vocab]` f32 logits; the caches written in place.
    pub(crate) fn fusion_decode_step<F: FloatElement>(step: DecodeStep<Fus<F>>) -> FloatTensor<Fus<F>> {
        super::FUSED_STEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = step.dims;
        let mut inputs: Vec<FloatTensor<Fus<F>>> = Vec::new();
        let mut push = |t: FloatTensor<Fus<F>>| {
            inputs.push(t);
            inputs.len() - 1
        };
        let meta = push(step.meta);
        let rope = push(step.rope);
        let embed = push(step.embed);
        let norm = push(step.norm);
        let lm_head = push(step.lm_head);
        let (qw, kw) = (d.q_heads * d.head_dim, d.kv_heads * d.head_dim);
        // (out, in) of q, k, v, o, gate, up, down.
        let shapes = [
            (qw, d.hidden),
            (kw, d.hidden),
            (kw, d.hidden),
            (d.hidden, qw),
            (d.intermediate, d.hidden),
            (d.intermediate, d.hidden),
            (d.hidden, d.intermediate),
        ];
        let mut rank = 0;
        let mut layers = Vec::with_capacity(step.layers.len());
        for layer in step.layers {
            let input_norm = push(layer.input_norm);
            let post_norm = push(layer.post_norm);
            let k_cache = push(layer.k_cache);
            let v_cache = push(layer.v_cache);
            let linears = layer.linears.map(|l| (l.weight, l.bias, l.lora));
            let mut at = Vec::with_capacity(7);
            for ((weight, bias, lora), &(out, input)) in linears.into_iter().zip(&shapes) {
                let weight = push(weight);
                let bias = bias.map(&mut push);
                let lora = lora.map(|a| {
                    let r = a.a.shape[0];
                    rank = rank.max(r);
                    let (a_f32, b_f32) = (a.a.dtype == DType::F32, a.b.dtype == DType::F32);
                    (push(a.a), a_f32, push(a.b), b_f32, a.scale, r)
                });
                at.push(LinearAt { weight, out, input, bias, lora });
            }
            let linears: [LinearAt; 7] = at.try_into().unwrap_or_else(|_| unreachable!("seven linears"));
            layers.push(LayerAt { input_norm, post_norm, k_cache, v_cache, linears });
        }
        let scratch = Scratch::new(&d, rank);
        let plan = Plan { dims: d, meta, rope, embed, norm, lm_head, layers, scratch, inputs: inputs.len() };
        let outputs = vec![(Shape::new([d.rows, d.vocab]), DType::F32)];
        // The weights and caches are the same tensors step after step (until a row joins or
        // leaves): their device pointers are taken once, by the first step that carries them,
        // and later steps carry only `meta` and `rope`. Each tensor carried costs host time in
        // the fusion and CubeCL layers (about 13 µs measured on an H100 host: 4 ms a step for
        // SmolLM2's 330 tensors, three times the step's kernels).
        let key = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            inputs[2..].iter().for_each(|t| t.id.hash(&mut h));
            h.finish()
        };
        let pinned = {
            let mut table = PINNED.lock().unwrap_or_else(|e| e.into_inner());
            let known = table.iter().any(|p| p.key == key);
            if !known {
                table.push_back(Pinned { key, ptrs: None, copies: Vec::new() });
                if table.len() > PINNED_KEPT {
                    table.pop_front();
                }
            }
            known
        };
        let inputs = if pinned { inputs[..2].to_vec() } else { inputs };
        custom_op::<F>("newt_decode_step", inputs, outputs, move |ins: Vec<CubeTensor<CudaRuntime>>| {
            let mut copies = Vec::new();
            let ins: Vec<CubeTensor<CudaRuntime>> = ins
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    if t.is_contiguous() && t.handle.offset_start.unwrap_or(0).is_multiple_of(16) {
                        return t;
                    }
                    // The step writes the caches in place: a copy would lose the write.
                    let cache = plan.layers.iter().any(|l| i == l.k_cache || i == l.v_cache);
                    assert!(!cache || pinned, "decode step: a KV cache is not a contiguous tensor");
                    let copy = burn_cubecl::kernel::into_contiguous(t);
                    copies.push(copy.clone());
                    copy
                })
                .collect();
            if !pinned && !copies.is_empty() {
                // Kept alive as long as their pointers are in the table.
                let mut table = PINNED.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(p) = table.iter_mut().find(|p| p.key == key) {
                    p.copies = copies;
                }
            }
            let scratch = empty(&ins[0], &[plan.scratch.len], DType::F32);
            let logits = empty(&ins[0], &[plan.dims.rows, plan.dims.vocab], DType::F32);
            let mut buffers: Vec<_> = ins.iter().map(|t| t.handle.clone().binding()).collect();
            buffers.push(scratch.handle.clone().binding());
            buffers.push(logits.handle.clone().binding());
            let plan = plan.clone();
            cubecl_cuda::external::launch_external(
                &ins[0].client,
                buffers,
                Box::new(move |ptrs: &[u64], stream| {
                    let mut table = PINNED.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = table.iter_mut().find(|p| p.key == key);
                    let all = if pinned {
                        // meta, rope, scratch, logits: the rest from the table.
                        let known = entry.and_then(|p| p.ptrs.clone()).expect("decode step: pointers taken earlier");
                        let mut all = known;
                        all[0] = ptrs[0];
                        all[1] = ptrs[1];
                        all.extend_from_slice(&ptrs[2..]);
                        all
                    } else {
                        if let Some(p) = entry {
                            p.ptrs = Some(ptrs[..plan.inputs].to_vec());
                        }
                        ptrs.to_vec()
                    };
                    drop(table);
                    let f = functions().decode;
                    timed(stream, || plan.run(&f, &all, stream))
                }),
            );
            vec![logits]
        })
        .into_iter()
        .next()
        .expect("logits")
    }

    /// Pointer tables kept (the latest ones: a row joining or leaving makes a new one).
    const PINNED_KEPT: usize = 8;

    /// Device pointers of a step's inputs, by the ids of its weight and cache tensors: queued on
    /// the host when a step first carries those tensors, filled on the device thread when it runs.
    struct Pinned {
        key: u64,
        ptrs: Option<Vec<u64>>,
        /// Contiguous copies of inputs that were not, alive while their pointers are here.
        copies: Vec<CubeTensor<CudaRuntime>>,
    }

    static PINNED: std::sync::Mutex<std::collections::VecDeque<Pinned>> =
        std::sync::Mutex::new(std::collections::VecDeque::new());
}

#[cfg(test)]
mod tests {
    use super::cuda::*;
    use super::*;
    use crate::flash_cuda::tests::signature;

    fn dims() -> DecodeDims {
        DecodeDims {
            rows: 3,
            hidden: 64,
            intermediate: 128,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 64,
            vocab: 100,
            capacity: 32,
            eps: 1e-5,
            window: 0,
        }
    }

    #[test]
    fn cuda_decode_arguments_match_the_kernel_signatures() {
        let p = |n: usize| -> Vec<u64> { (1..=n as u64).map(|i| i * 16).collect() };
        let d = dims();
        let gemv = gemv_args(p(6).try_into().unwrap(), 3, 64, 64, 1.0);
        assert_eq!(gemv.1, signature("newt_dec_gemv_bf16"));
        assert_eq!(gemv.1, signature("newt_dec_gemv_f32"));
        assert_eq!(embed_args(p(3).try_into().unwrap(), 64).1, signature("newt_dec_embed"));
        assert_eq!(rms_args(p(3).try_into().unwrap(), 64, 1e-5).1, signature("newt_dec_rms"));
        assert_eq!(rope_cache_args(p(7).try_into().unwrap(), &d).1, signature("newt_dec_rope_cache"));
        let attn = attn_args(p(5).try_into().unwrap(), &d);
        assert_eq!(attn.1, signature("newt_dec_attn"));
        assert_eq!(attn.1, signature("newt_dec_attn_hd128"));
        assert_eq!(swiglu_args(p(2).try_into().unwrap(), 10).1, signature("newt_dec_swiglu"));
    }

    #[test]
    fn the_gemv_kernel_takes_as_many_rows_as_the_launcher_gives_it() {
        // The launcher cuts rows into chunks of MAX_ROWS; the kernel's accumulators are sized by
        // DK_MAX_ROWS: the two must agree.
        let src = crate::flash_cuda::SOURCE;
        let line = src.lines().find(|l| l.starts_with("#define DK_MAX_ROWS")).expect("DK_MAX_ROWS");
        let n: usize = line.split_whitespace().nth(2).unwrap().parse().unwrap();
        assert_eq!(n, MAX_ROWS);
    }

    #[test]
    fn meta_holds_tokens_then_lengths() {
        assert_eq!(meta_values(&[7, 9], &[3, 11]), vec![7, 9, 3, 11]);
    }

    #[test]
    fn the_rope_table_is_cos_then_sin_of_position_times_frequency() {
        let inv = [1.0f32, 0.5, 0.25];
        let t = rope_table(&[0, 2], &inv);
        assert_eq!(t.len(), 2 * 6);
        assert_eq!(&t[..6], &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        for (i, f) in inv.iter().enumerate() {
            assert!((t[6 + i] - (2.0 * f).cos()).abs() < 1e-6);
            assert!((t[9 + i] - (2.0 * f).sin()).abs() < 1e-6);
        }
    }
}
