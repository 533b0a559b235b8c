//! How the CLI reaches previewd: the `--server` URL, or else the previewd
//! Service found through the user's kubeconfig and a port-forward through the
//! API server (as `kubectl port-forward` does). Either way one health check
//! proves the connection and reads the server's version.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tonic::transport::{Channel, Endpoint};

use super::CliError;
use crate::model::VERSION_HEADER;

/// The label the previewd Service and pods carry (deploy/previewd).
pub const PREVIEWD_LABEL: &str = "app.kubernetes.io/name=previewd";

/// Where to look for previewd when no `--server` is given.
#[derive(Debug, Clone, Default)]
pub struct Kube {
    pub namespace: String,
    pub context: Option<String>,
    pub kubeconfig: Option<PathBuf>,
}

/// A connected channel, what it goes through, and the server's version.
pub struct Connection {
    pub channel: Channel,
    pub via: String,
    pub server_version: Option<String>,
}

pub async fn connect(server: Option<&str>, kube: &Kube) -> Result<Connection, CliError> {
    let (channel, via) = match server {
        Some(s) => (direct(s).await?, s.to_string()),
        None => forward(kube).await?,
    };
    // One cheap call: it surfaces a wrong address or a non-previewd server
    // now, in one line, and carries the server's version header.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let check = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() });
    let resp = tokio::time::timeout(Duration::from_secs(10), check)
        .await
        .map_err(|_| CliError::Unreachable { via: via.clone(), why: "no answer within 10s".into() })?
        .map_err(|s| CliError::Unreachable { via: via.clone(), why: format!("{:?}: {}", s.code(), s.message()) })?;
    let server_version = resp.metadata().get(VERSION_HEADER).and_then(|v| v.to_str().ok()).map(String::from);
    Ok(Connection { channel, via, server_version })
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

async fn direct(server: &str) -> Result<Channel, CliError> {
    endpoint(server)?
        .connect()
        .await
        .map_err(|e| CliError::Unreachable { via: server.to_string(), why: source_chain(&e) })
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
async fn forward(k: &Kube) -> Result<(Channel, String), CliError> {
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
    let cluster = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).map_err(|e| kc_err(&e))?;
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
    let pods: Api<Pod> = Api::namespaced(client, ns);
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
    // The URI is only a label: the connector decides where bytes go.
    let channel = endpoint(&format!("http://{pod_name}.{ns}:{target}"))?
        .connect_with_connector(connector)
        .await
        .map_err(|e| CliError::Unreachable { via: via.clone(), why: source_chain(&e) })?;
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
