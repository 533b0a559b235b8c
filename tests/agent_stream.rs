//! The agent's routes streamed from previewd: a real previewd on the local
//! cluster, a real target pod, and the agent in a network namespace of its
//! own linked to this host (198.18.102.1 here, .2 there). Covers the full
//! route set on connect, updates, previewd going away (routes kept until they
//! expire, then the agent exits and removes its rules) and a clean.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use preview::proto;

struct HostLink {
    ns: String,
}

impl HostLink {
    fn new() -> Result<HostLink> {
        let id = &preview::model::Key::generate()[..6];
        let ns = format!("ps{id}");
        let (host, inner) = (format!("ps{id}h"), format!("ps{id}n"));
        for args in [
            vec!["ip", "netns", "add", &ns],
            vec!["ip", "-n", &ns, "link", "set", "lo", "up"],
            vec!["ip", "link", "add", &host, "type", "veth", "peer", "name", &inner, "netns", &ns],
            vec!["ip", "addr", "add", "198.18.102.1/30", "dev", &host],
            vec!["ip", "link", "set", &host, "up"],
            vec!["ip", "-n", &ns, "addr", "add", "198.18.102.2/30", "dev", &inner],
            vec!["ip", "-n", &ns, "link", "set", &inner, "up"],
        ] {
            netns::sh(&args)?;
        }
        Ok(HostLink { ns })
    }

    fn admin(&self, path: &str) -> Result<String> {
        netns::sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-s",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:15090{path}"),
        ])
    }

    fn chains(&self) -> Result<usize> {
        let out = netns::sh(&["ip", "netns", "exec", &self.ns, "iptables", "-w", "-t", "nat", "-S"])?;
        Ok(out.lines().filter(|l| l.starts_with("-N PREVIEW-AGENT-")).count())
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster: make test")]
#[tokio::test]
async fn routes_stream_from_previewd_survive_its_absence_until_expiry() -> Result<()> {
    let ns = TestNs::new("t-stream").await?;
    echo_app(&ns, "orders", "v1", 1, &[]).await?;
    let target = ready_pods(&ns, "app=orders", 1).await?.remove(0);
    let target_name = target.metadata.name.clone().context("name")?;
    // Only one test binds 198.18.102.1, so the link cannot collide.
    let link = HostLink::new()?;
    let data = tempfile::tempdir()?;
    let d = Previewd::start_listening(&ns, data.path().to_path_buf(), ns.name.clone(), "198.18.102.1:0").await?;
    let mut c = d.client().await?;
    let mut req = start_req(r#"{"target": "deployment/orders"}"#, "preview.local/echo:v2", "stream1");
    req.ttl = "20s".into();
    c.start(req).await?;
    let preview_ip = eventually("preview pod IP", Duration::from_secs(60), || {
        let ns = &ns;
        async move {
            let pods = ns.api::<Pod>().list(&ListParams::default().labels("preview.dev/key=stream1")).await?;
            Ok(pods.items.first().and_then(|p| p.status.as_ref()?.pod_ip.clone()))
        }
    })
    .await?;

    // Its log says when it loses previewd's stream (JSON lines, at info).
    let logs = tempfile::tempdir()?;
    let log = logs.path().join("agent.log");
    // The proof and CA previewd would put in the agent's env in the pod.
    let (proof, ca) = agent_trust(&ns, &target_name).await?;
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &link.ns, env!("CARGO_BIN_EXE_preview-agent"), "run", "--ports", "8080"])
        .args(["--linger", "1s"])
        .args(["--server", &d.addr, "--pod", &target_name, "--namespace", &ns.name])
        .env("PREVIEW_AGENT_PROOF", proof)
        .env("PREVIEW_CA", ca)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let routes = eventually("the agent to hold the route", Duration::from_secs(30), || {
        let r = link.admin("/routes").unwrap_or_default();
        async move { Ok(r.contains("stream1").then_some(r)) }
    })
    .await?;
    let v: serde_json::Value = serde_json::from_str(&routes)?;
    ensure!(v[0]["destination"] == preview_ip.as_str() && v[0]["mode"] == "steal", "{v}");
    ensure!(link.chains()? == 1, "rules not installed");

    // A second environment on the same target arrives as an update.
    c.start(start_req(r#"{"target": "deployment/orders"}"#, "preview.local/echo:v2", "stream2")).await?;
    eventually("the update", Duration::from_secs(60), || {
        let r = link.admin("/routes").unwrap_or_default();
        async move { Ok((r.contains("stream1") && r.contains("stream2")).then_some(())) }
    })
    .await?;
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("stream2".into())) }).await?;
    eventually("the clean to reach the agent", Duration::from_secs(30), || {
        let r = link.admin("/routes").unwrap_or_default();
        async move { Ok((r.contains("stream1") && !r.contains("stream2")).then_some(())) }
    })
    .await?;

    // previewd goes away: the agent keeps stream1 until its TTL, then
    // removes its rules and exits once idle for --linger. Checked once the agent has seen the stream go.
    d.stop().await?;
    eventually("the agent to lose previewd's stream", Duration::from_secs(30), || {
        let lost = std::fs::read_to_string(&log).unwrap_or_default().contains("route stream lost");
        async move { Ok(lost.then_some(())) }
    })
    .await
    .map_err(|e| e.context(format!("agent log:\n{}", std::fs::read_to_string(&log).unwrap_or_default())))?;
    let r = link.admin("/routes")?;
    ensure!(r.contains("stream1") && !r.contains("stream2"), "routes while previewd is away: {r}");
    ensure!(link.chains()? == 1, "rules gone while previewd is away");
    let end = std::time::Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = agent.try_wait()? {
            break s;
        }
        ensure!(std::time::Instant::now() < end, "agent still running after the TTL");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    ensure!(status.success(), "agent exit {status:?}");
    ensure!(link.chains()? == 0, "rules left behind");
    Ok(())
}
