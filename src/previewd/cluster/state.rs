//! A preview pod's state, as Status reports it, read from the Pod object.

use ::kube::ResourceExt;
use k8s_openapi::api::core::v1::Pod;

use super::names::ANNOTATION_CONTAINER;
use crate::model::PodState;

pub fn pod_state(pod: &Pod) -> PodState {
    let container = pod.annotations().get(ANNOTATION_CONTAINER).cloned().unwrap_or_default();
    let status = pod.status.clone().unwrap_or_default();
    let mut st = PodState {
        phase: status.phase.clone().unwrap_or_else(|| "Pending".into()),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        ip: status.pod_ip.clone().unwrap_or_default(),
        ..Default::default()
    };
    if pod.metadata.deletion_timestamp.is_some() {
        st.reason = "Terminating".into();
        return st;
    }
    let cs = status.container_statuses.iter().flatten().find(|c| c.name == container);
    match cs {
        Some(cs) => {
            st.ready = cs.ready;
            st.restarts = u32::try_from(cs.restart_count).unwrap_or(0);
            let state = cs.state.clone().unwrap_or_default();
            if let Some(w) = state.waiting {
                st.reason = w.reason.unwrap_or_else(|| "Waiting".into());
                if let Some(m) = w.message.filter(|m| !m.is_empty()) {
                    st.last_error = format!("{}: {m}", st.reason);
                }
            } else if let Some(t) = state.terminated {
                st.reason = t.reason.unwrap_or_else(|| "Terminated".into());
                st.last_error = format!("{} (exit code {})", st.reason, t.exit_code);
            } else if cs.ready {
                st.reason = "Ready".into();
            } else {
                st.reason = "Running".into();
            }
            if st.last_error.is_empty()
                && let Some(t) = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref())
            {
                st.last_error = format!("{} (exit code {})", t.reason.as_deref().unwrap_or("Terminated"), t.exit_code);
            }
        }
        None => {
            let unscheduled =
                status.conditions.iter().flatten().find(|c| c.type_ == "PodScheduled" && c.status == "False");
            match unscheduled {
                Some(c) => {
                    st.reason = c.reason.clone().unwrap_or_else(|| "Unschedulable".into());
                    st.last_error = c.message.clone().unwrap_or_default();
                }
                None => st.reason = if st.node.is_empty() { "Pending".into() } else { "ContainerCreating".into() },
            }
        }
    }
    st
}
