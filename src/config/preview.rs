//! `feature.preview`: what previewd adds to mirrord's config.

use std::time::Duration;

use serde_json::Value;

use super::fields::{Result, as_object, check_fields, opt_string};
use crate::model::{FieldError, Ttl};

const MIRRORD_PREVIEW: &[&str] = &["config_mounts", "creation_timeout_secs", "idle", "labels", "secret_mounts"];

/// More than this many copies of one preview pod is almost certainly a typo.
pub const MAX_REPLICAS: u32 = 10;

/// What `feature.preview` asks for.
#[derive(Debug, Default)]
pub(super) struct Preview {
    pub image: Option<String>,
    pub ttl: Option<Ttl>,
    pub replicas: u32,
    pub propagate_key: bool,
}

/// `feature.preview`: the image, TTL, replicas and key propagation.
pub(super) fn parse_preview(v: &Value, warnings: &mut Vec<String>) -> Result<Preview> {
    let mut cfg = Preview { propagate_key: true, replicas: 1, ..Preview::default() };
    let obj = as_object("feature.preview", v)?;
    check_fields(
        obj,
        "feature.preview",
        &["image", "ttl_mins", "ttl_secs", "replicas", "propagate_key"],
        MIRRORD_PREVIEW,
        warnings,
    )?;
    cfg.image = opt_string(obj, "feature.preview.image")?;
    if obj.contains_key("ttl_mins") && obj.contains_key("ttl_secs") {
        return Err(FieldError::new("feature.preview.ttl_secs", "set either ttl_mins or ttl_secs, not both"));
    }
    for (name, unit) in [("ttl_mins", 60u64), ("ttl_secs", 1)] {
        let field = format!("feature.preview.{name}");
        match obj.get(name) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "infinite" => cfg.ttl = Some(Ttl::Infinite),
            Some(Value::Number(n)) => {
                let n = n
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| FieldError::new(&field, "expected a positive whole number or \"infinite\""))?;
                let secs = n.checked_mul(unit).ok_or_else(|| FieldError::new(&field, "too large"))?;
                cfg.ttl = Some(Ttl::Finite(Duration::from_secs(secs)));
            }
            Some(other) => {
                return Err(FieldError::new(
                    field,
                    format!("expected a positive whole number or \"infinite\", got {other}"),
                ));
            }
        }
    }
    match obj.get("propagate_key") {
        None | Some(Value::Null) => {}
        Some(Value::Bool(b)) => cfg.propagate_key = *b,
        Some(other) => {
            return Err(FieldError::new(
                "feature.preview.propagate_key",
                format!("expected true or false, got {other}"),
            ));
        }
    }
    match obj.get("replicas") {
        None | Some(Value::Null) => {}
        Some(v) => {
            cfg.replicas = v.as_u64().filter(|n| (1..=MAX_REPLICAS as u64).contains(n)).ok_or_else(|| {
                FieldError::new("feature.preview.replicas", format!("expected a whole number from 1 to {MAX_REPLICAS}"))
            })? as u32;
        }
    }
    Ok(cfg)
}
