//! `newt cluster up | coordinator | daemon`: dora-rs's coordinator and daemons, run by the newt
//! binary itself (graph/dora/src/cluster.rs), so a cluster needs nothing besides newt.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use newt_dora::cluster::{DaemonSpec, LOCAL_LISTEN_PORT_ENV, parse_labels};

use crate::cli::{Cli, ClusterCommand};

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Runs `newt cluster ...`.
pub fn cluster(_cli: &Cli, command: &ClusterCommand) -> anyhow::Result<i32> {
    match command {
        ClusterCommand::Coordinator { bind, port } => {
            let addr = SocketAddr::new(*bind, *port);
            runtime()?.block_on(newt_dora::cluster::coordinator(addr, |p| {
                eprintln!("dora coordinator: listening on {}:{p}", addr.ip())
            }))?;
            Ok(0)
        }
        ClusterCommand::Daemon {
            coordinator,
            machine_id,
            labels,
            local_port,
            zenoh_listen,
            zenoh_connect,
            no_multicast,
        } => {
            // Before any thread starts: the daemon's nodes find it through this variable.
            // SAFETY: no other thread exists yet in this process.
            unsafe {
                std::env::set_var(LOCAL_LISTEN_PORT_ENV, local_port.to_string());
                // Inherited by the nodes this daemon starts: their reports name the machine.
                std::env::set_var(newt_dora::node::MACHINE_ENV, machine_id);
            }
            let spec = DaemonSpec {
                coordinator: *coordinator,
                machine_id: machine_id.clone(),
                labels: parse_labels(labels)?,
                local_listen_port: *local_port,
                zenoh_listen: zenoh_listen.map(|a| (a.ip(), a.port())),
                zenoh_connect: zenoh_connect.clone(),
                no_multicast: *no_multicast,
            };
            eprintln!("dora daemon `{machine_id}` (labels {:?}) for coordinator {coordinator}", spec.labels);
            runtime()?.block_on(newt_dora::cluster::daemon(spec))?;
            Ok(0)
        }
        ClusterCommand::Up { port, daemons } => up(*port, daemons),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

/// Kills and reaps the children when `up` returns, however it returns.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
        }
        for (_, c) in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// A machine id from a daemon's labels: `cpu`, `gpu`, `cpu-gpu`, made unique with its index.
fn machine_id(labels: &str, i: usize, taken: &[String]) -> String {
    let base: String = labels
        .split(',')
        .map(|l| l.split('=').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' })
        .collect();
    let base = if base.is_empty() { format!("daemon{i}") } else { base };
    if taken.contains(&base) { format!("{base}-{i}") } else { base }
}

/// `newt cluster up`: a coordinator and daemons on 127.0.0.1, each its own process (as on a
/// real cluster), until Ctrl-C or SIGTERM; then `Destroy` stops them.
fn up(port: u16, daemons: &[String]) -> anyhow::Result<i32> {
    let exe = std::env::current_exe()?;
    let labels: Vec<String> = if daemons.is_empty() { vec!["cpu,gpu".to_string()] } else { daemons.to_vec() };
    let coordinator = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut children = Children(Vec::new());
    children.0.push((
        "coordinator".into(),
        Command::new(&exe)
            .args(["cluster", "coordinator", "--bind", "127.0.0.1", "--port", &port.to_string()])
            .spawn()?,
    ));
    let t0 = Instant::now();
    while TcpStream::connect_timeout(&coordinator, Duration::from_millis(200)).is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "the dora coordinator did not listen on {coordinator} within 30 s"
        );
        if let Some(status) = children.0[0].1.try_wait()? {
            anyhow::bail!("the dora coordinator exited ({status}) before listening on {coordinator}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let zenoh: Vec<u16> = labels.iter().map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let mut ids: Vec<String> = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        parse_labels(l)?;
        let id = machine_id(l, i, &ids);
        let mut cmd = Command::new(&exe);
        cmd.args(["cluster", "daemon", "--coordinator", &coordinator.to_string(), "--machine-id", &id])
            .args(["--labels", l, "--local-port", &free_port()?.to_string()])
            .args(["--zenoh-listen", &format!("127.0.0.1:{}", zenoh[i]), "--no-multicast"]);
        for (j, z) in zenoh.iter().enumerate() {
            if j != i {
                cmd.args(["--zenoh-connect", &format!("tcp/127.0.0.1:{z}")]);
            }
        }
        children.0.push((format!("daemon {id}"), cmd.spawn()?));
        ids.push(id);
    }
    let rt = runtime()?;
    rt.block_on(async {
        let t0 = Instant::now();
        loop {
            let connected = match newt_dora::client::Control::connect(coordinator).await {
                Ok(mut c) => c.daemons().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            if ids.iter().all(|id| connected.contains(id)) {
                break;
            }
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(60),
                "not every daemon connected within 60 s (connected: {connected:?}, expected: {ids:?})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::Ok(())
    })?;
    let shown: Vec<String> = ids
        .iter()
        .zip(&labels)
        .zip(&children.0[1..])
        .map(|((id, l), (_, child))| format!("{id} [{l}] pid {}", child.id()))
        .collect();
    // Whoever started us may stop reading stdout: a closed pipe must not end the cluster.
    use std::io::Write;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready: dora coordinator {coordinator}; daemons {}", shown.join(", "));
    let _ = writeln!(out, "  newt run PIPELINE --executor dora --coordinator {coordinator}");
    let _ = out.flush();
    let code = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?);
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if let Ok(mut c) = newt_dora::client::Control::connect(coordinator).await {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.destroy()).await;
        }
        anyhow::Ok(0)
    })?;
    eprintln!("dora cluster stopped");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::machine_id;

    #[test]
    fn machine_ids_come_from_labels_and_stay_unique() {
        let a = machine_id("cpu", 0, &[]);
        assert_eq!(a, "cpu");
        assert_eq!(machine_id("gpu, zone=eu", 1, &[a.clone()]), "gpu-zone");
        assert_eq!(machine_id("cpu", 2, &[a]), "cpu-2");
        assert_eq!(machine_id("", 3, &[]), "daemon3");
    }
}
