//! Progress on stderr: one bar per running stage (indicatif), plain lines when not a terminal.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use newt_graph::executor::{Outcome, Reporter, StageReport};
use newt_graph::stage::Progress;

/// Draws stage progress.
pub struct BarReporter {
    multi: MultiProgress,
    plain: bool,
}

impl BarReporter {
    /// Bars when stderr is a terminal and `quiet` is off; log lines otherwise.
    pub fn new(quiet: bool) -> Self {
        let plain = quiet || !console::Term::stderr().is_term();
        let multi = MultiProgress::with_draw_target(if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        });
        BarReporter { multi, plain }
    }
}

struct Bar {
    bar: ProgressBar,
    plain: bool,
    id: String,
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
    }
    fn set_message(&self, msg: String) {
        self.bar.set_message(msg);
    }
    fn log(&self, line: String) {
        if self.plain {
            eprintln!("{:>14} {line}", self.id);
        }
    }
    fn println(&self, line: String) {
        if self.plain {
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
        if self.plain {
            eprintln!("{id:>14} running ({kind})");
        }
        Arc::new(Bar { bar, plain: self.plain, id: id.to_string() })
    }
    fn finished(&self, r: &StageReport) {
        let what = match &r.outcome {
            Outcome::Hit => return,
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
