//! Counters for the admin port's `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Clone, Copy)]
struct PerKey {
    routed: u64,
    mirrored: u64,
    mirror_dropped: u64,
    mirror_failed: u64,
}

impl PerKey {
    /// Each counter with its `action` label.
    fn actions(&self) -> [(&'static str, u64); 4] {
        [
            ("routed", self.routed),
            ("mirrored", self.mirrored),
            ("mirror_dropped", self.mirror_dropped),
            ("mirror_failed", self.mirror_failed),
        ]
    }
}

/// Unmatched requests touch only an atomic; per-key counters take a lock.
#[derive(Default)]
pub struct Metrics {
    passthrough: AtomicU64,
    raw: AtomicU64,
    propagated: AtomicU64,
    keys: Mutex<BTreeMap<String, PerKey>>,
}

impl Metrics {
    pub fn passthrough(&self) {
        self.passthrough.fetch_add(1, Ordering::Relaxed);
    }
    /// Outbound requests that got the key added to their baggage.
    pub fn propagated(&self) {
        self.propagated.fetch_add(1, Ordering::Relaxed);
    }
    pub fn raw(&self) {
        self.raw.fetch_add(1, Ordering::Relaxed);
    }
    fn bump(&self, key: &str, f: impl FnOnce(&mut PerKey)) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(k) => f(k),
            None => f(keys.entry(key.to_string()).or_default()),
        }
    }
    pub fn routed(&self, key: &str) {
        self.bump(key, |k| k.routed += 1);
    }
    pub fn mirrored(&self, key: &str) {
        self.bump(key, |k| k.mirrored += 1);
    }
    pub fn mirror_dropped(&self, key: &str) {
        self.bump(key, |k| k.mirror_dropped += 1);
    }
    pub fn mirror_failed(&self, key: &str) {
        self.bump(key, |k| k.mirror_failed += 1);
    }

    /// Every counter, per key.
    pub fn render(&self) -> String {
        self.render_with(true)
    }

    /// Every counter; per key with `keys`, else summed over keys (what
    /// callers outside the pod see: counters, no keys).
    pub fn render_with(&self, keys: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE preview_agent_passthrough_total counter");
        let _ = writeln!(out, "preview_agent_passthrough_total {}", self.passthrough.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE preview_agent_raw_connections_total counter");
        let _ = writeln!(out, "preview_agent_raw_connections_total {}", self.raw.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE preview_agent_propagated_total counter");
        let _ = writeln!(out, "preview_agent_propagated_total {}", self.propagated.load(Ordering::Relaxed));
        let per_key = self.keys.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# TYPE preview_agent_requests_total counter");
        if !keys {
            let sum = per_key.values().fold(PerKey::default(), |a, k| PerKey {
                routed: a.routed + k.routed,
                mirrored: a.mirrored + k.mirrored,
                mirror_dropped: a.mirror_dropped + k.mirror_dropped,
                mirror_failed: a.mirror_failed + k.mirror_failed,
            });
            for (action, n) in sum.actions() {
                let _ = writeln!(out, "preview_agent_requests_total{{action=\"{action}\"}} {n}");
            }
            return out;
        }
        for (key, k) in &per_key {
            for (action, n) in k.actions() {
                let _ = writeln!(out, "preview_agent_requests_total{{key=\"{key}\",action=\"{action}\"}} {n}");
            }
        }
        out
    }
}
