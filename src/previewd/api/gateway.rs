//! The gRPC `GatewayService`: each share gateway's link set, streamed.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{caller, next_change};
use crate::previewd::auth::Access;
use crate::previewd::manager::{Manager, Selector};
use crate::proto;

/// Serves `preview.v1.GatewayService`: the link set of each share gateway.
/// The caller (a gateway's ServiceAccount) needs `watch` on
/// `previewenvironments/shares` cluster-wide.
pub struct GatewayApi {
    manager: Arc<Manager>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl GatewayApi {
    pub fn new(manager: Arc<Manager>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        GatewayApi { manager, stopping }
    }
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<proto::LinkSet, Status>> + Send>>;

#[tonic::async_trait]
impl proto::gateway_service_server::GatewayService for GatewayApi {
    type LinksStream = LinkStream;

    async fn links(&self, req: Request<proto::GatewayHello>) -> Result<Response<Self::LinksStream>, Status> {
        let who = caller(&req)?;
        let access = Access::of("watch", crate::previewd::auth::GROUP, "previewenvironments/shares", "", "");
        if !self.manager.auth().allowed(&who, &access).await? {
            return Err(Status::permission_denied(format!("user {:?} may not {access}", who.user)));
        }
        let name = req.into_inner().name;
        tracing::info!(gateway = %name, user = %who.user, "gateway connected");
        let (tx, rx) = mpsc::channel(4);
        let manager = self.manager.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let (_, mut events) = manager.subscribe(&Selector::default());
            let mut last = None;
            loop {
                match manager.link_set().await {
                    Ok(set) if last.as_ref() != Some(&set) => {
                        if tx.send(Ok(set.clone())).await.is_err() {
                            break;
                        }
                        last = Some(set);
                    }
                    Ok(_) => {}
                    // The gateway keeps its last set; the next event tries again.
                    Err(e) => tracing::warn!(error = %e, "link set not read"),
                }
                if !next_change(&mut events, &mut stopping, &tx).await {
                    break;
                }
            }
            tracing::info!(gateway = %name, "gateway gone");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
