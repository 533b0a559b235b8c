//! What previewd asks of a RabbitMQ broker, through lapin (AMQP 0-9-1):
//! reach it and check a queue, make and delete the temporary queues, move
//! messages (the splitter's session and the drain), and count a queue's
//! messages and consumers.
//!
//! Moving is at-least-once: a delivery is acked to its source only after a
//! publisher confirm from the broker for every copy, so a crash in between
//! delivers it again (the copy then exists twice). Properties and headers
//! are kept; publishes are mandatory, so a copy to a missing queue is an
//! error, never a silent drop.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesOrdered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, PublisherConfirm};

use super::QueueError;
use super::control::Control;
use super::splitter::{SplitSpec, Stats, route_for};

const KIND: &str = "RabbitMQ";
/// Deliveries in flight per splitter (the consumer's prefetch): enough to
/// keep publishes and confirms streaming, little memory.
const PREFETCH: u16 = 256;
/// The splitter's consumer tag, told apart from the target's consumers.
pub const SPLITTER_TAG: &str = "preview-splitter";

/// The URL without its user and password, for messages.
pub fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

fn broker(url: &str, action: impl Into<String>) -> impl FnOnce(lapin::Error) -> QueueError {
    let (url, action) = (redact(url), action.into());
    move |e| match e.kind() {
        ErrorKind::IOError(_) => QueueError::Unavailable { kind: KIND, brokers: url, reason: e.to_string() },
        _ => QueueError::Broker { kind: KIND, action, reason: e.to_string() },
    }
}

fn missing(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if *p.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

pub async fn connect(url: &str) -> Result<Connection, QueueError> {
    match tokio::time::timeout(Duration::from_secs(5), Connection::connect(url, ConnectionProperties::default())).await
    {
        Ok(r) => r.map_err(broker(url, "connecting")),
        Err(_) => Err(QueueError::Unavailable { kind: KIND, brokers: redact(url), reason: "no answer in 5 s".into() }),
    }
}

/// (messages ready, consumers) of `queue`; `None` if it does not exist. A
/// passive declare on a channel of its own (a missing queue closes it).
async fn counts(conn: &Connection, url: &str, queue: &str) -> Result<Option<(u32, u32)>, QueueError> {
    let ch = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match ch.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(q) => {
            let _ = ch.close(200, "done".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(e) if missing(&e) => Ok(None),
        Err(e) => Err(broker(url, format!("checking queue {queue}"))(e)),
    }
}

/// Reaches the broker and checks that `queue` exists.
pub async fn probe(url: &str, queue: &str) -> Result<(), QueueError> {
    let conn = connect(url).await?;
    let found = counts(&conn, url, queue).await?;
    let _ = conn.close(200, "done".into()).await;
    found.map(|_| ()).ok_or_else(|| QueueError::TopicMissing {
        kind: KIND,
        topic: queue.to_string(),
        brokers: redact(url),
    })
}

/// Makes each queue, durable; one that exists is fine. The original's
/// arguments (type, TTL, dead-lettering) cannot be read over AMQP, so the
/// temporary queues are plain classic queues.
pub async fn create(url: &str, names: &[&str]) -> Result<(), QueueError> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    for name in names {
        ch.queue_declare((*name).into(), QueueDeclareOptions::durable(), FieldTable::default())
            .await
            .map_err(broker(url, format!("declaring queue {name}")))?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// Deletes queues (RabbitMQ takes deleting a missing queue as done).
pub async fn delete(url: &str, names: &[&str]) -> Result<(), QueueError> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    for name in names {
        ch.queue_delete((*name).into(), QueueDeleteOptions::default())
            .await
            .map_err(broker(url, format!("deleting queue {name}")))?;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// `queue`'s (ready messages, consumers); (0, 0) when it is gone.
pub async fn depth(url: &str, queue: &str) -> Result<(u32, u32), QueueError> {
    let conn = connect(url).await?;
    let c = counts(&conn, url, queue).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(c.unwrap_or((0, 0)))
}

/// A delivery's headers, as a filter sees them (strings and byte arrays;
/// other AMQP types are not compared).
fn headers(p: &BasicProperties) -> Vec<(&str, &[u8])> {
    p.headers()
        .iter()
        .flat_map(|t| t.inner().iter())
        .filter_map(|(k, v)| match v {
            AMQPValue::LongString(s) => Some((k.as_str(), s.as_bytes())),
            AMQPValue::ShortString(s) => Some((k.as_str(), s.as_str().as_bytes())),
            AMQPValue::ByteArray(b) => Some((k.as_str(), b.as_slice())),
            _ => None,
        })
        .collect()
}

async fn publish(
    out: &Channel,
    url: &str,
    queue: &str,
    data: &[u8],
    props: &BasicProperties,
) -> Result<PublisherConfirm, QueueError> {
    let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
    out.basic_publish("".into(), queue.into(), opts, data, props.clone())
        .await
        .map_err(broker(url, format!("publishing to {queue}")))
}

/// Waits for a copy's confirm: a nack, or a copy returned as unroutable
/// (its queue is gone), is an error.
async fn confirmed(c: PublisherConfirm, url: &str, queue: &str) -> Result<(), QueueError> {
    match c.await.map_err(broker(url, format!("confirming a publish to {queue}")))? {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        other => Err(QueueError::Broker {
            kind: KIND,
            action: format!("publishing to {queue}"),
            reason: format!("not stored: {other:?}").chars().take(200).collect(),
        }),
    }
}

/// The splitter: consumes the original queue and publishes each delivery to
/// the environment whose filter matches it (and to staging when mirrored),
/// or else to staging's queue; acks it once every copy is confirmed.
/// Returns `Ok` when stopped (what is unacked then is delivered again).
pub async fn session(spec: &SplitSpec, ctl: &mut Control, stats: &Stats) -> Result<(), QueueError> {
    let url = spec.brokers.as_str();
    let conn = connect(url).await?;
    let input = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    input.basic_qos(PREFETCH, BasicQosOptions::default()).await.map_err(broker(url, "setting the prefetch"))?;
    let out = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    out.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker(url, "enabling confirms"))?;
    let mut consumer = input
        .basic_consume(
            spec.source.as_str().into(),
            SPLITTER_TAG.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker(url, format!("consuming {}", spec.source)))?;
    let mut routes = ctl.routes();
    // Connected and consuming: the routes are in force.
    ctl.applied(routes.version);
    let mut pending = FuturesOrdered::new();
    let result = loop {
        tokio::select! {
            _ = ctl.changed() => {
                if ctl.stopped() {
                    break Ok(());
                }
                routes = ctl.routes();
                ctl.applied(routes.version);
            }
            Some(done) = pending.next(), if !pending.is_empty() => {
                let (tag, dests): (u64, Vec<String>) = match done {
                    Ok(d) => d,
                    Err(e) => break Err(e),
                };
                if let Err(e) = input.basic_ack(tag, BasicAckOptions::default()).await {
                    break Err(broker(url, "acking")(e));
                }
                dests.iter().for_each(|d| stats.add(d, 1));
            }
            d = consumer.next(), if pending.len() < PREFETCH as usize => {
                let d = match d {
                    Some(Ok(d)) => d,
                    Some(Err(e)) => break Err(broker(url, format!("consuming {}", spec.source))(e)),
                    None => break Err(QueueError::Broker { kind: KIND, action: format!("consuming {}", spec.source), reason: "the broker cancelled the consumer".into() }),
                };
                let (first, also) = route_for(&routes.list, &spec.staging, &headers(&d.properties));
                let mut dests = vec![first.to_string()];
                if also {
                    dests.push(spec.staging.clone());
                }
                let mut confirms = Vec::new();
                for q in &dests {
                    match publish(&out, url, q, &d.data, &d.properties).await {
                        Ok(c) => confirms.push((q.clone(), c)),
                        Err(e) => return Err(e),
                    }
                }
                let (tag, url) = (d.delivery_tag, url.to_string());
                pending.push_back(async move {
                    for (q, c) in confirms {
                        confirmed(c, &url, &q).await?;
                    }
                    Ok((tag, dests))
                });
            }
        }
    };
    // What is confirmed is acked; the rest comes back to the queue when the
    // connection closes.
    if result.is_ok() {
        while let Some(Ok((tag, dests))) = pending.next().await {
            if input.basic_ack(tag, BasicAckOptions::default()).await.is_err() {
                break;
            }
            dests.iter().for_each(|d| stats.add(d, 1));
        }
    }
    let _ = conn.close(200, "splitter stopped".into()).await;
    result
}

/// Moves every message of `src` into `dst` until `src` is empty (messages a
/// gone consumer had unacked come back to it). Returns how many moved.
pub async fn drain(url: &str, src: &str, dst: &str) -> Result<u64, QueueError> {
    let conn = connect(url).await?;
    if counts(&conn, url, src).await?.is_none() {
        return Ok(0); // drained and deleted already
    }
    let input = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    let out = conn.create_channel().await.map_err(broker(url, "opening a channel"))?;
    out.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker(url, "enabling confirms"))?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut moved = 0u64;
    loop {
        let mut batch = Vec::new();
        while batch.len() < PREFETCH as usize {
            let got = input
                .basic_get(src.into(), BasicGetOptions::default())
                .await
                .map_err(broker(url, format!("reading {src}")))?;
            let Some(m) = got else { break };
            let c = publish(&out, url, dst, &m.delivery.data, &m.delivery.properties).await?;
            batch.push((m.delivery.delivery_tag, c));
        }
        let Some(&(last, _)) = batch.last() else {
            if counts(&conn, url, src).await?.is_none_or(|(n, _)| n == 0) {
                break;
            }
            if Instant::now() > deadline {
                return Err(QueueError::Stuck { what: format!("draining {src} into {dst}") });
            }
            // Held unacked by a consumer that is closing: it comes back.
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        moved += batch.len() as u64;
        for (_, c) in batch {
            confirmed(c, url, dst).await?;
        }
        input
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await
            .map_err(broker(url, format!("acking {src}")))?;
    }
    let _ = conn.close(200, "drained".into()).await;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(super::redact("amqp://staging:pw@198.18.255.254:5672/%2f"), "amqp://198.18.255.254:5672/%2f");
        assert_eq!(super::redact("amqp://q:5672"), "amqp://q:5672");
    }
}
