//! The coordinator's control protocol: a WebSocket at `/api/control` carrying JSON
//! `WsRequest`/`WsResponse` frames whose payloads are dora-message's `ControlRequest` and
//! `ControlRequestReply` (what dora's own CLI sends).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use dora_message::cli_to_coordinator::ControlRequest;
use dora_message::coordinator_to_cli::{ControlRequestReply, DataflowResult};
use dora_message::descriptor::Descriptor;
use dora_message::ws_protocol::{WsRequest, WsResponse};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

/// A connection to a coordinator's control endpoint.
pub struct Control {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    addr: SocketAddr,
}

impl Control {
    /// Connects and checks versions (dora's `Hello` handshake).
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/api/control"))
            .await
            .with_context(|| format!("cannot reach a dora coordinator at {addr} (start one with `newt cluster up`)"))?;
        let mut c = Control { ws, addr };
        match c.request(ControlRequest::hello()).await? {
            ControlRequestReply::HelloOk { .. } => Ok(c),
            other => bail!("the dora coordinator at {addr} answered the handshake with {other:?}"),
        }
    }

    /// Sends one request and waits for its reply (frames for other ids are passed over).
    pub async fn request(&mut self, req: ControlRequest) -> anyhow::Result<ControlRequestReply> {
        let id = Uuid::new_v4();
        let frame = WsRequest { id, method: "control".into(), params: serde_json::to_value(&req)? };
        self.ws.send(Message::Text(serde_json::to_string(&frame)?.into())).await?;
        while let Some(msg) = self.ws.next().await {
            let text = match msg? {
                Message::Text(t) => t,
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(resp) = serde_json::from_str::<WsResponse>(&text) else { continue };
            if resp.id != id {
                continue;
            }
            if let Some(e) = resp.error {
                bail!("the dora coordinator at {}: {e}", self.addr);
            }
            let reply: ControlRequestReply = serde_json::from_value(resp.result.unwrap_or_default())?;
            if let ControlRequestReply::Error(e) = reply {
                bail!("the dora coordinator at {}: {e}", self.addr);
            }
            return Ok(reply);
        }
        bail!("the dora coordinator at {} closed the connection", self.addr)
    }

    /// Starts a dataflow; returns its id once every node was spawned.
    pub async fn start(
        &mut self,
        dataflow: Descriptor,
        name: &str,
        working_dir: &std::path::Path,
    ) -> anyhow::Result<Uuid> {
        let reply = self
            .request(ControlRequest::Start {
                build_id: None,
                session_id: dora_message::SessionId::generate(),
                dataflow,
                name: Some(name.to_string()),
                local_working_dir: Some(working_dir.to_path_buf()),
                uv: false,
                write_events_to: None,
            })
            .await?;
        let uuid = match reply {
            ControlRequestReply::DataflowStartTriggered { uuid } | ControlRequestReply::DataflowSpawned { uuid } => {
                uuid
            }
            other => bail!("unexpected reply to Start: {other:?}"),
        };
        match self.request(ControlRequest::WaitForSpawn { dataflow_id: uuid }).await? {
            ControlRequestReply::DataflowSpawned { .. } => Ok(uuid),
            other => bail!("unexpected reply while the dataflow spawned: {other:?}"),
        }
    }

    /// Waits for a dataflow to finish (polling `Check`); its per-node results.
    pub async fn wait(&mut self, uuid: Uuid) -> anyhow::Result<DataflowResult> {
        loop {
            match self.request(ControlRequest::Check { dataflow_uuid: uuid }).await? {
                ControlRequestReply::DataflowStopped { result, .. } => return Ok(result),
                ControlRequestReply::DataflowSpawned { .. } => tokio::time::sleep(Duration::from_millis(250)).await,
                other => bail!("unexpected reply to Check: {other:?}"),
            }
        }
    }

    /// Asks a dataflow to stop (its nodes get a Stop event).
    pub async fn stop(&mut self, uuid: Uuid) -> anyhow::Result<()> {
        self.request(ControlRequest::Stop { dataflow_uuid: uuid, grace_duration: None, force: false }).await.map(|_| ())
    }

    /// Stops a dataflow if it is still running, then waits up to `patience` for it to end: its
    /// per-node results, or `None` when it had not ended by then.
    ///
    /// A failed stop is an error only if the dataflow is still running after `patience`. A
    /// dataflow spread over several daemons ends on each separately: a daemon whose nodes have
    /// all exited (a failed stage, say) drops the dataflow before the coordinator hears of it,
    /// answers the coordinator's stop with "no running dataflow with ID …", and the coordinator
    /// reports the whole stop as failed, though it told the other daemons to stop. So what is
    /// checked is what a stop is for, the dataflow ending, not the coordinator's wording.
    pub async fn stop_and_wait(&mut self, uuid: Uuid, patience: Duration) -> anyhow::Result<Option<DataflowResult>> {
        let stop_error = if self.running(uuid).await? { self.stop(uuid).await.err() } else { None };
        match tokio::time::timeout(patience, self.wait(uuid)).await {
            Ok(result) => result.map(Some),
            Err(_) => match stop_error {
                Some(e) => {
                    Err(e.context(format!("dataflow {uuid} is still running {patience:?} after newt asked to stop it")))
                }
                None => Ok(None),
            },
        }
    }

    /// Whether a dataflow is still running.
    pub async fn running(&mut self, uuid: Uuid) -> anyhow::Result<bool> {
        match self.request(ControlRequest::Check { dataflow_uuid: uuid }).await? {
            ControlRequestReply::DataflowStopped { .. } => Ok(false),
            ControlRequestReply::DataflowSpawned { .. } => Ok(true),
            other => bail!("unexpected reply to Check: {other:?}"),
        }
    }

    /// The end of a node's log (its stdout and stderr, as its daemon kept them).
    pub async fn logs(&mut self, uuid: Uuid, node: &str, tail: usize) -> anyhow::Result<String> {
        match self
            .request(ControlRequest::Logs { uuid: Some(uuid), name: None, node: node.to_string(), tail: Some(tail) })
            .await?
        {
            ControlRequestReply::Logs(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            other => bail!("unexpected reply to Logs: {other:?}"),
        }
    }

    /// The machine ids of the daemons connected now.
    pub async fn daemons(&mut self) -> anyhow::Result<Vec<String>> {
        match self.request(ControlRequest::ConnectedMachines).await? {
            ControlRequestReply::ConnectedDaemons(list) => {
                Ok(list.into_iter().map(|d| d.daemon_id.machine_id().unwrap_or_default().to_string()).collect())
            }
            other => bail!("unexpected reply to ConnectedMachines: {other:?}"),
        }
    }

    /// Stops the coordinator and every daemon connected to it (`dora destroy`).
    pub async fn destroy(&mut self) -> anyhow::Result<()> {
        self.request(ControlRequest::Destroy).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dora_message::uhlc::HLC;
    use tokio::net::TcpListener;

    /// A stand-in coordinator on a loopback port, for one connection: it answers the handshake,
    /// and every other request with `answer`.
    async fn coordinator(mut answer: impl FnMut(ControlRequest) -> ControlRequestReply + Send + 'static) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let req: WsRequest = serde_json::from_str(&text).unwrap();
                let reply = match serde_json::from_value::<ControlRequest>(req.params).unwrap() {
                    ControlRequest::Hello { .. } => {
                        ControlRequestReply::HelloOk { dora_version: dora_message::current_crate_version() }
                    }
                    other => answer(other),
                };
                let frame = WsResponse::ok(req.id, serde_json::to_value(&reply).unwrap());
                if ws.send(Message::Text(serde_json::to_string(&frame).unwrap().into())).await.is_err() {
                    break;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stop_refused_by_a_daemon_whose_part_had_ended_still_gives_the_dataflows_result() {
        let uuid = Uuid::new_v4();
        let mut checks = 0;
        let addr = coordinator(move |req| match req {
            // Running when asked, ended when checked again.
            ControlRequest::Check { .. } => {
                checks += 1;
                if checks == 1 {
                    ControlRequestReply::DataflowSpawned { uuid }
                } else {
                    let result = DataflowResult::ok_empty(uuid, HLC::default().new_timestamp());
                    ControlRequestReply::DataflowStopped { uuid, result }
                }
            }
            // dora 1.1's answer when one daemon had already dropped the dataflow.
            ControlRequest::Stop { .. } => ControlRequestReply::Error(format!(
                "failed to stop dataflow `{uuid}` on 1 of 2 daemon(s): gpu: failed to stop dataflow: \
                 no running dataflow with ID `{uuid}`"
            )),
            other => panic!("unexpected request {other:?}"),
        })
        .await;
        let mut c = Control::connect(addr).await.unwrap();
        let result = c.stop_and_wait(uuid, Duration::from_secs(5)).await.unwrap();
        assert_eq!(result.map(|r| r.uuid), Some(uuid));
    }

    #[tokio::test]
    async fn a_failed_stop_is_an_error_while_the_dataflow_keeps_running() {
        let uuid = Uuid::new_v4();
        let addr = coordinator(move |req| match req {
            ControlRequest::Check { .. } => ControlRequestReply::DataflowSpawned { uuid },
            ControlRequest::Stop { .. } => ControlRequestReply::Error(format!(
                "failed to stop dataflow `{uuid}` on 1 of 2 daemon(s): gpu: no daemon connection"
            )),
            other => panic!("unexpected request {other:?}"),
        })
        .await;
        let mut c = Control::connect(addr).await.unwrap();
        let e = format!("{:#}", c.stop_and_wait(uuid, Duration::from_secs(1)).await.unwrap_err());
        assert!(e.contains("still running") && e.contains("no daemon connection"), "{e}");
    }
}
