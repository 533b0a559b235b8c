//! Chaos tests (issues 5 and 14; `make chaos`), in a test binary of their own so that they run
//! after the other cluster tests, on a quieter machine: the gaps they
//! measure are what they report.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::e2e::*;
use common::{TestNs, echo_app, env_objects, eventually, ready_pods, start_req};
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

/// A chaos test's ground: a namespace with one ready `orders` pod (v1), and
/// a port on the node address and a store directory for a previewd process
/// of the test's own.
struct Ground {
    ns: TestNs,
    port: u16,
    data: tempfile::TempDir,
    addr: String,
}

async fn ground(name: &str) -> Result<Ground> {
    let ns = TestNs::new(name).await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=orders", 1).await?;
    let port = std::net::TcpListener::bind("198.18.255.254:0")?.local_addr()?.port();
    common::ensure_system_ns().await?;
    Ok(Ground { ns, port, data: tempfile::tempdir()?, addr: format!("https://198.18.255.254:{port}") })
}

/// previewd as its own process (so it can be SIGKILLed), on the node
/// address, its log in `data/previewd.log`.
fn spawn_previewd(ns: &TestNs, port: u16, data: &std::path::Path) -> Result<std::process::Child> {
    spawn_previewd_at(ns, port, data, data)
}

/// The same with its store in `data` and its log in `logs/previewd.log`.
fn spawn_previewd_at(
    ns: &TestNs,
    port: u16,
    data: &std::path::Path,
    logs: &std::path::Path,
) -> Result<std::process::Child> {
    std::process::Command::new(env!("CARGO_BIN_EXE_previewd"))
        .args(["--listen", &format!("198.18.255.254:{port}"), "--agent-image", AGENT_IMAGE])
        .args(["--image-pull-policy", "Never", "--instance", &ns.name, "--default-namespace", &ns.name])
        .args(["--system-namespace", common::SYSTEM_NS, "--max-envs-per-user", "1000"])
        .arg("--data-dir")
        .arg(data)
        .env("KUBECONFIG", common::kubeconfig_path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(logs.join("previewd.log"))?)
        .spawn()
        .context("starting previewd")
}

/// Kills the previewd a test started; on failure, prints its log (in `data`).
fn stop_previewd(mut pd: std::process::Child, data: &std::path::Path, result: Result<()>) -> Result<()> {
    let _ = pd.kill();
    let _ = pd.wait();
    if result.is_err() {
        eprintln!("{}", std::fs::read_to_string(data.join("previewd.log")).unwrap_or_default());
    }
    result
}

type PreviewClient = preview::cli::Client;

async fn connect(addr: &str) -> Result<PreviewClient> {
    eventually("previewd", Duration::from_secs(30), || async { Ok(common::connect(addr).await.ok()) }).await
}

/// The environments of Status's first message (the snapshot).
async fn snapshot(c: &mut PreviewClient) -> Result<Vec<preview::proto::Environment>> {
    let snap = c.status(preview::proto::StatusRequest::default()).await?.into_inner().message().await?;
    Ok(snap.context("snapshot")?.environments)
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
    let Ground { ns, port, data, addr } = ground("chaos-kill").await?;
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
                let envs = snapshot(&mut c).await?;
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
            let cms = env_objects(&ns, &ListParams::default().labels("preview.dev/key")).await?;
            let alive = |p: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| p.is_none();
            let mut orphans = 0;
            let mut have = BTreeSet::new();
            for p in pods.items.iter().filter(|p| alive(&p.metadata.deletion_timestamp)) {
                have.insert(p.metadata.name.clone().unwrap_or_default());
                let key =
                    p.metadata.labels.as_ref().and_then(|l| l.get("preview.dev/key")).cloned().unwrap_or_default();
                orphans += usize::from(!live.contains(&key));
            }
            for cm in cms.iter().filter(|c| alive(&c.metadata.deletion_timestamp)) {
                let key =
                    cm.metadata.labels.as_ref().and_then(|l| l.get("preview.dev/key")).cloned().unwrap_or_default();
                orphans += usize::from(!live.contains(&key));
            }
            let missing = envs.iter().flat_map(|e| &e.pods).filter(|p| !have.contains(&p.name)).count();
            Ok((orphans == 0 && missing == 0).then_some((orphans, missing)))
        })
        .await?;
        eprintln!("chaos kill: {} environments left, {orphans} orphan objects, {missing} missing pods", live.len());
        clean_all(&mut c).await?;
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
    common::ensure_system_ns().await?;
    let addr = format!("https://198.18.255.254:{port}");
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
                let envs = snapshot(&mut c).await?;
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
        ensure!(snapshot(&mut c).await?.is_empty(), "environments left after Clean");
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn chaos_sigkill_of_previewd_loses_nothing() -> Result<()> {
    let Ground { ns, port, data, addr } = ground("e2e-pdkill").await?;
    let spawn = || spawn_previewd(&ns, port, data.path());
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
        let envs = snapshot(&mut c).await?;
        ensure!(envs.len() == 1 && envs[0].key == "pd1", "{envs:?}");
        // The agent's stream is back: a new environment on the target reaches it.
        c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "pd2")).await?;
        until(&ip, Some("pd2"), &["v2"], Duration::from_secs(60)).await?;
        ensure!(call(&ip, Some("pd1")).await? == chain(&["v2"]));
        // One agent for all of it: none was re-attached.
        ensure!(agents_added(&target_pods(&ns, "orders").await?[0]) == 1);
        c.clean(preview::proto::CleanRequest {
            selector: Some(preview::proto::clean_request::Selector::Glob("pd*".into())),
        })
        .await?;
        no_rules_left(&ns, "orders").await?;
        // Nothing orphaned: no preview pod or owner object is left.
        let left = ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key")).await?;
        ensure!(left.items.iter().all(|p| p.metadata.deletion_timestamp.is_some()), "{} pods left", left.items.len());
        let cms = env_objects(&ns, &ListParams::default().labels("preview.dev/key")).await?;
        ensure!(cms.is_empty(), "{} owner objects left", cms.len());
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

/// A tmpfs of `mib` MiB mounted on a fresh directory; unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u32) -> Result<Tmpfs> {
        let dir = tempfile::tempdir()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .output()?;
        ensure!(out.status.success(), "mount: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Tmpfs(dir))
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }

    /// Writes a file until the volume is full (ENOSPC); its size.
    fn fill(&self) -> Result<u64> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler"))?;
        let chunk = vec![0u8; 64 << 10];
        let mut written = 0u64;
        // Bounded by the volume's size: at most mib * 16 chunks fit.
        loop {
            match f.write(&chunk) {
                Ok(0) => anyhow::bail!("write returned 0"),
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return Ok(written),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Chaos case 5: the store's volume (a small tmpfs) fills up. Start fails
/// with RESOURCE_EXHAUSTED naming the store, nothing is made on the cluster,
/// previewd keeps serving, and once space is freed Start works again without
/// a restart (the store reopens redb, which refuses everything after an I/O
/// error).
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and root: make test")]
#[tokio::test]
async fn chaos_full_store_volume() -> Result<()> {
    // The store on the tmpfs; the log in the ground's directory.
    let Ground { ns, port, data: logs, addr } = ground("chaos-full").await?;
    let vol = Tmpfs::mount(8)?;
    let mut pd = spawn_previewd_at(&ns, port, vol.path(), logs.path())?;
    let cfg = config("deployment/orders", serde_json::json!({}));
    let result = async {
        let mut c = connect(&addr).await?;
        let keys = |mut c: PreviewClient| async move {
            Ok::<Vec<String>, anyhow::Error>(snapshot(&mut c).await?.into_iter().map(|e| e.key).collect())
        };
        c.start(start_req(&cfg, V2, "full1")).await?;
        let filled = vol.fill()?;
        let err = c.start(start_req(&cfg, V2, "full2")).await.err().context("a Start on a full volume succeeded")?;
        eprintln!("chaos full store: filled {filled} bytes; Start answered {:?}: {}", err.code(), err.message());
        ensure!(err.code() == tonic::Code::ResourceExhausted, "{err:?}");
        ensure!(err.message().contains("full") && err.message().contains("previewd.redb"), "{err:?}");
        // Nothing half-made: no pod, no owner object for full2.
        let sel = ListParams::default().labels("preview.dev/key=full2");
        ensure!(ns.api::<Pod>().list(&sel).await?.items.is_empty(), "a pod of full2 was made");
        ensure!(env_objects(&ns, &sel).await?.is_empty(), "an owner object of full2 was made");
        // Still serving, and still knowing full1.
        ensure!(keys(c.clone()).await? == ["full1"]);
        ensure!(pd.try_wait()?.is_none(), "previewd exited");
        std::fs::remove_file(vol.path().join("filler"))?;
        c.start(start_req(&cfg, V2, "full3")).await?;
        ensure!(keys(c.clone()).await? == ["full1", "full3"]);
        clean_all(&mut c).await?;
        Ok(())
    }
    .await;
    stop_previewd(pd, logs.path(), result)
}

/// Chaos case 2 with previewd down: SIGKILL previewd, then the agent's guard
/// and worker. Their redirect is left pointing at a dead port, so unkeyed
/// requests fail while nobody can clean it up; once previewd is back, staging
/// must be served again within 5 s (it runs `preview-agent cleanup` in the
/// pod, then attaches a fresh agent). It times a gap, so it runs alone.
#[ignore = "times a gap: runs alone (make chaos, and make test after the parallel tests)"]
#[tokio::test]
async fn chaos_sigkill_of_the_agent_while_previewd_is_down() -> Result<()> {
    let Ground { ns, port, data, addr } = ground("chaos-down").await?;
    let ip = cluster_ip(&ns, "orders").await?;
    let mut pd = spawn_previewd(&ns, port, data.path())?;
    let routed = async {
        let mut c = connect(&addr).await?;
        c.start(start_req(&config("deployment/orders", serde_json::json!({})), V2, "down")).await?;
        until(&ip, Some("down"), &["v2"], Duration::from_secs(60)).await
    }
    .await;
    if let Err(e) = routed {
        return stop_previewd(pd, data.path(), Err(e));
    }
    pd.kill()?; // SIGKILL
    pd.wait()?;
    let pod_name = async {
        let pod_name = target_pods(&ns, "orders").await?.remove(0).metadata.name.context("name")?;
        let pids = agent_pids(&pod_name)?;
        ensure!(pids.len() == 2, "guard and worker, got {pids:?}");
        for pid in &pids {
            // SAFETY: SIGKILL to the agent processes previewd started in our test pod.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        // With previewd down the orphaned redirect fails staging: the gap is real.
        eventually("staging to fail with the agent dead", Duration::from_secs(10), || async {
            Ok(call(&ip, None).await.is_err().then_some(()))
        })
        .await?;
        Ok::<_, anyhow::Error>(pod_name)
    }
    .await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(steady(ip.clone(), stop_rx));
    let back = Instant::now();
    let pd = spawn_previewd(&ns, port, data.path())?;
    let result = async {
        eventually("staging served again", Duration::from_secs(30), || async {
            Ok(call(&ip, None).await.ok().filter(|c| c[0] == "v1").map(|_| ()))
        })
        .await?;
        let served = back.elapsed();
        until(&ip, Some("down"), &["v2"], Duration::from_secs(60)).await?;
        let rerouted = back.elapsed();
        let _ = stop_tx.send(true);
        let (sent, failed, _) = load.await?;
        eprintln!(
            "chaos agent kill, previewd down: staging served again {served:?} after previewd's return, keyed routed again after {rerouted:?}; from the return on, {sent} unkeyed requests, {failed} failed"
        );
        ensure!(served <= Duration::from_secs(5), "staging came back {served:?} after previewd's return");
        let p = ns.api::<Pod>().get(&pod_name).await?;
        ensure!(agents(&p).iter().any(|(n, _, exit)| n.starts_with("preview-cleanup-") && *exit == Some(0)));
        let mut c = connect(&addr).await?;
        c.clean(preview::proto::CleanRequest { selector: Some(preview::proto::clean_request::Selector::Key("down".into())) })
            .await?;
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

/// Runs `deploy/local/cluster.sh restart <what>`: stopped, then started
/// again, as after a crash and its supervisor. How long it took.
fn restart(what: &str) -> Result<Duration> {
    let t = Instant::now();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/local/cluster.sh");
    let out = std::process::Command::new(script).args(["restart", what]).output()?;
    ensure!(out.status.success(), "restart {what}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(t.elapsed())
}

/// Chaos case 3: kube-apiserver, then etcd, restarted during a stream of
/// Starts (one every 250 ms until two after the restart). Each Start
/// completes or fails with UNAVAILABLE; afterwards the environments are
/// exactly the Starts that completed (a failed one is undone, by the retry
/// when the API server was away), and their pods match them. It restarts
/// the API server, so it runs alone: `make chaos`, and `make test` after
/// the parallel tests.
#[ignore = "restarts the API server: runs alone (make chaos, and make test after the parallel tests)"]
#[tokio::test]
async fn chaos_apiserver_and_etcd_restart_during_starts() -> Result<()> {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Ground { ns, port, data, addr } = ground("chaos-api").await?;
    let pd = spawn_previewd(&ns, port, data.path())?;
    let result = async {
        let c = connect(&addr).await?;
        let cfg = config("deployment/orders", serde_json::json!({}));
        let mut ok: BTreeSet<String> = BTreeSet::new();
        for what in ["kube-apiserver", "etcd"] {
            let restarted = Arc::new(AtomicBool::new(false));
            let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
            let stream = {
                let (mut c, cfg, restarted) = (c.clone(), cfg.clone(), restarted.clone());
                let prefix = if what == "etcd" { "etcd" } else { "api" };
                tokio::spawn(async move {
                    let (mut out, mut first, mut after) = (Vec::new(), Some(first_tx), 0);
                    // Bounded: at most 60 Starts, each at most 120 s.
                    for i in 0..60 {
                        let key = format!("{prefix}{i}");
                        let r =
                            tokio::time::timeout(Duration::from_secs(120), c.start(start_req(&cfg, V2, &key))).await;
                        out.push((key, r));
                        if let Some(tx) = first.take() {
                            let _ = tx.send(());
                        }
                        if restarted.load(Ordering::Relaxed) {
                            after += 1;
                            if after == 2 {
                                break;
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    out
                })
            };
            // The restart lands once the stream is under way.
            first_rx.await?;
            let took = tokio::task::spawn_blocking(move || restart(what)).await??;
            restarted.store(true, Ordering::Relaxed);
            let (mut done, mut failed) = (0, Vec::new());
            for (key, r) in stream.await? {
                match r {
                    Err(_) => anyhow::bail!("Start {key} hung for 120 s"),
                    Ok(Ok(_)) => {
                        done += 1;
                        ok.insert(key);
                    }
                    Ok(Err(s)) => {
                        ensure!(s.code() == tonic::Code::Unavailable, "Start {key}: not a clear failure: {s:?}");
                        failed.push(s.message().to_string());
                    }
                }
            }
            eprintln!(
                "chaos restart {what} ({took:?}): {} Starts, {done} completed, {} UNAVAILABLE; e.g. {:?}",
                done + failed.len(),
                failed.len(),
                failed.first()
            );
        }
        // The end state: the environments are the completed Starts, settled.
        let envs = eventually("environments to be the completed Starts", Duration::from_secs(120), || {
            let (mut c, ok) = (c.clone(), ok.clone());
            async move {
                let envs = snapshot(&mut c).await?;
                let keys: BTreeSet<String> = envs.iter().map(|e| e.key.clone()).collect();
                let settled = envs.iter().all(|e| !e.pending && e.failure.is_empty());
                Ok((keys == ok && settled).then_some(envs))
            }
        })
        .await?;
        // And the pods on the cluster are theirs, no more, no fewer.
        eventually("pods to match the environments", Duration::from_secs(60), || async {
            let pods = ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key")).await?;
            let have: BTreeSet<String> = pods
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.metadata.name.clone())
                .collect();
            let want: BTreeSet<String> = envs.iter().flat_map(|e| &e.pods).map(|p| p.name.clone()).collect();
            Ok((have == want).then_some(()))
        })
        .await?;
        eprintln!("chaos restart: {} environments, pods match", envs.len());
        clean_all(&mut c.clone()).await?;
        Ok(())
    }
    .await;
    stop_previewd(pd, data.path(), result)
}

/// VmRSS in KiB of a process, 0 once it is gone.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

type H1 = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn h1_to_pod() -> Result<H1> {
    let s = tokio::net::TcpStream::connect((common::netns::POD, 8080)).await?;
    let (send, c) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
    tokio::spawn(c);
    Ok(send)
}

/// One request on `s`, its answer read whole: whether it was a success.
async fn h1_ok(s: &mut H1, method: &str, key: Option<&str>, body: bytes::Bytes) -> Result<bool> {
    use http_body_util::BodyExt;
    let mut b = http::Request::builder().method(method).uri("/f").header("host", common::netns::POD);
    if let Some(k) = key {
        b = b.header("baggage", format!("preview-key={k}"));
    }
    s.ready().await?;
    let resp = s.send_request(b.body(http_body_util::Full::new(body))?).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    Ok(ok)
}

/// Staging: unkeyed GETs at 200 rps for `time`, over 4 connections (50 rps
/// each, so a request may take up to 20 ms before the next one is due);
/// sorted latencies (from the intended send) and failures.
async fn staging_probe(time: Duration) -> Result<(Vec<Duration>, u32)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..4u32 {
        let mut s = h1_to_pod().await?;
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut failed) = (Vec::new(), 0u32);
            for k in 0u32.. {
                let intended = start + Duration::from_millis(5) * (4 * k + c);
                if intended >= start + time {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                match h1_ok(&mut s, "GET", None, bytes::Bytes::new()).await {
                    Ok(true) => lat.push(intended.elapsed()),
                    Ok(false) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        s = h1_to_pod().await?;
                    }
                }
            }
            Ok::<_, anyhow::Error>((lat, failed))
        }));
    }
    let (mut lat, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (l, f) = t.await??;
        lat.extend(l);
        failed += f;
    }
    lat.sort();
    Ok((lat, failed))
}

/// Chaos case 6: a mirror flood at a target pod (network namespaces, the
/// release agent as in a pod, default flags): 16 connections send 256 KiB
/// POSTs, paced for 10k rps in all, for 4 s (at most 40 000 requests; this
/// machine's 2 cores reach far fewer): first unkeyed (the same flood without
/// mirroring, the baseline), then keyed for a mirror route. The agent's RSS,
/// guard and worker, sampled every 50 ms, stays <= 32 MiB: copies past the
/// byte budget are dropped and counted, not queued. Staging's p99 (unkeyed
/// GETs on their own connections and thread) in each phase is printed, not
/// asserted; no staging request may fail.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs root (network namespaces): make test")]
#[test]
fn chaos_mirror_flood_keeps_the_agent_small() -> Result<()> {
    use common::netns::{Net, sh};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    // The binary the agent image holds (make build), not this test's debug build.
    let release = std::path::Path::new(&std::env::var("CARGO_TARGET_DIR").context("CARGO_TARGET_DIR (make sets it)")?)
        .join("release/preview-agent");
    ensure!(release.exists(), "{} is missing: make build", release.display());
    let mut net = Net::new()?;
    net.servers()?;
    net.set_routes(serde_json::json!([
        {"key": "m", "mode": "mirror", "filter": {"key": "m"}, "destination": "198.18.101.3"}
    ]))?;
    let agent = net.agent_bin(release.to_str().context("path")?, &["--linger", "0s"])?;
    let guard = net.procs[agent].id();
    // 0: before, 1: the unkeyed flood, 2: the mirror flood, 3: done.
    let phase = Arc::new(AtomicUsize::new(0));
    // The agent logs "intercepting" once its rules are in (and connections
    // made before them are reset): only then do the clients connect.
    let end = Instant::now() + Duration::from_secs(30);
    while !net.log(agent).contains("intercepting") {
        ensure!(Instant::now() < end, "the agent did not start in 30 s:\n{}", net.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = net.client_thread({
        let phase = phase.clone();
        move || async move {
            let mut out = vec![staging_probe(Duration::from_secs(2)).await?];
            for p in [1, 2] {
                phase.store(p, Ordering::SeqCst);
                out.push(staging_probe(Duration::from_secs(4)).await?);
            }
            phase.store(3, Ordering::SeqCst);
            Ok(out)
        }
    });
    let counts: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let flood = net.client_thread({
        let (phase, counts) = (phase.clone(), counts.clone());
        move || async move {
            let body = bytes::Bytes::from(vec![b'x'; 256 << 10]);
            let mut secs = Vec::new();
            for (p, key) in [(1usize, "x"), (2, "m")] {
                // Bounded wait for the probe to open the phase.
                let end = tokio::time::Instant::now() + Duration::from_secs(60);
                while phase.load(Ordering::SeqCst) < p {
                    ensure!(tokio::time::Instant::now() < end, "phase {p} never began");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let start = tokio::time::Instant::now();
                let mut tasks = Vec::new();
                for _ in 0..16 {
                    let mut s = h1_to_pod().await?;
                    let (body, counts) = (body.clone(), counts.clone());
                    tasks.push(tokio::spawn(async move {
                        // 16 x 625 rps = 10k rps intended, for 4 s.
                        for k in 0u32..2500 {
                            tokio::time::sleep_until(start + Duration::from_micros(1600) * k).await;
                            if start.elapsed() > Duration::from_secs(4) {
                                break;
                            }
                            counts[p * 2 - 2].fetch_add(1, Ordering::Relaxed);
                            if h1_ok(&mut s, "POST", Some(key), body.clone()).await? {
                                counts[p * 2 - 1].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok::<_, anyhow::Error>(())
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                secs.push(start.elapsed().as_secs_f64());
            }
            Ok(secs)
        }
    });
    // The agent's RSS (guard + worker) per phase, while the clients run.
    let mut peak = [0u64; 4];
    let worker: u32 = sh(&["pgrep", "-P", &guard.to_string()])?.trim().parse()?;
    while !(probe.is_finished() && flood.is_finished()) {
        let p = phase.load(Ordering::SeqCst).min(3);
        peak[p] = peak[p].max(rss_kib(guard) + rss_kib(worker));
        std::thread::sleep(Duration::from_millis(50));
    }
    let staging = probe.join().map_err(|_| anyhow::anyhow!("probe panicked"))?.map_err(|e| e.context(net.logs()))?;
    let secs = flood.join().map_err(|_| anyhow::anyhow!("flood panicked"))?.map_err(|e| e.context(net.logs()))?;
    let metrics = sh(&["ip", "netns", "exec", &net.ns("p"), "curl", "-fsS", "http://127.0.0.1:15090/metrics"])?;
    let mirror: Vec<&str> = metrics.lines().filter(|l| l.contains("mirror") && !l.starts_with('#')).collect();
    let p99 = |v: &[Duration]| v.get(v.len() * 99 / 100).copied().unwrap_or_default();
    let c = |i: usize| counts[i].load(Ordering::Relaxed);
    eprintln!(
        "chaos mirror flood: staging p99 {:?} before; unkeyed flood: {} POSTs of 256 KiB ({:.0} rps, {} answered), staging p99 {:?}, agent RSS peak {} KiB; mirror flood: {} POSTs ({:.0} rps, {} answered), staging p99 {:?}, agent RSS peak {} KiB; staging failures {:?}; {mirror:?}",
        p99(&staging[0].0),
        c(0),
        c(0) as f64 / secs[0],
        c(1),
        p99(&staging[1].0),
        peak[1],
        c(2),
        c(2) as f64 / secs[1],
        c(3),
        p99(&staging[2].0),
        peak[2],
        staging.iter().map(|s| s.1).collect::<Vec<_>>(),
    );
    ensure!(staging.iter().all(|s| s.1 == 0), "staging requests failed:\n{}", net.logs());
    ensure!(peak[2] > 0, "the agent's RSS was never sampled");
    let most = peak.iter().max().copied().unwrap_or(0);
    ensure!(most <= 32 << 10, "the agent's RSS reached {most} KiB under the mirror flood (bound 32 MiB)");
    Ok(())
}
