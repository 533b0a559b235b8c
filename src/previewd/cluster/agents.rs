//! The agents in a target pod, read from its spec and status without side
//! effects: ours by name, another previewd's by the `--server` it was given,
//! how the newest ended, and what Status says about the pod. `attach` decides
//! what to add from this; Start warns from it.

use k8s_openapi::api::core::v1::{ContainerState, Pod, PodStatus};

use crate::model::AgentState;
use crate::model::podspec::{AGENT_PREFIX, ARG_SERVER, CLEANUP_PREFIX};

/// Ephemeral containers cannot be removed; past this many of ours in one
/// pod no new agent is added, so the pod spec cannot grow without end.
pub const MAX_CONTAINERS: usize = 20;
/// After this many agents in a row failed in one pod (say its port is
/// taken), no new one is attached there; the failures are in their logs.
pub const MAX_FAILURES: usize = 3;

/// Our ephemeral containers (agents and cleanups): (index, name).
pub fn ours(pod: &Pod) -> Vec<(u32, String)> {
    let spec = pod.spec.as_ref().and_then(|s| s.ephemeral_containers.as_ref());
    spec.into_iter()
        .flatten()
        .filter_map(|c| {
            let n = c.name.strip_prefix(AGENT_PREFIX).or_else(|| c.name.strip_prefix(CLEANUP_PREFIX))?;
            Some((n.parse().ok()?, c.name.clone()))
        })
        .collect()
}

/// The current state of container `name`, when the kubelet has reported one.
pub fn state_of(status: &PodStatus, name: &str) -> Option<ContainerState> {
    status.ephemeral_container_statuses.iter().flatten().find(|s| s.name == name).and_then(|s| s.state.clone())
}

/// How many of the newest agents, counting back, ended with an error.
pub fn failures_in_a_row(pod: &Pod) -> usize {
    let status = pod.status.clone().unwrap_or_default();
    let mut agents: Vec<(u32, String)> = ours(pod).into_iter().filter(|(_, n)| n.starts_with(AGENT_PREFIX)).collect();
    agents.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    let exit = |name: &str| state_of(&status, name).and_then(|s| s.terminated).map(|t| t.exit_code);
    // Killed by a signal (SIGKILL: 137) is not the agent failing to start.
    agents.iter().take_while(|(_, n)| exit(n).is_some_and(|c| c != 0 && c < 128)).count()
}

/// A running agent that another previewd added (its `--server` is not
/// `server`): (container, that server).
pub fn foreign_agent(pod: &Pod, server: &str) -> Option<(String, String)> {
    let status = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.as_ref().and_then(|s| s.ephemeral_containers.as_ref());
    spec.into_iter().flatten().filter(|c| c.name.starts_with(AGENT_PREFIX)).find_map(|c| {
        let args = c.args.as_deref().unwrap_or_default();
        let theirs = args.iter().position(|a| a == ARG_SERVER).and_then(|i| args.get(i + 1))?;
        let running = state_of(&status, &c.name).is_some_and(|s| s.running.is_some());
        (running && theirs != server).then(|| (c.name.clone(), theirs.clone()))
    })
}

/// What Status says about the agent of a running target pod (`None`: the
/// pod is not running, so it takes no traffic). `Routing` here means "a live
/// agent of ours"; the caller knows whether it is connected yet.
pub fn pod_agent(pod: &Pod, server: &str) -> Option<(AgentState, String)> {
    let status = pod.status.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some()
        || status.phase.as_deref() != Some("Running")
        || status.pod_ip.as_deref().unwrap_or("").is_empty()
    {
        return None;
    }
    if let Some((c, theirs)) = foreign_agent(pod, server) {
        let why = format!(
            "container {c} is another previewd's agent (--server {theirs}); this previewd's routes cannot reach the pod"
        );
        return Some((AgentState::Foreign, why));
    }
    let ours = ours(pod);
    let capped = || {
        let why = format!(
            "the pod holds {} of previewd's ephemeral containers, the most it adds (they cannot be removed); \
             no agent until the pod is replaced",
            ours.len()
        );
        Some((AgentState::Capped, why))
    };
    let Some((_, latest)) = ours.iter().max_by_key(|(i, _)| *i) else {
        return Some((AgentState::Attaching, "no agent yet".into()));
    };
    let state = state_of(&status, latest).unwrap_or_default();
    if latest.starts_with(CLEANUP_PREFIX) && state.terminated.is_none() {
        return Some((AgentState::Attaching, format!("{latest} is removing rules a killed agent left")));
    }
    let Some((_, agent)) = ours.iter().filter(|(_, n)| n.starts_with(AGENT_PREFIX)).max_by_key(|(i, _)| *i) else {
        return if ours.len() >= MAX_CONTAINERS {
            capped()
        } else {
            Some((AgentState::Attaching, "no agent yet".into()))
        };
    };
    let state = state_of(&status, agent).unwrap_or_default();
    if state.running.is_some() {
        return Some((AgentState::Routing, String::new()));
    }
    let Some(done) = state.terminated else {
        return Some((AgentState::Attaching, format!("{agent} is starting")));
    };
    let exit = format!(
        "exit code {}{}{}",
        done.exit_code,
        done.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
        done.message.map(|m| format!(": {}", last_line(&m))).unwrap_or_default()
    );
    let failures = failures_in_a_row(pod);
    if failures >= MAX_FAILURES {
        return Some((AgentState::Failed, format!("{failures} agents in a row failed; the last, {agent}: {exit}")));
    }
    if ours.len() >= MAX_CONTAINERS {
        return capped();
    }
    Some((AgentState::Attaching, format!("{agent} ended ({exit}); another is being added")))
}

/// The last non-empty line of a termination message (the agent's last log line).
fn last_line(m: &str) -> &str {
    m.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("")
}
