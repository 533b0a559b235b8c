//! The user's config file: the subset of mirrord's config that applies to
//! preview environments, in mirrord's own shape, plus keys and TTLs.
//!
//! Parsing walks a `serde_json::Value` by hand so that every error names the
//! field it is about, known-but-unsupported mirrord fields become warnings and
//! anything else is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::filter::FilterSpec;

/// A config problem, always tied to the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

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
}

impl Target {
    /// Parses `deployment/NAME[/container/C]`, `statefulset/…`, `replicaset/…`,
    /// `pod/…` or `targetless`.
    pub fn parse(field: &str, s: &str) -> Result<Target> {
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
            other => return Err(ConfigError::new(field, format!("unknown target kind {other:?}; {expected}"))),
        };
        let (name, container) = match parts.as_slice() {
            [_, name] => (*name, None),
            [_, name, "container", c] => (*name, Some(c.to_string())),
            _ => return Err(ConfigError::new(field, format!("{s:?} is malformed; {expected}"))),
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

/// How long an environment lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ttl {
    Finite(Duration),
    Infinite,
}

impl Ttl {
    /// Parses `90s`, `30m`, `2h`, `1d`, `1h30m`, a bare number of minutes, or `infinite`.
    pub fn parse(field: &str, s: &str) -> Result<Ttl> {
        let s = s.trim();
        let bad = || {
            ConfigError::new(field, format!("{s:?} is not a TTL; expected e.g. 90s, 30m, 2h, 1h30m or \"infinite\""))
        };
        if s.eq_ignore_ascii_case("infinite") {
            return Ok(Ttl::Infinite);
        }
        if s.is_empty() {
            return Err(bad());
        }
        if let Ok(mins) = s.parse::<u64>() {
            return Ttl::from_secs(field, mins.checked_mul(60).ok_or_else(bad)?);
        }
        let mut total: u64 = 0;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(bad()),
            };
            let n: u64 = num.parse().map_err(|_| bad())?;
            total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
            num.clear();
        }
        if !num.is_empty() {
            return Err(bad());
        }
        Ttl::from_secs(field, total)
    }

    fn from_secs(field: &str, secs: u64) -> Result<Ttl> {
        if secs == 0 {
            return Err(ConfigError::new(field, "a TTL must be longer than zero"));
        }
        Ok(Ttl::Finite(Duration::from_secs(secs)))
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ttl::Infinite => f.write_str("infinite"),
            Ttl::Finite(d) => {
                let s = d.as_secs();
                match (s / 3600, (s % 3600) / 60, s % 60) {
                    (0, 0, sec) => write!(f, "{sec}s"),
                    (0, m, 0) => write!(f, "{m}m"),
                    (h, 0, 0) => write!(f, "{h}h"),
                    (h, m, sec) => write!(f, "{h}h{m}m{sec}s"),
                }
            }
        }
    }
}

/// One pod's worth of the user's config, after parsing and templating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodConfig {
    pub key: Option<String>,
    pub target: Target,
    pub mode: Mode,
    /// `None` means the default key filter (baggage `preview-key` or `x-preview-key`).
    pub filter: Option<FilterSpec>,
    /// Ports to route; empty means every port of the target container.
    pub ports: Vec<u16>,
    pub env: BTreeMap<String, String>,
    pub image: Option<String>,
    pub ttl: Option<Ttl>,
    pub replicas: u32,
    /// Put the key in `PREVIEW_KEY` and in the `baggage` of the pod's
    /// outgoing HTTP requests (`feature.preview.propagate_key`, default on).
    #[serde(default = "yes")]
    pub propagate_key: bool,
    /// Known mirrord fields that previewd accepts but does not act on.
    pub warnings: Vec<String>,
}

/// Reads a JSON or YAML document. Malformed input names the format and position.
pub fn parse_document(text: &str) -> Result<Value> {
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    if trimmed.starts_with('{') {
        return serde_json::from_str(text).map_err(|e| ConfigError::new("config", format!("malformed JSON: {e}")));
    }
    let v: Value =
        serde_yaml::from_str(text).map_err(|e| ConfigError::new("config", format!("malformed YAML: {e}")))?;
    match v {
        Value::Object(_) | Value::Null => Ok(if v.is_null() { Value::Object(Map::new()) } else { v }),
        _ => Err(ConfigError::new("config", "expected a JSON or YAML object at the top level")),
    }
}

/// The `key` field of a document, before templating (it is what `{{ key }}` becomes).
pub fn document_key(doc: &Value) -> Result<Option<String>> {
    match doc.get("key") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(ConfigError::new("key", format!("expected a string, got {}", type_name(other)))),
    }
}

/// Interprets a document once the environment's key is known.
pub fn interpret(mut doc: Value, key: &str) -> Result<PodConfig> {
    substitute_key(&mut doc, key);
    let mut warnings = Vec::new();
    let root = as_object("config", &doc)?;
    check_fields(root, "", &["key", "target", "feature"], MIRRORD_ROOT, &mut warnings)?;

    let target = match root.get("target") {
        None | Some(Value::Null) => Target::Targetless,
        Some(Value::String(s)) => Target::parse("target", s)?,
        Some(Value::Object(obj)) => {
            check_fields(obj, "target", &["path", "namespace"], &[], &mut warnings)?;
            let namespace = opt_string(obj, "target.namespace")?;
            if let Some(ns) = &namespace {
                validate_dns_label("target.namespace", ns, 63)?;
            }
            let mut t = match obj.get("path") {
                None | Some(Value::Null) => Target::Targetless,
                Some(Value::String(s)) => Target::parse("target.path", s)?,
                Some(Value::Object(p)) => target_object("target.path", p)?,
                Some(other) => {
                    return Err(ConfigError::new(
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
            return Err(ConfigError::new("target", format!("expected a string or object, got {}", type_name(other))));
        }
    };

    let mut cfg = PodConfig {
        key: document_key(&doc)?,
        target,
        mode: Mode::default(),
        filter: None,
        ports: Vec::new(),
        env: BTreeMap::new(),
        image: None,
        ttl: None,
        replicas: 1,
        propagate_key: true,
        warnings: Vec::new(),
    };

    if let Some(feature) = root.get("feature").filter(|v| !v.is_null()) {
        let feature = as_object("feature", feature)?;
        check_fields(feature, "feature", &["network", "env", "preview"], MIRRORD_FEATURE, &mut warnings)?;
        if let Some(network) = feature.get("network") {
            parse_network(network, &mut cfg, &mut warnings)?;
        }
        if let Some(env) = feature.get("env") {
            parse_env(env, &mut cfg, &mut warnings)?;
        }
        if let Some(preview) = feature.get("preview").filter(|v| !v.is_null()) {
            parse_preview(preview, &mut cfg, &mut warnings)?;
        }
    }
    cfg.warnings = warnings;
    Ok(cfg)
}

/// mirrord's top-level fields that previewd does not act on.
const MIRRORD_ROOT: &[&str] = &[
    "accept_invalid_certificates",
    "agent",
    "api",
    "baggage",
    "ci",
    "container",
    "experimental",
    "external_proxy",
    "internal_proxy",
    "kube_context",
    "kubeconfig",
    "multi_cluster",
    "operator",
    "profile",
    "sip_binaries",
    "skip_build_tools",
    "skip_extra_build_tools",
    "skip_processes",
    "skip_sip",
    "startup_retry",
    "telemetry",
    "traceparent",
    "use_proxy",
];
const MIRRORD_FEATURE: &[&str] = &["copy_target", "db_branches", "fs", "hostname", "magic", "split_queues"];
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
const MIRRORD_ENV: &[&str] = &["env_file", "exclude", "include", "load_from_process", "mapping", "unset"];
const MIRRORD_PREVIEW: &[&str] = &["config_mounts", "creation_timeout_secs", "idle", "labels", "secret_mounts"];

fn check_fields(
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
        return Err(ConfigError::new(path, format!("unknown field; expected one of: {}", known.join(", "))));
    }
    Ok(())
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
            let name = v.as_str().ok_or_else(|| ConfigError::new(format!("{field}.{k}"), "expected a string"))?;
            validate_dns_subdomain(&format!("{field}.{k}"), name)?;
            let container = opt_string(p, &format!("{field}.container"))?;
            for other in p.keys() {
                if other != k && other != "container" {
                    return Err(ConfigError::new(format!("{field}.{other}"), format!("unexpected field beside {k}")));
                }
            }
            return Ok(Target::Workload { kind, name: name.to_string(), container, namespace: None });
        }
    }
    Err(ConfigError::new(
        field,
        "expected one of deployment, statefulset, replicaset or pod (with an optional container)",
    ))
}

fn parse_network(v: &Value, cfg: &mut PodConfig, warnings: &mut Vec<String>) -> Result<()> {
    let obj = match v {
        Value::Null | Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        other => {
            return Err(ConfigError::new(
                "feature.network",
                format!("expected an object or boolean, got {}", type_name(other)),
            ));
        }
    };
    check_fields(obj, "feature.network", &["incoming"], MIRRORD_NETWORK, warnings)?;
    let field = "feature.network.incoming";
    match obj.get("incoming") {
        None | Some(Value::Null) | Some(Value::Bool(_)) => Ok(()),
        Some(Value::String(m)) => {
            cfg.mode = parse_mode(field, m)?;
            Ok(())
        }
        Some(Value::Object(inc)) => {
            check_fields(inc, field, &["mode", "http_filter", "ports"], MIRRORD_INCOMING, warnings)?;
            if let Some(m) = inc.get("mode").filter(|v| !v.is_null()) {
                let m = m
                    .as_str()
                    .ok_or_else(|| ConfigError::new(format!("{field}.mode"), "expected \"steal\" or \"mirror\""))?;
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
                            return Err(ConfigError::new(
                                f,
                                "set only one of header_filter, path_filter, method_filter, all_of, any_of (combine them with all_of)",
                            ));
                        }
                    };
                    if let Some(spec) = &cfg.filter {
                        spec.compile().map_err(|e| ConfigError::new(format!("{field}.http_filter"), e))?;
                    }
                }
                Some(other) => {
                    return Err(ConfigError::new(
                        format!("{field}.http_filter"),
                        format!("expected an object, got {}", type_name(other)),
                    ));
                }
            }
            Ok(())
        }
        Some(other) => Err(ConfigError::new(
            field,
            format!("expected \"steal\", \"mirror\" or an object, got {}", type_name(other)),
        )),
    }
}

fn parse_inner_list(field: &str, v: &Value) -> Result<Vec<FilterSpec>> {
    let list = v.as_array().ok_or_else(|| ConfigError::new(field, "expected a list of filters"))?;
    if list.is_empty() {
        return Err(ConfigError::new(field, "expected at least one filter"));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let f = format!("{field}[{i}]");
            let obj = item
                .as_object()
                .ok_or_else(|| ConfigError::new(&f, "expected an object with one of header, path, method"))?;
            if obj.len() != 1 {
                return Err(ConfigError::new(&f, "expected exactly one of header, path, method"));
            }
            let (k, v) = obj.iter().next().expect("len checked above");
            let s = v.as_str().ok_or_else(|| ConfigError::new(format!("{f}.{k}"), "expected a string"))?.to_string();
            match k.as_str() {
                "header" => Ok(FilterSpec::Header(s)),
                "path" => Ok(FilterSpec::Path(s)),
                "method" => Ok(FilterSpec::Method(s)),
                other => {
                    Err(ConfigError::new(format!("{f}.{other}"), "unknown filter; expected header, path or method"))
                }
            }
        })
        .collect()
}

fn parse_mode(field: &str, m: &str) -> Result<Mode> {
    match m {
        "steal" => Ok(Mode::Steal),
        "mirror" => Ok(Mode::Mirror),
        other => Err(ConfigError::new(field, format!("expected \"steal\" or \"mirror\", got {other:?}"))),
    }
}

fn parse_ports(field: &str, v: &Value) -> Result<Vec<u16>> {
    let one = |i: Option<usize>, v: &Value| -> Result<u16> {
        let f = i.map_or(field.to_string(), |i| format!("{field}[{i}]"));
        v.as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| ConfigError::new(f, "expected a port number between 1 and 65535"))
    };
    match v {
        Value::Array(items) => items.iter().enumerate().map(|(i, v)| one(Some(i), v)).collect(),
        other => Ok(vec![one(None, other)?]),
    }
}

fn parse_env(v: &Value, cfg: &mut PodConfig, warnings: &mut Vec<String>) -> Result<()> {
    let obj = match v {
        Value::Null | Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        other => {
            return Err(ConfigError::new(
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
                return Err(ConfigError::new(field, "not a valid environment variable name"));
            }
            let value = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => return Err(ConfigError::new(field, format!("expected a string, got {}", type_name(other)))),
            };
            cfg.env.insert(name.clone(), value);
        }
    }
    Ok(())
}

fn parse_preview(v: &Value, cfg: &mut PodConfig, warnings: &mut Vec<String>) -> Result<()> {
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
        return Err(ConfigError::new("feature.preview.ttl_secs", "set either ttl_mins or ttl_secs, not both"));
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
                    .ok_or_else(|| ConfigError::new(&field, "expected a positive whole number or \"infinite\""))?;
                let secs = n.checked_mul(unit).ok_or_else(|| ConfigError::new(&field, "too large"))?;
                cfg.ttl = Some(Ttl::Finite(Duration::from_secs(secs)));
            }
            Some(other) => {
                return Err(ConfigError::new(
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
            return Err(ConfigError::new(
                "feature.preview.propagate_key",
                format!("expected true or false, got {other}"),
            ));
        }
    }
    match obj.get("replicas") {
        None | Some(Value::Null) => {}
        Some(v) => {
            cfg.replicas = v.as_u64().filter(|n| (1..=MAX_REPLICAS as u64).contains(n)).ok_or_else(|| {
                ConfigError::new(
                    "feature.preview.replicas",
                    format!("expected a whole number from 1 to {MAX_REPLICAS}"),
                )
            })? as u32;
        }
    }
    Ok(())
}

fn yes() -> bool {
    true
}

/// More than this many copies of one preview pod is almost certainly a typo.
pub const MAX_REPLICAS: u32 = 10;

fn substitute_key(v: &mut Value, key: &str) {
    match v {
        Value::String(s) if s.contains("{{") => *s = template(s, key),
        Value::Array(items) => items.iter_mut().for_each(|i| substitute_key(i, key)),
        Value::Object(obj) => obj.values_mut().for_each(|i| substitute_key(i, key)),
        _ => {}
    }
}

/// Replaces `{{ key }}` (any inner spacing) with the key.
pub fn template(s: &str, key: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else { break };
        out.push_str(&rest[..start]);
        let inner = &rest[start + 2..start + 2 + len];
        if inner.trim() == "key" {
            out.push_str(key);
        } else {
            out.push_str(&rest[start..start + 4 + len]);
        }
        rest = &rest[start + 4 + len..];
    }
    out.push_str(rest);
    out
}

fn as_object<'a>(field: &str, v: &'a Value) -> Result<&'a Map<String, Value>> {
    v.as_object().ok_or_else(|| ConfigError::new(field, format!("expected an object, got {}", type_name(v))))
}

fn opt_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    let name = field.rsplit('.').next().unwrap_or(field);
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ConfigError::new(field, format!("expected a string, got {}", type_name(other)))),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The longest key we accept: leaves room in 63-character object names.
pub const MAX_KEY_LEN: usize = 40;

/// A key is a DNS label of at most 40 characters.
pub fn validate_key(key: &str) -> Result<()> {
    validate_dns_label("key", key, MAX_KEY_LEN)
}

/// RFC 1123 label: lower-case alphanumerics and '-', starting and ending alphanumeric.
pub fn validate_dns_label(field: &str, s: &str, max: usize) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "{s:?} is not valid; expected a DNS label: 1 to {max} lower-case letters, digits or '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

fn validate_dns_subdomain(field: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| validate_dns_label(field, l, 63).is_ok());
    if ok { Ok(()) } else { Err(ConfigError::new(field, format!("{s:?} is not a valid Kubernetes object name"))) }
}

/// A fresh key: 13 base32 characters, 65 bits from the OS's random source.
pub fn generate_key() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 13];
    // The OS random source failing is not something we can recover from.
    getrandom::fill(&mut bytes).expect("OS random source unavailable");
    // First character a letter keeps the key readable as an identifier too.
    let mut key: String = bytes.iter().map(|b| ALPHABET[(b & 31) as usize] as char).collect();
    let first = (bytes[0] % 26 + b'a') as char;
    key.replace_range(0..1, &first.to_string());
    // 12 chars × 5 bits + log2(26) ≈ 64.7 bits.
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PodConfig> {
        interpret(parse_document(text)?, "k1")
    }

    #[test]
    fn mirrord_file_parses_unchanged() {
        let cfg = parse(
            r#"{
              "key": "k1",
              "target": {"path": "deployment/orders/container/app", "namespace": "shop"},
              "feature": {
                "network": {"incoming": {"mode": "mirror", "http_filter": {"header_filter": "^baggage: .*preview-key={{ key }}"}, "ports": [8080]}},
                "env": {"override": {"DB": "db-{{key}}", "N": 3}},
                "preview": {"image": "orders:v2", "ttl_mins": 30, "replicas": 2},
                "fs": "read",
                "agent": {"ttl": 30}
              }
            }"#,
        );
        // "agent" inside feature is not mirrord's: it is an error.
        assert_eq!(cfg.unwrap_err().field, "feature.agent");
        let cfg = parse(
            r#"
key: k1
agent: {ttl: 30}
target: {path: deployment/orders/container/app, namespace: shop}
feature:
  fs: read
  network:
    incoming: {mode: mirror, http_filter: {header_filter: "^baggage: .*preview-key={{ key }}"}, ports: [8080]}
  env: {override: {DB: "db-{{key}}", N: 3}}
  preview: {image: "orders:v2", ttl_mins: 30, replicas: 2}
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.target,
            Target::Workload {
                kind: WorkloadKind::Deployment,
                name: "orders".into(),
                container: Some("app".into()),
                namespace: Some("shop".into())
            }
        );
        assert_eq!(cfg.mode, Mode::Mirror);
        assert_eq!(cfg.filter, Some(FilterSpec::Header("^baggage: .*preview-key=k1".into())));
        assert_eq!(cfg.ports, vec![8080]);
        assert_eq!(cfg.env.get("DB").map(String::as_str), Some("db-k1"));
        assert_eq!(cfg.env.get("N").map(String::as_str), Some("3"));
        assert_eq!(cfg.ttl, Some(Ttl::Finite(Duration::from_secs(1800))));
        assert_eq!(cfg.replicas, 2);
        assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
        assert!(cfg.warnings.iter().any(|w| w.starts_with("feature.fs")));
        assert!(cfg.warnings.iter().any(|w| w.starts_with("agent")));
    }

    #[test]
    fn target_forms() {
        assert_eq!(parse("{}").unwrap().target, Target::Targetless);
        assert_eq!(parse(r#"{"target": "targetless"}"#).unwrap().target, Target::Targetless);
        let t = parse(r#"{"target": {"path": {"deployment": "a", "container": "c"}}}"#).unwrap().target;
        assert_eq!(t.to_string(), "deployment/a/container/c");
        assert_eq!(parse(r#"{"target": "statefulset/db"}"#).unwrap().target.to_string(), "statefulset/db");
        assert_eq!(parse(r#"{"target": "job/x"}"#).unwrap_err().field, "target");
        assert_eq!(parse(r#"{"target": "deployment/Bad_Name"}"#).unwrap_err().field, "target");
        assert_eq!(parse(r#"{"target": {"path": "pod/a", "nmespace": "x"}}"#).unwrap_err().field, "target.nmespace");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"targt": "x"}"#, "targt"),
            (r#"{"feature": {"network": {"incoming": "borrow"}}}"#, "feature.network.incoming"),
            (
                r#"{"feature": {"network": {"incoming": {"http_filter": {"header_filter": "("}}}}}"#,
                "feature.network.incoming.http_filter",
            ),
            (r#"{"feature": {"preview": {"ttl_mins": -1}}}"#, "feature.preview.ttl_mins"),
            (r#"{"feature": {"preview": {"replicas": 0}}}"#, "feature.preview.replicas"),
            (r#"{"feature": {"network": {"incoming": {"ports": [70000]}}}}"#, "feature.network.incoming.ports[0]"),
            (r#"{"feature": {"env": {"override": {"A": [1]}}}}"#, "feature.env.override.A"),
            ("{ not json", "config"),
            ("a: [b", "config"),
            ("- 1\n- 2", "config"),
        ];
        for (text, field) in cases {
            let err = parse(text).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }

    #[test]
    fn ttl_parsing() {
        let secs = |s| match Ttl::parse("ttl", s).unwrap() {
            Ttl::Finite(d) => d.as_secs(),
            Ttl::Infinite => u64::MAX,
        };
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("30m"), 1800);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(secs("45"), 2700);
        assert_eq!(secs("infinite"), u64::MAX);
        for bad in ["", "0m", "5x", "m", "-1h", "99999999999999999999h"] {
            assert_eq!(Ttl::parse("ttl", bad).unwrap_err().field, "ttl", "{bad}");
        }
        assert_eq!(Ttl::parse("ttl", "1h30m").unwrap().to_string(), "1h30m0s");
        assert_eq!(Ttl::parse("ttl", "2h").unwrap().to_string(), "2h");
    }

    #[test]
    fn keys() {
        for _ in 0..100 {
            let k = generate_key();
            assert_eq!(k.len(), 13);
            validate_key(&k).unwrap();
        }
        assert_ne!(generate_key(), generate_key());
        for bad in ["", "A", "-a", "a-", "a_b", &"a".repeat(41)] {
            assert_eq!(validate_key(bad).unwrap_err().field, "key");
        }
        validate_key(&"a".repeat(40)).unwrap();
    }

    #[test]
    fn templating() {
        assert_eq!(template("x-{{ key }}-{{key}}-{{  key}}", "k"), "x-k-k-k");
        assert_eq!(template("{{ other }} {{", "k"), "{{ other }} {{");
    }

    /// Property test: mutated and random documents never panic the parser.
    #[test]
    fn parser_never_panics_on_mutations() {
        let seeds = [
            r#"{"key":"a","target":{"path":"deployment/x/container/y","namespace":"n"},"feature":{"network":{"incoming":{"mode":"steal","http_filter":{"any_of":[{"header":"^a: b"},{"path":"/x"}]},"ports":[80]}},"env":{"override":{"A":"1"}},"preview":{"image":"i","ttl_secs":"infinite","replicas":3}}}"#,
            "target: pod/p\nfeature:\n  network:\n    incoming: mirror\n  preview: {ttl_mins: 5}\n",
        ];
        let mut next = crate::xorshift(0x9E37_79B9_7F4A_7C15);
        let alphabet = b"{}[]:,\"' \n-0123456789abcdefghijklmnopqrstuvwxyz_/.*()^$\\";
        for i in 0..20_000 {
            let seed = seeds[i % seeds.len()].as_bytes();
            let mut doc = seed.to_vec();
            for _ in 0..(next() % 6 + 1) {
                let pos = (next() as usize) % (doc.len() + 1);
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if pos < doc.len() => doc[pos] = c,
                    1 if pos < doc.len() => {
                        doc.remove(pos);
                    }
                    _ => doc.insert(pos, c),
                }
            }
            let text = String::from_utf8_lossy(&doc);
            let _ = parse_document(&text).and_then(|v| interpret(v, "k"));
        }
    }
}
