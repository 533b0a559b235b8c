//! Issue 3: PreviewService against the real cluster: cloning without touching
//! the target, status streaming, multi-pod environments, TTL, clean, and bad
//! input with the right codes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use preview::proto::{self, EventKind, clean_request};
use tonic::Code;

const ORDERS: &str =
    r#"{"target": "deployment/orders", "feature": {"env": {"override": {"FEATURE": "on-{{ key }}"}}}}"#;

async fn pod_uids(ns: &TestNs, selector: &str) -> Result<BTreeSet<String>> {
    let pods = ns.api::<Pod>().list(&ListParams::default().labels(selector)).await?;
    Ok(pods.items.into_iter().filter_map(|p| p.metadata.uid).collect())
}

async fn preview_pods(ns: &TestNs, key: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("preview.dev/key={key},preview.dev/role=pod"));
    Ok(ns.api::<Pod>().list(&lp).await?.items)
}

/// Waits for a Status snapshot in which `check` holds for the environment.
async fn wait_env(
    d: &Previewd,
    key: &str,
    what: &str,
    check: impl Fn(&proto::Environment) -> bool,
) -> Result<proto::Environment> {
    let mut c = d.client().await?;
    let req = proto::StatusRequest { key: key.into(), namespace: String::new(), watch: true };
    let mut stream = c.status(req).await?.into_inner();
    let wait = async {
        while let Some(ev) = stream.next().await {
            for env in ev?.environments {
                if env.key == key && check(&env) {
                    return Ok(env);
                }
            }
        }
        anyhow::bail!("stream ended")
    };
    tokio::time::timeout(Duration::from_secs(90), wait).await.with_context(|| format!("waiting for {what}"))?
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn start_clones_the_target_and_leaves_it_untouched() -> Result<()> {
    let ns = TestNs::new("t-start").await?;
    echo_app(&ns, "orders", "v1", 1, &[("KEEP", "kept")]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let before_pods = pod_uids(&ns, "app=orders").await?;
    let before_rs: BTreeSet<String> = ns
        .api::<ReplicaSet>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|r| r.metadata.uid)
        .collect();
    let d = Previewd::start(&ns).await?;
    let mut c = d.client().await?;

    let resp = c.start(start_req(ORDERS, "preview.local/echo:v2", "")).await?.into_inner();
    let key = resp.key.clone();
    ensure!(key.len() == 13 && preview::model::Key::parse("key", &key).is_ok(), "generated key {key}");

    // The preview pod: the target's spec with the new image and env overrides.
    let pods = preview_pods(&ns, &key).await?;
    ensure!(pods.len() == 1, "{} preview pods", pods.len());
    let pod = &pods[0];
    let spec = pod.spec.as_ref().context("spec")?;
    let app = &spec.containers[0];
    ensure!(app.image.as_deref() == Some("preview.local/echo:v2"), "image {:?}", app.image);
    let env: Vec<(String, String)> =
        app.env.iter().flatten().map(|e| (e.name.clone(), e.value.clone().unwrap_or_default())).collect();
    for want in [("KEEP", "kept".to_string()), ("FEATURE", format!("on-{key}")), ("PREVIEW_KEY", key.clone())] {
        ensure!(env.contains(&(want.0.to_string(), want.1.clone())), "env {env:?} lacks {want:?}");
    }
    ensure!(app.readiness_probe.is_some(), "probe not kept");
    let l = labels(pod);
    ensure!(l.get("app").map(String::as_str) == Some("orders"), "labels {l:?}");
    ensure!(l.get("preview.dev/key") == Some(&key), "labels {l:?}");

    // Status reports the container Ready…
    wait_env(&d, &key, "preview ready", |e| e.pods.iter().all(|p| p.ready)).await?;
    // …while the Service's EndpointSlices never list it as ready.
    let ip = ns
        .api::<Pod>()
        .get(pod.metadata.name.as_deref().context("name")?)
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("ip")?;
    for _ in 0..8 {
        let slices =
            ns.api::<EndpointSlice>().list(&ListParams::default().labels("kubernetes.io/service-name=orders")).await?;
        for ep in slices.items.iter().flat_map(|s| &s.endpoints) {
            if ep.addresses.contains(&ip) {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready);
                ensure!(ready != Some(true), "preview pod {ip} is a ready endpoint of the target Service");
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The target is exactly as it was: same pods, same ReplicaSets, 1 replica.
    ensure!(pod_uids(&ns, "app=orders,!preview.dev/key").await? == before_pods, "target pods changed");
    let after_rs: BTreeSet<String> = ns
        .api::<ReplicaSet>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|r| r.metadata.uid)
        .collect();
    ensure!(after_rs == before_rs, "ReplicaSets changed");
    let dep = ns.api::<Deployment>().get("orders").await?;
    let status = dep.status.context("status")?;
    ensure!(status.replicas == Some(1) && status.ready_replicas == Some(1), "deployment status {status:?}");
    ensure!(
        pod.metadata.owner_references.as_ref().is_some_and(|o| o.len() == 1 && o[0].kind == "PreviewEnvironment"),
        "owner {:?}",
        pod.metadata.owner_references
    );

    let cleaned =
        c.clean(proto::CleanRequest { selector: Some(clean_request::Selector::Key(key.clone())) }).await?.into_inner();
    ensure!(cleaned.removed.len() == 1 && cleaned.removed[0].objects.len() == 2, "{cleaned:?}");
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn watch_shows_creating_then_ready_and_missing_images() -> Result<()> {
    let ns = TestNs::new("t-watch").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let d = Previewd::start(&ns).await?;
    let mut c = d.client().await?;
    let mut watch =
        c.status(proto::StatusRequest { key: "w*".into(), namespace: String::new(), watch: true }).await?.into_inner();
    let first = watch.next().await.context("no snapshot")??;
    ensure!(first.kind == EventKind::Snapshot as i32 && first.environments.is_empty(), "{first:?}");

    c.start(start_req(ORDERS, "preview.local/echo:v2", "w-ok")).await?;
    let mut reasons = Vec::new();
    let mut last_seq = first.sequence;
    let ok = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(ev) = watch.next().await {
            let ev = ev?;
            ensure!(ev.sequence > last_seq, "events out of order: {} after {last_seq}", ev.sequence);
            last_seq = ev.sequence;
            if let Some(p) = ev.pod {
                reasons.push(p.reason.clone());
                if p.ready {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("stream ended")
    })
    .await;
    ok.context("no Ready event")??;
    ensure!(reasons.last().map(String::as_str) == Some("Ready"), "{reasons:?}");
    ensure!(
        reasons.iter().any(|r| r == "ContainerCreating" || r == "Pending"),
        "no creating phase seen before Ready: {reasons:?}"
    );

    c.start(start_req(r#"{"target": "deployment/orders"}"#, "preview.local/no-such-image:v0", "w-bad")).await?;
    let env =
        wait_env(&d, "w-bad", "a waiting reason", |e| e.pods.iter().any(|p| p.reason == "ErrImageNeverPull")).await?;
    ensure!(!env.pods[0].ready && !env.pods[0].last_error.is_empty(), "{env:?}");
    c.clean(proto::CleanRequest { selector: Some(clean_request::Selector::Glob("w-*".into())) }).await?;
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn add_pod_multi_target_targetless_and_replicas() -> Result<()> {
    let ns = TestNs::new("t-multi").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    echo_app(&ns, "payments", "v1", 1, &[]).await?;
    let d = Previewd::start(&ns).await?;
    let mut c = d.client().await?;
    let key = "multi1";
    c.start(start_req(ORDERS, "preview.local/echo:v2", key)).await?;
    // AddPod into the existing key: a second target.
    let add = proto::AddPodRequest {
        key: key.into(),
        pod: Some(proto::PodRequest {
            config: r#"{"target": "deployment/payments"}"#.into(),
            image: "preview.local/echo:v2".into(),
            ..Default::default()
        }),
    };
    c.add_pod(add.clone()).await?;
    // Targetless, two replicas, via Start on the same key.
    let tl = r#"{"feature": {"preview": {"replicas": 2}}}"#;
    let mut req = start_req(tl, "preview.local/echo:v2", key);
    req.pods[0].name = "tool".into();
    let resp = c.start(req).await?.into_inner();
    let env = resp.environment.context("env")?;
    let groups: Vec<(String, String)> = env.pods.iter().map(|p| (p.group.clone(), p.target.clone())).collect();
    ensure!(
        groups
            == vec![
                ("orders".into(), "deployment/orders".into()),
                ("payments".into(), "deployment/payments".into()),
                ("tool".into(), "targetless".into()),
                ("tool".into(), "targetless".into()),
            ],
        "{groups:?}"
    );
    wait_env(&d, key, "4 ready pods", |e| e.pods.len() == 4 && e.pods.iter().all(|p| p.ready)).await?;
    ensure!(preview_pods(&ns, key).await?.len() == 4);
    // Targetless pods carry the key and a fresh spec.
    let tool = preview_pods(&ns, key)
        .await?
        .into_iter()
        .find(|p| labels(p).get("preview.dev/group").map(String::as_str) == Some("tool"))
        .context("tool pod")?;
    ensure!(!labels(&tool).contains_key("app"), "targetless pod copied labels");

    // AddPod again with the same name replaces the pod (new spec, new name).
    let mut replace = add.clone();
    replace.pod.as_mut().context("pod")?.config =
        r#"{"target": "deployment/payments", "feature": {"env": {"override": {"X": "2"}}}}"#.into();
    let env = c.add_pod(replace).await?.into_inner().environment.context("env")?;
    ensure!(env.pods.len() == 4, "{:?}", env.pods);
    let pay: Vec<_> = env.pods.iter().filter(|p| p.group == "payments").collect();
    ensure!(pay.len() == 1);
    let pay_name = pay[0].name.clone();
    eventually("old payments pod gone", Duration::from_secs(30), || {
        let ns = &ns;
        let pay_name = pay_name.clone();
        async move {
            let names: Vec<String> = preview_pods(ns, key).await?.into_iter().filter_map(|p| p.metadata.name).collect();
            Ok((names.len() == 4 && names.contains(&pay_name)).then_some(()))
        }
    })
    .await?;

    let err = c.add_pod(proto::AddPodRequest { key: "nope".into(), ..add }).await.unwrap_err();
    ensure!(err.code() == Code::NotFound && err.message().contains("key"), "{err:?}");
    c.clean(proto::CleanRequest { selector: Some(clean_request::Selector::Key(key.into())) }).await?;
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn ttl_expiry_removes_everything_and_clean_is_idempotent() -> Result<()> {
    let ns = TestNs::new("t-ttl").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let d = Previewd::start(&ns).await?;
    let mut c = d.client().await?;
    let mut req = start_req(ORDERS, "preview.local/echo:v2", "ttl1");
    req.ttl = "3s".into();
    let started = tokio::time::Instant::now();
    c.start(req.clone()).await?;
    let mut watch = c
        .status(proto::StatusRequest { key: "ttl1".into(), namespace: String::new(), watch: true })
        .await?
        .into_inner();
    // Extending the TTL sends TTL_EXTENDED.
    req.ttl = "4s".into();
    c.start(req).await?;
    let mut kinds = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(ev) = watch.next().await {
            let ev = ev?;
            kinds.push(ev.kind);
            if ev.kind == EventKind::Expired as i32 {
                return Ok::<_, anyhow::Error>(());
            }
        }
        anyhow::bail!("stream ended")
    })
    .await
    .context("no expired event")??;
    let elapsed = started.elapsed();
    ensure!(kinds.contains(&(EventKind::TtlExtended as i32)), "{kinds:?}");
    // Deadline ≈ 4 s after the second Start; the reaper must act within 5 s of it.
    ensure!(elapsed < Duration::from_secs(10), "expired after {elapsed:?}");
    eventually("preview objects gone", Duration::from_secs(30), || {
        let ns = &ns;
        async move { Ok(preview_pods(ns, "ttl1").await?.is_empty().then_some(())) }
    })
    .await?;
    let snap = c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
    ensure!(snap.environments.is_empty(), "{snap:?}");
    // Clean of something already gone is fine and removes nothing.
    for _ in 0..2 {
        let r = c
            .clean(proto::CleanRequest { selector: Some(clean_request::Selector::Key("ttl1".into())) })
            .await?
            .into_inner();
        ensure!(r.removed.is_empty(), "{r:?}");
    }
    d.stop().await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn bad_input_gets_the_right_code_and_names_the_field() -> Result<()> {
    let ns = TestNs::new("t-bad").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let d = Previewd::start(&ns).await?;
    let mut c = d.client().await?;
    let img = "preview.local/echo:v2";
    let filter = r#"{"target": "deployment/orders", "feature": {"network": {"incoming": {"http_filter": {"header_filter": "^x-team: blue$"}}}}}"#;
    c.start(start_req(filter, img, "first")).await?;

    let mut cases: Vec<(proto::StartRequest, Code, &str)> = vec![
        (start_req(ORDERS, img, "Bad_Key"), Code::InvalidArgument, "key"),
        (start_req(ORDERS, "", "k1"), Code::InvalidArgument, "image"),
        (start_req(r#"{"target": "deployment/nope"}"#, img, "k1"), Code::NotFound, "target"),
        (
            start_req(r#"{"target": "deployment/orders/container/nope"}"#, img, "k1"),
            Code::InvalidArgument,
            "target.container",
        ),
        (
            start_req(r#"{"target": {"path": "deployment/orders", "namespace": "no-such-ns"}}"#, img, "k1"),
            Code::NotFound,
            "namespace",
        ),
        (
            start_req(r#"{"feature": {"preview": {"ttl_mins": "soon"}}}"#, img, "k1"),
            Code::InvalidArgument,
            "feature.preview.ttl_mins",
        ),
        (start_req("{\"target\": ", img, "k1"), Code::InvalidArgument, "malformed JSON"),
        (start_req("target: [", img, "k1"), Code::InvalidArgument, "malformed YAML"),
        (start_req(r#"{"target": "deployment/orders", "colour": "blue"}"#, img, "k1"), Code::InvalidArgument, "colour"),
        (start_req(filter, img, "second"), Code::AlreadyExists, "\"first\""),
    ];
    let mut bad_ttl = start_req(ORDERS, img, "k1");
    bad_ttl.ttl = "forever".into();
    cases.push((bad_ttl, Code::InvalidArgument, "ttl"));
    let mut inf = start_req(ORDERS, img, "k1");
    inf.ttl = "infinite".into();
    cases.push((inf, Code::InvalidArgument, "ttl"));
    cases.push((proto::StartRequest::default(), Code::InvalidArgument, "pods"));

    for (req, code, field) in cases {
        let err = c.start(req.clone()).await.expect_err(&format!("{req:?} should fail"));
        ensure!(err.code() == code, "{req:?}: got {:?} {}", err.code(), err.message());
        ensure!(err.message().contains(field), "{req:?}: message {:?} does not name {field}", err.message());
    }
    // Nothing half-made: only the first environment exists.
    let snap = c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
    ensure!(snap.environments.iter().map(|e| e.key.as_str()).collect::<Vec<_>>() == vec!["first"], "{snap:?}");
    let lp = ListParams::default().labels(&format!("preview.dev/instance={}", d.instance));
    ensure!(ns.api::<Pod>().list(&lp).await?.items.len() == 1, "stray preview pods");
    // A known-but-unsupported mirrord field is a warning, not an error.
    let resp = c
        .start(start_req(r#"{"target": "deployment/orders", "feature": {"fs": "read"}}"#, img, "warned"))
        .await?
        .into_inner();
    ensure!(resp.warnings.iter().any(|w| w.contains("feature.fs")), "{:?}", resp.warnings);
    c.clean(proto::CleanRequest { selector: Some(clean_request::Selector::Glob("*".into())) }).await?;
    let err = c.clean(proto::CleanRequest { selector: None }).await.unwrap_err();
    ensure!(err.code() == Code::InvalidArgument && err.message().contains("selector"));
    d.stop().await
}
