//! Database branches, the manager's side: plan an environment's branches
//! (the target's connection variables, the caller's right to read them, a
//! source that answers), make them (the branch server, its snapshot, the
//! environment's clone and the Secret its pods read), and drop them (the
//! server goes with its last branch).
//!
//! The source's connection is read from the target each time it is needed
//! and never kept: not in the record, not in Status, not in logs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{Error, Manager};
use crate::model::db::{self, Connection, DbBinding, DbBranchAsk, DbType};
use crate::model::{DbPhase, DbStats, EnvRecord, Key, PodRecord, Target};
use crate::previewd::auth::{Access, Caller};
use crate::previewd::cluster::dbservers::{VarSource, set_env_from_secret, var_source};
use crate::previewd::dbs::{self, DbAddr, DbError, new_password};

pub(super) fn failed(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::FailedPrecondition { field: field.into(), message: message.into() }
}

/// A source as read from the target: its address, and what holds it.
struct Source {
    addr: DbAddr,
    container: String,
    /// `(part, variable, where its value is)`.
    vars: Vec<(String, String, VarSource)>,
}

impl Manager {
    /// The branches of one pod's `feature.db_branches`, with the pod's
    /// template pointed at them. Reads only (the target, the objects its
    /// variables name, the source): nothing is made until the record is written.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn plan_dbs(
        &self,
        who: &Caller,
        key: &Key,
        ns: &str,
        at: &str,
        asks: &[DbBranchAsk],
        pod: &mut PodRecord,
    ) -> Result<Vec<DbBinding>, Error> {
        let mut out = Vec::new();
        for (i, ask) in asks.iter().enumerate() {
            let base = if at.is_empty() {
                format!("feature.db_branches[{i}]")
            } else {
                format!("{at}.feature.db_branches[{i}]")
            };
            let src = self.db_source(&base, ns, &pod.target, ask.db_type, &ask.connection, ask.name.as_deref()).await?;
            // The caller could read what the variables name: the branch
            // gives them no data they could not take directly.
            let mut needs = Vec::new();
            for (_, _, s) in &src.vars {
                match s {
                    VarSource::Secret { name, .. } => needs.push(Access::of("get", "", "secrets", ns, name)),
                    VarSource::ConfigMap { name, .. } => needs.push(Access::of("get", "", "configmaps", ns, name)),
                    _ => {}
                }
            }
            self.require(who, needs).await?;
            dbs::check_source(&src.addr)
                .await
                .map_err(|e| Error::Db { field: Some(format!("{base}.connection")), source: e })?;
            let server = db::server_name(ns, ask.db_type, &src.addr.source());
            let database = db::branch_database(key, &format!("{}/{i}", pod.group));
            let secret = db::branch_secret(&server, &database);
            out.push(DbBinding {
                db_type: ask.db_type,
                group: pod.group.clone(),
                container: src.container.clone(),
                variables: src.vars.iter().map(|(p, v, _)| (p.clone(), v.clone())).collect(),
                name: ask.name.clone(),
                source: src.addr.source(),
                server,
                copy: ask.copy,
                tables: ask.tables.clone(),
                snapshot: db::snapshot_name(ask.copy, &ask.tables),
                database,
                secret,
                creation_timeout_secs: ask.creation_timeout_secs,
            });
        }
        // The preview pods read their branch from its Secret.
        for b in &out {
            for (part, var) in &b.variables {
                set_env_from_secret(&mut pod.template, var, &b.secret, part);
            }
        }
        if !out.is_empty() {
            let replicas = pod.pod_names.len().max(1) as u32;
            pod.pod_names = crate::previewd::cluster::pods::pod_names(&pod.group, key, &pod.template, replicas);
        }
        Ok(out)
    }

    /// The source a target's variables name, read now. Errors name the
    /// variable and container, never a value.
    async fn db_source(
        &self,
        base: &str,
        ns: &str,
        target: &Target,
        engine: DbType,
        conn: &Connection,
        name: Option<&str>,
    ) -> Result<Source, Error> {
        let field = format!("{base}.connection");
        let resolved = self.cluster.resolve(ns, target).await.map_err(|e| Error::cluster(&field, e))?;
        let Some(resolved) = resolved else {
            return Err(failed(field, "a branch needs a target: the source connection is read from its pod spec"));
        };
        let spec = resolved.template.spec.unwrap_or_default();
        let wanted = conn.variables();
        let explicit = match conn {
            Connection::Url { container, .. } => container.clone(),
            Connection::Params { .. } => None,
        };
        let container = match &explicit {
            Some(c) => spec.containers.iter().find(|x| &x.name == c),
            // The target's container first, then any that has the variables.
            None => spec
                .containers
                .iter()
                .find(|c| c.name == resolved.container)
                .filter(|c| wanted.iter().all(|(_, v)| c.env.iter().flatten().any(|e| e.name == *v)))
                .or_else(|| {
                    spec.containers
                        .iter()
                        .find(|c| wanted.iter().all(|(_, v)| c.env.iter().flatten().any(|e| e.name == *v)))
                }),
        };
        let cname = explicit.clone().unwrap_or_else(|| resolved.container.clone());
        let Some(container) = container else {
            let missing = wanted.first().map(|(_, v)| *v).unwrap_or_default();
            return Err(failed(field, format!("container {cname} of {target} has no env var {missing}")));
        };
        let mut parts = BTreeMap::new();
        let mut vars = Vec::new();
        for (part, var) in wanted {
            let Some(e) = container.env.iter().flatten().find(|e| e.name == var) else {
                return Err(failed(field, format!("container {} of {target} has no env var {var}", container.name)));
            };
            let src = var_source(e);
            let value = self.cluster.var_value(ns, &src).await.map_err(|e| Error::cluster(&field, e))?;
            let value = value.filter(|v| !v.is_empty()).ok_or_else(|| {
                let from = match &src {
                    VarSource::Secret { name, key } => format!("key {key} of secret {name}, which is missing"),
                    VarSource::ConfigMap { name, key } => format!("key {key} of configmap {name}, which is missing"),
                    VarSource::Literal(_) => "an empty value".into(),
                    VarSource::Other => "a field reference, not a connection".into(),
                };
                failed(&field, format!("env var {var} of container {} names {from}", container.name))
            })?;
            parts.insert(part.to_string(), value);
            vars.push((part.to_string(), var.to_string(), src));
        }
        let addr = dbs::from_parts(engine, &parts, name).map_err(|m| {
            let names: Vec<&str> = vars.iter().map(|(_, v, _)| v.as_str()).collect();
            failed(&field, format!("env var {} of container {}: {m}", names.join(", "), container.name))
        })?;
        Ok(Source { addr, container: container.name.clone(), vars })
    }

    pub(super) fn db_lock(&self, server: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.db_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.retain(|_, m| Arc::strong_count(m) > 1);
        locks.entry(server.to_string()).or_default().clone()
    }

    fn set_db_stats(&self, key: &Key, database: &str, phase: DbPhase, reason: String) {
        if let Some(e) = self.view().envs.get_mut(key) {
            let st = e.dbs.entry(database.to_string()).or_insert(DbStats { size_bytes: -1, ..Default::default() });
            st.phase = phase;
            st.reason = reason;
        }
    }

    /// Makes each recorded branch, each within its creation timeout: the
    /// server, the branch (a clone of the mode's snapshot, or the mode's
    /// first, copied from the source), and the Secret the preview pods read.
    /// Idempotent (recovery runs it again).
    pub(super) async fn realize_dbs(&self, rec: &EnvRecord, owner: &OwnerReference) -> Result<(), Error> {
        for b in &rec.dbs {
            self.set_db_stats(&rec.key, &b.database, DbPhase::Creating, String::new());
            let secs = b.creation_timeout_secs;
            let made = tokio::time::timeout(Duration::from_secs(secs), self.make_branch(rec, b, owner)).await;
            let result = match made {
                Ok(r) => r,
                Err(_) => Err(Error::from(DbError::Timeout { what: format!("branch {}", b.database), secs })),
            };
            match result {
                Ok(taken) => {
                    self.set_db_stats(&rec.key, &b.database, DbPhase::Ready, String::new());
                    if let Some(e) = self.view().envs.get_mut(&rec.key)
                        && let Some(st) = e.dbs.get_mut(&b.database)
                    {
                        st.snapshot_at_ms = Some(taken);
                    }
                }
                Err(e) => {
                    self.set_db_stats(&rec.key, &b.database, DbPhase::Failed, e.to_string());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The branch server's superuser address, once it answers.
    async fn server_addr(&self, ns: &str, server: &str, engine: DbType, deadline: Instant) -> Result<DbAddr, Error> {
        // A server that runs needs nothing made: its password is in its Secret.
        let mut st = self.cluster.db_server(ns, server).await?;
        let running = st.as_ref().is_some_and(|s| s.ended.is_none() && s.pod_ip.is_some());
        let known = if running {
            self.cluster.secret_data(ns, server).await?.and_then(|d| d.get("password").cloned())
        } else {
            None
        };
        let password = match known {
            Some(p) => p,
            None => {
                let p = self.cluster.ensure_db_server(ns, server, engine, new_password()).await?;
                st = self.cluster.db_server(ns, server).await?;
                p
            }
        };
        loop {
            if let Some(w) = st.as_ref().and_then(|s| s.waiting.clone()).filter(|w| !w.starts_with("ContainerCreating"))
            {
                return Err(
                    DbError::Server { server: server.into(), reason: format!("its pod cannot start: {w}") }.into()
                );
            }
            // Tried as soon as the pod has an address: the login is the test.
            if let Some(ip) = st.as_ref().and_then(|s| s.pod_ip.clone()) {
                let a = dbs::server_admin(engine, ip, password.clone());
                match dbs::prepare(&a).await {
                    Ok(()) => return Ok(a),
                    // Started, not yet accepting logins.
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!(server, error = %e, "branch server not answering yet")
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() >= deadline {
                return Err(DbError::Server { server: server.into(), reason: "its pod is not ready".into() }.into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            st = self.cluster.db_server(ns, server).await?;
        }
    }

    /// A recorded branch's source, read again from its target; refused if
    /// the target's connection changed since Start.
    pub(super) async fn branch_source(&self, rec: &EnvRecord, b: &DbBinding) -> Result<DbAddr, Error> {
        let field = "feature.db_branches";
        let target = rec.pods.iter().find(|p| p.group == b.group).map(|p| p.target.clone());
        let target = target.ok_or_else(|| failed(field, format!("no pod {}", b.group)))?;
        let src = self.db_source(field, &rec.namespace, &target, b.db_type, &b.connection(), b.name.as_deref()).await?;
        if src.addr.source() != b.source {
            let now = src.addr.source();
            return Err(failed(field, format!("the target's connection changed since Start (now {now})")));
        }
        Ok(src.addr)
    }

    /// One branch; returns when its data was read from the source.
    async fn make_branch(&self, rec: &EnvRecord, b: &DbBinding, owner: &OwnerReference) -> Result<i64, Error> {
        let ns = &rec.namespace;
        let began = Instant::now();
        let deadline = began + Duration::from_secs(b.creation_timeout_secs);
        // The source and the branch's Secret (a retry keeps its password)
        // are read meanwhile.
        let (server, src, secret) = tokio::join!(
            self.server_addr(ns, &b.server, b.db_type, deadline),
            self.branch_source(rec, b),
            self.cluster.secret_data(ns, &b.secret)
        );
        let server = server?;
        let password = secret?.and_then(|d| d.get("password").cloned()).unwrap_or_else(new_password);
        let t_server = began.elapsed();
        let make = async {
            // Held through the clone too (a refresh replacing the snapshot
            // meanwhile would break it), and by a snapshot made behind a branch.
            let held = self.db_lock(&b.server).lock_owned().await;
            let snapshot = dbs::snapshot_at(&server, &b.snapshot).await?;
            tracing::debug!(database = %b.database, ms = began.elapsed().as_millis() as u64, "snapshot looked for");
            if let Some(taken) = snapshot {
                dbs::make_branch(&server, &b.snapshot, &b.database, &password).await?;
                return Ok::<_, Error>((taken, "snapshot"));
            }
            let names = (b.snapshot.as_str(), b.database.as_str(), password.as_str());
            let (taken, rest) = dbs::first_branch(&server, &src?, names, b.copy, &b.tables).await?;
            if let Some(rest) = rest {
                let (server, snap) = (b.server.clone(), b.snapshot.clone());
                tokio::spawn(async move {
                    let _held = held;
                    let began = Instant::now();
                    match rest.await {
                        Ok(()) => {
                            tracing::info!(server, snap, ms = began.elapsed().as_millis() as u64, "snapshot made")
                        }
                        Err(e) => {
                            tracing::warn!(server, snap, error = %e, "no snapshot; the next branch copies the source")
                        }
                    }
                });
            }
            Ok((taken, "source"))
        };
        // Written meanwhile: no pod reads it before this Start (or AddPod)
        // ends, and its role cannot log in until the branch is whole.
        let (made, published) = tokio::join!(make, self.publish_branch(rec, b, owner, &password, deadline));
        let (taken, from) = made?;
        published?;
        tracing::info!(
            database = %b.database,
            from,
            server_ms = t_server.as_millis() as u64,
            ms = began.elapsed().as_millis() as u64,
            "branch ready"
        );
        Ok(taken)
    }

    /// The Secret a branch's pods read, once its server's Service can reach it.
    async fn publish_branch(
        &self,
        rec: &EnvRecord,
        b: &DbBinding,
        owner: &OwnerReference,
        password: &str,
        deadline: Instant,
    ) -> Result<(), Error> {
        let ns = &rec.namespace;
        // The preview pods reach it through its Service, whose endpoints
        // wait for the pod's Ready condition.
        loop {
            if self.cluster.db_server(ns, &b.server).await?.is_some_and(|s| s.ready) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DbError::Server { server: b.server.clone(), reason: "its pod is not ready".into() }.into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let host = self.cluster.db_service_ip(ns, &b.server).await?.ok_or_else(|| DbError::Server {
            server: b.server.clone(),
            reason: "its Service has no cluster IP".into(),
        })?;
        let branch = DbAddr {
            engine: b.db_type,
            host,
            port: dbs::server_port(b.db_type),
            user: b.database.clone(),
            password: password.to_string(),
            dbname: b.database.clone(),
        };
        let data = BTreeMap::from([
            ("url".to_string(), branch.url()),
            ("host".to_string(), branch.host.clone()),
            ("port".to_string(), branch.port.to_string()),
            ("user".to_string(), branch.user.clone()),
            ("password".to_string(), branch.password.clone()),
            ("database".to_string(), branch.dbname.clone()),
        ]);
        self.cluster.put_branch_secret(ns, &b.secret, &rec.key, owner, data).await?;
        Ok(())
    }

    /// Drops an environment's branches once its pods are deleted, except
    /// those in `keep` (a failed AddPod keeps the ones it had); the last
    /// branch on a server deletes the server. Idempotent: a retry (or
    /// recovery) carries on where a failed attempt stopped.
    pub(super) async fn end_dbs(&self, rec: &EnvRecord, keep: &[DbBinding]) -> Result<(), Error> {
        let ns = &rec.namespace;
        for b in rec.dbs.iter().filter(|b| !keep.iter().any(|k| k.database == b.database)) {
            let lock = self.db_lock(&b.server);
            let _held = lock.lock().await;
            let others = self.view().envs.values().any(|e| {
                e.record.key != rec.key
                    && !e.record.deleting
                    && e.record.namespace == *ns
                    && e.record.dbs.iter().any(|o| o.server == b.server)
            });
            let last = !others && !keep.iter().any(|k| k.server == b.server);
            if last {
                // Its data goes with its pod.
                self.cluster.delete_db_server(ns, &b.server).await?;
            } else if let Some(server) = self.running_server(ns, &b.server, b.db_type).await? {
                // Under the lock no copy runs: a half-made snapshot is a
                // leftover, and may hold the branch's role.
                dbs::drop_partial(&server, &b.snapshot).await?;
                dbs::drop_branch(&server, &b.database).await?;
            }
            self.cluster.delete_secret(ns, &b.secret).await?;
        }
        Ok(())
    }

    /// Whether a live environment has a branch on server `name` in `ns`.
    pub(super) fn db_server_in_use(&self, ns: &str, name: &str) -> bool {
        self.view().envs.values().any(|e| e.record.namespace == ns && e.record.dbs.iter().any(|b| b.server == name))
    }
}
