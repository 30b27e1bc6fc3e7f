//! A stage's side of the dataflow: wait for every upstream stage's message, run or skip, send
//! this stage's message.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use dora_node_api::dora_core::config::DataId;
use dora_node_api::{DoraNode, Event, MetadataParameters};
use serde::{Deserialize, Serialize};

use crate::dataflow::OUTPUT;

/// What a node prints before its message on stdout (dora keeps node output as its log; the
/// driver reads the line back with the coordinator's `Logs` request).
pub const REPORT_PREFIX: &str = "newt-stage-report ";

/// The environment variable a daemon started by `newt cluster daemon` sets to its machine id;
/// its nodes name it in their messages (else the host name).
pub const MACHINE_ENV: &str = "NEWT_DORA_MACHINE";

/// What a node tells its downstream nodes and the driver: digests, never artifacts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageMessage {
    /// The stage id.
    pub stage: String,
    /// `hit`, `pulled`, `ran`, `failed` or `skipped`.
    pub outcome: String,
    /// The stage key (hex), once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The output digest (hex), when the stage has a result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Why it failed or was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Wall time of the stage on its node.
    #[serde(default)]
    pub seconds: f64,
    /// The machine the node ran on (its daemon's machine id, else the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl StageMessage {
    /// Whether the stage has a result downstream stages can use.
    pub fn ok(&self) -> bool {
        matches!(self.outcome.as_str(), "hit" | "pulled" | "ran") && self.output.is_some()
    }

    /// A stage not run because of `reason`.
    pub fn skipped(stage: &str, reason: String) -> Self {
        StageMessage {
            stage: stage.to_string(),
            outcome: "skipped".into(),
            key: None,
            output: None,
            reason: Some(reason),
            seconds: 0.0,
            host: None,
        }
    }

    /// Parses a node's report line out of its log: plain lines, or the JSON lines dora 1.1's
    /// daemons keep (`{"node": .., "stream": "stdout", "msg": LINE, ..}`).
    pub fn from_log(log: &str) -> Option<Self> {
        log.lines().rev().find_map(|l| {
            let json: Option<serde_json::Value> = serde_json::from_str(l).ok();
            let line = match json.as_ref().and_then(|v| v.get("msg")).and_then(|m| m.as_str()) {
                Some(msg) => msg,
                None => l,
            };
            let at = line.find(REPORT_PREFIX)?;
            serde_json::from_str(line[at + REPORT_PREFIX.len()..].trim()).ok()
        })
    }
}

/// Runs a stage as a dora node (the process the daemon started, its environment set by dora):
/// receives one message per stage in `upstream`, then calls `work` with them when all are
/// [`StageMessage::ok`] (else skips, naming the first upstream stage that has no result), prints
/// and sends the resulting message, and returns it.
pub fn serve(
    stage: &str,
    upstream: &[String],
    work: impl FnOnce(&BTreeMap<String, StageMessage>) -> StageMessage,
) -> anyhow::Result<StageMessage> {
    let (mut node, mut events) = DoraNode::init_from_env().map_err(|e| anyhow::anyhow!("joining the dataflow: {e}"))?;
    let mut got: BTreeMap<String, StageMessage> = BTreeMap::new();
    let mut closed: Vec<String> = Vec::new();
    while got.len() + closed.len() < upstream.len() {
        match events.recv() {
            Some(Event::Input { id, data, .. }) => {
                let text: &str = (&data).try_into().map_err(|e| anyhow::anyhow!("input `{id}`: {e}"))?;
                let m: StageMessage = serde_json::from_str(text)
                    .map_err(|e| anyhow::anyhow!("input `{id}` is not a stage message: {e}"))?;
                got.insert(id.to_string(), m);
            }
            Some(Event::InputClosed { id }) => {
                if !got.contains_key(id.as_str()) {
                    closed.push(id.to_string());
                }
            }
            Some(Event::Stop(_)) | None => break,
            Some(_) => {}
        }
    }
    let missing = upstream.iter().find_map(|u| match got.get(u) {
        Some(m) if m.ok() => None,
        Some(m) => Some(format!(
            "upstream stage `{u}` {}{}",
            m.outcome,
            m.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        )),
        None => Some(format!("upstream stage `{u}` ended without a result")),
    });
    let mut message = match missing {
        Some(why) => StageMessage::skipped(stage, why),
        None => work(&got),
    };
    message.host = hostname();
    let json = serde_json::to_string(&message)?;
    println!("{REPORT_PREFIX}{json}");
    node.send_output(DataId::from(OUTPUT.to_string()), MetadataParameters::default(), json.as_str())
        .map_err(|e| anyhow::anyhow!("sending the stage's message: {e}"))?;
    Ok(message)
}

/// The collector node ([`crate::dataflow::COLLECTOR`]): waits for one message (or a closed
/// input) from each of `stages` inputs, then keeps the dataflow open until the driver stops it
/// or `linger` has passed.
pub fn collect(stages: usize, linger: Duration) -> anyhow::Result<()> {
    let (_node, mut events) = DoraNode::init_from_env().map_err(|e| anyhow::anyhow!("joining the dataflow: {e}"))?;
    let mut seen = BTreeSet::new();
    while seen.len() < stages {
        match events.recv() {
            Some(Event::Input { id, .. }) | Some(Event::InputClosed { id }) => {
                seen.insert(id.to_string());
            }
            Some(Event::Stop(_)) | None => {
                eprintln!("collector: the dataflow stopped after {} of {stages} stages", seen.len());
                return Ok(());
            }
            Some(_) => {}
        }
    }
    eprintln!("collector: heard from all {stages} stages");
    // Once every input has closed, dora may end the event stream at once (None before any
    // timeout): then wait out `linger` anyway, in slices, so the driver can still read the last
    // node's log; a Stop ends the wait early while the stream is open.
    let t0 = Instant::now();
    while t0.elapsed() < linger {
        match events.recv_timeout(Duration::from_millis(200)) {
            // Not the end of the stream's inputs (`AllInputsClosed`, which follows the last
            // stage): only the driver's stop.
            Some(Event::Stop(dora_node_api::StopCause::Manual)) => break,
            Some(_) => {}
            None => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    Ok(())
}

fn hostname() -> Option<String> {
    std::env::var(MACHINE_ENV)
        .ok()
        .filter(|m| !m.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_line_is_found_in_a_log_and_only_results_count_as_ok() {
        let m = StageMessage {
            stage: "pack".into(),
            outcome: "ran".into(),
            key: Some("ab".into()),
            output: Some("cd".into()),
            reason: None,
            seconds: 1.5,
            host: None,
        };
        let log = format!("loading\n{REPORT_PREFIX}{}\nbye\n", serde_json::to_string(&m).unwrap());
        assert_eq!(StageMessage::from_log(&log), Some(m.clone()));
        assert!(m.ok());
        assert!(!StageMessage { output: None, ..m.clone() }.ok());
        assert!(!StageMessage::skipped("train", "upstream stage `pack` failed".into()).ok());
        assert_eq!(StageMessage::from_log("no report here"), None);
        // dora 1.1 keeps node output as JSON lines, the printed line in `msg`.
        let line = format!("{REPORT_PREFIX}{}", serde_json::to_string(&m).unwrap());
        let jsonl = format!(
            "{}\n{}\n",
            serde_json::json!({"node": "pack", "stream": "stderr", "msg": "pack running"}),
            serde_json::json!({"node": "pack", "stream": "stdout", "msg": line})
        );
        assert_eq!(StageMessage::from_log(&jsonl), Some(m));
    }
}
