//! Issue 13 on the real cluster, with real credentials: callers
//! authenticated by the cluster (client certificates its CA signed, bound
//! service-account tokens), authorised by RBAC (SubjectAccessReviews on
//! previewenvironments.preview.dev and on what a preview touches), limits,
//! quotas, the audit line, agents' proof of pod and `--adopt`'s trust.
//!
//! Identities: alice may preview in namespace a only; bob may do nothing;
//! the `ci` service account has preview-user in a; carol has preview-user
//! and `privileged` in a; the admin is the cluster's admin; mallory holds a
//! certificate from another CA.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ResourceQuota};
use kube::api::{ListParams, PostParams};
use preview::proto::{self, preview_service_client::PreviewServiceClient};
use rustls::pki_types::pem::PemObject;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const V2: &str = "preview.local/echo:v2";

/// A previewd process on the node address with authentication on; its
/// stdout (the audit lines) goes to `audit.log` in `dir`.
struct Daemon {
    child: std::process::Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn spawn(instance: &str, default_ns: &str, extra: &[&str]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
        let child = Command::new(env!("CARGO_BIN_EXE_previewd"))
            .args(["--listen", &format!("198.18.255.254:{port}"), "--system-namespace", SYSTEM_NS])
            .args(["--instance", instance, "--default-namespace", default_ns, "--image-pull-policy", "Never"])
            .arg("--data-dir")
            .arg(dir.path().join("store"))
            .args(extra)
            .env("KUBECONFIG", kubeconfig_path())
            .stdout(std::fs::File::create(dir.path().join("audit.log"))?)
            .stderr(std::fs::File::create(dir.path().join("previewd.log"))?)
            .spawn()
            .context("starting previewd")?;
        Ok(Daemon { child, addr: format!("https://198.18.255.254:{port}"), dir })
    }

    /// The audit lines so far.
    fn audit(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.log"))?;
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }

    /// A client of `who` once previewd answers them.
    async fn serving(&self, who: &Who) -> Result<preview::cli::Client> {
        eventually("previewd to serve", Duration::from_secs(60), || async {
            let Ok(mut c) = client(&self.addr, who).await else { return Ok(None) };
            Ok(c.status(proto::StatusRequest::default()).await.ok().map(|_| c))
        })
        .await
        .with_context(|| self.log())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("previewd.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a caller presents: a token, or a certificate and its key.
#[derive(Clone, Default)]
struct Who {
    token: Option<String>,
    cert: Option<(Vec<u8>, Vec<u8>)>,
}

/// The cluster admin, by the admin kubeconfig's client certificate.
async fn admin() -> Result<Who> {
    Ok(Who { cert: admin_creds().await?.identity, token: None })
}

/// A client that presents `who` over TLS, trusting previewd's CA; no
/// health check first, so each call shows its own status code.
async fn client(addr: &str, who: &Who) -> Result<preview::cli::Client> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(previewd_ca().await?));
    if let Some((c, k)) = &who.cert {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    let channel = Endpoint::from_shared(addr.to_string())?.tls_config(tls)?.connect().await?;
    let bearer = preview::cli::creds::Bearer::new(who.token.as_deref()).map_err(anyhow::Error::msg)?;
    Ok(PreviewServiceClient::new(InterceptedService::new(channel, bearer)))
}

fn start(ns: &str, target: &str, key: &str, extra: serde_json::Value) -> proto::StartRequest {
    let mut cfg = serde_json::json!({"target": target});
    if let (Some(o), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    proto::StartRequest {
        key: key.into(),
        ttl: "10m".into(),
        pods: vec![proto::PodRequest {
            config: cfg.to_string(),
            image: V2.into(),
            namespace: ns.into(),
            ..Default::default()
        }],
    }
}

async fn status_keys(c: &mut preview::cli::Client) -> Result<Vec<String>> {
    let snap = c.status(proto::StatusRequest::default()).await?.into_inner().message().await?.context("snapshot")?;
    Ok(snap.environments.into_iter().map(|e| e.key).collect())
}

/// The status code and message of a call that must fail.
fn refused<T: std::fmt::Debug>(r: std::result::Result<T, tonic::Status>) -> Result<(tonic::Code, String)> {
    let s = r.err().context("the call succeeded")?;
    Ok((s.code(), s.message().to_string()))
}

/// Nothing of `key` exists in `ns`: no pod, no PreviewEnvironment.
async fn nothing_of(ns: &TestNs, key: &str) -> Result<()> {
    let lp = ListParams::default().labels(&format!("preview.dev/key={key}"));
    ensure!(ns.api::<Pod>().list(&lp).await?.items.is_empty(), "a pod of {key} was made in {}", ns.name);
    ensure!(env_objects(ns, &lp).await?.is_empty(), "a PreviewEnvironment of {key} was made in {}", ns.name);
    Ok(())
}

/// A Deployment (no replicas: only its template is read) whose pods would
/// mount a hostPath volume.
async fn hostpath_target(ns: &TestNs) -> Result<()> {
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hostpath"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "hostpath"}},
            "template": {
                "metadata": {"labels": {"app": "hostpath"}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "volumes": [{"name": "host", "hostPath": {"path": "/tmp", "type": "Directory"}}],
                    "containers": [{
                        "name": "app", "image": "preview.local/echo:v1", "imagePullPolicy": "Never", "args": ["serve"],
                        "volumeMounts": [{"name": "host", "mountPath": "/host"}],
                    }]
                }
            }
        }
    }))?;
    ns.api::<Deployment>().create(&PostParams::default(), &dep).await?;
    Ok(())
}

/// A service-account token as the API server would sign one, from its
/// signing key: `exp` seconds from now (negative: already expired).
fn signed_token(ns: &str, sa: &str, uid: &str, audience: &str, exp: i64) -> Result<String> {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "aud": [audience],
        "iat": now - 7200, "nbf": now - 7200, "exp": now + exp,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
    });
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let pem = std::fs::read(format!("{}/sa.key", identity::PKI))?;
    let key = match rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem)? {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        rustls::pki_types::PrivateKeyDer::Pkcs1(k) => ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => anyhow::bail!("sa.key: not an RSA key"),
    }
    .map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut sig)
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(format!("{input}.{}", b64(&sig)))
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn callers_are_who_the_cluster_says_and_may_do_what_rbac_says() -> Result<()> {
    let a = TestNs::new("sec-a").await?;
    let b = TestNs::new("sec-b").await?;
    ensure_system_ns().await?;
    echo_app(&a, "orders", "v1", 1, &[]).await?;
    echo_app(&b, "orders", "v1", 1, &[]).await?;
    hostpath_target(&a).await?;
    // alice and carol: preview-user in a (carol also `privileged`); ci the same, as a service account.
    for who in [identity::user("alice"), identity::user("carol")] {
        let name = who["name"].as_str().unwrap_or_default().to_string();
        identity::bind(&a, &format!("{name}-preview"), "ClusterRole", "preview-user", who.clone()).await?;
        identity::grant(&a, &format!("{name}-workloads"), identity::workload_rules(), who).await?;
    }
    identity::grant(
        &a,
        "carol-privileged",
        serde_json::json!([{"apiGroups": ["preview.dev"], "resources": ["previewenvironments"], "verbs": ["privileged"]}]),
        identity::user("carol"),
    )
    .await?;
    identity::service_account(&a, "ci").await?;
    identity::bind(&a, "ci-preview", "ClusterRole", "preview-user", identity::sa(&a, "ci")).await?;
    identity::grant(&a, "ci-workloads", identity::workload_rules(), identity::sa(&a, "ci")).await?;
    let cert =
        |user: &str| -> Result<Who> { Ok(Who { cert: Some(identity::cluster_certificate(user, &[])?), token: None }) };
    let (alice, bob, carol) = (cert("alice")?, cert("bob")?, cert("carol")?);
    let admin = admin().await?;
    let ci = Who { token: Some(identity::token(&a, "ci", Some("previewd")).await?), cert: None };

    let d = Daemon::spawn(
        &a.name,
        &a.name,
        &["--max-watchers-per-user", "2", "--max-envs-per-user", "3", "--max-replicas", "2"],
    )?;
    let mut adm = d.serving(&admin).await?;

    // --- Authentication.
    let mut anon = client(&d.addr, &Who::default()).await?;
    let (code, msg) = refused(anon.status(proto::StatusRequest::default()).await)?;
    ensure!(code == tonic::Code::Unauthenticated && msg.contains("no credentials"), "{code:?}: {msg}");
    let other_ca = {
        let key = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = p.self_signed(&key)?;
        identity::certificate("mallory", &["system:masters"], &ca.pem(), &key.serialize_pem())?
    };
    let mut mallory = client(&d.addr, &Who { cert: Some(other_ca), token: None }).await?;
    let (code, msg) = refused(mallory.status(proto::StatusRequest::default()).await)?;
    ensure!(code == tonic::Code::Unauthenticated && msg.contains("client certificate refused"), "{code:?}: {msg}");
    for (what, token) in [
        ("another audience", identity::token(&a, "ci", Some("other")).await?),
        ("the API server's audience without --accept-apiserver-tokens", identity::token(&a, "ci", None).await?),
        ("a forged token", "not-a-jwt".to_string()),
    ] {
        let mut c = client(&d.addr, &Who { token: Some(token), cert: None }).await?;
        let (code, msg) = refused(c.status(proto::StatusRequest::default()).await)?;
        ensure!(code == tonic::Code::Unauthenticated && msg.contains("refused"), "{what}: {code:?}: {msg}");
    }
    // Expired: signed as the API server signs, an hour past its expiry. The
    // same token with a future expiry is accepted, so expiry is what fails.
    let sa = a.api::<k8s_openapi::api::core::v1::ServiceAccount>().get("ci").await?;
    let uid = sa.metadata.uid.context("uid")?;
    let mut fresh =
        client(&d.addr, &Who { token: Some(signed_token(&a.name, "ci", &uid, "previewd", 3600)?), cert: None }).await?;
    fresh.status(proto::StatusRequest::default()).await.context("a token signed like the API server's")?;
    let mut expired =
        client(&d.addr, &Who { token: Some(signed_token(&a.name, "ci", &uid, "previewd", -3600)?), cert: None })
            .await?;
    let (code, msg) = refused(expired.status(proto::StatusRequest::default()).await)?;
    ensure!(code == tonic::Code::Unauthenticated && msg.contains("expired"), "{code:?}: {msg}");

    // --- Authorisation.
    let mut bob_c = client(&d.addr, &bob).await?;
    let mut alice_c = client(&d.addr, &alice).await?;
    for (ns, key) in [(&a, "bob1"), (&b, "bob2")] {
        let (code, msg) = refused(bob_c.start(start(&ns.name, "deployment/orders", key, serde_json::json!({}))).await)?;
        ensure!(code == tonic::Code::PermissionDenied, "bob in {}: {code:?}: {msg}", ns.name);
        let want = format!("user \"bob\" may not create previewenvironments.preview.dev in namespace \"{}\"", ns.name);
        ensure!(msg.contains(&want), "{msg}");
        nothing_of(ns, key).await?;
    }
    // dave may create environments and pods in a, but not read its
    // deployments: a target he may not read is refused before previewd
    // reads it, whether it exists or not.
    identity::bind(&a, "dave-preview", "ClusterRole", "preview-user", identity::user("dave")).await?;
    let pods_only = serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]}]);
    identity::grant(&a, "dave-pods", pods_only, identity::user("dave")).await?;
    let mut dave_c = client(&d.addr, &cert("dave")?).await?;
    for target in ["deployment/orders", "deployment/no-such"] {
        let (code, msg) = refused(dave_c.start(start(&a.name, target, "dave1", serde_json::json!({}))).await)?;
        ensure!(
            code == tonic::Code::PermissionDenied && msg.contains("may not get deployments.apps"),
            "{target}: {msg}"
        );
    }
    nothing_of(&a, "dave1").await?;
    let (code, msg) =
        refused(alice_c.start(start(&b.name, "deployment/orders", "alice-b", serde_json::json!({}))).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("\"alice\"") && msg.contains(&b.name), "{msg}");
    nothing_of(&b, "alice-b").await?;
    alice_c.start(start(&a.name, "deployment/orders", "alice1", serde_json::json!({}))).await.context("alice in a")?;
    let custom =
        serde_json::json!({"feature": {"network": {"incoming": {"http_filter": {"header_filter": "^x-team: a"}}}}});
    let (code, msg) = refused(alice_c.start(start(&a.name, "deployment/orders", "alice2", custom.clone())).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("may not unscoped previewenvironments"), "{msg}");
    nothing_of(&a, "alice2").await?;
    let mirror = serde_json::json!({"feature": {"network": {"incoming": {"mode": "mirror"}}}});
    let (code, msg) = refused(alice_c.start(start(&a.name, "deployment/orders", "alice3", mirror)).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("may not mirror previewenvironments"), "{msg}");
    adm.start(start(&a.name, "deployment/orders", "admin1", custom)).await.context("the admin's custom filter")?;
    // The service account, by its token.
    let mut ci_c = client(&d.addr, &ci).await?;
    ci_c.start(start(&a.name, "targetless", "ci1", serde_json::json!({}))).await.context("ci in a")?;
    // kube-system, for everyone.
    let (code, msg) =
        refused(adm.start(start("kube-system", "deployment/coredns", "sys1", serde_json::json!({}))).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("--deny-namespaces"), "{msg}");
    // A privileged target: refused without the verb, naming the field; carol has it.
    let (code, msg) =
        refused(alice_c.start(start(&a.name, "deployment/hostpath", "priv1", serde_json::json!({}))).await)?;
    ensure!(code == tonic::Code::FailedPrecondition && msg.contains("spec.volumes[0].hostPath"), "{code:?}: {msg}");
    ensure!(msg.contains("privileged"), "{msg}");
    nothing_of(&a, "priv1").await?;
    let mut carol_c = client(&d.addr, &carol).await?;
    carol_c.start(start(&a.name, "deployment/hostpath", "priv2", serde_json::json!({}))).await.context("carol")?;

    // Status shows each caller what they may list; Clean needs delete.
    adm.start(start(&b.name, "deployment/orders", "admin-b", serde_json::json!({}))).await?;
    let mut seen = status_keys(&mut alice_c).await?;
    seen.sort();
    ensure!(seen == ["admin1", "alice1", "ci1", "priv2"], "alice sees {seen:?}");
    ensure!(status_keys(&mut bob_c).await?.is_empty(), "bob sees environments");
    ensure!(status_keys(&mut adm).await?.contains(&"admin-b".to_string()));
    let clean = |k: &str| proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key(k.into())) };
    let (code, msg) = refused(bob_c.clean(clean("alice1")).await)?;
    ensure!(code == tonic::Code::PermissionDenied && msg.contains("may not delete"), "{msg}");

    // Limits: watches and environments per user.
    let w1 = alice_c.status(proto::StatusRequest { watch: true, ..Default::default() }).await?.into_inner();
    let w2 = alice_c.status(proto::StatusRequest { watch: true, ..Default::default() }).await?.into_inner();
    let (code, msg) = refused(alice_c.status(proto::StatusRequest { watch: true, ..Default::default() }).await)?;
    ensure!(code == tonic::Code::ResourceExhausted && msg.contains("--max-watchers-per-user"), "{msg}");
    drop((w1, w2));
    alice_c.start(start(&a.name, "targetless", "alice4", serde_json::json!({}))).await?;
    alice_c.start(start(&a.name, "targetless", "alice5", serde_json::json!({}))).await?;
    let (code, msg) = refused(alice_c.start(start(&a.name, "targetless", "alice6", serde_json::json!({}))).await)?;
    ensure!(code == tonic::Code::ResourceExhausted && msg.contains("--max-envs-per-user"), "{msg}");
    nothing_of(&a, "alice6").await?;
    let many = serde_json::json!({"feature": {"preview": {"replicas": 3}}});
    let (code, msg) = refused(adm.start(start(&a.name, "targetless", "many", many)).await)?;
    ensure!(code == tonic::Code::ResourceExhausted && msg.contains("--max-replicas"), "{msg}");
    nothing_of(&a, "many").await?;

    // The audit: one JSON line per mutating call, refusals included.
    let audit = d.audit()?;
    let line = audit.iter().find(|l| l["user"] == "bob" && l["key"] == "bob2").context("bob's refused start")?;
    ensure!(line["verb"] == "start" && line["namespace"] == b.name.as_str(), "{line}");
    ensure!(line["targets"] == serde_json::json!(["deployment/orders"]) && line["filter"] == "key", "{line}");
    ensure!(line["result"].as_str().is_some_and(|r| r.starts_with("PermissionDenied")), "{line}");
    let line = audit.iter().find(|l| l["key"] == "admin1").context("admin1")?;
    ensure!(line["filter"] == "unscoped" && line["result"] == "ok", "{line}");
    let ci_user = format!("system:serviceaccount:{}:ci", a.name);
    ensure!(audit.iter().any(|l| l["key"] == "ci1" && l["user"] == ci_user.as_str()), "no audit line of ci1");

    // Agents: a hello for a real target pod without the pod's proof gets
    // no routes, with no proof or with another one.
    let orders = ready_pods(&a, "app=orders,!preview.dev/key", 1).await?;
    let pod = orders[0].metadata.name.clone().context("pod name")?;
    let channel = Endpoint::from_shared(d.addr.clone())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(previewd_ca().await?)))?
        .connect()
        .await?;
    let mut agent = proto::agent_service_client::AgentServiceClient::new(channel);
    for proof in [None, Some("00".repeat(32))] {
        let mut req = tonic::Request::new(proto::AgentHello { namespace: a.name.clone(), pod: pod.clone() });
        if let Some(p) = &proof {
            req.metadata_mut().insert("x-preview-agent-proof", p.parse()?);
        }
        let (code, msg) = refused(agent.routes(req).await)?;
        ensure!(code == tonic::Code::PermissionDenied && msg.contains("proof"), "proof {proof:?}: {code:?}: {msg}");
    }

    adm.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Glob("*".into())) }).await?;
    Ok(())
}

/// A ResourceQuota on count/previewenvironments.preview.dev stops the Start
/// past it, as RESOURCE_EXHAUSTED, leaving nothing of it.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn a_namespace_quota_on_environments_stops_the_start_past_it() -> Result<()> {
    let ns = TestNs::new("sec-quota").await?;
    ensure_system_ns().await?;
    let quota: ResourceQuota = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "previews"},
        "spec": {"hard": {"count/previewenvironments.preview.dev": "1"}},
    }))?;
    ns.api::<ResourceQuota>().create(&PostParams::default(), &quota).await?;
    // The quota controller fills in what is used before the quota is enforced.
    eventually("the quota to be counted", Duration::from_secs(60), || async {
        let q = ns.api::<ResourceQuota>().get("previews").await?;
        Ok(q.status.and_then(|s| s.used).filter(|u| !u.is_empty()).map(|_| ()))
    })
    .await?;
    let d = Daemon::spawn(&ns.name, &ns.name, &[])?;
    let mut c = d.serving(&admin().await?).await?;
    c.start(start(&ns.name, "targetless", "q1", serde_json::json!({}))).await?;
    let (code, msg) = refused(c.start(start(&ns.name, "targetless", "q2", serde_json::json!({}))).await)?;
    ensure!(code == tonic::Code::ResourceExhausted && msg.contains("exceeded quota"), "{code:?}: {msg}");
    nothing_of(&ns, "q2").await?;
    ensure!(status_keys(&mut c).await? == ["q1"]);
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("q1".into())) }).await?;
    Ok(())
}

/// `--adopt` takes only records previewd signed: a labelled ConfigMap (the
/// old owner) and a PreviewEnvironment made by hand are ignored. And
/// `--auth none` is refused on an address that is not loopback.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn adopt_ignores_records_previewd_did_not_sign_and_auth_none_stays_on_loopback() -> Result<()> {
    let ns = TestNs::new("sec-adopt").await?;
    ensure_system_ns().await?;
    let instance = ns.name.clone();
    let labels = serde_json::json!({
        "app.kubernetes.io/managed-by": "previewd", "preview.dev/instance": instance,
        "preview.dev/role": "env", "preview.dev/key": "forged",
    });
    let record = serde_json::json!({
        "key": "forged", "namespace": ns.name, "created_at_ms": 1, "expires_at_ms": null, "mode": "steal",
        "pending": true, "pods": [],
    })
    .to_string();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "preview-env-forged", "labels": labels},
        "data": {"environment.json": record},
    }))?;
    ns.api::<ConfigMap>().create(&PostParams::default(), &cm).await?;
    let ar = preview::previewd::cluster::objects::env_resource();
    let mut pe = kube::api::DynamicObject::new("preview-env-forged2", &ar).within(&ns.name).data(serde_json::json!({
        "spec": {"key": "forged2", "record": record.replace("forged", "forged2"), "recordMac": "00".repeat(32)},
    }));
    pe.metadata.labels = serde_json::from_value(labels)?;
    kube::Api::<kube::api::DynamicObject>::namespaced_with(ns.client.clone(), &ns.name, &ar)
        .create(&PostParams::default(), &pe)
        .await?;

    let d = Daemon::spawn(&instance, &ns.name, &["--adopt"])?;
    let mut c = d.serving(&admin().await?).await?;
    ensure!(status_keys(&mut c).await?.is_empty(), "adopted a record previewd did not sign");
    ensure!(d.log().contains("ignoring an environment record previewd did not sign"), "{}", d.log());
    drop(d);

    let out = Command::new(env!("CARGO_BIN_EXE_previewd"))
        .args(["--listen", "198.18.255.254:0", "--auth", "none", "--system-namespace", SYSTEM_NS])
        .env("KUBECONFIG", kubeconfig_path())
        .stdin(Stdio::null())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.contains("--auth: none is accepted only on a loopback"), "{err}");
    Ok(())
}
