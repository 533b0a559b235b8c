//! Issue 5, end to end on the real cluster: previewd attaches agents to the
//! target's pods as ephemeral containers, keyed requests through the demo
//! chain `frontend → orders → payments` reach preview pods, and nothing else
//! changes. Requests go from this machine to the frontend's ClusterIP.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use common::e2e::*;
use common::{TestNs, echo_app, eventually, ready_pods, start_req};
use http_body_util::{BodyExt, Full};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Patch, PatchParams};

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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
    ensure!(agents_added(&orders[0]) == 1, "{:?}", orders[0].spec.as_ref().map(|s| &s.ephemeral_containers));
    ensure!(target_pods(&ns, "frontend").await?.iter().all(|p| agents(p).is_empty()));

    c.clean(preview::proto::CleanRequest {
        selector: Some(preview::proto::clean_request::Selector::Key("steal1".into())),
    })
    .await?;
    // The agent drops its rules and lingers; frontend's kept-alive
    // connection through it goes on (passed through), so no call is reset.
    no_rules_left(&ns, "orders").await?;
    for _ in 0..5 {
        ensure!(call(&ip, Some("steal1")).await? == chain(&["v1", "v1", "v1"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    ensure!(identities(&ns, "orders").await? == before.1);
    // The next environment on the target reuses the idle agent: the pod
    // gains no ephemeral container (they cannot be removed).
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "steal2")).await?;
    until(&ip, Some("steal2"), &["v1", "v2", "v1"], Duration::from_secs(60)).await?;
    let orders = target_pods(&ns, "orders").await?;
    ensure!(agents_added(&orders[0]) == 1, "a second agent was attached: {:?}", agents(&orders[0]));
    ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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
    req.ttl = "30s".into();
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
    // TTL expiry: the reaper removes the environment, the agent drops its rules.
    eventually("the TTL to expire", Duration::from_secs(60), || async {
        let snap = c.clone().status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
        Ok(snap.filter(|s| s.environments.is_empty()).map(|_| ()))
    })
    .await?;
    no_rules_left(&ns, "orders").await?;
    ensure!(call(&ip, Some("mirror1")).await? == chain(&["v1", "v1", "v1"]));
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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
    // beta attached an agent to payments (it answers beta's requests by now):
    // the connections open to payments at that moment, kept alive by orders
    // and alpha's preview, were reset once (README, known limits; the echo
    // app does not retry). Wait, bounded, until each chain has reconnected.
    until(&ip, Some("alpha"), &["v1", "v2", "v1"], Duration::from_secs(10)).await?;
    until(&ip, None, &["v1", "v1", "v1"], Duration::from_secs(10)).await?;
    for _ in 0..5 {
        ensure!(call(&ip, Some("alpha")).await? == chain(&["v1", "v2", "v1"]));
        ensure!(call(&ip, Some("beta")).await? == chain(&["v1", "v2", "v2"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    // Each key reached its own preview pod of orders.
    let (a, b) = (orders_pod(&ip, Some("alpha")).await?, orders_pod(&ip, Some("beta")).await?);
    ensure!(a.contains("alpha") && b.contains("beta"), "alpha → {a}, beta → {b}");
    // One agent serves both environments on orders.
    ensure!(agents_added(&target_pods(&ns, "orders").await?[0]) == 1);
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
    no_rules_left(&ns, "orders").await?;
    no_rules_left(&ns, "payments").await?;
    // Idle agents pass through the connections still open through them.
    for _ in 0..5 {
        ensure!(call(&ip, Some("beta")).await? == chain(&["v1", "v1", "v1"]));
    }
    d.stop().await
}

/// Issue 13's precedence: k1 (the default filter) and k2 (an admin's
/// `header_filter: "."`, which matches every request) on orders. A request
/// carrying k1's key reaches k1's pod and never k2's; only requests without a
/// key go to k2's catch-all, and staging keeps nothing it should not lose.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn a_keyed_request_never_reaches_another_environments_catch_all_filter() -> Result<()> {
    let ns = TestNs::new("e2e-prec").await?;
    demo_chain(&ns, false).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "k1")).await?;
    let catch_all = serde_json::json!({"feature": {"network": {"incoming": {"http_filter": {"header_filter": "."}}}}});
    c.start(start_req(&config("deployment/orders", catch_all), V2, "k2")).await?;
    eventually("k1 and the catch-all to be routed", Duration::from_secs(60), || async {
        let (a, b) = (orders_pod(&ip, Some("k1")).await?, orders_pod(&ip, None).await?);
        Ok((a.contains("-k1-") && b.contains("-k2-")).then_some(()))
    })
    .await?;
    for _ in 0..50 {
        let a = orders_pod(&ip, Some("k1")).await?;
        ensure!(a.contains("-k1-"), "a request with k1's key reached {a}");
        // Another key, of no environment here: staging, not the catch-all.
        let other = orders_pod(&ip, Some("nobody")).await?;
        ensure!(!other.contains("-k2-") && !other.contains("-k1-"), "a request with another key reached {other}");
    }
    clean_all(&mut c).await?;
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn outbound_propagation_keeps_the_chain_when_orders_drops_baggage() -> Result<()> {
    let ns = TestNs::new("e2e-prop").await?;
    demo_chain(&ns, true).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    let payments = cluster_ip(&ns, "payments").await?;
    // Staging orders drops baggage: a payments preview alone is unreachable
    // through the chain. That says something only once the payments route
    // exists, so first wait until a keyed request straight to payments
    // reaches the preview.
    c.start(start_req(&config("deployment/payments", serde_json::json!({})), V2, "prop-on")).await?;
    until(&payments, Some("prop-on"), &["v2"], Duration::from_secs(60)).await?;
    // Waited for, bounded, rather than called once: the payments agent's
    // attach resets orders' kept-alive connection to payments once (README,
    // known limits). Were the key to reach payments, this would stay v1,v1,v2.
    until(&ip, Some("prop-on"), &["v1", "v1", "v1"], Duration::from_secs(10)).await?;
    let v = call_json(&ip, Some("prop-on")).await?;
    ensure!(version_and_key(hop(&v, 2), "prop-on") == ("v1", false), "staging orders passed the key on: {v}");
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
    // The key reached payments in the request's baggage although the orders
    // preview's app drops it (prop-off below shows it does): the preview's
    // outbound sidecar added it. Without propagation this is ("v1", false).
    let v = call_json(&ip, Some("prop-on")).await?;
    ensure!(version_and_key(hop(&v, 1), "prop-on") == ("v2", true), "{v}");
    ensure!(version_and_key(hop(&v, 2), "prop-on") == ("v2", true), "payments did not get the key: {v}");
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
    // Its app dropped the key and nothing added it back.
    let v = call_json(&ip, Some("prop-off")).await?;
    ensure!(version_and_key(hop(&v, 1), "prop-off") == ("v2", true), "{v}");
    ensure!(version_and_key(hop(&v, 2), "prop-off") == ("v1", false), "{v}");
    for _ in 0..5 {
        ensure!(call(&ip, Some("prop-on")).await? == chain(&["v1", "v2", "v2"]));
        ensure!(call(&ip, Some("prop-off")).await? == chain(&["v1", "v2", "v1"]));
        ensure!(call(&ip, None).await? == chain(&["v1", "v1", "v1"]));
    }
    d.stop().await
}

/// One hop's answer: its version, and whether the `baggage` it received
/// carried `preview-key=<key>`.
fn version_and_key<'a>(hop: &'a serde_json::Value, key: &str) -> (&'a str, bool) {
    let member = format!("preview-key={key}");
    let carried = hop["baggage"]
        .as_array()
        .is_some_and(|b| b.iter().filter_map(|v| v.as_str()).any(|v| v.split(',').any(|m| m.trim() == member)));
    (hop["version"].as_str().unwrap_or_default(), carried)
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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

/// Connections opened to a target after its agent is attached are never
/// reset. The echo app retries nothing by default, so any reset fails a
/// request and shows in the pods' `/stats`. (Connections open at the moment
/// of the attach are reset once: README, known limits. So the caller here,
/// `edge`, is created after the attach: every one of its connections to
/// orders is opened with the agent in place.)
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn no_resets_on_connections_opened_after_an_agent_is_attached() -> Result<()> {
    const N: usize = 200;
    const WORKERS: usize = 4;
    let ns = TestNs::new("e2e-resets").await?;
    demo_chain(&ns, false).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "frontend").await?;
    let env = c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "nr")).await?.into_inner();
    let preview_pod = env.environment.context("environment")?.pods[0].name.clone();
    until(&ip, Some("nr"), &["v1", "v2", "v1"], Duration::from_secs(60)).await?;
    let orders = eventually("the orders agent to run", Duration::from_secs(30), || async {
        let pods = target_pods(&ns, "orders").await?;
        Ok((pods.len() == 1 && agents(&pods[0]).iter().any(|(_, running, _)| *running)).then_some(pods))
    })
    .await?;
    let orders_ip = orders[0].status.as_ref().and_then(|s| s.pod_ip.clone()).context("orders pod IP")?;
    let preview_ip = pod_ip(&ns, &preview_pod).await?;

    let orders_url = format!("http://orders.{}.svc.cluster.local:8080/", ns.name);
    echo_app(&ns, "edge", "v1", 1, &[("ECHO_DOWNSTREAM", orders_url.as_str())]).await?;
    let edge = ready_pods(&ns, "app=edge", 1).await?.remove(0);
    let edge_ip = edge.status.and_then(|s| s.pod_ip).context("edge pod IP")?;
    // orders' and its preview's calls to payments (no agent there) are
    // counted from here; edge's from its start.
    let before = (echo_stats(&orders_ip).await?, echo_stats(&preview_ip).await?);

    // N requests, each on a new connection to edge, keyed and unkeyed, from a
    // few workers at once so that edge keeps several connections to orders.
    let load = async {
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..WORKERS {
            let edge_ip = edge_ip.clone();
            workers.spawn(async move {
                let mut failed = Vec::new();
                for i in 0..N / WORKERS {
                    let (key, want) = if (w + i) % 2 == 0 {
                        (Some("nr"), chain(&["v1", "v2", "v1"]))
                    } else {
                        (None, chain(&["v1", "v1", "v1"]))
                    };
                    match call(&edge_ip, key).await {
                        Ok(got) if got == want => {}
                        Ok(got) => failed.push(format!("{key:?}: {got:?}")),
                        Err(e) => failed.push(format!("{key:?}: {e:#}")),
                    }
                }
                failed
            });
        }
        let mut failed = Vec::new();
        while let Some(w) = workers.join_next().await {
            failed.extend(w?);
        }
        anyhow::Ok(failed)
    };
    let failed =
        tokio::time::timeout(Duration::from_secs(120), load).await.context("the requests took over 120 s")??;
    let first = &failed[..failed.len().min(5)];
    ensure!(failed.is_empty(), "{} of {N} requests failed; the first ones: {first:?}", failed.len());

    // Nothing was reset and retried out of sight either.
    let after = (echo_stats(&orders_ip).await?, echo_stats(&preview_ip).await?);
    let edge_stats = echo_stats(&edge_ip).await?;
    eprintln!("edge {edge_stats}\norders {} -> {}\npreview {} -> {}", before.0, after.0, before.1, after.1);
    // For the log only: frontend's connections to orders were open at the attach.
    if let Ok(front) = pod_ip_of(&ns, "frontend").await
        && let Ok(s) = echo_stats(&front).await
    {
        eprintln!("frontend (connections open at the attach) {s}");
    }
    ensure!(edge_stats["downstream_calls"].as_u64().is_some_and(|n| n >= N as u64), "edge: {edge_stats}");
    ensure!(edge_stats["downstream_failures"] == 0 && edge_stats["retries"] == 0, "edge: {edge_stats}");
    for (what, b, a) in [("orders", &before.0, &after.0), ("the orders preview", &before.1, &after.1)] {
        for k in ["downstream_failures", "retries"] {
            ensure!(a[k].is_u64() && a[k] == b[k], "{what}: {k} went from {} to {}", b[k], a[k]);
        }
    }
    d.stop().await
}

/// The address of the one staging pod of `app`.
async fn pod_ip_of(ns: &TestNs, app: &str) -> Result<String> {
    let pods = target_pods(ns, app).await?;
    pods.first().and_then(|p| p.status.as_ref()?.pod_ip.clone()).with_context(|| format!("no {app} pod with an IP"))
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// `make bench-start`: from Start to the first keyed request answered by the
/// preview, 30 runs of each kind with the image present; p50, p90 and max.
/// - cold: the first environment on a target pod, so an agent is attached
///   (the pod is replaced after each run, outside the timing);
/// - idle: an agent lingers on the pod from the previous environment;
/// - warm: another environment keeps an agent routing there.
///
/// Baseline, same run: a bare pod of the same image, from create to its
/// first answer.
#[tokio::test]
#[ignore = "benchmark: run with `make bench-start`"]
async fn bench_start() -> Result<()> {
    const RUNS: usize = 30;
    const TARGET: &str = "app=orders,!preview.dev/key";
    let ns = TestNs::new("bench-start").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, TARGET, 1).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "orders").await?;
    let poll = |key: String| {
        let ip = ip.clone();
        async move {
            loop {
                if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_secs(1), call(&ip, Some(&key))).await
                    && v[0] == "v2"
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let clean = |key: &str| preview::proto::CleanRequest {
        selector: Some(preview::proto::clean_request::Selector::Key(key.into())),
    };
    let cfg = config("deployment/orders", serde_json::json!({}));

    let mut base = Vec::new();
    for i in 0..RUNS {
        let name = format!("bare-{i}");
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": [
                {"name": "app", "image": V2, "imagePullPolicy": "Never", "args": ["serve"]}]}
        }))?;
        let t = Instant::now();
        ns.api::<Pod>().create(&Default::default(), &pod).await?;
        let answered = async {
            loop {
                let p = ns.api::<Pod>().get(&name).await?;
                if let Some(pip) = p.status.and_then(|s| s.pod_ip)
                    && call(&pip, None).await.is_ok()
                {
                    return anyhow::Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), answered)
            .await
            .with_context(|| format!("{name} did not answer within 60 s"))??;
        base.push(t.elapsed());
        common::delete_pod(&ns, &name).await?;
    }

    let mut cold = Vec::new();
    for i in 0..RUNS {
        let key = format!("cold{i}");
        let t = Instant::now();
        c.start(start_req(&cfg, V2, &key)).await?;
        tokio::time::timeout(Duration::from_secs(60), poll(key.clone())).await?;
        cold.push(t.elapsed());
        c.clean(clean(&key)).await?;
        no_rules_left(&ns, "orders").await?;
        // A fresh target pod for the next run, serving behind the Service.
        let old = ready_pods(&ns, TARGET, 1).await?[0].metadata.name.clone().unwrap_or_default();
        common::delete_pod(&ns, &old).await?;
        let new = eventually("a new target pod", Duration::from_secs(90), || async {
            let pods = ready_pods(&ns, TARGET, 1).await?;
            Ok(pods[0].metadata.name.clone().filter(|n| *n != old))
        })
        .await?;
        eventually("the Service to reach the new pod", Duration::from_secs(30), || async {
            let v = call_json(&ip, None).await?;
            Ok((v["pod"] == new.as_str()).then_some(()))
        })
        .await?;
    }

    let mut idle = Vec::new();
    for i in 0..RUNS {
        let key = format!("idle{i}");
        let t = Instant::now();
        c.start(start_req(&cfg, V2, &key)).await?;
        tokio::time::timeout(Duration::from_secs(60), poll(key.clone())).await?;
        if i > 0 {
            // The first one attached the agent that the others find idle.
            idle.push(t.elapsed());
        }
        c.clean(clean(&key)).await?;
        no_rules_left(&ns, "orders").await?;
    }

    c.start(start_req(&cfg, V2, "anchor")).await?;
    tokio::time::timeout(Duration::from_secs(60), poll("anchor".into())).await?;
    let mut warm = Vec::new();
    for i in 0..RUNS {
        let key = format!("warm{i}");
        let t = Instant::now();
        c.start(start_req(&cfg, V2, &key)).await?;
        tokio::time::timeout(Duration::from_secs(60), poll(key.clone())).await?;
        warm.push(t.elapsed());
        c.clean(clean(&key)).await?;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let line = |name: &str, v: &mut Vec<Duration>, b50: Option<Duration>| {
        let (p50, p90) = (pct(v, 50), pct(v, 90));
        let max = v.iter().max().copied().unwrap_or_default();
        let ratio =
            b50.map(|b| format!("  p50 {:.2}x baseline", p50.as_secs_f64() / b.as_secs_f64())).unwrap_or_default();
        println!(
            "  {name:<34} n={:<3} p50 {:6.0} ms  p90 {:6.0} ms  max {:6.0} ms{ratio}",
            v.len(),
            ms(p50),
            ms(p90),
            ms(max)
        );
    };
    println!("start latency: Start -> first keyed answer from the preview (goal: p50 <= 2000 ms)");
    let b50 = pct(&mut base, 50);
    line("baseline: bare pod -> first answer", &mut base, None);
    line("cold (agent attached)", &mut cold, Some(b50));
    line("idle (agent lingering)", &mut idle, Some(b50));
    line("warm (agent routing another env)", &mut warm, Some(b50));
    d.stop().await
}

/// `make bench-start` also measures how many preview sessions one target pod
/// survives: 25 sessions (Start, a keyed request answered by the preview,
/// Clean, redirects gone) one after another, more than the cap of 20
/// ephemeral containers. With the agent lingering between sessions, every
/// session is routed and the pod gains one container in all.
#[tokio::test]
#[ignore = "measurement: run with `make bench-start`"]
async fn bench_sessions_on_one_pod() -> Result<()> {
    const SESSIONS: usize = 25;
    let ns = TestNs::new("bench-sessions").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let d = previewd(&ns).await?;
    let mut c = d.client().await?;
    let ip = cluster_ip(&ns, "orders").await?;
    let cfg = config("deployment/orders", serde_json::json!({}));
    let t = Instant::now();
    for i in 0..SESSIONS {
        let key = format!("s{i}");
        c.start(start_req(&cfg, V2, &key)).await?;
        until(&ip, Some(&key), &["v2"], Duration::from_secs(60)).await?;
        c.clean(preview::proto::CleanRequest {
            selector: Some(preview::proto::clean_request::Selector::Key(key.clone())),
        })
        .await?;
        no_rules_left(&ns, "orders").await?;
        ensure!(call(&ip, Some(&key)).await? == chain(&["v1"]), "session {i} left routing behind");
    }
    let pod = &target_pods(&ns, "orders").await?[0];
    let containers = agents(pod).len();
    println!(
        "sessions: {SESSIONS} sessions on one pod in {:.1} s, each routed; ephemeral containers added: {containers} \
         (before agents lingered: one per session, and none routed after the cap of 20)",
        t.elapsed().as_secs_f64()
    );
    ensure!(containers == 1, "{containers} containers for {SESSIONS} sessions");
    d.stop().await
}
