//! The status view: every environment with its pods' states, the sequence
//! of published events, and the selectors Status and Clean use. Plain data
//! behind the manager's mutex; nothing here awaits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;

use crate::model::{AgentState, AgentStatus, EnvRecord, EnvStatus, Key, PodState, Route, Target, WorkloadKind};
use crate::previewd::cluster::names::LABEL_KEY;
use crate::previewd::cluster::state::pod_state;
use crate::{proto, wire};

/// A published change, shared by every watcher.
pub type Event = Arc<proto::StatusEvent>;

/// A workload in a namespace.
pub type TargetRef = (String, WorkloadKind, String);

#[derive(Default)]
pub(super) struct View {
    pub envs: BTreeMap<Key, EnvStatus>,
    /// Failed environments: when to try again (Unix ms) and the next wait.
    pub retries: BTreeMap<Key, (i64, i64)>,
    pub seq: u64,
    /// Pod states seen before their environment's record (watch races Start).
    pub orphans: HashMap<String, PodState>,
    /// Per target, each running pod's agent as `attach` last read it
    /// (`Routing` there means "a live agent of ours").
    pub pod_agents: BTreeMap<TargetRef, PodAgents>,
    /// Open route streams per agent pod (namespace, pod).
    pub connected: BTreeMap<(String, String), usize>,
}

/// A target's running pods → their agent's state and why.
pub type PodAgents = BTreeMap<String, (AgentState, String)>;

/// Filters Status requests and events: a key glob and a namespace (empty: any).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub key: String,
    pub namespace: String,
}

impl Selector {
    fn matches(&self, key: &str, namespace: &str) -> bool {
        (self.key.is_empty() || glob_match(&self.key, key))
            && (self.namespace.is_empty() || self.namespace == namespace)
    }

    pub fn matches_record(&self, rec: &EnvRecord) -> bool {
        self.matches(&rec.key, &rec.namespace)
    }

    /// Whether a published event concerns this watcher.
    pub fn matches_event(&self, ev: &proto::StatusEvent) -> bool {
        ev.environments.iter().any(|e| self.matches(&e.key, &e.namespace))
    }
}

/// `*` matches any run, `?` one character; anything else is literal.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), s.as_bytes());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

/// What an agent on a target pod should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentPlan {
    /// Apply these routes (never empty).
    Route(Vec<Route>),
    /// The target is previewed but no preview pod has an address yet (or one
    /// is being replaced): keep the last routes, or wait for the first.
    Wait,
    /// No environment previews the target: the agent leaves.
    Leave,
}

impl View {
    pub fn publish(
        &mut self,
        tx: &broadcast::Sender<Event>,
        kind: proto::EventKind,
        envs: Vec<proto::Environment>,
        pod: Option<proto::Pod>,
    ) {
        self.seq += 1;
        let ev = proto::StatusEvent { kind: kind as i32, sequence: self.seq, environments: envs, pod };
        // No receivers is fine: nobody is watching.
        let _ = tx.send(Arc::new(ev));
    }

    pub fn snapshot(&self, sel: &Selector) -> proto::StatusEvent {
        proto::StatusEvent {
            kind: proto::EventKind::Snapshot as i32,
            sequence: self.seq,
            environments: self.envs.values().filter(|e| sel.matches_record(&e.record)).map(wire::environment).collect(),
            pod: None,
        }
    }

    /// Puts `rec` into the view, with any pod states seen before it.
    pub fn upsert(&mut self, rec: &EnvRecord) -> &mut EnvStatus {
        let pods = self.take_orphans(rec);
        let agents = self.agents_for(rec);
        let entry = self.envs.entry(rec.key.clone()).or_insert_with(|| EnvStatus::new(rec.clone()));
        entry.record = rec.clone();
        entry.pods.extend(pods);
        entry.agents = agents;
        entry
    }

    /// The agents on the running pods of `rec`'s targets. A live agent is
    /// routing once its route stream is open.
    pub fn agents_for(&self, rec: &EnvRecord) -> Vec<AgentStatus> {
        let mut out = Vec::new();
        for (kind, name) in rec.workloads() {
            let target = (rec.namespace.clone(), kind, name.to_string());
            for (pod, (state, why)) in self.pod_agents.get(&target).into_iter().flatten() {
                let (state, reason) = self.agent_state(&rec.namespace, pod, *state, why);
                out.push(AgentStatus { target: format!("{}/{name}", kind.as_str()), pod: pod.clone(), state, reason });
            }
        }
        out.sort();
        out
    }

    /// What Status says of a pod's agent: `attach` reads a live agent of ours
    /// as `Routing`; it routes once its route stream is open.
    pub fn agent_state(&self, ns: &str, pod: &str, state: AgentState, why: &str) -> (AgentState, String) {
        match state {
            AgentState::Routing if !self.connected.contains_key(&(ns.to_string(), pod.to_string())) => {
                (AgentState::Attaching, "the agent runs but is not connected to previewd yet".to_string())
            }
            s => (s, why.to_string()),
        }
    }

    /// Recomputes every environment's agents; returns those that changed.
    pub fn refresh_agents(&mut self) -> Vec<proto::Environment> {
        let fresh: Vec<(Key, Vec<AgentStatus>)> =
            self.envs.iter().map(|(k, e)| (k.clone(), self.agents_for(&e.record))).collect();
        let mut changed = Vec::new();
        for (key, agents) in fresh {
            if let Some(env) = self.envs.get_mut(&key).filter(|e| e.agents != agents) {
                env.agents = agents;
                changed.push(wire::environment(env));
            }
        }
        changed
    }

    pub fn take_orphans(&mut self, rec: &EnvRecord) -> BTreeMap<String, PodState> {
        rec.pod_names().filter_map(|n| Some((n.clone(), self.orphans.remove(n)?))).collect()
    }

    /// Applies a pod watch event; returns the changed environment and pod,
    /// for publishing, when anything changed.
    pub fn observe_pod(&mut self, pod: &Pod, deleted: bool) -> Option<(proto::Environment, Option<proto::Pod>)> {
        let labels = pod.metadata.labels.as_ref()?;
        let key = labels.get(LABEL_KEY)?;
        let name = pod.metadata.name.clone()?;
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let mut state = if deleted {
            PodState { phase: "Missing".into(), reason: "Deleted".into(), ..Default::default() }
        } else {
            pod_state(pod)
        };
        let Some(env) = self.envs.get_mut(key.as_str()) else {
            if !deleted {
                self.orphans.insert(name, state);
            } else {
                self.orphans.remove(&name);
            }
            return None;
        };
        if env.record.namespace != namespace || !env.record.pod_names().any(|n| *n == name) {
            return None; // a pod being replaced, or someone else's
        }
        if deleted {
            state.restarts = env.pods.get(&name).map_or(0, |s| s.restarts);
        }
        if env.pods.get(&name) == Some(&state) {
            return None;
        }
        env.pods.insert(name.clone(), state);
        let envp = wire::environment(env);
        let podp = envp.pods.iter().find(|p| p.name == name).cloned();
        Some((envp, podp))
    }

    /// The routes of `ns`'s `kind/name`: one per preview pod group on that
    /// target, to its first replica with an IP (a ready one first), in the
    /// order the environments were created (the agent tries unscoped
    /// filters in this order).
    pub fn routes_for(&self, ns: &str, kind: WorkloadKind, name: &str) -> Vec<Route> {
        let mut out = Vec::new();
        let mut envs: Vec<&EnvStatus> =
            self.envs.values().filter(|e| e.record.namespace == ns && !e.record.pending).collect();
        envs.sort_by_key(|e| (e.record.created_at_ms, e.record.key.clone()));
        for env in envs {
            for p in env.record.pods.iter().filter(|p| on_target(&p.target, kind, name)) {
                let states: Vec<&PodState> =
                    p.pod_names.iter().filter_map(|n| env.pods.get(n)).filter(|s| !s.ip.is_empty()).collect();
                let best = states.iter().find(|s| s.ready).or(states.first());
                let Some(ip) = best.and_then(|s| s.ip.parse().ok()) else { continue };
                out.push(Route {
                    key: env.record.key.clone(),
                    mode: p.mode,
                    filter: p.filter.clone(),
                    ports: p.ports.clone(),
                    destination: ip,
                    expires_at_ms: env.record.expires_at_ms,
                });
            }
        }
        out
    }

    /// Every workload that an environment (settled or being set up) previews.
    pub fn targets(&self) -> BTreeSet<TargetRef> {
        let mut out = BTreeSet::new();
        for env in self.envs.values() {
            for (kind, name) in env.record.workloads() {
                out.insert((env.record.namespace.clone(), kind, name.to_string()));
            }
        }
        out
    }

    /// The one rule for agents: routes when there are some; while an
    /// environment still previews the target, wait; otherwise leave.
    pub fn agent_plan(&self, target: &TargetRef) -> AgentPlan {
        let (ns, kind, name) = target;
        let routes = self.routes_for(ns, *kind, name);
        if !routes.is_empty() {
            AgentPlan::Route(routes)
        } else if self.targets().contains(target) {
            AgentPlan::Wait
        } else {
            AgentPlan::Leave
        }
    }
}

pub(super) fn on_target(t: &Target, kind: WorkloadKind, name: &str) -> bool {
    matches!(t, Target::Workload { kind: k, name: n, .. } if *k == kind && n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "abc"));
        assert!(glob_match("a*c", "abbbc"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("ci-*-x", "ci-12-x"));
        assert!(!glob_match("ci-*", "dev-1"));
        assert!(glob_match("abc", "abc"));
        assert!(!glob_match("abc", "abcd"));
    }
}
