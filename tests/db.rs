//! Issue 17: database branches, on the real cluster and staging's real
//! PostgreSQL (deploy/local/databases.sh, on the node address). Staging's
//! apps and the preview pods are preview-echo in its DATABASE_URL mode,
//! which writes and counts rows where its variable points, so every claim
//! is counted in the databases themselves: refusals that make nothing, a
//! `schema` branch that writes without touching staging, `all` with a table
//! filter, two environments in one branch server, a SIGKILL of previewd in
//! the middle of a copy, and Clean dropping databases and then the server.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::db::*;
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, ResourceQuota, Secret, Service};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use preview::proto;
use serde_json::json;

const NODE: &str = "198.18.255.254";
const V2: &str = "preview.local/echo:v2";
const STAGING_PW: &str = "staging-pw";
/// Rows of `items`: enough that a copy takes a few seconds to kill in.
const ITEMS: i64 = 600_000;

fn staging_url(db: &str, password: &str) -> String {
    format!("postgres://staging:{password}@{NODE}:5432/{db}")
}

async fn pg(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.with_context(|| format!("connecting to {NODE}"))?;
    tokio::spawn(conn);
    Ok(c)
}

/// Staging's database `db`, made afresh: customers 3, orders 5, items ITEMS.
async fn staging_db(db: &str) -> Result<()> {
    let admin = pg(&staging_url("orders", STAGING_PW)).await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    let c = pg(&staging_url(db, STAGING_PW)).await?;
    c.batch_execute(&format!(
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL DEFAULT 'new');
         CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers, total int NOT NULL DEFAULT 1);
         CREATE TABLE items (id serial PRIMARY KEY, order_id int REFERENCES orders, sku text NOT NULL DEFAULT 'x');
         CREATE INDEX items_sku ON items (sku);
         INSERT INTO customers (name) SELECT 'c' || i FROM generate_series(1, 3) i;
         INSERT INTO orders (customer_id, total) SELECT 1 + i % 3, i FROM generate_series(1, 5) i;
         INSERT INTO items (order_id, sku) SELECT 1 + i % 5, repeat('s', 200) FROM generate_series(1, {ITEMS}) i;"
    ))
    .await?;
    Ok(())
}

/// Drops a staging database when the test ends, passed or not.
struct DropDb(String);

impl Drop for DropDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("/usr/lib/postgresql/15/bin/psql")
            .args([
                "-X",
                "-q",
                &staging_url("orders", STAGING_PW),
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0),
            ])
            .status();
    }
}

async fn counts(url: &str) -> Result<BTreeMap<String, i64>> {
    let c = pg(url).await?;
    let mut out = BTreeMap::new();
    for t in ["customers", "orders", "items"] {
        out.insert(t.to_string(), c.query_one(&format!("SELECT count(*) FROM {t}"), &[]).await?.get(0));
    }
    Ok(out)
}

/// The databases on a branch server, read as its superuser (the test is
/// the cluster's admin: it reads the server's Secret).
async fn server_databases(ns: &TestNs, server: &str) -> Result<Vec<String>> {
    let (pw, ip) = server_login(ns, server).await?;
    let c = pg(&format!("postgres://preview:{pw}@{ip}:5432/postgres")).await?;
    let rows = c.query("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1", &[]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The roles on a branch server: (name, may log in, superuser).
async fn server_roles(ns: &TestNs, server: &str) -> Result<Vec<(String, bool, bool)>> {
    let (pw, ip) = server_login(ns, server).await?;
    let c = pg(&format!("postgres://preview:{pw}@{ip}:5432/postgres")).await?;
    let rows = c.query("SELECT rolname::text, rolcanlogin, rolsuper FROM pg_roles ORDER BY 1", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
}

/// Each database on a branch server, with its owner.
async fn server_owners(ns: &TestNs, server: &str) -> Result<Vec<(String, String)>> {
    let (pw, ip) = server_login(ns, server).await?;
    let c = pg(&format!("postgres://preview:{pw}@{ip}:5432/postgres")).await?;
    let rows = c.query("SELECT datname::text, datdba::regrole::text FROM pg_database ORDER BY 1", &[]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Sessions previewd's tools hold on staging's database.
async fn previewd_sessions(db: &str) -> Result<i64> {
    let c = pg(&staging_url("orders", STAGING_PW)).await?;
    Ok(c.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'previewd' AND pid <> pg_backend_pid()",
        &[&db],
    )
    .await?
    .get(0))
}

#[cfg_attr(not(feature = "system-tests"), ignore = "needs the local cluster and PostgreSQL: make test")]
#[tokio::test]
async fn pg_branches_copy_isolate_share_a_server_survive_kill_and_clean() -> Result<()> {
    let ns = TestNs::new("t-db").await?;
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
    echo_app(&ns, "down", "v1", 1, &[("DATABASE_URL", &format!("postgres://staging:x@{NODE}:9/{db}"))]).await?;
    echo_app(&ns, "badpw", "v1", 1, &[("DATABASE_URL", &staging_url(&db, "not-the-password"))]).await?;

    let mut previewd = LocalPreviewd::spawn(&ns.name)?;
    let addr = previewd.addr.clone();
    let mut c = connect_when_up(&addr).await?;

    // Bad input: each refused, naming what is wrong, and nothing is made.
    let schema = json!({"mode": "schema"});
    let bad_type = json!({"target": "deployment/orders", "feature": {"db_branches": [{"type": "oracle", "connection": {"type": "env", "url": "DATABASE_URL"}}]}});
    let r = c.start(start_req(&bad_type.to_string(), V2, "bad1")).await;
    ensure!(code(&r) == tonic::Code::InvalidArgument, "unknown type: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains("feature.db_branches[0].type"), "{r:?}");
    let no_var = json!({"target": "deployment/orders", "feature": {"db_branches": [{"type": "pg", "connection": {"type": "env", "url": "NOPE_URL"}}]}});
    let r = c.start(start_req(&no_var.to_string(), V2, "bad2")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "missing variable: {r:?}");
    let m = r.as_ref().unwrap_err().message();
    ensure!(m.contains("NOPE_URL") && m.contains("container app"), "names the variable and container: {m}");
    let r = c.start(start_req(&branch_config("pg", "deployment/down", schema.clone()), V2, "bad3")).await;
    ensure!(code(&r) == tonic::Code::Unavailable, "unreachable source: {r:?}");
    ensure!(r.as_ref().unwrap_err().message().contains(&format!("{NODE}:9 ")), "names host:port: {r:?}");
    let r = c.start(start_req(&branch_config("pg", "deployment/badpw", schema.clone()), V2, "bad4")).await;
    ensure!(code(&r) == tonic::Code::FailedPrecondition, "wrong credentials: {r:?}");
    let m = r.as_ref().unwrap_err().message();
    ensure!(m.contains("credentials") && !m.contains("not-the-password"), "no secret shown: {m}");
    ensure!(env_objects(&ns, &Default::default()).await?.is_empty(), "a refused Start left an environment");
    ensure!(servers(&ns).await?.is_empty(), "a refused Start made a branch server");

    // k1: a schema branch. Its pod writes there; staging is untouched.
    let started =
        c.start(start_req(&branch_config("pg", "deployment/orders", schema.clone()), V2, "k1")).await?.into_inner();
    let b1 = started.environment.context("environment")?.db_branches;
    ensure!(b1.len() == 1 && b1[0].phase == "Ready", "Start returns once the branch is ready: {b1:?}");
    ensure!(!format!("{b1:?}").contains(STAGING_PW), "Status shows no source password: {b1:?}");
    ensure!(b1[0].source == format!("{NODE}:5432/{db}"), "{b1:?}");
    let ip1 = preview_ip(&ns, "k1").await?;
    let (name, before) = pod_counts(&ip1).await?;
    ensure!(name == b1[0].database, "k1's pod uses its branch {}, not {name}", b1[0].database);
    ensure!(before == rows(0, 0, 0), "schema only: every table, no rows: {before:?}");
    for _ in 0..2 {
        get(&ip1, "/db/write?table=orders").await?;
    }
    ensure!(pod_counts(&ip1).await?.1 == rows(0, 2, 0), "k1's writes land in its branch");
    ensure!(counts(&source).await? == staging, "staging's rows are unchanged by k1's writes");

    // k2: `all`, with a filter on items, from the Secret: the same server.
    let all_filtered = json!({"mode": "all", "tables": {"items": {"filter": "id <= 2"}}});
    let started =
        c.start(start_req(&branch_config("pg", "deployment/billing", all_filtered), V2, "k2")).await?.into_inner();
    let b2 = started.environment.context("environment")?.db_branches;
    ensure!(b2.len() == 1 && b2[0].phase == "Ready", "{b2:?}");
    ensure!(b2[0].server == b1[0].server && b2[0].database != b1[0].database, "one server, two databases");
    let ip2 = preview_ip(&ns, "k2").await?;
    ensure!(pod_counts(&ip2).await?.1 == rows(3, 5, 2), "all rows, but only items with id <= 2");
    ensure!(servers(&ns).await? == vec![b1[0].server.clone()], "one branch server pod for the source");
    let dbs = server_databases(&ns, &b1[0].server).await?;
    ensure!(dbs.contains(&b1[0].database) && dbs.contains(&b2[0].database), "{dbs:?}");

    // Status shows each branch's size (read by the reaper's tick).
    let size = eventually("k1's size in Status", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let b = branches(&mut c, "k1").await?;
            match b.first().filter(|b| b.size_bytes > 0) {
                Some(b) => Ok(Some(b.size_bytes)),
                None => Err(anyhow::anyhow!("k1's branches: {b:?}")),
            }
        }
    })
    .await?;
    ensure!(size > 0, "k1's size: {size}");

    // k3: `all`, the first of its mode: copied straight from the source.
    // previewd is killed with SIGKILL while it copies; restarted, it makes
    // the branch again, and the snapshot from it, and leaves nothing behind.
    let cfg3 = branch_config("pg", "deployment/orders", json!({"mode": "all"}));
    let mut c3 = connect(&addr).await?;
    let start3 = tokio::spawn(async move { c3.start(start_req(&cfg3, V2, "k3")).await });
    let server = b1[0].server.clone();
    eventually("a copy into a snapshot to be under way", Duration::from_secs(60), || async {
        let dbs = server_databases(&ns, &server).await?;
        Ok((dbs.iter().any(|d| d.starts_with("br_k3_")) && previewd_sessions(&db).await? > 0).then_some(()))
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
    // The snapshot is made behind the branch; then nothing half-made is left.
    let dbs = eventually("the `all` snapshot", Duration::from_secs(60), || async {
        let dbs = server_databases(&ns, &server).await?;
        Ok(dbs.iter().any(|d| d.starts_with("snap_all")).then_some(dbs))
    })
    .await?;
    ensure!(!dbs.iter().any(|d| d.starts_with("tmp_")), "no half-made snapshot is left: {dbs:?}");
    ensure!(dbs.iter().filter(|d| d.starts_with("br_k3_")).count() == 1, "one k3 branch: {dbs:?}");
    ensure!(previewd_sessions(&db).await? == 0, "no dump of the killed previewd still reads staging");
    // A first branch loads as a superuser that cannot log in; none is left so.
    let roles = server_roles(&ns, &server).await?;
    ensure!(
        roles.iter().filter(|(r, _, _)| r.starts_with("br_")).all(|(_, login, su)| *login && !*su),
        "every branch role logs in and is no superuser: {roles:?}"
    );
    ensure!(b3.snapshot_at.is_some(), "the snapshot's time is shown: {b3:?}");
    let size = eventually("k3's size in Status", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { Ok(branches(&mut c, "k3").await?.first().map(|b| b.size_bytes).filter(|s| *s > 0)) }
    })
    .await?;
    ensure!(size > 1 << 20, "k3 holds every row: {size} bytes");

    // k4: `all` again, a clone of the snapshot made from k3's copy, which
    // holds none of what k3's pod wrote since.
    for _ in 0..2 {
        get(&ip3, "/db/write?table=orders").await?;
    }
    ensure!(pod_counts(&ip3).await?.1 == rows(3, 7, ITEMS), "k3's writes land in its branch");
    let cfg4 = branch_config("pg", "deployment/orders", json!({"mode": "all"}));
    let b4 = c.start(start_req(&cfg4, V2, "k4")).await?.into_inner().environment.context("environment")?.db_branches;
    ensure!(b4.len() == 1 && b4[0].phase == "Ready" && b4[0].snapshot_at == b3.snapshot_at, "{b4:?} {b3:?}");
    ensure!(pod_counts(&preview_ip(&ns, "k4").await?).await?.1 == staging, "k4: staging's rows, not k3's");
    let owners = server_owners(&ns, &server).await?;
    ensure!(
        owners.iter().filter(|(d, _)| d.starts_with("br_")).all(|(d, o)| d == o),
        "each branch database is its own role's: {owners:?}"
    );
    // k4's role (its branch Secret's) may connect to its own database only.
    let lp = ListParams::default().labels("preview.dev/role=db-branch,preview.dev/key=k4");
    let secret = ns.api::<Secret>().list(&lp).await?.items.into_iter().next().context("k4's branch Secret")?;
    let part =
        |k: &str| secret.data.as_ref().and_then(|d| d.get(k)).map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let (user, pw) = (part("user").context("user")?, part("password").context("password")?);
    let (_, ip) = server_login(&ns, &server).await?;
    let as_k4 = |db: &str| format!("postgres://{user}:{pw}@{ip}:5432/{db}");
    let own = pg(&as_k4(&b4[0].database)).await?.query_one("SELECT count(*) FROM orders", &[]).await?;
    ensure!(own.get::<_, i64>(0) == 5, "k4's role reads its own database");
    for other in [b3.database.as_str(), "postgres", "template1"] {
        ensure!(pg(&as_k4(other)).await.is_err(), "k4's role may not connect to {other}");
    }

    // Clean drops each database; the last branch takes the server with it.
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k1".into())) }).await?;
    let dbs = server_databases(&ns, &server).await?;
    ensure!(!dbs.contains(&b1[0].database) && dbs.contains(&b2[0].database), "k1's database dropped: {dbs:?}");
    // k3's role owned the snapshot's objects for a moment: it goes all the same.
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("k3".into())) }).await?;
    let roles = server_roles(&ns, &server).await?;
    ensure!(!roles.iter().any(|(r, _, _)| *r == b3.database), "k3's role dropped: {roles:?}");
    for k in ["k2", "k4"] {
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

/// A namespace whose ResourceQuota tracks CPU and memory refuses any pod
/// that does not say what it needs. Branch servers say so (previewd's
/// defaults), so a branch works there; the server pod carries them. Then
/// the server's pod is deleted: Status shows the branch lost.
#[tokio::test]
async fn a_branch_server_fits_a_namespace_quota() -> Result<()> {
    let ns = TestNs::new("t-db-quota").await?;
    let db = format!("src_{}", ns.name.replace('-', "_"));
    let _drop_db = DropDb(db.clone());
    let source = staging_postgres(&db).await?;
    // The target says what it needs, as it must in such a namespace (the
    // preview pod is its copy); the quota comes once its pod runs.
    echo_app(&ns, "orders", "v1", 1, &[("DATABASE_URL", &source)]).await?;
    let needs = json!({"spec": {"template": {"spec": {"containers": [{"name": "app",
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}}}]}}}});
    ns.api::<Deployment>().patch("orders", &PatchParams::default(), &Patch::Strategic(&needs)).await?;
    eventually("orders to run with its resources", Duration::from_secs(90), || async {
        let pods = ready_pods(&ns, "app=orders", 1).await?;
        let has =
            pods[0].spec.as_ref().and_then(|s| s.containers[0].resources.as_ref()).is_some_and(|r| r.limits.is_some());
        Ok(has.then_some(()))
    })
    .await?;
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "compute"},
        "spec": {"hard": {"requests.cpu": "4", "requests.memory": "8Gi", "limits.memory": "16Gi"}},
    }))?;
    ns.api::<ResourceQuota>().create(&PostParams::default(), &quota).await?;
    // What the quota does to a pod that names no resources: refused.
    let bare: Pod = serde_json::from_value(json!({
        "metadata": {"name": "bare"},
        "spec": {"containers": [{"name": "c", "image": V2, "imagePullPolicy": "Never"}]},
    }))?;
    // Admission enforces a new quota once the API server's cache holds it
    // (its status may be filled in before): a dry-run create shows when,
    // and makes nothing.
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    let refused = eventually("the quota to be enforced", Duration::from_secs(60), || async {
        match ns.api::<Pod>().create(&dry_run, &bare).await {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(Some(e.message)),
            Ok(_) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await?;
    ensure!(refused.contains("must specify"), "{refused}");

    let previewd = LocalPreviewd::spawn(&ns.name)?;
    let mut c = connect_when_up(&previewd.addr).await?;
    let r = c.start(start_req(&branch_config("pg", "deployment/orders", json!({"mode": "all"})), V2, "q1")).await?;
    let b = r.into_inner().environment.context("environment")?.db_branches;
    ensure!(b.len() == 1 && b[0].phase == "Ready", "{b:?}");
    let server = ns.api::<Pod>().get(&b[0].server).await?;
    let res = server.spec.and_then(|s| s.containers[0].resources.clone()).context("the server's resources")?;
    let q = |m: Option<BTreeMap<String, Quantity>>, k: &str| m.and_then(|m| m.get(k).map(|q| q.0.clone()));
    ensure!(q(res.requests.clone(), "cpu").as_deref() == Some("100m"), "{res:?}");
    ensure!(q(res.requests.clone(), "memory").as_deref() == Some("256Mi"), "{res:?}");
    ensure!(q(res.limits.clone(), "memory").as_deref() == Some("1Gi"), "{res:?}");
    ensure!(q(res.limits.clone(), "cpu").is_none(), "no CPU limit: {res:?}");
    let (database, rows_seen) = pod_counts(&preview_ip(&ns, "q1").await?).await?;
    ensure!(database == b[0].database && rows_seen == rows(3, 5, 7), "{database}: {rows_seen:?}");
    // The server's pod deleted (evicted, say): its data is gone, and Status
    // says so instead of Ready.
    ns.api::<Pod>().delete(&b[0].server, &kube::api::DeleteParams::default().grace_period(0)).await?;
    let lost = eventually("Status to show the branch lost", Duration::from_secs(60), || {
        let mut c = c.clone();
        async move { Ok(branches(&mut c, "q1").await?.into_iter().find(|b| b.phase == "Failed")) }
    })
    .await?;
    ensure!(lost.reason.contains(&format!("branch server {} is lost (its pod is gone)", lost.server)), "{lost:?}");
    c.clean(proto::CleanRequest { selector: Some(proto::clean_request::Selector::Key("q1".into())) }).await?;
    eventually("the branch server's objects to go", Duration::from_secs(60), || async {
        let secret = ns.api::<Secret>().get_opt(&lost.server).await?;
        Ok((servers(&ns).await?.is_empty() && secret.is_none()).then_some(()))
    })
    .await?;
    drop(previewd);
    Ok(())
}
