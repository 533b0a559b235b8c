//! Agent benchmark (`make bench-agent`; ignored by `cargo test`). One run, in
//! network namespaces, measures the same app process three ways: directly (a
//! port the agent does not intercept), through preview-agent, and through
//! nginx (from Debian) routing on the same header. Prints added latency at 1k
//! and 5k rps, max throughput as ratios, agent RSS and CPU per 1k rps, and the
//! original's p99 with mirroring on and off. A fourth path, nginx's stream
//! module copying bytes without parsing HTTP, shows what one user-space hop
//! costs on this machine at all.
//!
//! The machine's noise drifts over seconds, so the paths are measured
//! in interleaved rounds (order rotating) rather than one after the other.
//! Bounded: every round runs a fixed time against addresses in our namespaces.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use common::netns::{Net, POD, sh};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Rounds per measurement and the time each path runs in a round: 3 s per
/// path in all, 3 000 samples at 1k rps.
const ROUNDS: u32 = 6;
/// The mirror figure compares two p99s whose difference is small against the
/// machine's noise, so it gets four times the samples (12 000 per mode).
const MIRROR_ROUNDS: u32 = 24;
const ROUND: Duration = Duration::from_millis(500);
const TICKS_PER_S: f64 = 100.0; // USER_HZ

fn route(key: &str, mode: &str, dest: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "mode": mode, "filter": {"key": key}, "destination": dest})
}

async fn conn(addr: SocketAddr) -> Result<Conn> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(c);
    Ok(send)
}

async fn one(send: &mut Conn, key: Option<&str>) -> Result<Duration> {
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

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens `n` keep-alive connections and sends one request on each, so that
/// rounds measure steady-state requests, not connection setup.
async fn open(addr: SocketAddr, n: usize) -> Result<Vec<Conn>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut s = conn(addr).await?;
        one(&mut s, None).await?;
        out.push(s);
    }
    Ok(out)
}

/// Load on each connection for `time`: fixed-rate (`rps` shared by all) or
/// closed loop. Returns the connections and the latencies.
async fn drive(
    addr: SocketAddr,
    sends: Vec<Conn>,
    key: Option<&'static str>,
    rps: Option<u64>,
    time: Duration,
) -> Result<(Vec<Conn>, Vec<Duration>)> {
    let conns = sends.len() as u64;
    let mut tasks = Vec::new();
    for mut send in sends {
        tasks.push(tokio::spawn(async move {
            let mut tick = rps.map(|r| {
                let mut t = tokio::time::interval(Duration::from_nanos(1_000_000_000 * conns / r));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let end = Instant::now() + time;
            let mut lat = Vec::new();
            while Instant::now() < end {
                if let Some(t) = &mut tick {
                    t.tick().await;
                }
                match one(&mut send, key).await {
                    Ok(d) => lat.push(d),
                    // The server closed the keep-alive connection: reconnect.
                    Err(_) => send = conn(addr).await?,
                }
            }
            Ok::<_, anyhow::Error>((send, lat))
        }));
    }
    let (mut sends, mut all) = (Vec::new(), Vec::new());
    for t in tasks {
        let (s, l) = t.await??;
        sends.push(s);
        all.extend(l);
    }
    Ok((sends, all))
}

/// One path under test: where to send, the process whose CPU it costs, and
/// an optional key (mirror phases).
struct Path {
    addr: SocketAddr,
    key: Option<&'static str>,
    pid: Option<String>,
}

/// What a path gave over all rounds.
#[derive(Default)]
struct Sample {
    lat: Vec<Duration>,
    requests: u64,
    cpu_ticks: u64,
    secs: f64,
}

impl Sample {
    fn p(&self, pct: usize) -> f64 {
        let v = &self.lat;
        v[(v.len() * pct / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    }
    fn rps(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    /// CPU ms per second of load, scaled to 1k rps.
    fn cpu_per_1k(&self) -> f64 {
        self.cpu_ticks as f64 / TICKS_PER_S * 1000.0 / self.secs / (self.rps() / 1000.0)
    }
}

enum Load {
    Rate {
        rps: u64,
        conns: usize,
    },
    /// 32 connections, each sending its next request as soon as the last is answered.
    Closed,
}

/// Runs every path for [`ROUND`], `rounds` times, rotating the order so
/// that no path always follows another. Connections stay open across rounds.
async fn interleaved(paths: &[Path], load: Load, rounds: u32) -> Result<Vec<Sample>> {
    let (rps, conns) = match load {
        Load::Rate { rps, conns } => (Some(rps), conns),
        Load::Closed => (None, 32),
    };
    let mut out: Vec<Sample> = paths.iter().map(|_| Sample::default()).collect();
    let mut sends = Vec::new();
    for p in paths {
        sends.push(open(p.addr, conns).await?);
    }
    for round in 0..rounds as usize {
        for i in 0..paths.len() {
            let idx = (i + round) % paths.len();
            let path = &paths[idx];
            let cpu0 = path.pid.as_deref().map(proc_stat).transpose()?.map_or(0, |s| s.0);
            let t = Instant::now();
            let (s, lat) = drive(path.addr, std::mem::take(&mut sends[idx]), path.key, rps, ROUND).await?;
            let secs = t.elapsed().as_secs_f64();
            let cpu1 = path.pid.as_deref().map(proc_stat).transpose()?.map_or(0, |s| s.0);
            sends[idx] = s;
            let s = &mut out[idx];
            s.requests += lat.len() as u64;
            s.lat.extend(lat);
            s.cpu_ticks += cpu1 - cpu0;
            s.secs += secs;
        }
    }
    for s in &mut out {
        s.lat.sort();
    }
    Ok(out)
}

/// (utime + stime in ticks, VmRSS in KiB) of a process and all its threads.
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
            r#"load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
error_log {dir}/nginx-error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};
  upstream app {{ server 127.0.0.1:8081; keepalive 64; }}
  upstream preview {{ server 198.18.101.2:8080; keepalive 64; }}
  map $http_baggage $pool {{ default app; "~(^|,)\s*preview-key=bench\s*(;|,|$)" preview; }}
  server {{
    listen 8082;
    location / {{ proxy_pass http://$pool; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
stream {{ server {{ listen 8083; proxy_pass 127.0.0.1:8081; }} }}
"#
        ),
    )?;
    let ns_p = net.ns("p");
    let nginx_idx = net.spawn(&ns_p, &["nginx", "-c", conf.to_str().context("path")?, "-g", "daemon off;"])?;
    net.set_routes(serde_json::json!([route("bench", "steal", "198.18.101.2"), route("m", "mirror", "198.18.101.3")]))?;
    let agent_idx = net.agent()?;
    // The agent intercepts :8080; :8081 is the same app, never intercepted.
    let through_agent: SocketAddr = format!("{POD}:8080").parse()?;
    let direct: SocketAddr = format!("{POD}:8081").parse()?;
    let through_nginx: SocketAddr = format!("{POD}:8082").parse()?;
    // nginx's stream module: one user-space hop that copies bytes and parses
    // nothing, the floor for any proxy on this machine.
    let through_l4: SocketAddr = format!("{POD}:8083").parse()?;
    net.client(move || async move {
        for _ in 0..100 {
            if let Ok(mut s) = conn(through_agent).await {
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
    let worker = sh(&["pgrep", "-P", &net.procs[agent_idx].id().to_string()])?.trim().to_string();
    let nginx_worker = sh(&["pgrep", "-P", &net.procs[nginx_idx].id().to_string()])?.trim().to_string();
    let paths = [
        Path { addr: direct, key: None, pid: None },
        Path { addr: through_agent, key: None, pid: Some(worker.clone()) },
        Path { addr: through_nginx, key: None, pid: Some(nginx_worker.clone()) },
        Path { addr: through_l4, key: None, pid: Some(nginx_worker) },
    ];
    let mirror =
        [Path { addr: through_agent, key: Some("m"), pid: None }, Path { addr: through_agent, key: None, pid: None }];

    let (r1k, r5k, max, mir) = net.client(move || async move {
        // Warm every path: pools, caches.
        for p in &paths {
            drive(p.addr, open(p.addr, 1).await?, None, Some(500), Duration::from_millis(300)).await?;
        }
        Ok((
            interleaved(&paths, Load::Rate { rps: 1000, conns: 2 }, ROUNDS).await?,
            interleaved(&paths, Load::Rate { rps: 5000, conns: 8 }, ROUNDS).await?,
            interleaved(&paths, Load::Closed, ROUNDS).await?,
            interleaved(&mirror, Load::Rate { rps: 1000, conns: 2 }, MIRROR_ROUNDS).await?,
        ))
    })?;
    let (_, rss_end) = proc_stat(&worker)?;

    println!(
        "\n== bench-agent: {ROUNDS} interleaved rounds of {ROUND:?} per path ({MIRROR_ROUNDS} for mirror); client, agent, app and nginx share this machine's cores =="
    );
    for (name, s) in [("1k rps", &r1k), ("5k rps", &r5k)] {
        let (d, a, n, l) = (&s[0], &s[1], &s[2], &s[3]);
        println!(
            "unmatched, {name}: direct p50 {:.0} µs p99 {:.0} µs | agent added p50 {:+.0} µs, p99 {:+.0} µs{} | nginx added p50 {:+.0} µs, p99 {:+.0} µs | byte-copy floor (nginx stream) added p50 {:+.0} µs, p99 {:+.0} µs | n={}",
            d.p(50),
            d.p(99),
            a.p(50) - d.p(50),
            a.p(99) - d.p(99),
            if name == "1k rps" { " (goal p99 <= 100 µs)" } else { "" },
            n.p(50) - d.p(50),
            n.p(99) - d.p(99),
            l.p(50) - d.p(50),
            l.p(99) - d.p(99),
            a.lat.len()
        );
    }
    let (d, a, n, l) = (&max[0], &max[1], &max[2], &max[3]);
    println!(
        "max throughput (32 conns, closed loop): direct {:.0} rps | agent {:.0} rps = {:.2}x direct, {:.2}x nginx (goal >= 1.0x nginx) | nginx {:.0} rps | byte-copy floor {:.0} rps",
        d.rps(),
        a.rps(),
        a.rps() / d.rps(),
        a.rps() / n.rps(),
        n.rps(),
        l.rps()
    );
    println!(
        "CPU per 1k rps: agent {:.0} ms/s, nginx {:.0} ms/s at 1k rps; agent {:.0} ms/s, nginx {:.0} ms/s at max",
        r1k[1].cpu_per_1k(),
        r1k[2].cpu_per_1k(),
        a.cpu_per_1k(),
        n.cpu_per_1k()
    );
    println!("agent RSS at the end {:.1} MiB (goal <= 12 MiB)", rss_end as f64 / 1024.0);
    println!(
        "mirror, 1k rps: original p99 {:.0} µs with mirroring on, {:.0} µs off = {:+.1}% (goal <= +10%); p50 {:+.1}% | n={}",
        mir[0].p(99),
        mir[1].p(99),
        (mir[0].p(99) / mir[1].p(99) - 1.0) * 100.0,
        (mir[0].p(50) / mir[1].p(50) - 1.0) * 100.0,
        mir[0].lat.len()
    );
    Ok(())
}
