//! Issue 17: database branches for MariaDB (`type: mysql` or `mariadb`),
//! on the real cluster and staging's real MariaDB 10.11
//! (deploy/local/databases.sh, on the node address). The same claims as
//! tests/db.rs for PostgreSQL, counted in the databases themselves:
//! refusals that make nothing, a `schema` branch that writes without
//! touching staging, `all` with a table filter, two environments in one
//! branch server, a SIGKILL of previewd in the middle of a copy, and Clean
//! dropping databases and then the server.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::db::*;
use common::*;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{ListParams, PostParams};
use mysql_async::prelude::Queryable;
use preview::proto;
use serde_json::json;

const NODE: &str = "198.18.255.254";
const V2: &str = "preview.local/echo:v2";
const STAGING_PW: &str = "staging-pw";
/// Rows of `items`: enough that a copy takes a few seconds to kill in.
const ITEMS: i64 = 300_000;

fn staging_url(db: &str, password: &str) -> String {
    format!("mysql://staging:{password}@{NODE}:3306/{db}")
}

async fn my(url: &str) -> Result<mysql_async::Conn> {
    let opts = mysql_async::Opts::from_url(url)?;
    mysql_async::Conn::new(opts).await.with_context(|| format!("connecting to {NODE}:3306"))
}

/// Staging's database `db`, made afresh: customers 3, orders 5, items ITEMS,
/// with foreign keys and an index.
async fn staging_db(db: &str) -> Result<()> {
    let mut c = my(&staging_url("orders", STAGING_PW)).await?;
    c.query_drop(format!("DROP DATABASE IF EXISTS {db}")).await?;
    c.query_drop(format!("CREATE DATABASE {db}")).await?;
    c.query_drop(format!("USE {db}")).await?;
    for s in [
        "CREATE TABLE customers (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64) NOT NULL DEFAULT 'new')".to_string(),
        "CREATE TABLE orders (id INT AUTO_INCREMENT PRIMARY KEY, customer_id INT NULL, total INT NOT NULL DEFAULT 1, \
         FOREIGN KEY (customer_id) REFERENCES customers (id))"
            .into(),
        "CREATE TABLE items (id INT AUTO_INCREMENT PRIMARY KEY, order_id INT NULL, sku VARCHAR(255) NOT NULL DEFAULT 'x', \
         KEY items_sku (sku), FOREIGN KEY (order_id) REFERENCES orders (id))"
            .into(),
        "INSERT INTO customers (name) SELECT CONCAT('c', seq) FROM seq_1_to_3".into(),
        "INSERT INTO orders (customer_id, total) SELECT 1 + seq % 3, seq FROM seq_1_to_5".into(),
        format!("INSERT INTO items (order_id, sku) SELECT 1 + seq % 5, REPEAT('s', 200) FROM seq_1_to_{ITEMS}"),
    ] {
        c.query_drop(s).await?;
    }
    Ok(())
}

/// Drops a staging database when the test ends, passed or not.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("mariadb")
            .env("MYSQL_PWD", STAGING_PW)
            .args(["--no-defaults", "--protocol=TCP", "-h", NODE, "-u", "staging", "-e"])
            .arg(format!("DROP DATABASE IF EXISTS {}", self.0))
            .status();
    }
}

async fn counts(url: &str) -> Result<BTreeMap<String, i64>> {
    let mut c = my(url).await?;
    let mut out = BTreeMap::new();
    for t in ["customers", "orders", "items"] {
        let n: Option<i64> = c.query_first(format!("SELECT COUNT(*) FROM {t}")).await?;
        out.insert(t.to_string(), n.unwrap_or(-1));
    }
    Ok(out)
}

/// The branch server's superuser connection.
async fn server_conn(ns: &TestNs, server: &str) -> Result<mysql_async::Conn> {
    let (pw, ip) = server_login(ns, server).await?;
    my(&format!("mysql://preview:{pw}@{ip}:3306/")).await
}

/// The databases on a branch server, but its own.
async fn server_databases(ns: &TestNs, server: &str) -> Result<Vec<String>> {
    let mut c = server_conn(ns, server).await?;
    let all: Vec<String> = c.query("SHOW DATABASES").await?;
    let system = ["information_schema", "mysql", "performance_schema", "sys", "preview_meta"];
    Ok(all.into_iter().filter(|d| !system.contains(&d.as_str())).collect())
}

/// The snapshots the server marks as whole.
async fn whole_snapshots(ns: &TestNs, server: &str) -> Result<Vec<String>> {
    Ok(server_conn(ns, server).await?.query("SELECT name FROM preview_meta.snapshots").await?)
}

/// Sessions other than ours that read staging's database.
async fn previewd_sessions(db: &str) -> Result<i64> {
    let mut c = my(&staging_url("orders", STAGING_PW)).await?;
    let n: Option<i64> = c
        .exec_first(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = ? AND USER = 'staging' AND ID <> CONNECTION_ID()",
            (db,),
        )
        .await?;
    Ok(n.unwrap_or(0))
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and MariaDB: make test")]
#[tokio::test]
async fn mariadb_branches_copy_isolate_share_a_server_survive_kill_and_clean() -> Result<()> {
    let ns = TestNs::new("t-dbmy").await?;
    let db = format!("src_{}", ns.name.replace('-', "_"));
    let _drop_db = DropDb(db.clone());
    staging_db(&db).await?;
    let source = staging_url(&db, STAGING_PW);
    let staging = rows(3, 5, ITEMS);
    ensure!(counts(&source).await? == staging, "staging's rows");

    // orders reads a literal URL; billing the same source from a Secret.
    echo_app(&ns, "orders", "v1", 1, &[("DATABASE_URL", &source)]).await?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "staging-db"}, "stringData": {"url": source},
    }))?;
    ns.api::<Secret>().create(&PostParams::default(), &secret).await?;
    let from_secret =
        json!({"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "staging-db", "key": "url"}}});
    echo_app_env(&ns, "billing", "v1", 1, vec![from_secret]).await?;
    echo_app(&ns, "down", "v1", 1, &[("DATABASE_URL", &format!("mysql://staging:x@{NODE}:9/{db}"))]).await?;
    echo_app(&ns, "badpw", "v1", 1, &[("DATABASE_URL", &staging_url(&db, "not-the-password"))]).await?;

    let mut previewd = LocalPreviewd::spawn(&ns.name)?;
    let addr = previewd.addr.clone();
    let mut c = connect_when_up(&addr).await?;

    // Bad input: each refused, naming what is wrong, and nothing is made.
    let schema = json!({"mode": "schema"});
    let no_var = json!({"target": "deployment/orders", "feature": {"db_branches": [{"type": "mysql", "connection": {"type": "env", "url": "NOPE_URL"}}]}});
    let r = c.start(start_req(&no_var.to_string(), V2, "bad2")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "missing variable: {r:?}");
    let m = r.as_ref().unwrap_err().message();
    ensure!(m.contains("NOPE_URL") && m.contains("container app"), "names the variable and container: {m}");
    let r = c.start(start_req(&branch_config("mysql", "deployment/down", schema.clone()), V2, "bad3")).await;
    ensure!(code(&r) == tonic::Code::Unavailable, "unreachable source: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains(&format!("{NODE}:9 ")), "names host:port: {r:?}");
    let r = c.start(start_req(&branch_config("mysql", "deployment/badpw", schema.clone()), V2, "bad4")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "wrong credentials: {r:?}");
    let m = r.as_ref().unwrap_err().message();
    ensure!(m.contains("credentials") && !m.contains("not-the-password"), "no secret shown: {m}");
    ensure!(env_objects(&ns, &Default::default()).await?.is_empty(), "a refused Start left an environment");
    ensure!(servers(&ns).await?.is_empty(), "a refused Start made a branch server");

    // k1: a schema branch. Its pod writes there; staging is untouched.
    let cfg1 = branch_config("mysql", "deployment/orders", schema.clone());
    let started = c.start(start_req(&cfg1, V2, "k1")).await?.into_inner();
    let b1 = started.environment.context("environment")?.db_branches;
    ensure!(b1.len() == 1 && b1[0].phase == "Ready", "Start returns once the branch is ready: {b1:?}");
    ensure!(!format!("{b1:?}").contains(STAGING_PW), "Status shows no source password: {b1:?}");
    ensure!(b1[0].source == format!("{NODE}:3306/{db}"), "{b1:?}");
    let ip1 = preview_ip(&ns, "k1").await?;
    let (name, before) = pod_counts(&ip1).await?;
    ensure!(name == b1[0].database, "k1's pod uses its branch {}, not {name}", b1[0].database);
    ensure!(before == rows(0, 0, 0), "schema only: every table, no rows: {before:?}");
    for _ in 0..2 {
        get(&ip1, "/db/write?table=orders").await?;
    }
    ensure!(pod_counts(&ip1).await?.1 == rows(0, 2, 0), "k1's writes land in its branch");
    ensure!(counts(&source).await? == staging, "staging's rows are unchanged by k1's writes");

    // k2 (`type: mariadb`): `all`, a filter on items, from the Secret: the
    // same server, another database.
    let all_filtered = json!({"mode": "all", "tables": {"items": {"filter": "id <= 2"}}});
    let cfg2 = branch_config("mariadb", "deployment/billing", all_filtered);
    let started = c.start(start_req(&cfg2, V2, "k2")).await?.into_inner();
    let b2 = started.environment.context("environment")?.db_branches;
    ensure!(b2.len() == 1 && b2[0].phase == "Ready", "{b2:?}");
    ensure!(b2[0].server == b1[0].server && b2[0].database != b1[0].database, "one server, two databases");
    let ip2 = preview_ip(&ns, "k2").await?;
    ensure!(pod_counts(&ip2).await?.1 == rows(3, 5, 2), "all rows, but only items with id <= 2");
    ensure!(servers(&ns).await? == vec![b1[0].server.clone()], "one branch server pod for the source");
    let dbs = server_databases(&ns, &b1[0].server).await?;
    ensure!(dbs.contains(&b1[0].database) && dbs.contains(&b2[0].database), "{dbs:?}");
    // k2's user (its branch Secret's) may use its own database only.
    let lp = ListParams::default().labels("preview.dev/role=db-branch,preview.dev/key=k2");
    let secret = ns.api::<Secret>().list(&lp).await?.items.into_iter().next().context("k2's branch Secret")?;
    let part =
        |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let (user, pw) = (part("user").context("user")?, part("password").context("password")?);
    let (_, ip) = server_login(&ns, &b1[0].server).await?;
    let mut k2 = my(&format!("mysql://{user}:{pw}@{ip}:3306/{}", b2[0].database)).await?;
    let own: Option<i64> = k2.query_first("SELECT COUNT(*) FROM orders").await?;
    ensure!(own == Some(5), "k2's user reads its own database: {own:?}");
    let other: Result<Vec<i64>, _> = k2.query(format!("SELECT COUNT(*) FROM `{}`.orders", b1[0].database)).await;
    ensure!(other.is_err(), "k2's user reads k1's database: {other:?}");
    drop(k2);

    // k3: `all` (a new snapshot). previewd is killed with SIGKILL while it
    // copies; restarted, it finishes the branch, and leaves nothing behind.
    let cfg3 = branch_config("mysql", "deployment/orders", json!({"mode": "all"}));
    let mut c3 = connect(&addr).await?;
    let start3 = tokio::spawn(async move { c3.start(start_req(&cfg3, V2, "k3")).await });
    let server = b1[0].server.clone();
    eventually("a copy into a snapshot to be under way", Duration::from_secs(60), || async {
        // A snapshot database not yet marked whole (k2's filtered one is).
        let dbs = server_databases(&ns, &server).await?;
        let whole = whole_snapshots(&ns, &server).await?;
        let copying = dbs.iter().any(|d| d.starts_with("snap_all") && !whole.contains(d));
        Ok((copying && previewd_sessions(&db).await? > 0).then_some(()))
    })
    .await?;
    previewd.kill()?;
    ensure!(start3.await?.is_err(), "the killed Start did not answer");
    previewd.restart()?;
    let mut c = connect_when_up(&addr).await?;
    let b3 = eventually("k3's branch to be made by recovery", Duration::from_secs(120), || {
        let mut c = c.clone();
        async move {
            let b = branches(&mut c, "k3").await?;
            match b.first().filter(|b| b.phase == "Ready") {
                Some(b) => Ok(Some(b.clone())),
                None => Err(anyhow::anyhow!("k3's branches: {b:?}")),
            }
        }
    })
    .await?;
    let ip3 = preview_ip(&ns, "k3").await?;
    ensure!(pod_counts(&ip3).await?.1 == staging, "k3: every row");
    let dbs = server_databases(&ns, &server).await?;
    let whole = whole_snapshots(&ns, &server).await?;
    let snaps: Vec<&String> = dbs.iter().filter(|d| d.starts_with("snap_")).collect();
    ensure!(snaps.iter().all(|s| whole.contains(s)), "no half-made snapshot is left: {dbs:?}, whole {whole:?}");
    ensure!(previewd_sessions(&db).await? == 0, "no dump of the killed previewd still reads staging");
    ensure!(b3.snapshot_at.is_some(), "the snapshot's time is shown: {b3:?}");
    let size = eventually("k3's size in Status", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { Ok(branches(&mut c, "k3").await?.first().map(|b| b.size_bytes).filter(|s| *s > 1 << 20)) }
    })
    .await?;
    ensure!(size > 1 << 20, "k3 holds every row: {size} bytes");

    // Clean drops each database; the last branch takes the server with it.
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k1".into())) }).await?;
    let dbs = server_databases(&ns, &server).await?;
    ensure!(!dbs.contains(&b1[0].database) && dbs.contains(&b2[0].database), "k1's database dropped: {dbs:?}");
    for k in ["k2", "k3"] {
        c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key(k.into())) }).await?;
    }
    eventually("the branch server to go", Duration::from_secs(60), || async {
        let svc = ns.api::<Service>().get_opt(&server).await?;
        let secret = ns.api::<Secret>().get_opt(&server).await?;
        Ok((servers(&ns).await?.is_empty() && svc.is_none() && secret.is_none()).then_some(()))
    })
    .await?;
    let lp = ListParams::default().labels("preview.dev/role=db-branch");
    ensure!(ns.api::<Secret>().list(&lp).await?.items.is_empty(), "no branch Secret is left");
    ensure!(counts(&source).await? == staging, "staging's rows are unchanged at the end");
    drop(previewd);
    Ok(())
}
