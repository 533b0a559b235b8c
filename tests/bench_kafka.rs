//! `make bench-kafka` (ignored by `cargo test`): previewd's Kafka splitter
//! against the floor, in one run, on the real broker (deploy/local/kafka.sh).
//! The splitter runs in this process as it runs in previewd (the library's
//! `Splitter`, one thread, transactions), with one environment route.
//!
//! - Throughput: 50 000 records of 1 KiB. The floor is a plain rdkafka
//!   consume→produce copy loop (no transactions) over the same records;
//!   3 rounds, the order flipped each round; the ratio is the median of the
//!   rounds' splitter rate over floor rate. The splitter's clock starts
//!   once it has joined the target's group (see `split_run`); the floor
//!   assigns its partitions and joins nothing.
//! - Latency: 30 s at 1k records/s, each stamped with its send time, after
//!   a 2 s lead-in at the same rate that is not counted and that both
//!   readers have had. The baseline consumer reads the original topic; the
//!   other reads what the splitter forwarded (read_committed: a record
//!   counts once its transaction commits). p99 added is the difference of
//!   the two p99s. The slowest records come in bursts, one per pause of the
//!   broker (its young collections, about two a second here), so 30 s
//!   rather than 10: 10 s held some 20 bursts, and where they fell moved a
//!   run's p99 by several ms.
//! - Memory: this process's RSS before 4 more splitters and after each has
//!   forwarded 20 000 records of 1 KiB; the added RSS per split.
//!
//! The last line is `kafka: throughput X.XX x floor, p99 added N ms at 1k/s, rss +M MiB`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use preview::model::queue::{MessageFilter, QueueMode};
use preview::previewd::queues::{FETCH_AHEAD_KIB, Route, SplitSpec, Splitter, kafka};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const BROKERS: &str = "198.18.255.254:9092";
const PARTS: i32 = 3;
const TP_RECORDS: u64 = 50_000;
const ROUNDS: usize = 3;
const RATE: u64 = 1_000;
const LAT_SECONDS: u64 = 30;
/// Records at the same rate before the timed ones, not counted.
const LEAD_IN_SECONDS: u64 = 2;
const RSS_SPLITS: usize = 4;
const RSS_RECORDS: u64 = 20_000;

fn cfg() -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", BROKERS);
    c
}

fn run_id() -> String {
    format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()))
}

async fn create(topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = cfg().create()?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, PARTS, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(new.iter(), &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

async fn delete(topics: &[String]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = cfg().create()?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    admin.delete_topics(&names, &AdminOptions::new()).await?;
    Ok(())
}

/// `n` records of 1 KiB, keyed, a quarter of them with k1's key header.
fn fill(topic: &str, n: u64) -> Result<()> {
    let p: BaseProducer = cfg().set("linger.ms", "5").create()?;
    let payload = vec![b'x'; 1024];
    for i in 0..n {
        let key = format!("customer-{}", i % 97);
        let mut h = OwnedHeaders::new();
        if i % 4 == 0 {
            h = h.insert(Header { key: "x-preview-key", value: Some("k1") });
        }
        let rec = BaseRecord::<[u8], [u8]>::to(topic).key(key.as_bytes()).payload(&payload).headers(h);
        kafka::send(&p, rec)?;
    }
    p.flush(Duration::from_secs(60))?;
    Ok(())
}

/// The floor: consume `src` from the beginning and produce each record to
/// `dst` (same partition), no transactions, until `n` are acknowledged.
fn copy_loop(src: &str, dst: &str, n: u64) -> Result<Duration> {
    let c: BaseConsumer = cfg()
        .set("group.id", format!("bench-floor-{}", run_id()))
        .set("enable.auto.commit", "false")
        // The splitter's consumer tuning, so that only the transactions differ.
        .set("queued.max.messages.kbytes", FETCH_AHEAD_KIB.to_string())
        .set("fetch.queue.backoff.ms", "1")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTS {
        tpl.add_partition_offset(src, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    // The splitter's linger too.
    let p: BaseProducer = cfg().set("linger.ms", "1").create()?;
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let Some(m) = c.poll(Duration::from_secs(10)) else { anyhow::bail!("the floor loop starved at {done}") };
        let m = m?;
        let mut rec = BaseRecord::<[u8], [u8]>::to(dst).partition(m.partition());
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if let Some(v) = m.payload() {
            rec = rec.payload(v);
        }
        kafka::send(&p, rec)?;
        p.poll(Duration::ZERO);
        done += 1;
    }
    p.flush(Duration::from_secs(60))?;
    Ok(start.elapsed())
}

fn spec(src: &str, staging: &str, id: &str) -> SplitSpec {
    SplitSpec {
        queue_type: preview::model::queue::QueueType::Kafka,
        fifo: false,
        region: String::new(),
        brokers: BROKERS.into(),
        source: src.into(),
        group: format!("bench-split-{id}"),
        staging: staging.into(),
        partitions: PARTS,
        transactional_id: format!("bench-split-{id}"),
    }
}

fn route(env_topic: &str) -> Result<Route> {
    let filter = MessageFilter::Key("k1".into()).compile().map_err(anyhow::Error::msg)?;
    Ok(Route { key: "k1".into(), topic: env_topic.into(), filter, mode: QueueMode::Steal })
}

fn forwarded(s: &Splitter) -> u64 {
    s.stats.forwarded.lock().map(|f| f.values().sum()).unwrap_or(0)
}

/// Starts a splitter and waits until it has forwarded `n` records. The
/// clock starts once it has joined the group and committed under its routes
/// (`set_routes` resolves then): the join is a start-up cost, paid once per
/// split, not throughput. Returns how many records it forwarded after that,
/// and in how long.
async fn split_run(src: &str, staging: &str, env: &str, n: u64) -> Result<((u64, Duration), Splitter)> {
    let id = run_id();
    let s = Splitter::start(spec(src, staging, &id));
    tokio::time::timeout(Duration::from_secs(60), s.set_routes(vec![route(env)?]))
        .await
        .context("the splitter took its routes")?
        .context("the splitter stopped")?;
    let (start, before) = (Instant::now(), forwarded(&s));
    let deadline = start + Duration::from_secs(300);
    // Polls the splitter's own counter: it moves at each commit.
    while forwarded(&s) < n {
        ensure!(Instant::now() < deadline, "the splitter forwarded {} of {n} in 300 s", forwarded(&s));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(((forwarded(&s) - before, start.elapsed()), s))
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Reads `topic` from the beginning until `n` timed records came, each
/// one's latency from the send time in its payload, in microseconds. The
/// lead-in records (payload `w…`) are only counted in `warm`: they warm the
/// connections, the fetchers and the splitter's transactions, so the
/// figures are the steady state and not the first fetch.
fn latencies(topic: String, n: usize, ready: Arc<AtomicBool>, warm: Arc<AtomicU64>) -> Result<Vec<u64>> {
    let c: BaseConsumer = cfg()
        .set("group.id", format!("bench-lat-{}", run_id()))
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    ready.store(true, Ordering::SeqCst);
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(LEAD_IN_SECONDS + LAT_SECONDS + 2 * 60);
    while out.len() < n {
        ensure!(Instant::now() < deadline, "{topic}: {} of {n} records arrived", out.len());
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            let payload = std::str::from_utf8(m.payload().unwrap_or_default())?;
            if payload.starts_with('w') {
                warm.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let sent: u64 = payload.parse()?;
            out.push(now_us().saturating_sub(sent));
        }
    }
    Ok(out)
}

fn p99(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

#[ignore = "benchmark: make bench-kafka"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_kafka() -> Result<()> {
    let id = run_id();
    let t = |s: &str| format!("bench-{id}-{s}");
    let mut topics = vec![t("src"), t("staging"), t("env")];
    for r in 0..ROUNDS {
        topics.push(t(&format!("floor{r}")));
    }
    create(&topics).await?;
    let src = t("src");

    // Latency at 1k records/s.
    let lat_src = t("lat-src");
    let (lat_staging, lat_env) = (t("lat-staging"), t("lat-env"));
    create(&[lat_src.clone(), lat_staging.clone(), lat_env.clone()]).await?;
    topics.extend([lat_src.clone(), lat_staging.clone(), lat_env.clone()]);
    let (_, splitter) = split_run(&lat_src, &lat_staging, &lat_env, 0).await?;
    let n = (RATE * LAT_SECONDS) as usize;
    let (ra, rb) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (sa, sb) = (lat_src.clone(), lat_staging.clone());
    let (ra2, rb2) = (ra.clone(), rb.clone());
    let (wa, wb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (wa2, wb2) = (wa.clone(), wb.clone());
    let direct = std::thread::spawn(move || latencies(sa, n, ra2, wa2));
    let split = std::thread::spawn(move || latencies(sb, n, rb2, wb2));
    while !(ra.load(Ordering::SeqCst) && rb.load(Ordering::SeqCst)) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ls = lat_src.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let p: BaseProducer = cfg().set("linger.ms", "0").create()?;
        // Open loop: each record at its scheduled time.
        let send = |count: u64, lead: bool| -> Result<()> {
            let start = Instant::now();
            for i in 0..count {
                let due = start + Duration::from_micros(i * 1_000_000 / RATE);
                p.poll(Duration::ZERO);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let stamp = if lead { format!("w{}", now_us()) } else { now_us().to_string() };
                p.send(BaseRecord::<str, str>::to(&ls).key(&format!("c{}", i % 97)).payload(&stamp))
                    .map_err(|(e, _)| e)?;
                p.poll(Duration::ZERO);
            }
            Ok(())
        };
        let lead_in = RATE * LEAD_IN_SECONDS;
        send(lead_in, true)?;
        // The timed records start once both readers have had the whole
        // lead-in, so a slow first fetch or first transaction delays the
        // lead-in and not the figures. (A broker in its first minutes after
        // a start is slow for longer: its first run is not comparable.)
        let until = Instant::now() + Duration::from_secs(60);
        while wa.load(Ordering::SeqCst) < lead_in || wb.load(Ordering::SeqCst) < lead_in {
            ensure!(Instant::now() < until, "the lead-in did not arrive within 60 s");
            p.poll(Duration::ZERO);
            std::thread::sleep(Duration::from_millis(1));
        }
        send(n as u64, false)?;
        p.flush(Duration::from_secs(30))?;
        Ok(())
    })
    .await??;
    let mut d = direct.join().map_err(|_| anyhow::anyhow!("direct reader panicked"))??;
    let mut s = split.join().map_err(|_| anyhow::anyhow!("split reader panicked"))??;
    let (pd, ps) = (p99(&mut d), p99(&mut s));
    println!(
        "latency at {RATE}/s over {LAT_SECONDS} s: direct p50 {} us p99 {pd} us; through the splitter p50 {} us p99 {ps} us",
        d[d.len() / 2],
        s[s.len() / 2]
    );
    let _ = tokio::task::spawn_blocking(move || splitter.stop()).await;
    let added_ms = (ps.saturating_sub(pd)) as f64 / 1000.0;

    // Throughput. Filled after the latency run: the writeback of 50 MB
    // would stall the broker's appends while it is measured.
    println!("filling {src} with {TP_RECORDS} records of 1 KiB");
    let s2 = src.clone();
    tokio::task::spawn_blocking(move || fill(&s2, TP_RECORDS)).await??;
    let mut ratios = Vec::new();
    for r in 0..ROUNDS {
        let floor_dst = t(&format!("floor{r}"));
        let (staging, env) = (t("staging"), t("env"));
        let floor = || {
            let (s, d) = (src.clone(), floor_dst.clone());
            tokio::task::spawn_blocking(move || copy_loop(&s, &d, TP_RECORDS))
        };
        let (f, s) = if r % 2 == 0 {
            let f = floor().await??;
            (f, split_run(&src, &staging, &env, TP_RECORDS).await?)
        } else {
            let s = split_run(&src, &staging, &env, TP_RECORDS).await?;
            (floor().await??, s)
        };
        let ((timed, split_time), splitter) = s;
        let (floor_rate, split_rate) = (TP_RECORDS as f64 / f.as_secs_f64(), timed as f64 / split_time.as_secs_f64());
        let ratio = split_rate / floor_rate;
        println!(
            "round {r}: floor {:.0} ms ({floor_rate:.0} rec/s), splitter {timed} records in {:.0} ms ({split_rate:.0} rec/s), {ratio:.2}x",
            f.as_secs_f64() * 1e3,
            split_time.as_secs_f64() * 1e3,
        );
        ratios.push(ratio);
        let _ = tokio::task::spawn_blocking(move || splitter.stop()).await;
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let ratio = ratios[ROUNDS / 2];

    // Memory per split.
    let before = rss_kib()?;
    let mut running = Vec::new();
    let mut rss_topics = Vec::new();
    for i in 0..RSS_SPLITS {
        let names = [t(&format!("rss{i}-src")), t(&format!("rss{i}-staging")), t(&format!("rss{i}-env"))];
        create(&names).await?;
        let s = names[0].clone();
        tokio::task::spawn_blocking(move || fill(&s, RSS_RECORDS)).await??;
        let (_, splitter) = split_run(&names[0], &names[1], &names[2], RSS_RECORDS).await?;
        running.push(splitter);
        rss_topics.extend(names);
    }
    let after = rss_kib()?;
    let per_split = after.saturating_sub(before) as f64 / RSS_SPLITS as f64 / 1024.0;
    println!("rss: {before} KiB before, {after} KiB with {RSS_SPLITS} more splits");
    for s in running {
        let _ = tokio::task::spawn_blocking(move || s.stop()).await;
    }
    topics.extend(rss_topics);
    delete(&topics).await?;
    println!("kafka: throughput {ratio:.2} x floor, p99 added {added_ms:.1} ms at 1k/s, rss +{per_split:.0} MiB");
    Ok(())
}
