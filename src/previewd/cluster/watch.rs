//! The watch on this instance's preview pods.

use ::kube::api::Api;
use ::kube::runtime::{WatchStreamExt, watcher};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;

use super::Cluster;
use super::names::{LABEL_ROLE, ROLE_POD};

impl Cluster {
    /// Calls `seen(pod, deleted)` for every change to this instance's
    /// preview pods, for as long as previewd runs (the watcher re-lists and
    /// backs off on its own after errors).
    pub async fn watch_preview_pods(&self, mut seen: impl FnMut(&Pod, bool)) {
        let api: Api<Pod> = Api::all(self.client.clone());
        let cfg = watcher::Config::default().labels(&self.selector(&format!("{LABEL_ROLE}={ROLE_POD}")));
        let mut events = watcher(api, cfg).default_backoff().boxed();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => seen(&p, false),
                Ok(watcher::Event::Delete(p)) => seen(&p, true),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pod watch failed; retrying"),
            }
        }
    }
}
