//! Progress on stderr: one bar per running stage (indicatif), plain lines when not a terminal,
//! or JSON events, one per line, with `--json` (for tools that drive newt).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use newt_graph::executor::{Outcome, Reporter, StageReport};
use newt_graph::stage::Progress;

/// Draws stage progress.
pub struct BarReporter {
    multi: MultiProgress,
    plain: bool,
    json: bool,
}

/// One `--json` event on stderr: `{"event": ..., "stage": ..., ...}`.
fn event(kind: &str, stage: &str, mut fields: serde_json::Value) {
    fields["event"] = kind.into();
    fields["stage"] = stage.into();
    eprintln!("{fields}");
}

impl BarReporter {
    /// Bars when stderr is a terminal and `quiet` is off; log lines otherwise; JSON events
    /// with `json`.
    pub fn new(quiet: bool, json: bool) -> Self {
        let plain = quiet || json || !console::Term::stderr().is_term();
        let multi = MultiProgress::with_draw_target(if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        BarReporter { multi, plain, json }
    }
}

struct Bar {
    bar: ProgressBar,
    plain: bool,
    json: bool,
    id: String,
    /// When the last `progress` event went out (they are sent at most 4 times a second).
    last_event: Mutex<Option<Instant>>,
}

impl Bar {
    fn progress_event(&self, force: bool) {
        let mut last = self.last_event.lock().expect("progress lock");
        if !force && last.is_some_and(|t| t.elapsed() < Duration::from_millis(250)) {
            return;
        }
        *last = Some(Instant::now());
        event(
            "progress",
            &self.id,
            serde_json::json!({
                "position": self.bar.position(),
                "total": self.bar.length(),
                "message": self.bar.message(),
            }),
        );
    }
}

impl Progress for Bar {
    fn set_total(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_style(
            ProgressStyle::with_template("{prefix:>14.bold} [{bar:30}] {pos}/{len} {msg} ({eta})")
                .expect("template")
                .progress_chars("=> "),
        );
    }
    fn set_position(&self, pos: u64) {
        self.bar.set_position(pos);
        if self.json {
            self.progress_event(false);
        }
    }
    fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }
    fn log(&self, line: String) {
        if self.json {
            event("log", &self.id, serde_json::json!({"line": line}));
        } else if self.plain {
            eprintln!("{:>14} {line}", self.id);
        }
    }
    fn println(&self, line: String) {
        if self.json {
            event("log", &self.id, serde_json::json!({"line": line}));
        } else if self.plain {
            eprintln!("{:>14} {line}", self.id);
        } else {
            self.bar.println(format!("{:>14} {line}", self.id));
        }
    }
}

impl Reporter for BarReporter {
    fn started(&self, id: &str, kind: &str) -> Arc<dyn Progress> {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{prefix:>14.bold} {spinner} {elapsed} {msg}").expect("template"));
        bar.set_prefix(id.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if self.json {
            event("started", id, serde_json::json!({"kind": kind}));
        } else if self.plain {
            eprintln!("{id:>14} running ({kind})");
        }
        Arc::new(Bar { bar, plain: self.plain, json: self.json, id: id.to_string(), last_event: Mutex::new(None) })
    }
    fn finished(&self, r: &StageReport) {
        if self.json {
            let outcome = serde_json::to_value(&r.outcome).unwrap_or_default();
            event("finished", &r.id, serde_json::json!({"outcome": outcome, "seconds": r.seconds}));
            return;
        }
        let what = match &r.outcome {
            Outcome::Hit => return,
            Outcome::Pulled => format!("pulled from the remote cache in {:.1}s", r.seconds),
            Outcome::Ran => format!("done in {:.1}s", r.seconds),
            Outcome::Failed(m) => format!("FAILED: {m}"),
            Outcome::Skipped => "skipped".into(),
        };
        let line = format!("{:>14} {what}", r.id);
        if self.plain {
            eprintln!("{line}")
        } else {
            let _ = self.multi.println(line);
        }
    }
    fn warn(&self, message: &str) {
        if self.json {
            event("warning", "", serde_json::json!({"message": message}));
            return;
        }
        let line = format!("{} {message}", console::style("warning:").yellow().bold());
        if self.plain {
            eprintln!("{line}")
        } else {
            let _ = self.multi.println(line);
        }
    }
}

/// Makes sure bars are cleared before results are printed.
impl Drop for BarReporter {
    fn drop(&mut self) {
        let _ = self.multi.clear();
    }
}
