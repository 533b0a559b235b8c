//! The gRPC `PreviewService`, and the single conversion from the manager's
//! errors to `tonic::Status`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::previewd::cluster::KubeError;
use crate::previewd::manager::{CleanSelector, Error, Manager, Selector};
use crate::proto::preview_service_server::PreviewService;
use crate::proto::{self, clean_request};

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::InvalidArgument(_) => Status::invalid_argument(e.to_string()),
            Error::NotFound { .. } => Status::not_found(e.to_string()),
            Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
            Error::FailedPrecondition { .. } => Status::failed_precondition(e.to_string()),
            Error::Kube(KubeError::Api { source: ::kube::Error::Api(s), .. }) if s.code == 403 => {
                Status::permission_denied(e.to_string())
            }
            Error::Kube(KubeError::Api { source: ::kube::Error::Api(s), .. }) if s.code == 422 => {
                Status::invalid_argument(e.to_string())
            }
            Error::Kube(_) => Status::unavailable(e.to_string()),
            Error::Store(_) => Status::internal(e.to_string()),
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
        let resp = self.manager.start(req.into_inner()).await?;
        self.manager.metrics().started();
        tracing::info!(key = %resp.key, "start");
        Ok(Response::new(resp))
    }

    async fn add_pod(&self, req: Request<proto::AddPodRequest>) -> Result<Response<proto::AddPodResponse>, Status> {
        Ok(Response::new(self.manager.add_pod(req.into_inner()).await?))
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
                    Ok(ev) if Manager::event_matches(&sel, &ev) => (*ev).clone(),
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
            Some(clean_request::Selector::Key(k)) => CleanSelector::Key(k),
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
        Ok(Response::new(proto::CleanResponse { removed }))
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
        tokio::spawn(async move {
            let (_, mut events) = manager.subscribe(&Selector::default());
            let mut last = None;
            loop {
                let routes = manager.routes_for(&hello.namespace, kind, &name);
                // An empty set tells the agent to leave. While an environment
                // still previews this target (its preview pod has no IP yet,
                // or is being replaced), send nothing: the agent waits, or
                // keeps its last routes.
                let wait =
                    routes.is_empty() && manager.targets().contains(&(hello.namespace.clone(), kind, name.clone()));
                if !wait && last.as_ref() != Some(&routes) {
                    let set =
                        proto::RouteSet { routes: routes.iter().map(crate::agent::routes::wire::to_proto).collect() };
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
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
