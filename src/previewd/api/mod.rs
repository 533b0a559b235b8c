//! The gRPC `PreviewService` and `AgentService` (`GatewayService` in
//! `gateway`), and the single conversion from the manager's and
//! authentication's errors to `tonic::Status`. The caller comes from the
//! edge layer (`auth::layer`); each mutating call writes one audit line.

mod gateway;

pub use gateway::GatewayApi;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::model::podspec::PROOF_HEADER;
use crate::model::share::ShareSpec;
use crate::model::{Key, Ttl};
use crate::previewd::auth::proof::Prover;
use crate::previewd::auth::{Access, AuditLine, AuthError, AuthMode, Caller};
use crate::previewd::cluster::KubeError;
use crate::previewd::dbs::DbError;
use crate::previewd::manager::{AgentPlan, CleanSelector, Error, Facts, Manager, Selector};
use crate::previewd::queues::QueueError;
use crate::previewd::store::StoreError;
use crate::proto::preview_service_server::PreviewService;
use crate::proto::{self, clean_request};
use crate::wire;

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        auth_status(&e, e.to_string())
    }
}

fn auth_status(e: &AuthError, msg: String) -> Status {
    match e {
        AuthError::Unauthenticated(_) => Status::unauthenticated(msg),
        AuthError::Unavailable(_) => Status::unavailable(msg),
    }
}

/// A refusal by a quota (ResourceQuota on previewenvironments, say).
fn over_quota(s: &::kube::core::Status) -> bool {
    s.code == 403 && s.message.contains("exceeded quota")
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        status_of(&e)
    }
}

/// The one mapping from the manager's errors to gRPC codes.
fn status_of(e: &Error) -> Status {
    let msg = e.to_string();
    match e {
        Error::InvalidArgument(_) => Status::invalid_argument(msg),
        Error::NotFound { .. } => Status::not_found(msg),
        Error::AlreadyExists { .. } => Status::already_exists(msg),
        Error::FailedPrecondition { .. } => Status::failed_precondition(msg),
        Error::PermissionDenied { .. } => Status::permission_denied(msg),
        Error::ResourceExhausted { .. } => Status::resource_exhausted(msg),
        Error::Cluster { source, .. } => match source {
            KubeError::NamespaceNotFound(_) | KubeError::TargetNotFound { .. } => Status::not_found(msg),
            KubeError::ContainerNotFound { .. } | KubeError::NoContainers { .. } => Status::invalid_argument(msg),
            KubeError::Api { source: ::kube::Error::Api(s), .. } if over_quota(s) => Status::resource_exhausted(msg),
            KubeError::Api { source: ::kube::Error::Api(s), .. } if s.code == 403 => Status::permission_denied(msg),
            KubeError::Api { source: ::kube::Error::Api(s), .. } if s.code == 422 => Status::invalid_argument(msg),
            KubeError::Api { .. } => Status::unavailable(msg),
        },
        Error::Store(StoreError::Full { .. }) => Status::resource_exhausted(msg),
        Error::Store(StoreError::Io { .. }) => Status::unavailable(msg),
        Error::Store(_) => Status::internal(msg),
        Error::Auth(a) => auth_status(a, msg),
        Error::Queue { source, .. } if matches!(**source, QueueError::TopicMissing { .. }) => {
            Status::failed_precondition(msg)
        }
        Error::Queue { .. } => Status::unavailable(msg),
        Error::Db { source, .. } => match source {
            DbError::Refused(_) | DbError::Copy { .. } => Status::failed_precondition(msg),
            DbError::Timeout { .. } => Status::deadline_exceeded(msg),
            DbError::Unavailable { .. } | DbError::Server { .. } => Status::unavailable(msg),
        },
    }
}

pub struct Api {
    manager: Arc<Manager>,
    /// Changes when the server shuts down, so open watches end and graceful
    /// shutdown does not wait on them forever.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Open watches per user, against --max-watchers-per-user.
    watchers: Arc<Mutex<HashMap<String, usize>>>,
    max_watchers: usize,
}

impl Api {
    pub fn new(manager: Arc<Manager>, stopping: tokio::sync::watch::Receiver<bool>, max_watchers: usize) -> Self {
        Api { manager, stopping, watchers: Arc::default(), max_watchers }
    }

    /// One more watch for `user`, released when the guard drops. Without
    /// authentication every caller is the same anonymous user, so the limit
    /// (a per-user one) does not apply.
    fn watcher_slot(&self, user: &str) -> Result<WatcherSlot, Status> {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(user.to_string()).or_default();
        if *n >= self.max_watchers && self.manager.auth().mode() == AuthMode::Kube {
            return Err(Status::resource_exhausted(format!(
                "watch: user {user:?} has {n} open watches; this server allows at most {} per user (--max-watchers-per-user)",
                self.max_watchers
            )));
        }
        *n += 1;
        Ok(WatcherSlot { watchers: self.watchers.clone(), user: user.to_string() })
    }
}

struct WatcherSlot {
    watchers: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&self.user);
            }
        }
    }
}

impl Api {
    /// The link a config asks for (`feature.preview.share`), made once the
    /// environment has started, unless it already has one. A link that
    /// cannot be made does not undo the environment: it is a warning.
    async fn share_on_start(&self, who: &Caller, started: &mut crate::model::Started, facts: &Facts) {
        let Some(spec) = started.share.take() else { return };
        if !started.environment.record.shares.is_empty() {
            return;
        }
        let result = self.manager.share_as(who, &started.key, spec).await;
        audit(who, "share", started.key.as_str(), facts, &result);
        match result {
            Ok(link) => started.environment.record.shares.push(link),
            Err(e) => {
                started.warnings.push(format!("feature.preview.share: no link made: {}", status_of(&e).message()))
            }
        }
    }
}

/// The caller the edge layer authenticated.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions().get::<Caller>().cloned().ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The audit line of a mutating call.
fn audit<T>(who: &Caller, verb: &str, key: &str, facts: &Facts, result: &Result<T, Error>) {
    AuditLine {
        audit: "preview.v1",
        time_ms: crate::model::now_ms(),
        user: &who.user,
        groups: &who.groups,
        verb,
        key,
        namespace: &facts.namespace,
        targets: facts.targets.clone(),
        filter: facts.filter,
        result: match result {
            Ok(_) => "ok".into(),
            Err(e) => format!("{:?}: {e}", status_of(e).code()),
        },
    }
    .write();
}

/// Keeps only the environments in namespaces `who` may `verb` environments
/// in (cached answers; one question per namespace).
async fn visible(manager: &Manager, who: &Caller, verb: &str, ev: &mut proto::StatusEvent) -> Result<(), Status> {
    let mut allowed: HashMap<String, bool> = HashMap::new();
    for e in &ev.environments {
        if !allowed.contains_key(&e.namespace) {
            let ok = manager.auth().allowed(who, &Access::env(verb, &e.namespace)).await.map_err(Status::from)?;
            allowed.insert(e.namespace.clone(), ok);
        }
    }
    ev.environments.retain(|e| allowed.get(&e.namespace).copied().unwrap_or(false));
    Ok(())
}

/// Events queued per watcher before it counts as slow.
const WATCHER_QUEUE: usize = 32;

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::StatusEvent, Status>> + Send>>;

#[tonic::async_trait]
impl PreviewService for Api {
    async fn start(&self, req: Request<proto::StartRequest>) -> Result<Response<proto::StartResponse>, Status> {
        let began = std::time::Instant::now();
        let who = caller(&req)?;
        let req = wire::start_request(req.into_inner());
        let key = req.key.clone();
        let mut facts = Facts::default();
        let result = self.manager.start_as(&who, req, &mut facts).await;
        let key = result.as_ref().map(|s| s.key.to_string()).unwrap_or(key);
        audit(&who, "start", &key, &facts, &result);
        let mut started = result?;
        self.share_on_start(&who, &mut started, &facts).await;
        self.manager.metrics().started();
        tracing::info!(key = %started.key, user = %who.user, ms = began.elapsed().as_millis() as u64, "start");
        Ok(Response::new(wire::started(&started)))
    }

    async fn add_pod(&self, req: Request<proto::AddPodRequest>) -> Result<Response<proto::AddPodResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let mut facts = Facts::default();
        let result = self.manager.add_pod_as(&who, &req.key, req.pod.map(wire::pod_request), &mut facts).await;
        audit(&who, "add_pod", &req.key, &facts, &result);
        let mut started = result?;
        self.share_on_start(&who, &mut started, &facts).await;
        Ok(Response::new(proto::AddPodResponse {
            environment: Some(wire::environment(&started.environment)),
            warnings: started.warnings,
        }))
    }

    type StatusStream = EventStream;

    async fn status(&self, req: Request<proto::StatusRequest>) -> Result<Response<Self::StatusStream>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let sel = Selector { key: req.key, namespace: req.namespace };
        if !req.watch {
            let mut snap = self.manager.snapshot(&sel);
            visible(&self.manager, &who, "list", &mut snap).await?;
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(snap)))));
        }
        let slot = self.watcher_slot(&who.user)?;
        // As in tonic's streaming examples: a task feeds a bounded channel and
        // ends when the client goes away (send fails).
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let manager = self.manager.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (mut snap, mut events) = manager.subscribe(&sel);
            if let Err(s) = visible(&manager, &who, "watch", &mut snap).await {
                let _ = tx.send(Err(s)).await;
                return;
            }
            if tx.send(Ok(snap)).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    ev = events.recv() => ev,
                    _ = stopping.changed() => break,
                };
                let mut ev = match next {
                    Ok(ev) if sel.matches_event(&ev) => (*ev).clone(),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Fell behind: start over from a fresh snapshot.
                        tracing::debug!(missed, "watcher resynced");
                        let (snap, rx) = manager.subscribe(&sel);
                        events = rx;
                        snap
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let is_snapshot = ev.kind == proto::EventKind::Snapshot as i32;
                if let Err(s) = visible(&manager, &who, "watch", &mut ev).await {
                    let _ = tx.send(Err(s)).await;
                    break;
                }
                if ev.environments.is_empty() && !is_snapshot {
                    continue; // about a namespace this caller may not watch
                }
                if tx.send(Ok(ev)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn clean(&self, req: Request<proto::CleanRequest>) -> Result<Response<proto::CleanResponse>, Status> {
        let who = caller(&req)?;
        let (sel, key) = match req.into_inner().selector {
            Some(clean_request::Selector::Key(k)) => {
                (CleanSelector::Key(Key::parse("key", &k).map_err(Error::from)?), k)
            }
            Some(clean_request::Selector::Glob(g)) if !g.is_empty() => (CleanSelector::Glob(g.clone()), g),
            Some(clean_request::Selector::AllExpired(true)) => (CleanSelector::AllExpired, String::new()),
            _ => {
                return Err(Status::invalid_argument(
                    "selector: give one of key, glob (non-empty) or all_expired=true",
                ));
            }
        };
        // The namespace of a key, for the audit line (empty for a glob).
        let namespace = match &sel {
            CleanSelector::Key(k) => self.manager.namespace_of(k).unwrap_or_default(),
            _ => String::new(),
        };
        let result = self.manager.clean_as(&who, sel).await;
        let facts = Facts { namespace, ..Default::default() };
        audit(&who, "clean", &key, &facts, &result);
        let removed = result?;
        self.manager.metrics().cleaned(removed.len());
        Ok(Response::new(proto::CleanResponse { removed: removed.into_iter().map(wire::cleaned).collect() }))
    }

    async fn refresh_db(
        &self,
        req: Request<proto::RefreshDbRequest>,
    ) -> Result<Response<proto::RefreshDbResponse>, Status> {
        let who = caller(&req)?;
        let key = Key::parse("key", &req.into_inner().key).map_err(Error::from)?;
        let facts = Facts { namespace: self.manager.namespace_of(&key).unwrap_or_default(), ..Default::default() };
        let result = self.manager.refresh_db_as(&who, &key).await;
        audit(&who, "refresh-db", key.as_str(), &facts, &result);
        let branches = result?.iter().map(|(b, st)| wire::db_branch(b, Some(st))).collect();
        Ok(Response::new(proto::RefreshDbResponse { branches }))
    }

    async fn share(&self, req: Request<proto::ShareRequest>) -> Result<Response<proto::ShareResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let key = Key::parse("key", &req.key).map_err(Error::from)?;
        let making = !req.service.is_empty() || req.port != 0 || !req.ttl.is_empty() || !req.staging_url.is_empty();
        if (!req.revoke.is_empty() as u8 + req.list as u8 + making as u8) > 1 {
            return Err(Status::invalid_argument(
                "revoke, list: give one of revoke, list, or what a new link needs (service, port, ttl, staging_url)",
            ));
        }
        let facts = Facts { namespace: self.manager.namespace_of(&key).unwrap_or_default(), ..Default::default() };
        let links = if req.list {
            self.manager.links_as(&who, &key).await?
        } else if !req.revoke.is_empty() {
            let result = self.manager.revoke_as(&who, &key, &req.revoke).await;
            audit(&who, "share_revoke", key.as_str(), &facts, &result);
            vec![result?]
        } else {
            let port = u16::try_from(req.port)
                .map_err(|_| Status::invalid_argument(format!("port: {} is not a TCP port (1-65535)", req.port)))?;
            let ttl = match req.ttl.as_str() {
                "" => None,
                t => Some(Ttl::parse("ttl", t).map_err(Error::from)?),
            };
            let spec = ShareSpec { service: req.service, port, ttl, staging_url: req.staging_url };
            let result = self.manager.share_as(&who, &key, spec).await;
            audit(&who, "share", key.as_str(), &facts, &result);
            vec![result?]
        };
        Ok(Response::new(proto::ShareResponse { links: links.iter().map(|l| wire::share_link(l, &key)).collect() }))
    }
}

/// Waits for the manager's next event (a lagging receiver counts as one);
/// false when the stream should end: the server stops, the events end, or
/// the stream's receiver went away.
async fn next_change<T>(
    events: &mut broadcast::Receiver<crate::previewd::manager::Event>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
    tx: &mpsc::Sender<T>,
) -> bool {
    tokio::select! {
        ev = events.recv() => !matches!(ev, Err(broadcast::error::RecvError::Closed)),
        _ = stopping.changed() => false,
        _ = tx.closed() => false,
    }
}

/// Serves `preview.v1.AgentService`: the route stream of each agent.
pub struct AgentApi {
    manager: Arc<Manager>,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Checks agents' proofs of their pod; `None` with `--auth none`.
    prover: Option<Prover>,
}

impl AgentApi {
    pub fn new(manager: Arc<Manager>, stopping: tokio::sync::watch::Receiver<bool>, prover: Option<Prover>) -> Self {
        AgentApi { manager, stopping, prover }
    }
}

type RouteStream = Pin<Box<dyn Stream<Item = Result<proto::RouteSet, Status>> + Send>>;

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for AgentApi {
    type RoutesStream = RouteStream;

    async fn routes(&self, req: Request<proto::AgentHello>) -> Result<Response<Self::RoutesStream>, Status> {
        let proof = req.metadata().get(PROOF_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let hello = req.into_inner();
        if hello.namespace.is_empty() || hello.pod.is_empty() {
            return Err(Status::invalid_argument("namespace, pod: both are required (the agent's own pod)"));
        }
        let target = self.manager.cluster().target_of_pod(&hello.namespace, &hello.pod).await.map_err(Error::from)?;
        let denied = || {
            Status::permission_denied(format!(
                "{PROOF_HEADER}: no valid proof of pod {}/{}; only the agent previewd attached there gets its routes",
                hello.namespace, hello.pod
            ))
        };
        // The same answer for a missing pod and a wrong proof: a caller
        // without the proof learns nothing about which pods exist.
        let Some((kind, name, uid)) = target else {
            return Err(if self.prover.is_some() {
                denied()
            } else {
                Status::not_found(format!("pod: {}/{} does not exist", hello.namespace, hello.pod))
            });
        };
        if let Some(prover) = &self.prover
            && !proof.is_some_and(|p| prover.verify(&hello.namespace, &hello.pod, &uid, &p))
        {
            tracing::warn!(pod = %hello.pod, namespace = %hello.namespace, "agent hello without a valid proof of pod");
            return Err(denied());
        }
        tracing::info!(pod = %hello.pod, namespace = %hello.namespace, target = %format!("{}/{name}", kind.as_str()), "agent connected");
        let (tx, rx) = mpsc::channel(4);
        let manager = self.manager.clone();
        let mut stopping = self.stopping.clone();
        manager.agent_connected(&hello.namespace, &hello.pod, true);
        tokio::spawn(async move {
            let (_, mut events) = manager.subscribe(&Selector::default());
            let target = (hello.namespace.clone(), kind, name);
            let mut last = None;
            loop {
                let routes = match manager.agent_plan(&target) {
                    AgentPlan::Route(routes) => Some(routes),
                    AgentPlan::Wait => None,
                    AgentPlan::Leave => Some(Vec::new()), // an empty set: the agent leaves
                };
                if let Some(routes) = routes.filter(|r| last.as_ref() != Some(r)) {
                    let set = proto::RouteSet { routes: routes.iter().map(wire::route_to_proto).collect() };
                    if tx.send(Ok(set)).await.is_err() {
                        break;
                    }
                    last = Some(routes);
                }
                // Any change may move a route: recompute on every event. The
                // agent going away ends it too: Status says so now.
                if !next_change(&mut events, &mut stopping, &tx).await {
                    break;
                }
            }
            manager.agent_connected(&hello.namespace, &hello.pod, false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
