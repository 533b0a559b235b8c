//! Helpers for the end-to-end tests (issue 5): previewd reachable from pods,
//! the demo chain, calls through it from this machine, and checks of agents
//! and their rules from inside pods' network namespaces.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;

use super::{Previewd, TestNs, echo_app, eventually, ready_pods};

pub const AGENT_IMAGE: &str = "preview.local/agent:dev";
pub const V2: &str = "preview.local/echo:v2";

/// previewd listening on the node address, so agents in pods reach it.
pub async fn previewd(ns: &TestNs) -> Result<Previewd> {
    previewd_with(ns, |_| {}).await
}

/// [`previewd`], with more flags set by `f`.
pub async fn previewd_with(
    ns: &TestNs,
    f: impl FnOnce(&mut preview::previewd::server::ServerArgs),
) -> Result<Previewd> {
    let data = std::env::temp_dir().join(format!("previewd-{}", ns.name));
    Previewd::start_full(ns, data, ns.name.clone(), "198.18.255.254:0", |a| {
        a.agent_image = Some(AGENT_IMAGE.into());
        f(a);
    })
    .await
}

/// Cleans every environment.
pub async fn clean_all(c: &mut preview::cli::Client) -> Result<()> {
    let sel = preview::proto::clean_request::Selector::Glob("*".into());
    c.clean(preview::proto::CleanRequest { selector: Some(sel) }).await?;
    Ok(())
}

/// The orders pod that answered a GET through the frontend at `ip` (with
/// `key` in the baggage), as the frontend's answer names it.
pub async fn orders_pod(ip: &str, key: Option<&str>) -> Result<String> {
    let s = tokio::net::TcpStream::connect((ip, 8080)).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let mut r = http::Request::get("/");
    if let Some(k) = key {
        r = r.header("baggage", format!("preview-key={k}"));
    }
    let body = send.send_request(r.body(Full::new(Bytes::new()))?).await?.into_body().collect().await?;
    let v: serde_json::Value = serde_json::from_slice(&body.to_bytes())?;
    Ok(v["downstream"]["pod"].as_str().unwrap_or_default().to_string())
}

/// frontend → orders → payments, v1 each; orders may drop baggage.
pub async fn demo_chain(ns: &TestNs, orders_drops_baggage: bool) -> Result<()> {
    let down = |s: &str| format!("http://{s}.{}.svc.cluster.local:8080/", ns.name);
    echo_app(ns, "payments", "v1", 1, &[]).await?;
    let orders_down = down("payments");
    let mut orders_env = vec![("ECHO_DOWNSTREAM", orders_down.as_str())];
    if orders_drops_baggage {
        orders_env.push(("ECHO_DROP_BAGGAGE", "true"));
    }
    echo_app(ns, "orders", "v1", 1, &orders_env).await?;
    let front_down = down("orders");
    echo_app(ns, "frontend", "v1", 1, &[("ECHO_DOWNSTREAM", front_down.as_str())]).await?;
    for app in ["payments", "orders", "frontend"] {
        ready_pods(ns, &format!("app={app}"), 1).await?;
    }
    Ok(())
}

pub async fn cluster_ip(ns: &TestNs, svc: &str) -> Result<String> {
    let s = ns.api::<Service>().get(svc).await?;
    s.spec.and_then(|s| s.cluster_ip).context("service without a ClusterIP")
}

/// One GET through the chain, on a new connection; the whole answer (each
/// hop's answer nests its downstream's under `downstream`).
pub async fn call_json(ip: &str, key: Option<&str>) -> Result<serde_json::Value> {
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect((ip, 8080))).await??;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut b = http::Request::get("/").header("host", "frontend");
    if let Some(k) = key {
        b = b.header("baggage", format!("preview-key={k}"));
    }
    let resp =
        tokio::time::timeout(Duration::from_secs(10), send.send_request(b.body(Full::new(Bytes::new()))?)).await??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(status.is_success(), "{status}: {}", String::from_utf8_lossy(&body));
    Ok(serde_json::from_slice(&body)?)
}

/// One GET through the chain; the versions that answered, front to back.
/// A hop whose downstream call failed ends it with an error naming why.
pub async fn call(ip: &str, key: Option<&str>) -> Result<Vec<String>> {
    let mut v = call_json(ip, key).await?;
    let mut out = Vec::new();
    loop {
        match v.get("version").and_then(|s| s.as_str()) {
            Some(s) => out.push(s.to_string()),
            None => bail!("no version in {v}"),
        }
        match v.get_mut("downstream") {
            Some(d) => v = d.take(),
            None => return Ok(out),
        }
    }
}

pub fn chain(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The answer of hop `n` (0: the first) in a `call_json` answer; Null past the end.
pub fn hop(mut v: &serde_json::Value, n: usize) -> &serde_json::Value {
    for _ in 0..n {
        v = &v["downstream"];
    }
    v
}

/// An echo pod's `/stats` (`served`, `downstream_calls`,
/// `downstream_failures`, `retries`), asked on a new connection to its address.
pub async fn echo_stats(pod_ip: &str) -> Result<serde_json::Value> {
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect((pod_ip, 8080))).await??;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get("/stats").header("host", "stats").body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    ensure!(status.is_success(), "/stats on {pod_ip}: {status}: {}", String::from_utf8_lossy(&body));
    Ok(serde_json::from_slice(&body)?)
}

pub async fn pod_ip(ns: &TestNs, name: &str) -> Result<String> {
    let p = ns.api::<Pod>().get(name).await?;
    p.status.and_then(|s| s.pod_ip).with_context(|| format!("pod {name} has no IP yet"))
}

/// Waits until requests with `key` see `want`.
pub async fn until(ip: &str, key: Option<&str>, want: &[&str], within: Duration) -> Result<Duration> {
    let t = Instant::now();
    let want = chain(want);
    // A wrong answer or a failed call is kept as the last error, for the
    // timeout's message.
    eventually(&format!("{key:?} to see {want:?}"), within, || async {
        match call(ip, key).await? {
            c if c == want => Ok(Some(())),
            c => Err(anyhow::anyhow!("saw {c:?}")),
        }
    })
    .await?;
    Ok(t.elapsed())
}

pub fn config(target: &str, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({"target": target});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v.to_string()
}

/// Pod name → (uid, restarts of its app container).
pub async fn identities(ns: &TestNs, app: &str) -> Result<BTreeMap<String, (String, i32)>> {
    let pods = ns.api::<Pod>().list(&ListParams::default().labels(&format!("app={app},!preview.dev/key"))).await?;
    Ok(pods
        .items
        .into_iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.name == "app"))
                .map_or(-1, |c| c.restart_count);
            (p.metadata.name.unwrap_or_default(), (p.metadata.uid.unwrap_or_default(), restarts))
        })
        .collect())
}

/// The nat rules in a pod's network namespace, read from inside it.
fn nat_rules_in_pod(ip: &str) -> Result<String> {
    for ns in std::fs::read_dir("/var/run/netns")? {
        let ns = ns?.file_name().to_string_lossy().to_string();
        let addrs = std::process::Command::new("ip").args(["-n", &ns, "-4", "-o", "addr"]).output()?;
        if String::from_utf8_lossy(&addrs.stdout).contains(&format!(" {ip}/")) {
            return super::netns::sh(&["ip", "netns", "exec", &ns, "iptables-nft", "-w", "-t", "nat", "-S"]);
        }
    }
    bail!("no network namespace has {ip}")
}

/// Agent chains in a pod's network namespace.
pub fn chains_in_pod(ip: &str) -> Result<usize> {
    Ok(nat_rules_in_pod(ip)?.lines().filter(|l| l.starts_with("-N PREVIEW-AGENT-")).count())
}

/// REDIRECT rules in agent chains in a pod's network namespace: what takes
/// connections to an agent (an idle agent keeps its empty chain).
pub fn redirects_in_pod(ip: &str) -> Result<usize> {
    Ok(nat_rules_in_pod(ip)?
        .lines()
        .filter(|l| l.starts_with("-A PREVIEW-AGENT-") && l.contains("-j REDIRECT"))
        .count())
}

/// Our ephemeral containers in a pod: (name, running?, exit code).
/// How many agents were ever added to the pod, from its spec, which the
/// attach patch writes at once (the kubelet reports their statuses later).
pub fn agents_added(p: &Pod) -> usize {
    let spec = p.spec.as_ref().and_then(|s| s.ephemeral_containers.as_ref());
    spec.map_or(0, |c| c.iter().filter(|c| c.name.starts_with(preview::model::podspec::AGENT_PREFIX)).count())
}

pub fn agents(p: &Pod) -> Vec<(String, bool, Option<i32>)> {
    p.status
        .as_ref()
        .and_then(|s| s.ephemeral_container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.name.starts_with("preview-"))
        .map(|c| {
            let st = c.state.unwrap_or_default();
            (c.name, st.running.is_some(), st.terminated.map(|t| t.exit_code))
        })
        .collect()
}

pub async fn target_pods(ns: &TestNs, app: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("app={app},!preview.dev/key"));
    Ok(ns.api::<Pod>().list(&lp).await?.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
}

/// No agent redirect is left in the target's pods, and no agent is about to
/// start: agents have left, or linger idle (they pass through what is still
/// open through them), waiting for the next environment on the target.
pub async fn no_rules_left(ns: &TestNs, app: &str) -> Result<()> {
    eventually("agent redirects to go", Duration::from_secs(30), || async {
        for p in target_pods(ns, app).await? {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
            if agents(&p).iter().any(|(_, running, exit)| !*running && exit.is_none()) || redirects_in_pod(&ip)? != 0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}
