//! PostgreSQL's copy from a source into a branch server: Debian's
//! `pg_dump | psql`, every session on the source read-only, each load one
//! transaction, filtered tables copied row by row between a dump's sections.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tokio::process::Command;

use super::tools::{self, pipe};
use super::{DbAddr, DbError};
use crate::model::db::CopyMode;

/// Debian's tools of the server's major version, else whatever is on PATH.
fn tool(name: &str) -> PathBuf {
    let p = PathBuf::from("/usr/lib/postgresql/15/bin").join(name);
    if p.exists() { p } else { PathBuf::from(name) }
}

/// A tool connected to `a` through the environment (no password on a
/// command line).
fn command(name: &str, a: &DbAddr, options: &str) -> Command {
    let mut c = tools::command(&tool(name));
    c.env("PGHOST", &a.host)
        .env("PGPORT", a.port.to_string())
        .env("PGUSER", &a.user)
        .env("PGPASSWORD", &a.password)
        .env("PGDATABASE", &a.dbname)
        .env("PGOPTIONS", options)
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PGAPPNAME", "previewd");
    c
}

/// Copies what `copy` and `tables` ask from `src` into `dst` (an empty
/// database, once `ready`), as role `owner` (what it makes is the role's),
/// with mirrord's meaning: `empty` copies nothing but the listed
/// tables (schema, and the rows their filter matches); `schema` every
/// table's schema, and the listed tables' matching rows; `all` everything,
/// but only the matching rows of a listed table. A table without a filter
/// gets all its rows. The source is only read: every session on it is read-only.
pub async fn copy_into(
    src: &DbAddr,
    dst: &DbAddr,
    owner: &str,
    (copy, tables): (CopyMode, &BTreeMap<String, Option<String>>),
    ready: impl std::future::Future<Output = Result<(), DbError>>,
) -> Result<(), DbError> {
    let failed = |reason| DbError::Copy { source_db: src.source(), server: dst.addr(), reason };
    const READ_ONLY: &str = "-c default_transaction_read_only=on";
    let as_owner = format!("-c role={owner}");
    // One transaction per load: on the branch server (wal_level=minimal)
    // the tables it makes are loaded without WAL, and a failed load leaves nothing.
    let restore = || {
        let mut c = command("psql", dst, &as_owner);
        c.args(["-X", "-q", "-1", "-v", "ON_ERROR_STOP=1"]);
        c
    };
    let dump = |args: &[String]| {
        let mut c = command("pg_dump", src, READ_ONLY);
        c.args(["--no-owner", "--no-acl"]).args(args);
        c
    };
    if tables.is_empty() {
        let args: &[String] = match copy {
            CopyMode::Empty => return ready.await,
            CopyMode::Schema => &["--schema-only".into()],
            CopyMode::All => &[],
        };
        // The dump starts while `dst` is made ready: it reads the source's
        // catalog before it writes anything.
        let left = tools::start(dump(args)).map_err(failed)?;
        ready.await?;
        return tools::into(left, restore()).await.map_err(failed);
    }
    ready.await?;
    let listed = async {
        // Schema first, then rows, then indexes and constraints (as pg_dump
        // itself orders a restore), so filtered rows load like the rest.
        let patterns: Vec<String> = tables.keys().map(|t| table(t)).collect();
        let only: Vec<String> = match copy {
            CopyMode::Empty => patterns.iter().flat_map(|p| ["-t".to_string(), p.clone()]).collect(),
            _ => Vec::new(),
        };
        let section = |s: &str| [only.clone(), vec![format!("--section={s}")]].concat();
        pipe(dump(&section("pre-data")), restore()).await?;
        if copy == CopyMode::All {
            let mut args = vec!["--section=data".to_string()];
            args.extend(patterns.iter().map(|p| format!("--exclude-table-data={p}")));
            pipe(dump(&args), restore()).await?;
        }
        for (t, filter) in tables {
            let q = table(t);
            let select = match filter {
                Some(w) => format!("COPY (SELECT * FROM {q} WHERE {w}) TO STDOUT"),
                None => format!("COPY {q} TO STDOUT"),
            };
            let mut from = command("psql", src, READ_ONLY);
            from.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &select]);
            let mut into = restore();
            into.args(["-c", &format!("COPY {q} FROM STDIN")]);
            pipe(from, into).await.map_err(|e| format!("table {t}: {e}"))?;
        }
        pipe(dump(&section("post-data")), restore()).await
    };
    listed.await.map_err(failed)
}

/// `"name"`, for SQL and for pg_dump's patterns.
pub(super) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` or `table`, each part quoted.
pub(super) fn table(s: &str) -> String {
    s.split('.').map(ident).collect::<Vec<_>>().join(".")
}
