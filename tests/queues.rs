//! Issue 16: SQS and RabbitMQ splitting by environment key, on the real
//! cluster and the real brokers (ElasticMQ and rabbitmq-server on the node
//! address: deploy/local/queues.sh). Staging's consumer and the preview
//! pods are preview-echo in its SQS or RabbitMQ mode: each records what it
//! consumed in a record queue this test reads back, so every claim is
//! counted by each message's unique id: refusals, 5 000 messages with mixed
//! keys, a SIGKILL of previewd mid-stream, Clean mid-stream and with unread
//! messages, the last Clean restoring the target, and FIFO order.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use aws_sdk_sqs::types::QueueAttributeName;
use common::queues::{Broker, Queues};
use common::*;
use futures::StreamExt;
use kube::api::{DynamicObject, PostParams};
use preview::proto;
use serde_json::json;

const V2: &str = "preview.local/echo:v2";

fn code(r: &Result<tonic::Response<proto::StartResponse>, tonic::Status>) -> tonic::Code {
    r.as_ref().err().map_or(tonic::Code::Ok, |s| s.code())
}

fn refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

async fn queue_split(ns: &TestNs, q: &Queues, deployment: &str) -> Result<()> {
    let ar = preview::previewd::cluster::queuesplits::queuesplit_resource();
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let obj = DynamicObject::new(deployment, &ar).data(json!({"spec": {
        "target": {"kind": "Deployment", "name": deployment},
        "queues": [q.declaration()],
    }}));
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

fn split_config(q: &Queues, target: &str, extra: serde_json::Value) -> String {
    let mut entry = json!({"queue_type": q.queue_type()});
    for (k, v) in extra.as_object().into_iter().flatten() {
        entry[k] = v.clone();
    }
    json!({"target": target, "feature": {"split_queues": {"orders": entry}}}).to_string()
}

async fn clean(c: &mut preview::cli::Client, key: &str) -> Result<()> {
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key(key.into())) }).await?;
    Ok(())
}

/// Mixed keys: k1 in baggage, k2 in x-preview-key, none, malformed baggage.
fn mixed(i: u32) -> Vec<(&'static str, String)> {
    match i % 4 {
        0 => vec![("baggage", "a=b,preview-key=k1".to_string())],
        1 => vec![("x-preview-key", "k2".to_string())],
        2 => vec![],
        _ => vec![("baggage", "preview-key;k1,=k2".to_string())],
    }
}

fn mixed_who(i: u32) -> &'static str {
    match i % 4 {
        0 => "k1",
        1 => "k2",
        _ => "staging",
    }
}

async fn split_end_to_end(broker: Broker) -> Result<()> {
    let prefix = if broker == Broker::Sqs { "t-sqs" } else { "t-rmq" };
    let ns = TestNs::new(prefix).await?;
    let mut q = Queues::new(broker).await?;
    let (orig, record, dlq) =
        (format!("orders-{}", ns.name), format!("consumed-{}", ns.name), format!("dlq-{}", ns.name));
    let mut attrs = vec![(QueueAttributeName::VisibilityTimeout, "7".to_string())];
    if broker == Broker::Sqs {
        q.create(&dlq, &[]).await?;
        let arn = format!("arn:aws:sqs:elasticmq:000000000000:{dlq}");
        attrs.push((
            QueueAttributeName::RedrivePolicy,
            json!({"deadLetterTargetArn": arn, "maxReceiveCount": 5}).to_string(),
        ));
    }
    let attr_refs: Vec<(QueueAttributeName, &str)> = attrs.iter().map(|(k, v)| (k.clone(), v.as_str())).collect();
    q.create(&orig, &attr_refs).await?;
    q.create(&record, &[]).await?;
    let good = q.consumer_env(&orig, &record, None);
    let down_url =
        if broker == Broker::Sqs { "http://198.18.255.254:9" } else { "amqp://staging:x@198.18.255.254:9/%2f" };
    let down = q.consumer_env(&orig, &record, Some(down_url));
    echo_app(&ns, "consumer", "v1", 1, &refs(&good)).await?;
    echo_app(&ns, "undeclared", "v1", 1, &[]).await?;
    echo_app(&ns, "downbroker", "v1", 1, &refs(&down)).await?;
    queue_split(&ns, &q, "consumer").await?;
    queue_split(&ns, &q, "downbroker").await?;
    rolled_to(&ns, "consumer", q.queue_var(), &orig).await?;

    let mut previewd = LocalPreviewd::spawn(&ns.name)?;
    let addr = previewd.addr.clone();
    let mut c = connect_when_up(&addr).await?;

    // Refusals: nothing is made, and no target restarts.
    let r = c.start(start_req(&split_config(&q, "deployment/undeclared", json!({})), V2, "nosplit")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "undeclared target: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("QueueSplit"), "names the resource to create: {r:?}");
    let r = c.start(start_req(&split_config(&q, "deployment/downbroker", json!({})), V2, "down")).await;
    ensure!(code(&r) == tonic::Code::Unavailable, "down broker: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("198.18.255.254:9"), "names the broker: {r:?}");
    ensure!(!r.as_ref().unwrap_err().message().contains(":x@"), "no password in the message: {r:?}");
    let bad = json!({"message_filter": {"x": "("}});
    let r = c.start(start_req(&split_config(&q, "deployment/consumer", bad), V2, "badre")).await;
    ensure!(code(&r) == tonic::Code::InvalidArgument, "bad regex: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("feature.split_queues.orders.message_filter.x"), "{r:?}");
    let other = if broker == Broker::Sqs { "RMQ" } else { "SQS" };
    let cfg = json!({"target": "deployment/consumer", "feature": {"split_queues": {"orders": {"queue_type": other}}}});
    let r = c.start(start_req(&cfg.to_string(), V2, "wrongtype")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "wrong queue_type: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("feature.split_queues.orders.queue_type"), "{r:?}");
    for d in ["undeclared", "downbroker", "consumer"] {
        ensure!(template_env(&ns, d, q.queue_var()).await?.1 == 1, "{d} was changed by a refused Start");
    }
    ensure!(env_objects(&ns, &Default::default()).await?.is_empty(), "a refused Start left an environment object");

    // Two environments; the target restarts once, onto staging's queue.
    for key in ["k1", "k2"] {
        let started = c.start(start_req(&split_config(&q, "deployment/consumer", json!({})), V2, key)).await?;
        let qs = &started.into_inner().environment.context("environment")?.queues;
        ensure!(qs.len() == 1 && qs[0].topic.starts_with("preview-tmp-"), "{key}: {qs:?}");
    }
    let (staging_queue, generation) = template_env(&ns, "consumer", q.queue_var()).await?;
    ensure!(staging_queue.starts_with("preview-tmp-") && staging_queue.ends_with("-staging"), "{staging_queue}");
    ensure!(generation == 2, "the target is restarted once for the split, not per environment ({generation})");
    let env_queues: Vec<String> = {
        let s = c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
        s.environments.iter().flat_map(|e| e.queues.iter().map(|x| x.topic.clone())).collect()
    };
    if broker == Broker::Sqs {
        // The temporary queues copy the original's attributes.
        for t in std::iter::once(&staging_queue).chain(&env_queues) {
            let url = q.sqs.get_queue_url().queue_name(t).send().await?.queue_url.context("url")?;
            let got =
                q.sqs.get_queue_attributes().queue_url(url).attribute_names(QueueAttributeName::All).send().await?;
            let a = got.attributes.unwrap_or_default();
            ensure!(a.get(&QueueAttributeName::VisibilityTimeout).map(String::as_str) == Some("7"), "{t}: {a:?}");
            ensure!(a.get(&QueueAttributeName::RedrivePolicy).is_some_and(|p| p.contains(&dlq)), "{t}: {a:?}");
        }
    }
    rolled_to(&ns, "consumer", q.queue_var(), &staging_queue).await?;
    ready_pods(&ns, "preview.dev/key=k1", 1).await?;
    ready_pods(&ns, "preview.dev/key=k2", 1).await?;

    // 5 000 messages with mixed keys, no faults: each consumed once, by the right consumer.
    q.send(&orig, 0..5_000, mixed, None).await?;
    q.wait_for(&record, 0..5_000, Duration::from_secs(180)).await?;
    let dups = q.check(0..5_000, mixed_who)?;
    eprintln!("{broker:?}: 5000 messages, no faults: 0 lost, {dups} duplicates");
    ensure!(dups == 0, "{dups} duplicates without faults");

    // kill -9 of previewd mid-stream: nothing is lost.
    q.send(&orig, 5_000..6_000, mixed, None).await?;
    previewd.kill()?;
    q.send(&orig, 6_000..7_000, mixed, None).await?;
    previewd.restart()?;
    let mut c = connect_when_up(&addr).await?;
    q.wait_for(&record, 5_000..7_000, Duration::from_secs(180)).await?;
    let dups = q.check(5_000..7_000, mixed_who)?;
    eprintln!("{broker:?}: 2000 messages across a SIGKILL of previewd: 0 lost, {dups} duplicates");

    // k3's consumer cannot reach the broker: what is routed to it waits
    // unread (Status shows it), and its Clean moves it all to staging.
    let mut k3: serde_json::Value = serde_json::from_str(&split_config(&q, "deployment/consumer", json!({})))?;
    let endpoint_var = if broker == Broker::Sqs { "SQS_ENDPOINT" } else { "AMQP_URL" };
    k3["feature"]["env"] = json!({"override": {endpoint_var: down_url}});
    c.start(start_req(&k3.to_string(), V2, "k3")).await?;
    q.send(&orig, 7_000..7_500, |_| vec![("x-preview-key", "k3".to_string())], None).await?;
    let lag = eventually("k3's queue to hold its 500 unread messages", Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let s =
                c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
            let x = s.environments.iter().find(|e| e.key == "k3").and_then(|e| e.queues.first()).cloned();
            Ok(x.map(|x| x.lag).filter(|l| *l >= 500))
        }
    })
    .await?;
    clean(&mut c, "k3").await?;
    q.wait_for(&record, 7_000..7_500, Duration::from_secs(120)).await?;
    let dups = q.check(7_000..7_500, |_| "staging")?;
    eprintln!("{broker:?}: k3 cleaned with {lag} unread messages: all consumed by staging, {dups} duplicates");

    // Clean mid-stream: k1's messages in flight are each consumed, by k1 or,
    // once k1 is gone, by staging.
    q.send(&orig, 7_500..8_500, |_| vec![("x-preview-key", "k1".to_string())], None).await?;
    clean(&mut c, "k1").await?;
    q.wait_for(&record, 7_500..8_500, Duration::from_secs(120)).await?;
    let mut by_k1 = 0;
    for i in 7_500..8_500 {
        let by: Vec<&str> = q.seen[&i].iter().map(|c| c.by.as_str()).collect();
        ensure!(by.iter().all(|b| *b == "k1" || *b == "staging"), "message {i} consumed by {by:?}");
        by_k1 += usize::from(by.contains(&"k1"));
    }
    eprintln!("{broker:?}: k1 cleaned mid-stream: {by_k1} of 1000 consumed by k1, the rest by staging");

    // The last Clean restores the target and leaves no temporary queue.
    clean(&mut c, "k2").await?;
    let (now, _) = template_env(&ns, "consumer", q.queue_var()).await?;
    ensure!(now == orig, "the target's queue is restored: {now}");
    for t in std::iter::once(&staging_queue).chain(&env_queues) {
        ensure!(!q.exists(t).await?, "temporary queue {t} is left");
    }
    let k3_queue = preview::model::queue::temp_names(
        preview::model::queue::QueueType::parse(q.queue_type()).context("type")?,
        false,
        &ns.name,
        "consumer",
        "orders",
        "k3",
    )
    .1;
    ensure!(!q.exists(&k3_queue).await?, "k3's queue {k3_queue} is left");
    rolled_to(&ns, "consumer", q.queue_var(), &orig).await?;
    q.send(&orig, 8_500..9_000, |_| vec![("x-preview-key", "k2".to_string())], None).await?;
    q.wait_for(&record, 8_500..9_000, Duration::from_secs(120)).await?;
    q.check(8_500..9_000, |_| "staging")?;
    ensure!(env_objects(&ns, &Default::default()).await?.is_empty(), "environment objects left");
    drop(previewd);
    q.delete(&[&orig, &record, &dlq]).await?;
    Ok(())
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and ElasticMQ: make test")]
#[tokio::test]
async fn sqs_split_by_key_through_kill_and_clean() -> Result<()> {
    split_end_to_end(Broker::Sqs).await
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and RabbitMQ: make test")]
#[tokio::test]
async fn rabbitmq_split_by_key_through_kill_and_clean() -> Result<()> {
    split_end_to_end(Broker::Rmq).await
}

/// Per consumer pod, in the order it consumed: each group's ids (id % 5) increase.
fn in_group_order(q: &Queues) -> Result<()> {
    let mut order: std::collections::BTreeMap<(String, u32), Vec<(u64, u32)>> = Default::default();
    for (id, cs) in &q.seen {
        for c in cs {
            order.entry((c.pod.clone(), id % 5)).or_default().push((c.n, *id));
        }
    }
    for ((pod, g), mut v) in order {
        v.sort();
        let ids: Vec<u32> = v.iter().map(|(_, id)| *id).collect();
        ensure!(ids.windows(2).all(|w| w[0] < w[1]), "group g{g} out of order in {pod}: {ids:?}");
    }
    Ok(())
}

/// A FIFO queue: every destination gets each group's messages in order,
/// and the last Clean moves unread ones back to the original, in order.
#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and ElasticMQ: make test")]
#[tokio::test]
async fn sqs_fifo_split_keeps_each_groups_order() -> Result<()> {
    let ns = TestNs::new("t-fifo").await?;
    let mut q = Queues::new(Broker::Sqs).await?;
    let (orig, record) = (format!("orders-{}.fifo", ns.name), format!("consumed-{}", ns.name));
    q.create(&orig, &[(QueueAttributeName::FifoQueue, "true")]).await?;
    q.create(&record, &[]).await?;
    echo_app(&ns, "consumer", "v1", 1, &refs(&q.consumer_env(&orig, &record, None))).await?;
    queue_split(&ns, &q, "consumer").await?;
    rolled_to(&ns, "consumer", q.queue_var(), &orig).await?;
    let previewd = LocalPreviewd::spawn(&ns.name)?;
    let mut c = connect_when_up(&previewd.addr).await?;
    c.start(start_req(&split_config(&q, "deployment/consumer", json!({})), V2, "k1")).await?;
    let (staging_queue, _) = template_env(&ns, "consumer", q.queue_var()).await?;
    ensure!(staging_queue.ends_with("-staging.fifo"), "{staging_queue}");
    rolled_to(&ns, "consumer", q.queue_var(), &staging_queue).await?;
    ready_pods(&ns, "preview.dev/key=k1", 1).await?;

    // 1 000 messages in 5 groups; every third message of a group is k1's.
    let group = |i: u32| format!("g{}", i % 5);
    let key = |i: u32| if (i / 5).is_multiple_of(3) { vec![("x-preview-key", "k1".to_string())] } else { vec![] };
    q.send(&orig, 0..1_000, key, Some(&group)).await?;
    q.wait_for(&record, 0..1_000, Duration::from_secs(180)).await?;
    let dups = q.check(0..1_000, |i| if (i / 5).is_multiple_of(3) { "k1" } else { "staging" })?;
    ensure!(dups == 0, "{dups} duplicates");
    in_group_order(&q)?;

    // k2's consumer cannot reach the broker: its messages wait in its FIFO
    // queue. When k2's Clean is the last, they go back to the original
    // queue (new deduplication ids: SQS would drop a repeat of their first
    // send) and the restored target consumes them, each group in order.
    let mut k2: serde_json::Value = serde_json::from_str(&split_config(&q, "deployment/consumer", json!({})))?;
    k2["feature"]["env"] = json!({"override": {"SQS_ENDPOINT": "http://198.18.255.254:9"}});
    c.start(start_req(&k2.to_string(), V2, "k2")).await?;
    q.send(&orig, 1_000..1_200, |_| vec![("x-preview-key", "k2".to_string())], Some(&group)).await?;
    eventually("k2's queue to hold its 200 messages", Duration::from_secs(60), || {
        let mut c = c.clone();
        async move {
            let s =
                c.status(proto::StatusRequest::default()).await?.into_inner().next().await.context("snapshot")??;
            let x = s.environments.iter().find(|e| e.key == "k2").and_then(|e| e.queues.first()).cloned();
            Ok(x.filter(|x| x.lag >= 200).map(|_| ()))
        }
    })
    .await?;
    clean(&mut c, "k1").await?;
    clean(&mut c, "k2").await?;
    ensure!(template_env(&ns, "consumer", q.queue_var()).await?.0 == orig, "the target's queue is restored");
    ensure!(!q.exists(&staging_queue).await?, "staging's FIFO queue is left");
    q.wait_for(&record, 1_000..1_200, Duration::from_secs(120)).await?;
    let dups = q.check(1_000..1_200, |_| "staging")?;
    ensure!(dups == 0, "{dups} duplicates after the move back");
    in_group_order(&q)?;
    drop(previewd);
    q.delete(&[&orig, &record]).await?;
    Ok(())
}
