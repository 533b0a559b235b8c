//! previewd's Prometheus metrics: environment and pod gauges, counters for
//! starts, cleans and reaps, and per-RPC latency histograms recorded by the
//! [`Edge`] layer, which also stamps every response with the server version.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::model::{VERSION, VERSION_HEADER};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    total: u64,
    sum: f64,
}

#[derive(Default)]
pub struct ServerMetrics {
    starts: AtomicU64,
    cleans: AtomicU64,
    reaps: AtomicU64,
    /// (method, grpc-status) → latency.
    rpcs: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

/// Gauges read from the manager when scraped.
pub struct Gauges {
    pub environments: usize,
    pub pods: usize,
    /// Running target pods by their agent's state (label value → count).
    pub agent_pods: Vec<(&'static str, usize)>,
}

impl ServerMetrics {
    pub fn started(&self) {
        self.starts.fetch_add(1, Ordering::Relaxed);
    }
    pub fn cleaned(&self, n: usize) {
        self.cleans.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub fn reaped(&self, n: usize) {
        self.reaps.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn observe(&self, method: &'static str, code: &'static str, took: Duration) {
        let secs = took.as_secs_f64();
        let mut rpcs = self.rpcs.lock().unwrap_or_else(|e| e.into_inner());
        let h = rpcs.entry((method, code)).or_default();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.counts[i] += 1;
        }
        h.total += 1;
        h.sum += secs;
    }

    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let _ = writeln!(out, "# HELP preview_environments Live environments.\n# TYPE preview_environments gauge");
        let _ = writeln!(out, "preview_environments {}", g.environments);
        let _ = writeln!(out, "# HELP preview_pods Preview pods of live environments.\n# TYPE preview_pods gauge");
        let _ = writeln!(out, "preview_pods {}", g.pods);
        let _ = writeln!(
            out,
            "# HELP preview_agent_pods Running target pods by their agent's state (capped, failed and foreign \
             pods take no keyed traffic).\n# TYPE preview_agent_pods gauge"
        );
        // Every state, zero included, so an alert on capped > 0 has a series.
        for state in ["attaching", "routing", "failed", "capped", "foreign"] {
            let n = g.agent_pods.iter().find(|(s, _)| *s == state).map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "preview_agent_pods{{state=\"{state}\"}} {n}");
        }
        counter(&mut out, "preview_starts_total", "Successful Start calls.", self.starts.load(Ordering::Relaxed));
        counter(
            &mut out,
            "preview_cleans_total",
            "Environments removed by Clean.",
            self.cleans.load(Ordering::Relaxed),
        );
        counter(&mut out, "preview_reaps_total", "Environments removed at expiry.", self.reaps.load(Ordering::Relaxed));
        let name = "preview_rpc_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Time to the response headers, by method and gRPC status.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let rpcs = self.rpcs.lock().unwrap_or_else(|e| e.into_inner());
        for ((method, code), h) in rpcs.iter() {
            let labels = format!("method=\"{method}\",code=\"{code}\"");
            let mut cumulative = 0;
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                cumulative += c;
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.total);
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.total);
        }
        out
    }
}

/// The label for a request path: known methods by name, the rest as "other"
/// so that a scanner cannot grow the label set.
fn method_label(path: &str) -> &'static str {
    const KNOWN: [&str; 7] = ["Start", "AddPod", "Status", "Clean", "Routes", "Check", "Watch"];
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else { return "other" };
    if service.starts_with("grpc.reflection.") {
        return "reflection";
    }
    KNOWN.into_iter().find(|k| *k == method).unwrap_or("other")
}

/// grpc-status as a static label; errors in trailers (after a stream began)
/// are not seen here and count as OK.
fn code_label(headers: &http::HeaderMap) -> &'static str {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok());
    match code.map(tonic::Code::from_i32) {
        None | Some(tonic::Code::Ok) => "OK",
        Some(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Some(tonic::Code::NotFound) => "NOT_FOUND",
        Some(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Some(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Some(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Some(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Some(tonic::Code::Unavailable) => "UNAVAILABLE",
        Some(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Some(tonic::Code::Internal) => "INTERNAL",
        Some(_) => "OTHER",
    }
}

/// A tower layer around every gRPC service: latency per method and the
/// version header on every response.
#[derive(Clone)]
pub struct EdgeLayer(pub std::sync::Arc<ServerMetrics>);

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner, metrics: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    metrics: std::sync::Arc<ServerMetrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Edge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let start = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let mut resp = fut.await?;
            metrics.observe(method, code_label(resp.headers()), start.elapsed());
            resp.headers_mut().insert(VERSION_HEADER, http::HeaderValue::from_static(VERSION));
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_labels_are_bounded() {
        let m = ServerMetrics::default();
        m.observe(method_label("/preview.v1.PreviewService/Start"), "OK", Duration::from_millis(3));
        m.observe(method_label("/preview.v1.PreviewService/Start"), "OK", Duration::from_millis(300));
        m.observe(method_label("/x.Y/Nope"), "OK", Duration::from_secs(60));
        m.started();
        m.cleaned(2);
        let text = m.render(Gauges { environments: 4, pods: 7, agent_pods: vec![("capped", 2)] });
        assert!(text.contains("preview_environments 4\n"), "{text}");
        assert!(text.contains("preview_agent_pods{state=\"capped\"} 2\n"), "{text}");
        assert!(text.contains("preview_agent_pods{state=\"foreign\"} 0\n"), "{text}");
        assert!(text.contains("preview_pods 7\n"), "{text}");
        assert!(text.contains("preview_starts_total 1\n"), "{text}");
        assert!(text.contains("preview_cleans_total 2\n"), "{text}");
        let l = "method=\"Start\",code=\"OK\"";
        assert!(text.contains(&format!("_bucket{{{l},le=\"0.001\"}} 0\n")), "{text}");
        assert!(text.contains(&format!("_bucket{{{l},le=\"0.005\"}} 1\n")), "{text}");
        assert!(text.contains(&format!("_bucket{{{l},le=\"0.5\"}} 2\n")), "{text}");
        assert!(text.contains(&format!("_count{{{l}}} 2\n")), "{text}");
        // Over the last bucket: only in +Inf.
        let o = "method=\"other\",code=\"OK\"";
        assert!(text.contains(&format!("_bucket{{{o},le=\"10\"}} 0\n")), "{text}");
        assert!(text.contains(&format!("_bucket{{{o},le=\"+Inf\"}} 1\n")), "{text}");
        assert_eq!(method_label("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), "reflection");
        assert_eq!(method_label("/grpc.health.v1.Health/Check"), "Check");
    }
}
