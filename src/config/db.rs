//! `feature.db_branches`, in mirrord's shape: a list of branches, each with
//! `type`, `connection` (a URL variable, in the legacy or the flat form, or
//! one variable per part) and `copy` (`mode`, and per table a `filter`).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::fields::{Result, as_object, check_fields, opt_string, type_name};
use crate::model::FieldError;
use crate::model::db::{Connection, CopyMode, DbBranchAsk, DbType, MAX_BRANCHES, MAX_FILTER_LEN, MAX_TABLES};

/// mirrord's per-branch fields that change nothing here.
const MIRRORD_BRANCH: &[&str] = &["image", "profile", "iam_auth", "connection_settings", "migrations"];

pub(super) fn parse_db_branches(v: &Value, warnings: &mut Vec<String>) -> Result<Vec<DbBranchAsk>> {
    let field = "feature.db_branches";
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) => list,
        other => return Err(FieldError::new(field, format!("expected a list of branches, got {}", type_name(other)))),
    };
    if list.len() > MAX_BRANCHES {
        return Err(FieldError::new(field, format!("{} branches; at most {MAX_BRANCHES} per pod", list.len())));
    }
    list.iter().enumerate().map(|(i, e)| branch(&format!("{field}[{i}]"), e, warnings)).collect()
}

fn branch(f: &str, v: &Value, warnings: &mut Vec<String>) -> Result<DbBranchAsk> {
    let obj = as_object(f, v)?;
    let ours = ["type", "id", "version", "name", "ttl_secs", "ttl_mins", "creation_timeout_secs", "connection", "copy"];
    check_fields(obj, f, &ours, MIRRORD_BRANCH, warnings)?;
    let db_type = match obj.get("type") {
        Some(Value::String(s)) if s == "pg" => DbType::Postgres,
        Some(Value::String(s)) if s == "mysql" || s == "mariadb" => DbType::MySql,
        Some(Value::String(s)) => {
            return Err(FieldError::new(
                format!("{f}.type"),
                format!("{s:?} is not supported; expected pg, mysql or mariadb"),
            ));
        }
        Some(other) => {
            return Err(FieldError::new(format!("{f}.type"), format!("expected a string, got {}", type_name(other))));
        }
        None => return Err(FieldError::new(format!("{f}.type"), "required: pg, mysql or mariadb")),
    };
    let id = opt_string(obj, &format!("{f}.id"))?;
    if let Some(id) = &id {
        name_like(&format!("{f}.id"), id)?;
    }
    let ttl_secs = match (secs(obj, f, "ttl_secs")?, secs(obj, f, "ttl_mins")?) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(format!("{f}.ttl_mins"), "give ttl_secs or ttl_mins, not both"));
        }
        (s, m) => s.or(m.map(|m| m.saturating_mul(60))),
    };
    let creation_timeout_secs = secs(obj, f, "creation_timeout_secs")?.unwrap_or(60);
    if !(1..=600).contains(&creation_timeout_secs) {
        return Err(FieldError::new(format!("{f}.creation_timeout_secs"), "expected 1 to 600 seconds"));
    }
    let connection = match obj.get("connection") {
        Some(c) => connection(&format!("{f}.connection"), c)?,
        None => {
            return Err(FieldError::new(format!("{f}.connection"), "required: where the target keeps the connection"));
        }
    };
    let (copy, tables) = match obj.get("copy").filter(|c| !c.is_null()) {
        Some(c) => copy(&format!("{f}.copy"), c)?,
        None => (CopyMode::Empty, BTreeMap::new()),
    };
    Ok(DbBranchAsk {
        db_type,
        id,
        version: opt_string(obj, &format!("{f}.version"))?,
        name: opt_string(obj, &format!("{f}.name"))?,
        ttl_secs,
        creation_timeout_secs,
        connection,
        copy,
        tables,
    })
}

fn secs(obj: &Map<String, Value>, f: &str, name: &str) -> Result<Option<u64>> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(other) => {
            Err(FieldError::new(format!("{f}.{name}"), format!("expected a whole number, got {}", type_name(other))))
        }
    }
}

/// Env variable names, table names and ids: letters, digits, `_`, `-`, `.`.
fn name_like(f: &str, s: &str) -> Result<()> {
    if s.is_empty() || s.len() > 63 || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
        return Err(FieldError::new(f, format!("{s:?}: expected 1 to 63 letters, digits, '_', '-' or '.'")));
    }
    Ok(())
}

fn variable(f: &str, v: &Value) -> Result<String> {
    match v {
        Value::String(s) => name_like(f, s).map(|_| s.clone()),
        Value::Object(_) => Err(FieldError::new(f, "only env variables of the target are supported here, by name")),
        other => Err(FieldError::new(f, format!("expected an env variable's name, got {}", type_name(other)))),
    }
}

fn source_type(f: &str, obj: &Map<String, Value>) -> Result<()> {
    match obj.get("type") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(s)) if s == "env" => Ok(()),
        Some(other) => Err(FieldError::new(format!("{f}.type"), format!("expected env, got {other}"))),
    }
}

fn connection(f: &str, v: &Value) -> Result<Connection> {
    let obj = as_object(f, v)?;
    check_fields(obj, f, &["url", "type", "params"], &[], &mut Vec::new())?;
    match (obj.get("url"), obj.get("params")) {
        (Some(_), Some(_)) => Err(FieldError::new(f, "give url or params, not both")),
        // Legacy: {url: {type: env, variable, container?}}.
        (Some(Value::Object(u)), None) => {
            let uf = format!("{f}.url");
            if u.get("type").and_then(Value::as_str) != Some("env") {
                return Err(FieldError::new(uf, "only type env is supported: the target's env variable, by name"));
            }
            check_fields(u, &uf, &["type", "variable", "container"], &[], &mut Vec::new())?;
            let variable = variable(&format!("{uf}.variable"), u.get("variable").unwrap_or(&Value::Null))?;
            Ok(Connection::Url { variable, container: opt_string(u, &format!("{uf}.container"))? })
        }
        // Flat: {type: env, url: VAR}.
        (Some(url), None) => {
            source_type(f, obj)?;
            Ok(Connection::Url { variable: variable(&format!("{f}.url"), url)?, container: None })
        }
        (None, Some(p)) => {
            source_type(f, obj)?;
            let pf = format!("{f}.params");
            let p = as_object(&pf, p)?;
            check_fields(p, &pf, &["host", "port", "user", "password", "database"], &[], &mut Vec::new())?;
            let get =
                |n: &str| p.get(n).filter(|v| !v.is_null()).map(|v| variable(&format!("{pf}.{n}"), v)).transpose();
            let c = Connection::Params {
                host: get("host")?,
                port: get("port")?,
                user: get("user")?,
                password: get("password")?,
                database: get("database")?,
            };
            if c == (Connection::Params { host: None, port: None, user: None, password: None, database: None }) {
                return Err(FieldError::new(pf, "expected at least one of host, port, user, password, database"));
            }
            Ok(c)
        }
        (None, None) => Err(FieldError::new(f, "expected url or params")),
    }
}

fn copy(f: &str, v: &Value) -> Result<(CopyMode, BTreeMap<String, Option<String>>)> {
    let obj = as_object(f, v)?;
    check_fields(obj, f, &["mode", "tables"], &["dump_args"], &mut Vec::new())?;
    let mode = match obj.get("mode").and_then(Value::as_str) {
        Some("empty") => CopyMode::Empty,
        Some("schema") => CopyMode::Schema,
        Some("all") => CopyMode::All,
        _ => return Err(FieldError::new(format!("{f}.mode"), "expected empty, schema or all")),
    };
    let mut tables = BTreeMap::new();
    if let Some(t) = obj.get("tables").filter(|t| !t.is_null()) {
        let tf = format!("{f}.tables");
        let t = as_object(&tf, t)?;
        if t.len() > MAX_TABLES {
            return Err(FieldError::new(tf, format!("{} tables; at most {MAX_TABLES}", t.len())));
        }
        for (name, spec) in t {
            let nf = format!("{tf}.{name}");
            name_like(&nf, name)?;
            let spec = as_object(&nf, spec)?;
            check_fields(spec, &nf, &["filter"], &[], &mut Vec::new())?;
            let filter = opt_string(spec, &format!("{nf}.filter"))?;
            if let Some(w) = &filter {
                // One clause, not statements: it is run inside a read-only
                // transaction too, but a `;` is never part of a WHERE clause.
                if w.len() > MAX_FILTER_LEN || w.contains(';') || w.trim().is_empty() {
                    return Err(FieldError::new(
                        format!("{nf}.filter"),
                        format!("expected one WHERE clause, at most {MAX_FILTER_LEN} bytes, without ';'"),
                    ));
                }
            }
            tables.insert(name.clone(), filter);
        }
    }
    Ok((mode, tables))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Vec<DbBranchAsk>> {
        parse_db_branches(&serde_json::from_str(s).unwrap(), &mut Vec::new())
    }

    #[test]
    fn mirrord_shapes() {
        let b = parse(
            r#"[{"type": "pg", "name": "orders", "connection": {"url": {"type": "env", "variable": "DATABASE_URL"}},
                 "copy": {"mode": "all", "tables": {"orders": {"filter": "region = 'eu'"}, "users": {}}}},
                {"type": "mariadb", "ttl_mins": 2, "connection": {"type": "env", "url": "DB_URL"}},
                {"type": "mysql", "connection": {"params": {"host": "DB_HOST", "password": "DB_PW"}}, "copy": {"mode": "schema"}}]"#,
        )
        .unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[0].db_type, DbType::Postgres);
        assert_eq!(b[0].connection, Connection::Url { variable: "DATABASE_URL".into(), container: None });
        assert_eq!(b[0].copy, CopyMode::All);
        assert_eq!(b[0].tables.get("orders"), Some(&Some("region = 'eu'".to_string())));
        assert_eq!(b[0].tables.get("users"), Some(&None));
        assert_eq!(b[0].creation_timeout_secs, 60);
        assert_eq!((b[1].db_type, b[1].ttl_secs, b[1].copy), (DbType::MySql, Some(120), CopyMode::Empty));
        assert!(
            matches!(&b[2].connection, Connection::Params { host: Some(h), password: Some(p), .. } if h == "DB_HOST" && p == "DB_PW")
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let url = r#""connection": {"url": {"type": "env", "variable": "U"}}"#;
        for (s, field) in [
            (r#"{}"#.to_string(), "feature.db_branches"),
            (format!(r#"[{{"type": "mongodb", {url}}}]"#), "feature.db_branches[0].type"),
            (r#"[{"type": "pg"}]"#.to_string(), "feature.db_branches[0].connection"),
            (format!(r#"[{{"type": "pg", {url}, "copy": {{"mode": "some"}}}}]"#), "feature.db_branches[0].copy.mode"),
            (
                format!(
                    r#"[{{"type": "pg", {url}, "copy": {{"mode": "all", "tables": {{"t": {{"filter": "1=1; DROP TABLE t"}}}}}}}}]"#
                ),
                "feature.db_branches[0].copy.tables.t.filter",
            ),
            (
                format!(r#"[{{"type": "pg", {url}, "copy": {{"mode": "all", "tables": {{"a b": {{}}}}}}}}]"#),
                "feature.db_branches[0].copy.tables.a b",
            ),
            (
                r#"[{"type": "pg", "connection": {"url": {"type": "secret", "name": "s", "key": "k"}}}]"#.to_string(),
                "feature.db_branches[0].connection.url",
            ),
            (
                r#"[{"type": "pg", "connection": {"params": {}}}]"#.to_string(),
                "feature.db_branches[0].connection.params",
            ),
            (format!(r#"[{{"type": "pg", {url}, "ttl_secs": 1, "ttl_mins": 1}}]"#), "feature.db_branches[0].ttl_mins"),
            (
                format!(r#"[{{"type": "pg", {url}, "creation_timeout_secs": 0}}]"#),
                "feature.db_branches[0].creation_timeout_secs",
            ),
            (format!(r#"[{{"type": "pg", {url}, "colour": 1}}]"#), "feature.db_branches[0].colour"),
        ] {
            assert_eq!(parse(&s).unwrap_err().field, field, "{s}");
        }
        let many = format!("[{}]", vec![format!(r#"{{"type": "pg", {url}}}"#); MAX_BRANCHES + 1].join(","));
        assert_eq!(parse(&many).unwrap_err().field, "feature.db_branches");
    }
}
