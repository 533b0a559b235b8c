//! The labels, annotations and object names previewd puts on what it
//! creates: every object carries the key label, so the cluster alone is
//! enough to rebuild or clean state.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub const LABEL_KEY: &str = "preview.dev/key";
pub const LABEL_ROLE: &str = "preview.dev/role";
pub const LABEL_GROUP: &str = "preview.dev/group";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Which previewd owns an object: several can share a cluster.
pub const LABEL_INSTANCE: &str = "preview.dev/instance";
pub const MANAGER: &str = "previewd";
pub const ROLE_POD: &str = "pod";
pub const ROLE_ENV: &str = "env";
pub const ANNOTATION_TARGET: &str = "preview.dev/target";
pub const ANNOTATION_CONTAINER: &str = "preview.dev/container";
/// A readiness gate nobody sets: the pod never turns Ready, so the target
/// Service's EndpointSlices never send it unfiltered traffic.
pub const READINESS_GATE: &str = "preview.dev/routed";

/// A LabelSelector as a list-call selector string, excluding preview pods.
pub fn label_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.push(format!("!{LABEL_KEY}"));
    parts.join(",")
}

pub fn owner_name(key: &str) -> String {
    format!("preview-env-{key}")
}

pub fn labels(key: &str, role: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_KEY.to_string(), key.to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
    ])
}
