//! The environment manager: the one place that changes environments.
//!
//! It validates requests, writes intent to the store before touching the
//! cluster, creates and deletes objects, keeps the status view, and
//! publishes ordered change events to watchers. Mutations of one key are
//! serialised by a per-key lock; the view's lock is never held across an
//! `.await`. Start and AddPod are in `start`, Clean and expiry in `clean`,
//! recovery in `recover`, split queues in `queues`, and Status in `status`
//! over the `view`.

mod authorize;
mod clean;
mod dbs;
mod dbstats;
mod error;
mod queues;
pub mod recover;
mod share;
mod start;
mod status;
mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

pub use error::Error;
pub use view::{AgentPlan, Event, PodAgents, Selector, TargetRef, glob_match};

use crate::model::Key;
use crate::previewd::auth::Auth;
use crate::previewd::cluster::Cluster;
use crate::previewd::metrics::{Gauges, ServerMetrics};
use crate::previewd::store::Store;
use view::View;

/// Server-side policy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub allow_infinite: bool,
    pub default_namespace: String,
    /// Points at which to stop and wait to be killed (tests of crash safety).
    pub pause_at: Option<String>,
    pub limits: Limits,
    /// Links are `http://<slug>.<share_domain>/`; empty: sharing is off.
    pub share_domain: String,
}

/// Bounds on what one request may ask for. Going over one is
/// RESOURCE_EXHAUSTED naming the limit; a denied namespace is
/// PERMISSION_DENIED for everyone.
#[derive(Debug, Clone)]
pub struct Limits {
    pub deny_namespaces: Vec<String>,
    pub max_pods_per_env: usize,
    pub max_filter_regexes: usize,
    pub max_regex_bytes: usize,
    pub max_replicas: u32,
    pub max_envs_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deny_namespaces: vec!["kube-system".into()],
            max_pods_per_env: 20,
            max_filter_regexes: 16,
            max_regex_bytes: 1024,
            max_replicas: 10,
            max_envs_per_user: 20,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            allow_infinite: false,
            default_namespace: "default".into(),
            pause_at: None,
            limits: Limits::default(),
            share_domain: String::new(),
        }
    }
}

/// What Clean selects.
#[derive(Debug, Clone)]
pub enum CleanSelector {
    Key(Key),
    Glob(String),
    AllExpired,
}

/// How many events a watcher may fall behind before it is resynced.
const EVENT_BUFFER: usize = 1024;

pub struct Manager {
    store: Store,
    cluster: Cluster,
    settings: Settings,
    view: Mutex<View>,
    events: broadcast::Sender<Event>,
    key_locks: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<ServerMetrics>,
    auth: Arc<Auth>,
    /// The ready count last written to each environment's object.
    ready_counts: Mutex<HashMap<String, usize>>,
    /// The running queue splitters.
    splits: crate::previewd::queues::Splits,
    /// One lock per branch server: snapshots and drops on it, one at a time.
    db_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// What a Start or AddPod was about, for its audit line: filled in as the
/// request is read, so a refused request is audited with what it asked for.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub namespace: String,
    pub targets: Vec<String>,
    /// `key` (the default filter) or `unscoped`.
    pub filter: &'static str,
}

impl Manager {
    /// A manager that lets every caller do everything (`--auth none`, tests).
    pub fn new(store: Store, cluster: Cluster, settings: Settings) -> Arc<Manager> {
        Manager::with_auth(store, cluster, settings, Arc::new(Auth::off()))
    }

    pub fn with_auth(store: Store, cluster: Cluster, settings: Settings, auth: Arc<Auth>) -> Arc<Manager> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Arc::new(Manager {
            store,
            cluster,
            settings,
            view: Mutex::new(View::default()),
            events,
            key_locks: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
            auth,
            ready_counts: Mutex::new(HashMap::new()),
            splits: Default::default(),
            db_locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }

    /// The `/metrics` page: counters plus gauges read from the view.
    pub fn render_metrics(&self) -> String {
        let gauges = {
            let view = self.view();
            Gauges {
                environments: view.envs.len(),
                pods: view.envs.values().map(|e| e.pods.len()).sum(),
                agent_pods: Manager::agent_counts(&view).into_iter().map(|(s, n)| (s.as_str(), n)).collect(),
            }
        };
        let mut out = self.metrics.render(gauges);
        self.render_queue_metrics(&mut out);
        out
    }

    /// Each split queue's figures, as Status shows them.
    fn render_queue_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let view = self.view();
        let rows: Vec<(String, crate::model::QueueStats)> = view
            .envs
            .values()
            .flat_map(|e| {
                e.record.queues.iter().map(move |b| {
                    let labels = format!(
                        "namespace=\"{}\",key=\"{}\",deployment=\"{}\",queue=\"{}\"",
                        e.record.namespace, e.record.key, b.deployment, b.queue_id
                    );
                    (
                        labels,
                        e.queues
                            .get(&b.env_topic)
                            .copied()
                            .unwrap_or(crate::model::QueueStats { forwarded: 0, lag: -1 }),
                    )
                })
            })
            .collect();
        let _ = writeln!(
            out,
            "# HELP preview_queue_forwarded_total Records the splitter forwarded to an environment's topic since it started.\n\
             # TYPE preview_queue_forwarded_total counter"
        );
        for (l, s) in &rows {
            let _ = writeln!(out, "preview_queue_forwarded_total{{{l}}} {}", s.forwarded);
        }
        let _ = writeln!(
            out,
            "# HELP preview_queue_lag Offsets of an environment's topic past its consumers' committed ones (-1: unknown).\n\
             # TYPE preview_queue_lag gauge"
        );
        for (l, s) in &rows {
            let _ = writeln!(out, "preview_queue_lag{{{l}}} {}", s.lag);
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock_key(&self, key: &Key) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.retain(|_, m| Arc::strong_count(m) > 1);
            locks.entry(key.clone()).or_default().clone()
        };
        m.lock_owned().await
    }

    async fn pause_point(&self, point: &str) {
        if self.settings.pause_at.as_deref() == Some(point) {
            // Tests wait for this line and then SIGKILL the process.
            println!("PAUSED AT {point}");
            tracing::warn!(point, "paused for a crash test");
            std::future::pending::<()>().await;
        }
    }

    /// The namespace of environment `key`, if it exists.
    pub fn namespace_of(&self, key: &Key) -> Option<String> {
        self.view().envs.get(key).map(|e| e.record.namespace.clone())
    }

    pub fn len(&self) -> usize {
        self.view().envs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
