//! Queue splitting in previewd: the brokers (`kafka`, `sqs`, `rmq`), one
//! splitter per split target (`splitter`: Kafka's thread; `task`: the async
//! brokers'), the registry of running splitters, and the broker-neutral
//! calls the manager makes (`probe`, `create`, `drain`, ...), each a match
//! on the binding's broker. The manager decides what runs (from its
//! records); this module only runs it.

pub mod control;
pub mod kafka;
pub mod rmq;
pub mod splitter;
pub mod sqs;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;

pub use splitter::{FETCH_AHEAD_KIB, Route, SplitSpec, Splitter};
use task::TaskSplitter;

use crate::model::queue::{QueueBinding, QueueType};

/// What went wrong with a broker (`kind`: Kafka, SQS, RabbitMQ).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{kind} broker {brokers} is unreachable: {reason}")]
    Unavailable { kind: &'static str, brokers: String, reason: String },
    #[error("{} {topic:?} does not exist on {kind} broker {brokers}", if *kind == "Kafka" { "topic" } else { "queue" })]
    TopicMissing { kind: &'static str, topic: String, brokers: String },
    #[error("Kafka: {action}: {source}")]
    Kafka { action: String, source: KafkaError },
    #[error("{kind}: {action}: {reason}")]
    Broker { kind: &'static str, action: String, reason: String },
    #[error("{what}: not done in time")]
    Stuck { what: String },
}

/// A running splitter, of either shape.
enum Runner {
    Thread(Splitter),
    Task(TaskSplitter),
}

impl Runner {
    fn start(spec: SplitSpec) -> Runner {
        match spec.queue_type {
            QueueType::Kafka => Runner::Thread(Splitter::start(spec)),
            QueueType::Sqs | QueueType::Rmq => Runner::Task(TaskSplitter::start(spec)),
        }
    }

    fn stats(&self) -> &splitter::Stats {
        match self {
            Runner::Thread(s) => &s.stats,
            Runner::Task(s) => &s.stats,
        }
    }

    async fn set_routes(&self, routes: Vec<Route>) -> Option<()> {
        match self {
            Runner::Thread(s) => s.set_routes(routes).await,
            Runner::Task(s) => s.set_routes(routes).await,
        }
    }
}

/// How long a route change may take to commit before Start gives up on it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The running splitters, by split id (`namespace/deployment/queue`).
#[derive(Default)]
pub struct Splits {
    running: Mutex<HashMap<String, Arc<Runner>>>,
}

impl Splits {
    /// Runs `id`'s splitter (starting it if need be) with `routes`, and
    /// waits until a transaction has committed under them.
    pub async fn route(&self, id: &str, spec: &SplitSpec, routes: Vec<Route>) -> Result<(), QueueError> {
        let splitter = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.entry(id.to_string()).or_insert_with(|| Arc::new(Runner::start(spec.clone()))).clone()
        };
        let stuck = || {
            let why = splitter.stats().last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
            QueueError::Stuck {
                what: format!(
                    "the splitter of {id} applying its routes{}",
                    why.map(|w| format!(" (last error: {w})")).unwrap_or_default()
                ),
            }
        };
        match tokio::time::timeout(APPLY_TIMEOUT, splitter.set_routes(routes)).await {
            Ok(Some(())) => Ok(()),
            _ => Err(stuck()),
        }
    }

    /// Stops `id`'s splitter, if it runs: its last transaction is committed
    /// or aborted and it has left the group when this returns.
    pub async fn stop(&self, id: &str) {
        let s = self.running.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        match s.as_deref() {
            Some(Runner::Thread(_)) => {
                // A panicked join only means the thread is gone already.
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(Runner::Thread(t)) = s.as_deref() {
                        t.stop()
                    }
                })
                .await;
            }
            Some(Runner::Task(t)) => t.stop().await,
            None => {}
        }
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id)
    }

    /// Records forwarded to `topic` by `id`'s splitter since it started.
    pub fn forwarded(&self, id: &str, topic: &str) -> u64 {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.get(id).map_or(0, |s| {
            s.stats().forwarded.lock().unwrap_or_else(|e| e.into_inner()).get(topic).copied().unwrap_or(0)
        })
    }

    /// Every split's forwarded counts, for metrics: (split, topic, count).
    pub fn all_forwarded(&self) -> Vec<(String, String, u64)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (id, s) in running.iter() {
            for (t, n) in s.stats().forwarded.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                out.push((id.clone(), t.clone(), *n));
            }
        }
        out.sort();
        out
    }
}

/// Runs a blocking broker call (librdkafka's) off the runtime.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, QueueError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| QueueError::Stuck { what: format!("{what}: {e}") })?
}

/// What a probe learns of the original queue.
pub struct Probe {
    /// Kafka's partition count (1 for the others).
    pub partitions: i32,
    /// An SQS FIFO queue.
    pub fifo: bool,
}

/// Reaches the broker and checks the original topic or queue.
pub async fn probe(queue_type: QueueType, brokers: &str, region: &str, queue: &str) -> Result<Probe, QueueError> {
    match queue_type {
        QueueType::Kafka => {
            let (b, t) = (brokers.to_string(), queue.to_string());
            let partitions = blocking(&format!("probing {brokers}"), move || kafka::probe(&b, &t)).await?;
            Ok(Probe { partitions, fifo: false })
        }
        QueueType::Sqs => Ok(Probe { partitions: 1, fifo: sqs::probe(brokers, region, queue).await? }),
        QueueType::Rmq => rmq::probe(brokers, queue).await.map(|()| Probe { partitions: 1, fifo: false }),
    }
}

/// Makes a binding's temporary topics or queues (staging's and its own).
pub async fn create(b: &QueueBinding) -> Result<(), QueueError> {
    match b.queue_type {
        QueueType::Kafka => {
            let topics = [(b.staging_topic.clone(), b.partitions), (b.env_topic.clone(), b.partitions)];
            kafka::create_topics(&b.brokers, &topics).await
        }
        QueueType::Sqs => {
            sqs::create(&b.brokers, &b.region, &b.original_topic, &[&b.staging_topic, &b.env_topic]).await
        }
        QueueType::Rmq => rmq::create(&b.brokers, &[&b.staging_topic, &b.env_topic]).await,
    }
}

/// Deletes temporary topics or queues, and what a drain of them kept.
pub async fn delete(b: &QueueBinding, names: &[&str]) -> Result<(), QueueError> {
    match b.queue_type {
        QueueType::Kafka => {
            kafka::delete_topics(&b.brokers, names).await?;
            for t in names {
                kafka::delete_group(&b.brokers, &format!("preview-drain-{t}")).await?;
            }
            Ok(())
        }
        QueueType::Sqs => sqs::delete(&b.brokers, &b.region, names).await,
        QueueType::Rmq => rmq::delete(&b.brokers, names).await,
    }
}

/// Moves `src`'s unread messages into `dst`; how many moved.
pub async fn drain(b: &QueueBinding, src: &str, dst: &str) -> Result<u64, QueueError> {
    match b.queue_type {
        QueueType::Kafka => {
            let (brokers, s, d, group, parts) =
                (b.brokers.clone(), src.to_string(), dst.to_string(), b.group.clone(), b.partitions);
            blocking(&format!("draining {src}"), move || kafka::drain(&brokers, &s, &d, parts, &group)).await
        }
        QueueType::Sqs => sqs::drain(&b.brokers, &b.region, src, dst, b.fifo).await,
        QueueType::Rmq => rmq::drain(&b.brokers, src, dst).await,
    }
}

/// Consumers of `queue` other than previewd's splitter. Kafka: members of
/// the group that subscribe to it; RabbitMQ: the queue's consumers (less
/// the splitter's, on the original). SQS keeps no consumers: 0, and
/// the manager relies on the pods being gone.
pub async fn readers(b: &QueueBinding, queue: &str, splitter_running: bool) -> Result<usize, QueueError> {
    match b.queue_type {
        QueueType::Kafka => {
            let (brokers, group, t) = (b.brokers.clone(), b.group.clone(), queue.to_string());
            blocking("describing a group", move || kafka::readers(&brokers, &group, &t)).await
        }
        QueueType::Sqs => Ok(0),
        QueueType::Rmq => {
            let (_, consumers) = rmq::depth(&b.brokers, queue).await?;
            let own = usize::from(splitter_running && queue == b.original_topic);
            Ok((consumers as usize).saturating_sub(own))
        }
    }
}

/// Messages of `queue` not yet consumed (Kafka: by the group, in offsets;
/// SQS: visible, in flight and delayed; RabbitMQ: ready).
pub async fn lag(b: &QueueBinding, queue: &str) -> Result<i64, QueueError> {
    match b.queue_type {
        QueueType::Kafka => {
            let (brokers, group, t, parts) = (b.brokers.clone(), b.group.clone(), queue.to_string(), b.partitions);
            blocking("reading a lag", move || kafka::lag(&brokers, &group, &t, parts)).await
        }
        QueueType::Sqs => sqs::depth(&b.brokers, &b.region, queue).await,
        QueueType::Rmq => Ok(i64::from(rmq::depth(&b.brokers, queue).await?.0)),
    }
}
