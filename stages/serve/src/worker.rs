//! The generation worker: one thread owns the model and takes jobs from a bounded queue; up to
//! the engine's number of sequences decode together, one token each per step, and a job queued
//! meanwhile joins them at the next step (the engine may read its prompt over several steps,
//! while the others go on decoding). Each job streams its events back to the request that
//! queued it. A request whose client went away (its receiver dropped) is skipped if still queued
//! and stopped at the next token if running.

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

/// What one decoding step gave a sequence.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A token and its text (empty while a character is incomplete); `last` when the sequence
    /// ends with it (its `max_tokens` reached).
    Token { text: String, last: bool },
    /// The model's stop token (end of turn): the sequence ends without it.
    Stop,
    /// A piece of the prompt was read; no token yet.
    Reading,
    /// The sequence failed; the message says why.
    Failed(String),
}

/// The model behind the server: it decodes the sequences it was given together, one token
/// each per step.
pub trait Engine {
    /// The model's context length in tokens (prompt and answer together).
    fn context_len(&self) -> usize;
    /// The prompt's tokens for model `model` (an index into the server's model names); an
    /// error is the client's (a template that refuses the messages, say).
    fn tokenize(&self, model: usize, prompt: &Prompt) -> Result<Vec<u32>, String>;
    /// How many sequences may be decoding at once (1: one request after another).
    fn max_sequences(&self) -> usize;
    /// Starts sequence `id` of model `model` with `prompt`; the following [`Engine::step`]s read
    /// the prompt (an engine may read a long one a piece a step, [`Step::Reading`], so that the
    /// sequences already decoding go on meanwhile) and then give its tokens. `params.max_tokens`
    /// already fits the context.
    fn start(&mut self, id: u64, model: usize, prompt: &[u32], params: &GenParams) -> Result<(), String>;
    /// Advances every started sequence: one token each, or one more piece of a prompt being read.
    fn step(&mut self) -> Vec<(u64, Step)>;
    /// Forgets sequence `id` (it ended, or its client left); an unknown id is ignored.
    fn finish(&mut self, id: u64);
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

/// Serves jobs until every sender of `jobs` is gone. Up to [`Engine::max_sequences`] jobs
/// decode together: a job queued while others run joins them at the next step.
pub fn run_worker(engine: &mut dyn Engine, mut jobs: mpsc::Receiver<Job>, stats: &Stats) {
    let mut live: Vec<Live> = Vec::new();
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        // New jobs: wait for one when idle, else take one already queued (one a step: admitting
        // tokenizes the prompt, and the running answers go on meanwhile).
        let mut taken = 0;
        while open && live.len() < engine.max_sequences().max(1) && (live.is_empty() || taken == 0) {
            taken += 1;
            let job = if live.is_empty() {
                jobs.blocking_recv()
            } else {
                match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(job) = job else {
                open = false;
                break;
            };
            stats.queued.fetch_sub(1, Ordering::Relaxed);
            next_id += 1;
            live.extend(admit(engine, next_id, job, stats));
        }
        if live.is_empty() {
            if open {
                continue;
            }
            return;
        }
        let steps = engine.step();
        if steps.is_empty() {
            // An engine that advances nothing would spin for ever: its sequences fail.
            for l in live.drain(..) {
                engine.finish(l.id);
                l.fail("the engine stopped advancing this answer");
            }
            continue;
        }
        for (id, step) in steps {
            let Some(i) = live.iter().position(|l| l.id == id) else { continue };
            if live[i].take(step, stats) {
                engine.finish(id);
                live.remove(i);
            }
        }
        // A client that left while its text was held back (a stop string's possible start).
        live.retain(|l| {
            let gone = l.events.is_closed();
            if gone {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                engine.finish(l.id);
            }
            !gone
        });
    }
}

/// A job being answered.
struct Live {
    id: u64,
    events: mpsc::UnboundedSender<Event>,
    stops: StopStrings,
    tokens: usize,
}

impl Live {
    /// Handles one step's outcome; true when the job has ended.
    fn take(&mut self, step: Step, stats: &Stats) -> bool {
        match step {
            Step::Token { text, last } => {
                stats.tokens.fetch_add(1, Ordering::Relaxed);
                self.tokens += 1;
                let (text, hit) = self.stops.push(&text);
                if (!text.is_empty() && self.events.send(Event::Text(text)).is_err()) || self.events.is_closed() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                if hit {
                    self.done(FinishReason::Stop, stats);
                } else if last {
                    self.done(FinishReason::Length, stats);
                }
                hit || last
            }
            Step::Stop => {
                self.done(FinishReason::Stop, stats);
                true
            }
            Step::Reading => false,
            Step::Failed(e) => {
                self.fail(&e);
                true
            }
        }
    }

    /// Sends what the stop strings held back (unless one was hit) and the end.
    fn done(&mut self, reason: FinishReason, stats: &Stats) {
        // Empty after a stop string (the text ends before it).
        let rest = self.stops.finish();
        if !rest.is_empty() {
            let _ = self.events.send(Event::Text(rest));
        }
        stats.completed.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(Event::Done(Finish { completion_tokens: self.tokens, reason }));
    }

    fn fail(&self, e: &str) {
        let _ = self.events.send(Event::Error { status: 500, message: format!("generation failed: {e}") });
    }
}

/// Checks a job and starts its sequence; `None` when it was refused or its client is gone.
fn admit(engine: &mut dyn Engine, id: u64, job: Job, stats: &Stats) -> Option<Live> {
    let events = job.events;
    if events.is_closed() {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let refuse = |status: u16, message: String| {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = events.send(Event::Error { status, message });
        None
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
    let mut params = job.params;
    params.max_tokens = params.max_tokens.min(context - prompt.len());
    if events.send(Event::Started { prompt_tokens: prompt.len() }).is_err() {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let live = Live { id, events, stops: StopStrings::new(params.stop.clone()), tokens: 0 };
    if params.max_tokens == 0 {
        let mut live = live;
        live.done(FinishReason::Length, stats);
        return None;
    }
    match engine.start(id, job.model, &prompt, &params) {
        Ok(()) => Some(live),
        Err(e) => {
            live.fail(&e);
            None
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

    /// Counts up from the prompt's last token, one character a token, every started sequence
    /// a step; reads prompts `chunk` tokens a step, the oldest first (a sequence's first token
    /// comes in the step that reads its prompt's last piece); records each step's outcomes.
    struct Counter {
        context: usize,
        max_sequences: usize,
        chunk: usize,
        /// id, last prompt token, tokens given, max tokens, prompt tokens not yet read.
        seqs: Vec<(u64, u32, usize, usize, usize)>,
        steps: usize,
        log: Vec<Vec<(u64, Step)>>,
    }

    impl Counter {
        fn new(context: usize, max_sequences: usize) -> Self {
            Counter { context, max_sequences, chunk: usize::MAX, seqs: Vec::new(), steps: 0, log: Vec::new() }
        }
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
        fn max_sequences(&self) -> usize {
            self.max_sequences
        }
        fn start(&mut self, id: u64, _: usize, prompt: &[u32], params: &GenParams) -> Result<(), String> {
            assert!(self.seqs.len() < self.max_sequences, "more sequences than the engine takes");
            self.seqs.push((id, prompt[prompt.len() - 1], 0, params.max_tokens, prompt.len()));
            Ok(())
        }
        fn step(&mut self) -> Vec<(u64, Step)> {
            self.steps += 1;
            if let Some(s) = self.seqs.iter_mut().find(|s| s.4 > 0) {
                s.4 -= s.4.min(self.chunk);
            }
            let out: Vec<_> = self
                .seqs
                .iter_mut()
                .map(|(id, last, n, max, unread)| {
                    if *unread > 0 {
                        return (*id, Step::Reading);
                    }
                    *n += 1;
                    let c = char::from(b'0' + ((*last as usize + *n) % 10) as u8);
                    (*id, Step::Token { text: c.to_string(), last: *n >= *max })
                })
                .collect();
            self.log.push(out.clone());
            out
        }
        fn finish(&mut self, id: u64) {
            self.seqs.retain(|s| s.0 != id);
        }
    }

    fn params(max_tokens: usize, stop: &[&str]) -> GenParams {
        GenParams {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ignore_eos: false,
        }
    }

    /// Queues every job, then runs the worker until the queue is closed; each job's events.
    fn run_all(engine: &mut dyn Engine, jobs: Vec<(Prompt, GenParams)>) -> Vec<Vec<Event>> {
        let (tx, rx) = mpsc::channel(jobs.len().max(1));
        let stats = Stats::default();
        let mut receivers = Vec::new();
        for (prompt, params) in jobs {
            let (etx, erx) = mpsc::unbounded_channel();
            stats.queued.fetch_add(1, Ordering::Relaxed);
            tx.try_send(Job { model: 0, prompt, params, events: etx }).unwrap();
            receivers.push(erx);
        }
        drop(tx);
        run_worker(engine, rx, &stats);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
        receivers
            .into_iter()
            .map(|mut erx| {
                let mut out = Vec::new();
                while let Ok(e) = erx.try_recv() {
                    out.push(e);
                }
                out
            })
            .collect()
    }

    fn run(engine: &mut Counter, prompt: Prompt, max_tokens: usize, stop: &[&str]) -> Vec<Event> {
        run_all(engine, vec![(prompt, params(max_tokens, stop))]).remove(0)
    }

    fn text(events: &[Event]) -> String {
        events.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect()
    }

    #[test]
    fn the_worker_streams_cuts_at_stop_strings_and_bounds_by_the_context() {
        let mut e = Counter::new(8, 1);
        let ev = run(&mut e, Prompt::Text("0".into()), 100, &[]);
        // '0' is byte 48: tokens continue from 8 % 10; the context leaves 7 tokens.
        assert_eq!(text(&ev), "9012345");
        assert_eq!(ev[0], Event::Started { prompt_tokens: 1 });
        assert_eq!(ev.last().unwrap(), &Event::Done(Finish { completion_tokens: 7, reason: FinishReason::Length }));
        let ev = run(&mut e, Prompt::Text("0".into()), 100, &["23"]);
        assert_eq!(text(&ev), "901");
        assert!(matches!(ev.last().unwrap(), Event::Done(Finish { reason: FinishReason::Stop, .. })));
        // A possible start of a stop string that never completes is sent at the end.
        let ev = run(&mut e, Prompt::Text("0".into()), 3, &["12"]);
        assert_eq!(text(&ev), "901");
        let ev = run(&mut e, Prompt::Text("01234567".into()), 100, &[]);
        assert!(
            matches!(&ev[..], [Event::Error { status: 400, message }] if message.contains("maximum context length is 8"))
        );
        let ev = run(&mut e, Prompt::Chat(vec![]), 100, &[]);
        assert_eq!(ev, vec![Event::Error { status: 400, message: "no template".into() }]);
        assert!(e.seqs.is_empty(), "every sequence was finished: {:?}", e.seqs);
    }

    /// Three jobs, two decoding at a time: the first two advance together, the third joins when
    /// the first ends; every answer is what it is alone, in fewer steps than one by one.
    #[test]
    fn queued_jobs_decode_together_and_join_as_others_end() {
        let jobs = || {
            vec![
                (Prompt::Text("0".into()), params(3, &[])),
                (Prompt::Text("5".into()), params(5, &[])),
                (Prompt::Text("2".into()), params(2, &[])),
            ]
        };
        let mut alone = Counter::new(100, 1);
        let one_by_one = run_all(&mut alone, jobs());
        assert_eq!(alone.steps, 10);
        let mut two = Counter::new(100, 2);
        let together = run_all(&mut two, jobs());
        assert_eq!(together, one_by_one);
        // One job joins a step: the first alone for a step, the second beside it for two, the
        // third beside the second once the first is done, the second alone at the end.
        assert_eq!(two.steps, 6);
        assert_eq!(
            together.iter().map(|ev| text(ev)).collect::<Vec<_>>(),
            vec!["901".to_string(), "45678".into(), "12".into()]
        );
        let mut eight = Counter::new(100, 8);
        assert_eq!(run_all(&mut eight, jobs()), one_by_one);
        assert_eq!(eight.steps, 6, "joined at steps 1, 2 and 3; the second (5 tokens) ends at 6");
    }

    /// A prompt read a piece a step: the answer already decoding gets a token every step
    /// meanwhile, the reading sends nothing, and both answers are what they are alone.
    #[test]
    fn a_long_prompt_is_read_a_piece_a_step_while_the_others_decode() {
        let jobs =
            || vec![(Prompt::Text("0".into()), params(6, &[])), (Prompt::Text("0123456789".into()), params(2, &[]))];
        let one_by_one = run_all(&mut Counter::new(100, 1), jobs());
        let mut e = Counter::new(100, 2);
        e.chunk = 4;
        let together = run_all(&mut e, jobs());
        assert_eq!(together, one_by_one);
        assert_eq!(text(&together[1]), "89");
        let kinds: Vec<Vec<(u64, &str)>> = e
            .log
            .iter()
            .map(|step| {
                step.iter().map(|(id, s)| (*id, if matches!(s, Step::Reading) { "read" } else { "token" })).collect()
            })
            .collect();
        // Step 1: the first job's prompt (one token) read and its first token. The second job
        // joins at step 2; its 10 tokens take steps 2, 3 (4 each) and 4 (the last 2, and its
        // first token), while the first job's tokens go on.
        assert_eq!(
            kinds,
            vec![
                vec![(1, "token")],
                vec![(1, "token"), (2, "read")],
                vec![(1, "token"), (2, "read")],
                vec![(1, "token"), (2, "token")],
                vec![(1, "token"), (2, "token")],
                vec![(1, "token")],
            ]
        );
    }

    #[test]
    fn a_job_whose_client_left_is_skipped_or_stopped() {
        let (tx, rx) = mpsc::channel(4);
        let stats = Stats::default();
        let params = params(1000, &[]);
        // Left while queued.
        let (etx, erx) = mpsc::unbounded_channel();
        drop(erx);
        stats.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Job { model: 0, prompt: Prompt::Text("a".into()), params: params.clone(), events: etx }).unwrap();
        // Leaves after the fifth token: the engine is told to forget it at once.
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
            fn max_sequences(&self) -> usize {
                self.inner.max_sequences()
            }
            fn start(&mut self, id: u64, m: usize, p: &[u32], params: &GenParams) -> Result<(), String> {
                self.inner.start(id, m, p, params)
            }
            fn step(&mut self) -> Vec<(u64, Step)> {
                let steps = self.inner.step();
                self.seen += steps.len();
                if self.seen == 5 {
                    self.rx = None;
                }
                steps
            }
            fn finish(&mut self, id: u64) {
                self.inner.finish(id)
            }
        }
        let (etx, erx) = mpsc::unbounded_channel();
        stats.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(Job { model: 0, prompt: Prompt::Text("a".into()), params, events: etx }).unwrap();
        drop(tx);
        let mut leaving = Leaving { inner: Counter::new(1 << 20, 4), seen: 0, rx: Some(erx) };
        run_worker(&mut leaving, rx, &stats);
        assert_eq!(leaving.seen, 5, "generation stops at the token after the client left");
        assert!(leaving.inner.seqs.is_empty());
        assert_eq!(stats.cancelled.load(Ordering::Relaxed), 2);
        assert_eq!(stats.completed.load(Ordering::Relaxed), 0);
        assert_eq!(stats.queued.load(Ordering::Relaxed), 0);
    }

    /// An engine that fails a sequence, or advances none, fails its requests with a 500 rather
    /// than hanging the worker.
    #[test]
    fn a_failing_engine_fails_its_requests() {
        struct Broken(Counter, bool);
        impl Engine for Broken {
            fn context_len(&self) -> usize {
                100
            }
            fn tokenize(&self, m: usize, p: &Prompt) -> Result<Vec<u32>, String> {
                self.0.tokenize(m, p)
            }
            fn max_sequences(&self) -> usize {
                2
            }
            fn start(&mut self, id: u64, m: usize, p: &[u32], params: &GenParams) -> Result<(), String> {
                self.0.start(id, m, p, params)
            }
            fn step(&mut self) -> Vec<(u64, Step)> {
                if self.1 {
                    Vec::new()
                } else {
                    self.0.seqs.iter().map(|s| (s.0, Step::Failed("boom".into()))).collect()
                }
            }
            fn finish(&mut self, id: u64) {
                self.0.finish(id)
            }
        }
        for silent in [false, true] {
            let mut e = Broken(Counter::new(100, 2), silent);
            let out = run_all(&mut e, vec![(Prompt::Text("0".into()), params(4, &[])); 3]);
            for ev in out {
                assert!(
                    matches!(&ev[..], [Event::Started { .. }, Event::Error { status: 500, message }] if message.starts_with("generation failed")),
                    "{ev:?}"
                );
            }
            assert!(e.0.seqs.is_empty());
        }
    }
}
