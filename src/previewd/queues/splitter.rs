//! One split's splitter: a thread (librdkafka's calls block) that consumes
//! the original topic as the target's consumer group and forwards each
//! record, key, headers, timestamp and partition kept, to the environment
//! whose filter matches it, or else to staging's temporary topic.
//!
//! Each batch is one Kafka transaction that also commits the consumed
//! offsets, so every record lands exactly once, across rebalances and a
//! kill -9 (the fixed transactional id fences the dead incarnation). The
//! first transaction that writes to a temporary topic also commits offset 0
//! for the group there when it has none, so a consumer that starts later
//! with `auto.offset.reset=latest` still reads every record.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::QueueError;
use super::kafka::{self, TXN_TIMEOUT, base_config};
use crate::model::queue::{CompiledFilter, QueueMode, QueueType};

/// What a split reads and where unmatched records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitSpec {
    pub queue_type: QueueType,
    /// SQS: a FIFO queue; and its signing region.
    pub fifo: bool,
    pub region: String,
    pub brokers: String,
    pub source: String,
    pub group: String,
    pub staging: String,
    pub partitions: i32,
    pub transactional_id: String,
}

/// One environment's share of a split.
#[derive(Debug, Clone)]
pub struct Route {
    pub key: String,
    pub topic: String,
    pub filter: CompiledFilter,
    pub mode: QueueMode,
}

/// Where a message with `headers` goes: the first route whose filter
/// matches it, or staging; and whether staging gets a copy too (mirror).
pub fn route_for<'a>(routes: &'a [Route], staging: &'a str, headers: &[(&str, &[u8])]) -> (&'a str, bool) {
    match routes.iter().find(|r| r.filter.matches(headers)) {
        Some(r) => (r.topic.as_str(), r.mode == QueueMode::Mirror),
        None => (staging, false),
    }
}

/// The most records in one transaction (librdkafka holds each until it is
/// acknowledged, so this bounds a split's memory too), and the longest a
/// batch waits to fill.
const MAX_BATCH: usize = 1000;
const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// How much a split's consumer fetches ahead, in KiB (librdkafka's default
/// is 64 MiB per consumer, and fetch.max.bytes follows it): one split costs
/// previewd little memory. The bench's floor takes the same.
pub const FETCH_AHEAD_KIB: u32 = 1024;

#[derive(Default)]
struct Control {
    routes: Vec<Route>,
    version: u64,
    stop: bool,
}

/// What a splitter has done, for Status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records forwarded, by destination topic.
    pub forwarded: Mutex<HashMap<String, u64>>,
    pub last_error: Mutex<Option<String>>,
}

impl Stats {
    pub fn add(&self, destination: &str, n: u64) {
        *self.forwarded.lock().unwrap_or_else(|e| e.into_inner()).entry(destination.to_string()).or_default() += n;
    }

    pub fn failed(&self, e: &QueueError) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }
}

/// A running splitter. Dropping it stops the thread.
pub struct Splitter {
    control: Arc<Mutex<Control>>,
    applied: tokio::sync::watch::Receiver<u64>,
    pub stats: Arc<Stats>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Splitter {
    pub fn start(spec: SplitSpec) -> Splitter {
        let control = Arc::new(Mutex::new(Control::default()));
        let (tx, applied) = tokio::sync::watch::channel(0);
        let stats = Arc::new(Stats::default());
        let (c, s) = (control.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("split-{}", spec.source))
            .spawn(move || run(spec, c, tx, s))
            // Spawning fails only when the OS is out of threads.
            .expect("spawning a splitter thread");
        Splitter { control, applied, stats, thread: Mutex::new(Some(thread)) }
    }

    /// Routes from now on; resolves once a transaction has committed under
    /// them (every record after it is routed so). `None` if it stopped first.
    pub async fn set_routes(&self, routes: Vec<Route>) -> Option<()> {
        let version = {
            let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
            c.version += 1;
            c.routes = routes;
            c.version
        };
        let mut applied = self.applied.clone();
        applied.wait_for(|v| *v >= version).await.ok().map(|_| ())
    }

    /// Stops after the transaction in flight (committed or aborted), and
    /// leaves the group. Blocking: call from `spawn_blocking`.
    pub fn stop(&self) {
        self.control.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Splitter {
    fn drop(&mut self) {
        self.control.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
    }
}

struct Ctx {
    rebalanced: AtomicBool,
    /// Set at the first assignment: the member has a generation.
    joined: AtomicBool,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalanced.store(true, Ordering::SeqCst);
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if matches!(r, Rebalance::Assign(_)) {
            self.joined.store(true, Ordering::SeqCst);
        }
    }
}

fn stopped(control: &Mutex<Control>) -> bool {
    control.lock().unwrap_or_else(|e| e.into_inner()).stop
}

fn run(spec: SplitSpec, control: Arc<Mutex<Control>>, applied: tokio::sync::watch::Sender<u64>, stats: Arc<Stats>) {
    let mut backoff = Duration::from_millis(500);
    while !stopped(&control) {
        match session(&spec, &control, &applied, &stats) {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(topic = %spec.source, error = %e, "splitter restarting");
                stats.failed(&e);
                // Waits in steps so that a stop is seen at once.
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stopped(&control) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One consumer and one producer, until stopped (Ok) or an error that is
/// not abortable (the caller starts a new session, which resumes from the
/// committed offsets).
fn session(
    spec: &SplitSpec,
    control: &Mutex<Control>,
    applied: &tokio::sync::watch::Sender<u64>,
    stats: &Stats,
) -> Result<(), QueueError> {
    let kafka = |action: &str| {
        let action = action.to_string();
        move |source| QueueError::Kafka { action, source }
    };
    let consumer: BaseConsumer<Ctx> = base_config(&spec.brokers)
        .set("client.id", kafka::SPLITTER_CLIENT_ID)
        .set("group.id", &spec.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        // A group that never committed on the original topic: read all of it
        // rather than skip what staging has not read.
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", FETCH_AHEAD_KIB.to_string())
        // Fetch again as soon as the queue drains below it (librdkafka's
        // default waits a second, which starves the loop).
        .set("fetch.queue.backoff.ms", "1")
        .set("fetch.wait.max.ms", "10")
        .create_with_context(Ctx { rebalanced: AtomicBool::new(false), joined: AtomicBool::new(false) })
        .map_err(kafka("making the splitter's consumer"))?;
    consumer.subscribe(&[&spec.source]).map_err(kafka("subscribing"))?;
    // Two producers, in turn. After a commit the broker still writes the
    // transaction's markers, and until they are written the same
    // transactional id's next transaction is refused (librdkafka then waits
    // a fixed 20 ms). The other producer's last markers were written a
    // transaction ago. Transactions stay one at a time, so records keep
    // their order, and the group keeps the offsets committed last (the
    // coordinator keeps the later commit record, whatever order the two
    // ids' markers land in). The first id is the split's own, so an upgrade
    // fences the single producer of before.
    let new_producer = |id: &str| -> Result<BaseProducer, QueueError> {
        let p: BaseProducer =
            kafka::transactional(&spec.brokers, id).create().map_err(kafka("making the splitter's producer"))?;
        p.init_transactions(TXN_TIMEOUT).map_err(kafka("starting transactions"))?;
        Ok(p)
    };
    let producers = [new_producer(&spec.transactional_id)?, new_producer(&format!("{}.b", spec.transactional_id))?];
    let mut turn = 0;
    // Topics whose offset-0 commit is done (or not needed) in this session.
    let mut initialized: HashSet<String> = HashSet::new();
    let mut version = u64::MAX;
    let mut acked = u64::MAX;
    let mut routes: Vec<Route> = Vec::new();
    loop {
        {
            let c = control.lock().unwrap_or_else(|e| e.into_inner());
            if c.stop {
                return Ok(());
            }
            if c.version != version {
                routes = c.routes.clone();
                version = c.version;
            }
        }
        // Offsets are committed as a member of the group: until the first
        // assignment there is no generation to commit under.
        let joined = consumer.context().joined.load(Ordering::SeqCst);
        let pending: Vec<&str> = std::iter::once(spec.staging.as_str())
            .chain(routes.iter().map(|r| r.topic.as_str()))
            .filter(|t| !initialized.contains(*t))
            .collect();
        let housekeeping = joined && (acked != version || !pending.is_empty());

        // A rebalance is served inside poll(): what came before it is from
        // the old assignment (eager: every partition restarts from its
        // committed offset), so it is dropped; what a poll returns after
        // serving it is from the new one.
        let rebalanced = || consumer.context().rebalanced.swap(false, Ordering::SeqCst);
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::new();
        let wait = Duration::from_millis(if housekeeping { 0 } else { 100 });
        if let Some(first) = consumer.poll(wait) {
            rebalanced();
            batch.push(first.map_err(kafka("consuming"))?);
            let until = Instant::now() + BATCH_WINDOW;
            while batch.len() < MAX_BATCH && Instant::now() < until {
                match consumer.poll(Duration::ZERO) {
                    Some(m) => {
                        if rebalanced() {
                            batch.clear();
                        }
                        batch.push(m.map_err(kafka("consuming"))?);
                    }
                    None => break,
                }
            }
        }
        if rebalanced() {
            batch.clear();
        }
        if batch.is_empty() && !housekeeping {
            continue;
        }

        // Offset 0 for the group on temporary topics that have none yet,
        // committed with (or before) the first record that goes there. Read
        // without waiting for stable offsets: the consumers' own commits on
        // a topic only follow records, and records only follow this commit.
        let mut init = Vec::new();
        if joined {
            for t in &pending {
                for (p, at) in
                    kafka::committed(&spec.brokers, &spec.group, t, spec.partitions, false)?.into_iter().enumerate()
                {
                    if at.is_none() {
                        init.push((t.to_string(), p as i32));
                    }
                }
            }
        }
        // Where each partition of the batch starts, to go back to if the
        // transaction is aborted.
        let mut firsts: HashMap<i32, i64> = HashMap::new();
        for m in &batch {
            let f = firsts.entry(m.partition()).or_insert(m.offset());
            *f = (*f).min(m.offset());
        }

        let producer = &producers[turn];
        turn = 1 - turn;
        producer.begin_transaction().map_err(kafka("beginning a transaction"))?;
        let result = (|| {
            let mut next: HashMap<i32, i64> = HashMap::new();
            let mut counts: HashMap<&str, u64> = HashMap::new();
            for m in &batch {
                let names: Vec<(&str, &[u8])> = m
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key, h.value.unwrap_or_default())).collect())
                    .unwrap_or_default();
                let (first, also_staging) = route_for(&routes, &spec.staging, &names);
                kafka::forward(producer, m, first, m.partition())?;
                *counts.entry(first).or_default() += 1;
                if also_staging {
                    kafka::forward(producer, m, &spec.staging, m.partition())?;
                    *counts.entry(spec.staging.as_str()).or_default() += 1;
                }
                next.insert(m.partition(), m.offset() + 1);
            }
            let mut offsets = TopicPartitionList::new();
            for (p, o) in &next {
                offsets.add_partition_offset(&spec.source, *p, Offset::Offset(*o)).map_err(kafka("offsets"))?;
            }
            for (t, p) in &init {
                offsets.add_partition_offset(t, *p, Offset::Offset(0)).map_err(kafka("offsets"))?;
            }
            // The generation now: a rebalance since fences this commit.
            let meta = consumer.group_metadata().ok_or_else(|| QueueError::Kafka {
                action: "reading the group's generation".into(),
                source: KafkaError::NoMessageReceived,
            })?;
            if offsets.count() > 0 {
                producer
                    .send_offsets_to_transaction(&offsets, &meta, TXN_TIMEOUT)
                    .map_err(kafka("committing offsets"))?;
            }
            kafka::commit(producer, TXN_TIMEOUT).map_err(kafka("committing a transaction"))?;
            Ok::<_, QueueError>(counts)
        })();
        match result {
            Ok(counts) => {
                for (t, n) in counts {
                    stats.add(t, n);
                }
                if joined {
                    initialized.extend(pending.iter().map(|t| t.to_string()));
                    acked = version;
                    applied.send_replace(version);
                }
            }
            Err(e) => {
                // An abortable error (a rebalance fenced the commit, say):
                // abort, go back to the batch's start, and carry on in this
                // session; anything else starts a new one.
                let abortable = matches!(&e, QueueError::Kafka { source: KafkaError::Transaction(r), .. } if r.txn_requires_abort())
                    || matches!(&e, QueueError::Kafka { source: KafkaError::MessageProduction(_), .. });
                if !abortable || kafka::abort(producer, TXN_TIMEOUT).is_err() {
                    let _ = kafka::abort(producer, TXN_TIMEOUT);
                    return Err(e);
                }
                for (p, o) in &firsts {
                    consumer
                        .seek(&spec.source, *p, Offset::Offset(*o), Duration::from_secs(5))
                        .map_err(kafka("going back after an aborted transaction"))?;
                }
                tracing::debug!(topic = %spec.source, error = %e, "transaction aborted; the batch is read again");
                stats.failed(&e);
                // Whatever fenced it settles at the next poll.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
