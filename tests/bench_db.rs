//! `make bench-db` (ignored by `cargo test`): how long a database branch
//! takes to be Ready, against the same copy done by hand, in one run, on
//! the real cluster and staging's real PostgreSQL.
//!
//! The source has 100 tables (each with a primary key and an index) and a
//! table of about 100 MB of rows. previewd (the release binary) makes, in
//! turn: an `empty` branch (the first branch of the source: what it takes
//! is the branch server's start, paid once per source and namespace), a
//! `schema` branch and an `all` branch (each the first of its copy mode: a
//! new snapshot on the running server, then the clone), then three more
//! `all` branches, cloned from that snapshot. Each is timed from Start sent
//! to Start answered (Start returns once the branch is Ready). The hand
//! copies are `pg_dump … | psql` by bash into a new database on the same
//! running branch server, with the same tools and options.
//!
//! The last line is `db: first branch X.XX x hand copy, second branch N ms`:
//! X.XX is the larger of the `schema` and `all` ratios (the server's start
//! is printed on its own line, not in X.XX), N the median of the three clones.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use k8s_openapi::api::core::v1::{Pod, Secret};
use serde_json::json;

const NODE: &str = "198.18.255.254";
const TABLES: usize = 100;
/// Rows of ~200 bytes in `bulk`: about 100 MB on disk.
const BULK_ROWS: i64 = 450_000;
const CLONES: usize = 3;

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
             /usr/lib/postgresql/15/bin/psql -X -q -v ON_ERROR_STOP=1 \"$DST\" >/dev/null"
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
    let mut start = async |copy: &str, key: &str| -> Result<(Duration, String)> {
        let t = Instant::now();
        let r = client.start(start_req(&config(copy), "preview.local/echo:v2", key)).await?.into_inner();
        let took = t.elapsed();
        let b = r.environment.context("environment")?.db_branches;
        ensure!(b.len() == 1 && b[0].phase == "Ready", "{key}: {b:?}");
        Ok((took, b[0].server.clone()))
    };

    let (server_start, server) = start("empty", "empty").await?;
    let (schema, _) = start("schema", "schema").await?;
    let (all, _) = start("all", "all").await?;
    let mut clones = Vec::new();
    for i in 0..CLONES {
        clones.push(start("all", &format!("clone{i}")).await?.0);
    }
    clones.sort();

    // The same copies by hand, into the same server.
    let secret = ns.api::<Secret>().get(&server).await?;
    let pw = secret.data.unwrap_or_default().get("password").map(|b| String::from_utf8_lossy(&b.0).into_owned());
    let ip = ns.api::<Pod>().get(&server).await?.status.and_then(|s| s.pod_ip).context("server IP")?;
    let server_url = format!("postgres://preview:{}@{ip}:5432", pw.unwrap_or_default());
    let hand_schema = hand_copy(&server_url, &src, "hand_schema", "--schema-only").await?;
    let hand_all = hand_copy(&server_url, &src, "hand_all", "").await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let r_schema = schema.as_secs_f64() / hand_schema.as_secs_f64();
    let r_all = all.as_secs_f64() / hand_all.as_secs_f64();
    println!("empty, first branch of the source (the branch server's start): {:.0} ms", ms(server_start));
    println!(
        "schema, first branch of the mode (new snapshot): {:.0} ms; by hand {:.0} ms; {r_schema:.2} x",
        ms(schema),
        ms(hand_schema)
    );
    println!(
        "schema plus the server's start (the two lines above): {:.0} ms; {:.2} x",
        ms(schema + server_start),
        (schema + server_start).as_secs_f64() / hand_schema.as_secs_f64()
    );
    println!(
        "all, first branch of the mode (new snapshot): {:.0} ms; by hand {:.0} ms; {r_all:.2} x",
        ms(all),
        ms(hand_all)
    );
    println!("all, from the snapshot: {:?} ms", clones.iter().map(|d| ms(*d).round()).collect::<Vec<_>>());
    let every = preview::proto::clean_request::Selector::Glob("*".into());
    client.clean(preview::proto::CleanRequest { selector: Some(every) }).await?;
    admin.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)")).await?;
    println!("db: first branch {:.2} x hand copy, second branch {:.0} ms", r_schema.max(r_all), ms(clones[CLONES / 2]));
    Ok(())
}
