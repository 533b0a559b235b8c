//! Shared helpers for tests against the real local cluster: a kube client,
//! a namespace per test that is deleted afterwards, the echo app, exec and
//! an in-process previewd.
#![allow(dead_code)]

pub mod e2e;
pub mod netns;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, AttachParams, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::io::AsyncReadExt;

pub const STATE_KUBECONFIG: &str = "/var/lib/preview-cluster/admin.kubeconfig";

pub fn kubeconfig_path() -> String {
    std::env::var("KUBECONFIG").unwrap_or_else(|_| STATE_KUBECONFIG.to_string())
}

pub async fn client() -> Result<Client> {
    let path = kubeconfig_path();
    let kc = Kubeconfig::read_from(&path)
        .with_context(|| format!("reading {path}: is the cluster up? run `make cluster-up`"))?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// A namespace of its own for one test; deleted on drop (even on panic).
pub struct TestNs {
    pub name: String,
    pub client: Client,
}

impl TestNs {
    pub async fn new(prefix: &str) -> Result<TestNs> {
        let client = client().await?;
        let name = format!("{prefix}-{}", preview::model::Key::generate().get(..6).unwrap_or("x"));
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"preview-test": "true"}}
        }))?;
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        Ok(TestNs { name, client })
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        // Drop cannot await; kubectl deletes without waiting.
        let _ = std::process::Command::new(kubectl())
            .args(["--kubeconfig", &kubeconfig_path(), "delete", "namespace", &self.name, "--wait=false"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

pub fn kubectl() -> String {
    let cache = std::env::var("PREVIEW_CACHE").unwrap_or_else(|_| "/var/cache/preview-env".into());
    format!("{cache}/k8s-v1.34.4/bin/kubectl")
}

/// An echo Deployment and Service named `name`, answering with `version`.
pub async fn echo_app(ns: &TestNs, name: &str, version: &str, replicas: i32, extra_env: &[(&str, &str)]) -> Result<()> {
    let env: Vec<_> = extra_env.iter().map(|(k, v)| serde_json::json!({"name": k, "value": v})).collect();
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "app",
                        "image": format!("preview.local/echo:{version}"),
                        "imagePullPolicy": "Never",
                        "args": ["serve"],
                        "env": env,
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
                    }]
                }
            }
        }
    }))?;
    ns.api::<Deployment>().create(&PostParams::default(), &dep).await?;
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"port": 8080, "targetPort": 8080, "name": "http"}]}
    }))?;
    ns.api::<Service>().create(&PostParams::default(), &svc).await?;
    Ok(())
}

/// Waits until `check` returns Some, polling every 250 ms.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let end = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if tokio::time::Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}; last error: {last_err:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn ready_pods(ns: &TestNs, selector: &str, n: usize) -> Result<Vec<Pod>> {
    let api = ns.api::<Pod>();
    let lp = ListParams::default().labels(selector);
    eventually(&format!("{n} ready pods with {selector}"), Duration::from_secs(90), || {
        let (api, lp) = (api.clone(), lp.clone());
        async move {
            let pods: Vec<Pod> = api
                .list(&lp)
                .await?
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|cs| cs.iter().all(|c| c.ready))
                })
                .collect();
            Ok((pods.len() == n).then_some(pods))
        }
    })
    .await
}

/// Runs a command in a pod's container and returns its stdout.
pub async fn exec(ns: &TestNs, pod: &str, container: &str, cmd: &[&str]) -> Result<String> {
    let ap = AttachParams::default().container(container).stderr(false);
    let mut proc = ns.api::<Pod>().exec(pod, cmd.to_vec(), &ap).await?;
    let mut out = String::new();
    proc.stdout().context("no stdout")?.read_to_string(&mut out).await?;
    let status = proc.take_status().context("no status")?.await;
    proc.join().await?;
    if let Some(s) = status
        && s.status.as_deref() == Some("Failure")
    {
        bail!("{cmd:?} in {pod} failed: {:?} {out}", s.message);
    }
    Ok(out)
}

/// A pod that just runs the echo server, for running clients from inside the cluster.
pub async fn client_pod(ns: &TestNs, name: &str) -> Result<Pod> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"role": "client"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "client", "image": "preview.local/echo:v1", "imagePullPolicy": "Never", "args": ["serve"]}]
        }
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    Ok(ready_pods(ns, "role=client", 1).await?.remove(0))
}

pub fn labels(pod: &Pod) -> BTreeMap<String, String> {
    pod.metadata.labels.clone().unwrap_or_default()
}

pub async fn delete_pod(ns: &TestNs, name: &str) -> Result<()> {
    ns.api::<Pod>().delete(name, &DeleteParams::default().grace_period(0)).await?;
    Ok(())
}

/// An in-process previewd on a free loopback port, with its own store and
/// instance name so parallel tests never see each other's objects.
pub struct Previewd {
    pub addr: String,
    pub data: std::path::PathBuf,
    pub instance: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<std::result::Result<(), preview::previewd::server::ServerError>>>,
}

pub fn server_args(ns: &str, data: &std::path::Path, instance: &str) -> preview::previewd::server::ServerArgs {
    use clap::Parser;
    preview::previewd::server::ServerArgs::parse_from([
        "previewd",
        "--data-dir",
        data.to_str().unwrap_or_default(),
        "--default-namespace",
        ns,
        "--image-pull-policy",
        "Never",
        "--instance",
        instance,
        "--reap-interval",
        "1s",
        "--default-ttl",
        "10m",
    ])
}

impl Previewd {
    pub async fn start(ns: &TestNs) -> Result<Previewd> {
        let data = std::env::temp_dir().join(format!("previewd-{}", ns.name));
        Self::start_with(ns, data, ns.name.clone(), |_| {}).await
    }

    pub async fn start_with(
        ns: &TestNs,
        data: std::path::PathBuf,
        instance: String,
        tweak: impl FnOnce(&mut preview::previewd::server::ServerArgs),
    ) -> Result<Previewd> {
        Self::start_full(ns, data, instance, "127.0.0.1:0", tweak).await
    }

    pub async fn start_listening(
        ns: &TestNs,
        data: std::path::PathBuf,
        instance: String,
        listen: &str,
    ) -> Result<Previewd> {
        Self::start_full(ns, data, instance, listen, |_| {}).await
    }

    pub async fn start_full(
        ns: &TestNs,
        data: std::path::PathBuf,
        instance: String,
        listen: &str,
        tweak: impl FnOnce(&mut preview::previewd::server::ServerArgs),
    ) -> Result<Previewd> {
        preview::telemetry::init();
        let mut args = server_args(&ns.name, &data, &instance);
        tweak(&mut args);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = format!("http://{}", listener.local_addr()?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let client = client().await?;
        let handle = tokio::spawn(preview::previewd::server::serve(args, client, listener, async move {
            let _ = rx.await;
        }));
        let mut p = Previewd { addr, data, instance, shutdown: Some(tx), handle: Some(handle) };
        // Ready when it answers a Status call (recovery runs before serving).
        for _ in 0..120 {
            if p.handle.as_ref().is_some_and(|h| h.is_finished()) {
                let h = p.handle.take().context("handle")?;
                bail!("previewd ended before serving: {:?}", h.await?);
            }
            if preview::cli::connect(&p.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eventually("previewd to serve", Duration::from_secs(30), || {
            let addr = p.addr.clone();
            async move {
                let Ok(mut c) = preview::cli::connect(&addr).await else { return Ok(None) };
                let req = preview::proto::StatusRequest::default();
                Ok(c.status(req).await.ok().map(|_| ()))
            }
        })
        .await?;
        Ok(p)
    }

    pub async fn client(
        &self,
    ) -> Result<preview::proto::preview_service_client::PreviewServiceClient<tonic::transport::Channel>> {
        Ok(preview::cli::connect(&self.addr).await?)
    }

    /// Stops serving and waits for the server task.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await??;
        }
        Ok(())
    }
}

impl Drop for Previewd {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// A one-pod Start request.
pub fn start_req(config: &str, image: &str, key: &str) -> preview::proto::StartRequest {
    preview::proto::StartRequest {
        pods: vec![preview::proto::PodRequest { config: config.into(), image: image.into(), ..Default::default() }],
        key: key.into(),
        ttl: String::new(),
    }
}
