//! Clean and expiry. Each environment is removed on its own: a tombstone
//! first (in the store and on the owner object), then the objects, then the
//! record, so a crash at any point never brings it back; one that fails is
//! shown FAILED and retried, and never holds up the others.

use super::view::glob_match;
use super::{CleanSelector, Error, Manager};
use crate::model::share::EndedLink;
use crate::model::{Cleaned, Key, now_ms};
use crate::previewd::auth::{Access, Caller};
use crate::proto;

impl Manager {
    pub async fn clean(&self, sel: CleanSelector) -> Result<Vec<Cleaned>, Error> {
        self.clean_as(&Caller::anonymous(), sel).await
    }

    /// Clean for `who`: `delete` on environments in each one's namespace. A
    /// key they may not delete is PERMISSION_DENIED; a glob or all_expired
    /// takes only the environments they may delete.
    pub async fn clean_as(&self, who: &Caller, sel: CleanSelector) -> Result<Vec<Cleaned>, Error> {
        let selected: Vec<(Key, String)> = {
            let view = self.view();
            let now = now_ms();
            let pick = |e: &crate::model::EnvStatus| (e.record.key.clone(), e.record.namespace.clone());
            match &sel {
                CleanSelector::Key(k) => {
                    vec![(k.clone(), view.envs.get(k).map(|e| e.record.namespace.clone()).unwrap_or_default())]
                }
                CleanSelector::Glob(g) => {
                    view.envs.values().filter(|e| glob_match(g, &e.record.key)).map(pick).collect()
                }
                CleanSelector::AllExpired => {
                    view.envs.values().filter(|e| e.record.expired_at(now)).map(pick).collect()
                }
            }
        };
        let mut keys = Vec::new();
        for (key, ns) in selected {
            // An unknown key has no namespace to ask about: Clean says NOT_FOUND as before.
            let allowed = ns.is_empty() || self.auth.allowed(who, &Access::env("delete", &ns)).await?;
            match (&sel, allowed) {
                (_, true) => keys.push(key),
                (CleanSelector::Key(_), false) => {
                    return Err(Error::PermissionDenied {
                        field: "key".into(),
                        message: format!("user {:?} may not {}", who.user, Access::env("delete", &ns)),
                    });
                }
                _ => {}
            }
        }
        let mut removed = Vec::new();
        let mut first_error = None;
        for key in keys {
            match self.remove(&key, proto::EventKind::Cleaned).await {
                Ok(Some(c)) => removed.push(c),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            // One key: its error. Several: what was removed, the rest retried.
            Some(e) if removed.is_empty() => Err(e),
            _ => Ok(removed),
        }
    }

    /// Tombstone, delete, forget; then tell watchers. `None` when there was
    /// nothing to remove. A failure marks the environment FAILED (under the
    /// key's lock), and the retry carries the removal on.
    pub(super) async fn remove(&self, key: &Key, why: proto::EventKind) -> Result<Option<Cleaned>, Error> {
        let _guard = self.lock_key(key).await;
        let result = self.remove_locked(key, why).await;
        if let Err(e) = &result {
            let what = if why == proto::EventKind::Expired { "expiry" } else { "clean" };
            tracing::warn!(key = %key, error = %e, "{what} failed; retrying");
            self.set_failure(key, Some(format!("{what} failed: {e}; retrying")));
        }
        result
    }

    /// `remove` with the key's lock already held (a failed Start's undo).
    pub(super) async fn remove_locked(&self, key: &Key, why: proto::EventKind) -> Result<Option<Cleaned>, Error> {
        let rec = self.view().envs.get(key).map(|e| e.record.clone());
        if why == proto::EventKind::Expired && !rec.as_ref().is_some_and(|r| r.expired_at(now_ms())) {
            return Ok(None); // extended by a Start while we waited for the lock
        }
        if let Some(mut rec) = rec.clone().filter(|r| !r.deleting && !r.namespace.is_empty()) {
            // In the view first: from here on a retry carries the removal on.
            if let Some(env) = self.view().envs.get_mut(key) {
                env.record.deleting = true;
            }
            rec.deleting = true;
            self.store.put(&rec).await?;
            // The owner's copy too, so --adopt with a lost store never brings
            // it back. Best effort: the store's tombstone is the one recovery
            // reads, and the namespace may be gone or terminating.
            if let Err(e) = self.cluster.put_owner(&rec).await {
                tracing::debug!(key = %key, error = %e, "tombstone not written to the owner");
            }
        }
        let objects = self.cluster.delete_env(key).await?;
        // Its split queues end once its pods are gone: their unread records
        // go back to staging, and the last one restores the target.
        if let Some(r) = &rec {
            self.end_queues(r).await?;
            // Its branches are dropped with it.
            self.end_dbs(r, &[]).await?;
        }
        // Its links end with it: their URLs answer "ended" from here on.
        let reason = if why == proto::EventKind::Expired { "expired" } else { "cleaned" };
        let ended = rec.iter().flat_map(|r| &r.shares).map(|l| EndedLink::of(l, reason, now_ms())).collect();
        let had_record = self.store.delete_ending(key, ended).await?;
        self.view().retries.remove(key);
        self.ready_counts.lock().unwrap_or_else(|e| e.into_inner()).remove(key.as_str());
        let had_view = self.publish_removed(key, why);
        if objects.is_empty() && !had_record && !had_view {
            return Ok(None);
        }
        tracing::info!(key = %key, ?why, objects = objects.len(), "environment removed");
        Ok(Some(Cleaned { key: key.clone(), objects }))
    }

    /// Removes every environment whose TTL has run out. One that fails is
    /// shown FAILED and tried again after its backoff; the others go on.
    pub async fn reap(&self) -> usize {
        self.reap_links().await;
        self.refresh_queue_stats().await;
        self.refresh_db_stats().await;
        let now = now_ms();
        let expired: Vec<Key> = {
            let view = self.view();
            view.envs
                .values()
                .filter(|e| e.record.expired_at(now))
                .filter(|e| view.retries.get(&e.record.key).is_none_or(|(at, _)| *at <= now))
                .map(|e| e.record.key.clone())
                .collect()
        };
        let mut n = 0;
        for key in expired {
            // A failure is marked by remove() and retried after its backoff.
            if let Ok(Some(_)) = self.remove(&key, proto::EventKind::Expired).await {
                n += 1;
            }
        }
        n
    }
}
