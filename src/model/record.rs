//! Environments as previewd remembers them (the store's records) and pod
//! states as Status reports them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::db::DbBinding;
use super::key::Key;
use super::queue::QueueBinding;
use super::share::ShareLink;
use super::target::{Mode, Target, WorkloadKind};
use crate::filter::FilterSpec;

/// One environment as previewd remembers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnvRecord {
    pub key: Key,
    pub namespace: String,
    pub created_at_ms: i64,
    /// `None` never expires.
    pub expires_at_ms: Option<i64>,
    pub mode: Mode,
    /// Written before any object is created; cleared once all exist.
    pub pending: bool,
    /// The tombstone: written before Clean or expiry deletes anything, so a
    /// crash part-way finishes the delete instead of bringing it back.
    #[serde(default)]
    pub deleting: bool,
    pub pods: Vec<PodRecord>,
    /// The user who started it (per-user limits); empty in records older
    /// than authentication.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub creator: String,
    /// Its live share links.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<ShareLink>,
    /// Its split queues, recorded before any temporary topic is made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueBinding>,
    /// Its database branches, recorded before any is made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dbs: Vec<DbBinding>,
}

/// One preview pod group (one or more replicas) of an environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Name within the environment; unique per environment.
    pub group: String,
    pub target: Target,
    pub container: String,
    pub image: String,
    pub mode: Mode,
    pub filter: FilterSpec,
    pub ports: Vec<u16>,
    /// Kubernetes names of the replicas.
    pub pod_names: Vec<String>,
    /// The Pod object to create for each replica (name filled in per replica).
    pub template: serde_json::Value,
}

impl EnvRecord {
    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }

    /// The workloads its pods preview, each once (targetless pods have none).
    pub fn workloads(&self) -> BTreeSet<(WorkloadKind, &str)> {
        self.pods
            .iter()
            .filter_map(|p| match &p.target {
                Target::Workload { kind, name, .. } => Some((*kind, name.as_str())),
                Target::Targetless => None,
            })
            .collect()
    }

    /// Every replica's pod name.
    pub fn pod_names(&self) -> impl Iterator<Item = &String> {
        self.pods.iter().flat_map(|p| &p.pod_names)
    }
}

/// A preview pod's state as the Status API reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    pub phase: String,
    pub ready: bool,
    pub restarts: u32,
    pub node: String,
    pub ip: String,
    pub reason: String,
    pub last_error: String,
}
