//! What the database branch tests (`tests/db*.rs`) share: the preview
//! pods' view of their database (preview-echo's DATABASE_URL mode), the
//! branch config, and what Status and the cluster say about branches.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use preview::proto;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{TestNs, ready_pods};

/// Row counts of the test's three tables.
pub fn rows(c: i64, o: i64, i: i64) -> BTreeMap<String, i64> {
    BTreeMap::from([("customers".into(), c), ("orders".into(), o), ("items".into(), i)])
}

/// A GET to a pod's preview-echo, as JSON.
pub async fn get(ip: &str, path: &str) -> Result<serde_json::Value> {
    let mut s = tokio::net::TcpStream::connect((ip, 8080)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP answer")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head} {body}");
    Ok(serde_json::from_str(body.trim())?)
}

/// What a preview pod's `/db/count` sees: its database's name and row counts.
pub async fn pod_counts(ip: &str) -> Result<(String, BTreeMap<String, i64>)> {
    let v = get(ip, "/db/count").await?;
    let rows: BTreeMap<String, i64> = serde_json::from_value(v["rows"].clone())?;
    Ok((v["database"].as_str().unwrap_or_default().to_string(), rows))
}

/// A config with one branch of type `db_type`, its URL in DATABASE_URL.
pub fn branch_config(db_type: &str, target: &str, copy: serde_json::Value) -> String {
    json!({"target": target, "feature": {"db_branches": [{
        "type": db_type,
        "connection": {"url": {"type": "env", "variable": "DATABASE_URL"}},
        "copy": copy,
    }]}})
    .to_string()
}

pub fn code(r: &Result<tonic::Response<proto::StartResponse>, tonic::Status>) -> tonic::Code {
    r.as_ref().err().map_or(tonic::Code::Ok, |s| s.code())
}

/// The environment `key`'s one preview pod, once it serves.
pub async fn preview_ip(ns: &TestNs, key: &str) -> Result<String> {
    let pods = ready_pods(ns, &format!("preview.dev/key={key}"), 1).await?;
    pods[0].status.as_ref().and_then(|s| s.pod_ip.clone()).context("pod IP")
}

/// What Status shows of `key`'s branches now.
pub async fn branches(c: &mut preview::cli::Client, key: &str) -> Result<Vec<proto::DbBranch>> {
    let mut s = c.status(proto::StatusRequest { key: key.into(), ..Default::default() }).await?.into_inner();
    let ev = s.message().await?.context("a snapshot")?;
    Ok(ev.environments.into_iter().find(|e| e.key == key).map(|e| e.db_branches).unwrap_or_default())
}

/// The branch server pods in the namespace.
pub async fn servers(ns: &TestNs) -> Result<Vec<String>> {
    let lp = ListParams::default().labels("preview.dev/role=db-server");
    Ok(ns.api::<Pod>().list(&lp).await?.items.into_iter().filter_map(|p| p.metadata.name).collect())
}

/// A branch server's superuser password and pod IP (the test is the
/// cluster's admin: it reads the server's Secret).
pub async fn server_login(ns: &TestNs, server: &str) -> Result<(String, String)> {
    let secret = ns.api::<k8s_openapi::api::core::v1::Secret>().get(server).await?;
    let pw = secret.data.unwrap_or_default().get("password").map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let pod = ns.api::<Pod>().get(server).await?;
    let ip = pod.status.and_then(|s| s.pod_ip).context("server pod IP")?;
    Ok((pw.unwrap_or_default(), ip))
}

/// Staging's address on the node: both engines, user `staging`.
const NODE: &str = "198.18.255.254";
const STAGING_PW: &str = "staging-pw";

/// The three tables, `serial` being the dialect's auto-increment key, with 3, 5 and 7 rows.
fn small_tables(serial: &str) -> String {
    format!(
        "CREATE TABLE customers (id {serial} PRIMARY KEY, name text NOT NULL);
         CREATE TABLE orders (id {serial} PRIMARY KEY, total int NOT NULL);
         CREATE TABLE items (id {serial} PRIMARY KEY, sku text NOT NULL);
         INSERT INTO customers (name) VALUES ('a'), ('b'), ('c');
         INSERT INTO orders (total) VALUES (1), (2), (3), (4), (5);
         INSERT INTO items (sku) VALUES ('a'), ('b'), ('c'), ('d'), ('e'), ('f'), ('g');"
    )
}

/// Staging PostgreSQL's database `db`, made afresh with 3, 5 and 7 rows;
/// returns its URL.
pub async fn staging_postgres(db: &str) -> Result<String> {
    let url = |d: &str| format!("postgres://staging:{STAGING_PW}@{NODE}:5432/{d}");
    let (admin, conn) = tokio_postgres::connect(&url("orders"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    let (c, conn) = tokio_postgres::connect(&url(db), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    c.batch_execute(&small_tables("serial")).await?;
    Ok(url(db))
}

/// Staging MariaDB's database `db`, made afresh with 3, 5 and 7 rows;
/// returns its URL.
pub async fn staging_mariadb(db: &str) -> Result<String> {
    use mysql_async::prelude::Queryable;
    let url = |d: &str| format!("mysql://staging:{STAGING_PW}@{NODE}:3306/{d}");
    let mut admin = mysql_async::Conn::new(mysql_async::Opts::from_url(&url(""))?).await?;
    admin.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await?;
    admin.query_drop(format!("CREATE DATABASE {db}")).await?;
    let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(&url(db))?).await?;
    for s in small_tables("int AUTO_INCREMENT").split(';').filter(|s| !s.trim().is_empty()) {
        c.query_drop(s).await?;
    }
    Ok(url(db))
}

/// Drops staging's database `db` on both engines.
pub async fn drop_staging(db: &str) -> Result<()> {
    use mysql_async::prelude::Queryable;
    let (admin, conn) =
        tokio_postgres::connect(&format!("postgres://staging:{STAGING_PW}@{NODE}:5432/orders"), tokio_postgres::NoTls)
            .await?;
    tokio::spawn(conn);
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    let opts = mysql_async::Opts::from_url(&format!("mysql://staging:{STAGING_PW}@{NODE}:3306/"))?;
    mysql_async::Conn::new(opts).await?.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await?;
    Ok(())
}
