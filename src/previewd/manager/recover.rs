//! Recovery at start: load the store and bring the cluster in line with it.

use std::collections::HashSet;

use super::{Error, Manager};
use crate::model::{EnvStatus, now_ms};

/// What recovery found and did.
#[derive(Debug, Default)]
pub struct RecoverReport {
    pub live: usize,
    pub recreated: usize,
    pub adopted: Vec<String>,
    pub expired: Vec<String>,
    pub deleted: Vec<String>,
}

impl Manager {
    /// Loads the store and brings the cluster in line with it: finishes
    /// pending environments, recreates missing pods, removes expired ones and
    /// deletes labelled objects whose key is unknown. With `adopt`, records
    /// kept in the cluster are taken into the store first.
    pub async fn recover(&self, adopt: bool) -> Result<RecoverReport, Error> {
        let mut report = RecoverReport::default();
        let mut records = self.store.load_all().await?;
        if adopt {
            for rec in self.cluster.adoptable().await? {
                if !records.iter().any(|r| r.key == rec.key) {
                    self.store.put(&rec).await?;
                    report.adopted.push(rec.key.to_string());
                    records.push(rec);
                }
            }
        }
        // One list of everything we manage, instead of one per environment.
        let objects = self.cluster.managed(&self.cluster.selector("")).await?;
        let now = now_ms();
        let mut live = Vec::new();
        for mut rec in records {
            if rec.expired_at(now) {
                for obj in objects.iter().filter(|o| o.key == *rec.key) {
                    self.cluster.delete_object(obj).await?;
                }
                self.store.delete(&rec.key).await?;
                report.expired.push(rec.key.to_string());
                continue;
            }
            let existing: Vec<&String> = objects
                .iter()
                .filter(|o| o.kind == "pod" && o.key == *rec.key && o.namespace == rec.namespace)
                .map(|o| &o.name)
                .collect();
            let missing = rec.pod_names().filter(|n| !existing.contains(n)).count();
            if missing > 0 || rec.pending {
                self.realize(&rec).await?;
                report.recreated += missing;
            }
            // Pods of this key that the record does not name are leftovers.
            for name in existing.into_iter().filter(|n| !rec.pod_names().any(|p| p == *n)) {
                self.cluster.delete_pod(&rec.namespace, name).await?;
                report.deleted.push(format!("pod/{}/{name}", rec.namespace));
            }
            if rec.pending {
                // The owner ConfigMap may keep the pending copy (see `apply`).
                rec.pending = false;
                self.store.put(&rec).await?;
            }
            live.push(rec);
        }
        let known: HashSet<&str> = live.iter().map(|r| r.key.as_str()).collect();
        for obj in objects.iter().filter(|o| !known.contains(o.key.as_str()) && !report.expired.contains(&o.key)) {
            if self.cluster.delete_object(obj).await? {
                report.deleted.push(obj.to_string());
            }
        }
        let mut view = self.view();
        for record in live {
            let pods = view.take_orphans(&record);
            view.envs.insert(record.key.clone(), EnvStatus { record, pods });
        }
        report.live = view.envs.len();
        Ok(report)
    }
}
