//! The gRPC `PreviewService`, and the single conversion from the manager's
//! errors to `tonic::Status`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::model::Key;
use crate::previewd::cluster::KubeError;
use crate::previewd::manager::{AgentPlan, CleanSelector, Error, Manager, Selector};
use crate::previewd::store::StoreError;
use crate::proto::preview_service_server::PreviewService;
use crate::proto::{self, clean_request};
use crate::wire;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match &e {
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotFound { .. } => Status::not_found(msg),
            Error::AlreadyExists { .. } => Status::already_exists(msg),
            Error::FailedPrecondition { .. } => Status::failed_precondition(msg),
            Error::PermissionDenied { .. } => Status::permission_denied(msg),
            Error::ResourceExhausted { .. } => Status::resource_exhausted(msg),
            Error::Cluster { source, .. } => match source {
                KubeError::NamespaceNotFound(_) | KubeError::TargetNotFound { .. } => Status::not_found(msg),
                KubeError::ContainerNotFound { .. } | KubeError::NoContainers { .. } => Status::invalid_argument(msg),
                KubeError::Api { source: ::kube::Error::Api(s), .. } if s.code == 403 => Status::permission_denied(msg),
                KubeError::Api { source: ::kube::Error::Api(s), .. } if s.code == 422 => Status::invalid_argument(msg),
                KubeError::Api { .. } => Status::unavailable(msg),
            },
            Error::Store(StoreError::Full { .. }) => Status::resource_exhausted(msg),
            Error::Store(StoreError::Io { .. }) => Status::unavailable(msg),
            Error::Store(_) => Status::internal(msg),
        }
    }
}

pub struct Api {
    manager: Arc<Manager>,
    /// Changes when the server shuts down, so open watches end and graceful
    /// shutdown does not wait on them forever.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Api {
    pub fn new(manager: Arc<Manager>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        Api { manager, stopping }
    }
}

/// Events queued per watcher before it counts as slow.
const WATCHER_QUEUE: usize = 32;

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::StatusEvent, Status>> + Send>>;

#[tonic::async_trait]
impl PreviewService for Api {
    async fn start(&self, req: Request<proto::StartRequest>) -> Result<Response<proto::StartResponse>, Status> {
        let started = self.manager.start(wire::start_request(req.into_inner())).await?;
        self.manager.metrics().started();
        tracing::info!(key = %started.key, "start");
        Ok(Response::new(wire::started(&started)))
    }

    async fn add_pod(&self, req: Request<proto::AddPodRequest>) -> Result<Response<proto::AddPodResponse>, Status> {
        let req = req.into_inner();
        let started = self.manager.add_pod(&req.key, req.pod.map(wire::pod_request)).await?;
        Ok(Response::new(proto::AddPodResponse {
            environment: Some(wire::environment(&started.environment)),
            warnings: started.warnings,
        }))
    }

    type StatusStream = EventStream;

    async fn status(&self, req: Request<proto::StatusRequest>) -> Result<Response<Self::StatusStream>, Status> {
        let req = req.into_inner();
        let sel = Selector { key: req.key, namespace: req.namespace };
        if !req.watch {
            let snap = self.manager.snapshot(&sel);
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(snap)))));
        }
        // As in tonic's streaming examples: a task feeds a bounded channel and
        // ends when the client goes away (send fails).
        let (tx, rx) = mpsc::channel(WATCHER_QUEUE);
        let manager = self.manager.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let (snap, mut events) = manager.subscribe(&sel);
            if tx.send(Ok(snap)).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    ev = events.recv() => ev,
                    _ = stopping.changed() => break,
                };
                let ev = match next {
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
                if tx.send(Ok(ev)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn clean(&self, req: Request<proto::CleanRequest>) -> Result<Response<proto::CleanResponse>, Status> {
        let sel = match req.into_inner().selector {
            Some(clean_request::Selector::Key(k)) => CleanSelector::Key(Key::parse("key", &k).map_err(Error::from)?),
            Some(clean_request::Selector::Glob(g)) if !g.is_empty() => CleanSelector::Glob(g),
            Some(clean_request::Selector::AllExpired(true)) => CleanSelector::AllExpired,
            _ => {
                return Err(Status::invalid_argument(
                    "selector: give one of key, glob (non-empty) or all_expired=true",
                ));
            }
        };
        let removed = self.manager.clean(sel).await?;
        self.manager.metrics().cleaned(removed.len());
        Ok(Response::new(proto::CleanResponse { removed: removed.into_iter().map(wire::cleaned).collect() }))
    }
}

/// Serves `preview.v1.AgentService`: the route stream of each agent.
pub struct AgentApi {
    manager: Arc<Manager>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl AgentApi {
    pub fn new(manager: Arc<Manager>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        AgentApi { manager, stopping }
    }
}

type RouteStream = Pin<Box<dyn Stream<Item = Result<proto::RouteSet, Status>> + Send>>;

#[tonic::async_trait]
impl proto::agent_service_server::AgentService for AgentApi {
    type RoutesStream = RouteStream;

    async fn routes(&self, req: Request<proto::AgentHello>) -> Result<Response<Self::RoutesStream>, Status> {
        let hello = req.into_inner();
        if hello.namespace.is_empty() || hello.pod.is_empty() {
            return Err(Status::invalid_argument("namespace, pod: both are required (the agent's own pod)"));
        }
        let target = self.manager.cluster().target_of_pod(&hello.namespace, &hello.pod).await.map_err(Error::from)?;
        let Some((kind, name)) = target else {
            return Err(Status::not_found(format!("pod: {}/{} does not exist", hello.namespace, hello.pod)));
        };
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
                // Any change may move a route: recompute on every event.
                tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = stopping.changed() => break,
                    // The agent went away: say so in Status now, not at the next change.
                    _ = tx.closed() => break,
                }
            }
            manager.agent_connected(&hello.namespace, &hello.pod, false);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
