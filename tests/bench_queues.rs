//! `make bench-queues` (ignored by `cargo test`): previewd's SQS and
//! RabbitMQ splitters against the floor, in one run, on the real brokers
//! (deploy/local/queues.sh; no cluster needed). The splitters run in this
//! process as they run in previewd (the library's `Splits`), with two
//! environment routes (k1, k2) and staging.
//!
//! Each round preloads a source queue with messages of 1 KiB with mixed
//! keys (k1, k2, none, malformed), then times moving all of them:
//! - the floor: a plain copy loop with the splitter's own shape and no
//!   routing: SQS, 4 receivers each doing receive 10 → send batch → delete
//!   batch into one queue; RabbitMQ, a consumer with the same prefetch (256)
//!   publishing into one queue and acking each message on its confirm;
//! - the splitter: from its start until it has forwarded every message.
//!
//! 3 rounds per broker, the order flipped each round; the ratio is the
//! median of the rounds' splitter rate over floor rate. The last line is
//! `queues: sqs X.XX x floor, rabbitmq Y.YY x floor`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use common::queues::{AMQP_URL, Broker, Queues, SQS_ENDPOINT};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use preview::model::queue::{MessageFilter, QueueMode, QueueType};
use preview::previewd::queues::{Route, SplitSpec, Splits, rmq, sqs};

const ROUNDS: usize = 3;
const SQS_MESSAGES: u32 = 4_000;
const RMQ_MESSAGES: u32 = 20_000;
const SQS_WORKERS: usize = 4;
const PREFETCH: u16 = 256;

fn run_id() -> String {
    format!("{:x}", SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()))
}

fn mixed(i: u32) -> Vec<(&'static str, String)> {
    let pad = ("pad", "x".repeat(1000));
    match i % 4 {
        0 => vec![("baggage", "a=b,preview-key=k1".to_string()), pad],
        1 => vec![("x-preview-key", "k2".to_string()), pad],
        2 => vec![pad],
        _ => vec![("baggage", "preview-key;k1,=k2".to_string()), pad],
    }
}

/// SQS floor: moves `n` messages from `src` into `dst`.
async fn sqs_floor(src: &str, dst: &str, n: u64) -> Result<()> {
    let c = sqs::client(SQS_ENDPOINT, "");
    let (src, dst) = (sqs::url(&c, SQS_ENDPOINT, src).await?, sqs::url(&c, SQS_ENDPOINT, dst).await?);
    let moved = Arc::new(AtomicU64::new(0));
    let worker = || async {
        while moved.load(Ordering::SeqCst) < n {
            let got = c
                .receive_message()
                .queue_url(&src)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .send()
                .await?;
            let msgs = got.messages.unwrap_or_default();
            if msgs.is_empty() {
                continue;
            }
            let mut sends = Vec::new();
            let mut deletes = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                sends.push(
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(m.body.clone().unwrap_or_default())
                        .set_message_attributes(m.message_attributes.clone())
                        .build()?,
                );
                deletes.push(
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .set_receipt_handle(m.receipt_handle.clone())
                        .build()?,
                );
            }
            let out = c.send_message_batch().queue_url(&dst).set_entries(Some(sends)).send().await?;
            ensure!(out.failed.is_empty(), "floor sends refused");
            c.delete_message_batch().queue_url(&src).set_entries(Some(deletes)).send().await?;
            moved.fetch_add(msgs.len() as u64, Ordering::SeqCst);
        }
        Ok::<_, anyhow::Error>(())
    };
    for r in futures::future::join_all((0..SQS_WORKERS).map(|_| worker())).await {
        r?;
    }
    Ok(())
}

/// RabbitMQ floor: moves `n` messages from `src` into `dst`.
async fn rmq_floor(src: &str, dst: &str, n: u64) -> Result<()> {
    let conn = rmq::connect(AMQP_URL).await?;
    let input = conn.create_channel().await?;
    input.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let out = conn.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer =
        input.basic_consume(src.into(), "floor".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let mut pending = FuturesOrdered::new();
    let mut moved = 0u64;
    while moved < n {
        tokio::select! {
            Some(done) = pending.next(), if !pending.is_empty() => {
                let (tag, c): (u64, lapin::Result<lapin::Confirmation>) = done;
                ensure!(matches!(c?, lapin::Confirmation::Ack(None)), "floor publish not stored");
                input.basic_ack(tag, BasicAckOptions::default()).await?;
                moved += 1;
            }
            d = consumer.next(), if pending.len() < PREFETCH as usize => {
                let d = d.context("consumer ended")??;
                let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
                let c = out.basic_publish("".into(), dst.into(), opts, &d.data, d.properties.clone()).await?;
                let tag = d.delivery_tag;
                pending.push_back(async move { (tag, c.await) });
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The splitter: from its start until it has forwarded `n` messages.
async fn split(broker: Broker, run: &str, src: &str, n: u64) -> Result<()> {
    let key_topic = |k: &str| format!("{src}-{k}");
    let spec = SplitSpec {
        queue_type: if broker == Broker::Sqs { QueueType::Sqs } else { QueueType::Rmq },
        fifo: false,
        region: String::new(),
        brokers: if broker == Broker::Sqs { SQS_ENDPOINT.into() } else { AMQP_URL.into() },
        source: src.into(),
        group: String::new(),
        staging: key_topic("staging"),
        partitions: 1,
        transactional_id: String::new(),
    };
    let routes: Vec<Route> = ["k1", "k2"]
        .iter()
        .map(|k| {
            let filter = MessageFilter::Key(k.to_string()).compile().map_err(anyhow::Error::msg)?;
            Ok(Route { key: k.to_string(), topic: key_topic(k), filter, mode: QueueMode::Steal })
        })
        .collect::<Result<_>>()?;
    let splits = Splits::default();
    let id = format!("bench/{run}");
    splits.route(&id, &spec, routes).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while splits.all_forwarded().iter().map(|(_, _, c)| c).sum::<u64>() < n {
        ensure!(Instant::now() < deadline, "the splitter did not forward {n} messages in 300 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    splits.stop(&id).await;
    Ok(())
}

/// One broker's rounds: the median ratio, and the rates of each round.
async fn bench(broker: Broker) -> Result<(f64, Vec<(f64, f64)>)> {
    let q = Queues::new(broker).await?;
    let n = if broker == Broker::Sqs { SQS_MESSAGES } else { RMQ_MESSAGES };
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let run = run_id();
        let (fsrc, fdst) = (format!("bench-floor-{run}"), format!("bench-floor-{run}-dst"));
        let ssrc = format!("bench-split-{run}");
        let sdst: Vec<String> = ["k1", "k2", "staging"].iter().map(|k| format!("{ssrc}-{k}")).collect();
        for name in [&fsrc, &fdst, &ssrc].into_iter().chain(&sdst) {
            q.create(name, &[]).await?;
        }
        q.send(&fsrc, 0..n, mixed, None).await?;
        q.send(&ssrc, 0..n, mixed, None).await?;
        let mut floor = 0.0;
        let mut splitter = 0.0;
        for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
            let t = Instant::now();
            if which == 0 {
                match broker {
                    Broker::Sqs => sqs_floor(&fsrc, &fdst, n.into()).await?,
                    Broker::Rmq => rmq_floor(&fsrc, &fdst, n.into()).await?,
                }
                floor = f64::from(n) / t.elapsed().as_secs_f64();
            } else {
                split(broker, &run, &ssrc, n.into()).await?;
                splitter = f64::from(n) / t.elapsed().as_secs_f64();
            }
        }
        println!("{broker:?} round {round}: floor {floor:.0} msg/s, splitter {splitter:.0} msg/s ({n} messages)");
        let names: Vec<&str> = [&fsrc, &fdst, &ssrc].into_iter().chain(&sdst).map(String::as_str).collect();
        q.delete(&names).await?;
        rounds.push((floor, splitter));
    }
    let mut ratios: Vec<f64> = rounds.iter().map(|(f, s)| s / f).collect();
    ratios.sort_by(f64::total_cmp);
    Ok((ratios[ROUNDS / 2], rounds))
}

#[tokio::test]
#[ignore = "benchmark: make bench-queues"]
async fn bench_queues() -> Result<()> {
    let (sqs_ratio, _) = bench(Broker::Sqs).await?;
    let (rmq_ratio, _) = bench(Broker::Rmq).await?;
    println!("queues: sqs {sqs_ratio:.2} x floor, rabbitmq {rmq_ratio:.2} x floor");
    Ok(())
}
