//! Issue 2: the local cluster is real. Nodes, control-plane health, service
//! DNS and ClusterIP from a second pod, ephemeral containers sharing the pod's
//! network namespace, and images that are never pulled.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, LogParams, Patch, PatchParams, PostParams};

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn node_ready_and_control_plane_healthy() -> Result<()> {
    let client = client().await?;
    let nodes = Api::<Node>::all(client.clone()).list(&Default::default()).await?;
    ensure!(nodes.items.len() == 1, "expected one node, got {}", nodes.items.len());
    let ready = nodes.items[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    ensure!(ready.as_deref() == Some("True"), "node not Ready: {ready:?}");
    for path in ["/livez", "/readyz"] {
        let req = http::Request::get(path).body(Vec::new())?;
        let body = client.request_text(req).await.with_context(|| format!("apiserver {path}"))?;
        ensure!(body.trim() == "ok", "apiserver {path}: {body}");
    }
    for url in ["https://127.0.0.1:10257/healthz", "https://127.0.0.1:10259/livez", "https://127.0.0.1:10259/readyz"] {
        let out = std::process::Command::new("curl").args(["-ksf", url]).output()?;
        ensure!(out.status.success() && out.stdout == b"ok", "{url}: {:?}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn service_reachable_by_dns_and_cluster_ip_from_another_pod() -> Result<()> {
    let ns = TestNs::new("t-dns").await?;
    echo_app(&ns, "echo", "v1", 2, &[]).await?;
    let replicas: BTreeSet<String> =
        ready_pods(&ns, "app=echo", 2).await?.into_iter().filter_map(|p| p.metadata.name).collect();
    let client = client_pod(&ns, "client").await?;
    let client_name = client.metadata.name.clone().context("pod name")?;
    let svc = ns.api::<Service>().get("echo").await?;
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).context("no ClusterIP")?;
    ensure!(cluster_ip.starts_with("198.19."), "ClusterIP {cluster_ip} outside 198.19.0.0/16");
    let urls = [format!("http://echo.{}.svc.cluster.local:8080/", ns.name), format!("http://{cluster_ip}:8080/")];
    for url in urls {
        // Both replicas must answer; kube-proxy picks at random, so ask until both have.
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let out = exec(&ns, &client_name, "client", &["/usr/local/bin/preview-echo", "get", &url]).await?;
            let v: serde_json::Value = serde_json::from_str(out.trim()).with_context(|| format!("answer: {out}"))?;
            ensure!(v["version"] == "v1", "{url}: {v}");
            seen.insert(v["pod"].as_str().unwrap_or_default().to_string());
            if seen == replicas {
                break;
            }
        }
        ensure!(seen == replicas, "{url}: answered by {seen:?}, expected {replicas:?}");
    }
    Ok(())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn ephemeral_container_shares_the_pod_network() -> Result<()> {
    let ns = TestNs::new("t-eph").await?;
    echo_app(&ns, "echo", "v1", 1, &[]).await?;
    let pod = ready_pods(&ns, "app=echo", 1).await?.remove(0);
    let name = pod.metadata.name.clone().context("name")?;
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("pod IP")?;
    let patch = serde_json::json!({"spec": {"ephemeralContainers": [
        {"name": "probe-ip", "image": "preview.local/echo:v1", "imagePullPolicy": "Never", "args": ["whoami"]},
        {"name": "probe-app", "image": "preview.local/echo:v1", "imagePullPolicy": "Never", "args": ["get", "http://127.0.0.1:8080/from-ephemeral"]},
    ]}});
    let pods = ns.api::<Pod>();
    pods.patch_ephemeral_containers(&name, &PatchParams::default(), &Patch::Strategic(patch)).await?;
    let logs = |c: &'static str| {
        let (pods, name) = (pods.clone(), name.clone());
        async move {
            let done = pods.get(&name).await?.status.and_then(|s| s.ephemeral_container_statuses).is_some_and(|cs| {
                cs.iter().any(|s| s.name == c && s.state.as_ref().and_then(|st| st.terminated.as_ref()).is_some())
            });
            if !done {
                return Ok(None);
            }
            Ok(Some(pods.logs(&name, &LogParams { container: Some(c.into()), ..Default::default() }).await?))
        }
    };
    let ip = eventually("ephemeral whoami", Duration::from_secs(60), || logs("probe-ip")).await?;
    ensure!(ip.trim() == pod_ip, "ephemeral container sees {ip:?}, pod IP is {pod_ip}");
    let answer = eventually("ephemeral get", Duration::from_secs(60), || logs("probe-app")).await?;
    let v: serde_json::Value = serde_json::from_str(answer.trim()).with_context(|| answer.clone())?;
    ensure!(v["pod"] == name.as_str() && v["path"] == "/from-ephemeral", "{v}");
    Ok(())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn missing_image_reports_reason_and_is_never_pulled() -> Result<()> {
    let ns = TestNs::new("t-img").await?;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "missing"},
        "spec": {"containers": [{"name": "app", "image": "preview.local/does-not-exist:v0", "imagePullPolicy": "Never"}]}
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    let reason = eventually("a waiting reason", Duration::from_secs(60), || {
        let pods = ns.api::<Pod>();
        async move {
            let p = pods.get("missing").await?;
            Ok(p.status
                .and_then(|s| s.container_statuses)
                .and_then(|cs| cs.into_iter().next())
                .and_then(|c| c.state)
                .and_then(|s| s.waiting)
                .and_then(|w| w.reason)
                .filter(|r| r != "ContainerCreating"))
        }
    })
    .await?;
    ensure!(reason == "ErrImageNeverPull", "waiting reason {reason}");
    Ok(())
}
