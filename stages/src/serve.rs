//! The model behind `newt serve`: the base model and, when there is one, base + adapter (the two
//! share the frozen weights: the adapter model is a clone of the base, whose tensors are
//! reference-counted, with the adapter attached), prompted as the pipeline trained them.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Int, TensorData};
use newt_config::Backend as BackendChoiceKey;
use newt_config::params::EvaluateParams;
use newt_model::backend::{self, KernelBackend, WithBackend};
use newt_model::generate::{ChatMessage, Sampler, SamplingConfig, TextPieces};
use newt_model::llama::{BatchKvCache, KvCache, Llama};
use newt_serve::{Engine, GenParams, Job, Prompt, Stats, Step};
use tokio::sync::mpsc;

use crate::model::{Prompting, backend_of, load_model, quant_code};

/// What the worker serves.
pub struct Models<'a> {
    /// The base model's folder.
    pub model: &'a Path,
    /// The pipeline's quantized base (`quantize.model`), when it has one.
    pub quantized: Option<&'a Path>,
    /// A PEFT adapter folder, served as a second model (listed first, the default).
    pub adapter: Option<&'a Path>,
    /// Prompt format and quantization, as the pipeline's evaluate stage has them.
    pub params: &'a EvaluateParams,
    /// The pipeline's backend.
    pub backend: BackendChoiceKey,
    /// Requests decoded together (`newt serve --batch`).
    pub max_sequences: usize,
    /// Prompt tokens read a step (`newt serve --prefill-chunk`; 0: a whole prompt at once).
    pub prefill_chunk: usize,
}

/// Loads the models, sends the context length (or the loading error) through `ready`, then
/// serves `jobs` on this thread until their senders are gone.
pub fn run_worker(
    models: Models<'_>,
    jobs: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
    ready: std::sync::mpsc::Sender<anyhow::Result<usize>>,
) {
    let backend = match backend_of(models.backend) {
        Ok(b) => b,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    backend::dispatch(backend, ServeWork { models, jobs, stats, ready })
}

struct ServeWork<'a> {
    models: Models<'a>,
    jobs: mpsc::Receiver<Job>,
    stats: Arc<Stats>,
    ready: std::sync::mpsc::Sender<anyhow::Result<usize>>,
}

impl WithBackend for ServeWork<'_> {
    type Output = ();
    fn run<B: KernelBackend>(self, device: B::Device) {
        let m = &self.models;
        let loaded = (|| -> anyhow::Result<BurnEngine<B>> {
            crate::model::set_kernel_options(m.params.lora_f32, &m.params.reference_kernels);
            let base = load_model::<B>(m.model, None, quant_code(m.params.quantization), m.quantized, &device)?;
            let mut models = Vec::new();
            if let Some(dir) = m.adapter {
                models.push(match newt_model::full::trained_model_dir(dir) {
                    // A full fine-tune: a model of its own beside the base.
                    Some(_) => load_model::<B>(m.model, Some(dir), None, None, &device)?,
                    None => newt_model::peft::load_adapter(base.clone(), dir)?.0,
                });
            }
            models.push(base);
            let prompting = Prompting::of(m.model, m.params)?;
            let batches = models
                .iter()
                .map(|l| Batch { cache: BatchKvCache::new(l.config.num_hidden_layers), rows: Vec::new() })
                .collect();
            Ok(BurnEngine {
                models,
                prompting,
                batches,
                reading: VecDeque::new(),
                max_sequences: m.max_sequences,
                prefill_chunk: m.prefill_chunk,
            })
        })();
        match loaded {
            Err(e) => {
                let _ = self.ready.send(Err(e));
            }
            Ok(mut engine) => {
                let _ = self.ready.send(Ok(engine.context_len()));
                newt_serve::run_worker(&mut engine, self.jobs, &self.stats);
            }
        }
    }
}

struct BurnEngine<B: KernelBackend> {
    /// Adapter model first when there is one, the base last (the server's name order).
    models: Vec<Llama<B>>,
    prompting: Prompting,
    /// The sequences being decoded, one batch per model (an adapter's rows cannot share a
    /// pass with the base's).
    batches: Vec<Batch<B>>,
    /// Prompts being read, oldest first; each step reads the next piece of the oldest, so a long
    /// prompt does not hold up the answers already decoding for the whole of its reading.
    reading: VecDeque<Reading<B>>,
    max_sequences: usize,
    /// Tokens of a prompt read a step (0: the whole prompt).
    prefill_chunk: usize,
}

/// A prompt being read into its own cache; its sequence joins its model's batch once the last
/// piece is read.
struct Reading<B: KernelBackend> {
    id: u64,
    model: usize,
    prompt: Vec<u32>,
    /// Tokens of `prompt` in `cache`.
    read: usize,
    cache: KvCache<B>,
    params: GenParams,
}

/// The sequences of one model decoding together.
struct Batch<B: KernelBackend> {
    cache: BatchKvCache<B>,
    /// Row `r` of the cache.
    rows: Vec<Row>,
}

/// One sequence: how it samples, what it has produced, and the logits its next token comes from.
struct Row {
    id: u64,
    sampler: Sampler,
    history: Vec<u32>,
    logits: Vec<f32>,
    generated: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    text: TextPieces,
}

/// Runs `f`, turning a panic inside the backend into an error: a failure must not take the
/// server down with it.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the backend panicked".into())
    })
}

fn host_logits<B: KernelBackend>(logits: burn::tensor::Tensor<B, 2>) -> Vec<f32> {
    logits.into_data().convert::<f32>().into_vec().expect("f32 logits")
}

impl<B: KernelBackend> BurnEngine<B> {
    /// Reads the next piece of the oldest prompt being read (`prefill_chunk` tokens, or all that
    /// is left); a prompt read to its end joins its model's batch with the logits of its last
    /// token, so its first token is sampled in this step. Every prompt still being read is
    /// reported as [`Step::Reading`].
    fn read_prompts(&mut self) -> Vec<(u64, Step)> {
        let mut out = Vec::new();
        if let Some(mut r) = self.reading.pop_front() {
            let left = r.prompt.len() - r.read;
            let n = if self.prefill_chunk == 0 { left } else { left.min(self.prefill_chunk) };
            let llama = &self.models[r.model];
            let piece = &r.prompt[r.read..r.read + n];
            let cache = &mut r.cache;
            let logits = catch(|| {
                let device = llama.embed_tokens.device();
                let ids: Vec<i64> = piece.iter().map(|&t| t as i64).collect();
                let ids = burn::tensor::Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
                let logits = llama.forward_next(ids, cache);
                // Only the last piece's logits are used: the others stay on the device.
                (n == left).then(|| host_logits(logits))
            });
            r.read += n;
            match logits {
                Err(e) => out.push((r.id, Step::Failed(e))),
                Ok(Some(logits)) => self.join(r, logits),
                Ok(None) => self.reading.push_front(r),
            }
        }
        out.extend(self.reading.iter().map(|r| (r.id, Step::Reading)));
        out
    }

    /// A sequence whose prompt is read joins its model's batch.
    fn join(&mut self, r: Reading<B>, logits: Vec<f32>) {
        let params = &r.params;
        let sampling = SamplingConfig {
            max_new_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed,
            ..Default::default()
        };
        let stop_token_ids = if params.ignore_eos { Vec::new() } else { self.prompting.stop_token_ids.clone() };
        let batch = &mut self.batches[r.model];
        batch.cache.join(r.cache);
        batch.rows.push(Row {
            id: r.id,
            sampler: Sampler::new(sampling),
            history: r.prompt,
            logits,
            generated: 0,
            max_tokens: params.max_tokens,
            stop_token_ids,
            text: TextPieces::default(),
        });
    }
}

impl<B: KernelBackend> Engine for BurnEngine<B> {
    fn context_len(&self) -> usize {
        self.models[0].config.max_position_embeddings
    }

    fn tokenize(&self, _model: usize, prompt: &Prompt) -> Result<Vec<u32>, String> {
        match prompt {
            Prompt::Chat(messages) => {
                let msgs: Vec<ChatMessage> = messages.iter().map(|m| ChatMessage::new(&m.role, &m.content)).collect();
                self.prompting
                    .encode_chat(&msgs)
                    .map_err(|e| format!("the chat template refused these messages: {}", newt_graph::error_chain(&e)))
            }
            Prompt::Text(text) => {
                let ids =
                    self.prompting.tokenizer.encode(text.as_str(), true).map_err(|e| format!("tokenizer: {e}"))?;
                Ok(ids.get_ids().to_vec())
            }
        }
    }

    fn max_sequences(&self) -> usize {
        self.max_sequences
    }

    fn start(&mut self, id: u64, model: usize, prompt: &[u32], params: &GenParams) -> Result<(), String> {
        let llama = self.models.get(model).ok_or_else(|| format!("no model {model}"))?;
        let cache = KvCache::new(llama.config.num_hidden_layers);
        self.reading.push_back(Reading { id, model, prompt: prompt.to_vec(), read: 0, cache, params: params.clone() });
        Ok(())
    }

    fn step(&mut self) -> Vec<(u64, Step)> {
        let mut out = self.read_prompts();
        let context = self.context_len();
        let tok = self.prompting.tokenizer.as_ref();
        for (llama, batch) in self.models.iter().zip(&mut self.batches) {
            // Each row's next token, from the logits of its last step.
            let mut next = Vec::new();
            let mut ended = Vec::new();
            for (r, row) in batch.rows.iter_mut().enumerate() {
                let token = row.sampler.sample(&mut row.logits, &row.history);
                if row.stop_token_ids.contains(&token) {
                    out.push((row.id, Step::Stop));
                    ended.push(r);
                    continue;
                }
                row.history.push(token);
                row.generated += 1;
                let text = row.text.push(tok, token).unwrap_or_default();
                let last = row.generated >= row.max_tokens || row.history.len() >= context;
                out.push((row.id, Step::Token { text, last }));
                if last {
                    ended.push(r);
                } else {
                    next.push(token);
                }
            }
            batch.cache.leave_all(&ended);
            for &r in ended.iter().rev() {
                batch.rows.remove(r);
            }
            if batch.rows.is_empty() {
                continue;
            }
            // The rows that go on, one pass for all of them.
            match catch(|| host_logits(llama.forward_rows(&next, &mut batch.cache))) {
                Ok(logits) => {
                    let vocab = logits.len() / batch.rows.len();
                    for (row, l) in batch.rows.iter_mut().zip(logits.chunks_exact(vocab)) {
                        row.logits = l.to_vec();
                    }
                }
                Err(e) => {
                    // The cache may be half written: every row of the batch fails.
                    for row in batch.rows.drain(..) {
                        out.push((row.id, Step::Failed(e.clone())));
                    }
                    batch.cache = BatchKvCache::new(llama.config.num_hidden_layers);
                }
            }
        }
        out
    }

    fn finish(&mut self, id: u64) {
        self.reading.retain(|r| r.id != id);
        for batch in &mut self.batches {
            if let Some(r) = batch.rows.iter().position(|row| row.id == id) {
                batch.cache.leave(r);
                batch.rows.remove(r);
            }
        }
    }
}
