//! Agent benchmark (`make bench-agent`; ignored by `cargo test`). One run, in
//! network namespaces, measures the same app process through several paths:
//!
//! - direct: a port of the app the agent does not intercept (:8081);
//! - agent: the intercepted port (:8080), unkeyed requests passed through;
//! - floor: a byte relay (nginx's stream module, parsing nothing) behind the
//!   same kind of nat REDIRECT as the agent (:8084 → :8083 → the app), what
//!   any interception costs on this machine;
//! - nginx: nginx routing on the same header (:8082), the bar for throughput;
//! - steal: keyed requests through the agent to the preview pod (v2).
//!
//! Then h2c, 64 KiB bodies and a new connection per request (agent against
//! direct), the original's p99 with mirroring on and off at 5k rps, and 1,
//! 100 and 1000 environments on the target.
//!
//! Load is open loop in wrk2's sense: each connection has a schedule of
//! intended send times, and a request the previous answer held back is timed
//! from its intended time, so a stall counts against every request it
//! delayed (no coordinated omission); see `drive`.
//! Every answer's status is checked; failures are counted and printed.
//! The machine's noise drifts over seconds, so paths are measured in
//! interleaved rounds, order rotating. Bounded: every round runs a fixed
//! time at a fixed rate (or closed loop), against our namespaces only.
//!
//! The last line is the summary:
//! `agent: p99 added X.XX x floor at 1k rps, throughput Y.YY x nginx, steal p99 Z.ZZ x passthrough, rss N MiB, 1000 envs W.WW x 1 env`

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use common::netns::{Net, POD, sh};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::time::Instant;

/// Rounds per measurement and the time each path runs in a round: 3 s per
/// path in all, 3 000 samples at 1k rps.
const ROUNDS: u32 = 6;
const ROUND: Duration = Duration::from_millis(500);
const TICKS_PER_S: f64 = 100.0; // USER_HZ

fn route(key: &str, mode: &str, dest: &str) -> serde_json::Value {
    serde_json::json!({"key": key, "mode": mode, "filter": {"key": key}, "destination": dest})
}

/// What each request of a phase is.
#[derive(Clone)]
struct Req {
    key: Option<String>,
    body: Bytes,
    proto: Proto,
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    /// HTTP/1.1 on a kept-alive connection.
    H1,
    /// h2c with prior knowledge (gRPC's transport).
    H2,
    /// HTTP/1.1, a new connection per request (connect included).
    Fresh,
}

impl Req {
    fn get(key: Option<&str>) -> Req {
        Req { key: key.map(String::from), body: Bytes::new(), proto: Proto::H1 }
    }

    fn build(&self) -> Result<http::Request<Full<Bytes>>> {
        let method = if self.body.is_empty() { "GET" } else { "POST" };
        let mut b = http::Request::builder().method(method).uri("/b");
        if self.proto == Proto::H2 {
            b = b.uri(format!("http://{POD}/b"));
        } else {
            b = b.header("host", POD);
        }
        if self.proto == Proto::Fresh {
            b = b.header("connection", "close");
        }
        if let Some(k) = &self.key {
            b = b.header("baggage", format!("preview-key={k}"));
        }
        Ok(b.body(Full::new(self.body.clone()))?)
    }
}

/// One client connection (none for `Fresh`: each request makes its own).
enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Fresh,
}

async fn h1(addr: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(c);
    Ok(send)
}

impl Client {
    async fn open(addr: SocketAddr, proto: Proto) -> Result<Client> {
        Ok(match proto {
            Proto::H1 => Client::H1(h1(addr).await?),
            Proto::H2 => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let (send, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await?;
                tokio::spawn(c);
                Client::H2(send)
            }
            Proto::Fresh => Client::Fresh,
        })
    }

    /// Sends `req` and reads the whole answer; its status.
    async fn one(&mut self, addr: SocketAddr, req: &Req) -> Result<http::StatusCode> {
        let r = req.build()?;
        let resp = match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(r).await?
            }
            Client::H2(s) => {
                s.ready().await?;
                s.send_request(r).await?
            }
            Client::Fresh => h1(addr).await?.send_request(r).await?,
        };
        let status = resp.status();
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// What one connection gave in one round.
#[derive(Default)]
struct Run {
    lat: Vec<Duration>,
    failed: u64,
}

/// Load on one connection for `time`: at `interval` between intended sends
/// (open loop), or back to back (closed). A request the previous answer held
/// back past its intended time is timed from that time (no coordinated
/// omission); one that only our timer (1 ms granularity) sent late is timed
/// from its actual send, so the timer's jitter is not charged to the path.
async fn drive(
    addr: SocketAddr,
    mut c: Client,
    req: Req,
    interval: Option<Duration>,
    time: Duration,
) -> Result<(Client, Run)> {
    let start = Instant::now();
    let end = start + time;
    let mut run = Run::default();
    let mut prev_done = start;
    for k in 0u32.. {
        let intended = match interval {
            Some(iv) => start + iv * k,
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        tokio::time::sleep_until(intended).await;
        let from = if prev_done > intended { intended } else { Instant::now() };
        let result = c.one(addr, &req).await;
        prev_done = Instant::now();
        match result {
            Ok(s) if s.is_success() => run.lat.push(prev_done - from),
            Ok(_) => run.failed += 1,
            Err(_) => {
                run.failed += 1;
                c = Client::open(addr, req.proto).await?;
            }
        }
    }
    Ok((c, run))
}

/// One path under test: where to send, what, and the process whose CPU it
/// costs (if any).
struct Path {
    name: &'static str,
    addr: SocketAddr,
    req: Req,
    pid: Option<String>,
}

impl Path {
    fn new(name: &'static str, addr: SocketAddr, req: Req) -> Path {
        Path { name, addr, req, pid: None }
    }
}

/// What a path gave over all rounds.
#[derive(Default)]
struct Sample {
    lat: Vec<Duration>,
    failed: u64,
    cpu_ticks: u64,
    secs: f64,
}

impl Sample {
    /// Percentile in µs.
    fn p(&self, pct: usize) -> f64 {
        let v = &self.lat;
        if v.is_empty() {
            return f64::NAN;
        }
        v[(v.len() * pct / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    }
    fn rps(&self) -> f64 {
        self.lat.len() as f64 / self.secs
    }
    /// CPU ms per second of load, scaled to 1k rps.
    fn cpu_per_1k(&self) -> f64 {
        self.cpu_ticks as f64 / TICKS_PER_S * 1000.0 / self.secs / (self.rps() / 1000.0)
    }
    fn line(&self, name: &str, base: Option<&Sample>) -> String {
        let added = base.map_or(String::new(), |b| {
            format!(" (added p50 {:+.0} µs, p99 {:+.0} µs)", self.p(50) - b.p(50), self.p(99) - b.p(99))
        });
        format!(
            "  {name:<8} p50 {:>6.0} µs p99 {:>6.0} µs{added} | {} ok, {} failed",
            self.p(50),
            self.p(99),
            self.lat.len(),
            self.failed
        )
    }
}

/// Load per path: `rps` over `conns` connections, or closed loop on `conns`.
#[derive(Clone, Copy)]
struct Load {
    rps: Option<u64>,
    conns: usize,
}

/// Runs every path for [`ROUND`], `rounds` times, rotating the order so
/// that no path always follows another. Connections stay open across rounds.
async fn interleaved(paths: &[Path], load: Load, rounds: u32) -> Result<Vec<Sample>> {
    let interval = load.rps.map(|r| Duration::from_nanos(1_000_000_000 * load.conns as u64 / r));
    let mut out: Vec<Sample> = paths.iter().map(|_| Sample::default()).collect();
    let mut clients: Vec<Vec<Client>> = Vec::new();
    for p in paths {
        let mut cs = Vec::new();
        for _ in 0..load.conns {
            let mut c = Client::open(p.addr, p.req.proto).await?;
            // One request first: rounds measure steady state, not setup.
            c.one(p.addr, &p.req).await.with_context(|| format!("{}: first request", p.name))?;
            cs.push(c);
        }
        clients.push(cs);
    }
    for round in 0..rounds as usize {
        for i in 0..paths.len() {
            let idx = (i + round) % paths.len();
            let path = &paths[idx];
            let cpu0 = path.pid.as_deref().map(proc_stat).transpose()?.map_or(0, |s| s.0);
            let t = Instant::now();
            let tasks: Vec<_> = std::mem::take(&mut clients[idx])
                .into_iter()
                .map(|c| tokio::spawn(drive(path.addr, c, path.req.clone(), interval, ROUND)))
                .collect();
            let s = &mut out[idx];
            for task in tasks {
                let (c, run) = task.await??;
                clients[idx].push(c);
                s.lat.extend(run.lat);
                s.failed += run.failed;
            }
            s.secs += t.elapsed().as_secs_f64();
            let cpu1 = path.pid.as_deref().map(proc_stat).transpose()?.map_or(0, |s| s.0);
            s.cpu_ticks += cpu1 - cpu0;
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

/// Waits, bounded, until a request keyed `key` through the agent gets the
/// preview's answer: the agent has that route set.
async fn routed(addr: SocketAddr, key: &str) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let req = http::Request::get("/")
            .header("host", POD)
            .header("baggage", format!("preview-key={key}"))
            .body(Full::new(Bytes::new()))?;
        if let Ok(mut s) = h1(addr).await
            && let Ok(resp) = s.send_request(req).await
            && resp.into_body().collect().await?.to_bytes().windows(4).any(|w| w == b"\"v2\"")
        {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < end, "the agent never routed {key}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` environments on the target, each a steal route of its own key; the
/// probe key is `e{n}-0`.
fn envs(n: usize) -> serde_json::Value {
    let mut routes: Vec<serde_json::Value> =
        (0..n).map(|i| route(&format!("e{n}-{i}"), "steal", "198.18.101.2")).collect();
    routes.push(route("bench", "steal", "198.18.101.2"));
    routes.push(route("m", "mirror", "198.18.101.3"));
    serde_json::Value::Array(routes)
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
    // The floor's REDIRECT: the same nat rule the agent installs, to a relay.
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns_p,
        "iptables",
        "-w",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-m",
        "tcp",
        "--dport",
        "8084",
        "-j",
        "REDIRECT",
        "--to-ports",
        "8083",
    ])?;
    net.set_routes(envs(1))?;
    let agent_idx = net.agent()?;
    let agent: SocketAddr = format!("{POD}:8080").parse()?;
    let direct: SocketAddr = format!("{POD}:8081").parse()?;
    let nginx: SocketAddr = format!("{POD}:8082").parse()?;
    let floor: SocketAddr = format!("{POD}:8084").parse()?;
    net.client(move || async move { routed(agent, "bench").await })?;
    let guard = net.procs[agent_idx].id().to_string();
    let worker = sh(&["pgrep", "-P", &guard])?.trim().to_string();
    let nginx_worker = sh(&["pgrep", "-P", &net.procs[nginx_idx].id().to_string()])?.trim().to_string();

    let mut main = vec![
        Path::new("direct", direct, Req::get(None)),
        Path { pid: Some(worker.clone()), ..Path::new("agent", agent, Req::get(None)) },
        Path::new("floor", floor, Req::get(None)),
        Path { pid: Some(nginx_worker.clone()), ..Path::new("nginx", nginx, Req::get(None)) },
        Path::new("steal", agent, Req::get(Some("bench"))),
    ];
    let closed: Vec<Path> = main.drain(..4).collect();
    let steal = main.pop().context("steal path")?;
    let (guard2, worker2) = (guard.clone(), worker.clone());
    let routes_path = net.routes_path();
    let set_routes = move |v: serde_json::Value| -> Result<()> {
        let tmp = routes_path.with_extension("tmp");
        std::fs::write(&tmp, v.to_string())?;
        std::fs::rename(tmp, &routes_path)?;
        Ok(())
    };

    let out = net.client(move || async move {
        let mut rss_max = 0u64;
        let mut rss = || -> Result<u64> {
            let now = proc_stat(&guard2)?.1 + proc_stat(&worker2)?.1;
            rss_max = rss_max.max(now);
            Ok(now)
        };
        let mut paths: Vec<Path> = closed;
        paths.push(steal);
        // p99 at 1k rps is the summary's first figure: twice the samples.
        let at1k = interleaved(&paths, Load { rps: Some(1000), conns: 2 }, 2 * ROUNDS).await?;
        rss()?;
        paths.pop();
        Ok((paths, at1k, rss_max))
    })?;
    let (paths, at1k, rss_max) = out;
    // Each client run is bounded at 90 s: the rest gets its own.
    let (guard2, worker2) = (guard.clone(), worker.clone());
    let out = net.client(move || async move {
        let mut rss_max = rss_max;
        let mut rss = || -> Result<u64> {
            let now = proc_stat(&guard2)?.1 + proc_stat(&worker2)?.1;
            rss_max = rss_max.max(now);
            Ok(now)
        };
        let max = interleaved(&paths, Load { rps: None, conns: 32 }, ROUNDS).await?;
        rss()?;
        let pair =
            |name: &'static str, req: Req| [Path::new("direct", direct, req.clone()), Path::new(name, agent, req)];
        let h2 = interleaved(
            &pair("agent", Req { proto: Proto::H2, ..Req::get(None) }),
            Load { rps: Some(1000), conns: 2 },
            ROUNDS,
        )
        .await?;
        let big = interleaved(
            &pair("agent", Req { body: Bytes::from(vec![b'x'; 64 << 10]), ..Req::get(None) }),
            Load { rps: Some(500), conns: 2 },
            ROUNDS,
        )
        .await?;
        rss()?;
        let fresh = interleaved(
            &pair("agent", Req { proto: Proto::Fresh, ..Req::get(None) }),
            Load { rps: Some(500), conns: 2 },
            ROUNDS,
        )
        .await?;
        // The original's p99 with its copy sent to the preview, and without.
        let mirror = interleaved(
            &[Path::new("on", agent, Req::get(Some("m"))), Path::new("off", agent, Req::get(None))],
            Load { rps: Some(5000), conns: 8 },
            ROUNDS,
        )
        .await?;
        rss()?;
        Ok((max, h2, big, fresh, mirror, rss_max))
    })?;
    let (max, h2, big, fresh, mirror, rss_max) = out;
    // The agent's own counters: copies sent and dropped (past its budget).
    let metrics = sh(&["ip", "netns", "exec", &ns_p, "curl", "-fsS", "http://127.0.0.1:15090/metrics"])?;
    let (guard2, worker2) = (guard.clone(), worker.clone());
    let (by_size, rss_max) = net.client(move || async move {
        let mut rss_max = rss_max;
        let mut rss = || -> Result<u64> {
            let now = proc_stat(&guard2)?.1 + proc_stat(&worker2)?.1;
            rss_max = rss_max.max(now);
            Ok(now)
        };
        let pair =
            |name: &'static str, req: Req| [Path::new("direct", direct, req.clone()), Path::new(name, agent, req)];
        // 1, 100 and 1000 environments on the target, rotating; unkeyed
        // requests (what every staging request pays) against direct.
        let sizes = [1usize, 100, 1000];
        let mut by_size: Vec<Vec<Sample>> = sizes.iter().map(|_| vec![Sample::default(), Sample::default()]).collect();
        for round in 0..2 * ROUNDS as usize {
            for i in 0..sizes.len() {
                let idx = (i + round) % sizes.len();
                set_routes(envs(sizes[idx]))?;
                routed(agent, &format!("e{}-0", sizes[idx])).await?;
                let s = interleaved(&pair("agent", Req::get(None)), Load { rps: Some(1000), conns: 2 }, 1).await?;
                for (acc, got) in by_size[idx].iter_mut().zip(s) {
                    acc.lat.extend(got.lat);
                    acc.failed += got.failed;
                    acc.secs += got.secs;
                }
            }
        }
        for v in &mut by_size {
            for s in v.iter_mut() {
                s.lat.sort();
            }
        }
        rss()?;
        Ok((by_size, rss_max))
    })?;
    let counter = |action: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.contains(&format!("action=\"{action}\"")))
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    };
    let rss_end = proc_stat(&guard)?.1 + proc_stat(&worker)?.1;

    println!(
        "\n== bench-agent: {ROUNDS} interleaved rounds of {ROUND:?} per path; open loop, a held-back request timed from its intended send; client, agent, app and nginx share this machine's 2 cores =="
    );
    let (d, a, f, n, s) = (&at1k[0], &at1k[1], &at1k[2], &at1k[3], &at1k[4]);
    println!("HTTP/1.1 GET, kept alive, 1k rps over 2 connections ({} rounds):", 2 * ROUNDS);
    for (name, x) in [("direct", d), ("agent", a), ("floor", f), ("nginx", n), ("steal", s)] {
        println!("{}", x.line(name, (name != "direct").then_some(d)));
    }
    let agent_added = a.p(99) - d.p(99);
    let floor_added = f.p(99) - d.p(99);
    println!(
        "  agent p99 added {agent_added:.0} µs vs the floor's {floor_added:.0} µs = {:.2}x (goal <= 1.5x); steal p99 {:.2}x passthrough (goal <= 2x)",
        agent_added / floor_added,
        s.p(99) / a.p(99)
    );
    let (md, ma, mf, mn) = (&max[0], &max[1], &max[2], &max[3]);
    println!(
        "max throughput, 32 connections closed loop: direct {:.0} rps | agent {:.0} rps = {:.2}x nginx (goal >= 1.0x) | floor {:.0} rps | nginx {:.0} rps | failed: agent {}, nginx {}",
        md.rps(),
        ma.rps(),
        ma.rps() / mn.rps(),
        mf.rps(),
        mn.rps(),
        ma.failed,
        mn.failed
    );
    println!(
        "CPU per 1k rps: agent {:.0} ms/s, nginx {:.0} ms/s at 1k rps; agent {:.0} ms/s, nginx {:.0} ms/s closed loop",
        a.cpu_per_1k(),
        n.cpu_per_1k(),
        ma.cpu_per_1k(),
        mn.cpu_per_1k()
    );
    for (what, v) in [
        ("h2c GET, 1k rps, 2 connections", &h2),
        ("HTTP/1.1 POST 64 KiB, 500 rps, 2 connections", &big),
        ("HTTP/1.1 GET, a new connection per request, 500 rps", &fresh),
    ] {
        println!("{what}:");
        println!("{}", v[0].line("direct", None));
        println!("{}", v[1].line("agent", Some(&v[0])));
    }
    let (on, off) = (&mirror[0], &mirror[1]);
    println!(
        "mirror, 5k rps over 8 connections: original p99 {:.0} µs with a copy to the preview, {:.0} µs without = {:+.1}% (goal <= +10%); p50 {:+.1}% | failed: {} on, {} off | n={}",
        on.p(99),
        off.p(99),
        (on.p(99) / off.p(99) - 1.0) * 100.0,
        (on.p(50) / off.p(50) - 1.0) * 100.0,
        on.failed,
        off.failed,
        on.lat.len()
    );
    println!(
        "  mirror: {} requests mirrored, {} of their copies dropped (16 in flight or 16 MiB taken), {} failed",
        counter("mirrored"),
        counter("mirror_dropped"),
        counter("mirror_failed")
    );
    println!("environments on the target, unkeyed GET at 1k rps ({} rotating rounds each):", 2 * ROUNDS);
    let added = |v: &Vec<Sample>| v[1].p(50) - v[0].p(50);
    for (size, v) in [1usize, 100, 1000].iter().zip(&by_size) {
        println!(
            "  {size:>4} envs: agent p50 added {:+.0} µs, p99 added {:+.0} µs | failed {}",
            added(v),
            v[1].p(99) - v[0].p(99),
            v[1].failed
        );
    }
    let envs_ratio = added(&by_size[2]) / added(&by_size[0]);
    println!(
        "agent RSS (guard + worker): {:.1} MiB at the end, {:.1} MiB at most between phases (goal <= 12 MiB)",
        rss_end as f64 / 1024.0,
        rss_max as f64 / 1024.0
    );
    let failed: u64 =
        [&at1k, &max, &h2, &big, &fresh, &mirror].iter().flat_map(|v| v.iter()).map(|s| s.failed).sum::<u64>()
            + by_size.iter().flatten().map(|s| s.failed).sum::<u64>();
    println!("failed requests in all: {failed}");
    println!(
        "agent: p99 added {:.2} x floor at 1k rps, throughput {:.2} x nginx, steal p99 {:.2} x passthrough, rss {:.0} MiB, 1000 envs {:.2} x 1 env",
        agent_added / floor_added,
        ma.rps() / mn.rps(),
        s.p(99) / a.p(99),
        rss_max.max(rss_end) as f64 / 1024.0,
        envs_ratio
    );
    Ok(())
}
