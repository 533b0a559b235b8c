//! Benchmarks for the service core (`make bench-core`; ignored by `cargo test`).
//! Prints figures and ratios against a baseline measured in the same run:
//! - Start latency until the pod object exists, against a bare pod create;
//! - Status snapshot time with 1000 environments, against an empty snapshot;
//! - previewd RSS with 1000 environments, against RSS with none;
//! - Start with authentication and authorisation (a client certificate, and
//!   SubjectAccessReviews cached after the first Start), against a second
//!   previewd with `--auth none`, Starts interleaved one by one.
//!
//! Preview pods clone a Deployment with 0 replicas whose template cannot be
//! scheduled, so 1000 of them cost the API server objects, not containers.
//! previewd runs with `--agent-image`, so attach's work is in the figures
//! (with no target pod running, no container is attached).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use preview::proto;

const ENVS: usize = 1000;
const START_RUNS: usize = 100;

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

#[tokio::test]
#[ignore = "benchmark: run with `make bench-core`"]
async fn bench_core() -> Result<()> {
    let ns = TestNs::new("bench-core").await?;
    let template = serde_json::json!({
        "metadata": {"labels": {"app": "bench"}},
        "spec": {
            "nodeSelector": {"preview.dev/bench": "nowhere"},
            "containers": [{"name": "app", "image": "preview.local/echo:v1", "imagePullPolicy": "Never", "args": ["serve"],
                            "env": [{"name": "A", "value": "1"}], "ports": [{"containerPort": 8080}]}]
        }
    });
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bench"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "bench"}}, "template": template}
    }))?;
    ns.api::<Deployment>().create(&PostParams::default(), &dep).await?;

    // Baseline: a bare pod create of the same spec, same client, same API server.
    let pods = ns.api::<Pod>();
    let mut base = Vec::new();
    for i in 0..START_RUNS {
        let mut p: Pod = serde_json::from_value(template.clone())?;
        p.metadata.name = Some(format!("baseline-{i}"));
        let t = Instant::now();
        pods.create(&PostParams::default(), &p).await?;
        base.push(t.elapsed());
    }

    let data = tempfile::tempdir()?;
    ensure_system_ns().await?;
    // On loopback, as the --auth none one must be, so that the two differ
    // only in TLS and authorisation. Attach runs (--agent-image): it watches
    // each target, and Start reads the target's pods for agent warnings; the
    // agent server is never dialled, as the targets have no pods.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_previewd"))
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "warn")
        .args(["--listen", &format!("127.0.0.1:{port}"), "--agent-server", "https://127.0.0.1:9", "--data-dir"])
        .arg(data.path())
        .args(["--default-namespace", &ns.name, "--instance", &ns.name, "--system-namespace", common::SYSTEM_NS])
        .args(["--max-envs-per-user", "2000"])
        .args(["--agent-image", "preview.local/agent:dev", "--image-pull-policy", "Never"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = format!("https://127.0.0.1:{port}");
    // The same with --auth none (plaintext, no checks).
    let none_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let none_data = tempfile::tempdir()?;
    let none_instance = format!("{}-none", ns.name);
    let mut none_child = Command::new(env!("CARGO_BIN_EXE_previewd"))
        .env("KUBECONFIG", kubeconfig_path())
        .env("RUST_LOG", "warn")
        .args(["--listen", &format!("127.0.0.1:{none_port}"), "--auth", "none", "--data-dir"])
        .arg(none_data.path())
        .args(["--default-namespace", &ns.name, "--instance", &none_instance, "--system-namespace", common::SYSTEM_NS])
        .args(["--agent-image", "preview.local/agent:dev", "--agent-server", "http://127.0.0.1:9"])
        .args(["--image-pull-policy", "Never"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let none_addr = format!("http://127.0.0.1:{none_port}");
    let result = async {
        let mut c = eventually("previewd", Duration::from_secs(30), || async {
            match common::connect(&addr).await {
                Ok(mut c) => Ok(c.status(proto::StatusRequest::default()).await.ok().map(|_| c)),
                Err(_) => Ok(None),
            }
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_empty = rss_kib(child.id())?;

        let mut plain = eventually("previewd --auth none", Duration::from_secs(30), || async {
            match common::connect(&none_addr).await {
                Ok(mut c) => Ok(c.status(proto::StatusRequest::default()).await.ok().map(|_| c)),
                Err(_) => Ok(None),
            }
        })
        .await?;

        let cfg = r#"{"target": "deployment/bench"}"#;
        // One Start each first: the authorising previewd's decisions are
        // cached from then on (30 s), which is what is measured.
        c.start(start_req(cfg, "preview.local/echo:v2", "warm")).await?;
        plain.start(start_req(cfg, "preview.local/echo:v2", "warm-none")).await?;
        let (mut starts, mut none_starts) = (Vec::new(), Vec::new());
        // Interleaved, each first in turn: the API server's work after one
        // Start (the pod's events) falls on the other as often.
        for i in 0..START_RUNS {
            let mut pair = [(&mut c, &mut starts, format!("b{i}")), (&mut plain, &mut none_starts, format!("n{i}"))];
            if i % 2 == 1 {
                pair.reverse();
            }
            for (client, times, key) in pair {
                let t = Instant::now();
                client.start(start_req(cfg, "preview.local/echo:v2", &key)).await?;
                times.push(t.elapsed());
            }
        }
        let snap = |c: &mut preview::cli::Client, key: &str| {
            let req = proto::StatusRequest { key: key.into(), namespace: String::new(), watch: false };
            let mut c = c.clone();
            async move {
                let t = Instant::now();
                let ev = c.status(req).await?.into_inner().next().await.context("no snapshot")??;
                Ok::<_, anyhow::Error>((t.elapsed(), ev.environments.len()))
            }
        };
        // TLS and authentication on every call: an empty Status, each in
        // turn, while both hold as many environments.
        let (mut calls_auth, mut calls_none) = (Vec::new(), Vec::new());
        for _ in 0..300 {
            calls_auth.push(snap(&mut c, "no-such-key").await?.0);
            calls_none.push(snap(&mut plain, "no-such-key").await?.0);
        }
        // Fill up to ENVS with a few concurrent clients.
        let mut tasks = Vec::new();
        for w in 0..8 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                // ENVS in all with "warm".
                for i in (START_RUNS + w..ENVS - 1).step_by(8) {
                    c.start(start_req(cfg, "preview.local/echo:v2", &format!("b{i}"))).await?;
                }
                Ok::<_, tonic::Status>(())
            }));
        }
        for t in tasks {
            t.await??;
        }

        let (mut full, mut empty) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            let (d, n) = snap(&mut c, "").await?;
            anyhow::ensure!(n == ENVS, "snapshot has {n} environments");
            full.push(d);
            empty.push(snap(&mut c, "no-such-key").await?.0);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_full = rss_kib(child.id())?;

        let starts_in_order = starts.clone();
        let (s50, s99, b50, b99) = (pct(&mut starts, 50), pct(&mut starts, 99), pct(&mut base, 50), pct(&mut base, 99));
        println!("\n== bench-core ({START_RUNS} Start runs, {ENVS} environments) ==");
        println!(
            "Start until pod exists: p50 {:.1} ms, p99 {:.1} ms (goal <= 50 ms) | bare pod create p50 {:.1} ms, p99 {:.1} ms | ratio p50 {:.2}x",
            ms(s50), ms(s99), ms(b50), ms(b99), ms(s50) / ms(b50)
        );
        // Each pair ran back to back: the median of their differences is
        // the added cost with the machine's drift taken out.
        let mut diffs: Vec<f64> = starts_in_order.iter().zip(&none_starts).map(|(a, n)| ms(*a) - ms(*n)).collect();
        diffs.sort_by(f64::total_cmp);
        let added = diffs[diffs.len() / 2];
        let n50 = pct(&mut none_starts, 50);
        let (call_auth, call_none) = (pct(&mut calls_auth, 50), pct(&mut calls_none, 50));
        println!(
            "Start p50 with authorisation (client certificate, cached SubjectAccessReviews): {:.1} ms | --auth none p50 {:.1} ms | added: median of {START_RUNS} paired differences {:.2} ms (goal <= 1 ms), ratio of p50s {:.2}x | one call (empty Status) p50 {:.0} us vs {:.0} us",
            ms(s50), ms(n50), added, ms(s50) / ms(n50), call_auth.as_secs_f64() * 1e6, call_none.as_secs_f64() * 1e6
        );
        let (f50, e50) = (pct(&mut full, 50), pct(&mut empty, 50));
        println!(
            "Status snapshot, {ENVS} envs: p50 {:.2} ms, max {:.2} ms (goal <= 20 ms) | empty snapshot p50 {:.2} ms | ratio {:.1}x",
            ms(f50), ms(pct(&mut full, 100)), ms(e50), ms(f50) / ms(e50)
        );
        println!(
            "previewd RSS: {:.1} MiB with {ENVS} envs (goal <= 64 MiB) | {:.1} MiB empty | ratio {:.2}x",
            rss_full as f64 / 1024.0, rss_empty as f64 / 1024.0, rss_full as f64 / rss_empty as f64
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    for ch in [&mut child, &mut none_child] {
        let _ = ch.kill();
        let _ = ch.wait();
    }
    result
}
