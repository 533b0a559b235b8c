//! The environment manager: the one place that changes environments.
//!
//! It validates requests, writes intent to the store before touching the
//! cluster, creates and deletes objects, keeps the in-memory view that Status
//! serves, and publishes ordered change events to watchers. Mutations of one
//! key are serialised by a per-key lock; the view's lock is never held across
//! an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;

use crate::config::{self, ConfigError, Mode, PodConfig, Target, Ttl, WorkloadKind};
use crate::filter::FilterSpec;
use crate::previewd::cluster::{self as cluster, Cluster, KubeError, PodPlan, PodState};
use crate::proto;
use crate::previewd::store::{EnvRecord, PodRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(ConfigError),
    #[error("{field}: {message}")]
    NotFound { field: String, message: String },
    #[error("{field}: {message}")]
    AlreadyExists { field: String, message: String },
    #[error("{field}: {message}")]
    FailedPrecondition { field: String, message: String },
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::InvalidArgument(e)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::InvalidArgument(ConfigError::new(field, message))
}

/// Server-side policy.
#[derive(Debug, Clone)]
pub struct Settings {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub allow_infinite: bool,
    pub default_namespace: String,
    /// Points at which to stop and wait to be killed (tests of crash safety).
    pub pause_at: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(24 * 3600),
            allow_infinite: false,
            default_namespace: "default".into(),
            pause_at: None,
        }
    }
}

/// One environment as Status shows it.
#[derive(Debug, Clone)]
struct EnvView {
    rec: EnvRecord,
    pods: BTreeMap<String, PodState>,
}

#[derive(Default)]
struct View {
    envs: BTreeMap<String, EnvView>,
    seq: u64,
    /// Pod states seen before their environment's record (watch races Start).
    orphans: HashMap<String, PodState>,
}

/// A published change, shared by every watcher.
pub type Event = Arc<proto::StatusEvent>;

/// How many events a watcher may fall behind before it is resynced.
const EVENT_BUFFER: usize = 1024;

pub struct Manager {
    store: Store,
    cluster: Cluster,
    settings: Settings,
    view: Mutex<View>,
    events: broadcast::Sender<Event>,
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Arc<crate::previewd::metrics::ServerMetrics>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Filters Status requests and events.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub key: String,
    pub namespace: String,
}

impl Selector {
    fn matches(&self, rec: &EnvRecord) -> bool {
        (self.key.is_empty() || glob_match(&self.key, &rec.key))
            && (self.namespace.is_empty() || self.namespace == rec.namespace)
    }
}

/// `*` matches any run, `?` one character; anything else is literal.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// What Clean selects.
#[derive(Debug, Clone)]
pub enum CleanSelector {
    Key(String),
    Glob(String),
    AllExpired,
}

impl Manager {
    pub fn new(store: Store, cluster: Cluster, settings: Settings) -> Arc<Manager> {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Arc::new(Manager {
            store,
            cluster,
            settings,
            view: Mutex::new(View::default()),
            events,
            key_locks: Mutex::new(HashMap::new()),
            metrics: Arc::default(),
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn metrics(&self) -> &Arc<crate::previewd::metrics::ServerMetrics> {
        &self.metrics
    }

    /// The `/metrics` page: counters plus gauges read from the view.
    pub fn render_metrics(&self) -> String {
        let gauges = {
            let view = self.view();
            crate::previewd::metrics::Gauges {
                environments: view.envs.len(),
                pods: view.envs.values().map(|e| e.pods.len()).sum(),
            }
        };
        self.metrics.render(gauges)
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock_key(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.key_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.retain(|_, m| Arc::strong_count(m) > 1);
            locks.entry(key.to_string()).or_default().clone()
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

    // ----- Start / AddPod -------------------------------------------------

    pub async fn start(&self, req: proto::StartRequest) -> Result<proto::StartResponse, Error> {
        if req.pods.is_empty() {
            return Err(invalid("pods", "at least one pod is required"));
        }
        let docs = req
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| config::parse_document(&p.config).map_err(|e| prefix(&req.pods, i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let key = if !req.key.is_empty() {
            config::validate_key(&req.key)?;
            req.key.clone()
        } else {
            let mut from_doc = None;
            for (i, d) in docs.iter().enumerate() {
                if let Some(k) = config::document_key(d).map_err(|e| prefix(&req.pods, i, e))? {
                    config::validate_key(&k).map_err(|e| prefix(&req.pods, i, e))?;
                    from_doc.get_or_insert(k);
                }
            }
            from_doc.unwrap_or_else(config::generate_key)
        };
        let configs = docs
            .into_iter()
            .enumerate()
            .map(|(i, d)| config::interpret(d, &key).map_err(|e| prefix(&req.pods, i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let ttl =
            if req.ttl.is_empty() { configs.iter().find_map(|c| c.ttl) } else { Some(Ttl::parse("ttl", &req.ttl)?) };
        let ttl = ttl.map(|t| self.check_ttl(t)).transpose()?;

        let _guard = self.lock_key(&key).await;
        let existing = self.view().envs.get(&key).map(|e| e.rec.clone());
        let (env, warnings) = self.apply(&key, existing, &req.pods, configs, ttl).await?;
        Ok(proto::StartResponse { key, environment: Some(env), warnings })
    }

    pub async fn add_pod(&self, req: proto::AddPodRequest) -> Result<proto::AddPodResponse, Error> {
        config::validate_key(&req.key)?;
        let pod = req.pod.ok_or_else(|| invalid("pod", "required"))?;
        let doc = config::parse_document(&pod.config)?;
        let cfg = config::interpret(doc, &req.key)?;
        let _guard = self.lock_key(&req.key).await;
        let existing = self.view().envs.get(&req.key).map(|e| e.rec.clone());
        let Some(existing) = existing else {
            return Err(Error::NotFound { field: "key".into(), message: format!("no environment {:?}", req.key) });
        };
        let (env, warnings) = self.apply(&req.key, Some(existing), &[pod], vec![cfg], None).await?;
        Ok(proto::AddPodResponse { environment: Some(env), warnings })
    }

    fn check_ttl(&self, ttl: Ttl) -> Result<Ttl, Error> {
        match ttl {
            Ttl::Infinite if !self.settings.allow_infinite => Err(invalid(
                "ttl",
                format!(
                    "\"infinite\" is not allowed by this server; the maximum is {}",
                    Ttl::Finite(self.settings.max_ttl)
                ),
            )),
            Ttl::Finite(d) if d > self.settings.max_ttl => Err(invalid(
                "ttl",
                format!("{ttl} exceeds the server's maximum of {}", Ttl::Finite(self.settings.max_ttl)),
            )),
            t => Ok(t),
        }
    }

    /// Plans every pod, checks conflicts, writes the intent, creates objects.
    async fn apply(
        &self,
        key: &str,
        existing: Option<EnvRecord>,
        reqs: &[proto::PodRequest],
        configs: Vec<PodConfig>,
        ttl: Option<Ttl>,
    ) -> Result<(proto::Environment, Vec<String>), Error> {
        let now = now_ms();
        let mut warnings = Vec::new();
        let mut planned = Vec::new();
        let mut env_ns = existing.as_ref().map(|e| e.namespace.clone());
        for (i, (req, cfg)) in reqs.iter().zip(configs).enumerate() {
            let field = |f: &str| if reqs.len() > 1 { format!("pods[{i}].{f}") } else { f.to_string() };
            let mut target = cfg.target.clone();
            if !req.target.is_empty() {
                let ns = target.namespace().map(str::to_string);
                target = Target::parse(&field("target"), &req.target)?;
                if let Target::Workload { namespace, .. } = &mut target {
                    *namespace = ns;
                }
            }
            let ns = [req.namespace.as_str(), target.namespace().unwrap_or(""), env_ns.as_deref().unwrap_or("")]
                .into_iter()
                .find(|s| !s.is_empty())
                .unwrap_or(&self.settings.default_namespace)
                .to_string();
            config::validate_dns_label(&field("namespace"), &ns, 63)?;
            if let Some(env_ns) = &env_ns
                && *env_ns != ns
            {
                return Err(Error::FailedPrecondition {
                    field: field("namespace"),
                    message: format!("environment {key:?} lives in namespace {env_ns:?}, not {ns:?}"),
                });
            }
            env_ns = Some(ns.clone());
            let image = if req.image.is_empty() { cfg.image.clone() } else { Some(req.image.clone()) };
            let image = image.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                invalid(field("image"), "required: give an image in the request or feature.preview.image in the config")
            })?;
            let group = if req.name.is_empty() { sanitize(target.short_name()) } else { req.name.clone() };
            config::validate_dns_label(&field("name"), &group, 63)?;
            if planned.iter().any(|p: &PodRecord| p.group == group) {
                return Err(invalid(field("name"), format!("two pods named {group:?}; give each a distinct name")));
            }
            // Both reads at once: they are most of Start's latency.
            let (ns_ok, resolved) =
                tokio::join!(self.cluster.ensure_namespace(&ns), self.cluster.resolve(&ns, &target));
            ns_ok.map_err(|e| match e {
                KubeError::NamespaceNotFound(_) => {
                    Error::NotFound { field: field("namespace"), message: e.to_string() }
                }
                e => e.into(),
            })?;
            let resolved = resolved.map_err(|e| match e {
                KubeError::TargetNotFound { .. } => Error::NotFound { field: field("target"), message: e.to_string() },
                KubeError::ContainerNotFound { .. } | KubeError::NoContainers { .. } => {
                    invalid(field("target.container"), e.to_string())
                }
                e => e.into(),
            })?;
            let pod = cluster::build_pod(&PodPlan {
                key,
                group: &group,
                target: &target,
                resolved: resolved.as_ref(),
                image: &image,
                env: &cfg.env,
                pull_policy: self.cluster.pull_policy.as_deref(),
                propagate_key: cfg.propagate_key,
                instance: &self.cluster.instance,
                agent_image: self.cluster.agent_image.as_deref(),
            });
            // A Pod always serialises.
            let template = serde_json::to_value(&pod).expect("pod serialises");
            let filter = cfg.filter.clone().unwrap_or_else(|| FilterSpec::Key(key.to_string()));
            let ports = if cfg.ports.is_empty() {
                resolved.as_ref().map(|r| r.ports.clone()).unwrap_or_default()
            } else {
                cfg.ports.clone()
            };
            warnings.extend(
                cfg.warnings.iter().map(|w| if reqs.len() > 1 { format!("pods[{i}]: {w}") } else { w.clone() }),
            );
            planned.push(PodRecord {
                pod_names: cluster::pod_names(&group, key, &template, cfg.replicas),
                group,
                container: resolved.as_ref().map_or_else(|| "app".into(), |r| r.container.clone()),
                target,
                image,
                mode: cfg.mode,
                filter,
                ports,
                template,
            });
        }
        let ns = env_ns.unwrap_or_else(|| self.settings.default_namespace.clone());
        self.check_conflicts(key, &ns, &planned)?;

        // The new record: existing pods with the same group are replaced.
        let is_new = existing.is_none();
        let mut rec = existing.clone().unwrap_or(EnvRecord {
            key: key.to_string(),
            namespace: ns.clone(),
            created_at_ms: now,
            expires_at_ms: None,
            mode: planned.first().map_or(Mode::Steal, |p| p.mode),
            pending: true,
            pods: Vec::new(),
        });
        let expires = |t: Ttl| match t {
            Ttl::Infinite => None,
            Ttl::Finite(d) => Some(now + d.as_millis() as i64),
        };
        let ttl_extended = match (is_new, ttl) {
            (true, t) => {
                rec.expires_at_ms = expires(t.unwrap_or(Ttl::Finite(self.settings.default_ttl)));
                false
            }
            (false, Some(t)) => {
                rec.expires_at_ms = expires(t);
                true
            }
            (false, None) => false,
        };
        let mut stale = Vec::new();
        for p in planned {
            if let Some(old) = rec.pods.iter_mut().find(|o| o.group == p.group) {
                stale.extend(old.pod_names.iter().filter(|n| !p.pod_names.contains(n)).cloned());
                *old = p;
            } else {
                rec.pods.push(p);
            }
        }
        rec.pending = true;

        // Intent first: a crash from here on is finished by `recover`.
        self.store.put(&rec).await?;
        self.pause_point("after-intent").await;
        self.publish_upsert(&rec, is_new);
        if let Err(e) = self.realize(&rec).await {
            // Nothing half-made: undo what this request added, keep what was.
            tracing::warn!(key, error = %e, "start failed; rolling back");
            self.rollback(&rec, existing.as_ref()).await;
            return Err(e);
        }
        for name in &stale {
            self.cluster.delete_pod(&rec.namespace, name).await?;
        }
        // The owner ConfigMap keeps the pending copy: adopting it just
        // completes it again. Losing this write in a crash is as harmless.
        rec.pending = false;
        self.store.put_relaxed(&rec).await?;
        let env = self.publish_settled(&rec, ttl_extended);
        Ok((env, warnings))
    }

    /// Restores the state before a failed Start: the previous record and its
    /// pods, or nothing at all for a new environment. Best effort; what it
    /// cannot undo now, `recover` finds by label at the next start.
    async fn rollback(&self, attempted: &EnvRecord, previous: Option<&EnvRecord>) {
        let result = async {
            match previous {
                None => {
                    self.cluster.delete_env(&attempted.key).await?;
                    self.store.delete(&attempted.key).await?;
                    let mut view = self.view();
                    if let Some(e) = view.envs.remove(&attempted.key) {
                        let env = to_proto(&e);
                        publish(&mut view, &self.events, proto::EventKind::Cleaned, vec![env], None);
                    }
                }
                Some(prev) => {
                    let keep: Vec<&String> = prev.pods.iter().flat_map(|p| &p.pod_names).collect();
                    for name in attempted.pods.iter().flat_map(|p| &p.pod_names).filter(|n| !keep.contains(n)) {
                        self.cluster.delete_pod(&attempted.namespace, name).await?;
                    }
                    self.cluster.put_owner(prev).await?;
                    self.store.put(prev).await?;
                    if let Some(v) = self.view().envs.get_mut(&prev.key) {
                        v.rec = prev.clone();
                    }
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::error!(key = %attempted.key, error = %e, "rollback incomplete; the next start reconciles it");
        }
    }

    /// Creates the owner and every pod of a record that does not exist yet.
    async fn realize(&self, rec: &EnvRecord) -> Result<(), Error> {
        let owner = self.cluster.put_owner(rec).await?;
        self.pause_point("after-owner").await;
        for p in &rec.pods {
            for name in &p.pod_names {
                let pod: Pod = cluster::instantiate(&p.template, name, &rec.namespace, &owner)
                    .map_err(|e| StoreError::Corrupt { key: rec.key.clone(), source: e })?;
                self.cluster.create_pod(&rec.namespace, &pod).await?;
                self.pause_point("after-pod").await;
            }
        }
        Ok(())
    }

    /// Two environments on one target may not use the same filter on
    /// overlapping ports: a request could not tell them apart.
    fn check_conflicts(&self, key: &str, ns: &str, planned: &[PodRecord]) -> Result<(), Error> {
        let view = self.view();
        for p in planned {
            let Target::Workload { kind, name, .. } = &p.target else { continue };
            for other in view.envs.values().filter(|e| e.rec.key != key && e.rec.namespace == ns) {
                for op in &other.rec.pods {
                    let same_target =
                        matches!(&op.target, Target::Workload { kind: k, name: n, .. } if k == kind && n == name);
                    let ports_overlap =
                        p.ports.is_empty() || op.ports.is_empty() || p.ports.iter().any(|x| op.ports.contains(x));
                    if same_target && ports_overlap && op.filter == p.filter {
                        return Err(Error::AlreadyExists {
                            field: "feature.network.incoming.http_filter".into(),
                            message: format!(
                                "the same filter is already used on {}/{name} by environment {:?}",
                                kind.as_str(),
                                other.rec.key
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    // ----- Clean and expiry -------------------------------------------------

    pub async fn clean(&self, sel: CleanSelector) -> Result<Vec<proto::CleanedEnvironment>, Error> {
        let keys: Vec<String> = {
            let view = self.view();
            let now = now_ms();
            match &sel {
                CleanSelector::Key(k) => {
                    config::validate_key(k)?;
                    vec![k.clone()]
                }
                CleanSelector::Glob(g) => view.envs.keys().filter(|k| glob_match(g, k)).cloned().collect(),
                CleanSelector::AllExpired => {
                    view.envs.values().filter(|e| e.rec.expired_at(now)).map(|e| e.rec.key.clone()).collect()
                }
            }
        };
        let mut removed = Vec::new();
        for key in keys {
            if let Some(c) = self.remove(&key, proto::EventKind::Cleaned).await? {
                removed.push(c);
            }
        }
        Ok(removed)
    }

    /// Deletes an environment's objects and record, then tells watchers.
    /// `None` when there was nothing to remove.
    async fn remove(&self, key: &str, why: proto::EventKind) -> Result<Option<proto::CleanedEnvironment>, Error> {
        let _guard = self.lock_key(key).await;
        if why == proto::EventKind::Expired && !self.view().envs.get(key).is_some_and(|e| e.rec.expired_at(now_ms())) {
            return Ok(None); // extended by a Start while we waited for the lock
        }
        let objects = self.cluster.delete_env(key).await?;
        let had_record = self.store.delete(key).await?;
        let had_view = {
            let mut view = self.view();
            let env = view.envs.remove(key);
            if let Some(e) = &env {
                publish(&mut view, &self.events, why, vec![to_proto(e)], None);
            }
            env.is_some()
        };
        if objects.is_empty() && !had_record && !had_view {
            return Ok(None);
        }
        tracing::info!(key, ?why, objects = objects.len(), "environment removed");
        Ok(Some(proto::CleanedEnvironment { key: key.to_string(), objects }))
    }

    /// Removes every environment whose TTL has run out.
    pub async fn reap(&self) -> Result<usize, Error> {
        let now = now_ms();
        let expired: Vec<String> =
            self.view().envs.values().filter(|e| e.rec.expired_at(now)).map(|e| e.rec.key.clone()).collect();
        let mut n = 0;
        for key in expired {
            if self.remove(&key, proto::EventKind::Expired).await?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    // ----- Recovery ----------------------------------------------------------

    /// Loads the store and brings the cluster in line with it: finishes
    /// pending environments, recreates missing pods, removes expired ones and
    /// deletes labelled objects whose key is unknown. With `adopt`, records
    /// kept in the cluster are taken into the store first.
    pub async fn recover(&self, adopt: bool) -> Result<RecoverReport, Error> {
        let mut report = RecoverReport::default();
        let mut records = self.store.load_all().await?;
        if adopt {
            for rec in self.cluster.adoptable().await? {
                if !records.iter().any(|r| r.key == rec.key) {
                    self.store.put(&rec).await?;
                    report.adopted.push(rec.key.clone());
                    records.push(rec);
                }
            }
        }
        // One list of everything we manage, instead of one per environment.
        let objects = self.cluster.managed(&self.cluster.selector("")).await?;
        let now = now_ms();
        let mut live = Vec::new();
        for mut rec in records {
            if rec.expired_at(now) {
                for obj in objects.iter().filter(|o| o.key == rec.key) {
                    self.cluster.delete_object(obj).await?;
                }
                self.store.delete(&rec.key).await?;
                report.expired.push(rec.key);
                continue;
            }
            let existing: Vec<&String> = objects
                .iter()
                .filter(|o| o.kind == "pod" && o.key == rec.key && o.namespace == rec.namespace)
                .map(|o| &o.name)
                .collect();
            let missing = rec.pods.iter().flat_map(|p| &p.pod_names).filter(|n| !existing.contains(n)).count();
            if missing > 0 || rec.pending {
                self.realize(&rec).await?;
                report.recreated += missing;
            }
            // Pods of this key that the record does not name are leftovers.
            for name in existing.into_iter().filter(|n| !rec.pods.iter().any(|p| p.pod_names.contains(n))) {
                self.cluster.delete_pod(&rec.namespace, name).await?;
                report.deleted.push(format!("pod/{}/{name}", rec.namespace));
            }
            if rec.pending {
                // The owner ConfigMap may keep the pending copy (see `apply`).
                rec.pending = false;
                self.store.put(&rec).await?;
            }
            live.push(rec);
        }
        let known: std::collections::HashSet<&str> = live.iter().map(|r| r.key.as_str()).collect();
        for obj in objects.iter().filter(|o| !known.contains(o.key.as_str()) && !report.expired.contains(&o.key)) {
            if self.cluster.delete_object(obj).await? {
                report.deleted.push(obj.to_string());
            }
        }
        let mut view = self.view();
        for rec in live {
            let pods = take_orphans(&mut view, &rec);
            view.envs.insert(rec.key.clone(), EnvView { rec, pods });
        }
        report.live = view.envs.len();
        Ok(report)
    }

    // ----- Status ----------------------------------------------------------

    /// A snapshot of the matching environments and a receiver for every
    /// event after it, taken atomically so nothing is missed or repeated.
    pub fn subscribe(&self, sel: &Selector) -> (proto::StatusEvent, broadcast::Receiver<Event>) {
        let view = self.view();
        let rx = self.events.subscribe();
        (snapshot(&view, sel), rx)
    }

    pub fn snapshot(&self, sel: &Selector) -> proto::StatusEvent {
        snapshot(&self.view(), sel)
    }

    pub fn event_matches(sel: &Selector, ev: &proto::StatusEvent) -> bool {
        ev.environments.iter().any(|e| {
            (sel.key.is_empty() || glob_match(&sel.key, &e.key))
                && (sel.namespace.is_empty() || sel.namespace == e.namespace)
        })
    }

    /// Applies a pod watch event to the view and tells watchers if it changed.
    pub fn observe_pod(&self, pod: &Pod, deleted: bool) {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let Some(key) = labels.get(cluster::LABEL_KEY) else { return };
        let Some(name) = pod.metadata.name.clone() else { return };
        let mut state = if deleted {
            PodState { phase: "Missing".into(), reason: "Deleted".into(), ..Default::default() }
        } else {
            cluster::pod_state(pod)
        };
        let mut view = self.view();
        let View { envs, orphans, .. } = &mut *view;
        let Some(env) = envs.get_mut(key) else {
            if !deleted {
                orphans.insert(name, state);
            } else {
                orphans.remove(&name);
            }
            return;
        };
        if !env.rec.pods.iter().any(|p| p.pod_names.contains(&name)) {
            return; // a pod being replaced
        }
        if deleted {
            state.restarts = env.pods.get(&name).map_or(0, |s| s.restarts);
        }
        if env.pods.get(&name) == Some(&state) {
            return;
        }
        env.pods.insert(name.clone(), state);
        let envp = to_proto(env);
        let podp = envp.pods.iter().find(|p| p.name == name).cloned();
        publish(&mut view, &self.events, proto::EventKind::PodChanged, vec![envp], podp);
    }

    fn publish_upsert(&self, rec: &EnvRecord, is_new: bool) {
        let mut view = self.view();
        let env = to_proto(upsert_env(&mut view, rec));
        if is_new {
            publish(&mut view, &self.events, proto::EventKind::EnvAdded, vec![env], None);
        }
    }

    fn publish_settled(&self, rec: &EnvRecord, ttl_extended: bool) -> proto::Environment {
        let mut view = self.view();
        let entry = upsert_env(&mut view, rec);
        let live: Vec<&String> = rec.pods.iter().flat_map(|p| &p.pod_names).collect();
        entry.pods.retain(|n, _| live.contains(&n));
        let env = to_proto(entry);
        let kind = if ttl_extended { proto::EventKind::TtlExtended } else { proto::EventKind::EnvAdded };
        publish(&mut view, &self.events, kind, vec![env.clone()], None);
        env
    }

    /// The routes agents on `ns`'s `kind/name` pods must apply: one per
    /// preview pod group on that target, to its first replica with an IP
    /// (a ready one first).
    pub fn routes_for(&self, ns: &str, kind: WorkloadKind, name: &str) -> Vec<crate::agent::routes::Route> {
        let view = self.view();
        let mut out = Vec::new();
        for env in view.envs.values().filter(|e| e.rec.namespace == ns && !e.rec.pending) {
            for p in &env.rec.pods {
                let on_target =
                    matches!(&p.target, Target::Workload { kind: k, name: n, .. } if *k == kind && n == name);
                if !on_target {
                    continue;
                }
                let states: Vec<&PodState> =
                    p.pod_names.iter().filter_map(|n| env.pods.get(n)).filter(|s| !s.ip.is_empty()).collect();
                let best = states.iter().find(|s| s.ready).or(states.first());
                let Some(ip) = best.and_then(|s| s.ip.parse().ok()) else { continue };
                out.push(crate::agent::routes::Route {
                    key: env.rec.key.clone(),
                    mode: p.mode,
                    filter: p.filter.clone(),
                    ports: p.ports.clone(),
                    destination: ip,
                    expires_at_ms: env.rec.expires_at_ms,
                });
            }
        }
        out
    }

    /// Every workload that an environment (settled or being set up)
    /// previews, with its namespace.
    pub fn targets(&self) -> std::collections::BTreeSet<(String, WorkloadKind, String)> {
        let view = self.view();
        let mut out = std::collections::BTreeSet::new();
        for env in view.envs.values() {
            for p in &env.rec.pods {
                if let Target::Workload { kind, name, .. } = &p.target {
                    out.insert((env.rec.namespace.clone(), *kind, name.clone()));
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.view().envs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Default)]
pub struct RecoverReport {
    pub live: usize,
    pub recreated: usize,
    pub adopted: Vec<String>,
    pub expired: Vec<String>,
    pub deleted: Vec<String>,
}

/// Puts `rec` into the view, with any pod states seen before it.
fn upsert_env<'v>(view: &'v mut View, rec: &EnvRecord) -> &'v mut EnvView {
    let pods = take_orphans(view, rec);
    let entry = view.envs.entry(rec.key.clone()).or_insert_with(|| EnvView { rec: rec.clone(), pods: BTreeMap::new() });
    entry.rec = rec.clone();
    entry.pods.extend(pods);
    entry
}

fn take_orphans(view: &mut View, rec: &EnvRecord) -> BTreeMap<String, PodState> {
    let mut out = BTreeMap::new();
    for n in rec.pods.iter().flat_map(|p| &p.pod_names) {
        if let Some(s) = view.orphans.remove(n) {
            out.insert(n.clone(), s);
        }
    }
    out
}

fn publish(
    view: &mut View,
    tx: &broadcast::Sender<Event>,
    kind: proto::EventKind,
    environments: Vec<proto::Environment>,
    pod: Option<proto::Pod>,
) {
    view.seq += 1;
    let ev = proto::StatusEvent { kind: kind as i32, sequence: view.seq, environments, pod };
    // No receivers is fine: nobody is watching.
    let _ = tx.send(Arc::new(ev));
}

fn snapshot(view: &View, sel: &Selector) -> proto::StatusEvent {
    proto::StatusEvent {
        kind: proto::EventKind::Snapshot as i32,
        sequence: view.seq,
        environments: view.envs.values().filter(|e| sel.matches(&e.rec)).map(to_proto).collect(),
        pod: None,
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

fn to_proto(e: &EnvView) -> proto::Environment {
    let mut pods = Vec::new();
    for p in &e.rec.pods {
        for name in &p.pod_names {
            let st = e.pods.get(name).cloned().unwrap_or_else(|| PodState {
                phase: "Pending".into(),
                reason: if e.rec.pending { "Creating".into() } else { "Pending".into() },
                ..Default::default()
            });
            pods.push(proto::Pod {
                name: name.clone(),
                target: p.target.to_string(),
                container: p.container.clone(),
                image: p.image.clone(),
                phase: st.phase,
                ready: st.ready,
                restarts: st.restarts,
                node: st.node,
                ip: st.ip,
                last_error: st.last_error,
                reason: st.reason,
                group: p.group.clone(),
            });
        }
    }
    proto::Environment {
        key: e.rec.key.clone(),
        namespace: e.rec.namespace.clone(),
        created_at: Some(timestamp(e.rec.created_at_ms)),
        expires_at: e.rec.expires_at_ms.map(timestamp),
        mode: match e.rec.mode {
            Mode::Steal => proto::Mode::Steal as i32,
            Mode::Mirror => proto::Mode::Mirror as i32,
        },
        pods,
        pending: e.rec.pending,
    }
}

fn prefix(pods: &[proto::PodRequest], i: usize, e: ConfigError) -> ConfigError {
    if pods.len() > 1 { ConfigError::new(format!("pods[{i}].{}", e.field), e.message) } else { e }
}

/// A DNS label from a workload name.
fn sanitize(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let s = s.trim_matches('-');
    let s: String = s.chars().take(63).collect();
    s.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "abc"));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("ci-*-x", "ci-12-x"));
        assert!(!glob_match("ci-*", "dev-1"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
    }

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize("orders.v2_x"), "orders-v2-x");
        assert_eq!(sanitize("-a-"), "a");
    }
}
