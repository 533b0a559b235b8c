//! Clean and expiry: delete an environment's objects and record, then tell
//! watchers.

use super::view::glob_match;
use super::{CleanSelector, Error, Manager};
use crate::model::{Cleaned, Key, now_ms};
use crate::proto;

impl Manager {
    pub async fn clean(&self, sel: CleanSelector) -> Result<Vec<Cleaned>, Error> {
        let keys: Vec<Key> = {
            let view = self.view();
            let now = now_ms();
            match &sel {
                CleanSelector::Key(k) => vec![k.clone()],
                CleanSelector::Glob(g) => view.envs.keys().filter(|k| glob_match(g, k)).cloned().collect(),
                CleanSelector::AllExpired => {
                    view.envs.values().filter(|e| e.record.expired_at(now)).map(|e| e.record.key.clone()).collect()
                }
            }
        };
        let mut removed = Vec::new();
        for key in keys {
            if let Some(c) = self.remove(&key, proto::EventKind::Cleaned).await? {
                removed.push(c);
            }
        }
        Ok(removed)
    }

    /// Deletes an environment's objects and record, then tells watchers.
    /// `None` when there was nothing to remove.
    async fn remove(&self, key: &Key, why: proto::EventKind) -> Result<Option<Cleaned>, Error> {
        let _guard = self.lock_key(key).await;
        if why == proto::EventKind::Expired && !self.view().envs.get(key).is_some_and(|e| e.record.expired_at(now_ms()))
        {
            return Ok(None); // extended by a Start while we waited for the lock
        }
        let objects = self.cluster.delete_env(key).await?;
        let had_record = self.store.delete(key).await?;
        let had_view = self.publish_removed(key, why);
        if objects.is_empty() && !had_record && !had_view {
            return Ok(None);
        }
        tracing::info!(key = %key, ?why, objects = objects.len(), "environment removed");
        Ok(Some(Cleaned { key: key.clone(), objects }))
    }

    /// Removes every environment whose TTL has run out.
    pub async fn reap(&self) -> Result<usize, Error> {
        let now = now_ms();
        let expired: Vec<Key> =
            self.view().envs.values().filter(|e| e.record.expired_at(now)).map(|e| e.record.key.clone()).collect();
        let mut n = 0;
        for key in expired {
            if self.remove(&key, proto::EventKind::Expired).await?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}
