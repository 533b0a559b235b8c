//! `target`: a path string (`deployment/orders/container/app`), or an object
//! with `path` (a string or `{deployment: …, container: …}`) and `namespace`.

use serde_json::{Map, Value};

use super::fields::{Result, check_fields, opt_string, type_name};
use crate::model::{FieldError, Target, WorkloadKind, validate_dns_label, validate_dns_subdomain};

/// The `target` field; absent means targetless.
pub(super) fn parse_target(v: Option<&Value>, warnings: &mut Vec<String>) -> Result<Target> {
    Ok(match v {
        None | Some(Value::Null) => Target::Targetless,
        Some(Value::String(s)) => Target::parse("target", s)?,
        Some(Value::Object(obj)) => {
            check_fields(obj, "target", &["path", "namespace"], &[], warnings)?;
            let namespace = opt_string(obj, "target.namespace")?;
            if let Some(ns) = &namespace {
                validate_dns_label("target.namespace", ns, 63)?;
            }
            let mut t = match obj.get("path") {
                None | Some(Value::Null) => Target::Targetless,
                Some(Value::String(s)) => Target::parse("target.path", s)?,
                Some(Value::Object(p)) => target_object("target.path", p)?,
                Some(other) => {
                    return Err(FieldError::new(
                        "target.path",
                        format!("expected a string or object, got {}", type_name(other)),
                    ));
                }
            };
            if let Target::Workload { namespace: n, .. } = &mut t {
                *n = namespace;
            }
            t
        }
        Some(other) => {
            return Err(FieldError::new("target", format!("expected a string or object, got {}", type_name(other))));
        }
    })
}

fn target_object(field: &str, p: &Map<String, Value>) -> Result<Target> {
    let kinds = [
        ("deployment", WorkloadKind::Deployment),
        ("statefulset", WorkloadKind::StatefulSet),
        ("replicaset", WorkloadKind::ReplicaSet),
        ("pod", WorkloadKind::Pod),
    ];
    for (k, kind) in kinds {
        if let Some(v) = p.get(k) {
            let name = v.as_str().ok_or_else(|| FieldError::new(format!("{field}.{k}"), "expected a string"))?;
            validate_dns_subdomain(&format!("{field}.{k}"), name)?;
            let container = opt_string(p, &format!("{field}.container"))?;
            for other in p.keys() {
                if other != k && other != "container" {
                    return Err(FieldError::new(format!("{field}.{other}"), format!("unexpected field beside {k}")));
                }
            }
            return Ok(Target::Workload { kind, name: name.to_string(), container, namespace: None });
        }
    }
    Err(FieldError::new(
        field,
        "expected one of deployment, statefulset, replicaset or pod (with an optional container)",
    ))
}
