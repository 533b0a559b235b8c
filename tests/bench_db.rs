//! `make bench-db` (ignored by `cargo test`): how long a database branch
//! takes to be Ready, against the same copy done by hand, in one run, on
//! the real cluster and staging's real PostgreSQL.
//!
//! The source has 100 tables (each with a primary key and an index) and a
//! table of about 100 MB of rows. Each of 5 rounds starts from no branch
//! server and has previewd (the release binary) make, in turn: an `empty`
//! branch (the first branch of the source: what it takes is the branch
//! server's start, paid once per source and namespace), a `schema` branch
//! and an `all` branch (each the first of its copy mode: copied from the
//! source into its database on the running server, the mode's snapshot
//! then cloned from it behind the branch), then two more `all` branches,
//! cloned from that snapshot; then Clean, which removes the server. Each is
//! timed from Start sent to Start answered (Start returns once the branch
//! is Ready). Each first branch is paired with the same copy by hand,
//! `pg_dump … | psql` by bash into a new database on the same running
//! branch server, with the same tools and options; the pair's order flips
//! every round. Nothing is timed until every pod in the namespace is Ready
//! and none is terminating, and no snapshot is being made: a preview pod
//! still starting, or a snapshot's copy, would take the 2 cores from
//! whichever side is timed next.
//!
//! The last line is `db: first branch X.XX x hand copy, second branch N ms`:
//! X.XX is the larger of the `schema` and `all` ratios of medians (previewd's
//! median over the rounds, over the hand copies' median; the server's start
//! is printed on its own line, not in X.XX), N the median of the clones.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use serde_json::json;

const NODE: &str = "198.18.255.254";
const TABLES: usize = 100;
/// Rows of ~200 bytes in `bulk`: about 100 MB on disk.
const BULK_ROWS: i64 = 450_000;
/// Rounds: the 2 cores make any one pair of timings noisy (±30 %).
const ROUNDS: usize = 5;
/// Branches cloned from the snapshot, per round.
const CLONES: usize = 2;

fn staging_url(db: &str) -> String {
    format!("postgres://staging:staging-pw@{NODE}:5432/{db}")
}

async fn pg(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(c)
}

fn config(copy: &str) -> String {
    json!({"target": "deployment/orders", "feature": {"db_branches": [{
        "type": "pg",
        "connection": {"url": {"type": "env", "variable": "DATABASE_URL"}},
        "copy": {"mode": copy},
        "creation_timeout_secs": 600,
    }]}})
    .to_string()
}

/// `pg_dump src | psql dst` by bash, into a new database `db` on the server.
async fn hand_copy(server: &str, src: &str, db: &str, args: &str) -> Result<Duration> {
    let admin = pg(&format!("{server}/postgres")).await?;
    let t = Instant::now();
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    let st = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; /usr/lib/postgresql/15/bin/pg_dump {args} --no-owner --no-acl \"$SRC\" | \
             /usr/lib/postgresql/15/bin/psql -X -q -1 -v ON_ERROR_STOP=1 \"$DST\" >/dev/null"
        ))
        .env("SRC", src)
        .env("DST", format!("{server}/{db}"))
        .status()
        .await?;
    let took = t.elapsed();
    ensure!(st.success(), "the hand copy failed: {st}");
    admin.batch_execute(&format!("DROP DATABASE {db}")).await?;
    Ok(took)
}

#[tokio::test]
#[ignore = "benchmark: run with `make bench-db`"]
async fn bench_db() -> Result<()> {
    let ns = TestNs::new("b-db").await?;
    let db = format!("bench_{}", ns.name.replace('-', "_"));
    let admin = pg(&staging_url("orders")).await?;
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
    let src = staging_url(&db);
    let c = pg(&src).await?;
    let mut ddl = String::new();
    for i in 0..TABLES {
        ddl.push_str(&format!(
            "CREATE TABLE t{i:03} (id serial PRIMARY KEY, name text NOT NULL, n int, at timestamptz DEFAULT now());
             CREATE INDEX t{i:03}_n ON t{i:03} (n);"
        ));
    }
    ddl.push_str(&format!(
        "CREATE TABLE bulk (id serial PRIMARY KEY, payload text NOT NULL);
         INSERT INTO bulk (payload) SELECT repeat(md5(i::text), 6) FROM generate_series(1, {BULK_ROWS}) i;"
    ));
    c.batch_execute(&ddl).await?;
    let size: i64 = c.query_one("SELECT pg_database_size(current_database())", &[]).await?.get(0);
    println!("bench-db: source {} tables and bulk, {} MB ({BULK_ROWS} rows in bulk)", TABLES + 1, size >> 20);

    echo_app(&ns, "orders", "v1", 1, &[("DATABASE_URL", &src)]).await?;
    let previewd = LocalPreviewd::spawn(&ns.name)?;
    let addr = previewd.addr.clone();
    let mut client = connect_when_up(&addr).await?;

    let mut times: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut start = async |copy: &str, key: &str| -> Result<(Duration, String)> {
            settled(&ns).await?;
            let t = Instant::now();
            let r = client.start(start_req(&config(copy), "preview.local/echo:v2", key)).await?.into_inner();
            let took = t.elapsed();
            let b = r.environment.context("environment")?.db_branches;
            ensure!(b.len() == 1 && b[0].phase == "Ready", "{key}: {b:?}");
            Ok((took, b[0].server.clone()))
        };
        let (server_start, server) = start("empty", &format!("empty{round}")).await?;
        times.entry("start").or_default().push(server_start);
        let server_url = server_url(&ns, &server).await?;
        if round == 0 {
            let wal: String =
                pg(&format!("{server_url}/postgres")).await?.query_one("SHOW wal_level", &[]).await?.get(0);
            println!("branch server {server}: wal_level {wal}");
        }
        for (mode, args) in [("schema", "--schema-only"), ("all", "")] {
            let key = format!("{mode}{round}");
            let hand = format!("hand_{mode}{round}");
            let hand_first = round % 2 == 1;
            if hand_first {
                settled(&ns).await?;
                times.entry(hand_key(mode)).or_default().push(hand_copy(&server_url, &src, &hand, args).await?);
            }
            times.entry(mode).or_default().push(start(mode, &key).await?.0);
            snapshot_made(&server_url, mode).await?;
            if !hand_first {
                settled(&ns).await?;
                times.entry(hand_key(mode)).or_default().push(hand_copy(&server_url, &src, &hand, args).await?);
            }
        }
        for i in 0..CLONES {
            let clone = start("all", &format!("clone{round}x{i}")).await?.0;
            times.entry("clone").or_default().push(clone);
        }
        let every = preview::proto::clean_request::Selector::Glob("*".into());
        client.clean(preview::proto::CleanRequest { selector: Some(every) }).await?;
        // The next round starts a server of its own.
        eventually("the branch server to go", Duration::from_secs(120), || async {
            Ok(ns.api::<Pod>().get_opt(&server).await?.is_none().then_some(()))
        })
        .await?;
        let line: Vec<String> = ["start", "schema", "hand_schema", "all", "hand_all"]
            .iter()
            .map(|k| format!("{k} {:.0}", ms(times[k][round])))
            .collect();
        let clones: Vec<f64> = times["clone"][round * CLONES..].iter().map(|d| ms(*d).round()).collect();
        println!("round {round}: {} ms; clones {clones:?} ms", line.join(", "));
    }
    admin.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)")).await?;

    let med = |k: &str| median(&times[k]);
    let ratio = |k: &str| med(k).as_secs_f64() / med(hand_key(k)).as_secs_f64();
    println!("empty, first branch of the source (the branch server's start), median: {:.0} ms", ms(med("start")));
    for mode in ["schema", "all"] {
        println!(
            "{mode}, first branch of the mode (copied from the source), median: {:.0} ms; by hand {:.0} ms; {:.2} x",
            ms(med(mode)),
            ms(med(hand_key(mode))),
            ratio(mode)
        );
    }
    println!(
        "schema plus the server's start (the medians above): {:.0} ms; {:.2} x",
        ms(med("schema") + med("start")),
        (med("schema") + med("start")).as_secs_f64() / med("hand_schema").as_secs_f64()
    );
    println!(
        "db: first branch {:.2} x hand copy, second branch {:.0} ms",
        ratio("schema").max(ratio("all")),
        ms(med("clone"))
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn hand_key(mode: &str) -> &'static str {
    if mode == "schema" { "hand_schema" } else { "hand_all" }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// The branch server's superuser URL, from its Secret and its pod's address.
async fn server_url(ns: &TestNs, server: &str) -> Result<String> {
    let secret = ns.api::<Secret>().get(server).await?;
    let pw = secret.data.unwrap_or_default().get("password").map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let ip = ns.api::<Pod>().get(server).await?.status.and_then(|s| s.pod_ip).context("server IP")?;
    Ok(format!("postgres://preview:{}@{ip}:5432", pw.context("the server's password")?))
}

/// Waits until the server holds the `mode` snapshot, made behind the
/// mode's first branch, and no snapshot is being made.
async fn snapshot_made(server: &str, mode: &str) -> Result<()> {
    let admin = pg(&format!("{server}/postgres")).await?;
    eventually("the snapshot", Duration::from_secs(120), || async {
        let rows = admin.query("SELECT datname::text FROM pg_database", &[]).await?;
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let made = names.iter().any(|n| n.starts_with(&format!("snap_{mode}")));
        Ok((made && !names.iter().any(|n| n.starts_with("tmp_"))).then_some(()))
    })
    .await
}

/// Waits until every pod in the namespace has its containers ready (a
/// preview pod's Ready waits on a readiness gate no agent sets here) and
/// none is terminating.
async fn settled(ns: &TestNs) -> Result<()> {
    eventually("every pod's containers ready", Duration::from_secs(120), || async {
        let pods = ns.api::<Pod>().list(&Default::default()).await?.items;
        let ready = pods.iter().all(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "ContainersReady" && c.status == "True"))
        });
        Ok(ready.then_some(()))
    })
    .await
}
