//! preview-echo's SQS and RabbitMQ consumers. Each reads its queue
//! (`SQS_QUEUE` at `SQS_ENDPOINT`; `AMQP_QUEUE` at `AMQP_URL`), logs each
//! message, and records it in a record queue when one is named
//! (`SQS_RECORD_QUEUE`, `AMQP_RECORD_QUEUE`): the body is
//! `<by> <pod> <n> <id>`, `by` the pod's `PREVIEW_KEY` or `staging`, `n`
//! this consumer's count (so a test sees the order it consumed in), `id`
//! the message's `id` attribute or header. A message is deleted or acked
//! only after its record was accepted: at least once. `send` sends numbered
//! messages with headers (the demo's producer).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName, SendMessageBatchRequestEntry};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use preview::previewd::queues::sqs;

/// Set on SIGTERM: the consumer stops after the batch in hand.
pub static STOP: AtomicBool = AtomicBool::new(false);

pub struct Settings {
    pub endpoint: String,
    pub queue: String,
    pub record_to: String,
    pub by: String,
    pub pod: String,
}

/// Runs until [`STOP`]; a failed session is logged and started again.
pub async fn run(s: Settings, sqs_mode: bool) {
    while !STOP.load(Ordering::SeqCst) {
        let r = if sqs_mode { sqs_session(&s).await } else { rmq_session(&s).await };
        if let Err(e) = r {
            eprintln!("preview-echo: {}: {e:#}; starting again", s.queue);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

async fn sqs_session(s: &Settings) -> anyhow::Result<()> {
    let c = sqs::client(&s.endpoint, "");
    let queue = sqs::url(&c, &s.endpoint, &s.queue).await?;
    let record = if s.record_to.is_empty() { None } else { Some(sqs::url(&c, &s.endpoint, &s.record_to).await?) };
    eprintln!("preview-echo: consuming SQS {} as {}", s.queue, s.by);
    let mut n = 0u64;
    while !STOP.load(Ordering::SeqCst) {
        let got = c
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await
            .context("receiving")?;
        let msgs = got.messages.unwrap_or_default();
        if msgs.is_empty() {
            continue;
        }
        let mut records = Vec::new();
        let mut deletes = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let id = m
                .message_attributes
                .as_ref()
                .and_then(|a| a.get("id"))
                .and_then(|v| v.string_value.clone())
                .unwrap_or_default();
            n += 1;
            eprintln!("consumed id={id} from {} as {}", s.queue, s.by);
            let body = format!("{} {} {n} {id}", s.by, s.pod);
            records.push(SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(body).build()?);
            deletes.push(
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .set_receipt_handle(m.receipt_handle.clone())
                    .build()?,
            );
        }
        if let Some(r) = &record {
            let out = c.send_message_batch().queue_url(r).set_entries(Some(records)).send().await?;
            anyhow::ensure!(out.failed.is_empty(), "records refused: {:?}", out.failed);
        }
        c.delete_message_batch().queue_url(&queue).set_entries(Some(deletes)).send().await.context("deleting")?;
    }
    Ok(())
}

async fn rmq_session(s: &Settings) -> anyhow::Result<()> {
    let conn = Connection::connect(&s.endpoint, ConnectionProperties::default()).await?;
    let input = conn.create_channel().await?;
    input.basic_qos(50, BasicQosOptions::default()).await?;
    let out = conn.create_channel().await?;
    out.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut consumer = input
        .basic_consume(s.queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    eprintln!("preview-echo: consuming RabbitMQ {} as {}", s.queue, s.by);
    let mut n = 0u64;
    while !STOP.load(Ordering::SeqCst) {
        let next = tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next()).await;
        let d = match next {
            Err(_) => continue,
            Ok(None) => anyhow::bail!("the consumer was cancelled"),
            Ok(Some(d)) => d?,
        };
        let id = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("id"))
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        n += 1;
        eprintln!("consumed id={id} from {} as {}", s.queue, s.by);
        if !s.record_to.is_empty() {
            let body = format!("{} {} {n} {id}", s.by, s.pod);
            let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
            let c = out
                .basic_publish(
                    "".into(),
                    s.record_to.as_str().into(),
                    opts,
                    body.as_bytes(),
                    BasicProperties::default(),
                )
                .await?
                .await?;
            anyhow::ensure!(matches!(c, lapin::Confirmation::Ack(None)), "record not stored: {c:?}");
        }
        input.basic_ack(d.delivery_tag, BasicAckOptions::default()).await?;
    }
    // Closing gives back what is unacked.
    let _ = conn.close(200, "stopping".into()).await;
    Ok(())
}

/// Sends `count` messages to `queue` (made if missing), ids
/// `first..first+count` in an `id` attribute (SQS) or header (RabbitMQ),
/// with `headers` besides.
pub async fn send(
    sqs_mode: bool,
    endpoint: &str,
    queue: &str,
    headers: &[(String, String)],
    first: u64,
    count: u64,
) -> anyhow::Result<()> {
    let all = |id: u64| std::iter::once(("id".to_string(), id.to_string())).chain(headers.iter().cloned());
    if sqs_mode {
        let c = sqs::client(endpoint, "");
        let url = c.create_queue().queue_name(sqs::queue_name(queue)).send().await?.queue_url.unwrap_or_default();
        for id in first..first + count {
            let mut m = c.send_message().queue_url(&url).message_body(format!("message {id}"));
            for (k, v) in all(id) {
                let attr = aws_sdk_sqs::types::MessageAttributeValue::builder().data_type("String").string_value(v);
                m = m.message_attributes(k, attr.build()?);
            }
            m.send().await.context("sending")?;
        }
        return Ok(());
    }
    let conn = Connection::connect(endpoint, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(queue.into(), lapin::options::QueueDeclareOptions::durable(), FieldTable::default()).await?;
    for id in first..first + count {
        let mut h = FieldTable::default();
        for (k, v) in all(id) {
            h.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
        let props = BasicProperties::default().with_headers(h).with_delivery_mode(2);
        let c =
            ch.basic_publish("".into(), queue.into(), opts, format!("message {id}").as_bytes(), props).await?.await?;
        anyhow::ensure!(matches!(c, lapin::Confirmation::Ack(None)), "not stored: {c:?}");
    }
    let _ = conn.close(200, "sent".into()).await;
    Ok(())
}
