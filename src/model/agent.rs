//! What Status says about the agent on each target pod: whether keyed
//! requests to that pod can reach the environments on its target.

/// The agent on one target pod, as previewd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentState {
    /// Being added, starting, or running but not connected to previewd yet.
    Attaching,
    /// Connected to previewd, holding its target's routes.
    Routing,
    /// Agents kept failing in the pod; no more are added.
    Failed,
    /// The pod holds the most ephemeral containers previewd adds.
    Capped,
    /// Another previewd instance's agent holds the pod.
    Foreign,
}

impl AgentState {
    /// Its name in metrics and the CLI's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Attaching => "attaching",
            AgentState::Routing => "routing",
            AgentState::Failed => "failed",
            AgentState::Capped => "capped",
            AgentState::Foreign => "foreign",
        }
    }

    /// States in which keyed requests to the pod never reach this previewd's
    /// environments, whatever happens next (Start warns about them).
    pub fn is_stuck(self) -> bool {
        matches!(self, AgentState::Failed | AgentState::Capped | AgentState::Foreign)
    }
}

/// One target pod's agent, with why it is in that state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct AgentStatus {
    /// "deployment/orders".
    pub target: String,
    pub pod: String,
    pub state: AgentState,
    pub reason: String,
}
