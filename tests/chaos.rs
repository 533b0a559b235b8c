//! Chaos tests (issues 5 and 14; `make chaos`), in a test binary of their own so that they run
//! after the other cluster tests, on a quieter machine: the gaps they
//! measure are what they report.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::e2e::*;
use common::{TestNs, echo_app, eventually, ready_pods, start_req};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;

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

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
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

/// previewd as its own process (so it can be SIGKILLed), on the node
/// address, its log in `data/previewd.log`.
fn spawn_previewd(ns: &TestNs, port: u16, data: &std::path::Path) -> Result<std::process::Child> {
    std::process::Command::new(env!("CARGO_BIN_EXE_previewd"))
        .args(["--listen", &format!("198.18.255.254:{port}"), "--agent-image", AGENT_IMAGE])
        .args(["--image-pull-policy", "Never", "--instance", &ns.name, "--default-namespace", &ns.name])
        .arg("--data-dir")
        .arg(data)
        .env("KUBECONFIG", common::kubeconfig_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(data.join("previewd.log"))?)
        .spawn()
        .context("starting previewd")
}

/// Kills the previewd a test started; on failure, prints its log.
fn stop_previewd(mut pd: std::process::Child, data: &std::path::Path, result: Result<()>) -> Result<()> {
    let _ = pd.kill();
    let _ = pd.wait();
    if result.is_err() {
        eprintln!("{}", std::fs::read_to_string(data.join("previewd.log")).unwrap_or_default());
    }
    result
}

async fn connect(
    addr: &str,
) -> Result<preview::proto::preview_service_client::PreviewServiceClient<tonic::transport::Channel>> {
    eventually("previewd", Duration::from_secs(30), || async { Ok(preview::cli::connect(addr).await.ok()) }).await
}

/// Chaos case 1: SIGKILL previewd at a random moment of each of N Starts and
/// N Cleans (N = `CHAOS_ROUNDS`: 20 under `make chaos`, 4 in `make test`),
/// restarting it each time. Then: no orphan pod or owner object, no missing
/// pod, and no cleaned environment brought back.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn chaos_sigkill_of_previewd_at_random_moments() -> Result<()> {
    use std::collections::BTreeSet;
    let rounds: usize = std::env::var("CHAOS_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let ns = TestNs::new("chaos-kill").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
    let data = tempfile::tempdir()?;
    let addr = format!("http://198.18.255.254:{port}");
    // xorshift, seeded from the clock and printed, so a failure can be replayed.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 | 1;
    let mut x = seed;
    let mut next_ms = move |max: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % max
    };
    let (mut done, mut cut) = (0, 0);
    let mut cleaned: BTreeSet<String> = BTreeSet::new();
    for i in 0..rounds * 2 {
        let key = format!("k{}", i / 2);
        let mut pd = spawn_previewd(&ns, port, data.path())?;
        let mut c = connect(&addr).await?;
        let op = {
            let key = key.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, &key)).await.map(|_| ())
                } else {
                    let sel = preview::proto::clean_request::Selector::Key(key);
                    c.clean(preview::proto::CleanRequest { selector: Some(sel) }).await.map(|_| ())
                }
            })
        };
        // The kill lands at a random moment of the call (or after it).
        tokio::time::sleep(Duration::from_millis(next_ms(250))).await;
        pd.kill()?; // SIGKILL
        pd.wait()?;
        match op.await? {
            Ok(()) => {
                done += 1;
                if i % 2 == 1 {
                    cleaned.insert(key);
                }
            }
            Err(_) => cut += 1,
        }
    }
    eprintln!("chaos kill (seed {seed:#x}): {} calls, {done} answered before the kill, {cut} cut by it", rounds * 2);
    let pd = spawn_previewd(&ns, port, data.path())?;
    let result = async {
        let mut c = connect(&addr).await?;
        // Recovery finished what was begun: every environment settles.
        let envs = eventually("every environment to settle", Duration::from_secs(60), || {
            let mut c = c.clone();
            async move {
                let snap = c.status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
                let envs = snap.context("snapshot")?.environments;
                Ok(envs.iter().all(|e| !e.pending && e.failure.is_empty()).then_some(envs))
            }
        })
        .await?;
        let live: BTreeSet<String> = envs.iter().map(|e| e.key.clone()).collect();
        let back: Vec<&String> = cleaned.intersection(&live).collect();
        ensure!(back.is_empty(), "cleaned environments brought back: {back:?}");
        // Pods and owner objects match the environments exactly.
        let (orphans, missing) = eventually("pods to match the environments", Duration::from_secs(60), || async {
            let pods = ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key")).await?;
            let cms = ns
                .api::<k8s_openapi::api::core::v1::ConfigMap>()
                .list(&ListParams::default().labels("preview.dev/key"))
                .await?;
            let alive = |p: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| p.is_none();
            let mut orphans = 0;
            let mut have = BTreeSet::new();
            for p in pods.items.iter().filter(|p| alive(&p.metadata.deletion_timestamp)) {
                have.insert(p.metadata.name.clone().unwrap_or_default());
                let key =
                    p.metadata.labels.as_ref().and_then(|l| l.get("preview.dev/key")).cloned().unwrap_or_default();
                orphans += usize::from(!live.contains(&key));
            }
            for cm in cms.items.iter().filter(|c| alive(&c.metadata.deletion_timestamp)) {
                let key =
                    cm.metadata.labels.as_ref().and_then(|l| l.get("preview.dev/key")).cloned().unwrap_or_default();
                orphans += usize::from(!live.contains(&key));
            }
            let missing = envs.iter().flat_map(|e| &e.pods).filter(|p| !have.contains(&p.name)).count();
            Ok((orphans == 0 && missing == 0).then_some((orphans, missing)))
        })
        .await?;
        eprintln!("chaos kill: {} environments left, {orphans} orphan objects, {missing} missing pods", live.len());
        c.clean(preview::proto::CleanRequest {
            selector: Some(preview::proto::clean_request::Selector::Glob("*".into())),
        })
        .await?;
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

/// Chaos case 4: a preview namespace deleted while previewd is down. It
/// starts, serves, shows that environment FAILED (or has cleaned it), and the
/// other environment is untouched.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn chaos_a_namespace_deleted_while_previewd_is_down() -> Result<()> {
    let ns = TestNs::new("chaos-delns").await?;
    let gone = TestNs::new("chaos-delns-gone").await?;
    for n in [&ns, &gone] {
        echo_app(n, "orders", "v1", 1, &[]).await?;
        ready_pods(n, "app=orders", 1).await?;
    }
    let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
    let data = tempfile::tempdir()?;
    let addr = format!("http://198.18.255.254:{port}");
    let mut pd = spawn_previewd(&ns, port, data.path())?;
    let mut c = connect(&addr).await?;
    let elsewhere = serde_json::json!({"target": {"path": "deployment/orders", "namespace": gone.name}}).to_string();
    c.start(start_req(&elsewhere, V2, "dn1")).await?;
    c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "dn2")).await?;
    pd.kill()?; // SIGKILL
    pd.wait()?;
    let namespaces = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(common::client().await?);
    namespaces.delete(&gone.name, &Default::default()).await?;
    eventually("the namespace to be gone", Duration::from_secs(120), || async {
        Ok(namespaces.get_opt(&gone.name).await?.is_none().then_some(()))
    })
    .await?;
    let pd = spawn_previewd(&ns, port, data.path())?;
    let result = async {
        let mut c = connect(&addr).await?;
        let envs = eventually("dn1 to show FAILED or be cleaned", Duration::from_secs(30), || {
            let mut c = c.clone();
            async move {
                let snap = c.status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
                let envs = snap.context("snapshot")?.environments;
                let settled = envs.iter().find(|e| e.key == "dn1").is_none_or(|e| !e.failure.is_empty());
                Ok(settled.then_some(envs))
            }
        })
        .await?;
        match envs.iter().find(|e| e.key == "dn1") {
            Some(e) => eprintln!("dn1 FAILED: {}", e.failure),
            None => eprintln!("dn1 was cleaned"),
        }
        let dn2 = envs.iter().find(|e| e.key == "dn2").context("dn2 is gone")?;
        ensure!(dn2.failure.is_empty(), "dn2 failed too: {}", dn2.failure);
        // Still serving: a new environment starts, and Clean takes both.
        c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "dn3")).await?;
        let removed = c
            .clean(preview::proto::CleanRequest {
                selector: Some(preview::proto::clean_request::Selector::Glob("dn*".into())),
            })
            .await?
            .into_inner()
            .removed;
        let keys: Vec<&str> = removed.iter().map(|r| r.key.as_str()).collect();
        ensure!(keys.contains(&"dn2") && keys.contains(&"dn3"), "{removed:?}");
        // A FAILED environment whose namespace is gone is cleaned too.
        ensure!(envs.iter().all(|e| e.key != "dn1") || keys.contains(&"dn1"), "dn1 not cleaned: {removed:?}");
        let after = c.status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
        ensure!(after.context("snapshot")?.environments.is_empty(), "environments left after Clean");
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn chaos_sigkill_of_previewd_loses_nothing() -> Result<()> {
    let ns = TestNs::new("e2e-pdkill").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
    let data = tempfile::tempdir()?;
    let spawn = || spawn_previewd(&ns, port, data.path());
    let addr = format!("http://198.18.255.254:{port}");
    let connect = || connect(&addr);
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
    let pd = spawn()?;
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
        no_rules_left(&ns, "orders").await?;
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
    stop_previewd(pd, data.path(), result)
}
