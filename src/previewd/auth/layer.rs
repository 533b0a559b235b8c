//! The edge layer: every call on the gRPC port is authenticated before any
//! service sees it (health and reflection too), and the caller rides in the
//! request's extensions. AgentService is the one exception: agents prove
//! their pod instead (see `proof`), in the handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::Auth;
use super::serve::PeerCerts;

/// Paths under this prefix are agents', checked by proof of pod.
pub const AGENT_PATH: &str = "/preview.v1.AgentService/";

#[derive(Clone)]
pub struct AuthLayer(pub Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate { inner, auth: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    auth: Arc<Auth>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The clone is the ready one's twin; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            if req.uri().path().starts_with(AGENT_PATH) {
                return inner.call(req).await;
            }
            let certs = req.extensions().get::<PeerCerts>().and_then(|p| p.0.clone());
            match auth.authenticate(req.headers(), certs.as_deref().map(|c| c.as_slice())).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await
                }
                Err(e) => {
                    tracing::info!(path = req.uri().path(), error = %e, "refused a caller");
                    // The conversion is api's, the one place errors become codes.
                    Ok(tonic::Status::from(e).into_http())
                }
            }
        })
    }
}
