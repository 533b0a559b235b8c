//! Where a worker's routes come from: a JSON file (re-read when it changes)
//! or previewd's route stream (reconnected with backoff).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::cli::WorkerArgs;
use super::error::AgentError;
use crate::model::Route;
use crate::{proto, wire};

fn read_routes(path: &PathBuf) -> Result<Vec<Route>, AgentError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| AgentError::Routes { path: path.clone(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| AgentError::Routes { path: path.clone(), message: e.to_string() })
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Where routes come from: a JSON file (re-read when it changes) or
/// previewd's stream (reconnected in the background; while previewd is
/// unreachable the last routes stay, until they expire).
pub(super) struct RouteSource {
    pub(super) initial: Option<Vec<Route>>,
    file: Option<(PathBuf, Option<SystemTime>)>,
    stream: Option<tokio::sync::watch::Receiver<Vec<Route>>>,
}

impl RouteSource {
    pub(super) async fn new(args: &WorkerArgs) -> Result<RouteSource, AgentError> {
        if let Some(path) = &args.routes {
            let seen = mtime(path);
            return Ok(RouteSource {
                initial: Some(read_routes(path)?),
                file: Some((path.clone(), seen)),
                stream: None,
            });
        }
        let (server, pod, ns) = match (&args.server, &args.pod, &args.namespace) {
            (Some(s), Some(p), Some(n)) => (s.clone(), p.clone(), n.clone()),
            _ => {
                return Err(AgentError::Routes {
                    path: "--server".into(),
                    message: "needs --server, --pod and --namespace".into(),
                });
            }
        };
        let server = Server { url: server, ca: args.ca.clone(), proof: args.proof.clone() };
        let hello = proto::AgentHello { namespace: ns, pod };
        let mut stream = tokio::time::timeout(Duration::from_secs(15), open_stream(&server, hello.clone()))
            .await
            .map_err(|_| AgentError::Routes {
                path: server.url.clone().into(),
                message: "no answer within 15 s".into(),
            })?
            .map_err(|message| AgentError::Routes { path: server.url.clone().into(), message })?;
        // previewd may attach us before the preview pod has an address; the
        // first set comes when it has one (nothing is intercepted until then).
        let first = next_set(&mut stream)
            .await
            .map_err(|message| AgentError::Routes { path: server.url.clone().into(), message })?;
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        tokio::spawn(follow(server, hello, stream, tx));
        Ok(RouteSource { initial: Some(first), file: None, stream: Some(rx) })
    }

    pub(super) fn name(&self) -> PathBuf {
        self.file.as_ref().map_or_else(|| "previewd".into(), |(p, _)| p.clone())
    }

    /// New routes since the last call, if any.
    pub(super) fn poll(&mut self) -> Option<Vec<Route>> {
        if let Some((path, seen)) = &mut self.file {
            let m = mtime(path);
            if m == *seen {
                return None;
            }
            *seen = m;
            return match read_routes(path) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "keeping the previous routes");
                    None
                }
            };
        }
        let rx = self.stream.as_mut()?;
        if rx.has_changed().unwrap_or(false) { Some(rx.borrow_and_update().clone()) } else { None }
    }
}

type RouteStreaming = tonic::Streaming<proto::RouteSet>;

/// previewd's address, the CA to trust there, and this agent's proof of its pod.
#[derive(Clone)]
struct Server {
    url: String,
    ca: Option<String>,
    proof: Option<String>,
}

/// A channel to previewd at `url`, trusting `ca` (PEM) when it is TLS.
pub(super) async fn connect(url: &str, ca: Option<&str>) -> Result<tonic::transport::Channel, String> {
    let mut endpoint = tonic::transport::Channel::from_shared(url.to_string())
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = ca {
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS settings: {e}"))?;
    }
    endpoint.connect().await.map_err(|e| format!("connecting: {e}"))
}

async fn open_stream(server: &Server, hello: proto::AgentHello) -> Result<RouteStreaming, String> {
    let channel = connect(&server.url, server.ca.as_deref()).await?;
    let mut client = proto::agent_service_client::AgentServiceClient::new(channel);
    let mut req = tonic::Request::new(hello);
    if let Some(proof) = server.proof.as_deref().and_then(|p| p.parse().ok()) {
        req.metadata_mut().insert(crate::model::podspec::PROOF_HEADER, proof);
    }
    Ok(client.routes(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.into_inner())
}

async fn next_set(stream: &mut RouteStreaming) -> Result<Vec<Route>, String> {
    let set = stream.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.ok_or("stream ended")?;
    set.routes.into_iter().map(wire::route_from_proto).collect()
}

/// Follows previewd's stream; reconnects with a capped backoff when it drops.
async fn follow(
    server: Server,
    hello: proto::AgentHello,
    mut stream: RouteStreaming,
    tx: tokio::sync::watch::Sender<Vec<Route>>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match next_set(&mut stream).await {
            Ok(routes) => {
                backoff = Duration::from_millis(250);
                if tx.send(routes).is_err() {
                    return;
                }
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "route stream lost; keeping the last routes until they expire"),
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match open_stream(&server, hello.clone()).await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "reconnecting to previewd"),
            }
        }
    }
}
