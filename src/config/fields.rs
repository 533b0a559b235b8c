//! Helpers that walk a JSON value by hand, so every error names its field
//! and mirrord fields we do not act on become warnings.

use serde_json::{Map, Value};

use crate::model::FieldError;

pub(super) type Result<T, E = FieldError> = std::result::Result<T, E>;

/// Checks an object's field names: ours pass, mirrord's others become a
/// warning, anything else is an error that lists what is expected.
pub(super) fn check_fields(
    obj: &Map<String, Value>,
    prefix: &str,
    ours: &[&str],
    mirrord_only: &[&str],
    warnings: &mut Vec<String>,
) -> Result<()> {
    for name in obj.keys() {
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
        if ours.contains(&name.as_str()) {
            continue;
        }
        if mirrord_only.contains(&name.as_str()) {
            warnings.push(format!("{path}: mirrord field not supported by previewd yet; ignored"));
            continue;
        }
        let mut known: Vec<&str> = ours.to_vec();
        known.sort_unstable();
        if name.is_empty() {
            // Found by the fuzzer: an empty key would be named by nothing.
            let at = if prefix.is_empty() { "config" } else { prefix };
            let why = format!("a field with an empty name; expected one of: {}", known.join(", "));
            return Err(FieldError::new(at, why));
        }
        return Err(FieldError::new(path, format!("unknown field; expected one of: {}", known.join(", "))));
    }
    Ok(())
}

pub(super) fn as_object<'a>(field: &str, v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| FieldError::new(field, format!("expected an object, got {}", type_name(v))))
}

pub(super) fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    let name = field.rsplit('.').next().unwrap_or(field);
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(FieldError::new(field, format!("expected a string, got {}", type_name(other)))),
    }
}

pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
