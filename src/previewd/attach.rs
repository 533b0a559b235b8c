//! Attaching `preview-agent` to the pods of every target an environment
//! previews, as ephemeral containers, so staging pods are never restarted.
//!
//! One task per target watches the target's pods. For each running pod it
//! looks at our newest ephemeral container and decides (in [`next_action`]):
//! attach an agent when routes exist and none is live; after an agent died
//! abnormally, run `preview-agent cleanup` first; otherwise nothing. An agent
//! serves every environment on its target. When previewd sends it an empty
//! route set it removes its redirects and lingers idle (`--agent-linger`), so the
//! next environment on the target reuses it instead of adding a container.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::{WatchStreamExt, watcher};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::model::podspec::{AGENT_PREFIX, CLEANUP_PREFIX};
use crate::previewd::cluster::agents;
use crate::previewd::cluster::pods::{agent_args, agent_container, cleanup_args};
use crate::previewd::manager::{AgentPlan, Manager, PodAgents, Selector, TargetRef};

pub use crate::previewd::cluster::agents::{MAX_CONTAINERS, MAX_FAILURES};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Attach(String),
    Cleanup(String),
}

/// What to do next for one target pod. `want_agent`: routes exist for it.
/// The cap stops new agents only: rules a killed agent left are always
/// cleaned up, or the pod's redirect would point at a dead port.
pub fn next_action(pod: &Pod, want_agent: bool) -> Action {
    let status = pod.status.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some()
        || status.phase.as_deref() != Some("Running")
        || status.pod_ip.as_deref().unwrap_or("").is_empty()
    {
        return Action::None;
    }
    let spec = pod.spec.as_ref().map(|s| s.ephemeral_containers.clone().unwrap_or_default()).unwrap_or_default();
    let ours = agents::ours(pod);
    let next_index = ours.iter().map(|(n, _)| n + 1).max().unwrap_or(1);
    let name = |prefix: &str| {
        let mut i = next_index;
        // Someone else's container could hold the name; skip past it.
        while spec.iter().any(|c| c.name == format!("{prefix}{i}")) {
            i += 1;
        }
        format!("{prefix}{i}")
    };
    let room = ours.len() < MAX_CONTAINERS;
    let Some((_, latest)) = ours.iter().max_by_key(|(n, _)| *n) else {
        return if want_agent && room { Action::Attach(name(AGENT_PREFIX)) } else { Action::None };
    };
    // Not started yet, waiting or running: it is live (or about to be).
    let Some(done) = agents::state_of(&status, latest).and_then(|s| s.terminated) else { return Action::None };
    if latest.starts_with(AGENT_PREFIX) && done.exit_code != 0 {
        // An agent killed hard can leave its rules behind: clean up first.
        return Action::Cleanup(name(CLEANUP_PREFIX));
    }
    if want_agent && room && agents::failures_in_a_row(pod) < MAX_FAILURES {
        Action::Attach(name(AGENT_PREFIX))
    } else {
        Action::None
    }
}

/// Runs the per-target tasks for as long as previewd runs, with the agent
/// image the cluster was configured with (none: nothing to attach).
pub async fn run(manager: Arc<Manager>, server: String, linger: Duration) {
    let Some(image) = manager.cluster().agent_image.clone() else { return };
    let mut tasks: HashMap<TargetRef, JoinHandle<()>> = HashMap::new();
    let (_, mut events) = manager.subscribe(&Selector::default());
    loop {
        tasks.retain(|_, t| !t.is_finished());
        for t in manager.targets() {
            let (m, i, s) = (manager.clone(), image.clone(), server.clone());
            tasks.entry(t.clone()).or_insert_with(|| tokio::spawn(watch_target(m, t, i, s, linger)));
        }
        match events.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Watches one target's pods and keeps an agent on each while the target is
/// previewed; ends when no environment previews it any more. What it reads
/// about each pod's agent goes to Status.
async fn watch_target(manager: Arc<Manager>, target: TargetRef, image: String, server: String, linger: Duration) {
    watch_pods(&manager, &target, image, server, linger).await;
    manager.set_pod_agents(&target, PodAgents::new());
}

async fn watch_pods(manager: &Arc<Manager>, target: &TargetRef, image: String, server: String, linger: Duration) {
    let (ns, kind, name) = target;
    let cluster = manager.cluster().clone();
    let selector = loop {
        match cluster.target_selector(ns, *kind, name).await {
            Ok(Some(s)) => break s,
            Ok(None) => {
                tracing::warn!(namespace = %ns, target = %format!("{}/{name}", kind.as_str()), "target gone; no agents attached");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "reading the target's selector; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        if !manager.targets().contains(target) {
            return;
        }
    };
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let mut cfg = watcher::Config::default().labels(&selector.0);
    if !selector.1.is_empty() {
        cfg = cfg.fields(&selector.1);
    }
    let mut pods_events = watcher(api.clone(), cfg).default_backoff().boxed();
    let (_, mut events) = manager.subscribe(&Selector::default());
    let mut pods: BTreeMap<String, Pod> = BTreeMap::new();
    // A slow tick as well: a failed patch is retried without waiting for an event.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tracing::info!(namespace = %ns, target = %format!("{}/{name}", kind.as_str()), "watching target pods");
    loop {
        let only: Option<String> = tokio::select! {
            ev = pods_events.next() => match ev {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                    let n = p.metadata.name.clone().unwrap_or_default();
                    pods.insert(n.clone(), p);
                    Some(n)
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    pods.remove(p.metadata.name.as_deref().unwrap_or_default());
                    continue;
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    tracing::warn!(namespace = %ns, error = %e, "target pod watch failed; retrying");
                    continue;
                }
                None => return,
            },
            ev = events.recv() => match ev {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => None,
        };
        let plan = manager.agent_plan(target);
        let want = matches!(plan, AgentPlan::Route(_));
        let names: Vec<String> = match only {
            Some(n) => vec![n],
            None => pods.keys().cloned().collect(),
        };
        for pod_name in names {
            let Some(pod) = pods.get(&pod_name) else { continue };
            let (container, args) = match next_action(pod, want) {
                Action::None => continue,
                Action::Attach(c) => (c, agent_args(&server, linger)),
                Action::Cleanup(c) => (c, cleanup_args()),
            };
            // With TLS: the CA to trust, and the proof of this pod.
            let trust = cluster.agent_ca.as_deref().zip(cluster.signer.as_ref()).map(|(ca, key)| {
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                (ca, key.proof(ns, &pod_name, uid))
            });
            let ec = agent_container(&container, &image, args, &pod_name, ns, cluster.pull_policy.as_deref(), trust);
            let patch = serde_json::json!({"spec": {"ephemeralContainers": [ec]}});
            match api.patch_ephemeral_containers(&pod_name, &PatchParams::default(), &Patch::Strategic(patch)).await {
                Ok(p) => {
                    tracing::info!(pod = %pod_name, namespace = %ns, %container, "added");
                    // The answer already has the container: no second patch on the next event.
                    pods.insert(pod_name, p);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod_name, %container, error = %e, "adding an ephemeral container failed")
                }
            }
        }
        let states = pods.iter().filter_map(|(n, p)| Some((n.clone(), agents::pod_agent(p, &server)?))).collect();
        manager.set_pod_agents(target, states);
        if plan == AgentPlan::Leave {
            // Agents got an empty route set: they drop their rules and
            // linger idle, for the next environment on the target.
            tracing::info!(namespace = %ns, target = %format!("{}/{name}", kind.as_str()), "no longer previewed");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStatus, EphemeralContainer, PodSpec,
        PodStatus,
    };

    fn pod(containers: &[(&str, Option<i32>)]) -> Pod {
        Pod {
            spec: Some(PodSpec {
                ephemeral_containers: Some(
                    containers
                        .iter()
                        .map(|(n, _)| EphemeralContainer { name: n.to_string(), ..Default::default() })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some("198.18.0.9".into()),
                ephemeral_container_statuses: Some(
                    containers
                        .iter()
                        .map(|(n, exit)| ContainerStatus {
                            name: n.to_string(),
                            state: Some(match exit {
                                None => ContainerState {
                                    running: Some(ContainerStateRunning::default()),
                                    ..Default::default()
                                },
                                Some(code) => ContainerState {
                                    terminated: Some(ContainerStateTerminated {
                                        exit_code: *code,
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                },
                            }),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Three agents in a row that exited 1 (say, a taken port), each cleaned up after.
    fn failing() -> Pod {
        pod(&[
            ("preview-agent-1", Some(1)),
            ("preview-cleanup-2", Some(0)),
            ("preview-agent-3", Some(1)),
            ("preview-cleanup-4", Some(0)),
            ("preview-agent-5", Some(1)),
            ("preview-cleanup-6", Some(0)),
        ])
    }

    /// As many ended agents as the cap allows.
    fn at_cap() -> Vec<(String, Option<i32>)> {
        (1..=MAX_CONTAINERS).map(|i| (format!("preview-agent-{i}"), Some(0))).collect()
    }

    #[test]
    fn the_agent_lifecycle() {
        use Action::*;
        assert_eq!(next_action(&pod(&[]), true), Attach("preview-agent-1".into()));
        assert_eq!(next_action(&pod(&[]), false), None);
        // A live agent is reused.
        assert_eq!(next_action(&pod(&[("preview-agent-1", Option::None)]), true), None);
        // A clean exit (no routes left) and routes again: a fresh agent.
        assert_eq!(next_action(&pod(&[("preview-agent-1", Some(0))]), true), Attach("preview-agent-2".into()));
        assert_eq!(next_action(&pod(&[("preview-agent-1", Some(0))]), false), None);
        // Killed: cleanup first, whether or not routes remain, then a new agent.
        assert_eq!(next_action(&pod(&[("preview-agent-1", Some(137))]), false), Cleanup("preview-cleanup-2".into()));
        let cleaning = pod(&[("preview-agent-1", Some(137)), ("preview-cleanup-2", Option::None)]);
        assert_eq!(next_action(&cleaning, true), None);
        let cleaned = pod(&[("preview-agent-1", Some(137)), ("preview-cleanup-2", Some(0))]);
        assert_eq!(next_action(&cleaned, true), Attach("preview-agent-3".into()));
        // Other people's debug containers are left alone and never reused.
        let debug = pod(&[("debugger", Option::None), ("preview-agent-1", Some(0))]);
        assert_eq!(next_action(&debug, true), Attach("preview-agent-2".into()));
        // Agents that keep failing (exit 1: say the port is taken) stop being added.
        let failing = failing();
        assert_eq!(next_action(&failing, true), None);
        // Killed ones (137) do not count: they are re-attached.
        let killed = pod(&[
            ("preview-agent-1", Some(137)),
            ("preview-cleanup-2", Some(0)),
            ("preview-agent-3", Some(137)),
            ("preview-cleanup-4", Some(0)),
            ("preview-agent-5", Some(137)),
            ("preview-cleanup-6", Some(0)),
        ]);
        assert_eq!(next_action(&killed, true), Attach("preview-agent-7".into()));
        // Not running: nothing.
        let mut pending = pod(&[]);
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(next_action(&pending, true), None);
        // The cap.
        let many = at_cap();
        let many: Vec<(&str, Option<i32>)> = many.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(next_action(&pod(&many), true), None);
        // At the cap, a killed agent's rules are still cleaned up.
        let mut killed_at_cap = many.clone();
        killed_at_cap[MAX_CONTAINERS - 1].1 = Some(137);
        let cleanup = format!("preview-cleanup-{}", MAX_CONTAINERS + 1);
        assert_eq!(next_action(&pod(&killed_at_cap), true), Cleanup(cleanup));
    }

    #[test]
    fn what_status_says_about_each_pod() {
        use crate::model::AgentState::*;
        let state = |p: &Pod| agents::pod_agent(p, "http://us:7443").map(|(s, _)| s);
        assert_eq!(state(&pod(&[])), Some(Attaching));
        assert_eq!(state(&pod(&[("preview-agent-1", Option::None)])), Some(Routing));
        assert_eq!(state(&pod(&[("preview-agent-1", Some(0))])), Some(Attaching));
        let failing = failing();
        let (st, why) = agents::pod_agent(&failing, "http://us:7443").unwrap();
        assert_eq!(st, Failed);
        assert!(why.contains("3 agents in a row failed") && why.contains("exit code 1"), "{why}");
        let many = at_cap();
        let many: Vec<(&str, Option<i32>)> = many.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        let (st, why) = agents::pod_agent(&pod(&many), "http://us:7443").unwrap();
        assert_eq!(st, Capped);
        assert!(why.contains("20 of previewd's ephemeral containers"), "{why}");
        // A running agent given another server is another previewd's.
        let mut theirs = pod(&[("preview-agent-1", Option::None)]);
        let ec = &mut theirs.spec.as_mut().unwrap().ephemeral_containers.as_mut().unwrap()[0];
        ec.args = Some(agent_args("http://them:7443", Duration::from_secs(600)));
        let (st, why) = agents::pod_agent(&theirs, "http://us:7443").unwrap();
        assert_eq!(st, Foreign);
        assert!(why.contains("http://them:7443"), "{why}");
        assert_eq!(agents::pod_agent(&theirs, "http://them:7443").map(|(s, _)| s), Some(Routing));
        // A pod that is not running takes no traffic: not listed.
        let mut pending = pod(&[]);
        pending.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(state(&pending), Option::None);
    }
}
