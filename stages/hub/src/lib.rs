//! newt-hub: models and datasets from the Hugging Face Hub.
//!
//! - [`Hub::resolve`] turns a revision (`main`, a tag, a commit) into the commit it names now:
//!   that commit, not the id, is what a fetch stage's key holds, so a moved `main` re-runs what
//!   changed and a pinned commit never asks the network again.
//! - [`Hub::download`] puts files into the standard Hugging Face cache ([`cache`]), shared with
//!   transformers and `huggingface_hub`: parallel across files, resumed from
//!   `blobs/<etag>.incomplete` after a dropped connection or a killed process, checked against
//!   the size and the etag (sha256 for LFS files, the git blob hash for others) before the blob
//!   gets its name, so a partial file never looks complete.
//! - Offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the cache alone answers, and says so.
//!
//! The environment is `huggingface_hub`'s: `HF_ENDPOINT` (mirrors), `HF_TOKEN` or the token file
//! `huggingface-cli login` writes (`HF_TOKEN_PATH`, else `$HF_HOME/token`), `HF_HUB_OFFLINE`,
//! `HF_HUB_CACHE` / `HF_HOME`.
//!
//! HTTP goes through `reqwest` (rustls). The Hub's own Rust crate, `hf-hub` 1.0, was measured
//! for this: it brings 326 crates including the Xet storage client and aws-lc (a CMake build),
//! which this workspace's cold build cannot afford; the protocol newt needs (revision info,
//! `resolve/` with etag headers, ranges) is small.

pub mod cache;
mod client;

use std::path::{Path, PathBuf};

pub use cache::{CachedRepo, cache_dir, is_commit};
pub use client::{DownloadProgress, Hub, NoProgress, RemoteFile, Resolution};

/// What kind of repository an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoKind {
    /// A model (`org/name`).
    Model,
    /// A dataset (`datasets/org/name` on the Hub).
    Dataset,
}

impl RepoKind {
    /// `models` / `datasets`: the cache folder prefix and the API path segment.
    pub fn cache_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }
    /// What goes before the id in a file URL (`datasets/` for datasets).
    pub fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
    fn noun(self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        }
    }
}

/// Why the Hub or the cache could not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// 401/403: a gated or private repository.
    #[error(
        "gated {noun} `{id}`: {}accept its license at {url} and set HF_TOKEN (or log in with `huggingface-cli login`)",
        if *with_token { "the token you set has no access; " } else { "" }
    )]
    Gated {
        /// Model or dataset.
        noun: &'static str,
        /// The repo id.
        id: String,
        /// Its page on the Hub.
        url: String,
        /// Whether a token was sent.
        with_token: bool,
    },
    /// 404.
    #[error("{what} was not found on {endpoint} (a typo, or a private repository: set HF_TOKEN)")]
    NotFound {
        /// The repo, revision or file.
        what: String,
        /// The Hub endpoint asked.
        endpoint: String,
    },
    /// Offline, and the cache lacks it.
    #[error(
        "{noun} `{id}` at revision `{revision}`: {missing} is not in the Hugging Face cache {cache} \
         and newt is offline ({why}); run `newt fetch` where the Hub is reachable, or unset HF_HUB_OFFLINE"
    )]
    Offline {
        /// Model or dataset.
        noun: &'static str,
        /// The repo id.
        id: String,
        /// The revision asked for.
        revision: String,
        /// What is missing (a file, or the revision itself).
        missing: String,
        /// The cache looked in.
        cache: PathBuf,
        /// Why offline.
        why: String,
    },
    /// Another HTTP status.
    #[error("{url}: the Hub answered {status}{}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Http {
        /// The URL.
        url: String,
        /// Its status.
        status: u16,
        /// The start of the answer's text.
        detail: String,
    },
    /// The network failed (after retries).
    #[error("{url}: {message}")]
    Network {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// Downloaded bytes that are not the file the Hub described.
    #[error("{file}: downloaded {got}, expected {expected}; the partial file was removed")]
    Integrity {
        /// The file.
        file: String,
        /// What the Hub said.
        expected: String,
        /// What arrived.
        got: String,
    },
    /// The Hub's answer is not what newt understands.
    #[error("{url}: unexpected answer: {message}")]
    Protocol {
        /// The URL.
        url: String,
        /// What was wrong.
        message: String,
    },
}

impl HubError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
        move |source| HubError::Io { path: path.to_path_buf(), source }
    }
}

/// Splits `org/name` into a valid repo id, or says why it is not one.
pub fn valid_repo_id(id: &str) -> bool {
    let ok = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match id.split_once('/') {
        Some((org, name)) => ok(org) && ok(name),
        None => ok(id),
    }
}
