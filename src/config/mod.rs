//! The user's config file: the subset of mirrord's config that applies to
//! preview environments, in mirrord's own shape, plus keys and TTLs. One
//! file per section: `target`, `feature.network`, `feature.env`,
//! `feature.preview`, `feature.split_queues`.
//!
//! Parsing walks a `serde_json::Value` by hand so that every error names the
//! field it is about, known-but-unsupported mirrord fields become warnings and
//! anything else is an error.

mod db;
mod env;
mod fields;
mod network;
mod preview;
mod queues;
mod target;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::filter::FilterSpec;
use crate::model::{FieldError, Key, Mode, Target, Ttl};
use fields::{Result, as_object, check_fields, type_name};
pub use preview::MAX_REPLICAS;

/// One pod's worth of the user's config, after parsing and templating.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodConfig {
    pub key: Option<Key>,
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
    pub propagate_key: bool,
    /// A share link to make once the environment has started.
    pub share: Option<crate::model::share::ShareSpec>,
    /// `feature.split_queues`: the queues whose messages it takes by filter.
    pub queues: Vec<crate::model::queue::QueueAsk>,
    /// `feature.db_branches`: the databases it gets a branch of.
    #[serde(default)]
    pub db_branches: Vec<crate::model::db::DbBranchAsk>,
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
        return serde_json::from_str(text).map_err(|e| FieldError::new("config", format!("malformed JSON: {e}")));
    }
    let v: Value = serde_yaml::from_str(text).map_err(|e| FieldError::new("config", format!("malformed YAML: {e}")))?;
    match v {
        Value::Object(_) | Value::Null => Ok(if v.is_null() { Value::Object(Map::new()) } else { v }),
        _ => Err(FieldError::new("config", "expected a JSON or YAML object at the top level")),
    }
}

/// The `key` field of a document, before templating (it is what `{{ key }}` becomes).
pub fn document_key(doc: &Value) -> Result<Option<Key>> {
    match doc.get("key") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Key::parse("key", s.trim())?)),
        Some(other) => Err(FieldError::new("key", format!("expected a string, got {}", type_name(other)))),
    }
}

/// Interprets a document once the environment's key is known.
pub fn interpret(mut doc: Value, key: &Key) -> Result<PodConfig> {
    substitute_key(&mut doc, key);
    let mut warnings = Vec::new();
    let root = as_object("config", &doc)?;
    check_fields(root, "", &["key", "target", "feature"], MIRRORD_ROOT, &mut warnings)?;
    let target = target::parse_target(root.get("target"), &mut warnings)?;
    let mut incoming = network::Incoming::default();
    let mut env = BTreeMap::new();
    let mut preview = preview::Preview { propagate_key: true, replicas: 1, ..Default::default() };
    let mut queues = Vec::new();
    let mut db_branches = Vec::new();
    if let Some(feature) = root.get("feature").filter(|v| !v.is_null()) {
        let feature = as_object("feature", feature)?;
        db_branches = db::parse_db_branches(feature.get("db_branches").unwrap_or(&Value::Null), &mut warnings)?;
        check_fields(
            feature,
            "feature",
            &["network", "env", "preview", "split_queues", "db_branches"],
            MIRRORD_FEATURE,
            &mut warnings,
        )?;
        if let Some(v) = feature.get("split_queues") {
            queues = queues::parse_split_queues(v)?;
        }
        if let Some(v) = feature.get("network") {
            incoming = network::parse_network(v, &mut warnings)?;
        }
        if let Some(v) = feature.get("env") {
            env = env::parse_env(v, &mut warnings)?;
        }
        if let Some(v) = feature.get("preview").filter(|v| !v.is_null()) {
            preview = preview::parse_preview(v, &mut warnings)?;
        }
    }
    Ok(PodConfig {
        key: document_key(&doc)?,
        target,
        mode: incoming.mode,
        filter: incoming.filter,
        ports: incoming.ports,
        env,
        image: preview.image,
        ttl: preview.ttl,
        replicas: preview.replicas,
        propagate_key: preview.propagate_key,
        share: preview.share,
        queues,
        db_branches,
        warnings,
    })
}

/// A Start request, read and checked without the cluster: its key (given,
/// from a config, or new), each pod's config, and its TTL.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadStart {
    pub key: Key,
    pub configs: Vec<PodConfig>,
    pub ttl: Option<Ttl>,
}

/// Reads a Start request's configs, key and TTL. Errors name the field,
/// prefixed with `pods[i]` when there are several pods.
pub fn read_start(req: &crate::model::StartRequest) -> Result<ReadStart> {
    if req.pods.is_empty() {
        return Err(FieldError::new("pods", "at least one pod is required"));
    }
    let at = |i: usize| if req.pods.len() > 1 { format!("pods[{i}]") } else { String::new() };
    let docs = req
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| parse_document(&p.config).map_err(|e| e.within(&at(i))))
        .collect::<Result<Vec<_>>>()?;
    let key = if !req.key.is_empty() {
        Key::parse("key", &req.key)?
    } else {
        let mut from_doc = None;
        for (i, d) in docs.iter().enumerate() {
            if let Some(k) = document_key(d).map_err(|e| e.within(&at(i)))? {
                from_doc.get_or_insert(k);
            }
        }
        from_doc.unwrap_or_else(Key::generate)
    };
    let configs = docs
        .into_iter()
        .enumerate()
        .map(|(i, d)| interpret(d, &key).map_err(|e| e.within(&at(i))))
        .collect::<Result<Vec<_>>>()?;
    let ttl = if req.ttl.is_empty() { configs.iter().find_map(|c| c.ttl) } else { Some(Ttl::parse("ttl", &req.ttl)?) };
    Ok(ReadStart { key, configs, ttl })
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
const MIRRORD_FEATURE: &[&str] = &["copy_target", "fs", "hostname", "magic"];

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mode, WorkloadKind};
    use std::time::Duration;

    fn parse(text: &str) -> Result<PodConfig> {
        interpret(parse_document(text)?, &Key::parse("key", "k1").unwrap())
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
    fn db_branches_are_read() {
        let branch = r#"{"feature": {"db_branches": [{"type": "pg", "name": "orders", "connection": {"url": {"type": "env", "variable": "DATABASE_URL"}}}]}}"#;
        let cfg = parse(branch).unwrap();
        assert_eq!(cfg.db_branches.len(), 1);
        assert_eq!(cfg.db_branches[0].db_type, crate::model::db::DbType::Postgres);
        assert_eq!(parse(r#"{"feature": {"db_branches": {}}}"#).unwrap_err().field, "feature.db_branches");
        let bad_type =
            r#"{"feature": {"db_branches": [{"type": "redis", "connection": {"type": "env", "url": "U"}}]}}"#;
        assert_eq!(parse(bad_type).unwrap_err().field, "feature.db_branches[0].type");
        for none in [r#"{"feature": {"db_branches": []}}"#, r#"{"feature": {"db_branches": null}}"#] {
            assert!(parse(none).unwrap().db_branches.is_empty(), "{none}");
        }
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
        let key = Key::parse("key", "k").unwrap();
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
            let _ = parse_document(&text).and_then(|v| interpret(v, &key));
        }
    }

    #[test]
    fn an_empty_field_name_is_named_by_where_it_is() {
        let e = parse("\"\": 1").unwrap_err();
        assert_eq!((e.field.as_str(), e.message.contains("empty name")), ("config", true), "{e:?}");
        let e = parse(r#"{"feature": {"network": {"": true}}}"#).unwrap_err();
        assert_eq!(e.field, "feature.network", "{e:?}");
    }
}
