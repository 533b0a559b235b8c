//! Agent benchmark (`make bench-agent`; ignored by `cargo test`). One run, in
//! network namespaces, measures the same app three ways: directly, through
//! preview-agent, and through nginx (from Debian) routing on the same header.
//! Prints added latency at 1k and 5k rps, max throughput as ratios, agent RSS
//! and CPU per 1k rps, and the original's p99 with mirroring on and off.
//! Bounded: every phase runs a fixed time against addresses in our namespaces.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::netns::{Net, POD, sh};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const PHASE: Duration = Duration::from_secs(3);

fn route(key: &str, mode: &str, dest: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "mode": mode, "filter": {"key": key}, "destination": dest})
}

async fn conn(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(c);
    Ok(send)
}

async fn one(send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, key: Option<&str>) -> Result<Duration> {
    let mut b = http::Request::get("/b").header("host", POD);
    if let Some(k) = key {
        b = b.header("baggage", format!("preview-key={k}"));
    }
    let t = Instant::now();
    send.ready().await?;
    let resp = send.send_request(b.body(Full::new(Bytes::new()))?).await?;
    resp.into_body().collect().await?;
    Ok(t.elapsed())
}

/// Fixed-rate load over `conns` keep-alive connections; returns latencies.
async fn at_rate(addr: SocketAddr, key: Option<&'static str>, rps: u64, conns: u64) -> Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut send = conn(addr).await?;
            let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 * conns / rps));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + PHASE;
            let mut lat = Vec::new();
            while Instant::now() < end {
                tick.tick().await;
                match one(&mut send, key).await {
                    Ok(d) => lat.push(d),
                    // The server closed the keep-alive connection: reconnect.
                    Err(_) => send = conn(addr).await?,
                }
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok(all)
}

/// Closed loop with 32 connections: requests per second.
async fn max_rps(addr: SocketAddr) -> Result<f64> {
    let mut tasks = Vec::new();
    for _ in 0..32 {
        tasks.push(tokio::spawn(async move {
            let mut send = conn(addr).await?;
            let end = Instant::now() + PHASE;
            let mut n = 0u64;
            while Instant::now() < end {
                match one(&mut send, None).await {
                    Ok(_) => n += 1,
                    Err(_) => send = conn(addr).await?,
                }
            }
            Ok::<_, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / PHASE.as_secs_f64())
}

fn p(v: &[Duration], pct: usize) -> f64 {
    v[(v.len() * pct / 100).min(v.len() - 1)].as_secs_f64() * 1e6
}

fn proc_stat(pid: &str) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat.rsplit(')').next().context("stat")?.split_whitespace().collect();
    let cpu = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("rss")?
        .parse()?;
    Ok((cpu, rss))
}

#[test]
#[ignore = "benchmark: run with `make bench-agent`"]
fn bench_agent() -> Result<()> {
    let mut net = Net::new()?;
    net.servers()?;
    let conf = net.dir.path().join("nginx.conf");
    let dir = net.dir.path().display().to_string();
    std::fs::write(
        &conf,
        format!(
            r#"worker_processes 1;
error_log {dir}/nginx-error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  upstream app {{ server 127.0.0.1:8080; keepalive 64; }}
  upstream preview {{ server 198.18.101.2:8080; keepalive 64; }}
  map $http_baggage $pool {{ default app; "~(^|,)\s*preview-key=bench\s*(;|,|$)" preview; }}
  server {{
    listen 8082;
    location / {{ proxy_pass http://$pool; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"#
        ),
    )?;
    let ns_p = net.ns("p");
    net.spawn(&ns_p, &["nginx", "-c", conf.to_str().context("path")?, "-g", "daemon off;"])?;
    net.set_routes(serde_json::json!([route("bench", "steal", "198.18.101.2"), route("m", "mirror", "198.18.101.3")]))?;
    let app: SocketAddr = format!("{POD}:8080").parse()?;
    let nginx: SocketAddr = format!("{POD}:8082").parse()?;

    // Phase 1: direct to the app (no agent yet), and nginx as the peer.
    let (direct_1k, direct_5k, direct_max, nginx_max, nginx_1k) = net.client(move || async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let warm = at_rate(app, None, 500, 1).await?;
        drop(warm);
        Ok((
            at_rate(app, None, 1000, 2).await?,
            at_rate(app, None, 5000, 8).await?,
            max_rps(app).await?,
            max_rps(nginx).await?,
            at_rate(nginx, None, 1000, 2).await?,
        ))
    })?;

    // Phase 2: the same app through the agent.
    let idx = net.agent()?;
    let guard = net.procs[idx].id().to_string();
    net.client(|| async {
        for _ in 0..100 {
            if let Ok(mut s) = conn(format!("{POD}:8080").parse()?).await {
                let req = http::Request::get("/")
                    .header("host", POD)
                    .header("x-preview-key", "bench")
                    .body(Full::new(Bytes::new()))?;
                if let Ok(resp) = s.send_request(req).await
                    && resp.into_body().collect().await?.to_bytes().windows(4).any(|w| w == b"\"v2\"")
                {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("agent never came up")
    })?;
    let worker = sh(&["pgrep", "-P", &guard])?.trim().to_string();
    let (cpu0, _) = proc_stat(&worker)?;
    let agent_1k = net.client(move || async move { at_rate(app, None, 1000, 2).await })?;
    let (cpu1, rss_1k) = proc_stat(&worker)?;
    let agent_5k = net.client(move || async move { at_rate(app, None, 5000, 8).await })?;
    let (agent_max, mirror_on, mirror_off) = net.client(move || async move {
        Ok((max_rps(app).await?, at_rate(app, Some("m"), 1000, 2).await?, at_rate(app, None, 1000, 2).await?))
    })?;
    let (_, rss_end) = proc_stat(&worker)?;
    let ticks = 100.0; // USER_HZ
    let cpu_ms_per_s = (cpu1 - cpu0) as f64 / ticks * 1000.0 / PHASE.as_secs_f64();

    println!("\n== bench-agent (each phase {PHASE:?}; client, agent, app and nginx share this machine's cores) ==");
    for (name, d, a) in [("1k rps", &direct_1k, &agent_1k), ("5k rps", &direct_5k, &agent_5k)] {
        println!(
            "unmatched, {name}: direct p50 {:.0} µs p99 {:.0} µs | agent p50 {:.0} µs p99 {:.0} µs | added p50 {:+.0} µs, p99 {:+.0} µs (goal p99 <= 100 µs at 1k) | n={}",
            p(d, 50),
            p(d, 99),
            p(a, 50),
            p(a, 99),
            p(a, 50) - p(d, 50),
            p(a, 99) - p(d, 99),
            a.len()
        );
    }
    println!("nginx (peer), 1k rps: p50 {:.0} µs p99 {:.0} µs", p(&nginx_1k, 50), p(&nginx_1k, 99));
    println!(
        "max throughput (32 conns): direct {direct_max:.0} rps | agent {agent_max:.0} rps = {:.2}x direct, {:.2}x nginx (goal >= 1.0x nginx) | nginx {nginx_max:.0} rps",
        agent_max / direct_max,
        agent_max / nginx_max
    );
    println!(
        "agent RSS {:.1} MiB after 1k rps, {:.1} MiB at end (goal <= 12 MiB) | CPU {cpu_ms_per_s:.0} ms/s per 1k rps",
        rss_1k as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    println!(
        "mirror, 1k rps: original p99 {:.0} µs with mirroring on, {:.0} µs off = {:+.1}% (goal <= +10%)",
        p(&mirror_on, 99),
        p(&mirror_off, 99),
        (p(&mirror_on, 99) / p(&mirror_off, 99) - 1.0) * 100.0
    );
    Ok(())
}
