//! Shared helpers for tests against the real local cluster: a kube client,
//! a namespace per test that is deleted afterwards, the echo app, exec and
//! an in-process previewd.
#![allow(dead_code)]

pub mod db;
pub mod e2e;
pub mod gateway;
pub mod netns;
pub mod queues;

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

/// The CRD and the preview roles from deploy/previewd, applied once per
/// test binary (as `kubectl apply -k deploy/previewd` would).
pub fn ensure_crd() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/previewd");
        let run = |args: &[&str]| {
            let out = std::process::Command::new(kubectl())
                .args(["--kubeconfig", &kubeconfig_path()])
                .args(args)
                .output()
                .map_err(|e| e.to_string())?;
            if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
        };
        let crds = [format!("{dir}/crd.yaml"), format!("{dir}/crd-queuesplit.yaml"), format!("{dir}/roles.yaml")];
        run(&["apply", "-f", &crds[0], "-f", &crds[1], "-f", &crds[2]])?;
        run(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/previewenvironments.preview.dev",
            "crd/queuesplits.preview.dev",
        ])
    })
    .clone()
    .map_err(|e| anyhow::anyhow!("applying the CRD: {e}"))
}

impl TestNs {
    pub async fn new(prefix: &str) -> Result<TestNs> {
        ensure_crd()?;
        ensure_system_ns().await?;
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
    echo_app_env(ns, name, version, replicas, env).await
}

/// [`echo_app`] with env entries as the pod spec has them (`valueFrom` too).
pub async fn echo_app_env(
    ns: &TestNs,
    name: &str,
    version: &str,
    replicas: i32,
    env: Vec<serde_json::Value>,
) -> Result<()> {
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

/// The PreviewEnvironment objects in `ns` that match `lp`.
pub async fn env_objects(ns: &TestNs, lp: &ListParams) -> Result<Vec<kube::api::DynamicObject>> {
    let ar = preview::previewd::cluster::objects::env_resource();
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    Ok(api.list(lp).await?.items)
}

/// What previewd would give the agent of pod `pod` in `ns`: its proof of
/// the pod (from previewd's key in [`SYSTEM_NS`]), and the CA to trust.
pub async fn agent_trust(ns: &TestNs, pod: &str) -> Result<(String, String)> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client().await?, SYSTEM_NS);
    let secret = secrets.get(preview::previewd::auth::proof::SECRET).await?;
    let key = secret.data.and_then(|d| d.get("hmac").map(|b| b.0.clone())).context("no hmac in the key Secret")?;
    let uid = ns.api::<Pod>().get(pod).await?.metadata.uid.context("pod uid")?;
    let proof = preview::previewd::auth::proof::Prover::from_secret_bytes(&key).proof(&ns.name, pod, &uid);
    Ok((proof, previewd_ca().await?))
}

/// previewd's own namespace in tests (its TLS Secret, agent key and CA
/// ConfigMap), apart from preview-system, which the install test owns.
pub const SYSTEM_NS: &str = "preview-test-system";

/// Makes [`SYSTEM_NS`] if it is missing.
pub async fn ensure_system_ns() -> Result<()> {
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": SYSTEM_NS}}))?;
    match Api::<Namespace>::all(client().await?).create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The admin kubeconfig's client certificate, and the CA previewd
/// published in [`SYSTEM_NS`]: what the CLI would present and trust.
pub async fn admin_creds() -> Result<preview::cli::Credentials> {
    let kc = Kubeconfig::read_from(kubeconfig_path())?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let mut creds = preview::cli::Credentials::from_auth_info(&cfg.auth_info).map_err(anyhow::Error::msg)?;
    creds.ca_pem = Some(previewd_ca().await?);
    Ok(creds)
}

/// The CA in the ConfigMap previewd-ca of [`SYSTEM_NS`].
pub async fn previewd_ca() -> Result<String> {
    let cm: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client().await?, SYSTEM_NS);
    let cm = cm.get("previewd-ca").await.context("configmap previewd-ca")?;
    cm.data.and_then(|d| d.get("ca.crt").cloned()).context("previewd-ca has no ca.crt")
}

/// A client for the previewd at `addr`: none for http (--auth none on
/// loopback), the admin's certificate over TLS for https.
pub async fn connect(addr: &str) -> Result<preview::cli::Client> {
    if addr.starts_with("https://") {
        Ok(preview::cli::connect_with(addr, &admin_creds().await?).await?)
    } else {
        Ok(preview::cli::connect(addr).await?)
    }
}

/// Flags for an in-process previewd: with `--auth none` (a loopback
/// listener); [`Previewd::start_full`] turns authentication on for others.
pub fn server_args(ns: &str, data: &std::path::Path, instance: &str) -> preview::previewd::server::ServerArgs {
    use clap::Parser;
    preview::previewd::server::ServerArgs::parse_from([
        "previewd",
        "--auth",
        "none",
        "--system-namespace",
        SYSTEM_NS,
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
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local = listener.local_addr()?;
        if !local.ip().is_loopback() {
            ensure_system_ns().await?;
            args.auth = preview::previewd::auth::AuthMode::Kube;
            // As the admin, tests start more than a user would.
            args.max_envs_per_user = 1000;
        }
        tweak(&mut args);
        let scheme = if args.auth == preview::previewd::auth::AuthMode::Kube { "https" } else { "http" };
        let addr = format!("{scheme}://{local}");
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
            if connect(&p.addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eventually("previewd to serve", Duration::from_secs(30), || {
            let addr = p.addr.clone();
            async move {
                let Ok(mut c) = connect(&addr).await else { return Ok(None) };
                let req = preview::proto::StatusRequest::default();
                Ok(c.status(req).await.ok().map(|_| ()))
            }
        })
        .await?;
        Ok(p)
    }

    pub async fn client(&self) -> Result<preview::cli::Client> {
        connect(&self.addr).await
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

/// Test identities, made as a cluster admin would: service accounts with
/// bound tokens, users with certificates the cluster's CA signed, and
/// bindings of the preview roles.
pub mod identity {
    use super::*;
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};

    pub const PKI: &str = "/var/lib/preview-cluster/pki";

    /// A service account `name` in `ns`.
    pub async fn service_account(ns: &TestNs, name: &str) -> Result<()> {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
        match ns.api::<ServiceAccount>().create(&PostParams::default(), &sa).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// A bound token of `sa` in `ns` for `audience` (`None`: the API server's), 10 minutes.
    pub async fn token(ns: &TestNs, sa: &str, audience: Option<&str>) -> Result<String> {
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
                expiration_seconds: Some(600),
                ..Default::default()
            },
            ..Default::default()
        };
        let tr = ns.api::<ServiceAccount>().create_token_request(sa, &PostParams::default(), &req).await?;
        tr.status.map(|s| s.token).context("no token in the TokenRequest")
    }

    /// A Role in `ns` with `rules`, bound to `subject` (a kube RBAC subject as JSON).
    pub async fn grant(ns: &TestNs, name: &str, rules: serde_json::Value, subject: serde_json::Value) -> Result<()> {
        let role: Role = serde_json::from_value(serde_json::json!({"metadata": {"name": name}, "rules": rules}))?;
        ns.api::<Role>().create(&PostParams::default(), &role).await?;
        bind(ns, name, "Role", name, subject).await
    }

    /// A RoleBinding in `ns` of `kind`/`role` to `subject`.
    pub async fn bind(ns: &TestNs, name: &str, kind: &str, role: &str, subject: serde_json::Value) -> Result<()> {
        let rb: RoleBinding = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [subject],
        }))?;
        ns.api::<RoleBinding>().create(&PostParams::default(), &rb).await?;
        Ok(())
    }

    pub fn user(name: &str) -> serde_json::Value {
        serde_json::json!({"kind": "User", "name": name, "apiGroup": "rbac.authorization.k8s.io"})
    }

    pub fn sa(ns: &TestNs, name: &str) -> serde_json::Value {
        serde_json::json!({"kind": "ServiceAccount", "name": name, "namespace": ns.name})
    }

    /// What a preview needs besides the preview verbs: pods made in the
    /// namespace, and targets read (as the `edit` role would give).
    pub fn workload_rules() -> serde_json::Value {
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list"]},
            {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "statefulsets"], "verbs": ["get", "list"]},
        ])
    }

    /// A client certificate for `user` (groups `groups`) signed by `ca_cert`/`ca_key` (PEM): (cert, key).
    pub fn certificate(user: &str, groups: &[&str], ca_cert: &str, ca_key: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let issuer = rcgen::Issuer::from_ca_cert_pem(ca_cert, rcgen::KeyPair::from_pem(ca_key)?)?;
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, user);
        for g in groups {
            params.distinguished_name.push(rcgen::DnType::OrganizationName, *g);
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
    }

    /// A certificate signed by the cluster's own CA, as `kubectl` users hold.
    pub fn cluster_certificate(user: &str, groups: &[&str]) -> Result<(Vec<u8>, Vec<u8>)> {
        let ca = std::fs::read_to_string(format!("{PKI}/ca.crt"))?;
        let key = std::fs::read_to_string(format!("{PKI}/ca.key"))?;
        certificate(user, groups, &ca, &key)
    }

    /// A kubeconfig like the admin's, with `token` as its user's credential.
    pub fn token_kubeconfig(token: &str, dir: &std::path::Path) -> Result<std::path::PathBuf> {
        let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(kubeconfig_path())?)?;
        let users = kc.get_mut("users").and_then(|u| u.as_sequence_mut()).context("kubeconfig users")?;
        for u in users.iter_mut() {
            u["user"] = serde_yaml::to_value(serde_json::json!({"token": token}))?;
        }
        let path = dir.join("token.kubeconfig");
        std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
        Ok(path)
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The real previewd binary on loopback, so that it can be killed with SIGKILL.
pub fn spawn_previewd(ns: &str, data: &std::path::Path, port: u16, metrics: u16) -> Result<Proc> {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_previewd"))
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", std::env::var("PREVIEWD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--auth", "none", "--system-namespace", SYSTEM_NS])
        .arg("--data-dir")
        .arg(data)
        .args(["--default-namespace", ns, "--instance", ns, "--image-pull-policy", "Never", "--reap-interval", "1s"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    Ok(Proc(child))
}

/// A client of the previewd at `addr`, once it answers Status.
pub async fn connect_when_up(addr: &str) -> Result<preview::cli::Client> {
    eventually("previewd to answer", Duration::from_secs(60), || async {
        match connect(addr).await {
            Ok(mut c) => Ok(c.status(preview::proto::StatusRequest::default()).await.ok().map(|_| c)),
            Err(_) => Ok(None),
        }
    })
    .await
}

/// A previewd (`spawn_previewd`) for a test namespace, on free loopback
/// ports, with its store in a temp directory: it can be killed with SIGKILL
/// and started again on the same ports and store.
pub struct LocalPreviewd {
    pub proc: Proc,
    /// `http://127.0.0.1:port`, for `connect`.
    pub addr: String,
    ns: String,
    data: std::path::PathBuf,
    port: u16,
    metrics: u16,
}

impl LocalPreviewd {
    pub fn spawn(ns: &str) -> Result<Self> {
        let data = std::env::temp_dir().join(format!("previewd-{ns}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let proc = spawn_previewd(ns, &data, port, metrics)?;
        Ok(LocalPreviewd { proc, addr: format!("http://127.0.0.1:{port}"), ns: ns.into(), data, port, metrics })
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.0.kill()?;
        self.proc.0.wait()?;
        Ok(())
    }

    /// A new process on the same ports and store.
    pub fn restart(&mut self) -> Result<()> {
        self.proc = spawn_previewd(&self.ns, &self.data, self.port, self.metrics)?;
        Ok(())
    }
}

/// A Deployment's template value of env var `var` (first container), and its generation.
pub async fn template_env(ns: &TestNs, name: &str, var: &str) -> Result<(String, i64)> {
    let d = ns.api::<Deployment>().get(name).await?;
    let generation = d.metadata.generation.unwrap_or_default();
    let c = &d.spec.context("spec")?.template.spec.context("template")?.containers[0];
    let v = c.env.iter().flatten().find(|e| e.name == var).and_then(|e| e.value.clone()).unwrap_or_default();
    Ok((v, generation))
}

/// Waits until the Deployment's pods (previews aside), terminating ones
/// too, all have `var` = `value`, and are ready.
pub async fn rolled_to(ns: &TestNs, name: &str, var: &str, value: &str) -> Result<()> {
    eventually(&format!("{name} to have {var}={value}"), Duration::from_secs(120), || async {
        let lp = ListParams::default().labels(&format!("app={name},!preview.dev/key"));
        let pods = ns.api::<Pod>().list(&lp).await?.items;
        let all = !pods.is_empty()
            && pods.iter().all(|p| {
                let reads = p.spec.as_ref().is_some_and(|s| {
                    s.containers[0].env.iter().flatten().any(|e| e.name == var && e.value.as_deref() == Some(value))
                });
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| cs.iter().all(|c| c.ready));
                reads && ready && p.metadata.deletion_timestamp.is_none()
            });
        Ok(all.then_some(()))
    })
    .await
}
