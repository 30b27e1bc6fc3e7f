//! `newt serve`: an OpenAI-compatible HTTP server over one generation worker, and a chat page.
//!
//! Routes: `POST /v1/chat/completions` and `POST /v1/completions` (OpenAI's request and
//! response schemas; `stream: true` answers as server-sent events of `chat.completion.chunk` /
//! `text_completion` objects ending with `data: [DONE]`), `GET /v1/models` (the base model and
//! the adapter, each a model name a request picks), `GET /health` (the worker's counters) and
//! `GET /` (the chat page, embedded). Requests queue for the one worker ([`worker`]); a full
//! queue answers 503 with `Retry-After`; a client that disconnects stops its generation.

pub mod api;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tokio::sync::mpsc;

pub use worker::{Engine, Event, Finish, FinishReason, GenParams, Job, Message, Prompt, Stats, Step, run_worker};

/// What the chat page starts with (Axolotl's `gradio_*` keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PageSettings {
    /// Page title.
    pub title: String,
    /// Default answer length.
    pub max_new_tokens: usize,
    /// Default temperature.
    pub temperature: f32,
}

/// How the server answers.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Model names, as `/v1/models` lists them and requests pick them; the first is the default.
    pub models: Vec<String>,
    /// Requests must carry `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// `max_tokens` of a request that sets none.
    pub default_max_tokens: usize,
    /// The chat page's settings.
    pub page: PageSettings,
}

/// Shared by the handlers.
pub(crate) struct AppState {
    pub config: ServerConfig,
    pub jobs: mpsc::Sender<Job>,
    pub stats: Arc<Stats>,
    pub created: u64,
}

/// The routes over a job queue (whose receiver [`run_worker`] serves).
pub fn router(config: ServerConfig, jobs: mpsc::Sender<Job>, stats: Arc<Stats>) -> Router {
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let state = Arc::new(AppState { config, jobs, stats, created });
    Router::new()
        .route("/", get(api::page))
        .route("/health", get(api::health))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .fallback(api::not_found)
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes (in-flight requests finish).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}
