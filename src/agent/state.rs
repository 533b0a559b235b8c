//! The proxy's shared state: routes, metrics, the upstream clients, the
//! mirror queue and the count of staging requests in flight. Both HTTP/1
//! paths (`h1`, the byte relay; `proxy`, hyper) and the mirror sender use it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Notify, mpsc};

use super::metrics::Metrics;
use super::routes::SharedRoutes;
use crate::model::Key;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Mirror only bodies with a known length up to this size.
pub const MIRROR_MAX_BODY: u64 = 1 << 20;
/// Headers a mirror copy never carries: a preview gets no one's credentials.
pub const CREDENTIAL_HEADERS: [http::HeaderName; 3] =
    [http::header::AUTHORIZATION, http::header::PROXY_AUTHORIZATION, http::header::COOKIE];
/// Copies waiting to be sent; more are dropped and counted.
pub const MIRROR_QUEUE: usize = 1024;
/// Bytes of copies queued or in flight, by default; more are dropped and
/// counted. This is memory the agent holds, so it is what keeps the agent
/// within 32 MiB under a mirror flood (chaos case 6); `--mirror-max-bytes`
/// raises it where the pod has the memory.
pub const MIRROR_MAX_BYTES: usize = 16 << 20;
/// Copies in flight at once; one finding none free is dropped. More would
/// not send faster (copies compete for the same CPU as staging), only hold
/// more bytes and slow staging down under a flood.
pub(super) const MIRROR_CONCURRENCY: usize = 16;
/// How long queued copies wait for staging requests to finish first.
pub const MIRROR_DEFER: Duration = Duration::from_millis(2);

/// Staging requests in flight. Copies wait (at most [`MIRROR_DEFER`]) until
/// none is, so neither a copy nor the preview's work on it competes for the
/// CPU with an original: staging comes first.
#[derive(Default)]
pub(super) struct InFlight {
    n: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    /// Counts one request until the guard is dropped.
    pub(super) fn enter(&self) -> Busy<'_> {
        self.n.fetch_add(1, Ordering::AcqRel);
        Busy(self)
    }

    /// Returns once nothing is in flight, or after `limit`.
    pub(super) async fn idle_within(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Registered before the check, so a drop to zero in between is not missed.
            notified.as_mut().enable();
            if self.n.load(Ordering::Acquire) == 0 || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

pub(super) struct Busy<'a>(&'a InFlight);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pub(super) struct MirrorJob {
    pub key: String,
    pub copy: MirrorCopy,
    pub to: SocketAddr,
    /// This copy's share of the byte budget, given back when it is dropped
    /// (sent, failed or never queued).
    pub charge: Charge,
}

/// Bytes held against the mirror budget until dropped.
pub(super) struct Charge {
    held: Arc<AtomicUsize>,
    bytes: usize,
}

impl Charge {
    /// `bytes` more held, if that stays within `budget`.
    fn admit(held: &Arc<AtomicUsize>, bytes: usize, budget: usize) -> Option<Charge> {
        let before = held.fetch_add(bytes, Ordering::AcqRel);
        let charge = Charge { held: held.clone(), bytes };
        // Over budget: the charge drops here and gives the bytes back.
        (before.saturating_add(bytes) <= budget).then_some(charge)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl MirrorCopy {
    /// What the copy holds in memory, about: its bytes, or its body and headers.
    fn size(&self) -> usize {
        match self {
            MirrorCopy::Raw { bytes, .. } => bytes.len(),
            MirrorCopy::Request(r) => {
                let body = hyper::body::Body::size_hint(r.body()).exact().unwrap_or(0) as usize;
                body + r.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>()
            }
        }
    }
}

pub(super) enum MirrorCopy {
    /// From a connection hyper serves.
    Request(Box<Request<ProxyBody>>),
    /// From the fast path: the original's bytes, and whether it was a HEAD.
    Raw { bytes: Bytes, head: bool },
}

pub struct Proxy {
    pub routes: Arc<SharedRoutes>,
    pub metrics: Arc<Metrics>,
    pub(super) h1: Client<HttpConnector, ProxyBody>,
    pub(super) h2: Client<HttpConnector, ProxyBody>,
    pub(super) mirror: mpsc::Sender<MirrorJob>,
    pub(super) inflight: Arc<InFlight>,
    /// Outbound mode (preview pods): every request goes to where it was
    /// sent, carrying this key in `baggage`; there are no routes.
    pub(super) propagate: Option<Key>,
    /// Bytes of mirror copies queued or in flight, and the most there may be.
    pub(super) mirror_bytes: Arc<AtomicUsize>,
    pub(super) mirror_budget: usize,
}

impl Proxy {
    /// Queues a mirror copy for `to`. A full queue, or a copy that would
    /// take the bytes held past the budget, drops it. Either way it is counted.
    pub(super) fn queue_copy(&self, key: &str, copy: MirrorCopy, to: SocketAddr) {
        let Some(charge) = Charge::admit(&self.mirror_bytes, copy.size(), self.mirror_budget) else {
            self.metrics.mirror_dropped(key);
            return;
        };
        match self.mirror.try_send(MirrorJob { key: key.to_string(), copy, to, charge }) {
            Ok(()) => self.metrics.mirrored(key),
            Err(_) => self.metrics.mirror_dropped(key),
        }
    }
}

pub(super) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub(super) fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Methods that are safe to send twice (RFC 9110 §9.2.2).
pub(super) fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "DELETE" | "PUT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_budget_counts_bytes_until_copies_are_done() {
        let held = Arc::new(AtomicUsize::new(0));
        let a = Charge::admit(&held, 60, 100).expect("fits");
        assert!(Charge::admit(&held, 41, 100).is_none(), "would exceed the budget");
        assert_eq!(held.load(Ordering::Acquire), 60, "a refused copy holds nothing");
        let b = Charge::admit(&held, 40, 100).expect("fits exactly");
        drop(a);
        assert_eq!(held.load(Ordering::Acquire), 40);
        drop(b);
        assert_eq!(held.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn copies_wait_for_staging_but_not_for_long() {
        let f = InFlight::default();
        let t = tokio::time::Instant::now();
        f.idle_within(Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1), "idle: no wait");
        let busy = f.enter();
        let t = tokio::time::Instant::now();
        f.idle_within(Duration::from_millis(50)).await;
        assert!(t.elapsed() >= Duration::from_millis(50), "busy: waits the limit");
        let (done, wait) = tokio::join!(
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(busy);
                tokio::time::Instant::now()
            },
            async {
                f.idle_within(Duration::from_secs(5)).await;
                tokio::time::Instant::now()
            }
        );
        assert!(wait >= done && wait - done < Duration::from_secs(1), "returns when the last request ends");
    }
}
