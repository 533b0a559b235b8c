//! What previewd asks of an SQS endpoint (AWS, ElasticMQ, any SQS-compatible
//! server), through the official SDK: reach it and read a queue's
//! attributes, make the temporary queues with the original's attributes,
//! move messages (the splitter's session and the drain), and count what a
//! queue holds.
//!
//! Moving is at-least-once: a message is deleted from its source only after
//! SQS accepted its copy, so a crash in between sends it again. On FIFO
//! queues the copy's deduplication id is the message's id in its source, so
//! SQS drops such a repeat within its 5-minute deduplication window.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region, timeout::TimeoutConfig};
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};

use super::QueueError;
use super::control::Control;
use super::splitter::{SplitSpec, Stats, route_for};

const KIND: &str = "SQS";
/// The most messages one receive returns (SQS's limit).
const BATCH: i32 = 10;
/// Receivers per standard queue's splitter: SQS answers each call in a
/// round trip, so several in flight keep up with the producers. A FIFO
/// queue has one, so that each group's messages go on in order.
const WORKERS: usize = 4;

/// The attributes a temporary queue copies from the original.
const COPIED: &[QueueAttributeName] = &[
    QueueAttributeName::VisibilityTimeout,
    QueueAttributeName::MessageRetentionPeriod,
    QueueAttributeName::RedrivePolicy,
    QueueAttributeName::FifoQueue,
    QueueAttributeName::ContentBasedDeduplication,
    QueueAttributeName::DelaySeconds,
    QueueAttributeName::MaximumMessageSize,
    QueueAttributeName::ReceiveMessageWaitTimeSeconds,
];

/// A client for `endpoint`. Credentials are previewd's own (the standard
/// AWS variables), else a placeholder that local servers accept. Not cached:
/// a client's pooled connections belong to the runtime that made them.
pub fn client(endpoint: &str, region: &str) -> Client {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let creds = Credentials::new(
        var("AWS_ACCESS_KEY_ID").unwrap_or_else(|| "preview".into()),
        var("AWS_SECRET_ACCESS_KEY").unwrap_or_else(|| "preview".into()),
        var("AWS_SESSION_TOKEN"),
        None,
        "previewd",
    );
    let region = Some(region.to_string()).filter(|r| !r.is_empty()).or_else(|| var("AWS_REGION"));
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(region.unwrap_or_else(|| "us-east-1".into())))
        .credentials_provider(creds)
        .http_client(http)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .build();
    Client::from_conf(config)
}

/// A queue's name from what a variable holds: a name, or a queue URL.
pub fn queue_name(name_or_url: &str) -> &str {
    name_or_url.rsplit('/').next().unwrap_or(name_or_url)
}

/// An SDK error as a [`QueueError`]: no answer is `Unavailable`, naming the endpoint.
fn sdk<E: ProvideErrorMetadata + std::error::Error + 'static, R: std::fmt::Debug>(
    endpoint: &str,
    action: impl Into<String>,
) -> impl FnOnce(SdkError<E, R>) -> QueueError {
    let (endpoint, action) = (endpoint.to_string(), action.into());
    move |e| match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => QueueError::Unavailable {
            kind: KIND,
            brokers: endpoint,
            reason: std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_else(|| e.to_string()),
        },
        _ => {
            let reason = match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                _ => e.to_string(),
            };
            QueueError::Broker { kind: KIND, action, reason }
        }
    }
}

/// The URL of queue `name_or_url`; `TopicMissing` when it does not exist.
pub async fn url(c: &Client, endpoint: &str, name_or_url: &str) -> Result<String, QueueError> {
    let name = queue_name(name_or_url);
    match c.get_queue_url().queue_name(name).send().await {
        Ok(o) => Ok(o.queue_url.unwrap_or_default()),
        Err(e) if e.code().is_some_and(|c| c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist")) => {
            Err(QueueError::TopicMissing { kind: KIND, topic: name.to_string(), brokers: endpoint.to_string() })
        }
        Err(e) => Err(sdk(endpoint, format!("finding queue {name}"))(e)),
    }
}

async fn attributes(c: &Client, endpoint: &str, url: &str) -> Result<HashMap<QueueAttributeName, String>, QueueError> {
    let out = c
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .map_err(sdk(endpoint, format!("reading {url}'s attributes")))?;
    Ok(out.attributes.unwrap_or_default())
}

/// Reaches the endpoint; whether `queue` is a FIFO queue.
pub async fn probe(endpoint: &str, region: &str, queue: &str) -> Result<bool, QueueError> {
    let c = client(endpoint, region);
    let u = url(&c, endpoint, queue).await?;
    let attrs = attributes(&c, endpoint, &u).await?;
    Ok(attrs.get(&QueueAttributeName::FifoQueue).is_some_and(|v| v == "true"))
}

/// Makes each of `names` with `original`'s attributes; one that exists is fine.
pub async fn create(endpoint: &str, region: &str, original: &str, names: &[&str]) -> Result<(), QueueError> {
    let c = client(endpoint, region);
    let attrs = attributes(&c, endpoint, &url(&c, endpoint, original).await?).await?;
    let copied: HashMap<QueueAttributeName, String> = attrs.into_iter().filter(|(k, _)| COPIED.contains(k)).collect();
    for name in names {
        c.create_queue()
            .queue_name(*name)
            .set_attributes(Some(copied.clone()))
            .send()
            .await
            .map_err(sdk(endpoint, format!("creating queue {name}")))?;
    }
    Ok(())
}

/// Deletes queues; one already gone is fine.
pub async fn delete(endpoint: &str, region: &str, names: &[&str]) -> Result<(), QueueError> {
    let c = client(endpoint, region);
    for name in names {
        match url(&c, endpoint, name).await {
            Ok(u) => {
                c.delete_queue().queue_url(&u).send().await.map_err(sdk(endpoint, format!("deleting {name}")))?;
            }
            Err(QueueError::TopicMissing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Messages in `queue`: visible, in flight and delayed (SQS's approximate counts).
pub async fn depth(endpoint: &str, region: &str, queue: &str) -> Result<i64, QueueError> {
    let c = client(endpoint, region);
    depth_at(&c, endpoint, &url(&c, endpoint, queue).await?).await
}

async fn depth_at(c: &Client, endpoint: &str, url: &str) -> Result<i64, QueueError> {
    let attrs = attributes(c, endpoint, url).await?;
    Ok([
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ]
    .iter()
    .filter_map(|k| attrs.get(k)?.parse::<i64>().ok())
    .sum())
}

/// A message's attributes, as a filter sees them (binary ones as bytes).
fn headers(m: &Message) -> Vec<(&str, &[u8])> {
    m.message_attributes
        .iter()
        .flatten()
        .filter_map(|(k, v)| {
            let value = v.string_value.as_deref().map(str::as_bytes).or(v.binary_value.as_ref().map(|b| b.as_ref()))?;
            Some((k.as_str(), value))
        })
        .collect()
}

/// A copy of `m` to send: body and attributes; on a FIFO queue its group,
/// and as deduplication id the id of `m` in the queue it is moved from: the
/// same if this copy is sent again, so SQS drops the repeat, and new at each
/// move. (The original's own deduplication id would not do: a message the
/// last Clean moves back to the original queue within 5 minutes of its
/// first send would be dropped there as a repeat.)
fn copy_of(id: usize, m: &Message, fifo: bool) -> Result<SendMessageBatchRequestEntry, QueueError> {
    let mut e = SendMessageBatchRequestEntry::builder()
        .id(id.to_string())
        .message_body(m.body.clone().unwrap_or_default())
        .set_message_attributes(m.message_attributes.clone());
    if fifo {
        let group = m.attributes.as_ref().and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId)).cloned();
        e = e.set_message_group_id(group).set_message_deduplication_id(m.message_id.clone());
    }
    e.build().map_err(|e| QueueError::Broker { kind: KIND, action: "copying a message".into(), reason: e.to_string() })
}

/// One receive from `src` and its messages sent on, each to the queues
/// `dests(message)` names (URLs), then deleted from `src` once every copy
/// was accepted. Returns how many were received, and the sends by URL.
async fn move_batch(
    c: &Client,
    endpoint: &str,
    src: &str,
    fifo: bool,
    wait: i32,
    dests: impl Fn(&Message) -> Vec<String>,
) -> Result<(usize, HashMap<String, u64>), QueueError> {
    let got = c
        .receive_message()
        .queue_url(src)
        .max_number_of_messages(BATCH)
        .wait_time_seconds(wait)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .map_err(sdk(endpoint, format!("receiving from {src}")))?;
    let msgs = got.messages.unwrap_or_default();
    if msgs.is_empty() {
        return Ok((0, HashMap::new()));
    }
    // Per destination, in receive order (a FIFO group's order).
    let mut by_dest: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        for d in dests(m) {
            match by_dest.iter_mut().find(|(u, _)| *u == d) {
                Some((_, v)) => v.push(i),
                None => by_dest.push((d, vec![i])),
            }
        }
    }
    let msgs = &msgs;
    let sends = by_dest.iter().map(|(dest, idx)| async move {
        let entries = idx.iter().map(|&i| copy_of(i, &msgs[i], fifo)).collect::<Result<Vec<_>, _>>()?;
        let out = c
            .send_message_batch()
            .queue_url(dest)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sdk(endpoint, format!("sending to {dest}")))?;
        let failed: Vec<usize> = out.failed.iter().filter_map(|f| f.id.parse().ok()).collect();
        if let Some(f) = out.failed.first() {
            tracing::warn!(queue = %dest, code = %f.code, message = ?f.message, "SQS refused copies; they are sent again");
        }
        Ok::<_, QueueError>((dest.clone(), idx.len() - failed.len(), failed))
    });
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut failed = vec![false; msgs.len()];
    for r in futures::future::join_all(sends).await {
        match r {
            Ok((dest, n, f)) => {
                *sent.entry(dest).or_default() += n as u64;
                f.into_iter().for_each(|i| failed[i] = true);
            }
            // Not deleted: every message comes back after its visibility
            // timeout, and the copies that went are sent again.
            Err(e) => return Err(e),
        }
    }
    let deletes: Vec<DeleteMessageBatchRequestEntry> = msgs
        .iter()
        .enumerate()
        .filter(|(i, _)| !failed[*i])
        .filter_map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .set_receipt_handle(m.receipt_handle.clone())
                .build()
                .ok()
        })
        .collect();
    if !deletes.is_empty() {
        c.delete_message_batch()
            .queue_url(src)
            .set_entries(Some(deletes))
            .send()
            .await
            .map_err(sdk(endpoint, format!("deleting from {src}")))?;
    }
    Ok((msgs.len(), sent))
}

/// The splitter: receives the original queue and sends each message to the
/// environment whose filter matches it (and to staging when mirrored), or
/// else to staging's queue. Returns `Ok` when stopped.
pub async fn session(spec: &SplitSpec, ctl: &mut Control, stats: &Stats) -> Result<(), QueueError> {
    let c = client(&spec.brokers, &spec.region);
    let src = url(&c, &spec.brokers, &spec.source).await?;
    let staging = url(&c, &spec.brokers, &spec.staging).await?;
    let workers = if spec.fifo { 1 } else { WORKERS };
    // Queue name → URL, and back (stats count by name).
    let mut urls: HashMap<String, String> = HashMap::new();
    let mut names: HashMap<String, String> = HashMap::from([(staging.clone(), spec.staging.clone())]);
    while !ctl.stopped() {
        let routes = ctl.routes();
        for r in &routes.list {
            if !urls.contains_key(&r.topic) {
                let u = url(&c, &spec.brokers, &r.topic).await?;
                names.insert(u.clone(), r.topic.clone());
                urls.insert(r.topic.clone(), u);
            }
        }
        let dests = |m: &Message| -> Vec<String> {
            let (first, also) = route_for(&routes.list, &spec.staging, &headers(m));
            let first = urls.get(first).cloned().unwrap_or_else(|| staging.clone());
            if also { vec![first, staging.clone()] } else { vec![first] }
        };
        // Receives of 1 s, so that new routes and a stop are seen soon.
        let rounds = (0..workers).map(|_| move_batch(&c, &spec.brokers, &src, spec.fifo, 1, &dests));
        let mut err = None;
        for r in futures::future::join_all(rounds).await {
            match r {
                Ok((_, sent)) => {
                    for (u, k) in sent {
                        stats.add(names.get(&u).map_or(spec.staging.as_str(), String::as_str), k);
                    }
                }
                Err(e) => err = Some(e),
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        // A receive under these routes succeeded: they are in force.
        ctl.applied(routes.version);
    }
    Ok(())
}

/// Moves every message of `src` into `dst` (URLs looked up by name), until
/// `src` holds none, in flight or delayed ones included (an in-flight one
/// comes back when its visibility timeout ends). Returns how many moved.
pub async fn drain(endpoint: &str, region: &str, src: &str, dst: &str, fifo: bool) -> Result<u64, QueueError> {
    let c = client(endpoint, region);
    let src_url = match url(&c, endpoint, src).await {
        Ok(u) => u,
        Err(QueueError::TopicMissing { .. }) => return Ok(0), // drained and deleted already
        Err(e) => return Err(e),
    };
    let dst_url = url(&c, endpoint, dst).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut moved = 0u64;
    loop {
        let (n, _) = move_batch(&c, endpoint, &src_url, fifo, 1, |_| vec![dst_url.clone()]).await?;
        moved += n as u64;
        if n == 0 && depth_at(&c, endpoint, &src_url).await? == 0 {
            return Ok(moved);
        }
        if Instant::now() > deadline {
            return Err(QueueError::Stuck { what: format!("draining {src} into {dst}") });
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_queue_is_named_by_name_or_url() {
        assert_eq!(super::queue_name("orders"), "orders");
        assert_eq!(super::queue_name("http://198.18.255.254:9324/000000000000/orders.fifo"), "orders.fifo");
    }
}
