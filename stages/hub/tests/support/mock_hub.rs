//! A Hugging Face Hub lookalike for tests, on 127.0.0.1: the parts of the Hub's HTTP API that
//! newt and `huggingface_hub` use to download.
//!
//! - `GET /api/{models,datasets}/<id>/revision/<rev>` → `{id, sha, siblings: [{rfilename, size,
//!   lfs?}]}`; `GET .../tree/<rev>` → the file list `huggingface_hub` 2.x asks for
//! - `HEAD|GET /[datasets/]<id>/resolve/<rev>/<path>` → small files inline (`ETag` = git blob
//!   sha1); LFS files as a 302 to `/cdn/<sha256>` with `X-Linked-Etag` and `X-Linked-Size`;
//!   `X-Repo-Commit` always
//! - `GET /cdn/<sha256>` → the bytes, with `Range` support
//! - gated repos answer 401 without the right bearer token; a file can be set to drop its
//!   connection halfway, once.
//!
//! One thread per connection, `Connection: close`. Every request is logged for assertions.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha1::Digest as _;

/// Files bigger than this are stored as LFS.
const LFS_THRESHOLD: usize = 64;

#[derive(Clone)]
struct File {
    bytes: Arc<Vec<u8>>,
}

#[derive(Default)]
struct Repo {
    /// ref (branch/tag) → commit
    refs: HashMap<String, String>,
    /// commit → path → file
    commits: HashMap<String, Vec<(String, File)>>,
    /// The token that may read it, when gated.
    gated: Option<String>,
}

#[derive(Default)]
struct State {
    /// "models/org/name" or "datasets/org/name" → repo
    repos: HashMap<String, Repo>,
    /// sha256 → bytes (the CDN)
    cdn: HashMap<String, Arc<Vec<u8>>>,
    /// sha256 of blobs whose next download stops halfway.
    drop_once: Vec<String>,
    log: Vec<String>,
}

/// The server; stops with the process.
pub struct MockHub {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    state: Arc<Mutex<State>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn sha256(b: &[u8]) -> String {
    hex(&sha2::Sha256::digest(b))
}

pub fn git_sha1(b: &[u8]) -> String {
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", b.len()).as_bytes());
    h.update(b);
    hex(&h.finalize())
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MockHub {
    /// Starts the server on a free port.
    pub fn start() -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (s, u) = (state.clone(), url.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (s, u) = (s.clone(), u.clone());
                std::thread::spawn(move || serve(conn, &s, &u));
            }
        });
        MockHub { url, state }
    }

    /// Adds a commit to `repo` ("models/org/name" or "datasets/org/name") with these files,
    /// and points `branch` at it.
    pub fn commit(&self, repo: &str, branch: &str, commit: &str, files: &[(&str, &[u8])]) {
        let mut st = self.state.lock().unwrap();
        let mut entries = Vec::new();
        for (path, bytes) in files {
            let bytes = Arc::new(bytes.to_vec());
            if bytes.len() > LFS_THRESHOLD {
                st.cdn.insert(sha256(&bytes), bytes.clone());
            }
            entries.push((path.to_string(), File { bytes }));
        }
        let r = st.repos.entry(repo.to_string()).or_default();
        r.commits.insert(commit.to_string(), entries);
        r.refs.insert(branch.to_string(), commit.to_string());
    }

    /// Only requests with `Authorization: Bearer <token>` may read `repo`.
    pub fn gate(&self, repo: &str, token: &str) {
        self.state.lock().unwrap().repos.entry(repo.to_string()).or_default().gated = Some(token.to_string());
    }

    /// The next download of these bytes stops after half of them.
    pub fn drop_once(&self, bytes: &[u8]) {
        self.state.lock().unwrap().drop_once.push(sha256(bytes));
    }

    /// Requests so far: `METHOD path [range]`.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8], head_only: bool) {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let _ = conn.write_all(out.as_bytes());
    if !head_only {
        let _ = conn.write_all(body);
    }
    let _ = conn.flush();
}

fn json(conn: &mut TcpStream, status: &str, v: serde_json::Value) {
    let body = v.to_string().into_bytes();
    respond(conn, status, &[("Content-Type".into(), "application/json".into())], &body, false);
}

fn error(conn: &mut TcpStream, status: &str, code: &str, head_only: bool) {
    let body = format!("{{\"error\": \"{code}\"}}").into_bytes();
    let headers =
        vec![("X-Error-Code".to_string(), code.to_string()), ("Content-Type".into(), "application/json".into())];
    respond(conn, status, &headers, &body, head_only);
}

fn serve(mut conn: TcpStream, state: &Mutex<State>, base: &str) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || line.is_empty() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers: HashMap<String, String> = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    let auth = headers.get("authorization").and_then(|a| a.strip_prefix("Bearer ")).map(str::to_string);
    let path = target.split('?').next().unwrap_or("").to_string();
    let head_only = method == "HEAD";
    state
        .lock()
        .unwrap()
        .log
        .push(format!("{method} {path}{}", range.as_ref().map(|r| format!(" {r}")).unwrap_or_default()));

    if let Some(sha) = path.strip_prefix("/cdn/") {
        let (bytes, drop) = {
            let mut st = state.lock().unwrap();
            let Some(bytes) = st.cdn.get(sha).cloned() else {
                return error(&mut conn, "404 Not Found", "EntryNotFound", head_only);
            };
            let drop = st.drop_once.iter().position(|d| d == sha).map(|i| st.drop_once.remove(i)).is_some();
            (bytes, drop)
        };
        let start = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0);
        if start >= bytes.len() && start > 0 {
            return respond(&mut conn, "416 Range Not Satisfiable", &[], b"", head_only);
        }
        let body = &bytes[start..];
        let mut hs = vec![("ETag".to_string(), format!("\"{sha}\""))];
        let status = if start > 0 {
            hs.push(("Content-Range".into(), format!("bytes {start}-{}/{}", bytes.len() - 1, bytes.len())));
            "206 Partial Content"
        } else {
            "200 OK"
        };
        if drop && !head_only {
            // Promise the whole body, send half, hang up.
            hs.push(("Content-Length".into(), body.len().to_string()));
            let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &hs {
                out.push_str(&format!("{k}: {v}\r\n"));
            }
            out.push_str("\r\n");
            let _ = conn.write_all(out.as_bytes());
            let _ = conn.write_all(&body[..body.len() / 2]);
            let _ = conn.flush();
            let _ = conn.shutdown(std::net::Shutdown::Both);
            return;
        }
        return respond(&mut conn, status, &hs, body, head_only);
    }

    // /api/{models,datasets}/<id>/revision/<rev>
    if let Some(rest) = path.strip_prefix("/api/") {
        let (kind, rest) = rest.split_once('/').unwrap_or(("", ""));
        // `/tree/<rev>` (huggingface_hub's file listing) or `/revision/<rev>`.
        let (split, tree) = if rest.contains("/tree/") { ("/tree/", true) } else { ("/revision/", false) };
        let Some((id, rev)) = rest.split_once(split) else {
            return error(&mut conn, "404 Not Found", "RepoNotFound", false);
        };
        let (id, rev) = (decode(id), decode(rev));
        let st = state.lock().unwrap();
        let Some(repo) = st.repos.get(&format!("{kind}/{id}")) else {
            return error(&mut conn, "401 Unauthorized", "RepoNotFound", false);
        };
        if repo.gated.as_ref().is_some_and(|t| auth.as_ref() != Some(t)) {
            return error(&mut conn, "401 Unauthorized", "GatedRepo", false);
        }
        let commit = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
        let Some(files) = repo.commits.get(&commit) else {
            return error(&mut conn, "404 Not Found", "RevisionNotFound", false);
        };
        if tree {
            let entries: Vec<serde_json::Value> = files
                .iter()
                .map(|(p, f)| {
                    let mut e =
                        serde_json::json!({"type": "file", "path": p, "size": f.bytes.len(), "oid": git_sha1(&f.bytes)});
                    if f.bytes.len() > LFS_THRESHOLD {
                        e["lfs"] = serde_json::json!({"oid": sha256(&f.bytes), "size": f.bytes.len(), "pointerSize": 134});
                    }
                    e
                })
                .collect();
            return json(&mut conn, "200 OK", serde_json::Value::Array(entries));
        }
        let siblings: Vec<serde_json::Value> = files
            .iter()
            .map(|(p, f)| {
                let mut s = serde_json::json!({"rfilename": p, "size": f.bytes.len()});
                if f.bytes.len() > LFS_THRESHOLD {
                    s["lfs"] =
                        serde_json::json!({"sha256": sha256(&f.bytes), "size": f.bytes.len(), "pointerSize": 134});
                }
                s
            })
            .collect();
        return json(
            &mut conn,
            "200 OK",
            serde_json::json!({"id": id, "sha": commit, "private": false, "disabled": false, "gated": false,
                "lastModified": "2026-12-01T00:00:00.000Z", "tags": [], "siblings": siblings}),
        );
    }

    // /[datasets/]<org>/<name>/resolve/<rev>/<file>
    let Some((repo_part, rest)) = path.split_once("/resolve/") else {
        return error(&mut conn, "404 Not Found", "EntryNotFound", head_only);
    };
    let repo_part = repo_part.trim_start_matches('/');
    let key = match repo_part.strip_prefix("datasets/") {
        Some(id) => format!("datasets/{}", decode(id)),
        None => format!("models/{}", decode(repo_part)),
    };
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    let (rev, file) = (decode(rev), decode(file));
    let st = state.lock().unwrap();
    let Some(repo) = st.repos.get(&key) else { return error(&mut conn, "401 Unauthorized", "RepoNotFound", head_only) };
    if repo.gated.as_ref().is_some_and(|t| auth.as_ref() != Some(t)) {
        return error(&mut conn, "401 Unauthorized", "GatedRepo", head_only);
    }
    let commit = repo.refs.get(&rev).cloned().unwrap_or(rev.clone());
    let Some(files) = repo.commits.get(&commit) else {
        return error(&mut conn, "404 Not Found", "RevisionNotFound", head_only);
    };
    let Some((_, f)) = files.iter().find(|(p, _)| *p == file) else {
        return error(&mut conn, "404 Not Found", "EntryNotFound", head_only);
    };
    let mut hs = vec![("X-Repo-Commit".to_string(), commit.clone())];
    if f.bytes.len() > LFS_THRESHOLD {
        let sha = sha256(&f.bytes);
        hs.push(("X-Linked-Etag".into(), format!("\"{sha}\"")));
        hs.push(("X-Linked-Size".into(), f.bytes.len().to_string()));
        hs.push(("ETag".into(), format!("\"{}\"", git_sha1(b"pointer"))));
        // The CDN is another host, as on the real Hub (clients follow same-host redirects of a
        // HEAD, and would then miss X-Repo-Commit).
        hs.push(("Location".into(), format!("{}/cdn/{sha}", base.replace("127.0.0.1", "localhost"))));
        return respond(&mut conn, "302 Found", &hs, b"", head_only);
    }
    hs.push(("ETag".into(), format!("\"{}\"", git_sha1(&f.bytes))));
    let body = f.bytes.clone();
    drop(st);
    respond(&mut conn, "200 OK", &hs, &body, head_only);
}
