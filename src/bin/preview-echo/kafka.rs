//! preview-echo's Kafka modes. The consumer reads `KAFKA_TOPIC` as group
//! `KAFKA_GROUP`, logs each record, and records it in `KAFKA_RECORD_TOPIC`
//! when set (key: the record's `id` header, value: who consumed it: the
//! pod's `PREVIEW_KEY`, or `staging`). `send` produces records with an `id`
//! header and the headers given (the demo's producer). Consume and record are one transaction with
//! the offsets, so what it records is what it consumed, exactly once, across
//! restarts and rebalances; a test reads the record topic back. It starts
//! from the latest offset when its group has none, as many services do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

pub struct Settings {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub record_to: String,
    pub by: String,
    pub pod: String,
}

struct Ctx(AtomicBool);
impl ClientContext for Ctx {}
impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Set on SIGTERM: the consumer leaves its group (as a well-behaved
/// service does), so its partitions move on at once.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Runs until [`STOP`] (a thread); a failed session is logged and started again.
pub fn run(s: Settings) {
    while !STOP.load(Ordering::SeqCst) {
        if let Err(e) = session(&s) {
            eprintln!("preview-echo: kafka: {e}; starting again");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

fn session(s: &Settings) -> anyhow::Result<()> {
    let consumer: BaseConsumer<Ctx> = ClientConfig::new()
        .set("bootstrap.servers", &s.brokers)
        .set("group.id", &s.group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "latest")
        .create_with_context(Ctx(AtomicBool::new(false)))?;
    consumer.subscribe(&[&s.topic])?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.brokers)
        .set("transactional.id", format!("echo-{}", s.pod))
        // A pod killed mid-transaction holds its offsets this long at most.
        .set("transaction.timeout.ms", "10000")
        .set("enable.idempotence", "true")
        .create()?;
    producer.init_transactions(TIMEOUT)?;
    eprintln!("preview-echo: consuming {} as {} (group {})", s.topic, s.by, s.group);
    while !STOP.load(Ordering::SeqCst) {
        // A rebalance served by a poll makes what came before it stale
        // (eager assignment restarts every partition at its committed offset).
        let rebalanced = || consumer.context().0.swap(false, Ordering::SeqCst);
        let mut batch = Vec::new();
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            rebalanced();
            batch.push(m?);
            let until = Instant::now() + Duration::from_millis(10);
            while batch.len() < 500 && Instant::now() < until {
                match consumer.poll(Duration::ZERO) {
                    Some(m) => {
                        if rebalanced() {
                            batch.clear();
                        }
                        batch.push(m?)
                    }
                    None => break,
                }
            }
        }
        if rebalanced() || batch.is_empty() {
            continue;
        }
        producer.begin_transaction()?;
        let done = (|| -> anyhow::Result<()> {
            let mut offsets = TopicPartitionList::new();
            for m in &batch {
                let id = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "id").and_then(|h| h.value))
                    .unwrap_or_default();
                eprintln!("consumed id={} from {} as {}", String::from_utf8_lossy(id), s.topic, s.by);
                if !s.record_to.is_empty() {
                    let rec = BaseRecord::<[u8], [u8]>::to(&s.record_to).key(id).payload(s.by.as_bytes());
                    producer.send(rec).map_err(|(e, _)| e)?;
                }
                offsets.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))?;
            }
            let meta = consumer.group_metadata().ok_or_else(|| anyhow::anyhow!("no group metadata"))?;
            producer.send_offsets_to_transaction(&offsets, &meta, TIMEOUT)?;
            // The library's commit: rdkafka's own costs 100 ms a transaction.
            preview::previewd::queues::kafka::commit(&producer, TIMEOUT)?;
            Ok(())
        })();
        if let Err(e) = done {
            let _ = producer.abort_transaction(TIMEOUT);
            return Err(e);
        }
    }
    // Dropping the consumer closes it: it leaves the group.
    Ok(())
}

/// Sends `count` records to `topic` (made with 3 partitions if missing),
/// ids `first..first+count` in an `id` header, with `headers` besides.
pub async fn send(
    brokers: &str,
    topic: &str,
    headers: &[(String, String)],
    first: u64,
    count: u64,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::message::{Header, OwnedHeaders};
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = cfg.create()?;
    let new = NewTopic::new(topic, 3, TopicReplication::Fixed(-1));
    for r in admin.create_topics([&new], &AdminOptions::new()).await? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, e)) => anyhow::bail!("creating topic {t}: {e}"),
        }
    }
    let producer: BaseProducer = cfg.create()?;
    for id in first..first + count {
        let id = id.to_string();
        let mut h = OwnedHeaders::new().insert(Header { key: "id", value: Some(id.as_str()) });
        for (k, v) in headers {
            h = h.insert(Header { key: k, value: Some(v.as_str()) });
        }
        producer.send(BaseRecord::<str, str>::to(topic).key(&id).payload("order").headers(h)).map_err(|(e, _)| e)?;
    }
    producer.flush(TIMEOUT)?;
    Ok(())
}
