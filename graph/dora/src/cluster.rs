//! A dora coordinator and daemons inside newt's own binary: `newt cluster coordinator`,
//! `newt cluster daemon` (each one process, what a real cluster runs per machine) and
//! `newt cluster up` (a coordinator and N daemons on this machine, loopback only, zenoh
//! multicast off, for trying it out and for tests).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The coordinator's default port (dora's).
pub const COORDINATOR_PORT: u16 = dora_core::topics::DORA_COORDINATOR_PORT_WS_DEFAULT;

/// The environment variable through which a daemon's nodes find it (dora's).
pub const LOCAL_LISTEN_PORT_ENV: &str = dora_core::topics::DORA_DAEMON_LOCAL_LISTEN_PORT_ENV;

fn eyre(e: eyre::Report) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

/// Runs a coordinator on `bind` until it is destroyed or the process is interrupted; `ready`
/// is told the port it listens on.
pub async fn coordinator(bind: SocketAddr, ready: impl FnOnce(u16)) -> anyhow::Result<()> {
    let store = Arc::new(dora_coordinator_store::InMemoryStore::new());
    let (port, run) = dora_coordinator::start(bind, futures::stream::empty(), store, ()).await.map_err(eyre)?;
    ready(port);
    run.await.map_err(eyre)
}

/// One daemon.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// The coordinator's address.
    pub coordinator: SocketAddr,
    /// Its machine id (what `deploy.machine` names).
    pub machine_id: String,
    /// Its labels (what `deploy.labels` matches): `gpu=true`, `cpu=true`, ...
    pub labels: BTreeMap<String, String>,
    /// The port its nodes connect to (distinct per daemon on one host). The caller must also
    /// set [`LOCAL_LISTEN_PORT_ENV`] to it before starting threads.
    pub local_listen_port: u16,
    /// Where its zenoh listener binds (the address other daemons dial); `None`: derived from
    /// the coordinator's address.
    pub zenoh_listen: Option<(IpAddr, u16)>,
    /// The other daemons' zenoh endpoints (`tcp/127.0.0.1:PORT`), dialed directly.
    pub zenoh_connect: Vec<String>,
    /// Zenoh without multicast scouting (loopback clusters, networks without multicast).
    pub no_multicast: bool,
}

/// Runs a daemon until its coordinator goes away.
pub async fn daemon(spec: DaemonSpec) -> anyhow::Result<()> {
    let listen = spec.zenoh_listen.map(|(addr, port)| dora_core::topics::ZenohListen { addr, port: Some(port) });
    dora_daemon::Daemon::run_with_zenoh_listen(
        spec.coordinator,
        Some(spec.machine_id),
        spec.labels,
        spec.local_listen_port,
        dora_daemon::ZenohOptions {
            inter_daemon_peer: None,
            listen,
            connect: spec.zenoh_connect,
            disable_multicast: spec.no_multicast,
        },
    )
    .await
    .map_err(eyre)
}

/// Parses `key=value,key=value` labels.
pub fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        anyhow::ensure!(!k.trim().is_empty(), "label `{pair}`: the key is empty");
        map.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_parse_with_a_bare_name_meaning_true() {
        let m = parse_labels("gpu, zone = eu,").unwrap();
        assert_eq!(m.get("gpu").map(String::as_str), Some("true"));
        assert_eq!(m.get("zone").map(String::as_str), Some("eu"));
        assert_eq!(m.len(), 2);
        assert!(parse_labels("=x").is_err());
    }
}
