//! Issue 15: Kafka splitting by environment key, on the real cluster and
//! the real broker (deploy/local/kafka.sh on the node address). Staging's
//! consumer and the preview pods are preview-echo in its Kafka mode: each
//! records what it consumed, transactionally, in a topic this test reads
//! back, so every claim below is counted by each record's unique id:
//! refusals, exactly once with two environments through a SIGKILL of
//! previewd, Clean with records in flight, unread records moved to staging,
//! mirror mode, and the last Clean restoring the target.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use futures::StreamExt;
use kube::api::{DynamicObject, PostParams};
use preview::previewd::queues::kafka;
use preview::proto;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

fn as_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const BROKERS: &str = "198.18.255.254:9092";
const V2: &str = "preview.local/echo:v2";

async fn create_topics(topics: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", BROKERS).create()?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, 3, TopicReplication::Fixed(1))).collect();
    for r in admin.create_topics(new.iter(), &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

fn topics_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", BROKERS).create()?;
    let md = c.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(md.topics().iter().map(|t| t.name().to_string()).filter(|t| t.starts_with(prefix)).collect())
}

/// Produces records `from..to` to `topic`; `headers(i)` gives each one's
/// headers besides its unique `id`.
fn produce(topic: &str, from: u32, to: u32, headers: impl Fn(u32) -> Vec<(&'static str, String)>) -> Result<()> {
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", BROKERS).set("linger.ms", "5").create()?;
    for i in from..to {
        let id = i.to_string();
        let mut h = OwnedHeaders::new().insert(Header { key: "id", value: Some(id.as_bytes()) });
        for (k, v) in headers(i) {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        let key = format!("customer-{}", i % 97);
        let rec = BaseRecord::<[u8], [u8]>::to(topic).key(key.as_bytes()).payload(&[b'x'; 64][..]).headers(h);
        kafka::send(&p, rec)?;
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Every committed record of the record topic: id → who consumed it (once per consumption).
fn consumed(topic: &str) -> Result<BTreeMap<u32, Vec<String>>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", "kafka-test-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut end = Vec::new();
    for p in 0..3 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        end.push(c.fetch_watermarks(topic, p, Duration::from_secs(10))?.1);
    }
    c.assign(&tpl)?;
    let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pos = c.position()?;
        let done = (0..3).all(|p| match pos.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o >= end[p as usize],
            _ => end[p as usize] == 0,
        });
        if done {
            return Ok(out);
        }
        ensure!(std::time::Instant::now() < deadline, "reading {topic} back took over 60 s");
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m?;
            let id: u32 = std::str::from_utf8(m.key().unwrap_or_default())?.parse()?;
            out.entry(id).or_default().push(String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned());
        }
    }
}

/// Waits until ids `ids` have all been consumed, then checks each was
/// consumed exactly once, by `who(id)`.
async fn exactly_once(record_topic: &str, ids: std::ops::Range<u32>, who: impl Fn(u32) -> &'static str) -> Result<()> {
    let t = record_topic.to_string();
    let n = ids.len();
    let seen = eventually(&format!("{n} records consumed"), Duration::from_secs(180), || {
        let (t, ids) = (t.clone(), ids.clone());
        async move {
            let got = tokio::task::spawn_blocking(move || consumed(&t)).await??;
            Ok(ids.clone().all(|i| got.contains_key(&i)).then_some(got))
        }
    })
    .await?;
    let mut wrong = Vec::new();
    for i in ids {
        let by = &seen[&i];
        if by.len() != 1 || by[0] != who(i) {
            wrong.push(format!("{i}: {by:?} (want [{:?}])", who(i)));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {n} records not consumed exactly once by the right consumer: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    Ok(())
}

async fn queue_split(ns: &TestNs, name: &str, deployment: &str) -> Result<()> {
    let ar = preview::previewd::cluster::queuesplits::queuesplit_resource();
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let obj = DynamicObject::new(name, &ar).data(json!({"spec": {
        "target": {"kind": "Deployment", "name": deployment},
        "queues": [{"id": "orders", "type": "Kafka", "brokers": {"fromEnv": "KAFKA_BROKERS"},
                    "topicEnv": "KAFKA_TOPIC", "groupIdEnv": "KAFKA_GROUP"}],
    }}));
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

fn split_config(target: &str, extra: serde_json::Value) -> String {
    let mut q = json!({"queue_type": "Kafka"});
    if let Some(o) = extra.as_object() {
        for (k, v) in o {
            q[k] = v.clone();
        }
    }
    json!({"target": target, "feature": {"split_queues": {"orders": q}}}).to_string()
}

async fn metrics_page(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

fn code(r: &Result<tonic::Response<proto::StartResponse>, tonic::Status>) -> tonic::Code {
    r.as_ref().err().map_or(tonic::Code::Ok, |s| s.code())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and Kafka: make test")]
#[tokio::test]
async fn kafka_split_is_exactly_once_through_kill_and_clean() -> Result<()> {
    let ns = TestNs::new("t-kafka").await?;
    let (orig, record, group) =
        (format!("orders-{}", ns.name), format!("consumed-{}", ns.name), format!("g-{}", ns.name));
    create_topics(&[&orig, &record]).await?;
    let env = |brokers: &str| {
        vec![
            ("KAFKA_TOPIC", orig.clone()),
            ("KAFKA_BROKERS", brokers.to_string()),
            ("KAFKA_GROUP", group.clone()),
            ("KAFKA_RECORD_TOPIC", record.clone()),
        ]
    };
    let good = env(BROKERS);
    let down = env("198.18.255.254:9");
    echo_app(&ns, "consumer", "v1", 1, &as_refs(&good)).await?;
    // Not a consumer of the topic (it would take a share of staging's records):
    // only the variables a QueueSplit would name.
    echo_app(&ns, "undeclared", "v1", 1, &[("KAFKA_GROUP", "other")]).await?;
    echo_app(&ns, "downbroker", "v1", 1, &as_refs(&down)).await?;
    queue_split(&ns, "consumer", "consumer").await?;
    queue_split(&ns, "downbroker", "downbroker").await?;
    rolled_to(&ns, "consumer", "KAFKA_TOPIC", &orig).await?;

    let mut previewd = LocalPreviewd::spawn(&ns.name)?;
    let addr = previewd.addr.clone();
    let mut c = connect_when_up(&addr).await?;

    // Refusals: nothing is made, and no target restarts.
    let r = c.start(start_req(&split_config("deployment/undeclared", json!({})), V2, "nosplit")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "undeclared target: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("QueueSplit"), "names the resource to create: {r:?}");
    let r = c.start(start_req(&split_config("deployment/downbroker", json!({})), V2, "down")).await;
    ensure!(code(&r) == tonic::Code::Unavailable, "down broker: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("198.18.255.254:9 "), "names the broker: {r:?}");
    let r = c
        .start(start_req(&split_config("deployment/consumer", json!({"message_filter": {"x": "("}})), V2, "badre"))
        .await;
    ensure!(code(&r) == tonic::Code::InvalidArgument, "bad regex: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("feature.split_queues.orders.message_filter.x"), "{r:?}");
    for d in ["undeclared", "downbroker", "consumer"] {
        ensure!(template_env(&ns, d, "KAFKA_TOPIC").await?.1 == 1, "{d} was changed by a refused Start");
    }
    ensure!(env_objects(&ns, &Default::default()).await?.is_empty(), "a refused Start left an environment object");

    // Two environments split the queue; the target restarts once, onto staging's topic.
    for key in ["k1", "k2"] {
        let started = c.start(start_req(&split_config("deployment/consumer", json!({})), V2, key)).await?.into_inner();
        let q = &started.environment.context("environment")?.queues;
        ensure!(q.len() == 1 && q[0].topic.starts_with("preview-tmp-"), "{key}: {q:?}");
    }
    let (staging_topic, generation) = template_env(&ns, "consumer", "KAFKA_TOPIC").await?;
    ensure!(staging_topic.starts_with("preview-tmp-") && staging_topic.ends_with("-staging"), "{staging_topic}");
    ensure!(
        generation == 2,
        "the target is restarted once for the split, not per environment (generation {generation})"
    );
    let split_prefix = staging_topic.trim_end_matches("staging").to_string();
    rolled_to(&ns, "consumer", "KAFKA_TOPIC", &staging_topic).await?;
    ready_pods(&ns, "preview.dev/key=k1", 1).await?;
    ready_pods(&ns, "preview.dev/key=k2", 1).await?;
    // Overlapping filters are refused, naming the other environment.
    let r = c
        .start(start_req(
            &split_config("deployment/consumer", json!({"message_filter": {"x-preview-key": "^k1$"}})),
            V2,
            "k3",
        ))
        .await;
    ensure!(
        code(&r) == tonic::Code::AlreadyExists && r.as_ref().unwrap_err().message().contains("\"k1\""),
        "overlap: {r:?}"
    );

    // 10 000 records: key k1, key k2, none, malformed baggage; previewd is
    // killed with SIGKILL half-way and started again.
    let who = |i: u32| match i % 4 {
        0 => "k1",
        1 => "k2",
        _ => "staging",
    };
    let headers = |i: u32| match i % 4 {
        0 => vec![("baggage", "a=b,preview-key=k1".to_string())],
        1 => vec![("x-preview-key", "k2".to_string())],
        2 => vec![],
        _ => vec![("baggage", "preview-key;k1,=k2".to_string())],
    };
    let (o, h) = (orig.clone(), headers);
    tokio::task::spawn_blocking(move || produce(&o, 0, 5_000, h)).await??;
    previewd.kill()?; // SIGKILL
    let (o, h) = (orig.clone(), headers);
    tokio::task::spawn_blocking(move || produce(&o, 5_000, 10_000, h)).await??;
    previewd.restart()?;
    let mut c = connect_when_up(&addr).await?;
    exactly_once(&record, 0..10_000, who).await?;

    // Clean with records in flight. k1's consumer is running: each of its
    // records is consumed once, by k1 or (once k1 is gone) by staging.
    let o = orig.clone();
    tokio::task::spawn_blocking(move || {
        produce(&o, 10_000, 11_000, move |_| vec![("x-preview-key", "k1".to_string())])
    })
    .await??;
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k1".into())) }).await?;
    let seen = eventually("k1's last records consumed", Duration::from_secs(120), || {
        let t = record.clone();
        async move {
            let got = tokio::task::spawn_blocking(move || consumed(&t)).await??;
            Ok((10_000..11_000).all(|i| got.contains_key(&i)).then_some(got))
        }
    })
    .await?;
    let by_k1 = (10_000..11_000).filter(|i| seen[i] == ["k1"]).count();
    let by_staging = (10_000..11_000).filter(|i| seen[i] == ["staging"]).count();
    let odd: Vec<_> =
        (10_000..11_000).filter(|i| seen[i] != ["k1"] && seen[i] != ["staging"]).map(|i| (i, &seen[&i])).collect();
    ensure!(
        by_k1 + by_staging == 1_000,
        "k1's in-flight records: {by_k1} by k1, {by_staging} by staging, of 1000; others: {:?}",
        &odd[..odd.len().min(10)]
    );
    eprintln!("k1 cleaned with 1000 records in flight: {by_k1} consumed by k1, {by_staging} by staging");

    // k3's consumer cannot reach the broker, so every record routed to it
    // waits unread in its topic (Status shows the lag); Clean moves them
    // all to staging.
    let k3 = split_config("deployment/consumer", json!({}));
    let mut k3: serde_json::Value = serde_json::from_str(&k3)?;
    k3["feature"]["env"] = json!({"override": {"KAFKA_BROKERS": "198.18.255.254:9"}});
    c.start(start_req(&k3.to_string(), V2, "k3")).await?;
    let o = orig.clone();
    tokio::task::spawn_blocking(move || {
        produce(&o, 11_000, 13_000, move |_| vec![("x-preview-key", "k3".to_string())])
    })
    .await??;
    // Lag is in offsets, transaction markers included: at least the 2000.
    let lag = eventually("k3's topic to hold the 2000 unread records", Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let envs =
                c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
            let q = envs.environments.iter().find(|e| e.key == "k3").and_then(|e| e.queues.first()).cloned();
            Ok(q.map(|q| q.lag).filter(|l| *l >= 2_000))
        }
    })
    .await?;
    // Metrics export the same figures.
    let page = metrics_page(previewd.metrics_port()).await?;
    let line = page
        .lines()
        .find(|l| l.starts_with("preview_queue_lag{") && l.contains("key=\"k3\""))
        .context("k3's lag metric")?;
    let value: i64 = line.rsplit(' ').next().unwrap_or_default().parse()?;
    ensure!(value >= 2_000, "k3's lag metric: {line}");
    ensure!(
        page.lines().any(|l| l.starts_with("preview_queue_forwarded_total{") && l.contains("key=\"k3\"")),
        "{page}"
    );
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k3".into())) }).await?;
    exactly_once(&record, 11_000..13_000, |_| "staging").await?;
    eprintln!("k3's lag at Clean: {lag}; all 2000 consumed by staging");

    // Mirror: each of k4's records is consumed by k4 and by staging, once each.
    c.start(start_req(&split_config("deployment/consumer", json!({"queue_mode": "mirror"})), V2, "k4")).await?;
    let o = orig.clone();
    tokio::task::spawn_blocking(move || {
        produce(&o, 13_000, 13_200, move |_| vec![("baggage", "preview-key=k4".to_string())])
    })
    .await??;
    let seen = eventually("k4's records consumed twice", Duration::from_secs(120), || {
        let t = record.clone();
        async move {
            let got = tokio::task::spawn_blocking(move || consumed(&t)).await??;
            Ok((13_000..13_200).all(|i| got.get(&i).is_some_and(|by| by.len() >= 2)).then_some(got))
        }
    })
    .await?;
    for i in 13_000..13_200 {
        let mut by = seen[&i].clone();
        by.sort();
        ensure!(by == ["k4", "staging"], "mirrored record {i} consumed by {by:?}");
    }
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k4".into())) }).await?;

    // Clean of the last environment: the target reads its own topic again,
    // the temporary topics are gone, and nothing is lost.
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k2".into())) }).await?;
    let (now, _) = template_env(&ns, "consumer", "KAFKA_TOPIC").await?;
    ensure!(now == orig, "the target's topic is restored: {now}");
    ensure!(
        topics_with_prefix(&split_prefix)?.is_empty(),
        "temporary topics left: {:?}",
        topics_with_prefix(&split_prefix)?
    );
    rolled_to(&ns, "consumer", "KAFKA_TOPIC", &orig).await?;
    let o = orig.clone();
    tokio::task::spawn_blocking(move || {
        produce(&o, 13_200, 13_700, move |_| vec![("x-preview-key", "k2".to_string())])
    })
    .await??;
    exactly_once(&record, 13_200..13_700, |_| "staging").await?;
    exactly_once(&record, 0..10_000, who).await?;
    drop(previewd);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", BROKERS).create()?;
    admin.delete_topics(&[&orig, &record], &AdminOptions::new()).await?;
    Ok(())
}
