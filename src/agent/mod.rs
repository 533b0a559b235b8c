//! preview-agent: the data plane that runs in a target pod's network
//! namespace. It redirects the target's ports to itself and routes each
//! request: to a preview pod (steal), to the app plus a copy (mirror), or to
//! the app unchanged.
//!
//! `run` is a small guard process that starts the worker and removes the
//! worker's rules whatever way it ends (exit, SIGTERM, panic, SIGKILL of the
//! worker). `cleanup` removes rules left when both were killed.

pub mod detect;
pub mod h1;
pub mod intercept;
pub mod metrics;
pub mod proxy;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use intercept::{Backend, Direction};
use metrics::Metrics;
use proxy::Proxy;
use routes::{Route, RouteTable, SharedRoutes};

#[derive(Parser, Debug)]
#[command(name = "preview-agent", version, about = "Routes keyed staging traffic to preview pods")]
pub struct AgentCli {
    #[command(subcommand)]
    pub command: AgentCommand,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// Start the worker under a guard that removes its rules when it ends.
    Run(WorkerArgs),
    /// The worker itself (started by `run`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Remove every agent rule in this network namespace.
    Cleanup,
    /// Wait until a local agent's admin port answers (the outbound sidecar's
    /// postStart hook: the app starts only once the rules are in).
    #[command(hide = true)]
    Ready {
        #[arg(long, default_value = "127.0.0.1:15092")]
        admin: SocketAddr,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// In a preview pod: add the environment key to the `baggage` of every
    /// outgoing HTTP request, so downstream calls stay in the environment.
    Outbound(OutboundArgs),
}

/// The group id of the outbound agent's sockets: its rules skip them.
pub const AGENT_GID: u32 = 1337;

impl AgentCommand {
    /// Threads for this command's runtime: the data plane's setting, else one.
    pub fn threads(&self) -> usize {
        match self {
            AgentCommand::Worker(a) => a.runtime.threads.into(),
            AgentCommand::Outbound(a) => a.runtime.threads.into(),
            _ => 1,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Data-plane threads. One (the default) serves every connection on a
    /// single thread, as linkerd2-proxy does given one core: at a pod's
    /// rates, waking a second thread costs more than it gives.
    #[arg(long, env = "PREVIEW_AGENT_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

/// The runtime of an agent process: one thread, or a work-stealing pool.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }
}

#[derive(Args, Debug, Clone)]
pub struct OutboundArgs {
    /// The environment key to propagate.
    #[arg(long, env = "PREVIEW_KEY")]
    pub key: String,
    /// Where outgoing connections are redirected (REDIRECT in OUTPUT lands on loopback).
    #[arg(long, env = "PREVIEW_AGENT_OUTBOUND_LISTEN", default_value = "127.0.0.1:15002")]
    pub listen: SocketAddr,
    /// Admin port (`/metrics`); bound once the rules are in, so a startup
    /// probe on it tells the kubelet when the app may start.
    #[arg(long, env = "PREVIEW_AGENT_ADMIN", default_value = "0.0.0.0:15092")]
    pub admin: SocketAddr,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Target ports to intercept [default: the ports of the routes, kept in
    /// step as routes change].
    #[arg(long, env = "PREVIEW_AGENT_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,
    /// Where intercepted connections are redirected.
    #[arg(long, env = "PREVIEW_AGENT_LISTEN", default_value = "0.0.0.0:15001")]
    pub listen: SocketAddr,
    /// Admin port (`/metrics`, `/routes`); never intercepted.
    #[arg(long, env = "PREVIEW_AGENT_ADMIN", default_value = "0.0.0.0:15090")]
    pub admin: SocketAddr,
    /// Routes as a JSON list, re-read when the file changes.
    #[arg(long, env = "PREVIEW_AGENT_ROUTES", required_unless_present = "server", conflicts_with = "server")]
    pub routes: Option<PathBuf>,
    /// previewd's address: routes are streamed from it.
    #[arg(long, env = "PREVIEW_AGENT_SERVER", requires_all = ["pod", "namespace"])]
    pub server: Option<String>,
    /// This pod's name (downward API), sent to previewd.
    #[arg(long, env = "POD_NAME")]
    pub pod: Option<String>,
    /// This pod's namespace (downward API), sent to previewd.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    /// Chain name (chosen by the guard).
    #[arg(long, hide = true)]
    pub chain: Option<String>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("routes file {path}: {message}")]
    Routes { path: PathBuf, message: String },
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn read_routes(path: &PathBuf) -> Result<Vec<Route>, AgentError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| AgentError::Routes { path: path.clone(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| AgentError::Routes { path: path.clone(), message: e.to_string() })
}

fn mtime(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The guard: starts the worker, forwards SIGTERM/SIGINT, and removes the
/// worker's chain when it exits, however it exits. Returns its exit code.
pub async fn guard(args: WorkerArgs) -> Result<i32, AgentError> {
    let chain = args.chain.clone().unwrap_or_else(intercept::chain_name);
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker");
    if !args.ports.is_empty() {
        cmd.arg("--ports").arg(args.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    }
    cmd.arg("--threads")
        .arg(args.runtime.threads.to_string())
        .arg("--listen")
        .arg(args.listen.to_string())
        .arg("--admin")
        .arg(args.admin.to_string())
        .arg("--chain")
        .arg(&chain);
    if let Some(r) = &args.routes {
        cmd.arg("--routes").arg(r);
    }
    for (flag, v) in [("--server", &args.server), ("--pod", &args.pod), ("--namespace", &args.namespace)] {
        if let Some(v) = v {
            cmd.arg(flag).arg(v);
        }
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s?,
            _ = term.recv() => forward_term(pid),
            _ = int.recv() => forward_term(pid),
        }
    };
    // The worker removes its rules itself on a clean exit; this covers the rest.
    match Backend::detect().and_then(|b| b.remove(&chain)) {
        Ok(()) => tracing::info!(%chain, ?status, "worker ended; rules removed"),
        Err(e) => tracing::error!(%chain, error = %e, "worker ended; removing rules failed"),
    }
    Ok(status.code().unwrap_or(1))
}

fn forward_term(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Removes every agent chain in this namespace; returns their names.
pub fn cleanup() -> Result<Vec<String>, AgentError> {
    Ok(Backend::detect()?.remove_all()?)
}

/// The worker: listens, installs the rules, routes until SIGTERM or until no
/// route is left, then removes the rules.
pub async fn worker(args: WorkerArgs) -> Result<(), AgentError> {
    let chain = args.chain.clone().unwrap_or_else(intercept::chain_name);
    // Bind first: if another agent holds the port, touch nothing.
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| AgentError::Bind { addr: args.listen, source })?;
    let admin = TcpListener::bind(args.admin).await.map_err(|source| AgentError::Bind { addr: args.admin, source })?;
    let now = crate::previewd::manager::now_ms();
    let mut source = RouteSource::new(&args).await?;
    let first = source.initial.take().unwrap_or_default();
    let initial = RouteTable::compile(first).map_err(|message| AgentError::Routes { path: source.name(), message })?;
    let initial = RouteTable::compile(initial.live(now))
        .map_err(|message| AgentError::Routes { path: source.name(), message })?;
    if initial.is_empty() {
        tracing::info!("no live routes; nothing to do");
        return Ok(());
    }
    let routes = Arc::new(SharedRoutes::default());
    routes.set(initial);
    let metrics = Arc::new(Metrics::default());
    let proxy = Proxy::new(routes.clone(), metrics.clone());

    let mut ports = wanted_ports(&args.ports, &routes.get());
    if ports.is_empty() {
        return Err(AgentError::Routes {
            path: source.name(),
            message: "no ports: give --ports or routes with ports".into(),
        });
    }
    let backend = Backend::detect()?;
    let stale = backend.remove_all()?;
    if !stale.is_empty() {
        tracing::warn!(?stale, "removed rules left by a dead agent");
    }
    backend.install(&chain, &Direction::Inbound(ports.clone()), args.listen.port())?;
    for p in &ports {
        intercept::flush_conntrack(*p);
    }
    tracing::info!(%chain, ?ports, listen = %args.listen, "intercepting");

    tokio::spawn(serve_admin(admin, routes.clone(), metrics.clone()));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let app = match intercept::original_dst(&stream) {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "no original destination; dropping connection");
                    continue;
                }
            };
            tokio::spawn(proxy.clone().serve(stream, app));
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Under a guard: if the guard dies, we are reparented; clean up and go.
    let guard_pid = args.chain.is_some().then(std::os::unix::process::parent_id);
    let why = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = tick.tick() => {
                if guard_pid.is_some_and(|p| p != std::os::unix::process::parent_id()) {
                    break "guard died";
                }
                let now = crate::previewd::manager::now_ms();
                let current = routes.get();
                // New routes if the source has some; either way, drop expired ones.
                let next: Vec<Route> = match source.poll() {
                    Some(r) => r.into_iter().filter(|r| r.expires_at_ms.is_none_or(|t| t > now)).collect(),
                    None => current.live(now),
                };
                if next.len() != current.routes.len() || next.iter().zip(&current.routes).any(|(a, b)| *a != b.route) {
                    match RouteTable::compile(next) {
                        Ok(t) => {
                            tracing::info!(routes = t.routes.len(), "routes updated");
                            routes.set(t);
                        }
                        Err(e) => tracing::warn!(error = %e, "bad routes; keeping the previous ones"),
                    }
                }
                if routes.get().is_empty() {
                    break "no routes left";
                }
                let want = wanted_ports(&args.ports, &routes.get());
                if want != ports {
                    let (b, c, w, to) = (backend.clone(), chain.clone(), want.clone(), args.listen.port());
                    let new: Vec<u16> = want.iter().copied().filter(|p| !ports.contains(p)).collect();
                    // iptables and conntrack block: keep them off the data-plane thread.
                    let changed = tokio::task::spawn_blocking(move || {
                        b.update(&c, &Direction::Inbound(w), to)?;
                        new.into_iter().for_each(intercept::flush_conntrack);
                        Ok::<_, intercept::InterceptError>(())
                    })
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                    match changed {
                        Ok(()) => {
                            tracing::info!(ports = ?want, "intercepted ports changed");
                            ports = want;
                        }
                        Err(e) => tracing::warn!(error = %e, "changing the intercepted ports failed; keeping the old ones"),
                    }
                }
            }
        }
    };
    backend.remove(&chain)?;
    tracing::info!(%chain, why, "rules removed; exiting");
    Ok(())
}

/// The ports to intercept: the flag's, or every port the routes name.
fn wanted_ports(flag: &[u16], table: &RouteTable) -> Vec<u16> {
    if !flag.is_empty() {
        return flag.to_vec();
    }
    let mut ports: Vec<u16> = table.routes.iter().flat_map(|r| r.route.ports.iter().copied()).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Outbound mode (preview pods): redirects every outgoing TCP connection
/// to a proxy that adds the key to HTTP requests and passes the rest on
/// unchanged, until SIGTERM.
pub async fn outbound(args: OutboundArgs) -> Result<(), AgentError> {
    crate::config::validate_key(&args.key)
        .map_err(|e| AgentError::Routes { path: "--key".into(), message: e.message })?;
    // Our own sockets carry this gid, so the rules let them out untouched.
    // SAFETY: setgid(2) has no memory effects; it fails without CAP_SETGID.
    if unsafe { libc::setgid(AGENT_GID) } != 0 {
        return Err(AgentError::Io(std::io::Error::last_os_error()));
    }
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| AgentError::Bind { addr: args.listen, source })?;
    let chain = intercept::chain_name();
    let backend = Backend::detect()?;
    let stale = backend.remove_all()?;
    if !stale.is_empty() {
        tracing::warn!(?stale, "removed rules left by a dead agent");
    }
    backend.install(&chain, &Direction::Outbound { agent_gid: AGENT_GID }, args.listen.port())?;
    let metrics = Arc::new(Metrics::default());
    let admin = match TcpListener::bind(args.admin).await {
        Ok(a) => a,
        Err(source) => {
            backend.remove(&chain)?;
            return Err(AgentError::Bind { addr: args.admin, source });
        }
    };
    tracing::info!(%chain, key = %args.key, "propagating the key on outgoing HTTP");
    tokio::spawn(serve_admin(admin, Arc::default(), metrics.clone()));
    let proxy = Proxy::propagating(metrics, args.key);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            match intercept::original_dst(&stream) {
                Ok(dst) => {
                    tokio::spawn(proxy.clone().serve(stream, dst));
                }
                Err(e) => tracing::debug!(error = %e, "not a redirected connection; dropping it"),
            }
        }
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    backend.remove(&chain)?;
    tracing::info!(%chain, "rules removed; exiting");
    Ok(())
}

/// Polls `admin` until it accepts a connection.
pub async fn ready(admin: SocketAddr, timeout: Duration) -> Result<(), AgentError> {
    let end = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::net::TcpStream::connect(admin).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > end => return Err(AgentError::Bind { addr: admin, source: e }),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Where routes come from: a JSON file (re-read when it changes) or
/// previewd's stream (reconnected in the background; while previewd is
/// unreachable the last routes stay, until they expire).
struct RouteSource {
    initial: Option<Vec<Route>>,
    file: Option<(PathBuf, Option<SystemTime>)>,
    stream: Option<tokio::sync::watch::Receiver<Vec<Route>>>,
}

impl RouteSource {
    async fn new(args: &WorkerArgs) -> Result<RouteSource, AgentError> {
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
        let hello = crate::proto::AgentHello { namespace: ns, pod };
        let mut stream = tokio::time::timeout(Duration::from_secs(15), open_stream(&server, hello.clone()))
            .await
            .map_err(|_| AgentError::Routes { path: server.clone().into(), message: "no answer within 15 s".into() })?
            .map_err(|message| AgentError::Routes { path: server.clone().into(), message })?;
        // previewd may attach us before the preview pod has an address; the
        // first set comes when it has one (nothing is intercepted until then).
        let first = next_set(&mut stream)
            .await
            .map_err(|message| AgentError::Routes { path: server.clone().into(), message })?;
        let (tx, rx) = tokio::sync::watch::channel(first.clone());
        tokio::spawn(follow(server, hello, stream, tx));
        Ok(RouteSource { initial: Some(first), file: None, stream: Some(rx) })
    }

    fn name(&self) -> PathBuf {
        self.file.as_ref().map_or_else(|| "previewd".into(), |(p, _)| p.clone())
    }

    /// New routes since the last call, if any.
    fn poll(&mut self) -> Option<Vec<Route>> {
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

type RouteStreaming = tonic::Streaming<crate::proto::RouteSet>;

async fn open_stream(server: &str, hello: crate::proto::AgentHello) -> Result<RouteStreaming, String> {
    let channel = tonic::transport::Channel::from_shared(server.to_string())
        .map_err(|e| format!("{server:?} is not a URL: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut client = crate::proto::agent_service_client::AgentServiceClient::new(channel);
    Ok(client.routes(hello).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.into_inner())
}

async fn next_set(stream: &mut RouteStreaming) -> Result<Vec<Route>, String> {
    let set = stream.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.ok_or("stream ended")?;
    set.routes.into_iter().map(routes::wire::from_proto).collect()
}

/// Follows previewd's stream; reconnects with a capped backoff when it drops.
async fn follow(
    server: String,
    hello: crate::proto::AgentHello,
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

async fn serve_admin(listener: TcpListener, routes: Arc<SharedRoutes>, metrics: Arc<Metrics>) {
    crate::telemetry::serve_text(listener, move |path| match path {
        "/metrics" => metrics.render(),
        "/routes" => serde_json::to_string(&routes.get().live(i64::MIN)).unwrap_or_default(),
        _ => "ok\n".to_string(),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_default_to_one_and_zero_is_refused() {
        let parse = |extra: &[&str]| {
            let args = ["preview-agent", "worker", "--routes", "r.json"].iter().chain(extra).copied();
            AgentCli::try_parse_from(args)
        };
        assert_eq!(parse(&[]).map(|c| c.command.threads()).ok(), Some(1));
        assert_eq!(parse(&["--threads", "2"]).map(|c| c.command.threads()).ok(), Some(2));
        let err = parse(&["--threads", "0"]).expect_err("0 threads is refused").to_string();
        assert!(err.contains("--threads"), "{err}");
    }
}
