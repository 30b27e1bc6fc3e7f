//! The `command` custom stage: a shell command with declared inputs and outputs.
//!
//! Its key covers the command text, the declared outputs, the upstream output digests and the
//! contents of the declared `files`. The command sees `$NEWT_OUT` (its output dir) and
//! `$NEWT_IN_<ID>` for each input (id upper-cased, other characters as `_`), and runs in the
//! pipeline's folder.

use std::process::{Command, Stdio};
use std::time::Duration;

use newt_graph::compile::StageNode;
use newt_graph::{Stage, StageContext};

/// Runs `sh -c <run>`.
pub struct CommandStage;

/// The environment variable through which a command reads input `id`.
pub fn input_var(id: &str) -> String {
    let mut s = String::from("NEWT_IN_");
    s.extend(id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }));
    s
}

impl Stage for CommandStage {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn version(&self) -> u32 {
        1
    }
    fn required_outputs(&self, node: &StageNode) -> Vec<String> {
        node.params["custom"]["outputs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    }
    fn run(&self, ctx: &StageContext<'_>) -> anyhow::Result<serde_json::Value> {
        let run = ctx.node.params["custom"]["run"].as_str().ok_or_else(|| anyhow::anyhow!("`run` is missing"))?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(run)
            .current_dir(&ctx.base_dir)
            .env("NEWT_OUT", &ctx.out_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (id, dir) in &ctx.inputs {
            cmd.env(input_var(id), dir);
        }
        ctx.progress.set_message(run.chars().take(60).collect());
        let mut child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start `sh -c {run}`: {e}"))?;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if ctx.cancel.is_cancelled() {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("cancelled");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = child.wait_with_output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !status.success() {
            anyhow::bail!(
                "command exited with {status}: {}",
                stderr
                    .trim_end()
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        for o in self.required_outputs(ctx.node) {
            if !ctx.out_dir.join(&o).exists() {
                anyhow::bail!("the command did not write its declared output `{o}` into $NEWT_OUT");
            }
        }
        Ok(serde_json::json!({ "stdout_bytes": out.stdout.len(), "stderr_bytes": out.stderr.len() }))
    }
}
