//! The decoding step as one backend operation ([`newt_kernels::decode`]) against the model's
//! layers in Burn operations, on one model: `newt kernels --decode` runs it on the machine at
//! hand (there is no GPU in CI).

use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use newt_kernels::{FastPath, KernelBackend, set_reference_paths};

use crate::generate::argmax;
use crate::llama::{BatchKvCache, KvCache, Llama};

/// What [`compare_decode`] found.
#[derive(Debug, Clone)]
pub struct DecodeComparison {
    /// Rows decoded together.
    pub rows: usize,
    /// Steps compared.
    pub steps: usize,
    /// Steps the backend ran as one operation (0: the backend has none, or did not take it).
    pub fused_steps: u64,
    /// Largest `|fused - reference|` over every logit, over the largest reference `|logit|`.
    pub max_rel_err: f32,
    /// Rows × steps whose greedy token agreed.
    pub argmax_agree: usize,
    /// Mean wall time of a step (the logits read back), after two warm-up steps.
    pub fused_ms: f64,
    /// The same for the reference.
    pub reference_ms: f64,
    /// Mean host time queuing a fused step's kernels, µs (CUDA; `None` elsewhere).
    pub launch_us: Option<f64>,
    /// Mean GPU time from a fused step's first kernel to its last, µs.
    pub gpu_us: Option<f64>,
}

/// Prefills one row per prompt length (deterministic tokens), then runs `steps` steps both ways
/// on two copies of the cache, feeding both the reference's greedy tokens. Sets this process's
/// reference paths (to none, and to the decoding step alone) while it runs, and leaves none set.
pub fn compare_decode<B: KernelBackend>(model: &Llama<B>, prompt_lens: &[usize], steps: usize) -> DecodeComparison {
    let device = model.embed_tokens.device();
    let (layers, vocab) = (model.config.num_hidden_layers, model.config.vocab_size);
    let mut fused = BatchKvCache::new(layers);
    let mut reference = BatchKvCache::new(layers);
    let mut next = Vec::new();
    for (r, &len) in prompt_lens.iter().enumerate() {
        let ids: Vec<i64> = (0..len).map(|i| ((i * 7 + r * 13 + 1) % vocab) as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, len]), &device);
        let mut cache = KvCache::new(layers);
        let logits = host(model.forward_next(ids, &mut cache));
        next.push(argmax(&logits));
        fused.join(cache.clone());
        reference.join(cache);
    }
    let before = newt_kernels::decode::fused_steps();
    let (mut max_err, mut agree) = (0f32, 0);
    let (mut fused_s, mut reference_s, mut timed) = (0.0, 0.0, 0);
    let mut kernel_times = Vec::new();
    for step in 0..steps {
        set_reference_paths(&[]);
        let t = Instant::now();
        let f = host(model.forward_rows(&next, &mut fused));
        let f_s = t.elapsed().as_secs_f64();
        set_reference_paths(&[FastPath::DecodeStep]);
        let t = Instant::now();
        let r = host(model.forward_rows(&next, &mut reference));
        let r_s = t.elapsed().as_secs_f64();
        if step >= 2 {
            (fused_s, reference_s, timed) = (fused_s + f_s, reference_s + r_s, timed + 1);
            // The previous fused step's (read when this one started).
            kernel_times.extend(newt_kernels::decode::last_step_timing());
        }
        let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
        let err = f.iter().zip(&r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        max_err = max_err.max(err);
        next.clear();
        for (fr, rr) in f.chunks_exact(vocab).zip(r.chunks_exact(vocab)) {
            let token = argmax(rr);
            agree += usize::from(argmax(fr) == token);
            next.push(token);
        }
    }
    set_reference_paths(&[]);
    let per = |s: f64| if timed > 0 { 1e3 * s / timed as f64 } else { f64::NAN };
    DecodeComparison {
        rows: prompt_lens.len(),
        steps,
        fused_steps: newt_kernels::decode::fused_steps() - before,
        max_rel_err: max_err,
        argmax_agree: agree,
        fused_ms: per(fused_s),
        reference_ms: per(reference_s),
        launch_us: mean(kernel_times.iter().map(|t| t.0)),
        gpu_us: mean(kernel_times.iter().map(|t| t.1)),
    }
}

fn mean(v: impl ExactSizeIterator<Item = f64>) -> Option<f64> {
    let n = v.len();
    (n > 0).then(|| v.sum::<f64>() / n as f64)
}

fn host<B: KernelBackend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().expect("f32 logits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_fused_step_both_paths_are_the_layers_and_agree_exactly() {
        // The CPU backend has no decoding step: the comparison must say so (no fused steps) and
        // find both runs identical, every greedy token agreeing.
        let dir = tempfile::tempdir().unwrap();
        let spec = crate::tiny::TinySpec { vocab_size: 300, ..Default::default() };
        let texts = ["one two three four five six seven eight nine ten"; 8];
        crate::tiny::write_tiny_model(dir.path(), &spec, &texts).unwrap();
        let model = Llama::<burn::backend::Flex>::from_hf_dir(dir.path(), &Default::default()).unwrap();
        let c = compare_decode(&model, &[3, 9], 4);
        assert_eq!((c.rows, c.steps, c.fused_steps), (2, 4, 0));
        assert_eq!(c.max_rel_err, 0.0);
        assert_eq!(c.argmax_agree, 8);
        assert!(c.fused_ms.is_finite() && c.reference_ms.is_finite());
        assert_eq!((c.launch_us, c.gpu_us), (None, None));
    }
}
