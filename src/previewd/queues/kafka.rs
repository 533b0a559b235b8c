//! What previewd asks of a Kafka cluster, through librdkafka: reach it and
//! read a topic's partitions, make and delete the temporary topics, and
//! drain a temporary topic's unread records into another topic, exactly
//! once (a transaction that also commits the drain's offsets).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::QueueError;

/// How long a broker may take to answer before it counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A transaction call's bound (librdkafka retries within it).
pub const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a drain waits for a consumer's open transaction to end: past
/// the clients' default transaction timeout (60 s), after which the broker
/// aborts it.
pub const DRAIN_STABLE_TIMEOUT: Duration = Duration::from_secs(90);

pub(super) fn base_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("client.id", "previewd")
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("log_level", "4");
    c
}

/// A transactional producer's config: the splitter's and the drain's.
pub(super) fn transactional(brokers: &str, id: &str) -> ClientConfig {
    let mut c = base_config(brokers);
    c.set("transactional.id", id)
        .set("enable.idempotence", "true")
        // A transaction's records go out while its offsets are sent, not
        // after; a batch of thousands still fills whole requests.
        .set("linger.ms", "1")
        // `commit` waits for the producer to hold no record; a success's
        // report would hold its record until it is served.
        .set("delivery.report.only.error", "true")
        // The next transaction's first requests meet CONCURRENT_TRANSACTIONS
        // while the broker still writes the last one's markers (a few ms);
        // librdkafka retries AddOffsetsToTxn after retry.backoff.ms, 100 ms
        // by default (AddPartitionsToTxn after a fixed 20 ms: the splitter
        // takes turns between two producers to meet neither).
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "20");
    c
}

fn kafka(action: impl Into<String>) -> impl FnOnce(KafkaError) -> QueueError {
    let action = action.into();
    move |source| QueueError::Kafka { action, source }
}

/// Reaches the brokers and reads `topic`'s partition count. Blocking.
pub fn probe(brokers: &str, topic: &str) -> Result<i32, QueueError> {
    let consumer: BaseConsumer = base_config(brokers).create().map_err(kafka("making a client"))?;
    let md = consumer.fetch_metadata(Some(topic), PROBE_TIMEOUT).map_err(|e| QueueError::Unavailable {
        kind: "Kafka",
        brokers: brokers.to_string(),
        reason: e.to_string(),
    })?;
    let t = md.topics().iter().find(|t| t.name() == topic);
    match t {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(t.partitions().len() as i32),
        _ => Err(QueueError::TopicMissing { kind: "Kafka", topic: topic.to_string(), brokers: brokers.to_string() }),
    }
}

fn admin(brokers: &str) -> Result<(AdminClient<DefaultClientContext>, AdminOptions), QueueError> {
    let admin = base_config(brokers).create().map_err(kafka("making a client"))?;
    Ok((admin, AdminOptions::new().operation_timeout(Some(TXN_TIMEOUT))))
}

/// An admin call's per-item results: `fine` codes count as done (the
/// calls are idempotent), any other is the error, named by `what` and item.
fn settled(
    results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
    fine: &[RDKafkaErrorCode],
    what: &str,
) -> Result<(), QueueError> {
    for r in results {
        if let Err((item, code)) = r
            && !fine.contains(&code)
        {
            return Err(QueueError::Kafka { action: format!("{what} {item}"), source: KafkaError::AdminOp(code) });
        }
    }
    Ok(())
}

/// Makes each topic with its partition count; one that exists is fine.
pub async fn create_topics(brokers: &str, topics: &[(String, i32)]) -> Result<(), QueueError> {
    let (admin, opts) = admin(brokers)?;
    let new: Vec<NewTopic> = topics.iter().map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(-1))).collect();
    let results = admin.create_topics(new.iter(), &opts).await.map_err(kafka("creating topics"))?;
    settled(results, &[RDKafkaErrorCode::TopicAlreadyExists], "creating topic")
}

/// Deletes topics; one that is already gone is fine.
pub async fn delete_topics(brokers: &str, topics: &[&str]) -> Result<(), QueueError> {
    if topics.is_empty() {
        return Ok(());
    }
    let (admin, opts) = admin(brokers)?;
    let results = admin.delete_topics(topics, &opts).await.map_err(kafka("deleting topics"))?;
    settled(results, &[RDKafkaErrorCode::UnknownTopicOrPartition], "deleting topic")
}

/// Forgets a consumer group's offsets (the drain's own group, once done).
pub async fn delete_group(brokers: &str, group: &str) -> Result<(), QueueError> {
    let (admin, opts) = admin(brokers)?;
    let results = admin.delete_groups(&[group], &opts).await.map_err(kafka("deleting a group"))?;
    settled(results, &[RDKafkaErrorCode::GroupIdNotFound, RDKafkaErrorCode::NonEmptyGroup], "deleting group")
}

/// `group`'s committed offsets on `topic`'s partitions (`None`: none
/// committed). Reading offsets needs no membership. With `stable`, offsets
/// that a transaction is committing are waited for (an OffsetFetch that
/// requires stable offsets), up to `DRAIN_STABLE_TIMEOUT`: a consumer that
/// died with a transaction open holds them until the broker aborts it.
/// Blocking.
pub fn committed(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    stable: bool,
) -> Result<Vec<Option<i64>>, QueueError> {
    let mut cfg = base_config(brokers);
    cfg.set("group.id", group).set("enable.auto.commit", "false");
    if stable {
        // librdkafka asks for stable offsets when it reads committed data only.
        cfg.set("isolation.level", "read_committed");
    }
    let consumer: BaseConsumer = cfg.create().map_err(kafka("making a client"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let timeout = if stable { DRAIN_STABLE_TIMEOUT } else { TXN_TIMEOUT };
    let got = consumer.committed_offsets(tpl, timeout).map_err(kafka(format!("reading {group}'s offsets")))?;
    Ok((0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}

/// The client id of previewd's splitters, told apart from the target's
/// consumers in the group.
pub const SPLITTER_CLIENT_ID: &str = "preview-splitter";

/// How many members of `group` (splitters aside) subscribe to `topic`. A
/// consumer killed without leaving stays a member until its session times
/// out, so this is what says that nobody reads a topic any more; a pod
/// gone from the API server may still be running. Blocking.
pub fn readers(brokers: &str, group: &str, topic: &str) -> Result<usize, QueueError> {
    let client: BaseConsumer = base_config(brokers).create().map_err(kafka("making a client"))?;
    let list = client.fetch_group_list(Some(group), TXN_TIMEOUT).map_err(kafka(format!("describing group {group}")))?;
    Ok(list
        .groups()
        .iter()
        .flat_map(|g| g.members())
        .filter(|m| m.client_id() != SPLITTER_CLIENT_ID)
        .filter(|m| m.metadata().is_some_and(|md| subscription(md).iter().any(|t| t == topic)))
        .count())
}

/// The topics of a consumer's subscription (ConsumerProtocolSubscription:
/// version, then an array of strings; the rest is not needed). Anything
/// malformed reads as no topics.
fn subscription(md: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let (Some(count), mut at) = (md.get(2..6), 6usize) else { return out };
    let count = i32::from_be_bytes([count[0], count[1], count[2], count[3]]).clamp(0, 10_000);
    for _ in 0..count {
        let Some(len) = md.get(at..at + 2) else { break };
        let len = i16::from_be_bytes([len[0], len[1]]).max(0) as usize;
        let Some(name) = md.get(at + 2..at + 2 + len) else { break };
        out.push(String::from_utf8_lossy(name).into_owned());
        at += 2 + len;
    }
    out
}

/// Records of `topic` that `group` has not read (from its committed
/// offsets, or the beginning). Blocking.
pub fn lag(brokers: &str, group: &str, topic: &str, partitions: i32) -> Result<i64, QueueError> {
    let at = committed(brokers, group, topic, partitions, false)?;
    let client: BaseConsumer = base_config(brokers).create().map_err(kafka("making a client"))?;
    let mut lag = 0;
    for p in 0..partitions {
        let (low, high) =
            client.fetch_watermarks(topic, p, PROBE_TIMEOUT).map_err(kafka(format!("reading {topic}")))?;
        lag += high - at[p as usize].unwrap_or(low).max(low);
    }
    Ok(lag)
}

/// Moves `src`'s records that `group` has not read into `dst` (same
/// partition index, modulo `dst`'s count), keeping key, headers and
/// timestamp. Exactly once: each batch is one transaction that also commits
/// the drain's own offsets (group `preview-drain-<src>`), so a drain cut off
/// by a crash resumes where it stopped. Nothing may write `src` or read it
/// as `group` meanwhile. Returns how many records moved. Blocking.
pub fn drain(brokers: &str, src: &str, dst: &str, dst_partitions: i32, group: &str) -> Result<u64, QueueError> {
    let drain_group = format!("preview-drain-{src}");
    let md_client: BaseConsumer = base_config(brokers).create().map_err(kafka("making a client"))?;
    let md = md_client.fetch_metadata(Some(src), PROBE_TIMEOUT).map_err(kafka(format!("reading {src}")))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == src && t.error().is_none()) else {
        return Ok(0); // already drained and deleted
    };
    let partitions = t.partitions().len() as i32;
    // Where to start: the drain's own offsets (a resumed drain), else the
    // consumers' offsets, else the beginning (nobody read anything).
    // Stable: the consumers' last transaction may still be committing
    // their offsets, and what it read must not be moved again.
    let own = committed(brokers, &drain_group, src, partitions, true)?;
    let theirs = committed(brokers, group, src, partitions, true)?;
    let mut start = Vec::new();
    let mut end = Vec::new();
    for p in 0..partitions {
        let (low, high) = md_client.fetch_watermarks(src, p, TXN_TIMEOUT).map_err(kafka(format!("reading {src}")))?;
        let from = own[p as usize].or(theirs[p as usize]).unwrap_or(low).max(low);
        start.push(from);
        end.push(high);
    }
    if start.iter().zip(&end).all(|(s, e)| s >= e) {
        return Ok(0);
    }
    let consumer: BaseConsumer = base_config(brokers)
        .set("group.id", &drain_group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka("making a consumer"))?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(src, p, Offset::Offset(start[p as usize])).map_err(kafka("assigning"))?;
    }
    consumer.assign(&tpl).map_err(kafka(format!("assigning {src}")))?;
    let producer: BaseProducer = transactional(brokers, &drain_group).create().map_err(kafka("making a producer"))?;
    producer.init_transactions(TXN_TIMEOUT).map_err(kafka("starting transactions"))?;
    let metadata = consumer.group_metadata().ok_or_else(|| QueueError::Kafka {
        action: "reading the drain's group".into(),
        source: KafkaError::NoMessageReceived,
    })?;
    let mut position: Vec<i64> = start.clone();
    let mut moved = 0u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while position.iter().zip(&end).any(|(p, e)| p < e) {
        if Instant::now() > deadline {
            return Err(QueueError::Stuck { what: format!("draining {src} into {dst}") });
        }
        let mut batch = Vec::new();
        if let Some(first) = consumer.poll(Duration::from_millis(500)) {
            batch.push(first.map_err(kafka(format!("reading {src}")))?.detach());
            while batch.len() < 1000 {
                match consumer.poll(Duration::ZERO) {
                    Some(m) => batch.push(m.map_err(kafka(format!("reading {src}")))?.detach()),
                    None => break,
                }
            }
        }
        // Records past the end seen at the start were never ours to move
        // (nothing writes src now; this only guards the bound).
        batch.retain(|m| m.offset() < end[m.partition() as usize]);
        if batch.is_empty() {
            // Aborted records and transaction markers advance the position
            // without a message: read it from the consumer.
            let pos = consumer.position().map_err(kafka("reading the position"))?;
            for p in 0..partitions {
                if let Some(Offset::Offset(o)) = pos.find_partition(src, p).map(|e| e.offset()) {
                    position[p as usize] = position[p as usize].max(o);
                }
            }
            continue;
        }
        producer.begin_transaction().map_err(kafka("beginning a transaction"))?;
        let mut next: HashMap<i32, i64> = HashMap::new();
        for m in &batch {
            forward(&producer, m, dst, m.partition() % dst_partitions)?;
            next.insert(m.partition(), m.offset() + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for (p, o) in &next {
            offsets.add_partition_offset(src, *p, Offset::Offset(*o)).map_err(kafka("offsets"))?;
        }
        let done = producer
            .send_offsets_to_transaction(&offsets, &metadata, TXN_TIMEOUT)
            .and_then(|_| commit(&producer, TXN_TIMEOUT));
        if let Err(e) = done {
            let _ = abort(&producer, TXN_TIMEOUT);
            return Err(QueueError::Kafka { action: format!("moving {src} into {dst}"), source: e });
        }
        moved += batch.len() as u64;
        for (p, o) in next {
            position[p as usize] = position[p as usize].max(o);
        }
    }
    Ok(moved)
}

/// Commits the open transaction once every record in it is acknowledged.
///
/// rdkafka's `commit_transaction` flushes first with `BaseProducer::flush`,
/// whose `poll(100 ms)` never returns early, so each transaction would cost
/// 100 ms; and any rdkafka poll rounds its wait down to whole milliseconds,
/// so waiting in short polls spins a core. This waits in librdkafka's own
/// flush instead, which sleeps until the producer holds no record: the
/// transactional config asks for reports of failed records only, so an
/// acknowledged record is released at once. A failure's report is served
/// between steps, so it cannot hold the wait up.
pub fn commit(producer: &BaseProducer, timeout: Duration) -> Result<(), KafkaError> {
    use rdkafka::types::RDKafkaRespErr;
    let until = Instant::now() + timeout;
    loop {
        // SAFETY: the handle is live while `producer` is borrowed, and
        // rd_kafka_flush may be called from any thread.
        let err = unsafe { rdkafka::bindings::rd_kafka_flush(producer.client().native_ptr(), FLUSH_STEP_MS) };
        producer.poll(Duration::ZERO);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR => break,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__TIMED_OUT if Instant::now() < until => {}
            e => return Err(KafkaError::Flush(e.into())),
        }
    }
    producer.commit_transaction(until.saturating_duration_since(Instant::now()))
}

/// Aborts the open transaction. librdkafka's abort purges what is unsent
/// and then waits, as `commit` does, until the producer holds no record;
/// a purged record's report holds it until served. So this asks in steps
/// (a timed-out abort resumes when called again), serving reports between.
pub fn abort(producer: &BaseProducer, timeout: Duration) -> Result<(), KafkaError> {
    let until = Instant::now() + timeout;
    loop {
        match producer.abort_transaction(Duration::from_millis(FLUSH_STEP_MS as u64)) {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < until => {
                producer.poll(Duration::ZERO);
            }
            done => return done,
        }
    }
}

/// How long one step of `commit`'s or `abort`'s wait lasts at most, in
/// milliseconds.
const FLUSH_STEP_MS: i32 = 10;

/// Produces a copy of `m` (key, payload, timestamp, headers) to `topic`'s
/// `partition`.
pub(super) fn forward<M: Message>(
    producer: &BaseProducer,
    m: &M,
    topic: &str,
    partition: i32,
) -> Result<(), QueueError> {
    let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).partition(partition);
    if let Some(k) = m.key() {
        rec = rec.key(k);
    }
    if let Some(p) = m.payload() {
        rec = rec.payload(p);
    }
    if let Some(ts) = m.timestamp().to_millis() {
        rec = rec.timestamp(ts);
    }
    if let Some(h) = m.headers() {
        let mut out = OwnedHeaders::new_with_capacity(h.count());
        for i in 0..h.count() {
            let hd = h.get(i);
            out = out.insert(Header { key: hd.key, value: hd.value });
        }
        rec = rec.headers(out);
    }
    send(producer, rec)
}

/// Sends one record, serving delivery reports while the queue is full; any
/// other error is returned (the tests' producers use it too).
pub fn send(producer: &BaseProducer, mut rec: BaseRecord<'_, [u8], [u8]>) -> Result<(), QueueError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(QueueError::Kafka { action: "producing".into(), source: e }),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_subscription() {
        let mut md = vec![0, 1, 0, 0, 0, 2];
        for t in ["orders", "preview-tmp-x"] {
            md.extend((t.len() as i16).to_be_bytes());
            md.extend(t.as_bytes());
        }
        md.extend([0, 0, 0, 0]);
        assert_eq!(super::subscription(&md), ["orders", "preview-tmp-x"]);
        assert!(super::subscription(&[0, 1, 0, 0, 0, 9, 0, 50]).is_empty());
    }
}
