//! The generation worker: one thread owns the model and takes jobs from a bounded queue, one at
//! a time; each job streams its events back to the request that queued it. A request whose
//! client went away (its receiver dropped) is skipped if still queued and stopped at the next
//! token if running.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Its text.
    pub content: String,
}

/// What to continue: a conversation (through the pipeline's chat template) or raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Rendered by the chat template, with the generation prompt added.
    Chat(Vec<Message>),
    /// Tokenized as it is (the tokenizer's own BOS added, as transformers does).
    Text(String),
}

/// How to sample.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Most tokens to generate (the worker lowers it to what the context leaves).
    pub max_tokens: usize,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling; 1 disables.
    pub top_p: f32,
    /// Seed of the sampling RNG.
    pub seed: u64,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Go on past the model's end-of-turn tokens (vLLM's `ignore_eos`, for benchmarks).
    pub ignore_eos: bool,
}

/// Why an answer ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    /// `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Why it ended.
    pub reason: FinishReason,
}

/// The model behind the server.
pub trait Engine {
    /// The model's context length in tokens (prompt and answer together).
    fn context_len(&self) -> usize;
    /// The prompt's tokens for model `model` (an index into the server's model names); an
    /// error is the client's (a template that refuses the messages, say).
    fn tokenize(&self, model: usize, prompt: &Prompt) -> Result<Vec<u32>, String>;
    /// Generates after `prompt`, calling `on_token` with each token's text (empty while a
    /// character is incomplete) until it returns false, a stop token, or `params.max_tokens`.
    fn generate(
        &mut self,
        model: usize,
        prompt: &[u32],
        params: &GenParams,
        on_token: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Finish, String>;
}

/// What the worker tells the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Accepted: generation starts; the prompt's length.
    Started { prompt_tokens: usize },
    /// More of the answer.
    Text(String),
    /// The end.
    Done(Finish),
    /// Refused or failed: status code and message.
    Error { status: u16, message: String },
}

/// A request for the worker.
#[derive(Debug)]
pub struct Job {
    /// Index into the server's model names.
    pub model: usize,
    /// What to continue.
    pub prompt: Prompt,
    /// How.
    pub params: GenParams,
    /// Where events go; dropped by the request when its client disconnects.
    pub events: mpsc::UnboundedSender<Event>,
}

/// Counters shown by `/health`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Jobs waiting in the queue.
    pub queued: AtomicU64,
    /// Jobs that ran to their end.
    pub completed: AtomicU64,
    /// Jobs dropped or stopped because their client went away.
    pub cancelled: AtomicU64,
    /// Jobs refused by the worker (prompt too long, template error).
    pub refused: AtomicU64,
    /// Tokens generated, all jobs.
    pub tokens: AtomicU64,
}

impl Stats {
    /// The counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "queued": g(&self.queued),
            "completed": g(&self.completed),
            "cancelled": g(&self.cancelled),
            "refused": g(&self.refused),
            "tokens": g(&self.tokens),
        })
    }
}

/// Serves jobs until every sender of `jobs` is gone.
pub fn run_worker(engine: &mut dyn Engine, mut jobs: mpsc::Receiver<Job>, stats: &Stats) {
    while let Some(job) = jobs.blocking_recv() {
        stats.queued.fetch_sub(1, Ordering::Relaxed);
        run_job(engine, job, stats);
    }
}

fn run_job(engine: &mut dyn Engine, job: Job, stats: &Stats) {
    let events = &job.events;
    if events.is_closed() {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let refuse = |status: u16, message: String| {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = events.send(Event::Error { status, message });
    };
    let prompt = match engine.tokenize(job.model, &job.prompt) {
        Ok(p) => p,
        Err(e) => return refuse(400, e),
    };
    let context = engine.context_len();
    if prompt.is_empty() {
        return refuse(400, "the prompt is empty".into());
    }
    if prompt.len() >= context {
        return refuse(
            400,
            format!(
                "this model's maximum context length is {context} tokens; the prompt is {} tokens, \
                 which leaves no room for an answer: shorten the messages",
                prompt.len()
            ),
        );
    }
    let mut params = job.params.clone();
    params.max_tokens = params.max_tokens.min(context - prompt.len());
    if events.send(Event::Started { prompt_tokens: prompt.len() }).is_err() {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut stops = StopStrings::new(params.stop.clone());
    let mut gone = false;
    let mut stopped = false;
    let result = engine.generate(job.model, &prompt, &params, &mut |piece: &str| {
        stats.tokens.fetch_add(1, Ordering::Relaxed);
        let (text, hit) = stops.push(piece);
        if (!text.is_empty() && events.send(Event::Text(text)).is_err()) || events.is_closed() {
            gone = true;
            return false;
        }
        stopped = hit;
        !hit
    });
    if gone {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match result {
        Ok(mut finish) => {
            if stopped {
                finish.reason = FinishReason::Stop;
            } else {
                let rest = stops.finish();
                if !rest.is_empty() {
                    let _ = events.send(Event::Text(rest));
                }
            }
            stats.completed.fetch_add(1, Ordering::Relaxed);
            let _ = events.send(Event::Done(finish));
        }
        Err(e) => {
            let _ = events.send(Event::Error { status: 500, message: format!("generation failed: {e}") });
        }
    }
}

/// Holds back the text that may be the start of a stop string, and cuts the answer where one
/// appears.
#[derive(Debug)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    /// Watches for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds `piece`; returns the text safe to send now, and whether a stop string was reached
    /// (the text then ends just before it).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.held), false);
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return (text, true);
        }
        // The earliest position from which the rest could still grow into a stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.held[i..])))
            .unwrap_or(self.held.len());
        let text = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (text, false)
    }

    /// What is still held at the end (it never became a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_hold_back_a_possible_start_and_cut_at_the_match() {
        let mut s = StopStrings::new(vec!["###".into(), "END".into()]);
        assert_eq!(s.push("Hello #"), ("Hello ".to_string(), false));
        assert_eq!(s.push("# x"), ("## x".to_string(), false));
        assert_eq!(s.push(" E"), (" ".to_string(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("D and more"), (String::new(), true));
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("a\n"), ("a".to_string(), false));
        assert_eq!(s.push("b"), ("\nb".to_string(), false));
        assert_eq!(s.finish(), "");
        let mut s = StopStrings::new(vec!["é!".into()]);
        assert_eq!(s.push("caf"), ("caf".to_string(), false));
        assert_eq!(s.push("é"), (String::new(), false));
        assert_eq!(s.finish(), "é");
    }

    /// Counts up from the prompt's last token, one character a token.
    struct Counter {
        context: usize,
    }

    impl Engine for Counter {
        fn context_len(&self) -> usize {
            self.context
        }
        fn tokenize(&self, _: usize, prompt: &Prompt) -> Result<Vec<u32>, String> {
            match prompt {
                Prompt::Text(t) => Ok(t.bytes().map(u32::from).collect()),
                Prompt::Chat(_) => Err("no template".into()),
            }
        }
        fn generate(
            &mut self,
            _: usize,
            prompt: &[u32],
            params: &GenParams,
            on_token: &mut dyn FnMut(&str) -> bool,
        ) -> Result<Finish, String> {
            let mut n = 0;
            while n < params.max_tokens {
                n += 1;
                let c = char::from(b'0' + ((prompt[prompt.len() - 1] as usize + n) % 10) as u8);
                if !on_token(&c.to_string()) {
                    return Ok(Finish { completion_tokens: n, reason: FinishReason::Stop });
                }
            }
            Ok(Finish { completion_tokens: n, reason: FinishReason::Length })
        }
    }

    fn run(engine: &mut Counter, prompt: Prompt, max_tokens: usize, stop: &[&str]) -> Vec<Event> {
        let (tx, rx) = mpsc::channel(4);
        let (etx, mut erx) = mpsc::unbounded_channel();
        let params = GenParams {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        };
        let stats = Stats::default();
        stats.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Job { model: 0, prompt, params, events: etx }).unwrap();
        drop(tx);
        run_worker(engine, rx, &stats);
        let mut out = Vec::new();
        while let Ok(e) = erx.try_recv() {
            out.push(e);
        }
        out
    }

    #[test]
    fn the_worker_streams_cuts_at_stop_strings_and_bounds_by_the_context() {
        let mut e = Counter { context: 8 };
        let ev = run(&mut e, Prompt::Text("0".into()), 100, &[]);
        // '0' is byte 48: tokens continue from 8 % 10; the context leaves 7 tokens.
        let text: String =
            ev.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect();
        assert_eq!(text, "9012345");
        assert_eq!(ev[0], Event::Started { prompt_tokens: 1 });
        assert_eq!(ev.last().unwrap(), &Event::Done(Finish { completion_tokens: 7, reason: FinishReason::Length }));
        let ev = run(&mut e, Prompt::Text("0".into()), 100, &["23"]);
        let text: String =
            ev.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect();
        assert_eq!(text, "901");
        assert!(matches!(ev.last().unwrap(), Event::Done(Finish { reason: FinishReason::Stop, .. })));
        let ev = run(&mut e, Prompt::Text("01234567".into()), 100, &[]);
        assert!(
            matches!(&ev[..], [Event::Error { status: 400, message }] if message.contains("maximum context length is 8"))
        );
        let ev = run(&mut e, Prompt::Chat(vec![]), 100, &[]);
        assert_eq!(ev, vec![Event::Error { status: 400, message: "no template".into() }]);
    }

    #[test]
    fn a_job_whose_client_left_is_skipped_or_stopped() {
        let (tx, rx) = mpsc::channel(4);
        let stats = Stats::default();
        let params =
            GenParams { max_tokens: 1000, temperature: 0.0, top_p: 1.0, seed: 0, stop: vec![], ignore_eos: false };
        // Left while queued.
        let (etx, erx) = mpsc::unbounded_channel();
        drop(erx);
        stats.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Job { model: 0, prompt: Prompt::Text("a".into()), params: params.clone(), events: etx }).unwrap();
        // Leaves after the fifth token: the engine is told to stop at the next one.
        struct Leaving {
            inner: Counter,
            seen: usize,
            rx: Option<mpsc::UnboundedReceiver<Event>>,
        }
        impl Engine for Leaving {
            fn context_len(&self) -> usize {
                self.inner.context_len()
            }
            fn tokenize(&self, m: usize, p: &Prompt) -> Result<Vec<u32>, String> {
                self.inner.tokenize(m, p)
            }
            fn generate(
                &mut self,
                m: usize,
                p: &[u32],
                params: &GenParams,
                on_token: &mut dyn FnMut(&str) -> bool,
            ) -> Result<Finish, String> {
                let seen = &mut self.seen;
                let rx = &mut self.rx;
                self.inner.generate(m, p, params, &mut |t| {
                    *seen += 1;
                    if *seen == 5 {
                        *rx = None;
                    }
                    on_token(t)
                })
            }
        }
        let (etx, erx) = mpsc::unbounded_channel();
        stats.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Job { model: 0, prompt: Prompt::Text("a".into()), params, events: etx }).unwrap();
        drop(tx);
        let mut leaving = Leaving { inner: Counter { context: 1 << 20 }, seen: 0, rx: Some(erx) };
        run_worker(&mut leaving, rx, &stats);
        assert_eq!(leaving.seen, 5, "generation stops at the token after the client left");
        assert_eq!(stats.cancelled.load(Ordering::Relaxed), 2);
        assert_eq!(stats.completed.load(Ordering::Relaxed), 0);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    }
}
