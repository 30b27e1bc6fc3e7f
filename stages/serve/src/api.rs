//! The HTTP handlers: OpenAI's schemas in, OpenAI's schemas (or their SSE chunks) out, errors
//! as OpenAI's `{"error": {...}}` objects.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::AppState;
use crate::worker::{Event, Finish, GenParams, Job, Message, Prompt};

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, code: None, param: None }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    fn param(mut self, p: &'static str) -> Self {
        self.param = Some(p);
        self
    }
    fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn authorize(s: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.config.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compared in time independent of where the first difference lies.
    let same = given.is_some_and(|g| {
        g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            if given.is_some() {
                "incorrect API key provided"
            } else {
                "this server needs an API key: send `Authorization: Bearer <key>`"
            },
        )
        .code("invalid_api_key"))
    }
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("the request body is not valid: {e}")))
}

fn pick_model(s: &AppState, name: Option<&str>) -> Result<(usize, String), ApiError> {
    let models = &s.config.models;
    match name {
        None | Some("") => Ok((0, models[0].clone())),
        Some(n) => match models.iter().position(|m| m == n) {
            Some(i) => Ok((i, n.to_string())),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("the model `{n}` does not exist; this server has: {}", models.join(", ")),
            )
            .param("model")
            .code("model_not_found")),
        },
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// What both endpoints share.
#[derive(Deserialize)]
struct Sampling {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    seed: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
    /// vLLM's extension: generate past end-of-turn tokens.
    #[serde(default)]
    ignore_eos: bool,
}

static SEQ: AtomicU64 = AtomicU64::new(1);

impl Sampling {
    fn params(&self, default_max_tokens: usize) -> Result<GenParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::bad(format!("n is {n}: this server makes one choice per request")).param("n"));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => default_max_tokens,
            Some(m) if m >= 1 => m as usize,
            Some(m) => {
                return Err(ApiError::bad(format!("max_tokens is {m}: it must be at least 1")).param("max_tokens"));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(
                ApiError::bad(format!("temperature is {temperature}: it must lie in [0, 2]")).param("temperature")
            );
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad(format!("top_p is {top_p}: it must lie in (0, 1]")).param("top_p"));
        }
        let stop = self.stop.as_ref().map(OneOrMany::to_vec).unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::bad(format!("stop has {} strings: at most 4", stop.len())).param("stop"));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                t.as_nanos() as u64 ^ SEQ.fetch_add(1, Ordering::Relaxed).rotate_left(32)
            }
        };
        Ok(GenParams { max_tokens, temperature, top_p, seed, stop, ignore_eos: self.ignore_eos })
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: OneOrMany,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    sampling: Sampling,
}

fn messages(input: Vec<InMessage>) -> Result<Vec<Message>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::bad("messages is empty: send at least one message").param("messages"));
    }
    let mut out = Vec::new();
    for (i, m) in input.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}].role is `{other}`: this server takes system, user and assistant messages"
                ))
                .param("messages"));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad(format!(
                                "messages[{i}] has a `{kind}` part: this server reads text only"
                            ))
                            .param("messages"));
                        }
                    }
                }
                text
            }
        };
        out.push(Message { role: role.to_string(), content });
    }
    Ok(out)
}

/// Queues a job and waits for the worker to accept it (the prompt's length) or refuse it.
async fn submit(
    s: &AppState,
    model: usize,
    prompt: Prompt,
    params: GenParams,
) -> Result<(mpsc::UnboundedReceiver<Event>, usize), ApiError> {
    let (events, mut rx) = mpsc::unbounded_channel();
    s.stats.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = s.jobs.try_send(Job { model, prompt, params, events }) {
        s.stats.queued.fetch_sub(1, Ordering::Relaxed);
        let message = match e {
            mpsc::error::TrySendError::Full(_) => "the server is busy: its request queue is full; retry shortly",
            mpsc::error::TrySendError::Closed(_) => "the generation worker has stopped",
        };
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message));
    }
    match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => Ok((rx, prompt_tokens)),
        Some(Event::Error { status, message }) => Err(ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            if status < 500 { "invalid_request_error" } else { "server_error" },
            message,
        )),
        _ => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the generation worker stopped")),
    }
}

/// Waits for the whole answer.
async fn collect(rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<(String, Finish), ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(f)) => return Ok((text, f)),
            Some(Event::Error { message, .. }) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message));
            }
            Some(Event::Started { .. }) => {}
            None => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the generation stopped"));
            }
        }
    }
}

fn usage(prompt: usize, f: &Finish) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": f.completion_tokens, "total_tokens": prompt + f.completion_tokens})
}

fn new_id(prefix: &str) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{prefix}-{:x}{:04x}", t.as_micros(), SEQ.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

/// Which of OpenAI's two streaming shapes.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// The chunks of a streamed answer: (for chat) the role, the text as it comes, the finish
/// reason, usage when asked, `[DONE]`. Dropping the stream (the client left) drops the event
/// receiver, which stops the worker.
fn stream_answer(
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    include_usage: bool,
    rx: mpsc::UnboundedReceiver<Event>,
) -> Response {
    enum Phase {
        Role,
        Body,
        Usage(Finish),
        Done,
        End,
    }
    let chunk = move |choices: Value, usage: Option<Value>| {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Text => "text_completion",
        };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    let choice = move |text: Option<&str>, finish: Option<&str>| match kind {
        Kind::Chat => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
        }
        Kind::Text => json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}]),
    };
    let first = match kind {
        Kind::Chat => Phase::Role,
        Kind::Text => Phase::Body,
    };
    let stream = futures::stream::unfold((rx, first), move |(mut rx, phase)| {
        let chunk = chunk.clone();
        async move {
            let (event, next) = match phase {
                Phase::End => return None,
                Phase::Role => (
                    chunk(
                        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
                        None,
                    ),
                    Phase::Body,
                ),
                Phase::Body => match rx.recv().await {
                    Some(Event::Text(t)) => (chunk(choice(Some(&t), None), None), Phase::Body),
                    Some(Event::Done(f)) => {
                        let next = if include_usage { Phase::Usage(f) } else { Phase::Done };
                        (chunk(choice(None, Some(f.reason.as_str())), None), next)
                    }
                    Some(Event::Error { message, .. }) => (
                        SseEvent::default().data(
                            json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})
                                .to_string(),
                        ),
                        Phase::End,
                    ),
                    Some(Event::Started { .. }) => (SseEvent::default().comment(""), Phase::Body),
                    None => return None,
                },
                Phase::Usage(f) => (chunk(json!([]), Some(usage(prompt_tokens, &f))), Phase::Done),
                Phase::Done => (SseEvent::default().data("[DONE]"), Phase::End),
            };
            Some((Ok::<_, Infallible>(event), (rx, next)))
        }
    });
    Sse::new(stream).into_response()
}

pub(crate) async fn chat_completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    chat_inner(&s, &headers, &body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_inner(s: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    authorize(s, headers)?;
    let req: ChatRequest = parse(body)?;
    let (model, name) = pick_model(s, req.sampling.model.as_deref())?;
    let params = req.sampling.params(s.config.default_max_tokens)?;
    let msgs = messages(req.messages)?;
    let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (mut rx, prompt_tokens) = submit(s, model, Prompt::Chat(msgs), params).await?;
    let id = new_id("chatcmpl");
    if req.sampling.stream {
        return Ok(stream_answer(Kind::Chat, id, name, s.created, prompt_tokens, include_usage, rx));
    }
    let (text, finish) = collect(&mut rx).await?;
    Ok(axum::Json(json!({
        "id": id, "object": "chat.completion", "created": s.created, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": null, "finish_reason": finish.reason.as_str()}],
        "usage": usage(prompt_tokens, &finish),
    }))
    .into_response())
}

pub(crate) async fn completions(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    completions_inner(&s, &headers, &body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions_inner(s: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    authorize(s, headers)?;
    let req: CompletionRequest = parse(body)?;
    let (model, name) = pick_model(s, req.sampling.model.as_deref())?;
    let params = req.sampling.params(s.config.default_max_tokens)?;
    let prompt = match req.prompt.to_vec() {
        v if v.len() == 1 => v.into_iter().next().unwrap_or_default(),
        v => {
            return Err(ApiError::bad(format!(
                "prompt is a list of {}: this server takes one prompt a request",
                v.len()
            ))
            .param("prompt"));
        }
    };
    if req.echo && req.sampling.stream {
        return Err(ApiError::bad("echo with stream is not supported").param("echo"));
    }
    let include_usage = req.sampling.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let (mut rx, prompt_tokens) = submit(s, model, Prompt::Text(prompt.clone()), params).await?;
    let id = new_id("cmpl");
    if req.sampling.stream {
        return Ok(stream_answer(Kind::Text, id, name, s.created, prompt_tokens, include_usage, rx));
    }
    let (text, finish) = collect(&mut rx).await?;
    let text = if req.echo { format!("{prompt}{text}") } else { text };
    Ok(axum::Json(json!({
        "id": id, "object": "text_completion", "created": s.created, "model": name,
        "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish.reason.as_str()}],
        "usage": usage(prompt_tokens, &finish),
    }))
    .into_response())
}

pub(crate) async fn models(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s, &headers) {
        return e.into_response();
    }
    let base = &s.config.models[s.config.models.len() - 1];
    let data: Vec<Value> = s
        .config
        .models
        .iter()
        .map(|m| {
            let parent = if m == base { Value::Null } else { Value::String(base.clone()) };
            json!({"id": m, "object": "model", "created": s.created, "owned_by": "newt", "root": m, "parent": parent})
        })
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn health(State(s): State<Arc<AppState>>) -> Response {
    let mut v = json!({"status": "ok", "models": s.config.models, "auth": s.config.api_key.is_some()});
    if let (Value::Object(o), Value::Object(stats)) = (&mut v, s.stats.json()) {
        o.extend(stats);
    }
    axum::Json(v).into_response()
}

const PAGE: &str = include_str!("page.html");

pub(crate) async fn page(State(s): State<Arc<AppState>>) -> Response {
    let settings = json!({
        "title": s.config.page.title,
        "models": s.config.models,
        "max_new_tokens": s.config.page.max_new_tokens,
        "temperature": s.config.page.temperature,
        "auth": s.config.api_key.is_some(),
    });
    // Safe inside <script>: no `<` survives to close the element.
    let settings = settings.to_string().replace('<', "\\u003c");
    let title = s.config.page.title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let html = PAGE.replace("__NEWT_TITLE__", &title).replace("__NEWT_SETTINGS__", &settings);
    let mut r = Html(html).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) async fn not_found() -> Response {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "no such route").into_response()
}
