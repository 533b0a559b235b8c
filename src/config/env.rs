//! `feature.env`: environment overrides for the preview container.

use std::collections::BTreeMap;

use serde_json::Value;

use super::fields::{Result, as_object, check_fields, type_name};
use crate::model::FieldError;

const MIRRORD_ENV: &[&str] = &["env_file", "exclude", "include", "load_from_process", "mapping", "unset"];

/// `feature.env.override`: variables set in the preview container.
pub(super) fn parse_env(v: &Value, warnings: &mut Vec<String>) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let obj = match v {
        Value::Null | Value::Bool(_) => return Ok(env),
        Value::Object(o) => o,
        other => {
            return Err(FieldError::new(
                "feature.env",
                format!("expected an object or boolean, got {}", type_name(other)),
            ));
        }
    };
    check_fields(obj, "feature.env", &["override"], MIRRORD_ENV, warnings)?;
    if let Some(ov) = obj.get("override").filter(|v| !v.is_null()) {
        let ov = as_object("feature.env.override", ov)?;
        for (name, value) in ov {
            let field = format!("feature.env.override.{name}");
            if name.is_empty() || name.contains('=') {
                return Err(FieldError::new(field, "not a valid environment variable name"));
            }
            let value = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => return Err(FieldError::new(field, format!("expected a string, got {}", type_name(other)))),
            };
            env.insert(name.clone(), value);
        }
    }
    Ok(env)
}
