//! Start and AddPod: parse each pod's config, settle the key and TTL, plan
//! every preview pod against its target, check conflicts, write the intent,
//! then create the objects. A failure rolls back what this request added.

use k8s_openapi::api::core::v1::Pod;

use super::error::invalid;
use super::view::on_target;
use super::{Error, Facts, Manager};
use crate::config::{self, PodConfig};
use crate::filter::FilterSpec;
use crate::model::{
    EnvRecord, FieldError, Key, Mode, PodRecord, PodRequest, StartRequest, Started, Target, Ttl, now_ms,
    validate_dns_label,
};
use crate::previewd::auth::{Access, AuthMode, Caller};
use crate::previewd::cluster::KubeError;
use crate::previewd::cluster::agents;
use crate::previewd::cluster::pods::{self, PodPlan};
use crate::previewd::store::StoreError;
use crate::proto;

impl Manager {
    /// Start as the anonymous caller (tools and tests with `--auth none`).
    pub async fn start(&self, req: StartRequest) -> Result<Started, Error> {
        self.start_as(&Caller::anonymous(), req, &mut Facts::default()).await
    }

    /// Start for `who`, with what it is about written into `facts` as it is read.
    pub async fn start_as(&self, who: &Caller, req: StartRequest, facts: &mut Facts) -> Result<Started, Error> {
        let config::ReadStart { key, configs, ttl } = config::read_start(&req)?;
        let ttl = ttl.map(|t| self.check_ttl(t)).transpose()?;

        let share = configs.iter().find_map(|c| c.share.clone());
        let _guard = self.lock_key(&key).await;
        let existing = self.view().envs.get(&key).map(|e| e.record.clone());
        let started = self.apply(who, facts, key, existing, &req.pods, configs, ttl).await?;
        Ok(Started { share, ..started })
    }

    pub async fn add_pod(&self, key: &str, pod: Option<PodRequest>) -> Result<Started, Error> {
        self.add_pod_as(&Caller::anonymous(), key, pod, &mut Facts::default()).await
    }

    pub async fn add_pod_as(
        &self,
        who: &Caller,
        key: &str,
        pod: Option<PodRequest>,
        facts: &mut Facts,
    ) -> Result<Started, Error> {
        let key = Key::parse("key", key)?;
        let pod = pod.ok_or_else(|| invalid("pod", "required"))?;
        let doc = config::parse_document(&pod.config)?;
        let cfg = config::interpret(doc, &key)?;
        let share = cfg.share.clone();
        let _guard = self.lock_key(&key).await;
        let existing = self.view().envs.get(&key).map(|e| e.record.clone());
        let Some(existing) = existing else {
            return Err(Error::NotFound { field: "key".into(), message: format!("no environment {:?}", key.as_str()) });
        };
        let started = self.apply(who, facts, key, Some(existing), &[pod], vec![cfg], None).await?;
        Ok(Started { share, ..started })
    }

    fn check_ttl(&self, ttl: Ttl) -> Result<Ttl, Error> {
        let max = Ttl::Finite(self.settings.max_ttl);
        match ttl {
            Ttl::Infinite if !self.settings.allow_infinite => {
                Err(invalid("ttl", format!("\"infinite\" is not allowed by this server; the maximum is {max}")))
            }
            Ttl::Finite(d) if d > self.settings.max_ttl => {
                Err(invalid("ttl", format!("{ttl} exceeds the server's maximum of {max}")))
            }
            t => Ok(t),
        }
    }

    /// Plans every pod, checks conflicts, writes the intent, creates objects.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        who: &Caller,
        facts: &mut Facts,
        key: Key,
        existing: Option<EnvRecord>,
        reqs: &[PodRequest],
        configs: Vec<PodConfig>,
        ttl: Option<Ttl>,
    ) -> Result<Started, Error> {
        let now = now_ms();
        let mut warnings = Vec::new();
        let mut planned: Vec<PodRecord> = Vec::new();
        let mut env_ns = existing.as_ref().map(|e| e.namespace.clone());
        let mut queues = Vec::new();
        let mut dbs = Vec::new();
        for (i, (req, cfg)) in reqs.iter().zip(configs).enumerate() {
            let at = if reqs.len() > 1 { format!("pods[{i}]") } else { String::new() };
            let (ns, mut pod) = self.plan_pod(who, facts, &key, &at, req, &cfg, env_ns.as_deref()).await?;
            if !cfg.queues.is_empty() {
                self.require(who, vec![Access::env("split", &ns)]).await?;
                queues.extend(self.plan_queues(&key, &ns, &at, &cfg.queues, &mut pod).await?);
            }
            dbs.extend(self.plan_dbs(who, &key, &ns, &at, &cfg.db_branches, &mut pod).await?);
            if planned.iter().any(|p| p.group == pod.group) {
                let msg = format!("two pods named {:?}; give each a distinct name", pod.group);
                return Err(FieldError::new("name", msg).within(&at).into());
            }
            env_ns = Some(ns);
            warnings.extend(cfg.warnings.iter().map(|w| if at.is_empty() { w.clone() } else { format!("{at}: {w}") }));
            planned.push(pod);
        }
        let ns = env_ns.unwrap_or_else(|| self.settings.default_namespace.clone());
        // The rest of RBAC (plan_pod asked for the reads), before anything is written.
        self.authorize(who, &key, &ns, &planned).await?;
        if existing.is_none() && self.auth.mode() == AuthMode::Kube {
            self.check_user_envs(who)?;
        }
        self.check_conflicts(&key, &ns, &planned)?;

        // The new record: existing pods with the same group are replaced.
        let is_new = existing.is_none();
        let mut rec = existing.clone().unwrap_or(EnvRecord {
            key: key.clone(),
            namespace: ns,
            created_at_ms: now,
            expires_at_ms: None,
            mode: planned.first().map_or(Mode::Steal, |p| p.mode),
            pending: true,
            deleting: false,
            pods: Vec::new(),
            creator: who.user.clone(),
            shares: Vec::new(),
            queues: Vec::new(),
            dbs: Vec::new(),
        });
        let ttl_extended = match (is_new, ttl) {
            (true, t) => {
                rec.expires_at_ms = expires(now, t.unwrap_or(Ttl::Finite(self.settings.default_ttl)));
                false
            }
            (false, Some(t)) => {
                rec.expires_at_ms = expires(now, t);
                true
            }
            (false, None) => false,
        };
        let mut stale = Vec::new();
        for p in planned {
            if let Some(old) = rec.pods.iter_mut().find(|o| o.group == p.group) {
                stale.extend(old.pod_names.iter().filter(|n| !p.pod_names.contains(n)).cloned());
                *old = p;
            } else {
                rec.pods.push(p);
            }
        }
        for q in queues {
            rec.queues.retain(|o| {
                (o.deployment.as_str(), o.queue_id.as_str()) != (q.deployment.as_str(), q.queue_id.as_str())
            });
            rec.queues.push(q);
        }
        for d in dbs {
            rec.dbs.retain(|o| o.database != d.database);
            rec.dbs.push(d);
        }
        rec.pending = true;
        // A Start revives an environment whose removal had begun and failed.
        rec.deleting = false;
        let pods = rec.pod_names().count();
        if pods > self.settings.limits.max_pods_per_env {
            return Err(Error::ResourceExhausted {
                field: "pods".into(),
                message: format!(
                    "the environment would have {pods} preview pods; this server allows at most {} (--max-pods-per-env)",
                    self.settings.limits.max_pods_per_env
                ),
            });
        }

        // Intent first: a crash from here on is finished by `recover`.
        self.store.put(&rec).await?;
        self.pause_point("after-intent").await;
        self.publish_upsert(&rec, is_new);
        // The agent warnings read the target's pods, independent of what
        // realize creates: read them meanwhile, off Start's critical path.
        // Split queues first: a preview pod's topic exists, and is routed to,
        // before the pod starts reading it.
        let realize = async {
            self.realize_queues(&rec, true).await?;
            self.realize(&rec).await
        };
        let (realized, agent_warnings) = tokio::join!(realize, self.agent_warnings(&rec));
        if let Err(e) = realized {
            // Nothing half-made: undo what this request added, keep what was.
            tracing::warn!(key = %key, error = %e, "start failed; rolling back");
            self.rollback(&rec, existing.as_ref()).await;
            return Err(e);
        }
        for name in &stale {
            self.cluster.delete_pod(&rec.namespace, name).await?;
        }
        // The owner ConfigMap keeps the pending copy: adopting it just
        // completes it again. Losing this write in a crash is as harmless.
        rec.pending = false;
        self.store.put_relaxed(&rec).await?;
        // Whatever had failed, the environment is as it should be now.
        self.set_failure(&key, None);
        let mut environment = self.publish_settled(&rec, ttl_extended);
        environment.failure = None;
        warnings.extend(agent_warnings);
        Ok(Started { key, environment, warnings, share: None })
    }

    /// One pod of a request: where it goes (its namespace) and its record,
    /// with the Pod to create built from the target's template. `at` is the
    /// request's field prefix (`pods[i]`, or empty for a single pod).
    #[allow(clippy::too_many_arguments)]
    async fn plan_pod(
        &self,
        who: &Caller,
        facts: &mut Facts,
        key: &Key,
        at: &str,
        req: &PodRequest,
        cfg: &PodConfig,
        env_ns: Option<&str>,
    ) -> Result<(String, PodRecord), Error> {
        let field = |f: &str| if at.is_empty() { f.to_string() } else { format!("{at}.{f}") };
        let mut target = cfg.target.clone();
        if !req.target.is_empty() {
            let ns = target.namespace().map(str::to_string);
            target = Target::parse(&field("target"), &req.target)?;
            if let Target::Workload { namespace, .. } = &mut target {
                *namespace = ns;
            }
        }
        let ns = [req.namespace.as_str(), target.namespace().unwrap_or(""), env_ns.unwrap_or("")]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or(&self.settings.default_namespace)
            .to_string();
        validate_dns_label(&field("namespace"), &ns, 63)?;
        let limits = &self.settings.limits;
        if limits.deny_namespaces.contains(&ns) {
            return Err(Error::PermissionDenied {
                field: field("namespace"),
                message: format!("previews in namespace {ns:?} are denied by this server (--deny-namespaces)"),
            });
        }
        if let Some(filter) = &cfg.filter {
            let regexes = filter.regexes();
            let too_long = regexes.iter().map(|r| r.len()).max().filter(|n| *n > limits.max_regex_bytes);
            let what = if regexes.len() > limits.max_filter_regexes {
                Some(format!(
                    "{} regexes; this server allows at most {} per filter (--max-filter-regexes)",
                    regexes.len(),
                    limits.max_filter_regexes
                ))
            } else {
                too_long.map(|n| {
                    format!(
                        "a regex of {n} bytes; this server allows at most {} (--max-regex-bytes)",
                        limits.max_regex_bytes
                    )
                })
            };
            if let Some(message) = what {
                return Err(Error::ResourceExhausted { field: field("feature.network.incoming.http_filter"), message });
            }
        }
        if cfg.replicas > limits.max_replicas {
            return Err(Error::ResourceExhausted {
                field: field("feature.preview.replicas"),
                message: format!(
                    "{} replicas; this server allows at most {} (--max-replicas)",
                    cfg.replicas, limits.max_replicas
                ),
            });
        }
        if let Some(env_ns) = env_ns
            && env_ns != ns
        {
            return Err(Error::FailedPrecondition {
                field: field("namespace"),
                message: format!("environment {:?} lives in namespace {env_ns:?}, not {ns:?}", key.as_str()),
            });
        }
        // What it asks for, for the audit line should it be refused.
        facts.namespace = ns.clone();
        facts.targets.push(target.to_string());
        let scoped = cfg.filter.as_ref().is_none_or(|f| *f == FilterSpec::Key(key.to_string()));
        facts.filter = if !scoped || facts.filter == "unscoped" { "unscoped" } else { "key" };
        // Before reading the namespace or the target: a caller who may not
        // preview here learns nothing about what is here.
        self.authorize_reads(who, &ns, &target).await?;
        let image = if req.image.is_empty() { cfg.image.clone() } else { Some(req.image.clone()) };
        let image = image.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            invalid(field("image"), "required: give an image in the request or feature.preview.image in the config")
        })?;
        let group = if req.name.is_empty() { sanitize(target.short_name()) } else { req.name.clone() };
        validate_dns_label(&field("name"), &group, 63)?;
        // Both reads at once: they are most of Start's latency.
        let (ns_ok, resolved) = tokio::join!(self.cluster.ensure_namespace(&ns), self.cluster.resolve(&ns, &target));
        ns_ok.map_err(|e| Error::cluster(field("namespace"), e))?;
        let resolved = resolved.map_err(|e| {
            let f = match e {
                KubeError::ContainerNotFound { .. } | KubeError::NoContainers { .. } => "target.container",
                _ => "target",
            };
            Error::cluster(field(f), e)
        })?;
        let pod = pods::build_pod(&PodPlan {
            key,
            group: &group,
            target: &target,
            resolved: resolved.as_ref(),
            image: &image,
            env: &cfg.env,
            pull_policy: self.cluster.pull_policy.as_deref(),
            propagate_key: cfg.propagate_key,
            instance: &self.cluster.instance,
            agent_image: self.cluster.agent_image.as_deref(),
        });
        // A Pod always serialises.
        let template = serde_json::to_value(&pod).expect("pod serialises");
        let ports = match (&resolved, cfg.ports.is_empty()) {
            (Some(r), true) => r.ports.clone(),
            _ => cfg.ports.clone(),
        };
        let record = PodRecord {
            pod_names: pods::pod_names(&group, key, &template, cfg.replicas),
            group,
            container: resolved.as_ref().map_or_else(|| "app".into(), |r| r.container.clone()),
            target,
            image,
            mode: cfg.mode,
            filter: cfg.filter.clone().unwrap_or_else(|| FilterSpec::Key(key.to_string())),
            ports,
            template,
        };
        Ok((ns, record))
    }

    /// Restores the state before a failed Start: the previous record and its
    /// pods, or nothing at all for a new environment. What it cannot undo now
    /// (the API server away, say) marks the environment FAILED, and the
    /// reaper's retry carries the undo on: a new one is removed as by Clean
    /// (tombstone first, so it never comes back), an existing one is
    /// reconciled to its previous record.
    async fn rollback(&self, attempted: &EnvRecord, previous: Option<&EnvRecord>) {
        let key = &attempted.key;
        let result = match previous {
            None => self.remove_locked(key, proto::EventKind::Cleaned).await.map(|_| ()),
            Some(prev) => {
                async {
                    // The view and the store first: a retry reconciles to them.
                    if let Some(v) = self.view().envs.get_mut(key) {
                        v.record = prev.clone();
                    }
                    self.store.put(prev).await?;
                    let keep: Vec<&String> = prev.pod_names().collect();
                    for name in attempted.pod_names().filter(|n| !keep.contains(n)) {
                        self.cluster.delete_pod(&attempted.namespace, name).await?;
                    }
                    self.end_dbs(attempted, &prev.dbs).await?;
                    self.cluster.put_owner(prev).await?;
                    Ok::<_, Error>(())
                }
                .await
            }
        };
        if let Err(e) = result {
            tracing::error!(key = %key, error = %e, "rollback incomplete; retrying");
            self.set_failure(key, Some(format!("a failed start's undo did not finish: {e}; retrying")));
        }
    }

    /// Creates the owner and every pod of a record that does not exist yet.
    pub(super) async fn realize(&self, rec: &EnvRecord) -> Result<(), Error> {
        let owner = self.cluster.put_owner(rec).await?;
        self.pause_point("after-owner").await;
        // Branches before pods: a preview pod's first query meets its branch.
        self.realize_dbs(rec, &owner).await?;
        for p in &rec.pods {
            for name in &p.pod_names {
                let pod: Pod = pods::instantiate(&p.template, name, &rec.namespace, &owner)
                    .map_err(|e| StoreError::Corrupt { key: rec.key.to_string(), source: e })?;
                self.cluster.create_pod(&rec.namespace, &pod).await?;
                self.pause_point("after-pod").await;
            }
        }
        Ok(())
    }

    /// A new environment may not take its creator past --max-envs-per-user.
    fn check_user_envs(&self, who: &Caller) -> Result<(), Error> {
        let max = self.settings.limits.max_envs_per_user;
        let have = self.view().envs.values().filter(|e| e.record.creator == who.user).count();
        if have >= max {
            return Err(Error::ResourceExhausted {
                field: "key".into(),
                message: format!(
                    "user {:?} has {have} environments; this server allows at most {max} per user (--max-envs-per-user)",
                    who.user
                ),
            });
        }
        Ok(())
    }

    /// Two environments on one target may not use the same filter on
    /// overlapping ports: a request could not tell them apart.
    fn check_conflicts(&self, key: &Key, ns: &str, planned: &[PodRecord]) -> Result<(), Error> {
        let view = self.view();
        for p in planned {
            let Target::Workload { kind, name, .. } = &p.target else { continue };
            for other in view.envs.values().filter(|e| e.record.key != *key && e.record.namespace == ns) {
                for op in other.record.pods.iter().filter(|op| on_target(&op.target, *kind, name)) {
                    let ports_overlap =
                        p.ports.is_empty() || op.ports.is_empty() || p.ports.iter().any(|x| op.ports.contains(x));
                    if ports_overlap && op.filter == p.filter {
                        return Err(Error::AlreadyExists {
                            field: "feature.network.incoming.http_filter".into(),
                            message: format!(
                                "the same filter is already used on {}/{name} by environment {:?}",
                                kind.as_str(),
                                other.record.key.as_str()
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

fn expires(now: i64, t: Ttl) -> Option<i64> {
    match t {
        Ttl::Infinite => None,
        Ttl::Finite(d) => Some(now + d.as_millis() as i64),
    }
}

impl Manager {
    /// Start's warnings about target pods whose keyed requests cannot reach
    /// the environment: another previewd's agent, agents that keep failing,
    /// or the container cap. Read from the cluster, so they are there on the
    /// first Start on a target too; a failed read only loses the warning.
    async fn agent_warnings(&self, rec: &EnvRecord) -> Vec<String> {
        let Some(server) = self.cluster.agent_server.as_deref() else { return Vec::new() };
        let mut out = Vec::new();
        for (kind, name) in rec.workloads() {
            let pods = match self.cluster.target_pods(&rec.namespace, kind, name).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "reading target pods for warnings");
                    continue;
                }
            };
            for p in &pods {
                if let Some((state, why)) = agents::pod_agent(p, server).filter(|(s, _)| s.is_stuck()) {
                    let pod = p.metadata.name.as_deref().unwrap_or_default();
                    out.push(format!(
                        "{}/{name}: pod {pod}: {why}; keyed requests to it stay on staging ({state:?})",
                        kind.as_str()
                    ));
                }
            }
        }
        out
    }
}

/// A DNS label from a workload name.
fn sanitize(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let s = s.trim_matches('-');
    let s: String = s.chars().take(63).collect();
    s.trim_end_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sanitizes_names() {
        assert_eq!(sanitize("orders.v2_x"), "orders-v2-x");
        assert_eq!(sanitize("-a-"), "a");
    }

    #[test]
    fn expiry() {
        assert_eq!(expires(1_000, Ttl::Finite(Duration::from_secs(2))), Some(3_000));
        assert_eq!(expires(1_000, Ttl::Infinite), None);
    }
}
