//! The model behind `newt serve`: the base model and, when there is one, base + adapter (the two
//! share the frozen weights: the adapter model is a clone of the base, whose tensors are
//! reference-counted, with the adapter attached), prompted as the pipeline trained them.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use newt_config::Backend as BackendChoiceKey;
use newt_config::params::EvaluateParams;
use newt_model::backend::{self, KernelBackend, WithBackend};
use newt_model::generate::{ChatMessage, SamplingConfig, StopReason, TextStream};
use newt_model::llama::Llama;
use newt_serve::{Engine, Finish, FinishReason, GenParams, Job, Prompt, Stats};
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
            Ok(BurnEngine { models, prompting })
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

    fn generate(
        &mut self,
        model: usize,
        prompt: &[u32],
        params: &GenParams,
        on_token: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Finish, String> {
        let sampling = SamplingConfig {
            max_new_tokens: params.max_tokens,
            temperature: params.temperature,
            top_p: params.top_p,
            seed: params.seed,
            stop_token_ids: if params.ignore_eos { Vec::new() } else { self.prompting.stop_token_ids.clone() },
            ..Default::default()
        };
        let llama = self.models.get(model).ok_or_else(|| format!("no model {model}"))?;
        let tok = self.prompting.tokenizer.as_ref();
        let mut stream = TextStream::new(tok);
        // A failure inside the backend must not take the server down with it.
        let g = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            newt_model::generate::generate(llama, prompt, &sampling, |t| {
                let piece = stream.push(t).unwrap_or_default();
                if on_token(&piece) { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
            })
        }))
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend panicked".into())
        })?;
        let reason = match g.stop {
            StopReason::StopToken(_) | StopReason::Interrupted => FinishReason::Stop,
            StopReason::MaxNewTokens | StopReason::ContextFull => FinishReason::Length,
        };
        Ok(Finish { completion_tokens: g.tokens.len(), reason })
    }
}
