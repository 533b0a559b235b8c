//! Cluster operations, through kube-rs: reading targets (`targets`), the
//! agents in a target pod (`agents`, pure functions),
//! building preview pods (`pods`, pure functions), the owner objects and
//! deletes by label (`objects`), pod states (`state`) and the pod watch
//! (`watch`), and the QueueSplits and target restarts of queue splitting
//! (`queuesplits`). Names and labels are in `names`.

pub mod agents;
pub mod dbservers;
pub mod names;
pub mod objects;
pub mod pods;
pub mod queuesplits;
pub mod services;
pub mod state;
mod targets;
pub mod watch;

use std::collections::BTreeMap;

use ::kube::Client;

use names::{LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGER, labels};

/// What went wrong talking to the cluster, or what the cluster lacks.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("namespace {0:?} does not exist")]
    NamespaceNotFound(String),
    #[error("{target} not found in namespace {namespace:?}")]
    TargetNotFound { target: String, namespace: String },
    #[error("{target} has no container {container:?}; it has: {available}")]
    ContainerNotFound { target: String, container: String, available: String },
    #[error("{target} has no containers")]
    NoContainers { target: String },
    #[error("kubernetes API: {action}: {}", short(source))]
    Api { action: String, source: ::kube::Error },
}

/// An API server refusal as its message and code (the whole Status object,
/// as kube prints it, buries the message in Status and logs).
fn short(e: &::kube::Error) -> String {
    match e {
        ::kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

impl KubeError {
    pub(super) fn api(action: impl Into<String>) -> impl FnOnce(::kube::Error) -> KubeError {
        let action = action.into();
        move |source| KubeError::Api { action, source }
    }
}

pub(super) fn is_status(e: &::kube::Error, code: u16) -> bool {
    matches!(e, ::kube::Error::Api(s) if s.code == code)
}

/// A kube client and the settings every cluster operation shares.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// Forces this pull policy on preview containers (e.g. "Never" on a registry-less cluster).
    pub pull_policy: Option<String>,
    /// This previewd's instance name; it only sees objects labelled with it.
    pub instance: String,
    /// The preview-agent image; without it no agent is attached or added.
    pub agent_image: Option<String>,
    /// The URL our agents are given: an agent given another is another
    /// previewd's.
    pub agent_server: Option<String>,
    /// The CA agents trust to reach previewd over TLS (with TLS only).
    pub agent_ca: Option<String>,
    /// previewd's key: it signs the records kept in PreviewEnvironments
    /// (`--adopt` checks them) and makes agents' proofs of their pod.
    pub signer: Option<crate::previewd::auth::proof::Prover>,
    /// What branch servers' containers ask for and may use.
    pub db_resources: dbservers::ServerResources,
}

impl Cluster {
    pub fn new(client: Client, pull_policy: Option<String>, instance: String, agent_image: Option<String>) -> Self {
        Cluster {
            client,
            pull_policy,
            instance,
            agent_image,
            agent_server: None,
            agent_ca: None,
            signer: None,
            db_resources: Default::default(),
        }
    }

    pub fn with_db_resources(mut self, r: dbservers::ServerResources) -> Self {
        self.db_resources = r;
        self
    }

    pub fn with_agent_server(mut self, server: Option<String>) -> Self {
        self.agent_server = server;
        self
    }

    /// Agents get this CA to trust (with TLS), and a proof of their pod
    /// from `prover`, whose key also signs the records.
    pub fn with_agent_trust(mut self, ca_pem: Option<String>, prover: crate::previewd::auth::proof::Prover) -> Self {
        self.signer = Some(prover);
        self.agent_ca = ca_pem;
        self
    }

    /// Label selector for everything this instance manages, plus `extra`.
    pub fn selector(&self, extra: &str) -> String {
        let base = format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_INSTANCE}={}", self.instance);
        if extra.is_empty() { base } else { format!("{base},{extra}") }
    }

    pub fn labels(&self, key: &str, role: &str) -> BTreeMap<String, String> {
        let mut l = labels(key, role);
        l.insert(LABEL_INSTANCE.into(), self.instance.clone());
        l
    }
}
