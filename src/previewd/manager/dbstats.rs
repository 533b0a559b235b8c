//! Database branches as they stand: each branch's size, snapshot time and
//! phase for Status (a branch whose server was lost shows Failed), read by
//! the reaper's tick, and `refresh`, which takes new snapshots.

use std::collections::BTreeMap;
use std::time::Duration;

use super::dbs::failed;
use super::{Error, Manager};
use crate::model::db::{DbBinding, DbType};
use crate::model::{DbPhase, DbStats, Key};
use crate::previewd::auth::{Access, Caller};
use crate::previewd::dbs::{self, DbAddr, DbError};

/// (namespace, server, engine) → (key, database, snapshot) of each branch on it.
type BranchesByServer = BTreeMap<(String, String, DbType), Vec<(Key, String, String)>>;

impl Manager {
    /// The superuser address of a server whose pod runs; `None` if it is gone.
    pub(super) async fn running_server(&self, ns: &str, server: &str, engine: DbType) -> Result<Option<DbAddr>, Error> {
        Ok(self.server_now(ns, server, engine).await?.ok().flatten())
    }

    /// A server as the cluster shows it: `Ok(Some)` its pod runs, `Ok(None)`
    /// not reachable yet, `Err(why)` its pod is gone or ended, and its data with it.
    async fn server_now(
        &self,
        ns: &str,
        server: &str,
        engine: DbType,
    ) -> Result<Result<Option<DbAddr>, String>, Error> {
        let st = match self.cluster.db_server(ns, server).await? {
            None => return Ok(Err("its pod is gone".into())),
            Some(st) => st,
        };
        if let Some(why) = st.ended {
            return Ok(Err(format!("its pod ended: {why}")));
        }
        let Some(ip) = st.pod_ip else { return Ok(Ok(None)) };
        let password = self.cluster.secret_data(ns, server).await?.and_then(|d| d.get("password").cloned());
        Ok(Ok(password.map(|password| dbs::server_admin(engine, ip, password))))
    }

    /// Refreshes each branch's size and snapshot time in the view (Status).
    /// Called by the reaper's tick; a server that does not answer keeps the
    /// last figures.
    pub(super) async fn refresh_db_stats(&self) {
        let servers: BranchesByServer = {
            let view = self.view();
            let mut m = BranchesByServer::new();
            for e in view.envs.values().filter(|e| !e.record.deleting) {
                for b in &e.record.dbs {
                    m.entry((e.record.namespace.clone(), b.server.clone(), b.db_type)).or_default().push((
                        e.record.key.clone(),
                        b.database.clone(),
                        b.snapshot.clone(),
                    ));
                }
            }
            m
        };
        for ((ns, server, engine), branches) in servers {
            tracing::debug!(server, "reading branch sizes");
            let (addr, lost) = match self.server_now(&ns, &server, engine).await {
                Ok(Ok(Some(a))) => (Some(a), None),
                Ok(Ok(None)) => continue,
                Ok(Err(why)) => (None, Some(why)),
                Err(e) => {
                    tracing::debug!(server, error = %e, "branch server not read");
                    continue;
                }
            };
            // Bounded: a server that hangs must not hold up the reaper's tick
            // (expiry runs on it too).
            let read = async { if let Some(a) = &addr { dbs::sizes(a).await } else { Ok(BTreeMap::new()) } };
            let sizes = match tokio::time::timeout(Duration::from_secs(5), read).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(server, error = %e, "branch sizes not read");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(server, "branch sizes not read within 5 s");
                    continue;
                }
            };
            tracing::debug!(server, databases = sizes.len(), branches = branches.len(), "branch sizes read");
            let mut view = self.view();
            for (key, database, snapshot) in branches {
                let Some(env) = view.envs.get_mut(&key) else { continue };
                // A settled environment's branch exists, or was lost (its
                // server's pod was deleted or evicted, say): after a restart
                // of previewd this is also where Ready comes back from.
                let settled = !env.record.pending;
                let st = env.dbs.entry(database.clone()).or_insert(DbStats { size_bytes: -1, ..Default::default() });
                st.size_bytes = sizes.get(&database).map_or(-1, |s| s.0);
                // A mode's first branch is Ready before its snapshot is made
                // from it, with the same time.
                let own = sizes.get(&database).and_then(|s| s.1);
                st.snapshot_at_ms = sizes.get(&snapshot).and_then(|s| s.1).or(own).or(st.snapshot_at_ms);
                match (settled, sizes.contains_key(&database)) {
                    (true, true) if st.phase == DbPhase::Creating => st.phase = DbPhase::Ready,
                    (true, false) => {
                        st.phase = DbPhase::Failed;
                        st.reason = match &lost {
                            Some(why) => format!("branch server {server} is lost ({why}); its data went with it"),
                            None => format!("database {database} is missing on branch server {server}"),
                        };
                    }
                    _ => {}
                }
            }
        }
    }

    /// Takes a new snapshot for each of an environment's branches, for
    /// `who` (`update` on previewenvironments in its namespace); branches
    /// made from then on start from it, existing ones keep their data.
    pub async fn refresh_db_as(&self, who: &Caller, key: &Key) -> Result<Vec<(DbBinding, DbStats)>, Error> {
        let rec = self.view().envs.get(key).map(|e| e.record.clone()).ok_or_else(|| Error::NotFound {
            field: "key".into(),
            message: format!("no environment {:?}", key.as_str()),
        })?;
        self.require(who, vec![Access::env("update", &rec.namespace)]).await?;
        if rec.dbs.is_empty() {
            return Err(failed("key", format!("environment {:?} has no database branch", key.as_str())));
        }
        let _guard = self.lock_key(key).await;
        for b in &rec.dbs {
            let server = self
                .running_server(&rec.namespace, &b.server, b.db_type)
                .await?
                .ok_or_else(|| DbError::Server { server: b.server.clone(), reason: "its pod is not running".into() })?;
            let src = self.branch_source(&rec, b).await?;
            let lock = self.db_lock(&b.server);
            let _held = lock.lock().await;
            let taken = dbs::take_snapshot(&server, &src, &b.snapshot, b.copy, &b.tables).await?;
            if let Some(st) = self.view().envs.get_mut(key).and_then(|e| e.dbs.get_mut(&b.database)) {
                st.snapshot_at_ms = Some(taken);
            }
        }
        let view = self.view();
        let stats = view.envs.get(key).map(|e| e.dbs.clone()).unwrap_or_default();
        Ok(rec.dbs.iter().map(|b| (b.clone(), stats.get(&b.database).cloned().unwrap_or_default())).collect())
    }
}
