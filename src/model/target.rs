//! What a preview pod is cloned from, and how matching requests reach it.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::field::{FieldError, validate_dns_label, validate_dns_subdomain};

/// How matching requests reach the preview pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The preview pod answers matching requests instead of the target.
    #[default]
    Steal,
    /// The target answers; the preview pod gets a copy.
    Mirror,
}

/// What a preview pod is cloned from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Target {
    /// A fresh pod from the image alone.
    Targetless,
    Workload {
        kind: WorkloadKind,
        name: String,
        container: Option<String>,
        namespace: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    ReplicaSet,
    Pod,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::StatefulSet => "statefulset",
            WorkloadKind::ReplicaSet => "replicaset",
            WorkloadKind::Pod => "pod",
        }
    }

    /// The API group and resource, as RBAC names them.
    pub fn resource(self) -> (&'static str, &'static str) {
        match self {
            WorkloadKind::Deployment => ("apps", "deployments"),
            WorkloadKind::StatefulSet => ("apps", "statefulsets"),
            WorkloadKind::ReplicaSet => ("apps", "replicasets"),
            WorkloadKind::Pod => ("", "pods"),
        }
    }
}

impl Target {
    /// Parses `deployment/NAME[/container/C]`, `statefulset/…`, `replicaset/…`,
    /// `pod/…` or `targetless`.
    pub fn parse(field: &str, s: &str) -> Result<Target, FieldError> {
        let s = s.trim();
        if s.is_empty() || s == "targetless" {
            return Ok(Target::Targetless);
        }
        let parts: Vec<&str> = s.split('/').collect();
        let expected = "expected deployment/NAME[/container/C], statefulset/…, replicaset/…, pod/… or \"targetless\"";
        let kind = match parts[0].to_ascii_lowercase().as_str() {
            "deployment" | "deploy" => WorkloadKind::Deployment,
            "statefulset" | "sts" => WorkloadKind::StatefulSet,
            "replicaset" | "rs" => WorkloadKind::ReplicaSet,
            "pod" | "po" => WorkloadKind::Pod,
            other => return Err(FieldError::new(field, format!("unknown target kind {other:?}; {expected}"))),
        };
        let (name, container) = match parts.as_slice() {
            [_, name] => (*name, None),
            [_, name, "container", c] => (*name, Some(c.to_string())),
            _ => return Err(FieldError::new(field, format!("{s:?} is malformed; {expected}"))),
        };
        validate_dns_subdomain(field, name)?;
        if let Some(c) = &container {
            validate_dns_label(&format!("{field}.container"), c, 63)?;
        }
        Ok(Target::Workload { kind, name: name.to_string(), container, namespace: None })
    }

    pub fn namespace(&self) -> Option<&str> {
        match self {
            Target::Targetless => None,
            Target::Workload { namespace, .. } => namespace.as_deref(),
        }
    }

    /// The workload's name, or "targetless".
    pub fn short_name(&self) -> &str {
        match self {
            Target::Targetless => "targetless",
            Target::Workload { name, .. } => name,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Targetless => f.write_str("targetless"),
            Target::Workload { kind, name, container: None, .. } => write!(f, "{}/{name}", kind.as_str()),
            Target::Workload { kind, name, container: Some(c), .. } => {
                write!(f, "{}/{name}/container/{c}", kind.as_str())
            }
        }
    }
}
