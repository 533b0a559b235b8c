//! preview-gateway for tests: deploy/previewd/gateway.yaml in a test's
//! namespace (its cluster-wide role and binding named after it, and deleted
//! after), reached on its NodePort; and a GET through it as a browser sends it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::PostParams;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{TestNs, kubeconfig_path, kubectl, previewd_ca, ready_pods};

/// The node address: NodePorts answer there.
pub const NODE: &str = "198.18.255.254";

/// The gateway of one test namespace.
pub struct ShareGateway {
    pub port: u16,
    role: String,
    deployment: String,
}

impl ShareGateway {
    /// Its ServiceAccount, RBAC and Service; the Deployment waits for
    /// [`ShareGateway::start`] (previewd's address and its share domain,
    /// which holds the NodePort, depend on each other).
    pub async fn service(ns: &TestNs) -> Result<ShareGateway> {
        let (rest, deployment) = gateway_yaml(&ns.name)?;
        // From here on, drop deletes the cluster-wide role and binding.
        let mut gw = ShareGateway { port: 0, role: format!("preview-gateway-{}", ns.name), deployment };
        apply(&ns.name, &rest)?;
        let svc = ns.api::<Service>().get("preview-gateway").await?;
        let port = svc.spec.and_then(|s| s.ports).and_then(|p| p.first()?.node_port).context("no NodePort")?;
        gw.port = u16::try_from(port)?;
        Ok(gw)
    }

    pub fn domain(&self) -> String {
        format!("preview.test:{}", self.port)
    }

    /// previewd's CA in the namespace, then the Deployment, streaming from
    /// `previewd`; returns once its pod is ready (it has the first links).
    pub async fn start(&self, ns: &TestNs, previewd: &str) -> Result<()> {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "previewd-ca"}, "data": {"ca.crt": previewd_ca().await?}
        }))?;
        ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await?;
        apply(&ns.name, &self.deployment.replace(IN_CLUSTER, previewd))?;
        ready_pods(ns, "app.kubernetes.io/name=preview-gateway", 1).await?;
        Ok(())
    }
}

impl Drop for ShareGateway {
    fn drop(&mut self) {
        for kind in ["clusterrolebinding", "clusterrole"] {
            let _ = std::process::Command::new(kubectl())
                .args(["--kubeconfig", &kubeconfig_path(), "delete", kind, &self.role, "--ignore-not-found"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

const IN_CLUSTER: &str = "https://previewd.preview-system.svc.cluster.local:7443";

/// gateway.yaml for `ns`: cluster-wide names made unique, the NodePort
/// left to the cluster. (everything but the Deployment, the Deployment).
fn gateway_yaml(ns: &str) -> Result<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/previewd/gateway.yaml"))?;
    let unique = format!("preview-gateway-{ns}");
    let text = text
        .replace("name: preview-gateway\nrules", &format!("name: {unique}\nrules"))
        .replace(
            "kind: ClusterRoleBinding\nmetadata:\n  name: preview-gateway",
            &format!("kind: ClusterRoleBinding\nmetadata:\n  name: {unique}"),
        )
        .replace("  kind: ClusterRole\n  name: preview-gateway", &format!("  kind: ClusterRole\n  name: {unique}"))
        .replace("namespace: preview-system", &format!("namespace: {ns}"))
        .replace("      nodePort: 30080\n", "");
    ensure!(text.matches(&unique).count() == 3 && text.contains(IN_CLUSTER), "gateway.yaml changed shape:\n{text}");
    let (deployment, rest): (Vec<&str>, Vec<&str>) =
        text.split("\n---\n").partition(|d| d.contains("\nkind: Deployment\n"));
    Ok((rest.join("\n---\n"), deployment.join("\n---\n")))
}

fn apply(ns: &str, yaml: &str) -> Result<()> {
    let mut child = std::process::Command::new(kubectl())
        .args(["--kubeconfig", &kubeconfig_path(), "apply", "-n", ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// GET `/` of `link` through the gateway on its NodePort `port`, as a
/// browser sends it; the status code.
pub async fn status_of(port: u16, link: &str) -> Result<u16> {
    let host = link.trim_start_matches("http://").trim_end_matches('/');
    let mut s = tokio::net::TcpStream::connect((NODE, port)).await?;
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await.context("answer")??;
    let head = String::from_utf8_lossy(&out);
    head.get(9..12).and_then(|c| c.parse().ok()).with_context(|| format!("no status line: {head}"))
}
