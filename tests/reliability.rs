//! Each environment on its own, against a mocked API server (no cluster):
//! a deleted namespace, a refused pod, an unreadable record or an API server
//! that is away leaves previewd serving and the environment FAILED with its
//! reason, retried until it recovers; a clean interrupted part-way never
//! brings an environment back; one failing expiry holds up no other.

mod fake;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use fake::{FakeApi, Fault};
use http::Method;
use preview::model::{Key, PodRequest, StartRequest};
use preview::previewd::cluster::Cluster;
use preview::previewd::manager::{CleanSelector, Manager, Selector, Settings};
use preview::previewd::store::Store;
use preview::proto;
use serde_json::json;

async fn manager(fake: &FakeApi, dir: &std::path::Path) -> Result<Arc<Manager>> {
    let settings = Settings { default_namespace: "shop".into(), ..Settings::default() };
    let cluster = Cluster::new(fake.client(), Some("Never".into()), "t1".into(), None);
    Ok(Manager::new(Store::open(dir).await?, cluster, settings))
}

fn shop(namespaces: &[&str]) -> FakeApi {
    let fake = FakeApi::default();
    for ns in namespaces {
        fake.add_namespace(ns);
        fake.add_deployment(ns, "orders", json!({}));
    }
    fake
}

fn req(key: &str, ns: &str, ttl: &str) -> StartRequest {
    StartRequest {
        pods: vec![PodRequest {
            config: json!({"target": "deployment/orders"}).to_string(),
            image: "orders:v2".into(),
            namespace: ns.into(),
            ..Default::default()
        }],
        key: key.into(),
        ttl: ttl.into(),
    }
}

fn failures(m: &Manager) -> Vec<(String, String)> {
    let snap = m.snapshot(&Selector::default());
    snap.environments.into_iter().map(|e| (e.key, e.failure)).collect()
}

fn failure_of(m: &Manager, key: &str) -> Option<String> {
    failures(m).into_iter().find(|(k, _)| k == key).map(|(_, f)| f)
}

/// Runs the reaper's tick (expiry, then retries of failed environments)
/// until `done`, for at most `within`; the backoff decides when a retry is due.
async fn tick_until(m: &Manager, within: Duration, done: impl Fn(&Manager) -> bool) -> Result<()> {
    let end = tokio::time::Instant::now() + within;
    while !done(m) {
        if tokio::time::Instant::now() > end {
            bail!("not done within {within:?}: {:?}", failures(m));
        }
        m.reap().await;
        m.retry_failed().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_broken_environment_fails_alone_is_retried_and_recovers() -> Result<()> {
    let fake = shop(&["shop", "lost", "quota"]);
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    m.start(req("ok", "shop", "30m")).await?;
    m.start(req("gone", "lost", "30m")).await?;
    m.start(req("refused", "quota", "30m")).await?;
    drop(m);
    // While previewd is down: one namespace is deleted, another's pods are
    // deleted and a quota refuses new ones, and one record is corrupted.
    fake.delete_namespace("lost");
    for pod in fake.names("pods", "quota") {
        Cluster::new(fake.client(), None, "t1".into(), None).delete_pod("quota", &pod).await?;
    }
    let made = fake.calls().iter().filter(|c| c.starts_with("POST") && c.contains("/namespaces/quota/pods")).count();
    fake.fail(Fault { method: Method::POST, path: "/namespaces/quota/pods".into(), nth: made + 1, code: 403 });
    let store = Store::open(dir.path()).await?;
    store.put_raw("bad", b"{\"key\": \"bad\", \"namesp".to_vec()).await?;
    drop(store);

    let m = manager(&fake, dir.path()).await?;
    let report = m.recover(false).await;
    let failed: Vec<&str> = report.failed.iter().map(|(k, _)| k.as_str()).collect();
    ensure!(failed == ["bad", "gone", "refused"], "{report:?}");
    ensure!(failure_of(&m, "ok") == Some(String::new()), "the healthy one is untouched: {:?}", failures(&m));
    let gone = failure_of(&m, "gone").context("gone is shown")?;
    ensure!(gone.contains("recovery failed") && gone.contains("\"lost\" not found"), "{gone}");
    let refused = failure_of(&m, "refused").context("refused is shown")?;
    ensure!(refused.contains("injected failure") && refused.contains("retrying"), "{refused}");
    let bad = failure_of(&m, "bad").context("the unreadable record is shown")?;
    ensure!(bad.contains("corrupt") && bad.contains("preview clean --key bad"), "{bad}");
    // previewd keeps serving: a new environment starts.
    m.start(req("new", "shop", "30m")).await?;

    // The quota's refusal was once: the retry recreates the pod. The
    // namespace comes back: that one recovers too.
    fake.add_namespace("lost");
    fake.add_deployment("lost", "orders", json!({}));
    tick_until(&m, Duration::from_secs(10), |m| {
        failure_of(m, "gone").as_deref() == Some("") && failure_of(m, "refused").as_deref() == Some("")
    })
    .await?;
    ensure!(fake.names("pods", "lost").len() == 1 && fake.names("pods", "quota").len() == 1);
    // The unreadable record is cleaned by hand, and is then gone for good.
    let removed = m.clean(CleanSelector::Key(Key::parse("key", "bad")?)).await?;
    ensure!(removed.len() == 1, "{removed:?}");
    ensure!(failure_of(&m, "bad").is_none());
    drop(m);
    let store = Store::open(dir.path()).await?;
    ensure!(store.load_all().await?.iter().all(|r| r.is_ok()), "no unreadable record is left");
    Ok(())
}

#[tokio::test]
async fn a_clean_interrupted_part_way_never_brings_the_environment_back() -> Result<()> {
    let fake = shop(&["shop"]);
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    m.start(req("k1", "shop", "30m")).await?;
    // The owner is marked, then deleting the pod fails: the clean stops there.
    fake.fail(Fault { method: Method::DELETE, path: "/pods/".into(), nth: 1, code: 500 });
    let err = m.clean(CleanSelector::Key(Key::parse("key", "k1")?)).await.err().context("the clean fails")?;
    ensure!(tonic::Status::from(err).code() == tonic::Code::Unavailable);
    let why = failure_of(&m, "k1").context("still shown")?;
    ensure!(why.starts_with("clean failed: "), "{why}");
    let owner = fake.get("previewenvironments", "shop", "preview-env-k1").context("owner")?;
    let copy: serde_json::Value = serde_json::from_str(owner["spec"]["record"].as_str().context("copy")?)?;
    ensure!(copy["deleting"] == true, "the owner's copy carries the tombstone: {copy}");
    ensure!(owner["spec"]["deleting"] == true, "and shows it: {}", owner["spec"]);
    // previewd dies here. At the next start it finishes the clean.
    drop(m);
    let m = manager(&fake, dir.path()).await?;
    let report = m.recover(true).await;
    ensure!(report.live == 0 && report.failed.is_empty(), "{report:?}");
    ensure!(fake.names("pods", "shop").is_empty() && fake.names("previewenvironments", "shop").is_empty());
    ensure!(m.snapshot(&Selector::default()).environments.is_empty());
    Ok(())
}

/// Without a restart, the retry carries a failed clean on to the end; it
/// never revives the environment, and watchers and agents hear it is gone.
#[tokio::test]
async fn a_failed_clean_is_retried_until_the_environment_is_gone() -> Result<()> {
    let fake = shop(&["shop"]);
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    m.start(req("k1", "shop", "30m")).await?;
    let mut events = m.subscribe(&Selector::default()).1;
    fake.fail(Fault { method: Method::DELETE, path: "/pods/".into(), nth: 1, code: 500 });
    ensure!(m.clean(CleanSelector::Key(Key::parse("key", "k1")?)).await.is_err());
    tick_until(&m, Duration::from_secs(10), |m| failure_of(m, "k1").is_none()).await?;
    ensure!(fake.names("pods", "shop").is_empty() && fake.names("previewenvironments", "shop").is_empty());
    let mut kinds = Vec::new();
    while let Ok(ev) = events.try_recv() {
        kinds.push(ev.kind);
    }
    let (failed, cleaned) = (proto::EventKind::FailureChanged as i32, proto::EventKind::Cleaned as i32);
    ensure!(kinds == [failed, cleaned], "{kinds:?}");
    drop(m);
    let store = Store::open(dir.path()).await?;
    ensure!(store.load_all().await?.is_empty(), "the record is gone too");
    Ok(())
}

#[tokio::test]
async fn one_failing_expiry_holds_up_no_other() -> Result<()> {
    let fake = shop(&["shop"]);
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    let mut events = m.subscribe(&Selector::default()).1;
    m.start(req("a1", "shop", "1s")).await?;
    m.start(req("b2", "shop", "1s")).await?;
    // a1 sorts first; deleting its pod fails once.
    fake.fail(Fault { method: Method::DELETE, path: "/pods/orders-a1-".into(), nth: 1, code: 500 });
    tick_until(&m, Duration::from_secs(10), |m| failure_of(m, "b2").is_none()).await?;
    ensure!(failure_of(&m, "a1").is_none_or(|f| f.starts_with("expiry failed")), "a1 failed alone: {:?}", failures(&m));
    tick_until(&m, Duration::from_secs(10), |m| failure_of(m, "a1").is_none()).await?;
    ensure!(fake.names("pods", "shop").is_empty() && fake.names("previewenvironments", "shop").is_empty());
    // Watchers saw a1 fail before it expired.
    let mut kinds = Vec::new();
    while let Ok(ev) = events.try_recv() {
        kinds.push((ev.kind, ev.environments.first().map(|e| e.key.clone()).unwrap_or_default()));
    }
    let failed = (proto::EventKind::FailureChanged as i32, "a1".to_string());
    let expired = (proto::EventKind::Expired as i32, "a1".to_string());
    let at = |x: &(i32, String)| kinds.iter().position(|k| k == x);
    ensure!(at(&failed).zip(at(&expired)).is_some_and(|(f, e)| f < e), "{kinds:?}");
    Ok(())
}

#[tokio::test]
async fn status_is_served_from_the_store_while_the_api_server_is_away() -> Result<()> {
    let fake = shop(&["shop"]);
    let dir = tempfile::tempdir()?;
    let m = manager(&fake, dir.path()).await?;
    m.start(req("k1", "shop", "30m")).await?;
    drop(m);
    fake.set_down(true);
    let m = manager(&fake, dir.path()).await?;
    let report = m.recover(false).await;
    ensure!(report.failed.len() == 1, "{report:?}");
    let why = failure_of(&m, "k1").context("served from the store")?;
    ensure!(why.contains("503") || why.contains("away"), "{why}");
    let err = m.start(req("k2", "shop", "30m")).await.err().context("no start while away")?;
    let status = tonic::Status::from(err);
    ensure!(status.code() == tonic::Code::Unavailable && status.message().contains("kubernetes API"), "{status:?}");
    fake.set_down(false);
    tick_until(&m, Duration::from_secs(10), |m| failure_of(m, "k1").as_deref() == Some("")).await?;
    ensure!(m.snapshot(&Selector::default()).environments.len() == 1, "k2 was never made");
    Ok(())
}

/// previewd's TLS material and key come from the cluster, and a copy is
/// kept in its data directory (owner-only): a later start while the API
/// server is away serves with the same CA and key. Without a copy, such a
/// start fails, naming the API server.
#[tokio::test]
async fn tls_material_and_key_outlive_the_api_server_at_a_later_start() -> Result<()> {
    use preview::previewd::auth::{tls::TlsOptions, trust};
    use std::os::unix::fs::PermissionsExt;
    let fake = shop(&["preview-system"]);
    let dir = tempfile::tempdir()?;
    let opts = TlsOptions {
        namespace: "preview-system".into(),
        cert: None,
        key: None,
        ca: None,
        sans: vec!["previewd.test".into()],
    };
    let listen = "127.0.0.1:7443".parse()?;
    let (key1, tls1) = trust::load(&fake.client(), &opts, listen, true, dir.path()).await?;
    let tls1 = tls1.context("TLS material")?;
    ensure!(fake.get("secrets", "preview-system", "previewd-tls").is_some(), "the CA was not stored");
    ensure!(fake.get("configmaps", "preview-system", "previewd-ca").is_some(), "the CA was not published");
    let mode = std::fs::metadata(dir.path().join("trust.json"))?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the copy is mode {mode:o}");

    fake.set_down(true);
    let (key2, tls2) = trust::load(&fake.client(), &opts, listen, true, dir.path()).await?;
    let tls2 = tls2.context("TLS material")?;
    ensure!(tls2.ca_pem == tls1.ca_pem && tls2.cert_pem == tls1.cert_pem, "another CA or certificate");
    ensure!(key2.proof("a", "p", "u") == key1.proof("a", "p", "u"), "another key");
    tls2.acceptor().map_err(|e| anyhow::anyhow!("the copy does not serve: {e}"))?;

    let empty = tempfile::tempdir()?;
    let err = trust::load(&fake.client(), &opts, listen, true, empty.path()).await.err().context("started")?;
    ensure!(err.to_string().contains("kubernetes API"), "{err}");
    Ok(())
}
