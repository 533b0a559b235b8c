//! previewd: flags, start-up (store, recovery, watchers, reaper) and the
//! gRPC server with health and reflection.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ::kube::Client;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::model::{Ttl, validate_dns_label};
use crate::previewd::api::{AgentApi, Api, GatewayApi};
use crate::previewd::auth::layer::AuthLayer;
use crate::previewd::auth::serve;
use crate::previewd::auth::tls::{TlsError, TlsOptions};
use crate::previewd::auth::trust;
use crate::previewd::auth::{Auth, AuthMode};
use crate::previewd::cluster::Cluster;
use crate::previewd::cluster::dbservers::ServerResources;
use crate::previewd::manager::{Limits, Manager, Settings};
use crate::previewd::store::{Store, StoreError};
use crate::proto::agent_service_server::AgentServiceServer;
use crate::proto::gateway_service_server::GatewayServiceServer;
use crate::proto::preview_service_server::PreviewServiceServer;

/// previewd's flags; each can also be set by a `PREVIEW_*` environment variable.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "previewd", version, about = "Preview environments server")]
pub struct ServerArgs {
    /// Address for the gRPC API.
    #[arg(long, env = "PREVIEW_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: SocketAddr,
    /// Directory of the redb store [default: the user's data dir/previewd].
    #[arg(long, env = "PREVIEW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TTL of an environment when the client gives none.
    #[arg(long, env = "PREVIEW_DEFAULT_TTL", default_value = "60m")]
    pub default_ttl: String,
    /// The longest TTL a client may ask for.
    #[arg(long, env = "PREVIEW_MAX_TTL", default_value = "24h")]
    pub max_ttl: String,
    /// Let clients ask for environments that never expire.
    #[arg(long, env = "PREVIEW_ALLOW_INFINITE")]
    pub allow_infinite: bool,
    /// Namespace used when neither the request nor the config names one.
    #[arg(long, env = "PREVIEW_DEFAULT_NAMESPACE", default_value = "default")]
    pub default_namespace: String,
    /// Force this imagePullPolicy on preview containers (Never on a registry-less cluster).
    #[arg(long, env = "PREVIEW_IMAGE_PULL_POLICY", value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: Option<String>,
    /// On start, take environment records kept in the cluster into an empty or lost store.
    #[arg(long, env = "PREVIEW_ADOPT")]
    pub adopt: bool,
    /// How often expired environments are looked for.
    #[arg(long, env = "PREVIEW_REAP_INTERVAL", default_value = "1s")]
    pub reap_interval: String,
    /// Instance name: several previewds can share a cluster, each seeing only its own objects.
    #[arg(long, env = "PREVIEW_INSTANCE", default_value = "default")]
    pub instance: String,
    /// The preview-agent image. Without it previewd creates preview pods but
    /// attaches no agents, so no staging traffic reaches them.
    #[arg(long, env = "PREVIEW_AGENT_IMAGE")]
    pub agent_image: Option<String>,
    /// The URL agents in pods use to reach this previewd's gRPC API
    /// [default: http://<--listen> when that is not a loopback or wildcard address].
    #[arg(long, env = "PREVIEW_AGENT_SERVER")]
    pub agent_server: Option<String>,
    /// How long an agent stays attached, idle and with no redirects, after the
    /// last environment on its target is gone. A new environment on the
    /// target within it reuses the agent instead of adding another
    /// ephemeral container (they cannot be removed). 0s: agents leave at once.
    #[arg(long, env = "PREVIEW_AGENT_LINGER", default_value = "10m")]
    pub agent_linger: String,
    /// Address for Prometheus `/metrics` (plain HTTP); off when not given.
    #[arg(long, env = "PREVIEW_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Namespaces no preview may target, for anyone (comma-separated).
    #[arg(long, env = "PREVIEW_DENY_NAMESPACES", value_delimiter = ',', default_value = "kube-system")]
    pub deny_namespaces: Vec<String>,
    /// The most preview pods (replicas counted) one environment may have.
    #[arg(long, env = "PREVIEW_MAX_PODS_PER_ENV", default_value_t = 20)]
    pub max_pods_per_env: usize,
    /// The most regexes one filter may hold (header and path filters, those
    /// inside all_of/any_of counted).
    #[arg(long, env = "PREVIEW_MAX_FILTER_REGEXES", default_value_t = 16)]
    pub max_filter_regexes: usize,
    /// The longest regex a filter may hold, in bytes.
    #[arg(long, env = "PREVIEW_MAX_REGEX_BYTES", default_value_t = 1024)]
    pub max_regex_bytes: usize,
    /// The most replicas one preview pod may ask for (feature.preview.replicas).
    #[arg(long, env = "PREVIEW_MAX_REPLICAS", default_value_t = 10)]
    pub max_replicas: u32,
    /// The most environments one user may have at once.
    #[arg(long, env = "PREVIEW_MAX_ENVS_PER_USER", default_value_t = 20)]
    pub max_envs_per_user: usize,
    /// The most Status watches one user may hold open at once.
    #[arg(long, env = "PREVIEW_MAX_WATCHERS_PER_USER", default_value_t = 16)]
    pub max_watchers_per_user: usize,
    /// How callers are checked. kube: TLS, bearer tokens (TokenReview) and
    /// client certificates (the cluster's client CA) identify them, and RBAC
    /// (SubjectAccessReview) decides. none: plaintext and no checks, accepted
    /// only on a loopback --listen address.
    #[arg(long, env = "PREVIEW_AUTH", value_enum, default_value = "kube")]
    pub auth: AuthMode,
    /// Also accept tokens for the API server's own audience (kubeconfig and
    /// service-account tokens), besides tokens for audience "previewd".
    #[arg(long, env = "PREVIEW_ACCEPT_APISERVER_TOKENS")]
    pub accept_apiserver_tokens: bool,
    /// previewd's own namespace: the Secrets previewd-tls and
    /// previewd-agent-key, and the ConfigMap previewd-ca, live there.
    #[arg(long, env = "PREVIEW_SYSTEM_NAMESPACE", default_value = "preview-system")]
    pub system_namespace: String,
    /// Serve with this certificate (PEM chain) instead of the Secret previewd-tls.
    #[arg(long, env = "PREVIEW_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "PREVIEW_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed --tls-cert, published for clients and agents
    /// [default: the last certificate of --tls-cert].
    #[arg(long, env = "PREVIEW_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// More names or addresses for a certificate previewd makes itself (comma-separated).
    #[arg(long, env = "PREVIEW_TLS_SAN", value_delimiter = ',')]
    pub tls_san: Vec<String>,
    /// Share links are http://<slug>.<share domain>/ (a port may follow the
    /// domain, e.g. preview.test:30080); preview-gateway answers there.
    /// Unset: the Share RPC is refused and no link is ever made.
    #[arg(long, env = "PREVIEW_SHARE_DOMAIN", default_value = "")]
    pub share_domain: String,
    /// What each database branch server asks for: name=quantity,… of cpu,
    /// memory and ephemeral-storage (its data is in an emptyDir). Empty: none.
    #[arg(long, env = "PREVIEW_DB_SERVER_REQUESTS", default_value = "cpu=100m,memory=256Mi,ephemeral-storage=1Gi")]
    pub db_server_requests: String,
    /// What each database branch server may use, in the same form. No CPU
    /// limit by default: a throttled server makes every copy slower.
    #[arg(long, env = "PREVIEW_DB_SERVER_LIMITS", default_value = "memory=1Gi,ephemeral-storage=10Gi")]
    pub db_server_limits: String,
    /// Test hook: stop at this point of Start and wait to be killed.
    #[arg(long, env = "PREVIEW_PAUSE_AT", hide = true)]
    pub pause_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{flag}: {message}")]
    Flag { flag: &'static str, message: String },
    #[error("no usable Kubernetes config (KUBECONFIG or in-cluster): {0}")]
    Kube(#[from] ::kube::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

fn duration_flag(flag: &'static str, s: &str) -> Result<Duration, ServerError> {
    match Ttl::parse(flag, s) {
        Ok(Ttl::Finite(d)) => Ok(d),
        Ok(Ttl::Infinite) => Err(ServerError::Flag { flag, message: "must be a finite duration".into() }),
        Err(e) => Err(ServerError::Flag { flag, message: e.message }),
    }
}

/// `--share-domain`: a DNS name, with an optional port.
fn share_domain(s: &str) -> Result<String, ServerError> {
    let s = s.trim().trim_end_matches('/').to_ascii_lowercase();
    let (host, port) = s.split_once(':').unwrap_or((&s, ""));
    let ok = s.is_empty()
        || (crate::model::validate_dns_subdomain("--share-domain", host).is_ok()
            && (port.is_empty() || port.parse::<u16>().is_ok_and(|p| p > 0)));
    if ok {
        Ok(s)
    } else {
        Err(ServerError::Flag {
            flag: "--share-domain",
            message: format!("{s:?} is not a domain; expected e.g. preview.example.com or preview.test:30080"),
        })
    }
}

impl ServerArgs {
    pub fn settings(&self) -> Result<Settings, ServerError> {
        Ok(Settings {
            default_ttl: duration_flag("--default-ttl", &self.default_ttl)?,
            max_ttl: duration_flag("--max-ttl", &self.max_ttl)?,
            allow_infinite: self.allow_infinite,
            default_namespace: self.default_namespace.clone(),
            pause_at: self.pause_at.clone(),
            share_domain: share_domain(&self.share_domain)?,
            limits: Limits {
                deny_namespaces: self
                    .deny_namespaces
                    .iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect(),
                max_pods_per_env: self.max_pods_per_env,
                max_filter_regexes: self.max_filter_regexes,
                max_regex_bytes: self.max_regex_bytes,
                max_replicas: self.max_replicas,
                max_envs_per_user: self.max_envs_per_user,
            },
        })
    }

    /// Where agents reach previewd (listening on `bound`), when agents are
    /// attached at all.
    pub fn agent_server(&self, bound: SocketAddr) -> Result<Option<String>, ServerError> {
        if self.agent_image.is_none() {
            return Ok(None);
        }
        if let Some(s) = &self.agent_server {
            return Ok(Some(s.clone()));
        }
        let ip = bound.ip();
        if ip.is_loopback() || ip.is_unspecified() {
            return Err(ServerError::Flag {
                flag: "--agent-server",
                message: format!(
                    "required with --agent-image when --listen is {}: the URL agents in pods use to reach previewd",
                    bound
                ),
            });
        }
        let scheme = if self.auth == AuthMode::Kube { "https" } else { "http" };
        Ok(Some(format!("{scheme}://{bound}")))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            let base = std::env::var_os("XDG_DATA_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
                .unwrap_or_else(|| PathBuf::from("/var/lib"));
            base.join("previewd")
        })
    }
}

/// Connects to Kubernetes (KUBECONFIG or in-cluster) and runs [`serve`].
pub async fn run(
    args: ServerArgs,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let client = Client::try_default().await?;
    serve(args, client, listener, shutdown).await
}

/// Opens the store, recovers, and serves on `listener` until `shutdown`.
pub async fn serve(
    args: ServerArgs,
    client: Client,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let settings = args.settings()?;
    let bound = listener.local_addr().map_err(|e| ServerError::Flag { flag: "--listen", message: e.to_string() })?;
    let agent_server = args.agent_server(bound)?;
    let linger = Ttl::parse_duration("--agent-linger", &args.agent_linger)
        .map_err(|e| ServerError::Flag { flag: "--agent-linger", message: e.message })?;
    let reap_every = duration_flag("--reap-interval", &args.reap_interval)?;
    let db_resources = ServerResources::parse(&args.db_server_requests, &args.db_server_limits)
        .map_err(|(flag, message)| ServerError::Flag { flag, message })?;
    validate_dns_label("--instance", &args.instance, 63)
        .map_err(|e| ServerError::Flag { flag: "--instance", message: e.message })?;
    if args.auth == AuthMode::None && !bound.ip().is_loopback() {
        return Err(ServerError::Flag {
            flag: "--auth",
            message: format!(
                "none is accepted only on a loopback --listen address, not {bound}: anyone who reaches it could preview anything"
            ),
        });
    }
    validate_dns_label("--system-namespace", &args.system_namespace, 63)
        .map_err(|e| ServerError::Flag { flag: "--system-namespace", message: e.message })?;
    // TLS material and previewd's key come from the cluster (or its local
    // copy while the API server is away), before anything is served.
    let opts = TlsOptions {
        namespace: args.system_namespace.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        ca: args.tls_ca.clone(),
        sans: args.tls_san.clone(),
    };
    let with_tls = args.auth == AuthMode::Kube;
    let (prover, tls) = trust::load(&client, &opts, bound, with_tls, &args.data_dir()).await?;
    match &tls {
        Some(t) if t.client_ca_pem.is_none() => {
            tracing::warn!("client certificates are refused: the cluster's client CA could not be read")
        }
        Some(_) => {}
        None => tracing::warn!(addr = %bound, "--auth none: no TLS and no checks (loopback only)"),
    }
    let (acceptor, verifier) = match &tls {
        Some(t) => {
            let (a, v) = t.acceptor()?;
            (Some(a), v)
        }
        None => (None, None),
    };
    let auth = Arc::new(Auth::new(args.auth, client.clone(), args.accept_apiserver_tokens, verifier));
    let store = Store::open(&args.data_dir()).await?;
    let manager = Manager::with_auth(
        store,
        Cluster::new(client.clone(), args.image_pull_policy.clone(), args.instance.clone(), args.agent_image.clone())
            .with_agent_server(agent_server.clone())
            .with_agent_trust(tls.as_ref().map(|t| t.ca_pem.clone()), prover.clone())
            .with_db_resources(db_resources),
        settings,
        auth.clone(),
    );

    // Never fails as a whole: a broken environment shows FAILED and is
    // retried by the reaper's tick, and Status is served from the store even
    // while the API server is away.
    let report = manager.recover(args.adopt).await;
    tracing::info!(
        live = report.live,
        recreated = report.recreated,
        adopted = report.adopted.len(),
        expired = report.expired.len(),
        deleted = report.deleted.len(),
        failed = report.failed.len(),
        "recovered"
    );

    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| ServerError::Flag { flag: "--metrics-listen", message: format!("{addr}: {e}") })?;
            let m = manager.clone();
            Some(tokio::spawn(crate::telemetry::serve_text(listener, move |path, _local| {
                Ok(match path {
                    "/metrics" => m.render_metrics(),
                    _ => "ok\n".to_string(),
                })
            })))
        }
        None => None,
    };
    let m = manager.clone();
    let watch =
        tokio::spawn(async move { m.cluster().watch_preview_pods(|p, deleted| m.observe_pod(p, deleted)).await });
    let reaper = tokio::spawn(reap(manager.clone(), reap_every));
    // agent_server is Some exactly when an agent image was given.
    let attacher = match agent_server {
        Some(server) => {
            tracing::info!(image = ?args.agent_image, %server, "attaching agents to previewed targets");
            Some(tokio::spawn(crate::previewd::attach::run(manager.clone(), server, linger)))
        }
        None => {
            tracing::warn!("no --agent-image: preview pods are created but get no traffic from their targets");
            None
        }
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PreviewServiceServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tracing::info!(addr = %bound, "previewd serving");
    let router = tonic::transport::Server::builder()
        .layer(crate::previewd::metrics::EdgeLayer(manager.metrics().clone()))
        .layer(AuthLayer(auth.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(PreviewServiceServer::new(Api::new(manager.clone(), stop_rx.clone(), args.max_watchers_per_user)))
        .add_service(GatewayServiceServer::new(GatewayApi::new(manager.clone(), stop_rx.clone())))
        .add_service(AgentServiceServer::new(AgentApi::new(manager, stop_rx, with_tls.then_some(prover))));
    let result = match acceptor {
        Some(a) => router.serve_with_incoming_shutdown(serve::incoming(listener, a), shutdown).await,
        None => router.serve_with_incoming_shutdown(incoming(listener), shutdown).await,
    };
    watch.abort();
    reaper.abort();
    for task in [attacher, metrics].into_iter().flatten() {
        task.abort();
    }
    Ok(result?)
}

/// Accepted connections with Nagle off: a large snapshot's last segment
/// would otherwise wait ~40 ms for the client's delayed ACK.
fn incoming(listener: TcpListener) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// The TTL reaper, an interval task well inside the 5-second promise; on
/// the same tick, failed environments whose backoff is over are retried.
async fn reap(manager: Arc<Manager>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Each tick is a task of its own: a bug that panics in one must not
        // end TTL enforcement for good.
        let m = manager.clone();
        let tick_done = tokio::spawn(async move {
            let n = m.reap().await;
            if n > 0 {
                m.metrics().reaped(n);
                tracing::info!(expired = n, "reaped environments");
            }
            m.retry_failed().await;
        });
        if let Err(e) = tick_done.await {
            tracing::error!(error = %e, "a reaper tick failed; the next one runs");
        }
    }
}
