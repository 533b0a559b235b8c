//! The share gateway (`preview-agent gateway`): the agent's proxy in front
//! of share links. A request for `<slug>.<share domain>` goes to its
//! environment's entry Service with its key in `baggage` (replacing any key
//! the visitor sent: a link opens its own environment only), page loads,
//! `fetch` and WebSocket upgrades alike; absolute redirects to the Service
//! come back under the share host, and cookies lose their `Domain` so the
//! browser keeps them for the share host. An unknown slug is a 404 page; an
//! ended one (revoked, expired, cleaned) a 410 page that links to staging,
//! never staging's own page. Links stream from previewd (GatewayService),
//! and the listener opens only once the first set has arrived.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use super::cli::GatewayArgs;
use super::error::AgentError;
use super::framing::{Decision, decide};
use super::h1::{self, Forward, Front};
use super::metrics::Metrics;
use super::proxy::{AppConn, Proxy};
use super::routes::RouteTable;
use super::share_heads::{self, forward_headers, rewrite_response};
use super::state::{ProxyBody, full};
use crate::model::now_ms;
use crate::{proto, wire};

/// One slug's destination, or why it has ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Live {
        key: String,
        upstream: SocketAddr,
        /// The Host sent upstream (`frontend.demo.svc:8080`).
        authority: String,
        expires_at_ms: Option<i64>,
        staging_url: String,
    },
    Ended {
        reason: String,
        staging_url: String,
    },
}

/// Links by slug.
pub type LinkTable = HashMap<String, Link>;

/// The table of a set from previewd; a live link with a bad upstream is
/// left out (its slug answers 404), and logged.
pub fn link_table(set: &proto::LinkSet) -> LinkTable {
    let mut out = HashMap::with_capacity(set.links.len());
    for l in &set.links {
        let link = if !l.ended.is_empty() {
            Link::Ended { reason: l.ended.clone(), staging_url: l.staging_url.clone() }
        } else {
            match l.upstream.parse() {
                Ok(upstream) => Link::Live {
                    key: l.key.clone(),
                    upstream,
                    authority: l.authority.clone(),
                    expires_at_ms: l.expires_at.as_ref().map(wire::timestamp_ms),
                    staging_url: l.staging_url.clone(),
                },
                Err(_) => {
                    tracing::warn!(upstream = %l.upstream, "link with an unusable upstream left out");
                    continue;
                }
            }
        };
        out.insert(l.slug.clone(), link);
    }
    out
}

/// A browser connection's upstream connection, and where it goes.
type Upstream = Arc<std::sync::Mutex<Option<(SocketAddr, Arc<AppConn>)>>>;

/// The share gateway: its links and the proxy that forwards.
pub struct Gateway {
    links: RwLock<Arc<LinkTable>>,
    proxy: Arc<Proxy>,
    /// The fast path frames requests with the agent's `decide`, which routes
    /// nothing here.
    no_routes: RouteTable,
}

impl Gateway {
    /// Must be called inside a tokio runtime (the proxy starts a task).
    pub fn new(links: LinkTable) -> Arc<Gateway> {
        Arc::new(Gateway {
            links: RwLock::new(Arc::new(links)),
            proxy: Proxy::new(Arc::default(), Arc::new(Metrics::default())),
            no_routes: RouteTable::default(),
        })
    }

    pub fn set(&self, links: LinkTable) {
        *self.links.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(links);
    }

    fn get(&self, slug: &str) -> Option<Link> {
        self.links.read().unwrap_or_else(|e| e.into_inner()).get(slug).cloned()
    }

    /// Serves browsers on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, peer) = crate::net::accept(&listener).await;
            tokio::spawn(self.clone().serve_conn(stream, peer));
        }
    }

    async fn serve_conn(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // Live links take the byte-level fast path, as staging's requests do
        // in the agent; hyper serves what it hands back (upgrades, the
        // gateway's own pages, anything unusual) for the connection's life.
        let Some(stream) = h1::serve_front(stream, |buf| self.plan(buf, peer)).await else { return };
        // As on the agent's hot path: a browser's connection keeps one
        // upstream connection, with no pool in between.
        let up = Arc::new(std::sync::Mutex::new(None));
        let svc = hyper::service::service_fn(move |req| self.clone().handle(req, peer, up.clone()));
        // Errors are per connection (the browser went away); nothing to do.
        let _ = hyper::server::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
            .await;
    }

    /// The fast path's plan for the request at the start of `buf`: a live
    /// link's request, its head rewritten; anything else goes to hyper.
    fn plan(&self, buf: &[u8], peer: SocketAddr) -> Front {
        let head = match decide(buf, &self.no_routes, 0) {
            Decision::Relay(h) => h,
            Decision::Partial => return Front::Partial,
            Decision::HandOff => return Front::HandOff,
        };
        let links = self.links.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut to = None;
        let found = share_heads::request_head(&buf[..head.len], peer, |host| {
            let slug = host.split(['.', ':']).next().unwrap_or_default();
            match links.get(slug)? {
                Link::Live { key, upstream, authority, expires_at_ms, .. }
                    if expires_at_ms.is_none_or(|t| t > now_ms()) =>
                {
                    to = Some((*upstream, authority.clone()));
                    Some((key.as_str(), authority.as_str()))
                }
                _ => None,
            }
        });
        let (Some((host, new_head)), Some((upstream, authority))) = (found, to) else { return Front::HandOff };
        let rewrite = Box::new(move |h: &[u8]| share_heads::response_head(h, &host, &authority, upstream));
        Front::Forward(Forward { head, new_head, upstream, rewrite })
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        up: Upstream,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let slug = host.split(['.', ':']).next().unwrap_or_default();
        let link = match self.get(slug) {
            Some(Link::Live { expires_at_ms: Some(t), staging_url, .. }) if t <= now_ms() => {
                Link::Ended { reason: "expired".into(), staging_url }
            }
            Some(l) => l,
            None => return Ok(page(StatusCode::NOT_FOUND, "Unknown link", "This share link does not exist.", "")),
        };
        let (key, upstream, authority) = match link {
            Link::Ended { reason, staging_url } => {
                let why = match reason.as_str() {
                    "revoked" => "Its link was revoked.",
                    "expired" => "Its time ran out.",
                    _ => "It was cleaned up.",
                };
                return Ok(page(StatusCode::GONE, "This preview has ended", why, &staging_url));
            }
            Link::Live { key, upstream, authority, .. } => (key, upstream, authority),
        };
        forward_headers(req.headers_mut(), &key, &authority, &host, peer);
        let mut resp = if req.headers().contains_key(http::header::UPGRADE) {
            self.proxy.forward(req, upstream, Some(&key)).await
        } else {
            let conn = {
                let mut slot = up.lock().unwrap_or_else(|e| e.into_inner());
                match &*slot {
                    Some((to, c)) if *to == upstream => c.clone(),
                    // A first request, or another link on the same connection.
                    _ => slot.insert((upstream, Arc::new(AppConn::default()))).1.clone(),
                }
            };
            conn.send(req, upstream).await
        };
        rewrite_response(resp.headers_mut(), &host, &authority, upstream);
        Ok(resp)
    }
}

/// A small HTML page for the gateway's own answers.
fn page(status: StatusCode, title: &str, text: &str, staging_url: &str) -> Response<ProxyBody> {
    // staging_url was checked by previewd (http(s), no quotes or brackets).
    let staging = if staging_url.is_empty() {
        String::new()
    } else {
        format!("<p><a href=\"{staging_url}\">Go to staging</a></p>")
    };
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{text}</p>{staging}</body></html>\n"
    );
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r.headers_mut().insert("cache-control", HeaderValue::from_static("no-store"));
    r
}

/// `preview-agent gateway`: follows previewd's links, then serves browsers.
pub async fn gateway(args: GatewayArgs) -> Result<(), AgentError> {
    let ca = match &args.ca_file {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|e| AgentError::Routes { path: p.clone(), message: e.to_string() })?,
        ),
        None => None,
    };
    let server = Server { url: args.server.clone(), ca, token_file: args.token_file.clone(), name: args.name.clone() };
    let mut stream = tokio::time::timeout(Duration::from_secs(15), server.open())
        .await
        .map_err(|_| AgentError::Routes { path: args.server.clone().into(), message: "no answer within 15 s".into() })?
        .map_err(|message| AgentError::Routes { path: args.server.clone().into(), message })?;
    let first = stream
        .message()
        .await
        .map_err(|s| AgentError::Routes { path: args.server.clone().into(), message: s.message().to_string() })?
        .ok_or_else(|| AgentError::Routes { path: args.server.clone().into(), message: "stream ended".into() })?;
    let gw = Gateway::new(link_table(&first));
    let listener =
        TcpListener::bind(args.listen).await.map_err(|source| AgentError::Bind { addr: args.listen, source })?;
    tracing::info!(listen = %args.listen, links = first.links.len(), "share gateway serving");
    tokio::spawn(follow(server, stream, gw.clone()));
    gw.serve(listener).await;
    Ok(())
}

/// previewd's address, the CA to trust there, and the token to show.
struct Server {
    url: String,
    ca: Option<String>,
    token_file: Option<std::path::PathBuf>,
    name: String,
}

impl Server {
    async fn open(&self) -> Result<tonic::Streaming<proto::LinkSet>, String> {
        let channel = super::source::connect(&self.url, self.ca.as_deref()).await?;
        let mut client = proto::gateway_service_client::GatewayServiceClient::new(channel);
        let mut req = tonic::Request::new(proto::GatewayHello { name: self.name.clone() });
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let v =
                format!("Bearer {}", token.trim()).parse().map_err(|_| format!("{}: not a token", path.display()))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(client.links(req).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?.into_inner())
    }
}

/// Applies every set previewd sends; reconnects with a capped backoff. While
/// previewd is away the last links stay (each still ends at its expiry).
async fn follow(server: Server, mut stream: tonic::Streaming<proto::LinkSet>, gw: Arc<Gateway>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match stream.message().await {
            Ok(Some(set)) => {
                backoff = Duration::from_millis(250);
                tracing::info!(links = set.links.len(), "links updated");
                gw.set(link_table(&set));
                continue;
            }
            Ok(None) => tracing::warn!("link stream ended; keeping the last links"),
            Err(e) => tracing::warn!(error = %e.message(), "link stream lost; keeping the last links"),
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match server.open().await {
                Ok(s) => {
                    stream = s;
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "reconnecting to previewd"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_and_bad_links_are_told_apart() {
        let set = proto::LinkSet {
            links: vec![
                proto::GatewayLink {
                    slug: "a".into(),
                    key: "k".into(),
                    upstream: "198.19.0.7:80".into(),
                    ..Default::default()
                },
                proto::GatewayLink { slug: "b".into(), ended: "revoked".into(), ..Default::default() },
                proto::GatewayLink {
                    slug: "c".into(),
                    key: "k".into(),
                    upstream: "nonsense".into(),
                    ..Default::default()
                },
            ],
        };
        let t = link_table(&set);
        assert!(matches!(t.get("a"), Some(Link::Live { key, .. }) if key == "k"));
        assert!(matches!(t.get("b"), Some(Link::Ended { reason, .. }) if reason == "revoked"));
        assert!(!t.contains_key("c"));
    }

    #[tokio::test]
    async fn live_links_take_the_fast_path_and_the_rest_go_to_hyper() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let live = Link::Live {
            key: "k".into(),
            upstream: up,
            authority: "web.shop.svc:8080".into(),
            expires_at_ms: None,
            staging_url: String::new(),
        };
        let expired = Link::Live {
            key: "k".into(),
            upstream: up,
            authority: "web.shop.svc:8080".into(),
            expires_at_ms: Some(1),
            staging_url: String::new(),
        };
        let gw = Gateway::new(LinkTable::from([("a".into(), live), ("e".into(), expired)]));
        let peer: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        let plan = |req: &str| gw.plan(req.as_bytes(), peer);
        match plan("GET /x HTTP/1.1\r\nHost: A.preview.test\r\n\r\n") {
            Front::Forward(f) => {
                assert_eq!(f.upstream, up);
                let head = String::from_utf8(f.new_head).unwrap();
                assert!(head.contains("host: web.shop.svc:8080\r\n"), "{head}");
            }
            _ => panic!("a live link's GET takes the fast path"),
        }
        assert!(matches!(plan("GET /x HTTP/1.1\r\nHost: a.preview.test\r\n"), Front::Partial));
        for handed in [
            "GET /x HTTP/1.1\r\nHost: e.preview.test\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: nope.preview.test\r\n\r\n",
            "GET /x HTTP/1.1\r\n\r\n",
            "GET /x HTTP/1.1\r\nHost: a.preview.test\r\nHost: a.preview.test\r\n\r\n",
            "GET /x HTTP/1.0\r\nHost: a.preview.test\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: a.preview.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        ] {
            assert!(matches!(plan(handed), Front::HandOff), "{handed}");
        }
    }
}
