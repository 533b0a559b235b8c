//! `feature.preview`: what previewd adds to mirrord's config.

use std::time::Duration;

use serde_json::Value;

use super::fields::{Result, as_object, check_fields, opt_string};
use crate::model::share::{ShareSpec, validate_staging_url};
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
    pub share: Option<ShareSpec>,
}

/// `feature.preview`: the image, TTL, replicas and key propagation.
pub(super) fn parse_preview(v: &Value, warnings: &mut Vec<String>) -> Result<Preview> {
    let mut cfg = Preview { propagate_key: true, replicas: 1, ..Preview::default() };
    let obj = as_object("feature.preview", v)?;
    check_fields(
        obj,
        "feature.preview",
        &["image", "ttl_mins", "ttl_secs", "replicas", "propagate_key", "share"],
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
    cfg.share = match obj.get("share") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(v) => Some(parse_share(v)?),
    };
    Ok(cfg)
}

/// `feature.preview.share`: `true`, or `{service, port, ttl, staging_url}`.
fn parse_share(v: &Value) -> Result<ShareSpec> {
    const F: &str = "feature.preview.share";
    if *v == Value::Bool(true) {
        return Ok(ShareSpec::default());
    }
    let obj = as_object(F, v)?;
    check_fields(obj, F, &["service", "port", "ttl", "staging_url"], &[], &mut Vec::new())?;
    let port =
        match obj.get("port") {
            None | Some(Value::Null) => 0,
            Some(p) => p.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0).ok_or_else(|| {
                FieldError::new(format!("{F}.port"), format!("expected a port from 1 to 65535, got {p}"))
            })?,
        };
    let ttl = match opt_string(obj, &format!("{F}.ttl"))? {
        Some(t) => Some(Ttl::parse(&format!("{F}.ttl"), &t)?),
        None => None,
    };
    let staging_url = opt_string(obj, &format!("{F}.staging_url"))?.unwrap_or_default();
    validate_staging_url(&format!("{F}.staging_url"), &staging_url)?;
    Ok(ShareSpec { service: opt_string(obj, &format!("{F}.service"))?.unwrap_or_default(), port, ttl, staging_url })
}
