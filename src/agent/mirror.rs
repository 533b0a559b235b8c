//! The mirror sender: sends queued copies to preview pods once staging's
//! requests in flight are done (at most `MIRROR_DEFER` later), with bounded
//! concurrency (a copy finding every slot busy is dropped and counted, so a
//! flood sheds copies instead of slowing staging); their answers are read
//! and dropped.

use std::sync::Arc;

use http::Version;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Semaphore, mpsc};

use super::h1::CopyPool;
use super::metrics::Metrics;
use super::state::{InFlight, MIRROR_CONCURRENCY, MIRROR_DEFER, MirrorCopy, MirrorJob, ProxyBody};

pub(super) async fn mirror_sender(
    h1: Client<HttpConnector, ProxyBody>,
    h2: Client<HttpConnector, ProxyBody>,
    metrics: Arc<Metrics>,
    inflight: Arc<InFlight>,
    mut rx: mpsc::Receiver<MirrorJob>,
) {
    let limit = Arc::new(Semaphore::new(MIRROR_CONCURRENCY));
    let pool = Arc::new(CopyPool::default());
    while let Some(first) = rx.recv().await {
        // Staging first; then everything queued goes, so copies never wait
        // longer than MIRROR_DEFER behind a busy target.
        inflight.idle_within(MIRROR_DEFER).await;
        let mut next = Some(first);
        while let Some(MirrorJob { key, copy, to, charge }) = next.take().or_else(|| rx.try_recv().ok()) {
            // All copies' slots busy: the preview, or this thread, is not
            // keeping up, and a copy waiting here would hold its bytes and
            // then compete with staging. Drop it and count it instead.
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                metrics.mirror_dropped(&key);
                drop(charge);
                continue;
            };
            let (h1, h2, metrics, pool) = (h1.clone(), h2.clone(), metrics.clone(), pool.clone());
            tokio::spawn(async move {
                let mut req = match copy {
                    MirrorCopy::Request(req) => *req,
                    MirrorCopy::Raw { bytes, head } => {
                        if pool.send(to, &bytes, head).await.is_err() {
                            metrics.mirror_failed(&key);
                        }
                        drop((permit, charge));
                        return;
                    }
                };
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                if let Ok(uri) = format!("http://{to}{pq}").parse() {
                    *req.uri_mut() = uri;
                    let sent =
                        if req.version() == Version::HTTP_2 { h2.request(req).await } else { h1.request(req).await };
                    match sent {
                        // The copy's answer is read and dropped.
                        Ok(resp) => drop(resp.into_body().collect().await),
                        Err(_) => metrics.mirror_failed(&key),
                    }
                }
                drop((permit, charge));
            });
        }
    }
}
