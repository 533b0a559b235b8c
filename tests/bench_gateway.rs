//! `make bench-gateway` (ignored by `cargo test`): what preview-gateway adds
//! in front of a Service, against the same Service reached directly, in the
//! same run. The gateway runs as its Deployment, reached on its NodePort
//! with the share link's Host; directly means the Service's ClusterIP.
//! Both go to the same echo pod (no downstream), from this machine.
//!
//! - Latency: open loop at 1k requests/s over 32 keep-alive connections,
//!   1 s slices alternating direct and gateway (the order flipped every
//!   round), 10 rounds: 10 000 requests each. Each latency is measured from
//!   the request's scheduled time, so a stall counts against whoever stalled.
//!   The p99 added is the median over the rounds of the gateway slice's p99
//!   minus the direct slice's (each 1 000 requests); the p99 over all rounds
//!   is printed too.
//! - Throughput: closed loop, 16 connections, 20 000 requests each way, in
//!   two interleaved halves.
//!
//! The load runs on a thread and runtime of its own, apart from the
//! in-process previewd. The last line is
//! `gateway: p99 added N us at 1k rps, throughput X.XX x direct`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use common::e2e::{V2, cluster_ip, previewd_with};
use common::gateway::{NODE, ShareGateway, status_of};
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use preview::proto;
use tokio::sync::Mutex;

const RATE: u32 = 1000;
const SLICE: Duration = Duration::from_secs(1);
const ROUNDS: usize = 10;
const CONNS: usize = 32;
const TP_REQUESTS: usize = 20_000;
const TP_CONNS: usize = 16;

/// Where requests go, and the Host they carry.
#[derive(Clone)]
struct Path {
    name: &'static str,
    addr: SocketAddr,
    host: String,
}

type Conn = Arc<Mutex<SendRequest<Empty<Bytes>>>>;

async fn conns(p: &Path, n: usize) -> Result<Vec<Conn>> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = tokio::net::TcpStream::connect(p.addr).await?;
        s.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s)).await?;
        tokio::spawn(conn);
        out.push(Arc::new(Mutex::new(send)));
    }
    Ok(out)
}

/// One GET / on `c`, read to the end; fails on a non-200.
async fn get(c: &Conn, host: &str) -> Result<()> {
    let mut send = c.lock().await;
    send.ready().await?;
    let req = http::Request::get("/").header("host", host).body(Empty::new())?;
    let resp = send.send_request(req).await?;
    ensure!(resp.status() == 200, "{}", resp.status());
    resp.into_body().collect().await?;
    Ok(())
}

/// `RATE` requests a second for `SLICE`, round-robin over `pool`; the
/// latency of each from its scheduled start.
async fn open_loop(p: &Path, pool: &[Conn]) -> Result<Vec<Duration>> {
    let n = (RATE as u64 * SLICE.as_secs()) as usize;
    let period = Duration::from_secs(1) / RATE;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (c, host) = (pool[i % pool.len()].clone(), p.host.clone());
        tasks.spawn(async move {
            get(&c, &host).await?;
            anyhow::Ok(at.elapsed())
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        out.push(r??);
    }
    Ok(out)
}

/// `requests` GETs over `pool`, each connection in a loop; requests/s.
async fn closed_loop(p: &Path, pool: &[Conn], requests: usize) -> Result<f64> {
    let per = requests / pool.len();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in pool {
        let (c, host) = (c.clone(), p.host.clone());
        tasks.spawn(async move {
            for _ in 0..per {
                get(&c, &host).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((per * pool.len()) as f64 / t.elapsed().as_secs_f64())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Both measurements, on the calling runtime: the p99 the gateway adds
/// (µs, the median of the paired rounds), and requests/s per path.
async fn measure(paths: [Path; 2]) -> Result<(f64, [f64; 2])> {
    let mut pools = Vec::new();
    for p in &paths {
        let pool = conns(p, CONNS).await?;
        // Warm-up: every connection carries requests before anything counts.
        closed_loop(p, &pool, 2000).await?;
        pools.push(pool);
    }
    println!("bench-gateway: {RATE} rps open loop, {CONNS} connections, {ROUNDS} rounds of {SLICE:?} per path");
    let mut lat: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    // Each round's gateway p99 minus its direct p99, slices side by side: a
    // stall of the machine's other work lands in one round, not in the median.
    let mut paired = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut q99 = [0.0; 2];
        for i in order {
            let mut slice = open_loop(&paths[i], &pools[i]).await?;
            q99[i] = us(pct(&mut slice, 0.99));
            lat[i].extend(slice);
        }
        println!("  round {round}: p99 direct {:.0}us, gateway {:.0}us", q99[0], q99[1]);
        paired.push(q99[1] - q99[0]);
    }
    paired.sort_by(f64::total_cmp);
    let paired_median = (paired[ROUNDS / 2 - 1] + paired[ROUNDS / 2]) / 2.0;
    let mut p99 = [0.0; 2];
    for i in 0..2 {
        let v = &mut lat[i];
        let (p50, p90, q99, max) = (pct(v, 0.50), pct(v, 0.90), pct(v, 0.99), pct(v, 1.0));
        p99[i] = us(q99);
        println!(
            "  {:<8} n={} p50={:.0}us p90={:.0}us p99={:.0}us max={:.0}us",
            paths[i].name,
            v.len(),
            us(p50),
            us(p90),
            us(q99),
            us(max)
        );
    }
    let mut rps = [0.0; 2];
    for _half in 0..2 {
        for i in 0..2 {
            rps[i] += closed_loop(&paths[i], &pools[i][..TP_CONNS], TP_REQUESTS / 2).await? / 2.0;
        }
    }
    for i in 0..2 {
        println!("  {:<8} closed loop, {TP_CONNS} connections: {:.0} requests/s", paths[i].name, rps[i]);
    }
    println!(
        "  p99 added: {:.0}us pooled over all rounds, {paired_median:.0}us median of the {ROUNDS} paired rounds",
        p99[1] - p99[0]
    );
    Ok((paired_median, rps))
}

#[tokio::test]
#[ignore = "benchmark: run with `make bench-gateway`"]
async fn bench_gateway() -> Result<()> {
    let ns = TestNs::new("bench-gw").await?;
    echo_app(&ns, "web", "v1", 1, &[]).await?;
    ready_pods(&ns, "app=web", 1).await?;
    let gw = ShareGateway::service(&ns).await?;
    let domain = gw.domain();
    let p = previewd_with(&ns, |a| a.share_domain = domain.clone()).await?;
    gw.start(&ns, &p.addr).await?;
    let mut c = p.client().await?;
    c.start(start_req(&serde_json::json!({"target": "targetless"}).to_string(), V2, "bench")).await?;
    let share = proto::ShareRequest { key: "bench".into(), service: "web".into(), ..Default::default() };
    let link = c.share(share).await?.into_inner().links.first().context("no link")?.url.clone();
    eventually("the gateway to know the link", Duration::from_secs(30), || async {
        Ok((status_of(gw.port, &link).await? == 200).then_some(()))
    })
    .await?;
    let direct = Path {
        name: "direct",
        addr: format!("{}:8080", cluster_ip(&ns, "web").await?).parse()?,
        host: format!("web.{}.svc:8080", ns.name),
    };
    let via = Path {
        name: "gateway",
        addr: format!("{NODE}:{}", gw.port).parse()?,
        host: link.trim_start_matches("http://").trim_end_matches('/').to_string(),
    };
    let paths = [direct, via];
    // The load runs on its own thread and runtime: previewd (in this test's
    // runtime) never delays a request's send or its timing.
    let (added, rps) = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(measure(paths))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("bench".into())) }).await?;
    p.stop().await?;
    println!("gateway: p99 added {added:.0} us at 1k rps, throughput {:.2} x direct", rps[1] / rps[0]);
    Ok(())
}
