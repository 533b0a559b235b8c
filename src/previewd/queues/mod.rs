//! Queue splitting in previewd: the brokers (`kafka`), one splitter per
//! split target (`splitter`), and the registry of running splitters. The
//! manager decides what runs (from its records); this module only runs it.

pub mod kafka;
pub mod splitter;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;

pub use splitter::{Route, SplitSpec, Splitter};

/// What went wrong with a broker.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Kafka broker {brokers} is unreachable: {reason}")]
    Unavailable { brokers: String, reason: String },
    #[error("topic {topic:?} does not exist on Kafka broker {brokers}")]
    TopicMissing { topic: String, brokers: String },
    #[error("Kafka: {action}: {source}")]
    Kafka { action: String, source: KafkaError },
    #[error("{what}: not done in time")]
    Stuck { what: String },
}

/// How long a route change may take to commit before Start gives up on it.
const APPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// The running splitters, by split id (`namespace/deployment/queue`).
#[derive(Default)]
pub struct Splits {
    running: Mutex<HashMap<String, Arc<Splitter>>>,
}

impl Splits {
    /// Runs `id`'s splitter (starting it if need be) with `routes`, and
    /// waits until a transaction has committed under them.
    pub async fn route(&self, id: &str, spec: &SplitSpec, routes: Vec<Route>) -> Result<(), QueueError> {
        let splitter = {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            running.entry(id.to_string()).or_insert_with(|| Arc::new(Splitter::start(spec.clone()))).clone()
        };
        let stuck = || {
            let why = splitter.stats.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
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
        if let Some(s) = s {
            // A panicked join only means the thread is gone already.
            let _ = tokio::task::spawn_blocking(move || s.stop()).await;
        }
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).contains_key(id)
    }

    /// Records forwarded to `topic` by `id`'s splitter since it started.
    pub fn forwarded(&self, id: &str, topic: &str) -> u64 {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running
            .get(id)
            .map_or(0, |s| s.stats.forwarded.lock().unwrap_or_else(|e| e.into_inner()).get(topic).copied().unwrap_or(0))
    }

    /// Every split's forwarded counts, for metrics: (split, topic, count).
    pub fn all_forwarded(&self) -> Vec<(String, String, u64)> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (id, s) in running.iter() {
            for (t, n) in s.stats.forwarded.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                out.push((id.clone(), t.clone(), *n));
            }
        }
        out.sort();
        out
    }
}
