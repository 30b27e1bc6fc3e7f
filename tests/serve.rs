//! `newt serve` through the binary: the OpenAI-compatible API over raw HTTP, the official
//! `openai` Python client, and the chat page in headless Chromium (Playwright), on the
//! quickstart's `newt:tiny` model with its trained adapter.
//!
//! The Python parts need `openai` and `playwright` importable and `/usr/bin/chromium`; `.ci/run`
//! installs them and sets NEWT_REQUIRE_SERVE_PY=1, which turns a missing one into a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/quickstart.rs"]
mod quickstart;
use quickstart::Project;

impl Project {
    fn new() -> Self {
        Self::with_epochs(2)
    }
    fn train(&self) {
        let out = self.newt(&["run", "p.yml", "--quiet"]).output().unwrap();
        assert!(out.status.success(), "newt run failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    fn serve(&self, extra: &[&str]) -> Server {
        let mut args = vec!["serve", "p.yml", "--port", "0"];
        args.extend_from_slice(extra);
        self.serve_with(&args)
    }
    fn serve_with(&self, args: &[&str]) -> Server {
        let mut child = self.newt(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("newt serve: listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
                l.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("newt serve did not start: {}", log.lock().unwrap());
            }
        };
        Server { child, addr, log }
    }
}

struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(String::from)
            .collect()
    }
}

fn request_bytes(addr: &str, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b.as_bytes());
    }
    bytes
}

/// One HTTP/1.1 exchange (Connection: close), chunked bodies decoded.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(&request_bytes(addr, method, path, body, headers)).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string())).collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Reply { status, headers, body: String::from_utf8(body).unwrap() }
}

fn post(s: &Server, path: &str, body: Value) -> Reply {
    http(&s.addr, "POST", path, Some(&body.to_string()), &[])
}

fn health(s: &Server) -> Value {
    http(&s.addr, "GET", "/health", None, &[]).json()
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({"messages": [{"role": "user", "content": content}], "temperature": 0});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

fn streamed_text(reply: &Reply) -> (String, Vec<Value>) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.header("content-type").unwrap_or("").starts_with("text/event-stream"));
    let events = reply.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "ends with [DONE]: {events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().or(c["choices"][0]["text"].as_str()))
        .collect();
    (text, chunks)
}

/// Python with `modules` importable, or None (a failure when NEWT_REQUIRE_SERVE_PY is set).
fn python_with(modules: &str) -> Option<String> {
    let ok =
        Command::new("python3").args(["-c", &format!("import {modules}")]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Some("python3".into());
    }
    if std::env::var_os("NEWT_REQUIRE_SERVE_PY").is_some() {
        panic!("NEWT_REQUIRE_SERVE_PY is set but python3 cannot import {modules}");
    }
    eprintln!("skipping: python3 cannot import {modules} (pip install openai playwright)");
    None
}

fn run_script(script: &str, s: &Server, extra: &[&str]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve").join(script);
    let out = Command::new("python3").arg(&path).arg(format!("http://{}", s.addr)).args(extra).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{script}:\n{stdout}{stderr}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}\nserver log:\n{}", s.log.lock().unwrap());
}

#[test]
fn the_api_answers_as_openai_does_and_the_page_chats_in_chromium() {
    let p = Project::new();
    p.train();
    let s = p.serve(&[]);

    let h = health(&s);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["models"], json!(["p", "newt:tiny"]));
    let models = http(&s.addr, "GET", "/v1/models", None, &[]).json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "p");
    assert_eq!(models["data"][0]["parent"], "newt:tiny");
    assert_eq!(models["data"][1]["id"], "newt:tiny");

    // Non-streaming: the adapter is the default model.
    let q = "What is the capital of France?";
    let r = post(&s, "/v1/chat/completions", chat(q, json!({"max_tokens": 24, "ignore_eos": true})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "p");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 24);
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 5);
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), prompt_tokens + 24);
    let adapter_text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!adapter_text.is_empty());

    // Streaming gives the same greedy text, chunk by chunk, then the finish reason and usage.
    let r = post(
        &s,
        "/v1/chat/completions",
        chat(
            q,
            json!({"max_tokens": 24, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    let (text, chunks) = streamed_text(&r);
    assert_eq!(text, adapter_text);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.len() > 4, "the text comes in pieces: {} chunks", chunks.len());
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap();
    assert_eq!(finish, "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 24);

    // The base model by name answers differently from the trained adapter.
    let r =
        post(&s, "/v1/chat/completions", chat(q, json!({"max_tokens": 24, "ignore_eos": true, "model": "newt:tiny"})));
    let v = r.json();
    assert_eq!(v["model"], "newt:tiny");
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), prompt_tokens, "one prompt format for both");
    assert_ne!(v["choices"][0]["message"]["content"].as_str().unwrap(), adapter_text);

    // Both models at once, twice each: the adapter's rows and the base's decode in their own
    // batches of one step, and every answer is the one its model gives alone.
    let base_text = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let both: Vec<_> = ["p", "newt:tiny", "p", "newt:tiny"]
        .into_iter()
        .map(|m| {
            let (addr, body) = (s.addr.clone(), chat(q, json!({"max_tokens": 24, "ignore_eos": true, "model": m})));
            std::thread::spawn(move || (m, http(&addr, "POST", "/v1/chat/completions", Some(&body.to_string()), &[])))
        })
        .collect();
    for h in both {
        let (m, r) = h.join().unwrap();
        let want = if m == "p" { &adapter_text } else { &base_text };
        assert_eq!(r.json()["choices"][0]["message"]["content"].as_str().unwrap(), want, "{m} beside the other");
    }

    // A stop string cuts the answer before it.
    let chars: Vec<char> = adapter_text.chars().collect();
    if let Some(at) = (3..chars.len().saturating_sub(2)).find(|&i| !chars[i].is_whitespace()) {
        let stop: String = chars[at..at + 2].iter().collect();
        let first = adapter_text.find(&stop).unwrap();
        let r =
            post(&s, "/v1/chat/completions", chat(q, json!({"max_tokens": 24, "ignore_eos": true, "stop": [stop]})));
        let v = r.json();
        assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), &adapter_text[..first]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // Text completions, streamed and not.
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let v = post(&s, "/v1/completions", body.clone()).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 8);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (text, chunks) = streamed_text(&post(&s, "/v1/completions", streamed));
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks[0]["object"], "text_completion");

    // Bad requests: OpenAI-style errors with 4xx codes.
    let r = post(&s, "/v1/chat/completions", chat(q, json!({"model": "gpt-4"})));
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = http(&s.addr, "POST", "/v1/chat/completions", Some("{\"messages\": ["), &[]);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = post(&s, "/v1/chat/completions", chat(q, json!({"temperature": 3})));
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("temperature")));
    let r = post(&s, "/v1/chat/completions", json!({"messages": []}));
    assert_eq!(r.status, 400);
    let r = post(&s, "/v1/chat/completions", json!({"messages": [{"role": "tool", "content": "x"}]}));
    assert_eq!(r.status, 400);
    let long = "France Paris capital ".repeat(2000);
    let r = post(&s, "/v1/chat/completions", chat(&long, json!({})));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains("maximum context length is 4096 tokens"),
        "{}",
        r.body
    );
    assert_eq!(http(&s.addr, "GET", "/v2/nothing", None, &[]).status, 404);

    // The page is served from the binary.
    let page = http(&s.addr, "GET", "/", None, &[]);
    assert_eq!(page.status, 200);
    assert!(page.body.contains("\"models\":[\"p\",\"newt:tiny\"]"), "settings injected");

    // The official client and a real browser.
    if python_with("openai").is_some() {
        run_script("openai_client.py", &s, &["p", "newt:tiny"]);
    }
    if python_with("playwright").is_some() {
        if Path::new("/usr/bin/chromium").exists() {
            let shot = std::env::var("NEWT_SERVE_SCREENSHOT").unwrap_or_default();
            let mut args = vec!["p", "newt:tiny"];
            if !shot.is_empty() {
                args.push(&shot);
            }
            run_script("browser.py", &s, &args);
        } else if std::env::var_os("NEWT_REQUIRE_SERVE_PY").is_some() {
            panic!("NEWT_REQUIRE_SERVE_PY is set but /usr/bin/chromium is missing (apt-get install chromium)");
        } else {
            eprintln!("skipping the browser test: no /usr/bin/chromium");
        }
    }
}

/// Starts a long streamed answer and reads until its first text arrives.
fn start_stream(s: &Server, body: Value) -> TcpStream {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(&request_bytes(&s.addr, "POST", "/v1/completions", Some(&body.to_string()), &[])).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    c
}

/// With room for two sequences, a request arriving while a long one streams joins it at the
/// next step: its answer comes back while the first is still generating, and it is the answer
/// the request gets alone (greedy).
#[test]
fn a_request_joins_one_already_generating_and_gets_its_own_answer() {
    let p = Project::new();
    let s = p.serve(&["--base", "--batch", "2"]);
    let short = json!({"prompt": "The capital of", "max_tokens": 12, "temperature": 0, "ignore_eos": true});
    let alone = post(&s, "/v1/completions", short.clone());
    assert_eq!(alone.status, 200, "{}", alone.body);
    let long = json!({"prompt": "Paris", "max_tokens": 100000, "temperature": 0, "ignore_eos": true, "stream": true});
    let a = start_stream(&s, long);
    let joined = post(&s, "/v1/completions", short);
    assert_eq!(joined.status, 200, "{}", joined.body);
    let h = health(&s);
    // The long answer (up to the 4,096-token context) is still running: only the two short
    // ones have completed.
    assert_eq!((h["completed"].as_u64(), h["cancelled"].as_u64()), (Some(2), Some(0)), "{h}");
    assert_eq!(joined.json()["usage"]["completion_tokens"], 12);
    assert_eq!(joined.json()["choices"][0]["text"], alone.json()["choices"][0]["text"]);
    drop(a);
    let t = Instant::now();
    while health(&s)["cancelled"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "the long answer did not stop: {}", health(&s));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Events of a stream that carry text (a chunk whose `text` is not empty), counted in `raw`.
fn texts_in(raw: &[u8]) -> usize {
    let s = String::from_utf8_lossy(raw);
    s.matches("\"text\":\"").count() - s.matches("\"text\":\"\"").count()
}

/// A long prompt is read a piece a step (`--prefill-chunk`): between the moment it is accepted
/// and its first token, the answer already streaming keeps getting tokens, about one a piece,
/// where reading the whole prompt at once gives it one; and the long prompt's answer is the one
/// the whole prompt read at once gives (greedy).
#[test]
fn a_long_prompt_is_read_in_pieces_while_another_answer_streams() {
    let p = Project::new();
    let prompt = "The capital of France is Paris, and the capital of Italy is Rome. ".repeat(40);
    let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}});
    let whole = {
        let s = p.serve(&["--base", "--prefill-chunk", "0"]);
        streamed_text(&post(&s, "/v1/completions", body.clone()))
    };
    let prompt_tokens = whole.1.last().unwrap()["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let chunk = 8;
    let pieces = prompt_tokens.div_ceil(chunk);
    assert!(pieces >= 50, "a prompt of {prompt_tokens} tokens is {pieces} pieces");
    let s = p.serve(&["--base", "--batch", "2", "--prefill-chunk", &chunk.to_string()]);
    // The streaming answer, read on a thread that notes when each of its tokens arrives.
    let long = json!({"prompt": "Paris", "max_tokens": 100000, "temperature": 0, "ignore_eos": true, "stream": true});
    let mut a = start_stream(&s, long);
    let a_handle = a.try_clone().unwrap();
    let arrivals = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let reader = {
        let arrivals = arrivals.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = a.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                arrivals.lock().unwrap().extend(std::iter::repeat_n(now, texts_in(&buf[..n])));
            }
        })
    };
    // The long prompt, streamed: its headers come once it is accepted (before its reading), then
    // its tokens.
    let mut b = TcpStream::connect(&s.addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    b.write_all(&request_bytes(&s.addr, "POST", "/v1/completions", Some(&body.to_string()), &[])).unwrap();
    let (mut raw, mut buf) = (Vec::new(), [0u8; 65536]);
    let mut accepted = None;
    let mut first = None;
    loop {
        let n = b.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        let now = Instant::now();
        if accepted.is_none() && raw.windows(4).any(|w| w == b"\r\n\r\n") {
            accepted = Some(now);
        }
        if first.is_none() && texts_in(&raw) > 0 {
            first = Some(now);
        }
    }
    let (accepted, first) = (accepted.expect("headers"), first.expect("a token"));
    let _ = a_handle.shutdown(std::net::Shutdown::Both);
    reader.join().unwrap();
    let joined = streamed_text(&parse_reply(&raw));
    assert_eq!(joined.1.last().unwrap()["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(joined.0, whole.0, "the answer read in pieces differs from the one read whole");
    let meanwhile = arrivals.lock().unwrap().iter().filter(|t| **t > accepted && **t < first).count();
    assert!(
        meanwhile >= pieces / 2,
        "the streaming answer got {meanwhile} tokens while a prompt of {pieces} pieces was read"
    );
}

#[test]
fn a_full_queue_answers_503_and_a_client_that_leaves_stops_its_generation() {
    let p = Project::new();
    // One request at a time (`--batch 1`), so that a second one waits in the queue.
    let s = p.serve(&["--base", "--queue", "1", "--batch", "1"]);
    let long = json!({"prompt": "Paris", "max_tokens": 100000, "temperature": 0, "ignore_eos": true, "stream": true});
    let a = start_stream(&s, long);
    // B waits in the queue (its handler blocks until the worker takes it).
    let addr = s.addr.clone();
    let b = std::thread::spawn(move || {
        let body = json!({"prompt": "Paris", "max_tokens": 4, "temperature": 0, "ignore_eos": true});
        http(&addr, "POST", "/v1/completions", Some(&body.to_string()), &[])
    });
    let t = Instant::now();
    while health(&s)["queued"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "B never queued: {}", health(&s));
        std::thread::sleep(Duration::from_millis(20));
    }
    // C finds the queue full.
    let c = post(&s, "/v1/completions", json!({"prompt": "Paris", "max_tokens": 4}));
    assert_eq!(c.status, 503, "{}", c.body);
    assert_eq!(c.header("retry-after"), Some("1"));
    assert_eq!(c.json()["error"]["type"], "server_error");
    // A leaves: its generation stops and B runs.
    let before = health(&s)["tokens"].as_u64().unwrap();
    drop(a);
    let b = b.join().unwrap();
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.json()["usage"]["completion_tokens"], 4);
    let h = health(&s);
    assert_eq!(h["cancelled"], 1, "{h}");
    assert_eq!(h["completed"], 1, "{h}");
    let context = 4096;
    let after = h["tokens"].as_u64().unwrap();
    assert!(after < context, "A stopped before filling the context: {after} tokens generated ({before} when it left)");
}

#[test]
fn beyond_loopback_needs_an_api_key_and_requests_must_carry_it() {
    let p = Project::new();
    let out = p.newt(&["serve", "p.yml", "--base", "--host", "0.0.0.0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-key") && err.contains("--insecure"), "{err}");
    assert!(
        !p.path("cache").join("objects").exists() || std::fs::read_dir(p.path("cache/objects")).unwrap().count() == 0
    );

    let s = p.serve(&["--base", "--api-key", "sekrit"]);
    let r = http(&s.addr, "GET", "/v1/models", None, &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = http(&s.addr, "GET", "/v1/models", None, &[("Authorization", "Bearer wrong")]);
    assert_eq!(r.status, 401);
    let r = http(&s.addr, "GET", "/v1/models", None, &[("Authorization", "Bearer sekrit")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], "newt:tiny");
    assert_eq!(health(&s)["auth"], true);
}

#[test]
fn gradio_keys_set_the_page_and_the_port_defaults() {
    let p = Project::new();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let yaml = std::fs::read_to_string(p.path("p.yml")).unwrap();
    let yaml = format!(
        "{yaml}\ngradio_title: \"Acme <support> bot\"\ngradio_server_port: {free}\ngradio_max_new_tokens: 33\ngradio_temperature: 0.2\n"
    );
    std::fs::write(p.path("p.yml"), yaml).unwrap();
    let s = p.serve_with(&["serve", "p.yml", "--base"]);
    assert_eq!(s.addr, format!("127.0.0.1:{free}"));
    let page = http(&s.addr, "GET", "/", None, &[]).body;
    assert!(page.contains("<title>Acme &lt;support&gt; bot</title>"), "{page}");
    assert!(page.contains("\"max_new_tokens\":33") && page.contains("\"temperature\":0.2"), "{page}");
    // A request without max_tokens gets the page's default.
    let v = post(&s, "/v1/completions", json!({"prompt": "Paris", "temperature": 0, "ignore_eos": true})).json();
    assert_eq!(v["usage"]["completion_tokens"], 33);
}
