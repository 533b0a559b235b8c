//! The gRPC API over an in-memory duplex transport (as tonic's own tests
//! do), with the manager on a mocked API server: codes and messages at the
//! edge, the Status stream, and a slow watcher being resynced.

mod fake;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use fake::FakeApi;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use preview::previewd::api::Api;
use preview::previewd::cluster::Cluster;
use preview::previewd::manager::{Manager, Settings};
use preview::previewd::store::Store;
use preview::proto::preview_service_client::PreviewServiceClient;
use preview::proto::preview_service_server::PreviewServiceServer;
use preview::proto::{self, EventKind, clean_request};
use serde_json::json;
use tonic::transport::{Channel, Endpoint, Server, Uri};

struct Harness {
    client: PreviewServiceClient<Channel>,
    manager: Arc<Manager>,
    fake: FakeApi,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn harness() -> Result<Harness> {
    let fake = FakeApi::default();
    fake.add_namespace("shop");
    fake.add_deployment("shop", "orders", json!({}));
    let dir = tempfile::tempdir()?;
    let settings = Settings { default_namespace: "shop".into(), ..Settings::default() };
    let cluster = Cluster::new(fake.client(), Some("Never".into()), "t1".into(), None);
    let manager = Manager::new(Store::open(dir.path()).await?, cluster, settings);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let svc = PreviewServiceServer::new(Api::new(manager.clone(), stopping, 16));
    // The edge layer, as previewd has it: with auth off it names the caller anonymous.
    let auth = preview::previewd::auth::layer::AuthLayer(Arc::new(preview::previewd::auth::Auth::off()));
    tokio::spawn(async move {
        let incoming = tokio_stream::once(Ok::<_, std::io::Error>(server_io));
        // Ends when the test's client goes away.
        let _ = Server::builder().layer(auth).add_service(svc).serve_with_incoming(incoming).await;
    });
    let mut client_io = Some(client_io);
    let channel = Endpoint::try_from("http://in-memory")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let io = client_io.take();
            async move { io.map(TokioIo::new).ok_or_else(|| std::io::Error::other("one connection only")) }
        }))
        .await?;
    Ok(Harness { client: PreviewServiceClient::new(channel), manager, fake, _dir: dir, _stop: stop })
}

fn start(key: &str, config: serde_json::Value) -> proto::StartRequest {
    proto::StartRequest {
        pods: vec![proto::PodRequest { config: config.to_string(), image: "orders:v2".into(), ..Default::default() }],
        key: key.into(),
        ttl: "30m".into(),
    }
}

#[tokio::test]
async fn start_status_clean_and_the_codes_at_the_edge() -> Result<()> {
    let mut h = harness().await?;
    let resp = h.client.start(start("k1", json!({"target": "deployment/orders", "feature": {"fs": "read"}}))).await?;
    let resp = resp.into_inner();
    ensure!(resp.key == "k1" && resp.warnings.len() == 1, "{resp:?}");
    let env = resp.environment.context("environment")?;
    ensure!(env.namespace == "shop" && env.pods.len() == 1 && !env.pending, "{env:?}");

    let snap = h.client.status(proto::StatusRequest::default()).await?.into_inner().message().await?;
    let snap = snap.context("one snapshot")?;
    ensure!(snap.kind == EventKind::Snapshot as i32 && snap.environments.len() == 1, "{snap:?}");

    let cases = [
        (start("k2", json!({"target": "deployment/nope"})), tonic::Code::NotFound, "target: "),
        (start("k2", json!({"targt": "x"})), tonic::Code::InvalidArgument, "targt: "),
        (proto::StartRequest { ttl: "48h".into(), ..start("k2", json!({})) }, tonic::Code::InvalidArgument, "ttl: "),
        (start("Bad", json!({})), tonic::Code::InvalidArgument, "key: "),
        (proto::StartRequest::default(), tonic::Code::InvalidArgument, "pods: "),
    ];
    for (req, code, prefix) in cases {
        let err = h.client.start(req.clone()).await.err().with_context(|| format!("refused: {req:?}"))?;
        ensure!(err.code() == code && err.message().starts_with(prefix), "{req:?}: {err:?}");
    }
    let err = h
        .client
        .clean(proto::CleanRequest { selector: Some(clean_request::Selector::Key("Bad Key".into())) })
        .await
        .err()
        .context("bad key")?;
    ensure!(err.code() == tonic::Code::InvalidArgument && err.message().starts_with("key: "), "{err:?}");

    let removed = h
        .client
        .clean(proto::CleanRequest { selector: Some(clean_request::Selector::Key("k1".into())) })
        .await?
        .into_inner()
        .removed;
    ensure!(removed.len() == 1 && removed[0].objects.len() == 2, "{removed:?}");
    ensure!(h.fake.names("pods", "shop").is_empty() && h.fake.names("previewenvironments", "shop").is_empty());
    Ok(())
}

/// A watcher that stops reading falls more than the event buffer behind;
/// it gets a fresh snapshot and then the events after it, never a gap.
#[tokio::test]
async fn a_slow_watcher_is_resynced_with_a_snapshot() -> Result<()> {
    let mut h = harness().await?;
    h.client.start(start("k1", json!({"target": "deployment/orders"}))).await?;
    let mut watch = h.client.status(proto::StatusRequest { watch: true, ..Default::default() }).await?.into_inner();
    let first = watch.message().await?.context("snapshot")?;
    ensure!(first.kind == EventKind::Snapshot as i32);

    // Pod changes while the watcher reads nothing: far more than the
    // 1024-event buffer, the 32-event queue and the transport's windows hold.
    let name = h.fake.names("pods", "shop").pop().context("pod")?;
    let mut pod: Pod = serde_json::from_value(h.fake.get("pods", "shop", &name).context("pod object")?)?;
    const CHANGES: i32 = 20_000;
    for restarts in 1..=CHANGES {
        pod.status = Some(serde_json::from_value(json!({
            "phase": "Running", "podIP": "198.18.0.9",
            "containerStatuses": [{"name": "app", "ready": false, "restartCount": restarts, "image": "orders:v2",
                                   "imageID": "", "state": {"running": {}}}]
        }))?);
        h.manager.observe_pod(&pod, false);
    }

    let (mut resynced, mut last_restarts, mut last_seq) = (false, 0, first.sequence);
    let read = async {
        while last_restarts < CHANGES as u32 {
            let ev = watch.message().await?.context("the stream ended")?;
            ensure!(ev.sequence > last_seq, "sequences only grow: {} after {last_seq}", ev.sequence);
            last_seq = ev.sequence;
            resynced |= ev.kind == EventKind::Snapshot as i32;
            let restarts = ev.environments.first().and_then(|e| e.pods.first()).map_or(0, |p| p.restarts);
            ensure!(restarts >= last_restarts, "never older than what came before");
            last_restarts = restarts;
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.context("reading the watch took over 60 s")??;
    ensure!(resynced, "the slow watcher got a fresh snapshot");
    ensure!(last_restarts == CHANGES as u32, "and caught up with the last change");
    Ok(())
}
