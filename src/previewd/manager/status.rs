//! Status: snapshots, the event stream, pod watch events, and what agents
//! are told. Every change to the view is published with the next sequence
//! number while the view's lock is held, so watchers see one order.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;

use super::Manager;
use super::view::{AgentPlan, Event, PodAgents, Selector, TargetRef, View};
use crate::model::{AgentState, EnvRecord, EnvStatus, Route, WorkloadKind};
use crate::{proto, wire};

impl Manager {
    /// A snapshot of the matching environments and a receiver for every
    /// event after it, taken atomically so nothing is missed or repeated.
    pub fn subscribe(&self, sel: &Selector) -> (proto::StatusEvent, broadcast::Receiver<Event>) {
        let view = self.view();
        let rx = self.events.subscribe();
        (view.snapshot(sel), rx)
    }

    pub fn snapshot(&self, sel: &Selector) -> proto::StatusEvent {
        self.view().snapshot(sel)
    }

    /// Applies a pod watch event to the view and tells watchers if it changed.
    pub fn observe_pod(&self, pod: &Pod, deleted: bool) {
        let mut view = self.view();
        if let Some((env, pod)) = view.observe_pod(pod, deleted) {
            // `kubectl get pe` shows ready pods: written off the watch's path,
            // and only when the count moves.
            let ready = env.pods.iter().filter(|p| p.ready).count();
            if self.ready_counts.lock().unwrap_or_else(|e| e.into_inner()).insert(env.key.clone(), ready) != Some(ready)
            {
                let (cluster, ns, key) = (self.cluster.clone(), env.namespace.clone(), env.key.clone());
                tokio::spawn(async move {
                    if let Err(e) = cluster.put_owner_status(&ns, &key, ready).await {
                        tracing::debug!(%key, error = %e, "writing the environment's ready count");
                    }
                });
            }
            view.publish(&self.events, proto::EventKind::PodChanged, vec![env], pod);
        }
    }

    pub(super) fn publish_upsert(&self, rec: &EnvRecord, is_new: bool) {
        let mut view = self.view();
        let env = wire::environment(view.upsert(rec));
        if is_new {
            view.publish(&self.events, proto::EventKind::EnvAdded, vec![env], None);
        }
    }

    pub(super) fn publish_settled(&self, rec: &EnvRecord, ttl_extended: bool) -> EnvStatus {
        let mut view = self.view();
        let entry = view.upsert(rec);
        let live: BTreeSet<&String> = rec.pod_names().collect();
        entry.pods.retain(|n, _| live.contains(n));
        let env = entry.clone();
        let kind = if ttl_extended { proto::EventKind::TtlExtended } else { proto::EventKind::EnvAdded };
        view.publish(&self.events, kind, vec![wire::environment(&env)], None);
        env
    }

    /// Removes an environment from the view and tells watchers why; true
    /// when it was there.
    pub(super) fn publish_removed(&self, key: &str, why: proto::EventKind) -> bool {
        let mut view = self.view();
        let Some(env) = view.envs.remove(key) else { return false };
        view.publish(&self.events, why, vec![wire::environment(&env)], None);
        true
    }

    /// The routes agents on `ns`'s `kind/name` pods must apply.
    pub fn routes_for(&self, ns: &str, kind: WorkloadKind, name: &str) -> Vec<Route> {
        self.view().routes_for(ns, kind, name)
    }

    /// Every workload that an environment (settled or being set up) previews.
    pub fn targets(&self) -> BTreeSet<TargetRef> {
        self.view().targets()
    }

    /// Records what `attach` read about the agents on `target`'s running pods
    /// (empty: the target is no longer watched) and tells watchers of every
    /// environment whose agents changed.
    pub fn set_pod_agents(&self, target: &TargetRef, pods: PodAgents) {
        let mut view = self.view();
        if view.pod_agents.get(target).map_or(pods.is_empty(), |old| *old == pods) {
            return;
        }
        if pods.is_empty() {
            view.pod_agents.remove(target);
        } else {
            view.pod_agents.insert(target.clone(), pods);
        }
        self.publish_agents(&mut view);
    }

    /// An agent's route stream opened (`up`) or closed.
    pub fn agent_connected(&self, namespace: &str, pod: &str, up: bool) {
        let mut view = self.view();
        let k = (namespace.to_string(), pod.to_string());
        let n = view.connected.get(&k).copied().unwrap_or(0);
        match (up, n) {
            (true, n) => view.connected.insert(k, n + 1),
            (false, 0 | 1) => view.connected.remove(&k),
            (false, n) => view.connected.insert(k, n - 1),
        };
        self.publish_agents(&mut view);
    }

    fn publish_agents(&self, view: &mut View) {
        for env in view.refresh_agents() {
            view.publish(&self.events, proto::EventKind::AgentsChanged, vec![env], None);
        }
    }

    /// Agent pods by state, for the metrics page (a live agent of ours that
    /// is not connected counts as attaching).
    pub(super) fn agent_counts(view: &View) -> BTreeMap<AgentState, usize> {
        let mut out = BTreeMap::new();
        for ((ns, _, _), pods) in &view.pod_agents {
            for (pod, (state, why)) in pods {
                *out.entry(view.agent_state(ns, pod, *state, why).0).or_default() += 1;
            }
        }
        out
    }

    /// What the agents on `target`'s pods should do now.
    pub fn agent_plan(&self, target: &TargetRef) -> AgentPlan {
        self.view().agent_plan(target)
    }
}
