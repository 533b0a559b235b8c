//! Queue splitting, the manager's side, for every broker: plan an
//! environment's split queues (the admin's QueueSplit, the target's
//! variables, the broker, overlaps), make them real (temporary topics or
//! queues, the splitter's routes, the target's one rolling restart), and end
//! them without losing a message (unread ones go back to staging; the last
//! environment restores the target). What differs per broker is behind
//! `previewd::queues`.
//!
//! What runs follows the records: a split's routes are the live
//! environments' bindings on it, so recovery only has to sync each split.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::{Error, Manager};
use crate::model::queue::{self, MessageFilter, QueueAsk, QueueBinding, TOPIC_PREFIX};
use crate::model::{EnvRecord, Key, PodRecord, Target, WorkloadKind};
use crate::previewd::cluster::pods;
use crate::previewd::cluster::queuesplits::{Brokers, declared_queue, env_value};
use crate::previewd::queues::{self as brokers, QueueError, Route, SplitSpec};

/// The Deployment annotation that keeps a split queue's original topic.
const ORIGINAL_ANNOTATION: &str = "preview.dev/split-original";
/// How long ending a split may wait for pods to go.
const PODS_GONE_TIMEOUT: Duration = Duration::from_secs(180);

fn failed(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::FailedPrecondition { field: field.into(), message: message.into() }
}

fn annotation(queue_id: &str) -> String {
    format!("{ORIGINAL_ANNOTATION}.{queue_id}")
}

impl Manager {
    /// The bindings for one pod's `feature.split_queues`, with the pod's
    /// template pointed at its environment's topics. Reads only: nothing is
    /// made, and the target is untouched, until the record is written.
    pub(super) async fn plan_queues(
        &self,
        key: &Key,
        ns: &str,
        at: &str,
        asks: &[QueueAsk],
        pod: &mut PodRecord,
    ) -> Result<Vec<QueueBinding>, Error> {
        if asks.is_empty() {
            return Ok(Vec::new());
        }
        let field = |f: &str| if at.is_empty() { f.to_string() } else { format!("{at}.{f}") };
        let base = field("feature.split_queues");
        let Target::Workload { kind: WorkloadKind::Deployment, name, .. } = &pod.target else {
            return Err(failed(base, format!("queue splitting needs a Deployment target; {} is not one", pod.target)));
        };
        let name = name.clone();
        let Some((qs_name, spec)) = self.cluster.queue_split(ns, &name).await? else {
            return Err(failed(
                base,
                format!(
                    "no QueueSplit in namespace {ns:?} declares how deployment/{name} consumes; an admin creates one \
                     (queuesplits.preview.dev, spec.target {{kind: Deployment, name: {name}}}, see README)"
                ),
            ));
        };
        let dep = self.cluster.deployment(ns, &name).await?.ok_or_else(|| Error::NotFound {
            field: field("target"),
            message: format!("deployment/{name} not found in {ns:?}"),
        })?;
        let template = dep.spec.as_ref().and_then(|s| s.template.spec.clone()).unwrap_or_default();
        let annotations = dep.metadata.annotations.clone().unwrap_or_default();
        let mut out = Vec::new();
        for ask in asks {
            let f = format!("{base}.{}", ask.queue_id);
            let decl = declared_queue(&qs_name, &spec, &ask.queue_id)
                .map_err(|m| failed(&f, m))?
                .ok_or_else(|| failed(&f, format!("QueueSplit {qs_name} declares no queue {:?}", ask.queue_id)))?;
            if decl.queue_type != ask.queue_type {
                return Err(failed(
                    format!("{f}.queue_type"),
                    format!(
                        "QueueSplit {qs_name} declares queue {:?} as {}, not {}",
                        ask.queue_id,
                        decl.queue_type.as_str(),
                        ask.queue_type.as_str()
                    ),
                ));
            }
            let containers: Vec<String> = if decl.containers.is_empty() {
                template
                    .containers
                    .iter()
                    .filter(|c| c.env.iter().flatten().any(|e| e.name == decl.topic_env))
                    .map(|c| c.name.clone())
                    .collect()
            } else {
                decl.containers.clone()
            };
            let Some(first) = containers.first() else {
                return Err(failed(&f, format!("deployment/{name} has no container with env var {}", decl.topic_env)));
            };
            let literal = |var: &str| -> Result<String, Error> {
                match env_value(&template, first, var) {
                    Some(Ok(v)) if !v.is_empty() => Ok(v),
                    Some(_) => Err(failed(
                        &f,
                        format!("env var {var} of container {first} must be a literal value (valueFrom is not read)"),
                    )),
                    None => Err(failed(&f, format!("container {first} of deployment/{name} has no env var {var}"))),
                }
            };
            let mut topic = literal(&decl.topic_env)?;
            // SQS: the variable may hold a queue URL; its name ends it.
            if topic.rsplit('/').next().is_some_and(|n| n.starts_with(TOPIC_PREFIX)) {
                // Already split: the original is on the Deployment.
                topic = annotations.get(&annotation(&ask.queue_id)).cloned().ok_or_else(|| {
                    failed(&f, format!("deployment/{name} reads {topic} but its original topic is not recorded"))
                })?;
            }
            let group = if decl.group_env.is_empty() { String::new() } else { literal(&decl.group_env)? };
            let brokers = match &decl.brokers {
                Brokers::Value(v) => v.clone(),
                Brokers::Env(var) => literal(var)?,
            };
            let filter = match &ask.filter {
                None => MessageFilter::Key(key.to_string()),
                Some(m) => MessageFilter::Headers(m.clone()),
            };
            let limits = &self.settings.limits;
            if let MessageFilter::Headers(m) = &filter
                && (m.len() > limits.max_filter_regexes || m.values().any(|r| r.len() > limits.max_regex_bytes))
            {
                return Err(Error::ResourceExhausted {
                    field: format!("{f}.message_filter"),
                    message: format!(
                        "at most {} headers of at most {} bytes each (--max-filter-regexes, --max-regex-bytes)",
                        limits.max_filter_regexes, limits.max_regex_bytes
                    ),
                });
            }
            // Filters on one split must be disjoint: a record goes to one environment.
            let split = queue::split_id(ns, &name, &ask.queue_id);
            let clash = self.view().envs.values().find_map(|e| {
                let r = &e.record;
                (r.key != *key && r.namespace == ns && !r.deleting)
                    .then(|| r.queues.iter().find(|b| b.split_id(ns) == split && b.filter.overlaps(&filter)))
                    .flatten()
                    .map(|_| r.key.to_string())
            });
            if let Some(other) = clash {
                return Err(Error::AlreadyExists {
                    field: f,
                    message: format!(
                        "its filter can match the same records as environment {other:?}'s on queue {} of deployment/{name}",
                        ask.queue_id
                    ),
                });
            }
            let probe = brokers::probe(decl.queue_type, &brokers, &decl.region, &topic)
                .await
                .map_err(|source| Error::Queue { field: Some(f.clone()), source: Box::new(source) })?;
            let (staging_topic, env_topic) =
                queue::temp_names(decl.queue_type, probe.fifo, ns, &name, &ask.queue_id, key);
            out.push(QueueBinding {
                queue_id: ask.queue_id.clone(),
                queue_type: decl.queue_type,
                fifo: probe.fifo,
                region: decl.region.clone(),
                deployment: name.clone(),
                declared_by: qs_name.clone(),
                staging_topic,
                env_topic,
                containers,
                brokers,
                topic_env: decl.topic_env.clone(),
                original_topic: topic,
                group,
                partitions: probe.partitions,
                mode: ask.mode,
                filter,
            });
        }
        // The preview pods read their environment's topics.
        for b in &out {
            set_env(&mut pod.template, &b.containers, &b.topic_env, &b.env_value(&b.env_topic));
        }
        let replicas = pod.pod_names.len().max(1) as u32;
        pod.pod_names = pods::pod_names(&pod.group, key, &pod.template, replicas);
        Ok(out)
    }

    /// Makes a recorded environment's split queues real: its topics, the
    /// splitter's routes (committed before this returns), and the target
    /// pointed at staging's topic (the first environment on it only; this
    /// waits for that rollout).
    /// Recovery passes `route: false` (the record is not in the view yet;
    /// `resume_splits` routes it once all are).
    pub(super) async fn realize_queues(&self, rec: &EnvRecord, route: bool) -> Result<(), Error> {
        for b in &rec.queues {
            brokers::create(b).await?;
            if route {
                self.sync_split(&rec.namespace, &b.split_id(&rec.namespace)).await?;
            }
            self.cluster
                .set_topic_env(
                    &rec.namespace,
                    &b.deployment,
                    &b.containers,
                    &b.topic_env,
                    &b.env_value(&b.staging_topic),
                    (&annotation(&b.queue_id), Some(&b.original_topic)),
                )
                .await?;
            // Until the rollout is over, the target's old pods still read the
            // original topic in the same group and take a share of it, keyed
            // records too: Start returns once none is left (terminating too).
            self.wait_until(
                "the target's old pods (and any other member of its group) to stop reading the original topic",
                || async {
                    let n = self
                        .cluster
                        .pods_with_env(&rec.namespace, &b.deployment, &b.containers, &b.topic_env, &b.original_topic)
                        .await?;
                    Ok(n == 0 && self.readers(&rec.namespace, b, &b.original_topic).await? == 0)
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Consumers of `topic` other than the split's splitter.
    async fn readers(&self, ns: &str, b: &QueueBinding, topic: &str) -> Result<usize, Error> {
        Ok(brokers::readers(b, topic, self.splits.is_running(&b.split_id(ns))).await?)
    }

    /// Ends an environment's split queues, once its pods are deleted: no
    /// record is routed to it any more, its unread records go to staging's
    /// topic, and its topic goes. The last environment on a split also stops
    /// the splitter, restores the target, and moves what staging's topic
    /// still holds back to the original topic. Idempotent: a retry (or
    /// recovery) carries on where a failed attempt stopped.
    pub(super) async fn end_queues(&self, rec: &EnvRecord) -> Result<(), Error> {
        if rec.queues.is_empty() {
            return Ok(());
        }
        let ns = &rec.namespace;
        // The record is marked deleting in the view: the routes leave it out.
        for b in &rec.queues {
            self.sync_split(ns, &b.split_id(ns)).await?;
        }
        // Gone from the API server, and from the group: a pod deleted at once
        // (grace period 0) may still be running, and committing.
        self.wait_until("the environment's pods to go", || async {
            if self.cluster.env_pods(ns, &rec.key).await? != 0 {
                return Ok(false);
            }
            for b in &rec.queues {
                if self.readers(ns, b, &b.env_topic).await? != 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await?;
        for b in &rec.queues {
            let id = b.split_id(ns);
            let last = !self.view().envs.values().any(|e| {
                e.record.key != rec.key && !e.record.deleting && e.record.queues.iter().any(|o| o.split_id(ns) == id)
            });
            if !last {
                self.drain(b, &b.env_topic, &b.staging_topic).await?;
                brokers::delete(b, &[&b.env_topic]).await?;
                continue;
            }
            self.splits.stop(&id).await;
            let key_annotation = annotation(&b.queue_id);
            self.cluster
                .set_topic_env(
                    ns,
                    &b.deployment,
                    &b.containers,
                    &b.topic_env,
                    &b.original_topic,
                    (&key_annotation, None),
                )
                .await?;
            let staging = b.env_value(&b.staging_topic);
            self.wait_until("the target's pods that read staging's topic to go", || async {
                let n = self.cluster.pods_with_env(ns, &b.deployment, &b.containers, &b.topic_env, &staging).await?;
                Ok(n == 0 && self.readers(ns, b, &b.staging_topic).await? == 0)
            })
            .await?;
            self.drain(b, &b.env_topic, &b.original_topic).await?;
            self.drain(b, &b.staging_topic, &b.original_topic).await?;
            brokers::delete(b, &[&b.env_topic, &b.staging_topic]).await?;
        }
        Ok(())
    }

    /// Moves `src`'s unread messages into `dst`.
    async fn drain(&self, b: &QueueBinding, src: &str, dst: &str) -> Result<(), Error> {
        let moved = brokers::drain(b, src, dst).await?;
        if moved > 0 {
            tracing::info!(from = src, to = dst, records = moved, "unread records moved");
        }
        Ok(())
    }

    /// Polls `done` every 500 ms until it holds, for at most
    /// [`PODS_GONE_TIMEOUT`] (then an error, and the caller's retry).
    async fn wait_until<F, Fut>(&self, what: &str, mut done: F) -> Result<(), Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool, Error>>,
    {
        let start = Instant::now();
        while !done().await? {
            if start.elapsed() > PODS_GONE_TIMEOUT {
                return Err(QueueError::Stuck { what: format!("waiting for {what}") }.into());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// Brings split `id`'s splitter in line with the live records: routes
    /// for every environment on it, or stopped when there are none.
    async fn sync_split(&self, ns: &str, id: &str) -> Result<(), Error> {
        let (spec, routes) = {
            let view = self.view();
            let mut spec = None;
            let mut routes = Vec::new();
            for e in view.envs.values().filter(|e| !e.record.deleting && e.record.namespace == ns) {
                for b in e.record.queues.iter().filter(|b| b.split_id(ns) == id) {
                    spec.get_or_insert_with(|| SplitSpec {
                        queue_type: b.queue_type,
                        fifo: b.fifo,
                        region: b.region.clone(),
                        brokers: b.brokers.clone(),
                        source: b.original_topic.clone(),
                        group: b.group.clone(),
                        staging: b.staging_topic.clone(),
                        partitions: b.partitions,
                        transactional_id: format!("preview-split-{id}"),
                    });
                    let filter = b.filter.compile().map_err(|m| failed("feature.split_queues", m))?;
                    routes.push(Route {
                        key: e.record.key.to_string(),
                        topic: b.env_topic.clone(),
                        filter,
                        mode: b.mode,
                    });
                }
            }
            (spec, routes)
        };
        match spec {
            None => {
                self.splits.stop(id).await;
                Ok(())
            }
            Some(spec) => Ok(self.splits.route(id, &spec, routes).await?),
        }
    }

    /// Starts every split the live records have (recovery): each resumes
    /// from its committed offsets.
    pub(super) async fn resume_splits(&self) {
        let ids: BTreeSet<(String, String)> = self
            .view()
            .envs
            .values()
            .filter(|e| !e.record.deleting)
            .flat_map(|e| e.record.queues.iter().map(|b| (e.record.namespace.clone(), b.split_id(&e.record.namespace))))
            .collect();
        for (ns, id) in ids {
            if let Err(e) = self.sync_split(&ns, &id).await {
                tracing::warn!(split = %id, error = %e, "a resumed split has not committed yet; its splitter keeps retrying");
            }
        }
    }

    /// Refreshes each split queue's figures in the view (Status, metrics):
    /// records forwarded to the environment's topic, and its lag (records
    /// there that the group has not read). Called by the reaper's tick.
    pub(super) async fn refresh_queue_stats(&self) {
        let bindings: Vec<(Key, QueueBinding, u64)> = {
            let view = self.view();
            view.envs
                .values()
                .filter(|e| !e.record.deleting)
                .flat_map(|e| {
                    let ns = &e.record.namespace;
                    e.record.queues.iter().map(|b| {
                        (e.record.key.clone(), b.clone(), self.splits.forwarded(&b.split_id(ns), &b.env_topic))
                    })
                })
                .collect()
        };
        for (key, b, forwarded) in bindings {
            let lag = brokers::lag(&b, &b.env_topic).await.unwrap_or(-1);
            if let Some(e) = self.view().envs.get_mut(&key) {
                e.queues.insert(b.env_topic.clone(), crate::model::QueueStats { forwarded, lag });
            }
        }
    }
}

/// Sets `var` = `value` in the named containers of a pod (JSON).
fn set_env(pod: &mut serde_json::Value, containers: &[String], var: &str, value: &str) {
    let Some(list) = pod.pointer_mut("/spec/containers").and_then(|c| c.as_array_mut()) else { return };
    for c in list.iter_mut().filter(|c| c["name"].as_str().is_some_and(|n| containers.iter().any(|x| x == n))) {
        let entry = serde_json::json!({"name": var, "value": value});
        match c.get_mut("env").and_then(|e| e.as_array_mut()) {
            Some(env) => match env.iter_mut().find(|e| e["name"] == var) {
                Some(e) => *e = entry,
                None => env.push(entry),
            },
            None => c["env"] = serde_json::json!([entry]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_env_replaces_a_value_from() {
        let mut pod = serde_json::json!({"spec": {"containers": [
            {"name": "app", "env": [{"name": "T", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}]},
            {"name": "side"},
        ]}});
        set_env(&mut pod, &["app".into(), "side".into()], "T", "preview-tmp-1");
        assert_eq!(pod["spec"]["containers"][0]["env"], serde_json::json!([{"name": "T", "value": "preview-tmp-1"}]));
        assert_eq!(pod["spec"]["containers"][1]["env"], serde_json::json!([{"name": "T", "value": "preview-tmp-1"}]));
    }
}
