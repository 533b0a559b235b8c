//! The one tracing setup for every binary: human-readable on a terminal,
//! JSON lines otherwise; the filter comes from `RUST_LOG` (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests start several servers in one process) is harmless.
    let _ = if std::io::stderr().is_terminal() { builder.try_init() } else { builder.json().try_init() };
}

/// Serves plain-text pages over HTTP/1 (admin ports: `/metrics` and friends).
/// `page` maps a path, and whether the caller is on loopback, to a body, or
/// to a refusal (403 with that text).
pub async fn serve_text<F>(listener: tokio::net::TcpListener, page: F)
where
    F: Fn(&str, bool) -> Result<String, String> + Clone + Send + Sync + 'static,
{
    use http_body_util::Full;
    loop {
        let (stream, peer) = crate::net::accept(&listener).await;
        let local = peer.ip().is_loopback();
        let page = page.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let resp = match page(req.uri().path(), local) {
                    Ok(body) => http::Response::new(Full::new(bytes::Bytes::from(body))),
                    Err(why) => {
                        let mut r = http::Response::new(Full::new(bytes::Bytes::from(why)));
                        *r.status_mut() = http::StatusCode::FORBIDDEN;
                        r
                    }
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
