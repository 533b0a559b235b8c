//! Recovery: bring the cluster in line with the store, one environment at a
//! time. A broken environment (its namespace deleted, a pod refused by a
//! quota or a webhook, an unreadable record, the API server away) is marked
//! FAILED with its reason and retried with backoff; it never stops previewd
//! or the other environments.

use std::collections::HashSet;

use super::{Error, Manager};
use crate::model::share::EndedLink;
use crate::model::{EnvRecord, EnvStatus, Key, Mode, now_ms};
use crate::previewd::cluster::names::LABEL_KEY;
use crate::previewd::cluster::objects::ManagedObject;
use crate::previewd::store::StoreError;
use crate::proto::EventKind;

/// What recovery found and did.
#[derive(Debug, Default)]
pub struct RecoverReport {
    pub live: usize,
    pub recreated: usize,
    pub adopted: Vec<String>,
    pub expired: Vec<String>,
    pub deleted: Vec<String>,
    /// Environments left FAILED (retried with backoff), with the reason.
    pub failed: Vec<(String, String)>,
}

/// What recovering one environment did.
enum Outcome {
    Live {
        recreated: usize,
        deleted: Vec<String>,
    },
    /// Expired, or its Clean had begun (tombstone): now gone.
    Removed {
        expired: bool,
    },
}

/// The first wait before a failed environment is retried, and the longest.
const RETRY_FIRST_MS: i64 = 1_000;
const RETRY_MAX_MS: i64 = 60_000;

impl Manager {
    /// Loads the store and brings the cluster in line with it: finishes
    /// pending environments and interrupted cleans, recreates missing pods,
    /// removes expired ones and deletes labelled objects whose key is
    /// unknown. With `adopt`, records kept in the cluster are taken into the
    /// store first. Never fails as a whole: what cannot be done now shows as
    /// FAILED in Status and is retried (see [`Manager::retry_failed`]).
    pub async fn recover(&self, adopt: bool) -> RecoverReport {
        let mut report = RecoverReport::default();
        let mut records = Vec::new();
        // Keys whose objects are not strays, whatever happens below; and
        // whether strays may be swept at all (only with the store, and the
        // adoptable records, fully read).
        let mut known: HashSet<String> = HashSet::new();
        let mut sweep = true;
        match self.store.load_all().await {
            Ok(rows) => {
                for row in rows {
                    match row {
                        Ok(rec) => records.push(rec),
                        Err(e) => {
                            if let StoreError::Corrupt { key, .. } = &e {
                                known.insert(key.clone());
                            }
                            self.show_unreadable(e, &mut report);
                        }
                    }
                }
            }
            Err(e) => {
                sweep = false;
                tracing::error!(error = %e, "reading the store failed; serving no environments, deleting nothing");
            }
        }
        if adopt {
            match self.cluster.adoptable().await {
                Ok(found) => {
                    let stored: HashSet<Key> = records.iter().map(|r| r.key.clone()).collect();
                    for rec in found.into_iter().filter(|r| !stored.contains(&r.key)) {
                        match self.store.put(&rec).await {
                            Ok(()) => {
                                report.adopted.push(rec.key.to_string());
                                records.push(rec);
                            }
                            Err(e) => {
                                known.insert(rec.key.to_string());
                                tracing::warn!(key = %rec.key, error = %e, "not adopted; its objects are kept");
                            }
                        }
                    }
                }
                Err(e) => {
                    sweep = false;
                    tracing::warn!(error = %e, "listing adoptable records failed; adopting and deleting nothing");
                }
            }
        }
        // One list of everything we manage, instead of one per environment.
        let objects = self.cluster.managed(&self.cluster.selector("")).await;
        if let Err(e) = &objects {
            tracing::warn!(error = %e, "the API server is not answering; serving the store and retrying");
        }
        known.extend(records.iter().map(|r| r.key.to_string()));
        // Live ones first: ending a split queue asks whether others remain on it.
        let now = now_ms();
        records.sort_by_key(|r| r.deleting || r.expired_at(now));
        for rec in records {
            let result = match &objects {
                Ok(all) => {
                    let mine: Vec<ManagedObject> = all.iter().filter(|o| o.key == *rec.key).cloned().collect();
                    self.recover_one(&rec, &mine).await.map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(Outcome::Live { recreated, deleted }) => {
                    report.recreated += recreated;
                    report.deleted.extend(deleted);
                    // An adopted record may replace an unreadable one's placeholder.
                    self.set_failure(&rec.key, None);
                }
                Ok(Outcome::Removed { expired }) => {
                    self.publish_removed(&rec.key, if expired { EventKind::Expired } else { EventKind::Cleaned });
                    known.remove(rec.key.as_str());
                    if expired {
                        report.expired.push(rec.key.to_string());
                    }
                }
                Err(e) => {
                    let why = format!("recovery failed: {e}; retrying");
                    report.failed.push((rec.key.to_string(), why.clone()));
                    self.view().upsert(&rec);
                    self.set_failure(&rec.key, Some(why));
                }
            }
        }
        if let (Ok(all), true) = (&objects, sweep) {
            for obj in all.iter().filter(|o| !known.contains(&o.key)) {
                // No key: a branch server, which serves every environment on
                // its source and goes with its last branch. A stray only if no
                // live record names it.
                if obj.key.is_empty() {
                    if obj.kind == "pod" && !self.db_server_in_use(&obj.namespace, &obj.name) {
                        match self.cluster.delete_db_server(&obj.namespace, &obj.name).await {
                            Ok(()) => report.deleted.push(obj.to_string()),
                            Err(e) => {
                                tracing::warn!(object = %obj, error = %e, "deleting a stray branch server failed")
                            }
                        }
                    }
                    continue;
                }
                match self.cluster.delete_object(obj).await {
                    Ok(true) => report.deleted.push(obj.to_string()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(object = %obj, error = %e, "deleting a stray object failed"),
                }
            }
        }
        // Every split the live records have runs again, from its committed offsets.
        self.resume_splits().await;
        report.live = self.len();
        report
    }

    /// Tries every failed environment whose wait is over again: a clean or
    /// expiry that failed is carried on; anything else is recovered.
    pub async fn retry_failed(&self) {
        let now = now_ms();
        let due: Vec<Key> =
            self.view().retries.iter().filter(|(_, (at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            let rec = self.view().envs.get(&key).map(|e| e.record.clone());
            let Some(rec) = rec else {
                self.view().retries.remove(&key);
                continue;
            };
            if rec.deleting {
                let why = if rec.expired_at(now) { EventKind::Expired } else { EventKind::Cleaned };
                // remove() takes the key's lock, and marks a new failure itself.
                let _ = self.remove(&key, why).await;
                continue;
            }
            let _guard = self.lock_key(&key).await;
            // A Start may have set it right while we waited for the lock.
            let rec = {
                let view = self.view();
                match view.envs.get(&key) {
                    Some(e) if view.retries.contains_key(&key) => e.record.clone(),
                    _ => continue,
                }
            };
            let selector = self.cluster.selector(&format!("{LABEL_KEY}={key}"));
            let result = match self.cluster.managed(&selector).await {
                Ok(mine) => self.recover_one(&rec, &mine).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(Outcome::Live { .. }) => {
                    tracing::info!(key = %key, "recovered after a failure");
                    self.set_failure(&key, None);
                    if !rec.queues.is_empty() {
                        self.resume_splits().await;
                    }
                }
                Ok(Outcome::Removed { expired }) => {
                    self.view().retries.remove(&key);
                    self.publish_removed(&key, if expired { EventKind::Expired } else { EventKind::Cleaned });
                }
                Err(e) => self.set_failure(&key, Some(format!("recovery failed: {e}; retrying"))),
            }
        }
    }

    /// One environment: finish its clean or expiry, or bring its objects
    /// in line with its record, then put it in the view.
    async fn recover_one(&self, rec: &EnvRecord, objects: &[ManagedObject]) -> Result<Outcome, Error> {
        if rec.deleting || rec.expired_at(now_ms()) {
            for obj in objects {
                self.cluster.delete_object(obj).await?;
            }
            // Its links end with it, as in a Clean or expiry that ran whole.
            // Its split queues end as in a Clean (unread records to staging).
            self.end_queues(rec).await?;
            self.end_dbs(rec, &[]).await?;
            let reason = if rec.deleting { "cleaned" } else { "expired" };
            let ended = rec.shares.iter().map(|l| EndedLink::of(l, reason, now_ms())).collect();
            self.store.delete_ending(&rec.key, ended).await?;
            // The caller tells watchers (and agents) that it is gone.
            return Ok(Outcome::Removed { expired: !rec.deleting });
        }
        let existing: Vec<&String> =
            objects.iter().filter(|o| o.kind == "pod" && o.namespace == rec.namespace).map(|o| &o.name).collect();
        let missing = rec.pod_names().filter(|n| !existing.contains(n)).count();
        if rec.pending {
            self.realize_queues(rec, false).await?;
        }
        if missing > 0 || rec.pending {
            self.realize(rec).await?;
        }
        // Pods of this key that the record does not name are leftovers.
        let mut deleted = Vec::new();
        for name in existing.into_iter().filter(|n| !rec.pod_names().any(|p| p == *n)) {
            self.cluster.delete_pod(&rec.namespace, name).await?;
            deleted.push(format!("pod/{}/{name}", rec.namespace));
        }
        let mut rec = rec.clone();
        if rec.pending {
            // The owner ConfigMap may keep the pending copy (see `apply`).
            rec.pending = false;
            self.store.put(&rec).await?;
        }
        let mut view = self.view();
        let pods = view.take_orphans(&rec);
        let entry = view.envs.entry(rec.key.clone()).or_insert_with(|| EnvStatus::new(rec.clone()));
        entry.record = rec;
        entry.pods.extend(pods);
        Ok(Outcome::Live { recreated: missing, deleted })
    }

    /// A record that does not parse: shown FAILED under its key (when the
    /// key itself is valid) so that someone cleans it; nothing else is done.
    fn show_unreadable(&self, e: StoreError, report: &mut RecoverReport) {
        let StoreError::Corrupt { key, .. } = &e else { return };
        let why = format!("{e}; clean it with `preview clean --key {key}`");
        tracing::error!(%key, error = %e, "unreadable store record");
        report.failed.push((key.clone(), why.clone()));
        let Ok(key) = Key::parse("key", key) else { return };
        let placeholder = EnvRecord {
            key: key.clone(),
            namespace: String::new(),
            created_at_ms: 0,
            expires_at_ms: None,
            mode: Mode::Steal,
            pending: false,
            deleting: false,
            pods: Vec::new(),
            creator: String::new(),
            shares: Vec::new(),
            queues: Vec::new(),
            dbs: Vec::new(),
        };
        let mut env = EnvStatus::new(placeholder);
        env.failure = Some(why);
        self.view().envs.insert(key, env);
    }

    /// Sets or clears an environment's failure, schedules (or stops) its
    /// retries, and tells watchers when it changed.
    pub(super) fn set_failure(&self, key: &Key, failure: Option<String>) {
        let mut view = self.view();
        match &failure {
            Some(_) => {
                let now = now_ms();
                let wait = view.retries.get(key).map_or(RETRY_FIRST_MS, |(_, w)| (*w * 2).min(RETRY_MAX_MS));
                view.retries.insert(key.clone(), (now + wait, wait));
            }
            None => {
                view.retries.remove(key);
            }
        }
        let Some(env) = view.envs.get_mut(key) else { return };
        if env.failure == failure {
            return;
        }
        env.failure = failure;
        let env = crate::wire::environment(env);
        view.publish(&self.events, EventKind::FailureChanged, vec![env], None);
    }
}
