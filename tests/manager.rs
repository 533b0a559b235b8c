//! The manager against a mocked API server (no cluster, no root): start,
//! rollback when a pod create fails half-way, filter and target conflicts,
//! and recovery of a pending record. The cluster tests (`service`,
//! `recovery`, `e2e`) back these up against the real API server.

mod fake;

use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use fake::{FakeApi, Fault};
use http::Method;
use preview::model::{PodRequest, StartRequest};
use preview::previewd::cluster::Cluster;
use preview::previewd::manager::{Error, Limits, Manager, Selector, Settings};
use preview::previewd::store::Store;
use serde_json::json;

fn cluster(fake: &FakeApi) -> Cluster {
    Cluster::new(fake.client(), Some("Never".into()), "t1".into(), None)
}

async fn manager(fake: &FakeApi, dir: &std::path::Path) -> Result<Arc<Manager>> {
    let settings = Settings { default_namespace: "shop".into(), ..Settings::default() };
    Ok(Manager::new(Store::open(dir).await?, cluster(fake), settings))
}

fn shop() -> FakeApi {
    let fake = FakeApi::default();
    fake.add_namespace("shop");
    fake.add_deployment("shop", "orders", json!({}));
    fake.add_deployment("shop", "payments", json!({}));
    fake
}

fn req(key: &str, config: serde_json::Value) -> StartRequest {
    StartRequest {
        pods: vec![PodRequest { config: config.to_string(), image: "orders:v2".into(), ..Default::default() }],
        key: key.into(),
        ttl: "30m".into(),
    }
}

fn code(e: Error) -> (tonic::Code, String) {
    let s = tonic::Status::from(e);
    (s.code(), s.message().to_string())
}

#[tokio::test]
async fn start_creates_the_owner_then_the_pod_and_settles() -> Result<()> {
    let fake = shop();
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    let started = m.start(req("k1", json!({"target": "deployment/orders"}))).await?;
    ensure!(started.key.as_str() == "k1");
    ensure!(!started.environment.record.pending, "settled");

    ensure!(
        fake.names("previewenvironments", "shop") == ["preview-env-k1"],
        "{:?}",
        fake.names("previewenvironments", "shop")
    );
    let owner = fake.get("previewenvironments", "shop", "preview-env-k1").context("owner")?;
    let pods = fake.names("pods", "shop");
    ensure!(pods.len() == 1 && pods[0].starts_with("orders-k1-"), "{pods:?}");
    let pod = fake.get("pods", "shop", &pods[0]).context("pod")?;
    ensure!(pod["spec"]["containers"][0]["image"] == "orders:v2");
    ensure!(pod["metadata"]["labels"]["preview.dev/key"] == "k1");
    ensure!(pod["metadata"]["labels"]["app"] == "orders", "the target's labels are kept");
    let oref = &pod["metadata"]["ownerReferences"][0];
    ensure!(
        oref["kind"] == "PreviewEnvironment" && oref["uid"] == owner["metadata"]["uid"] && oref["controller"] == true
    );
    ensure!(pod["spec"]["readinessGates"][0]["conditionType"] == "preview.dev/routed");
    // The owner comes before the pod: its uid is in the pod.
    let calls = fake.calls();
    let apply =
        calls.iter().position(|c| c.starts_with("PATCH") && c.contains("previewenvironments")).context("apply")?;
    let create = calls.iter().position(|c| c.starts_with("POST") && c.contains("pods")).context("create")?;
    ensure!(apply < create, "{calls:?}");

    let snap = m.snapshot(&Selector::default());
    ensure!(snap.environments.len() == 1 && snap.environments[0].pods.len() == 1, "{snap:?}");
    ensure!(m.routes_for("shop", preview::model::WorkloadKind::Deployment, "orders").is_empty(), "no IP yet");

    // The same Start again is idempotent: same pod name, nothing new created.
    m.start(req("k1", json!({"target": "deployment/orders"}))).await?;
    ensure!(fake.names("pods", "shop") == pods);
    Ok(())
}

#[tokio::test]
async fn a_pod_create_failing_half_way_leaves_nothing_behind() -> Result<()> {
    let fake = shop();
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    // Two replicas; the second create fails.
    fake.fail(Fault { method: Method::POST, path: "/pods".into(), nth: 2, code: 500 });
    let config = json!({"target": "deployment/orders", "feature": {"preview": {"replicas": 2}}});
    let err = m.start(req("k1", config)).await.err().context("the start fails")?;
    let (c, msg) = code(err);
    ensure!(c == tonic::Code::Unavailable && msg.contains("create pod"), "{c:?} {msg}");
    ensure!(fake.names("pods", "shop").is_empty(), "the first replica is deleted again");
    ensure!(fake.names("previewenvironments", "shop").is_empty(), "the owner is deleted again");
    ensure!(m.snapshot(&Selector::default()).environments.is_empty());
    drop(m);
    // Nothing is left in the store either: a restart finds no environment.
    let m = manager(&fake, dir.path()).await?;
    let report = m.recover(false).await;
    ensure!(report.live == 0 && report.recreated == 0, "{report:?}");

    // Adding a pod to a live environment fails the same way: the
    // environment keeps what it had.
    m.start(req("k2", json!({"target": "deployment/orders"}))).await?;
    let before = fake.names("pods", "shop");
    let pod = PodRequest {
        config: json!({"target": "deployment/payments"}).to_string(),
        image: "payments:v2".into(),
        ..Default::default()
    };
    let creates = fake.calls().iter().filter(|c| c.starts_with("POST") && c.contains("/pods")).count();
    fake.fail(Fault { method: Method::POST, path: "/pods".into(), nth: creates + 1, code: 500 });
    ensure!(m.add_pod("k2", Some(pod)).await.is_err());
    ensure!(fake.names("pods", "shop") == before, "{:?}", fake.names("pods", "shop"));
    let snap = m.snapshot(&Selector::default());
    ensure!(snap.environments.len() == 1 && snap.environments[0].pods.len() == 1, "{snap:?}");
    Ok(())
}

#[tokio::test]
async fn conflicts_and_bad_targets_are_refused_naming_the_field() -> Result<()> {
    let fake = shop();
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    let filtered = |key| {
        req(
            key,
            json!({"target": "deployment/orders",
                   "feature": {"network": {"incoming": {"http_filter": {"header_filter": "^x-user: a$"}}}}}),
        )
    };
    m.start(filtered("k1")).await?;
    let (c, msg) = code(m.start(filtered("k2")).await.err().context("same filter")?);
    ensure!(c == tonic::Code::AlreadyExists && msg.contains("\"k1\""), "{c:?} {msg}");
    ensure!(fake.get("previewenvironments", "shop", "preview-env-k2").is_none(), "nothing made for k2");
    // The default (key) filter of another key does not conflict.
    m.start(req("k3", json!({"target": "deployment/orders"}))).await?;

    let (c, msg) = code(m.start(req("k4", json!({"target": "deployment/nope"}))).await.err().context("gone")?);
    ensure!(c == tonic::Code::NotFound && msg.starts_with("target: "), "{c:?} {msg}");
    let config = json!({"target": "deployment/orders/container/nope"});
    let (c, msg) = code(m.start(req("k4", config)).await.err().context("container")?);
    ensure!(c == tonic::Code::InvalidArgument && msg.starts_with("target.container: "), "{c:?} {msg}");
    let mut r = req("k4", json!({"target": "deployment/orders"}));
    r.pods[0].namespace = "elsewhere".into();
    let (c, msg) = code(m.start(r).await.err().context("namespace")?);
    ensure!(c == tonic::Code::NotFound && msg.starts_with("namespace: "), "{c:?} {msg}");
    let mut r = req("k4", json!({"target": "deployment/orders"}));
    r.pods.push(r.pods[0].clone());
    let (c, msg) = code(m.start(r).await.err().context("duplicate name")?);
    ensure!(c == tonic::Code::InvalidArgument && msg.starts_with("pods[1].name: "), "{c:?} {msg}");
    let (c, msg) = code(m.start(req("K4", json!({}))).await.err().context("bad key")?);
    ensure!(c == tonic::Code::InvalidArgument && msg.starts_with("key: "), "{c:?} {msg}");
    // An environment lives in one namespace.
    fake.add_namespace("other");
    let pod = PodRequest { namespace: "other".into(), image: "x:1".into(), ..Default::default() };
    let (c, msg) = code(m.add_pod("k1", Some(pod)).await.err().context("other namespace")?);
    ensure!(c == tonic::Code::FailedPrecondition && msg.starts_with("namespace: "), "{c:?} {msg}");
    ensure!(fake.get("previewenvironments", "shop", "preview-env-k4").is_none(), "no refused start left anything");
    Ok(())
}

#[tokio::test]
async fn limits_and_denied_namespaces_are_refused_naming_them_and_make_nothing() -> Result<()> {
    let fake = shop();
    fake.add_namespace("kube-system");
    fake.add_deployment("kube-system", "orders", json!({}));
    let dir = tempfile::tempdir()?;
    let settings = Settings {
        default_namespace: "shop".into(),
        limits: Limits { max_pods_per_env: 3, max_filter_regexes: 2, max_regex_bytes: 16, ..Limits::default() },
        ..Settings::default()
    };
    let m = Manager::new(Store::open(dir.path()).await?, cluster(&fake), settings);
    let mut r = req("k1", json!({"target": "deployment/orders"}));
    r.pods[0].namespace = "kube-system".into();
    let (c, msg) = code(m.start(r).await.err().context("denied namespace")?);
    ensure!(c == tonic::Code::PermissionDenied && msg.contains("--deny-namespaces"), "{c:?} {msg}");
    let filter = |f: serde_json::Value| {
        req("k1", json!({"target": "deployment/orders", "feature": {"network": {"incoming": {"http_filter": f}}}}))
    };
    let three = json!({"any_of": [{"header": "^a: 1$"}, {"header": "^b: 2$"}, {"path": "^/c"}]});
    let (c, msg) = code(m.start(filter(three)).await.err().context("regex count")?);
    ensure!(c == tonic::Code::ResourceExhausted && msg.contains("--max-filter-regexes"), "{c:?} {msg}");
    ensure!(msg.starts_with("feature.network.incoming.http_filter: "), "{msg}");
    let long = json!({"header_filter": format!("^x-user: {}$", "a".repeat(20))});
    let (c, msg) = code(m.start(filter(long)).await.err().context("regex size")?);
    ensure!(c == tonic::Code::ResourceExhausted && msg.contains("--max-regex-bytes"), "{c:?} {msg}");
    let four = json!({"target": "deployment/orders", "feature": {"preview": {"replicas": 4}}});
    let (c, msg) = code(m.start(req("k1", four)).await.err().context("pods")?);
    ensure!(
        c == tonic::Code::ResourceExhausted && msg.starts_with("pods: ") && msg.contains("--max-pods-per-env"),
        "{msg}"
    );
    ensure!(fake.calls().iter().all(|c| c.starts_with("GET")), "nothing was written: {:?}", fake.calls());
    ensure!(m.snapshot(&Selector::default()).environments.is_empty());
    Ok(())
}

#[tokio::test]
async fn recovery_finishes_a_pending_record_and_removes_strays() -> Result<()> {
    let fake = shop();
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    m.start(req("k1", json!({"target": "deployment/orders"}))).await?;
    drop(m);
    // As if previewd died after writing its intent and before creating the
    // pod: the record is pending and the pod is missing.
    let pod = fake.names("pods", "shop").pop().context("pod")?;
    let store = Store::open(dir.path()).await?;
    let mut rec = store.load_all().await?.pop().context("record")??;
    rec.pending = true;
    store.put(&rec).await?;
    drop(store);
    let stale = fake.get("pods", "shop", &pod).context("pod object")?;
    let mut ghost = stale.clone();
    ghost["metadata"]["labels"]["preview.dev/key"] = json!("ghost");
    fake.put("pods", "shop", "ghost-pod", ghost);
    let k8s_delete = |name: &str| {
        let cluster = cluster(&fake);
        let name = name.to_string();
        async move { cluster.delete_pod("shop", &name).await }
    };
    ensure!(k8s_delete(&pod).await?, "pod removed behind previewd's back");

    let m = manager(&fake, dir.path()).await?;
    let report = m.recover(false).await;
    ensure!(report.live == 1 && report.recreated == 1, "{report:?}");
    ensure!(report.deleted == ["pod/shop/ghost-pod"], "{report:?}");
    ensure!(fake.names("pods", "shop") == [pod.clone()], "{:?}", fake.names("pods", "shop"));
    let snap = m.snapshot(&Selector::default());
    ensure!(snap.environments.len() == 1 && !snap.environments[0].pending, "{snap:?}");
    drop(m);
    let store = Store::open(dir.path()).await?;
    ensure!(!store.load_all().await?.pop().context("record")??.pending, "the settled record is stored");
    Ok(())
}
