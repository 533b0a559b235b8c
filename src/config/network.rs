//! `feature.network.incoming`: the mode, the HTTP filter and the ports.

use serde_json::Value;

use super::fields::{Result, check_fields, opt_string, type_name};
use crate::filter::FilterSpec;
use crate::model::{FieldError, Mode};

const MIRRORD_NETWORK: &[&str] = &["dns", "ipv6", "outgoing"];
const MIRRORD_INCOMING: &[&str] = &[
    "https_delivery",
    "ignore_localhost",
    "ignore_ports",
    "listen_ports",
    "on_concurrent_steal",
    "port_mapping",
    "tls_delivery",
];
const MIRRORD_HTTP_FILTER: &[&str] = &["body_filter", "header_filter_jq"];

/// What `feature.network` asks for.
#[derive(Debug, Default)]
pub(super) struct Incoming {
    pub mode: Mode,
    /// `None` means the default key filter.
    pub filter: Option<FilterSpec>,
    /// Empty means every port of the target container.
    pub ports: Vec<u16>,
}

/// `feature.network`: how requests reach the preview pod and which ones.
pub(super) fn parse_network(v: &Value, warnings: &mut Vec<String>) -> Result<Incoming> {
    let mut cfg = Incoming::default();
    let obj = match v {
        Value::Null | Value::Bool(_) => return Ok(cfg),
        Value::Object(o) => o,
        other => {
            return Err(FieldError::new(
                "feature.network",
                format!("expected an object or boolean, got {}", type_name(other)),
            ));
        }
    };
    check_fields(obj, "feature.network", &["incoming"], MIRRORD_NETWORK, warnings)?;
    let field = "feature.network.incoming";
    match obj.get("incoming") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(cfg),
        Some(Value::String(m)) => {
            cfg.mode = parse_mode(field, m)?;
            Ok(cfg)
        }
        Some(Value::Object(inc)) => {
            check_fields(inc, field, &["mode", "http_filter", "ports"], MIRRORD_INCOMING, warnings)?;
            if let Some(m) = inc.get("mode").filter(|v| !v.is_null()) {
                let m = m
                    .as_str()
                    .ok_or_else(|| FieldError::new(format!("{field}.mode"), "expected \"steal\" or \"mirror\""))?;
                cfg.mode = parse_mode(&format!("{field}.mode"), m)?;
            }
            if let Some(ports) = inc.get("ports").filter(|v| !v.is_null()) {
                cfg.ports = parse_ports(&format!("{field}.ports"), ports)?;
            }
            match inc.get("http_filter") {
                None | Some(Value::Null) | Some(Value::Bool(_)) => {}
                Some(Value::Object(hf)) => {
                    let f = format!("{field}.http_filter");
                    check_fields(
                        hf,
                        &f,
                        &["header_filter", "path_filter", "method_filter", "all_of", "any_of", "ports"],
                        MIRRORD_HTTP_FILTER,
                        warnings,
                    )?;
                    let mut parts = Vec::new();
                    if let Some(h) = opt_string(hf, &format!("{f}.header_filter"))? {
                        parts.push(FilterSpec::Header(h));
                    }
                    if let Some(p) = opt_string(hf, &format!("{f}.path_filter"))? {
                        parts.push(FilterSpec::Path(p));
                    }
                    if let Some(m) = opt_string(hf, &format!("{f}.method_filter"))? {
                        parts.push(FilterSpec::Method(m));
                    }
                    for (name, all) in [("all_of", true), ("any_of", false)] {
                        if let Some(list) = hf.get(name).filter(|v| !v.is_null()) {
                            let inner = parse_inner_list(&format!("{f}.{name}"), list)?;
                            parts.push(if all { FilterSpec::AllOf(inner) } else { FilterSpec::AnyOf(inner) });
                        }
                    }
                    if let Some(ports) = hf.get("ports").filter(|v| !v.is_null()) {
                        cfg.ports = parse_ports(&format!("{f}.ports"), ports)?;
                    }
                    cfg.filter = match parts.len() {
                        0 => None,
                        1 => parts.pop(),
                        _ => {
                            return Err(FieldError::new(
                                f,
                                "set only one of header_filter, path_filter, method_filter, all_of, any_of (combine them with all_of)",
                            ));
                        }
                    };
                    if let Some(spec) = &cfg.filter {
                        spec.compile().map_err(|e| FieldError::new(format!("{field}.http_filter"), e))?;
                    }
                }
                Some(other) => {
                    return Err(FieldError::new(
                        format!("{field}.http_filter"),
                        format!("expected an object, got {}", type_name(other)),
                    ));
                }
            }
            Ok(cfg)
        }
        Some(other) => Err(FieldError::new(
            field,
            format!("expected \"steal\", \"mirror\" or an object, got {}", type_name(other)),
        )),
    }
}

fn parse_inner_list(field: &str, v: &Value) -> Result<Vec<FilterSpec>> {
    let list = v.as_array().ok_or_else(|| FieldError::new(field, "expected a list of filters"))?;
    if list.is_empty() {
        return Err(FieldError::new(field, "expected at least one filter"));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let f = format!("{field}[{i}]");
            let obj = item
                .as_object()
                .ok_or_else(|| FieldError::new(&f, "expected an object with one of header, path, method"))?;
            if obj.len() != 1 {
                return Err(FieldError::new(&f, "expected exactly one of header, path, method"));
            }
            let (k, v) = obj.iter().next().expect("len checked above");
            let s = v.as_str().ok_or_else(|| FieldError::new(format!("{f}.{k}"), "expected a string"))?.to_string();
            match k.as_str() {
                "header" => Ok(FilterSpec::Header(s)),
                "path" => Ok(FilterSpec::Path(s)),
                "method" => Ok(FilterSpec::Method(s)),
                other => {
                    Err(FieldError::new(format!("{f}.{other}"), "unknown filter; expected header, path or method"))
                }
            }
        })
        .collect()
}

fn parse_mode(field: &str, m: &str) -> Result<Mode> {
    match m {
        "steal" => Ok(Mode::Steal),
        "mirror" => Ok(Mode::Mirror),
        other => Err(FieldError::new(field, format!("expected \"steal\" or \"mirror\", got {other:?}"))),
    }
}

pub(super) fn parse_ports(field: &str, v: &Value) -> Result<Vec<u16>> {
    let one = |i: Option<usize>, v: &Value| -> Result<u16> {
        let f = i.map_or(field.to_string(), |i| format!("{field}[{i}]"));
        v.as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| FieldError::new(f, "expected a port number between 1 and 65535"))
    };
    match v {
        Value::Array(items) => items.iter().enumerate().map(|(i, v)| one(Some(i), v)).collect(),
        other => Ok(vec![one(None, other)?]),
    }
}
