//! previewd installed in the local cluster from deploy/previewd (issue 6),
//! and every client against it over TLS: grpcurl with the CA and a bearer
//! token, the Go and Python clients with a service account's token, and the
//! CLI with nothing but a kubeconfig (port-forward through the API server),
//! the admin's (a client certificate) and a token kubeconfig.
//! Also: non-root with a read-only root filesystem, metrics, and state that
//! survives the deletion of previewd's pod (the PVC).
//!
//! One test, in order: the install is cluster-wide (namespace preview-system,
//! a ClusterRole), so steps share it rather than racing for it.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::*;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};

const SYSTEM_NS: &str = "preview-system";
const IMAGE: &str = "preview.local/echo:v2";
/// The name previewd's certificate carries for its Service.
const SERVER_NAME: &str = "previewd.preview-system.svc";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tools() -> std::path::PathBuf {
    let cache = std::env::var("PREVIEW_CACHE").unwrap_or_else(|_| "/var/cache/preview-env".into());
    Path::new(&cache).join("tools")
}

fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command and fails with its output unless it exits 0.
fn ok(cmd: &mut Command) -> Result<String> {
    let desc = format!("{cmd:?}");
    let out = run(cmd)?;
    ensure!(out.status.success(), "{desc} exited {:?}\n{}\n{}", out.status, text(&out.stdout), text(&out.stderr));
    Ok(text(&out.stdout))
}

/// Uninstalls on drop, also when a step fails.
struct Installed;

impl Installed {
    fn new() -> Result<Installed> {
        ok(Command::new(root().join("deploy/local/previewd.sh")).arg("install"))?;
        Ok(Installed)
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new(root().join("deploy/local/previewd.sh")).arg("uninstall").status();
    }
}

/// Waits for a ready pod with `labels` in `ns`.
async fn ready_pods_in(client: &kube::Client, ns: &str, labels: &str) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(&format!("a ready pod with {labels} in {ns}"), Duration::from_secs(120), || {
        let api = api.clone();
        async move {
            let pods = api.list(&ListParams::default().labels(labels)).await?;
            Ok(pods.items.into_iter().find(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|cs| cs.iter().all(|c| c.ready))
            }))
        }
    })
    .await
}

async fn previewd_pod(client: &kube::Client) -> Result<Pod> {
    ready_pods_in(client, SYSTEM_NS, "app.kubernetes.io/name=previewd").await
}

/// The CLI with only a kubeconfig: PREVIEW_SERVER is removed from its env.
fn cli(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_preview"));
    c.env_remove("PREVIEW_SERVER").env("KUBECONFIG", kubeconfig_path()).env("NO_COLOR", "1").args(args);
    c
}

/// How grpcurl reaches the in-cluster previewd: its CA, the name in its
/// certificate (the address is the Service's IP), and a bearer token.
struct Grpcurl {
    ca: std::path::PathBuf,
    token: String,
}

/// `grpcurl -cacert CA -servername NAME -H 'authorization: Bearer …' [-d DATA] ADDR VERB...`, as in the README.
fn grpcurl(g: &Grpcurl, addr: &str, data: Option<&str>, verb: &[&str]) -> Command {
    let mut c = Command::new(tools().join("bin/grpcurl"));
    c.arg("-cacert").arg(&g.ca).args(["-servername", SERVER_NAME]);
    c.args(["-H", &format!("authorization: Bearer {}", g.token)]);
    if let Some(d) = data {
        c.args(["-d", d]);
    }
    c.arg(addr).args(verb);
    c
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn installed_previewd_serves_every_client() -> Result<()> {
    let ns = TestNs::new("t-install").await?;
    let _installed = tokio::task::spawn_blocking(Installed::new).await??;
    let client = ns.client.clone();
    let pod = previewd_pod(&client).await?;
    let svc: Service = Api::namespaced(client.clone(), SYSTEM_NS).get("previewd").await?;
    let ip = svc.spec.and_then(|s| s.cluster_ip).context("previewd Service has no ClusterIP")?;
    let addr = format!("{ip}:7443");

    // Non-root with a read-only root filesystem: asked for in the spec, and
    // true of the running process (seen from this machine's /proc).
    let pid = previewd_pid().context("previewd's process on this machine")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = status.lines().find(|l| l.starts_with("Uid:")).context("Uid line")?;
    ensure!(uid.split_whitespace().skip(1).all(|u| u == "65532"), "previewd runs as {uid}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root_mount = mounts.lines().find(|l| l.split_whitespace().nth(4) == Some("/")).context("root mount")?;
    let opts = root_mount.split_whitespace().nth(5).unwrap_or_default();
    ensure!(opts.split(',').any(|o| o == "ro"), "root filesystem mounted {opts}");

    // A new Service's ClusterIP routes once kube-proxy has written its
    // rules, which may come just after the pod turns ready: wait for that
    // (bounded) before the clients are tried.
    eventually("the previewd Service to accept connections", Duration::from_secs(30), || {
        let addr = addr.clone();
        async move { Ok(tokio::net::TcpStream::connect(&addr).await.ok().map(|_| ())) }
    })
    .await?;
    // Who calls: a `ci` service account with preview-user in the test
    // namespace (and what the edit role gives: pods, targets), by a token
    // for audience previewd; and previewd's CA, from its ConfigMap.
    identity::service_account(&ns, "ci").await?;
    identity::bind(&ns, "ci-preview", "ClusterRole", "preview-user", identity::sa(&ns, "ci")).await?;
    identity::grant(&ns, "ci-workloads", identity::workload_rules(), identity::sa(&ns, "ci")).await?;
    let token = identity::token(&ns, "ci", Some("previewd")).await?;
    let ca: k8s_openapi::api::core::v1::ConfigMap =
        Api::namespaced(client.clone(), SYSTEM_NS).get("previewd-ca").await?;
    let ca = ca.data.and_then(|d| d.get("ca.crt").cloned()).context("previewd-ca has no ca.crt")?;
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, &ca)?;
    let g = Grpcurl { ca: ca_file.clone(), token: token.clone() };

    // Plaintext and no credentials are refused.
    let out = run(Command::new(tools().join("bin/grpcurl")).args(["-plaintext", &addr, "list"]))?;
    ensure!(!out.status.success(), "plaintext was served: {}", text(&out.stdout));
    let anon = run(Command::new(tools().join("bin/grpcurl")).arg("-cacert").arg(&ca_file).args([
        "-servername",
        SERVER_NAME,
        &addr,
        "list",
    ]))?;
    let err = text(&anon.stderr);
    ensure!(!anon.status.success() && err.contains("Unauthenticated") && err.contains("no credentials"), "{err}");

    // grpcurl: the services listed through reflection, a method described,
    // and Start, Status and Clean called.
    let grpcurl = |addr: &str, data: Option<&str>, verb: &[&str]| grpcurl(&g, addr, data, verb);
    let list = ok(&mut grpcurl(&addr, None, &["list"]))?;
    for s in ["preview.v1.PreviewService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        ensure!(list.lines().any(|l| l == s), "grpcurl list lacks {s}:\n{list}");
    }
    let described = ok(&mut grpcurl(&addr, None, &["describe", "preview.v1.PreviewService.Start"]))?;
    ensure!(
        described.contains("rpc Start ( .preview.v1.StartRequest ) returns ( .preview.v1.StartResponse )"),
        "{described}"
    );
    let start = format!(
        r#"{{"key":"grpcurl","ttl":"10m","pods":[{{"target":"targetless","image":"{IMAGE}","namespace":"{}"}}]}}"#,
        ns.name
    );
    let started = ok(&mut grpcurl(&addr, Some(&start), &["preview.v1.PreviewService/Start"]))?;
    let v: serde_json::Value = serde_json::from_str(&started)?;
    ensure!(v["key"] == "grpcurl" && v["environment"]["namespace"] == ns.name.as_str(), "{started}");
    let status = ok(&mut grpcurl(&addr, Some(r#"{"key":"grpcurl"}"#), &["preview.v1.PreviewService/Status"]))?;
    ensure!(status.contains("EVENT_KIND_SNAPSHOT") && status.contains(r#""key": "grpcurl""#), "{status}");
    let cleaned = ok(&mut grpcurl(&addr, Some(r#"{"key":"grpcurl"}"#), &["preview.v1.PreviewService/Clean"]))?;
    ensure!(cleaned.contains(r#""key": "grpcurl""#), "{cleaned}");
    // Bad input over grpcurl: the status code and the field.
    let bad = run(&mut grpcurl(&addr, Some(r#"{"key":"Bad Key","pods":[{}]}"#), &["preview.v1.PreviewService/Start"]))?;
    let err = text(&bad.stderr);
    ensure!(!bad.status.success() && err.contains("InvalidArgument") && err.contains("key"), "{err}");

    // The installed preview-gateway: a link made over grpcurl (ci may
    // share: preview-sharer, and get the Service) opens on the NodePort,
    // the gateway streaming its links from the installed previewd as its
    // ServiceAccount.
    echo_app(&ns, "web", "v1", 1, &[]).await?;
    identity::bind(&ns, "ci-share", "ClusterRole", "preview-sharer", identity::sa(&ns, "ci")).await?;
    let services = serde_json::json!([{"apiGroups": [""], "resources": ["services"], "verbs": ["get"]}]);
    identity::grant(&ns, "ci-services", services, identity::sa(&ns, "ci")).await?;
    let start = start.replace("\"grpcurl\"", "\"shared\"");
    ok(&mut grpcurl(&addr, Some(&start), &["preview.v1.PreviewService/Start"]))?;
    let share = r#"{"key":"shared","service":"web"}"#;
    let made = ok(&mut grpcurl(&addr, Some(share), &["preview.v1.PreviewService/Share"]))?;
    let v: serde_json::Value = serde_json::from_str(&made)?;
    let link = v["links"][0]["url"].as_str().context("no link")?.to_string();
    ensure!(link.ends_with(".preview.test:30080/"), "{made}");
    ready_pods_in(&client, SYSTEM_NS, "app.kubernetes.io/name=preview-gateway").await?;
    let body = eventually("the installed gateway to open the link", Duration::from_secs(60), || {
        let link = link.clone();
        async move {
            let out = run(Command::new("curl").args(["-s", "--connect-to", "::198.18.255.254:", &link]))?;
            Ok(text(&out.stdout).contains("preview-key=shared").then(|| text(&out.stdout)))
        }
    })
    .await?;
    ensure!(body.contains("\"version\":\"v1\""), "{body}");
    ok(&mut grpcurl(&addr, Some(r#"{"key":"shared"}"#), &["preview.v1.PreviewService/Clean"]))?;

    // Database branches from the installed previewd, which runs the dump
    // and load tools its image carries (Debian's pg_dump and psql, and
    // mariadb-dump and mariadb) as uid 65532 on a read-only root: an `all`
    // branch of a PostgreSQL and of a MariaDB source, each read by its
    // preview pod.
    let db = format!("src_inst_{}", ns.name.replace('-', "_"));
    let pg_url = common::db::staging_postgres(&db).await?;
    let my_url = common::db::staging_mariadb(&db).await?;
    echo_app(&ns, "ledger-pg", "v1", 1, &[("DATABASE_URL", &pg_url)]).await?;
    echo_app(&ns, "ledger-my", "v1", 1, &[("DATABASE_URL", &my_url)]).await?;
    let pods: Vec<serde_json::Value> = [("pg", "ledger-pg"), ("mysql", "ledger-my")]
        .iter()
        .map(|(engine, target)| {
            let config =
                common::db::branch_config(engine, &format!("deployment/{target}"), serde_json::json!({"mode": "all"}));
            serde_json::json!({"config": config, "image": IMAGE, "namespace": ns.name})
        })
        .collect();
    let start_db = serde_json::json!({"key": "branches", "pods": pods}).to_string();
    let started = ok(&mut grpcurl(&addr, Some(&start_db), &["preview.v1.PreviewService/Start"]))?;
    let v: serde_json::Value = serde_json::from_str(&started)?;
    let made = v["environment"]["dbBranches"].as_array().cloned().unwrap_or_default();
    ensure!(made.len() == 2 && made.iter().all(|b| b["phase"] == "Ready"), "{started}");
    let want = common::db::rows(3, 5, 7);
    let mut read = std::collections::BTreeMap::new();
    for p in ready_pods(&ns, "preview.dev/key=branches", 2).await? {
        let ip = p.status.and_then(|s| s.pod_ip).context("preview pod IP")?;
        // Ready is the HTTP port; the count is the database's answer.
        let (database, rows) = common::db::pod_counts(&ip).await?;
        read.insert(database, rows);
    }
    for b in &made {
        let database = b["database"].as_str().unwrap_or_default();
        ensure!(read.get(database) == Some(&want), "branch {database}: the preview pods read {read:?}");
    }
    ok(&mut grpcurl(&addr, Some(r#"{"key":"branches"}"#), &["preview.v1.PreviewService/Clean"]))?;
    eventually("the branch servers to go", Duration::from_secs(120), || async {
        Ok(common::db::servers(&ns).await?.is_empty().then_some(()))
    })
    .await?;
    common::db::drop_staging(&db).await?;

    // The generated clients, each through start → add pod → watch → clean.
    let client_env = |c: &mut Command| {
        c.env("PREVIEW_SERVER", &addr).env("PREVIEW_TEST_NAMESPACE", &ns.name).env("PREVIEW_TEST_IMAGE", IMAGE);
        c.env("PREVIEW_CA_FILE", &ca_file).env("PREVIEW_TOKEN", &token).env("PREVIEW_SERVER_NAME", SERVER_NAME);
    };
    let mut go = Command::new("go");
    go.args(["test", "-count=1", "-v", "./..."]).current_dir(root().join("clients/go"));
    client_env(&mut go);
    let out = tokio::task::spawn_blocking(move || ok(&mut go)).await??;
    ensure!(out.contains("--- PASS: TestCycle") && !out.contains("SKIP"), "go test:\n{out}");
    let mut py = Command::new(tools().join("py/bin/python"));
    py.args(["-m", "pytest", "-v", "-p", "no:cacheprovider", "clients/python/tests"])
        .current_dir(root())
        .env("PYTHONPATH", root().join("clients/python/src"));
    client_env(&mut py);
    let out = tokio::task::spawn_blocking(move || ok(&mut py)).await??;
    ensure!(out.contains("2 passed") && !out.contains("skipped"), "pytest:\n{out}");

    // The CLI, with only the kubeconfig: port-forward through the API server.
    let version = ok(&mut cli(&["version", "-o", "json"]))?;
    let v: serde_json::Value = serde_json::from_str(&version)?;
    ensure!(v["client"] == v["server"] && v["server"] == env!("CARGO_PKG_VERSION"), "{version}");
    ensure!(v["via"].as_str().is_some_and(|s| s.starts_with("port-forward to pod preview-system/")), "{version}");
    let n = ns.name.clone();
    let out = tokio::task::spawn_blocking(move || {
        ok(&mut cli(&["start", "--target", "targetless", "--image", IMAGE, "-n", &n, "--key", "cli-pf", "-o", "json"]))
    })
    .await??;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    ensure!(v[0]["key"] == "cli-pf" && v[0]["pods"][0]["ready"] == true, "{out}");
    // --watch on a pipe streams JSON lines; the first is the snapshot.
    let mut watch =
        cli(&["status", "--key", "cli-pf", "--watch"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let first = {
        use std::io::BufRead;
        let stdout = watch.stdout.take().context("stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        line
    };
    let _ = watch.kill();
    let _ = watch.wait();
    let ev: serde_json::Value = serde_json::from_str(&first).with_context(|| first.clone())?;
    ensure!(ev["kind"] == "snapshot" && ev["environments"][0]["key"] == "cli-pf", "{first}");

    // Staging traffic through an agent that this previewd attached: the agent
    // reaches it by its Service name, and the role allows the ephemeral
    // container patch.
    common::e2e::demo_chain(&ns, false).await?;
    let n = ns.name.clone();
    tokio::task::spawn_blocking(move || {
        ok(&mut cli(&["start", "--target", "deployment/orders", "--image", IMAGE, "-n", &n, "--key", "steal1"]))
    })
    .await??;
    let front = common::e2e::cluster_ip(&ns, "frontend").await?;
    eventually("keyed requests to reach orders v2", Duration::from_secs(60), || async {
        Ok((common::e2e::call(&front, Some("steal1")).await.ok() == Some(common::e2e::chain(&["v1", "v2", "v1"])))
            .then_some(()))
    })
    .await?;
    ensure!(common::e2e::call(&front, None).await? == common::e2e::chain(&["v1", "v1", "v1"]), "unkeyed left staging");
    ok(&mut cli(&["clean", "--key", "steal1"]))?;

    // The CLI with a token kubeconfig (the service account's token for the
    // API server, which the shipped previewd also accepts): the port-forward
    // and previewd both take it, and the audit line names the account.
    let api_token = identity::token(&ns, "ci", None).await?;
    let kc = identity::token_kubeconfig(&api_token, dir.path())?;
    let n = ns.name.clone();
    let out = tokio::task::spawn_blocking(move || {
        ok(cli(&["start", "--target", "deployment/orders", "--image", IMAGE, "-n", &n, "--key", "tok1", "-o", "json"])
            .env("KUBECONFIG", &kc))
    })
    .await??;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    ensure!(v[0]["key"] == "tok1", "{out}");
    let logs = ok(Command::new(kubectl()).args([
        "--kubeconfig",
        &kubeconfig_path(),
        "-n",
        SYSTEM_NS,
        "logs",
        "deploy/previewd",
    ]))?;
    let who = format!("system:serviceaccount:{}:ci", ns.name);
    let audit = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["audit"].is_string() && l["key"] == "tok1" && l["verb"] == "start")
        .with_context(|| format!("no audit line for tok1 in:\n{logs}"))?;
    ensure!(audit["user"] == who.as_str() && audit["result"] == "ok" && audit["filter"] == "key", "{audit}");
    ok(&mut cli(&["clean", "--key", "tok1"]))?;

    // State on the volume survives the pod: delete it, and the new pod still
    // knows cli-pf, and its preview pod was not touched.
    let preview_uid = |pods: Vec<Pod>| pods.into_iter().find_map(|p| p.metadata.uid);
    let before =
        preview_uid(ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key=cli-pf")).await?.items);
    Api::<Pod>::namespaced(client.clone(), SYSTEM_NS)
        .delete(pod.metadata.name.as_deref().unwrap_or_default(), &DeleteParams::default())
        .await?;
    let old = pod.metadata.name.clone();
    eventually("a new previewd pod", Duration::from_secs(120), || {
        let (client, old) = (client.clone(), old.clone());
        async move { Ok(Some(previewd_pod(&client).await?).filter(|p| p.metadata.name != old)) }
    })
    .await?;
    let out = eventually("the CLI through the new pod", Duration::from_secs(60), || async {
        let out = run(&mut cli(&["status", "--key", "cli-pf", "-o", "json"]))?;
        Ok(out.status.success().then(|| text(&out.stdout)))
    })
    .await?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v[0]["key"] == "cli-pf", "after previewd's pod was replaced: {out}");
    let after = preview_uid(ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key=cli-pf")).await?.items);
    ensure!(before.is_some() && before == after, "preview pod replaced: {before:?} → {after:?}");

    let out = ok(&mut cli(&["clean", "--key", "cli-pf", "-o", "json"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["removed"][0]["key"] == "cli-pf", "{out}");

    // Metrics on the admin port count what happened (since the new pod).
    let pod = previewd_pod(&client).await?;
    let pod_ip = pod.status.and_then(|s| s.pod_ip).context("pod IP")?;
    let metrics = http_get(&format!("{pod_ip}:9464"), "/metrics").await?;
    for want in ["preview_environments 0", "preview_cleans_total 1", "method=\"Clean\",code=\"OK\""] {
        ensure!(metrics.contains(want), "metrics lack {want}:\n{metrics}");
    }

    // Bad addresses: one line that says what was tried.
    let out = run(&mut cli(&["status", "--previewd-namespace", "nowhere"]))?;
    let err = text(&out.stderr);
    ensure!(out.status.code() == Some(1) && err.lines().count() == 1, "{err}");
    ensure!(err.contains("a Service labelled app.kubernetes.io/name=previewd in namespace nowhere"), "{err}");
    let out = run(&mut cli(&["status", "--server", "http://127.0.0.1:9"]))?;
    let err = text(&out.stderr);
    ensure!(out.status.code() == Some(1) && err.lines().count() == 1, "{err}");
    ensure!(err.contains("cannot reach previewd through http://127.0.0.1:9") && err.contains("refused"), "{err}");
    Ok(())
}

/// The pid of the in-cluster previewd, found by its arguments.
fn previewd_pid() -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"/previewd")) && args.iter().any(|a| *a == b"/data") {
            return Ok(pid);
        }
    }
    bail!("no previewd process with --data-dir /data")
}

async fn http_get(addr: &str, path: &str) -> Result<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path).header("host", "previewd").body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let body = send.send_request(req).await?.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
