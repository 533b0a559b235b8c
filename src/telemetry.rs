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

/// Serves plain-text pages over HTTP/1 (admin ports: `/metrics` and friends);
/// `page` maps a path to its body.
pub async fn serve_text<F>(listener: tokio::net::TcpListener, page: F)
where
    F: Fn(&str) -> String + Clone + Send + Sync + 'static,
{
    use http_body_util::Full;
    loop {
        let (stream, _) = crate::net::accept(&listener).await;
        let page = page.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let body = page(req.uri().path());
                async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(bytes::Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
