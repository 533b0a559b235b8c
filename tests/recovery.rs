//! Issue 3, recovery: previewd killed with SIGKILL in the middle of Start,
//! and a lost store rebuilt with --adopt (or cleaned without it).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use preview::proto;

struct Proc {
    child: Child,
    addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs the real previewd binary; with `pause_at`, returns once it paused there.
fn spawn_previewd(
    ns: &str,
    data: &std::path::Path,
    instance: &str,
    pause_at: Option<&str>,
    adopt: bool,
) -> Result<Proc> {
    let port = free_port()?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_previewd"));
    cmd.env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "warn")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--auth", "none", "--system-namespace", SYSTEM_NS])
        .arg("--data-dir")
        .arg(data)
        .args(["--default-namespace", ns, "--instance", instance, "--image-pull-policy", "Never"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(p) = pause_at {
        cmd.env("PREVIEW_PAUSE_AT", p);
    }
    if adopt {
        cmd.arg("--adopt");
    }
    let mut child = cmd.spawn()?;
    if pause_at.is_some() {
        let stdout = child.stdout.take().context("stdout")?;
        // Blocking read is fine: the Start call runs on another task.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("PAUSED AT") {
                    let _ = std::fs::write(format!("/tmp/previewd-paused-{port}"), &line);
                }
            }
        });
    }
    Ok(Proc { child, addr: format!("http://127.0.0.1:{port}") })
}

async fn connect(addr: &str) -> Result<preview::cli::Client> {
    eventually("previewd to answer", Duration::from_secs(30), || async {
        match common::connect(addr).await {
            Ok(mut c) => Ok(c.status(proto::StatusRequest::default()).await.ok().map(|_| c)),
            Err(_) => Ok(None),
        }
    })
    .await
}

async fn managed(ns: &TestNs, instance: &str) -> Result<(Vec<String>, Vec<String>)> {
    let lp = ListParams::default().labels(&format!("preview.dev/instance={instance}"));
    let pods = ns.api::<Pod>().list(&lp).await?.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none());
    let envs = env_objects(ns, &lp).await?;
    Ok((pods.filter_map(|p| p.metadata.name).collect(), envs.into_iter().filter_map(|c| c.metadata.name).collect()))
}

async fn snapshot(c: &mut preview::cli::Client) -> Result<Vec<proto::Environment>> {
    Ok(c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??.environments)
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn sigkill_during_start_leaves_complete_or_absent() -> Result<()> {
    let ns = TestNs::new("t-kill").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let data = tempfile::tempdir()?;
    for (i, point) in ["after-intent", "after-owner", "after-pod"].into_iter().enumerate() {
        let instance = format!("{}-{i}", ns.name);
        let mut p = spawn_previewd(&ns.name, data.path(), &instance, Some(point), false)?;
        let mut c = connect(&p.addr).await?;
        let key = format!("kill{i}");
        let req = start_req(r#"{"target": "deployment/orders"}"#, "preview.local/echo:v2", &key);
        let call = tokio::spawn(async move { c.start(req).await });
        let marker = format!("/tmp/previewd-paused-{}", p.addr.rsplit(':').next().unwrap_or_default());
        eventually(&format!("previewd to pause at {point}"), Duration::from_secs(30), || {
            let m = marker.clone();
            async move { Ok(std::fs::read_to_string(&m).ok().filter(|s| s.contains(point))) }
        })
        .await?;
        let _ = std::fs::remove_file(&marker);
        p.child.kill()?; // SIGKILL
        p.child.wait()?;
        ensure!(call.await?.is_err(), "Start at {point} should have failed with the server gone");

        // Restart on the same store: the record says pending, so it is completed.
        let p = spawn_previewd(&ns.name, data.path(), &instance, None, false)?;
        let mut c = connect(&p.addr).await?;
        let envs = snapshot(&mut c).await?;
        let env = envs
            .iter()
            .find(|e| e.key == key)
            .with_context(|| format!("{point}: env missing after restart: {envs:?}"))?;
        ensure!(!env.pending && env.pods.len() == 1, "{point}: {env:?}");
        let (pods, cms) = managed(&ns, &instance).await?;
        ensure!(pods == vec![env.pods[0].name.clone()], "{point}: pods {pods:?} vs record {:?}", env.pods);
        ensure!(cms == vec![format!("preview-env-{key}")], "{point}: previewenvironments {cms:?}");
        c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key(key)) }).await?;
        drop(p);
    }
    Ok(())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn lost_store_is_adopted_or_cleaned_from_labels() -> Result<()> {
    let ns = TestNs::new("t-adopt").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let instance = ns.name.clone();
    let data = tempfile::tempdir()?;
    let d = Previewd::start_with(&ns, data.path().to_path_buf(), instance.clone(), |_| {}).await?;
    let mut c = d.client().await?;
    let env =
        c.start(start_req(r#"{"target": "deployment/orders"}"#, "preview.local/echo:v2", "adopt1")).await?.into_inner();
    let pod_name = env.environment.context("env")?.pods[0].name.clone();
    d.stop().await?;

    // Store lost; --adopt rebuilds it from the PreviewEnvironments.
    let fresh = tempfile::tempdir()?;
    let d = Previewd::start_with(&ns, fresh.path().to_path_buf(), instance.clone(), |a| a.adopt = true).await?;
    let mut c = d.client().await?;
    let envs = snapshot(&mut c).await?;
    ensure!(envs.len() == 1 && envs[0].key == "adopt1" && envs[0].pods[0].name == pod_name, "{envs:?}");
    ensure!(managed(&ns, &instance).await?.0 == vec![pod_name.clone()]);
    d.stop().await?;

    // Store lost again, no --adopt: labelled objects with unknown keys are removed.
    let empty = tempfile::tempdir()?;
    let d = Previewd::start_with(&ns, empty.path().to_path_buf(), instance.clone(), |_| {}).await?;
    let mut c = d.client().await?;
    ensure!(snapshot(&mut c).await?.is_empty());
    let (pods, cms) = managed(&ns, &instance).await?;
    ensure!(pods.is_empty() && cms.is_empty(), "orphans left: {pods:?} {cms:?}");
    d.stop().await
}
