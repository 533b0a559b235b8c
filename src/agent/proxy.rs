//! The data plane: one task per intercepted connection. It detects the
//! protocol, then routes HTTP/1 requests, HTTP/2 streams (gRPC included) one
//! by one; anything else is spliced to the app unchanged. HTTP/1 starts on
//! the byte-level fast path (`h1.rs`); hyper serves what that hands back,
//! and all of HTTP/2.
//!
//! Staging must not notice: unmatched requests go to the app as they came,
//! a preview that is down fails only the keyed request (502 / gRPC
//! UNAVAILABLE), and mirror copies never make the original wait.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::detect::{H2_PREFACE, Protocol, detect};
use super::h1::Prefixed;
use super::metrics::Metrics;
use super::mirror::mirror_sender;
use super::routes::SharedRoutes;
pub use super::state::Proxy;
use super::state::{
    CREDENTIAL_HEADERS, InFlight, MIRROR_MAX_BODY, MIRROR_MAX_BYTES, MIRROR_QUEUE, MirrorCopy, ProxyBody, empty, full,
    idempotent,
};
use crate::model::{Key, Mode};

/// How long a client may stay silent before the app is connected too: then
/// whichever speaks first decides (an app greeting: raw TCP).
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(200);
fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(3)));
    c
}

impl Proxy {
    /// Must be called inside a tokio runtime: it starts the mirror sender.
    pub fn new(routes: Arc<SharedRoutes>, metrics: Arc<Metrics>) -> Arc<Proxy> {
        Self::build(routes, metrics, None, MIRROR_MAX_BYTES)
    }

    /// As [`Proxy::new`], with at most `mirror_budget` bytes of mirror
    /// copies queued or in flight.
    pub fn with_mirror_budget(routes: Arc<SharedRoutes>, metrics: Arc<Metrics>, mirror_budget: usize) -> Arc<Proxy> {
        Self::build(routes, metrics, None, mirror_budget)
    }

    /// The outbound proxy of a preview pod: adds the key to every HTTP request.
    pub fn propagating(metrics: Arc<Metrics>, key: Key) -> Arc<Proxy> {
        Self::build(Arc::default(), metrics, Some(key), MIRROR_MAX_BYTES)
    }

    fn build(
        routes: Arc<SharedRoutes>,
        metrics: Arc<Metrics>,
        propagate: Option<Key>,
        mirror_budget: usize,
    ) -> Arc<Proxy> {
        let h1 = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector());
        let h2 = Client::builder(TokioExecutor::new()).http2_only(true).build(connector());
        let (tx, rx) = mpsc::channel(MIRROR_QUEUE);
        let inflight = Arc::new(InFlight::default());
        let proxy = Arc::new(Proxy {
            routes,
            metrics,
            h1,
            h2,
            mirror: tx,
            inflight: inflight.clone(),
            propagate,
            mirror_bytes: Arc::default(),
            mirror_budget,
        });
        tokio::spawn(mirror_sender(proxy.h1.clone(), proxy.h2.clone(), proxy.metrics.clone(), inflight, rx));
        proxy
    }

    /// Serves one intercepted connection whose original destination is `app`.
    pub async fn serve(self: Arc<Self>, client: TcpStream, app: SocketAddr) {
        let _ = client.set_nodelay(true);
        let (proto, opened) = match sniff(&client).await {
            Some(p) => (p, None),
            // Silent: a server-first protocol waiting for the app's greeting,
            // or an HTTP client on a busy node that has not written yet (taking
            // it for raw TCP would bypass routing for the connection's life).
            // Whoever speaks first decides.
            None => {
                let Ok(up) = TcpStream::connect(app).await else { return };
                tokio::select! {
                    _ = up.readable() => (Protocol::Raw, Some(up)),
                    _ = client.readable() => (sniff(&client).await.unwrap_or(Protocol::Raw), Some(up)),
                }
            }
        };
        let port = app.port();
        match proto {
            Protocol::Raw => {
                self.metrics.raw();
                let mut up = match opened {
                    Some(up) => up,
                    None => match TcpStream::connect(app).await {
                        Ok(up) => up,
                        Err(_) => return,
                    },
                };
                let _ = up.set_nodelay(true);
                let mut client = client;
                // Errors end the connection, as a direct one would end.
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            Protocol::Http1 => {
                // Inbound, requests that stay on staging take the byte-level
                // fast path; hyper serves what it hands back.
                let client = match self.propagate {
                    None => match super::h1::serve(&self, client, app).await {
                        Some(rest) => rest,
                        None => return,
                    },
                    Some(_) => Prefixed::new(client),
                };
                let conn = Arc::new(AppConn::default());
                let svc =
                    hyper::service::service_fn(move |req| self.clone().handle(req, app, port, Some(conn.clone())));
                let _ = hyper::server::conn::http1::Builder::new()
                    // Like Envoy's 60 KiB header limit: larger requests get 431.
                    .max_buf_size(64 * 1024)
                    .serve_connection(TokioIo::new(client), svc)
                    .with_upgrades()
                    .await;
            }
            Protocol::Http2 => {
                let svc = hyper::service::service_fn(move |req| self.clone().handle(req, app, port, None));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(client), svc)
                    .await;
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        app: SocketAddr,
        port: u16,
        conn: Option<Arc<AppConn>>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let _busy = self.inflight.enter();
        if let Some(key) = &self.propagate {
            let mut req = req;
            if crate::filter::inject_baggage(req.headers_mut(), key) {
                self.metrics.propagated();
            }
            return Ok(match conn {
                Some(conn) if !req.headers().contains_key(UPGRADE) => conn.send(req, app).await,
                _ => self.forward(req, app, None).await,
            });
        }
        let table = self.routes.get();
        let Some(route) = table.find(port, &req) else {
            self.metrics.passthrough();
            return Ok(match conn {
                Some(conn) if !req.headers().contains_key(UPGRADE) => conn.send(req, app).await,
                _ => self.forward(req, app, None).await,
            });
        };
        let key = route.key.clone();
        let preview = SocketAddr::new(route.destination, port);
        match route.mode {
            Mode::Steal => {
                self.metrics.routed(&key);
                Ok(self.forward(req, preview, Some(&key)).await)
            }
            Mode::Mirror => {
                let len = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                let upgrade = req.headers().contains_key(UPGRADE);
                let bodyless = len.is_none() && req.version() != Version::HTTP_2 && !is_chunked(&req);
                let size = if bodyless { Some(0) } else { len };
                match size.filter(|n| *n <= MIRROR_MAX_BODY && !upgrade) {
                    None => {
                        self.metrics.mirror_dropped(&key);
                        Ok(self.forward(req, app, None).await)
                    }
                    Some(_) => {
                        let (parts, body) = req.into_parts();
                        let bytes = match body.collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => {
                                return Ok(error_response(
                                    is_grpc(&parts.headers),
                                    StatusCode::BAD_REQUEST,
                                    "request body ended early",
                                ));
                            }
                        };
                        let mut copy = Request::new(full(bytes.clone()));
                        *copy.method_mut() = parts.method.clone();
                        *copy.uri_mut() = parts.uri.clone();
                        *copy.version_mut() = parts.version;
                        *copy.headers_mut() = parts.headers.clone();
                        for h in CREDENTIAL_HEADERS {
                            copy.headers_mut().remove(h);
                        }
                        let original = Request::from_parts(parts, full(bytes));
                        let resp = self.send(original, app, None, None).await;
                        // Queued once the original has its answer: the copy's
                        // work never sits between the original and the app.
                        self.queue_copy(&key, MirrorCopy::Request(Box::new(copy)), preview);
                        Ok(resp)
                    }
                }
            }
        }
    }

    /// Sends `req` to `to`, splicing an HTTP/1 upgrade (WebSocket) when the
    /// upstream answers 101. `key` names the preview when it is one.
    pub(super) async fn forward(
        &self,
        mut req: Request<Incoming>,
        to: SocketAddr,
        key: Option<&str>,
    ) -> Response<ProxyBody> {
        let upgrade = (req.version() != Version::HTTP_2 && req.headers().contains_key(UPGRADE))
            .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        self.send(Request::from_parts(parts, body.boxed()), to, key, upgrade).await
    }

    async fn send(
        &self,
        mut req: Request<ProxyBody>,
        to: SocketAddr,
        key: Option<&str>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let h2 = req.version() == Version::HTTP_2;
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match format!("http://{to}{pq}").parse() {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => return error_response(grpc, StatusCode::BAD_REQUEST, "bad request target"),
        }
        let result = if h2 { self.h2.request(req).await } else { self.h1.request(req).await };
        match result {
            Ok(mut resp) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade
                {
                    let upstream = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream.await) {
                            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u)).await;
                        }
                    });
                }
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                let msg = match key {
                    Some(k) => format!("preview for key {k:?} at {to} is unreachable: {e}"),
                    None => format!("upstream {to} is unreachable: {e}"),
                };
                tracing::debug!(%msg);
                error_response(grpc, StatusCode::BAD_GATEWAY, &msg)
            }
        }
    }
}

/// The app connection of one HTTP/1 client connection. Requests on a client
/// connection come one at a time, so one upstream connection serves them all
/// with no pool in between (the unmatched path is the hot one).
#[derive(Default)]
pub(super) struct AppConn(tokio::sync::Mutex<Option<hyper::client::conn::http1::SendRequest<ProxyBody>>>);

impl AppConn {
    pub(super) async fn send(&self, req: Request<Incoming>, app: SocketAddr) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let fail = |e: &dyn std::fmt::Display| {
            error_response(grpc, StatusCode::BAD_GATEWAY, &format!("upstream {app} is unreachable: {e}"))
        };
        let mut slot = self.0.lock().await;
        let reused = slot.as_ref().is_some_and(|s| !s.is_closed());
        if !reused {
            match connect_h1(app).await {
                Ok(send) => *slot = Some(send),
                Err(e) => return fail(&e),
            }
        }
        let Some(send) = slot.as_mut() else { return fail(&"no connection") };
        if let Err(e) = send.ready().await {
            *slot = None;
            return fail(&e);
        }
        // A kept-alive connection may have been reset under us (say, its
        // conntrack entry was flushed when an agent attached downstream).
        // Like Envoy, replay a bodiless idempotent request once on a fresh one.
        let replay = (reused && replayable(&req)).then(|| {
            let mut r = Request::new(empty());
            *r.method_mut() = req.method().clone();
            *r.uri_mut() = req.uri().clone();
            *r.version_mut() = req.version();
            *r.headers_mut() = req.headers().clone();
            r
        });
        let (parts, body) = req.into_parts();
        let sent = send.send_request(Request::from_parts(parts, body.boxed()));
        drop(slot);
        let err = match sent.await {
            Ok(resp) => return resp.map(|b| b.boxed()),
            Err(e) => e,
        };
        let Some(again) = replay else { return fail(&err) };
        let mut slot = self.0.lock().await;
        let mut send = match connect_h1(app).await {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let sent = send.send_request(again);
        *slot = Some(send);
        drop(slot);
        match sent.await {
            Ok(resp) => resp.map(|b| b.boxed()),
            Err(e) => fail(&e),
        }
    }
}

async fn connect_h1(app: SocketAddr) -> Result<hyper::client::conn::http1::SendRequest<ProxyBody>, String> {
    let stream = TcpStream::connect(app).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// Safe to send twice: an idempotent method and no body.
fn replayable<B>(req: &Request<B>) -> bool {
    let bodiless = !is_chunked(req)
        && req.headers().get(CONTENT_LENGTH).is_none_or(|v| v.as_bytes() == b"0")
        && !req.headers().contains_key(UPGRADE);
    idempotent(req.method().as_str()) && bodiless
}

fn is_chunked<B>(req: &Request<B>) -> bool {
    req.headers().get(http::header::TRANSFER_ENCODING).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"))
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// 502 for HTTP; a trailers-only UNAVAILABLE for gRPC so the client sees a status.
fn error_response(grpc: bool, status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut resp = if grpc {
        let mut r = Response::new(empty());
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        r.headers_mut().insert("grpc-status", HeaderValue::from_static("14"));
        if let Ok(v) = HeaderValue::from_str(&msg.replace(['\r', '\n'], " ")) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{msg}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    };
    resp.headers_mut().insert("x-preview-agent", HeaderValue::from_static("error"));
    resp
}

/// Peeks until the protocol is known. `None` when the client has sent
/// nothing within [`DETECT_TIMEOUT`]; a close, or a partial request line
/// that stalls that long, is raw.
async fn sniff(stream: &TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        // Peek returns at once while bytes are waiting, so only silence times out here.
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Some(Protocol::Raw),
            Err(_) => return None,
        };
        if n == 0 {
            return Some(Protocol::Raw);
        }
        if let Some(p) = detect(&buf[..n]) {
            return Some(p);
        }
        // A partial request line: wait for more bytes.
        if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(1))).await.is_err() {
            return Some(Protocol::Raw);
        }
    }
}
