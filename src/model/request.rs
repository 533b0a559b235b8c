//! What clients ask previewd for, as plain data (the API layer converts the
//! protobuf messages in `wire`), and what Status shows back.

use std::collections::BTreeMap;

use super::agent::AgentStatus;
use super::key::Key;
use super::record::{EnvRecord, PodState};
use super::share::ShareSpec;

/// One preview pod to create. Empty strings mean "not given".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodRequest {
    /// The user's config file, JSON or YAML, in mirrord's shape.
    pub config: String,
    pub image: String,
    pub target: String,
    pub namespace: String,
    pub name: String,
}

/// Start (or extend) an environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartRequest {
    pub pods: Vec<PodRequest>,
    pub key: String,
    pub ttl: String,
}

/// An environment as Status shows it: its record and the state of each
/// replica seen so far (by pod name).
#[derive(Debug, Clone, PartialEq)]
pub struct EnvStatus {
    pub record: EnvRecord,
    pub pods: BTreeMap<String, PodState>,
    /// Why it is FAILED (recovery or expiry failed and is being retried, or
    /// its record is unreadable); `None` when all is well.
    pub failure: Option<String>,
    /// The agent on each running pod of its targets.
    pub agents: Vec<AgentStatus>,
    /// Each split queue's figures, by the environment's topic.
    pub queues: BTreeMap<String, QueueStats>,
    /// Each database branch's state, by its database's name.
    pub dbs: BTreeMap<String, DbStats>,
}

/// A database branch as last seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbStats {
    /// `Creating` until it is ready, or `Failed` with `reason`.
    pub phase: DbPhase,
    pub reason: String,
    /// Its size on the branch server; -1 when unknown.
    pub size_bytes: i64,
    /// When the snapshot it was cloned from was taken.
    pub snapshot_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DbPhase {
    #[default]
    Creating,
    Ready,
    Failed,
}

impl DbPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            DbPhase::Creating => "Creating",
            DbPhase::Ready => "Ready",
            DbPhase::Failed => "Failed",
        }
    }
}

/// A split queue's figures as last read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Records the splitter forwarded to the environment since it started.
    pub forwarded: u64,
    /// Offsets of the environment's topic past the group's committed ones
    /// (transaction markers count too); -1 when unknown.
    pub lag: i64,
}

impl EnvStatus {
    pub fn new(record: EnvRecord) -> EnvStatus {
        EnvStatus {
            record,
            pods: BTreeMap::new(),
            failure: None,
            agents: Vec::new(),
            queues: BTreeMap::new(),
            dbs: BTreeMap::new(),
        }
    }
}

/// What Start and AddPod answer.
#[derive(Debug, Clone)]
pub struct Started {
    pub key: Key,
    pub environment: EnvStatus,
    /// Config fields accepted but not acted on.
    pub warnings: Vec<String>,
    /// A link the config asks for (`feature.preview.share`).
    pub share: Option<ShareSpec>,
}

/// One environment removed by Clean: its key and the objects deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleaned {
    pub key: Key,
    pub objects: Vec<String>,
}
