//! What an async splitter's session sees of its splitter (`task`): the
//! routes in force, a way to say which version is applied, and a stop.

use std::sync::Arc;

use tokio::sync::watch;

use super::splitter::Route;

/// A version of the routes.
#[derive(Default)]
pub struct Routes {
    pub version: u64,
    pub list: Vec<Route>,
}

/// A session's side of the channels.
pub struct Control {
    routes: watch::Receiver<Arc<Routes>>,
    applied: watch::Sender<u64>,
    stop: watch::Receiver<bool>,
}

impl Control {
    pub fn new(
        routes: watch::Receiver<Arc<Routes>>,
        applied: watch::Sender<u64>,
        stop: watch::Receiver<bool>,
    ) -> Control {
        Control { routes, applied, stop }
    }

    /// Resolves when a stop is asked for (or the splitter is dropped).
    pub async fn stop_asked(&mut self) {
        let _ = self.stop.changed().await;
    }

    /// The latest routes (marked seen).
    pub fn routes(&mut self) -> Arc<Routes> {
        self.routes.borrow_and_update().clone()
    }

    /// Every message from now on is routed by `version`.
    pub fn applied(&self, version: u64) {
        self.applied.send_if_modified(|v| {
            let newer = *v < version;
            if newer {
                *v = version;
            }
            newer
        });
    }

    /// Stopped, or its splitter dropped.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow() || self.routes.has_changed().is_err()
    }

    /// Resolves when the routes change or a stop is asked for.
    pub async fn changed(&mut self) {
        tokio::select! {
            r = self.routes.changed() => if r.is_err() { std::future::pending::<()>().await },
            r = self.stop.changed() => if r.is_err() { std::future::pending::<()>().await },
        }
    }
}
