//! Issue 5, end to end on the real cluster: previewd attaches agents to the
//! target's pods as ephemeral containers, keyed requests through the demo
//! chain `frontend → orders → payments` reach preview pods, and nothing else
//! changes. Requests go from this machine to the frontend's ClusterIP.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use common::{Previewd, TestNs, echo_app, eventually, ready_pods, start_req};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};

const AGENT_IMAGE: &str = "preview.local/agent:dev";
const V2: &str = "preview.local/echo:v2";

/// previewd listening on the node address, so agents in pods reach it.
async fn previewd(ns: &TestNs) -> Result<Previewd> {
    let data = std::env::temp_dir().join(format!("previewd-{}", ns.name));
    common::Previewd::start_full(ns, data, ns.name.clone(), "198.18.255.254:0", |a| {
        a.agent_image = Some(AGENT_IMAGE.into());
    })
    .await
}

/// frontend → orders → payments, v1 each; orders may drop baggage.
async fn demo_chain(ns: &TestNs, orders_drops_baggage: bool) -> Result<()> {
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

async fn cluster_ip(ns: &TestNs, svc: &str) -> Result<String> {
    let s = ns.api::<Service>().get(svc).await?;
    s.spec.and_then(|s| s.cluster_ip).context("service without a ClusterIP")
}

/// One GET through the chain; the versions that answered, front to back.
async fn call(ip: &str, key: Option<&str>) -> Result<Vec<String>> {
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
    let mut v: serde_json::Value = serde_json::from_slice(&body)?;
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

fn chain(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Waits until requests with `key` see `want`.
async fn until(ip: &str, key: Option<&str>, want: &[&str], within: Duration) -> Result<Duration> {
    let t = Instant::now();
    let want = chain(want);
    eventually(&format!("{key:?} to see {want:?}"), within, || async {
        Ok(call(ip, key).await.ok().filter(|c| *c == want).map(|_| ()))
    })
    .await?;
    Ok(t.elapsed())
}

fn config(target: &str, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({"target": target});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    v.to_string()
}

/// Pod name → (uid, restarts of its app container).
async fn identities(ns: &TestNs, app: &str) -> Result<BTreeMap<String, (String, i32)>> {
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

/// Agent chains in a pod's network namespace, read from inside it.
fn chains_in_pod(ip: &str) -> Result<usize> {
    for ns in std::fs::read_dir("/var/run/netns")? {
        let ns = ns?.file_name().to_string_lossy().to_string();
        let addrs = std::process::Command::new("ip").args(["-n", &ns, "-4", "-o", "addr"]).output()?;
        if String::from_utf8_lossy(&addrs.stdout).contains(&format!(" {ip}/")) {
            let rules = common::netns::sh(&["ip", "netns", "exec", &ns, "iptables-nft", "-w", "-t", "nat", "-S"])?;
            return Ok(rules.lines().filter(|l| l.starts_with("-N PREVIEW-AGENT-")).count());
        }
    }
    bail!("no network namespace has {ip}")
}

/// Our ephemeral containers in a pod: (name, running?, exit code).
fn agents(p: &Pod) -> Vec<(String, bool, Option<i32>)> {
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

async fn target_pods(ns: &TestNs, app: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("app={app},!preview.dev/key"));
    Ok(ns.api::<Pod>().list(&lp).await?.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect())
}

/// Every agent in the target's pods has exited and no rule is left.
async fn all_agents_gone(ns: &TestNs, app: &str) -> Result<()> {
    eventually("agents to exit and rules to go", Duration::from_secs(30), || async {
        for p in target_pods(ns, app).await? {
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
            if agents(&p).iter().any(|(_, running, exit)| *running || exit.is_none()) || chains_in_pod(&ip)? != 0 {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })
    .await
}

#[tokio::test]
async fn steal_through_the_chain_and_cleanup_restores_staging() -> Result<()> {
    let ns = TestNs::new("e2e-steal").await?;
    demo_chain(&ns, false).await?;
    let before = (identities(&ns, "frontend").await?, identities(&ns, "orders").await?);
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "steal1")).await?;
    let took = until(&ip, Some("steal1"), &["v1", "v2", "v1"], Duration::from_secs(60)).await?;
    eprintln!("first keyed request answered by the preview after {took:?}");
    for _ in 0..10 {
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
        ensure!(call(&ip, Some("steal1")).await? == chain(&["v1", "v2", "v1"]));
        ensure!(call(&ip, Some("other")).await? == chain(&["v1", "v1", "v1"]));
    }
    // The staging pods were never restarted: same UIDs, same restart counts.
    ensure!((identities(&ns, "frontend").await?, identities(&ns, "orders").await?) == before);
    // One agent on the orders pod, none anywhere else.
    let orders = target_pods(&ns, "orders").await?;
    ensure!(agents(&orders[0]).len() == 1, "{:?}", agents(&orders[0]));
    ensure!(target_pods(&ns, "frontend").await?.iter().all(|p| agents(p).is_empty()));

    c.clean(preview::proto::CleanRequest {
        selector: Some(preview::proto::clean_request::Selector::Key("steal1".into())),
    })
    .await?;
    all_agents_gone(&ns, "orders").await?;
    for _ in 0..5 {
        ensure!(call(&ip, Some("steal1")).await? == chain(&["v1", "v1", "v1"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    ensure!(identities(&ns, "orders").await? == before.1);
    d.stop().await
}

#[tokio::test]
async fn mirror_answers_from_staging_and_copies_reach_the_preview() -> Result<()> {
    let ns = TestNs::new("e2e-mirror").await?;
    demo_chain(&ns, false).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    let cfg =
        config("deployment/orders", serde_json::json!({"feature": {"network": {"incoming": {"mode": "mirror"}}}}));
    let mut req = start_req(&cfg, V2, "mirror1");
    req.ttl = "40s".into();
    let env = c.start(req).await?.into_inner();
    let preview_pod = env.environment.context("environment")?.pods[0].name.clone();
    // The preview answers /stats with how many requests it served.
    let served = || async {
        let p = ns.api::<Pod>().get(&preview_pod).await?;
        let pip = p.status.and_then(|s| s.pod_ip).context("no IP yet")?;
        let s = tokio::net::TcpStream::connect((pip.as_str(), 8080)).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
        tokio::spawn(conn);
        let resp = send.send_request(http::Request::get("/stats").body(Full::new(Bytes::new()))?).await?;
        let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
        v["served"].as_u64().context("served")
    };
    // Wait for the agent: copies start arriving.
    eventually("the first mirrored copy", Duration::from_secs(60), || async {
        call(&ip, Some("mirror1")).await?;
        Ok(served().await.ok().filter(|n| *n > 0))
    })
    .await?;
    let start = served().await?;
    for _ in 0..20 {
        // Every answer comes from v1, keyed or not.
        ensure!(call(&ip, Some("mirror1")).await? == chain(&["v1", "v1", "v1"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    let copies = eventually("20 copies", Duration::from_secs(10), || async {
        Ok(served().await.ok().filter(|n| *n >= start + 20))
    })
    .await?;
    eprintln!("mirror: 20 keyed requests, the preview received {} copies", copies - start);
    ensure!(copies - start == 20, "only keyed requests are copied: got {}", copies - start);
    // TTL expiry: the reaper removes the environment, the agent leaves.
    eventually("the TTL to expire", Duration::from_secs(60), || async {
        let snap = c.clone().status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
        Ok(snap.filter(|s| s.environments.is_empty()).map(|_| ()))
    })
    .await?;
    all_agents_gone(&ns, "orders").await?;
    ensure!(call(&ip, Some("mirror1")).await? == chain(&["v1", "v1", "v1"]));
    d.stop().await
}

#[tokio::test]
async fn two_environments_on_one_target_and_a_multi_pod_environment() -> Result<()> {
    let ns = TestNs::new("e2e-two").await?;
    demo_chain(&ns, false).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "alpha")).await?;
    // beta previews orders and payments with one key.
    let mut req = start_req(&config("deployment/orders", serde_json::json!({})), V2, "beta");
    req.pods.push(preview::proto::PodRequest {
        config: config("deployment/payments", serde_json::json!({})),
        image: V2.into(),
        ..Default::default()
    });
    c.start(req).await?;
    until(&ip, Some("alpha"), &["v1", "v2", "v1"], Duration::from_secs(60)).await?;
    until(&ip, Some("beta"), &["v1", "v2", "v2"], Duration::from_secs(60)).await?;
    for _ in 0..5 {
        ensure!(call(&ip, Some("alpha")).await? == chain(&["v1", "v2", "v1"]));
        ensure!(call(&ip, Some("beta")).await? == chain(&["v1", "v2", "v2"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    // Each key reached its own preview pod of orders.
    let who = |key: &'static str| {
        let ip = ip.clone();
        async move {
            let s = tokio::net::TcpStream::connect((ip.as_str(), 8080)).await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
            tokio::spawn(conn);
            let r = http::Request::get("/")
                .header("baggage", format!("preview-key={key}"))
                .body(Full::new(Bytes::new()))?;
            let v: serde_json::Value =
                serde_json::from_slice(&send.send_request(r).await?.into_body().collect().await?.to_bytes())?;
            anyhow::Ok(v["downstream"]["pod"].as_str().unwrap_or_default().to_string())
        }
    };
    let (a, b) = (who("alpha").await?, who("beta").await?);
    ensure!(a.contains("alpha") && b.contains("beta"), "alpha → {a}, beta → {b}");
    // One agent serves both environments on orders.
    ensure!(agents(&target_pods(&ns, "orders").await?[0]).len() == 1);
    // Cleaning one leaves the other routed.
    c.clean(preview::proto::CleanRequest {
        selector: Some(preview::proto::clean_request::Selector::Key("alpha".into())),
    })
    .await?;
    until(&ip, Some("alpha"), &["v1", "v1", "v1"], Duration::from_secs(20)).await?;
    ensure!(call(&ip, Some("beta")).await? == chain(&["v1", "v2", "v2"]));
    c.clean(preview::proto::CleanRequest {
        selector: Some(preview::proto::clean_request::Selector::Key("beta".into())),
    })
    .await?;
    all_agents_gone(&ns, "orders").await?;
    all_agents_gone(&ns, "payments").await?;
    ensure!(call(&ip, Some("beta")).await? == chain(&["v1", "v1", "v1"]));
    d.stop().await
}

#[tokio::test]
async fn outbound_propagation_keeps_the_chain_when_orders_drops_baggage() -> Result<()> {
    let ns = TestNs::new("e2e-prop").await?;
    demo_chain(&ns, true).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    // Staging orders drops baggage: a payments preview alone is unreachable.
    c.start(start_req(&config("deployment/payments", serde_json::json!({})), V2, "prop-on")).await?;
    until(&ip, Some("prop-on"), &["v1", "v1", "v1"], Duration::from_secs(10)).await?;
    // A preview orders (same v1 behaviour, dropping baggage) propagates the key.
    let mut add = preview::proto::AddPodRequest {
        key: "prop-on".into(),
        pod: Some(preview::proto::PodRequest {
            config: config("deployment/orders", serde_json::json!({})),
            image: V2.into(),
            ..Default::default()
        }),
    };
    c.add_pod(add.clone()).await?;
    until(&ip, Some("prop-on"), &["v1", "v2", "v2"], Duration::from_secs(60)).await?;
    // The same with propagation off: the chain leaves the environment.
    c.start(start_req(&config("deployment/payments", serde_json::json!({})), V2, "prop-off")).await?;
    add.key = "prop-off".into();
    add.pod.as_mut().context("pod")?.config =
        config("deployment/orders", serde_json::json!({"feature": {"preview": {"propagate_key": false}}}));
    let resp = c.add_pod(add).await?.into_inner();
    until(&ip, Some("prop-off"), &["v1", "v2", "v1"], Duration::from_secs(60)).await?;
    // The preview pod without propagation has no sidecar and no PREVIEW_KEY.
    let env = resp.environment.context("environment")?;
    let off = env.pods.iter().find(|p| p.group == "orders").context("orders pod")?;
    let pod = ns.api::<Pod>().get(&off.name).await?;
    let spec = pod.spec.context("spec")?;
    ensure!(spec.init_containers.unwrap_or_default().is_empty());
    ensure!(spec.containers[0].env.iter().flatten().all(|e| e.name != "PREVIEW_KEY"));
    for _ in 0..5 {
        ensure!(call(&ip, Some("prop-on")).await? == chain(&["v1", "v2", "v2"]));
        ensure!(call(&ip, Some("prop-off")).await? == chain(&["v1", "v2", "v1"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    d.stop().await
}

#[tokio::test]
async fn targetless_pod_calls_staging_with_the_key() -> Result<()> {
    let ns = TestNs::new("e2e-tless").await?;
    demo_chain(&ns, false).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    c.start(start_req(&config("deployment/payments", serde_json::json!({})), V2, "tl")).await?;
    until(&ip, Some("tl"), &["v1", "v1", "v2"], Duration::from_secs(60)).await?;
    // A targetless pod that calls orders: its request carries the key
    // without the app setting it, so payments v2 answers.
    let orders = format!("http://orders.{}.svc.cluster.local:8080/", ns.name);
    let tl = serde_json::json!({"target": "targetless", "feature": {"env": {"override": {"ECHO_DOWNSTREAM": orders}}}});
    let add = preview::proto::AddPodRequest {
        key: "tl".into(),
        pod: Some(preview::proto::PodRequest {
            config: tl.to_string(),
            image: V2.into(),
            name: "caller".into(),
            ..Default::default()
        }),
    };
    let env = c.add_pod(add.clone()).await?.into_inner().environment.context("environment")?;
    let caller = env.pods.iter().find(|p| p.group == "caller").context("caller pod")?.name.clone();
    let chain_from_caller = eventually("the targetless pod to answer", Duration::from_secs(60), || async {
        let p = ns.api::<Pod>().get(&caller).await?;
        let Some(pip) = p.status.and_then(|s| s.pod_ip) else { return Ok(None) };
        // No baggage from us: the caller's sidecar adds it on the way out.
        Ok(call(&pip, None).await.ok())
    })
    .await?;
    ensure!(chain_from_caller == chain(&["v2", "v1", "v2"]), "{chain_from_caller:?}");
    d.stop().await
}

#[tokio::test]
async fn scale_up_gets_agents_and_grpc_is_routed_per_call() -> Result<()> {
    let ns = TestNs::new("e2e-scale").await?;
    // orders serves HTTP on 8080 and gRPC on 9090.
    echo_app(&ns, "orders", "v1", 1, &[("ECHO_GRPC_LISTEN", "0.0.0.0:9090")]).await?;
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "app", "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090, "name": "grpc"}]}
    ]}}}});
    ns.api::<Deployment>().patch("orders", &PatchParams::default(), &Patch::Strategic(patch)).await?;
    let patch = serde_json::json!({"spec": {"ports": [
        {"port": 8080, "targetPort": 8080, "name": "http"}, {"port": 9090, "targetPort": 9090, "name": "grpc"}
    ]}});
    ns.api::<Service>().patch("orders", &PatchParams::default(), &Patch::Merge(patch)).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "grow")).await?;
    let ip = cluster_ip(&ns, "orders").await?;
    // HTTP straight to orders (no frontend here): the keyed answer is v2.
    let direct = |key: Option<&'static str>| {
        let ip = ip.clone();
        async move { call(&ip, key).await.map(|c| c[0].clone()) }
    };
    eventually("routing on one replica", Duration::from_secs(60), || async {
        Ok((direct(Some("grow")).await.ok().as_deref() == Some("v2")).then_some(()))
    })
    .await?;
    let scale = serde_json::json!({"spec": {"replicas": 3}});
    ns.api::<Deployment>().patch("orders", &PatchParams::default(), &Patch::Merge(scale)).await?;
    ready_pods(&ns, "app=orders,!preview.dev/key", 3).await?;
    eventually("an agent in every replica", Duration::from_secs(60), || async {
        let pods = target_pods(&ns, "orders").await?;
        Ok((pods.len() == 3 && pods.iter().all(|p| agents(p).iter().any(|(_, running, _)| *running))).then_some(()))
    })
    .await?;
    // Each replica, addressed directly, routes the keyed request.
    for p in target_pods(&ns, "orders").await? {
        let pip = p.status.and_then(|s| s.pod_ip).context("ip")?;
        eventually("the replica to route", Duration::from_secs(20), || async {
            Ok((call(&pip, Some("grow")).await.ok().map(|c| c[0].clone()).as_deref() == Some("v2")).then_some(()))
        })
        .await?;
        ensure!(call(&pip, None).await?[0] == "v1");
    }
    // gRPC on 9090, routed per call by metadata, on one connection.
    let channel = tonic::transport::Channel::from_shared(format!("http://{ip}:9090"))?.connect().await?;
    let mut g = preview::proto::echo::echo_client::EchoClient::new(channel);
    for i in 0..6 {
        let mut req = tonic::Request::new(preview::proto::echo::EchoRequest { message: format!("m{i}"), count: 0 });
        if i % 2 == 0 {
            req.metadata_mut().insert("baggage", "preview-key=grow".parse()?);
        }
        let reply = g.unary(req).await?.into_inner();
        ensure!(reply.version == if i % 2 == 0 { "v2" } else { "v1" }, "call {i}: {}", reply.version);
    }
    d.stop().await
}

/// Host processes of our agent in `pod` (found by the POD_NAME we gave it).
fn agent_pids(pod: &str) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Ok(pid) = e?.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let has = |hay: &[u8], needle: &[u8]| hay.split(|b| *b == 0).any(|w| w == needle);
        let is_agent = cmd.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(b"preview-agent"));
        if is_agent && has(&env, format!("POD_NAME={pod}").as_bytes()) && !has(&cmd, b"cleanup") {
            out.push(pid);
        }
    }
    Ok(out)
}

/// Sequential unkeyed requests until `stop`; returns (sent, failed, longest
/// gap between two answered requests).
async fn steady(ip: String, stop: tokio::sync::watch::Receiver<bool>) -> (u32, u32, Duration) {
    let (mut sent, mut failed, mut gap) = (0, 0, Duration::ZERO);
    let mut last_ok = Instant::now();
    // Bounded: at most 3000 requests and 90 s.
    let end = Instant::now() + Duration::from_secs(90);
    while !*stop.borrow() && sent < 3000 && Instant::now() < end {
        sent += 1;
        match tokio::time::timeout(Duration::from_secs(1), call(&ip, None)).await {
            Ok(Ok(c)) if c[0] == "v1" => {
                gap = gap.max(last_ok.elapsed());
                last_ok = Instant::now();
            }
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sent, failed, gap.max(last_ok.elapsed()))
}

#[tokio::test]
async fn chaos_sigkill_of_the_agent_recovers_and_is_reattached() -> Result<()> {
    let ns = TestNs::new("e2e-kill").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "chaos")).await?;
    let ip = cluster_ip(&ns, "orders").await?;
    let keyed = |ip: String| async move { call(&ip, Some("chaos")).await.ok().map(|c| c[0].clone()) };
    eventually("routing", Duration::from_secs(60), || async {
        Ok((keyed(ip.clone()).await.as_deref() == Some("v2")).then_some(()))
    })
    .await?;
    let pod = target_pods(&ns, "orders").await?.remove(0);
    let pod_name = pod.metadata.name.clone().context("name")?;
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).context("ip")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady(ip.clone(), stop_rx));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = agent_pids(&pod_name)?;
    ensure!(pids.len() == 2, "guard and worker, got {pids:?}");
    for pid in &pids {
        // SAFETY: SIGKILL to the agent processes previewd started in our test pod.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let killed = Instant::now();
    // Right after the kill the rules are orphaned; previewd cleans them up.
    eventually("a cleanup container", Duration::from_secs(30), || async {
        let p = ns.api::<Pod>().get(&pod_name).await?;
        Ok(agents(&p).iter().any(|(n, _, exit)| n.starts_with("preview-cleanup-") && *exit == Some(0)).then_some(()))
    })
    .await?;
    eventually("keyed routing again", Duration::from_secs(60), || async {
        Ok((keyed(ip.clone()).await.as_deref() == Some("v2")).then_some(()))
    })
    .await?;
    let rerouted = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop_tx.send(true);
    let (sent, failed, gap) = load.await?;
    eprintln!(
        "chaos: {sent} unkeyed requests, {failed} failed, longest gap {gap:?}; keyed routed again {rerouted:?} after the kill"
    );
    ensure!(gap < Duration::from_secs(5), "unkeyed requests stopped for {gap:?}");
    // One live agent again, one chain, and the killed one's leftovers are gone.
    let p = ns.api::<Pod>().get(&pod_name).await?;
    ensure!(agents(&p).iter().filter(|(_, running, _)| *running).count() == 1, "{:?}", agents(&p));
    ensure!(chains_in_pod(&pod_ip)? == 1);
    d.stop().await
}

#[tokio::test]
async fn chaos_sigkill_of_previewd_loses_nothing() -> Result<()> {
    let ns = TestNs::new("e2e-pdkill").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
    let data = tempfile::tempdir()?;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_previewd"))
            .args(["--listen", &format!("198.18.255.254:{port}"), "--agent-image", AGENT_IMAGE])
            .args(["--image-pull-policy", "Never", "--instance", &ns.name, "--default-namespace", &ns.name])
            .arg("--data-dir")
            .arg(data.path())
            .env("KUBECONFIG", common::kubeconfig_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(data.path().join("previewd.log"))?)
            .spawn()
            .context("starting previewd")
    };
    let addr = format!("http://198.18.255.254:{port}");
    let connect = || async {
        eventually("previewd", Duration::from_secs(30), || async { Ok(preview::cli::connect(&addr).await.ok()) }).await
    };
    let mut pd = spawn()?;
    let mut c = connect().await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "pd1")).await?;
    let ip = cluster_ip(&ns, "orders").await?;
    until(&ip, Some("pd1"), &["v2"], Duration::from_secs(60)).await?;
    pd.kill()?; // SIGKILL
    pd.wait()?;
    // The agent keeps its last routes while previewd is away.
    for _ in 0..5 {
        ensure!(call(&ip, Some("pd1")).await? == chain(&["v2"]));
        ensure!(call(&ip, None).await? == chain(&["v1"]));
    }
    let mut pd = spawn()?;
    let result = async {
        let mut c = connect().await?;
        let snap = c.status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
        let envs = snap.context("snapshot")?.environments;
        ensure!(envs.len() == 1 && envs[0].key == "pd1", "{envs:?}");
        // The agent's stream is back: a new environment on the target reaches it.
        c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "pd2")).await?;
        until(&ip, Some("pd2"), &["v2"], Duration::from_secs(60)).await?;
        ensure!(call(&ip, Some("pd1")).await? == chain(&["v2"]));
        // One agent for all of it: none was re-attached.
        ensure!(agents(&target_pods(&ns, "orders").await?[0]).len() == 1);
        c.clean(preview::proto::CleanRequest {
            selector: Some(preview::proto::clean_request::Selector::Glob("pd*".into())),
        })
        .await?;
        all_agents_gone(&ns, "orders").await?;
        // Nothing orphaned: no preview pod or owner object is left.
        let left = ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key")).await?;
        ensure!(left.items.iter().all(|p| p.metadata.deletion_timestamp.is_some()), "{} pods left", left.items.len());
        let cms = ns
            .api::<k8s_openapi::api::core::v1::ConfigMap>()
            .list(&ListParams::default().labels("preview.dev/key"))
            .await?;
        ensure!(cms.items.is_empty(), "{} owner objects left", cms.items.len());
        Ok(())
    }
    .await;
    let _ = pd.kill();
    let _ = pd.wait();
    if result.is_err() {
        eprintln!("{}", std::fs::read_to_string(data.path().join("previewd.log")).unwrap_or_default());
    }
    result
}
