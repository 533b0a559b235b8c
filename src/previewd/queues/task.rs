//! The splitter of the async brokers (SQS, RabbitMQ): a tokio task that
//! runs the broker's session, and runs it again after an error (with
//! backoff). Routes come in through a watch channel; the session reports
//! back the version that is in force.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::control::{Control, Routes};
use super::splitter::{Route, SplitSpec, Stats};
use super::{QueueError, rmq, sqs};
use crate::model::queue::QueueType;

/// A running async splitter.
pub struct TaskSplitter {
    routes: watch::Sender<Arc<Routes>>,
    applied: watch::Receiver<u64>,
    stop: watch::Sender<bool>,
    pub stats: Arc<Stats>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TaskSplitter {
    pub fn start(spec: SplitSpec) -> TaskSplitter {
        let (routes, routes_rx) = watch::channel(Arc::new(Routes::default()));
        let (applied_tx, applied) = watch::channel(0);
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(Stats::default());
        let ctl = Control::new(routes_rx, applied_tx, stop_rx);
        let task = tokio::spawn(run(spec, ctl, stats.clone()));
        TaskSplitter { routes, applied, stop, stats, task: Mutex::new(Some(task)) }
    }

    /// As [`super::Splitter::set_routes`]: resolves once the routes are in
    /// force; `None` if the splitter stopped first.
    pub async fn set_routes(&self, list: Vec<Route>) -> Option<()> {
        let mut version = 0;
        self.routes.send_modify(|r| {
            version = r.version + 1;
            *r = Arc::new(Routes { version, list });
        });
        let mut applied = self.applied.clone();
        applied.wait_for(|v| *v >= version).await.ok().map(|_| ())
    }

    /// Stops after the messages in flight are confirmed (or given back).
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}

impl Drop for TaskSplitter {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn run(spec: SplitSpec, mut ctl: Control, stats: Arc<Stats>) {
    let mut backoff = Duration::from_millis(500);
    while !ctl.stopped() {
        let r = match spec.queue_type {
            QueueType::Sqs => sqs::session(&spec, &mut ctl, &stats).await,
            QueueType::Rmq => rmq::session(&spec, &mut ctl, &stats).await,
            QueueType::Kafka => Err(QueueError::Stuck { what: "a Kafka split on the async splitter".into() }),
        };
        match r {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(queue = %spec.source, error = %e, "splitter restarting");
                stats.failed(&e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ctl.stop_asked() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}
