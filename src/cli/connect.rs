//! How the CLI reaches previewd: the `--server` URL, or else the previewd
//! Service found through the user's kubeconfig and a port-forward through the
//! API server (as `kubectl port-forward` does). Either way it speaks TLS
//! (unless the URL is `http://`), presents the kubeconfig's credentials, and
//! one health check proves the connection and reads the server's version.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::CliError;
use super::creds::{Bearer, Credentials};
use crate::model::VERSION_HEADER;

/// A channel that carries the caller's bearer token, if any.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// The ConfigMap previewd publishes its CA in, and the key (auth::tls).
const CA_CONFIGMAP: &str = "previewd-ca";
const CA_KEY: &str = "ca.crt";

/// The label the previewd Service and pods carry (deploy/previewd).
pub const PREVIEWD_LABEL: &str = "app.kubernetes.io/name=previewd";

/// Where to look for previewd when no `--server` is given.
#[derive(Debug, Clone, Default)]
pub struct Kube {
    pub namespace: String,
    pub context: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// The CA to trust [default: the ConfigMap previewd-ca in `namespace`].
    pub ca_file: Option<PathBuf>,
    /// A bearer token instead of the kubeconfig's credentials.
    pub token: Option<String>,
}

/// A connected channel, what it goes through, and the server's version.
pub struct Connection {
    pub channel: AuthChannel,
    pub via: String,
    pub server_version: Option<String>,
}

pub async fn connect(server: Option<&str>, kube: &Kube) -> Result<Connection, CliError> {
    let (channel, via) = match server {
        Some(s) => {
            endpoint(s)?; // a malformed URL is a usage error, before anything is read
            let session = session(kube).await;
            let plain = s.starts_with("http://");
            // A URL given directly may need no kubeconfig at all (a loopback
            // previewd with --auth none), so a missing one is not an error yet.
            let (client, mut creds) = match session {
                Ok((c, creds, _)) => (Some(c), creds),
                Err(e) if plain || kube.ca_file.is_some() => {
                    tracing::debug!(error = %e, "no kubeconfig credentials");
                    (None, Credentials::default())
                }
                Err(e) => return Err(e),
            };
            override_token(&mut creds, kube);
            if !plain {
                creds.ca_pem = Some(trusted_ca(kube, client.as_ref(), s).await?);
            }
            (direct(s, &creds, None).await?, s.to_string())
        }
        None => forward(kube).await?,
    };
    check(channel, via).await
}

/// A client for a URL with the given credentials (tools and tests).
pub async fn connect_with(server: &str, creds: &Credentials) -> Result<Connection, CliError> {
    let channel = direct(server, creds, None).await?;
    check(channel, server.to_string()).await
}

async fn check(channel: AuthChannel, via: String) -> Result<Connection, CliError> {
    // One cheap call: it surfaces a wrong address, refused credentials or a
    // non-previewd server now, in one line, and carries the version header.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
    let resp = tokio::time::timeout(Duration::from_secs(10), check)
        .await
        .map_err(|_| CliError::Unreachable { via: via.clone(), why: "no answer within 10s".into() })?
        .map_err(|s| CliError::Unreachable { via: via.clone(), why: format!("{:?}: {}", s.code(), s.message()) })?;
    let server_version = resp.metadata().get(VERSION_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
    Ok(Connection { channel, via, server_version })
}

fn override_token(creds: &mut Credentials, kube: &Kube) {
    if let Some(t) = &kube.token {
        creds.token = Some(t.clone());
        creds.identity = None;
    }
}

/// The kubeconfig's client and the credentials it holds for the user.
async fn session(k: &Kube) -> Result<(kube::Client, Credentials, String), CliError> {
    let ctx = k.context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default();
    let kc_err = |e: &dyn std::fmt::Display| CliError::Unreachable {
        via: format!("the kubeconfig{ctx}"),
        why: format!("{e}; give --server, or --kubeconfig/--context"),
    };
    let kubeconfig = match &k.kubeconfig {
        Some(p) => Kubeconfig::read_from(p).map_err(|e| kc_err(&e))?,
        None => Kubeconfig::read().map_err(|e| kc_err(&e))?,
    };
    let opts = KubeConfigOptions { context: k.context.clone(), ..Default::default() };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &opts).await.map_err(|e| kc_err(&e))?;
    let creds = Credentials::from_auth_info(&config.auth_info).map_err(|e| kc_err(&e))?;
    let cluster = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| kc_err(&e))?;
    Ok((client, creds, cluster))
}

/// `--ca-file`, else the CA previewd published in its namespace.
async fn trusted_ca(k: &Kube, client: Option<&kube::Client>, via: &str) -> Result<String, CliError> {
    let unreachable = |why: String| CliError::Unreachable { via: via.to_string(), why };
    if let Some(f) = &k.ca_file {
        return std::fs::read_to_string(f).map_err(|e| unreachable(format!("--ca-file {}: {e}", f.display())));
    }
    let client = client.ok_or_else(|| unreachable("no CA to trust: give --ca-file, or a kubeconfig".into()))?;
    let ns = &k.namespace;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get(CA_CONFIGMAP).await.map_err(|e| {
        unreachable(format!("reading previewd's CA from configmap {ns}/{CA_CONFIGMAP}: {e}; or give --ca-file"))
    })?;
    cm.data
        .and_then(|d| d.get(CA_KEY).cloned())
        .ok_or_else(|| unreachable(format!("configmap {ns}/{CA_CONFIGMAP} has no {CA_KEY}")))
}

fn endpoint(uri: &str) -> Result<Endpoint, CliError> {
    let usage = || CliError::Usage(format!("--server {uri:?}: expected a URL like http://previewd:7443"));
    let parsed: http::Uri = uri.parse().map_err(|_| usage())?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return Err(usage());
    }
    Ok(Channel::from_shared(uri.to_string())
        .map_err(|_| usage())?
        .connect_timeout(Duration::from_secs(5))
        // Snapshots of many environments are large: a 64 KiB HTTP/2 window
        // would cost several round trips each.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20)))
}

/// TLS settings for `creds`: the CA to trust, the client certificate, and
/// the name to check when the address is not previewd's own (a port-forward).
fn tls(creds: &Credentials, server_name: Option<&str>) -> Option<ClientTlsConfig> {
    let ca = creds.ca_pem.as_ref()?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = &creds.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    Some(tls)
}

async fn direct(server: &str, creds: &Credentials, server_name: Option<&str>) -> Result<AuthChannel, CliError> {
    let unreachable = |why: String| CliError::Unreachable { via: server.to_string(), why };
    let mut ep = endpoint(server)?;
    if server.starts_with("https://") {
        let tls = tls(creds, server_name).ok_or_else(|| unreachable("https needs a CA to trust".into()))?;
        ep = ep.tls_config(tls).map_err(|e| unreachable(source_chain(&e)))?;
    }
    let channel = ep.connect().await.map_err(|e| unreachable(source_chain(&e)))?;
    Ok(InterceptedService::new(channel, Bearer::new(creds.token.as_deref()).map_err(unreachable)?))
}

/// The innermost cause, which is the useful part ("Connection refused").
fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

/// Finds the previewd Service and a ready pod behind it, and returns a
/// channel whose every connection is a fresh port-forward to that pod.
async fn forward(k: &Kube) -> Result<(AuthChannel, String), CliError> {
    let ctx = k.context.as_deref().map(|c| format!(" (context {c})")).unwrap_or_default();
    let (client, mut creds, cluster) = session(k).await?;
    override_token(&mut creds, k);
    let ns = &k.namespace;
    let looked = format!("a Service labelled {PREVIEWD_LABEL} in namespace {ns} of {cluster}{ctx}");
    let not_found = |why: String| CliError::Unreachable { via: looked.clone(), why };

    let services = Api::<Service>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(PREVIEWD_LABEL))
        .await
        .map_err(|e| not_found(e.to_string()))?;
    let Some(svc) = services.items.into_iter().next() else {
        return Err(not_found(
            "none found; install it with `kubectl apply -k deploy/previewd`, or give --server / --previewd-namespace"
                .into(),
        ));
    };
    let spec = svc.spec.unwrap_or_default();
    let port = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.name.as_deref() == Some("grpc"))
        .ok_or_else(|| not_found("the Service has no port named grpc".into()))?;
    let selector = spec.selector.unwrap_or_default();
    let labels = selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&labels))
        .await
        .map_err(|e| not_found(e.to_string()))?;
    let Some(pod) = pods.items.into_iter().find(is_ready) else {
        return Err(not_found(format!("no ready pod matches {labels}")));
    };
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let target = container_port(&pod, port.target_port.as_ref(), port.port)
        .ok_or_else(|| not_found(format!("pod {pod_name} has no container port for the Service's grpc port")))?;

    let via = format!("port-forward to pod {ns}/{pod_name}:{target} via {cluster}{ctx}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let name = pod_name.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            let mut pf = pods.portforward(&name, &[target]).await?;
            let stream = pf.take_stream(target).ok_or("port-forward gave no stream")?;
            // The forwarder's task runs on after this handle is dropped.
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    creds.ca_pem = Some(trusted_ca(k, Some(&client), &via).await?);
    let unreachable = |why: String| CliError::Unreachable { via: via.clone(), why };
    // The URI is only a label: the connector decides where bytes go. TLS
    // checks the certificate against the Service's name, as in the cluster.
    let tls = tls(&creds, Some(&format!("previewd.{ns}.svc"))).ok_or_else(|| unreachable("no CA".into()))?;
    let channel = endpoint(&format!("https://{pod_name}.{ns}:{target}"))?
        .tls_config(tls)
        .map_err(|e| unreachable(source_chain(&e)))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| unreachable(source_chain(&e)))?;
    let channel = InterceptedService::new(channel, Bearer::new(creds.token.as_deref()).map_err(unreachable)?);
    Ok((channel, via))
}

fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's port number for a Service targetPort (a number or a port name;
/// absent means the same as the Service port).
fn container_port(
    pod: &Pod,
    target: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    service_port: i32,
) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let n = match target {
        None => service_port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_deref() == Some(name))?
                .container_port
        }
    };
    u16::try_from(n).ok()
}
