//! MariaDB and MySQL branches. A branch server (MariaDB 10.11) holds, per
//! copy mode, a snapshot database made once from the source
//! (`mariadb-dump | mariadb`, Debian's tools), and one database per
//! environment cloned from it inside the server: each table made from the
//! snapshot's `SHOW CREATE TABLE` (keys, indexes and foreign keys kept),
//! then filled by `INSERT … SELECT`, so no row leaves the server. MariaDB
//! has no `CREATE DATABASE … TEMPLATE`; this is the fastest copy that needs
//! no access to the server's files.
//!
//! Whole snapshots and whole clones are marked in `preview_meta`: a copy
//! killed half-way leaves a database without its mark, which is dropped
//! and made again. Clones copy base tables and their rows; views,
//! triggers, routines and events are not copied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder};
use tokio::process::Command;

use super::tools::{self, pipe};
use super::{DbAddr, DbError};
use crate::model::db::{CopyMode, DbType};

/// The port of a branch server.
pub const PORT: u16 = 3306;
/// The branch server's superuser (made by its entrypoint).
pub const SUPERUSER: &str = "preview";
/// Where the marks of whole snapshots and clones live, on a branch server.
const META: &str = "preview_meta";

/// The source from the target's variables: a `mysql://` (or `mariadb://`)
/// URL, or parts. The error names what is wrong, never a value.
pub fn from_parts(parts: &BTreeMap<String, String>, name: Option<&str>) -> Result<DbAddr, String> {
    if let Some(url) = parts.get("url") {
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.clone(),
        };
        let o = Opts::from_url(&url).map_err(|_| "is not a MySQL connection URL (mysql://…)".to_string())?;
        let dbname = o.db_name().or(name).filter(|d| !d.is_empty());
        return Ok(DbAddr {
            engine: DbType::MySql,
            host: o.ip_or_hostname().to_string(),
            port: o.tcp_port(),
            user: o.user().unwrap_or("root").to_string(),
            password: o.pass().unwrap_or_default().to_string(),
            dbname: dbname.ok_or("names no database, and the branch gives no name")?.to_string(),
        });
    }
    super::from_params(DbType::MySql, parts, name, (PORT, "root"))
}

/// Connects over TCP (never a local socket: the address is the truth).
pub async fn connect(a: &DbAddr, timeout: Duration) -> Result<Conn, DbError> {
    let opts = OptsBuilder::default()
        .ip_or_hostname(a.host.clone())
        .tcp_port(a.port)
        .user(Some(a.user.clone()))
        .pass(Some(a.password.clone()))
        .db_name(Some(a.dbname.clone()).filter(|d| !d.is_empty()))
        .prefer_socket(false);
    let unavailable = |reason: String| DbError::Unavailable { addr: a.addr(), reason };
    match tokio::time::timeout(timeout, Conn::new(opts)).await {
        Err(_) => Err(unavailable(format!("no answer within {} s", timeout.as_secs()))),
        Ok(Err(mysql_async::Error::Server(e))) => Err(classify(&e, a)),
        Ok(Err(e)) => Err(unavailable(e.to_string())),
        Ok(Ok(c)) => Ok(c),
    }
}

/// A refusal by the server: credentials, or a database.
fn classify(e: &mysql_async::ServerError, a: &DbAddr) -> DbError {
    DbError::Refused(match e.code {
        1045 => format!("{} refused the credentials of user {:?}", a.addr(), a.user),
        1044 => format!("{} does not let user {:?} use database {:?}", a.addr(), a.user, a.dbname),
        1049 => format!("database {:?} does not exist on {}", a.dbname, a.addr()),
        _ => format!("{} refused the connection: {}", a.addr(), e.message),
    })
}

fn server_err(server: &DbAddr, e: mysql_async::Error) -> DbError {
    let reason = match e {
        mysql_async::Error::Server(s) => s.message,
        e => e.to_string(),
    };
    DbError::Server { server: server.addr(), reason }
}

/// `` `name` ``, for SQL.
fn ident(s: &str) -> String {
    format!("`{}`", s.replace('`', "``"))
}

/// A database name in a GRANT, where `_` and `%` are wildcards.
fn grant_db(s: &str) -> String {
    ident(&s.replace('\\', "\\\\").replace('_', "\\_").replace('%', "\\%"))
}

async fn run(c: &mut Conn, server: &DbAddr, statements: &[String]) -> Result<(), DbError> {
    for s in statements {
        c.query_drop(s).await.map_err(|e| server_err(server, e))?;
    }
    Ok(())
}

/// Checks that the source answers, with the target's credentials.
pub async fn check_source(a: &DbAddr) -> Result<(), DbError> {
    let mut c = connect(a, Duration::from_secs(5)).await?;
    c.query_drop("SELECT 1").await.map_err(|e| DbError::Refused(format!("{}: {e}", a.addr())))?;
    let _ = c.disconnect().await;
    Ok(())
}

/// Makes the server ready for snapshots (idempotent): the marks' tables.
pub async fn prepare(server: &DbAddr) -> Result<(), DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    run(
        &mut c,
        server,
        &[
            format!("CREATE DATABASE IF NOT EXISTS {META}"),
            format!(
                "CREATE TABLE IF NOT EXISTS {META}.snapshots (name VARCHAR(64) PRIMARY KEY, taken_ms BIGINT NOT NULL)"
            ),
            format!("CREATE TABLE IF NOT EXISTS {META}.branches (name VARCHAR(64) PRIMARY KEY)"),
        ],
    )
    .await
}

/// When snapshot `snap` was taken; `None` if no whole one exists.
pub async fn snapshot_at(server: &DbAddr, snap: &str) -> Result<Option<i64>, DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    c.exec_first(format!("SELECT taken_ms FROM {META}.snapshots WHERE name = ?"), (snap,))
        .await
        .map_err(|e| server_err(server, e))
}

/// Takes snapshot `snap` of `src`: its mark goes first and comes back once
/// the copy is whole. Returns when it was taken.
pub async fn take_snapshot(
    server: &DbAddr,
    src: &DbAddr,
    snap: &str,
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<i64, DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    c.exec_drop(format!("DELETE FROM {META}.snapshots WHERE name = ?"), (snap,))
        .await
        .map_err(|e| server_err(server, e))?;
    let s = ident(snap);
    run(&mut c, server, &[format!("DROP DATABASE IF EXISTS {s}"), format!("CREATE DATABASE {s}")]).await?;
    copy_into(src, &server.with_db(snap), copy, tables).await.map_err(|reason| DbError::Copy {
        source_db: src.source(),
        server: server.addr(),
        reason,
    })?;
    let taken = crate::model::now_ms();
    c.exec_drop(format!("INSERT INTO {META}.snapshots (name, taken_ms) VALUES (?, ?)"), (snap, taken))
        .await
        .map_err(|e| server_err(server, e))?;
    Ok(taken)
}

/// Drops snapshot `snap` if a killed copy left it without its mark.
pub async fn drop_partial(server: &DbAddr, snap: &str) -> Result<(), DbError> {
    if snapshot_at(server, snap).await?.is_none() {
        let mut c = connect(server, Duration::from_secs(5)).await?;
        run(&mut c, server, &[format!("DROP DATABASE IF EXISTS {}", ident(snap))]).await?;
    }
    Ok(())
}

/// Database `db`, cloned from `snap`, for user `db` (which may log in with
/// `password` and use this database only). Idempotent: a clone without its
/// mark is made again.
pub async fn make_branch(server: &DbAddr, snap: &str, db: &str, password: &str) -> Result<(), DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    let e = |e| server_err(server, e);
    let (d, s) = (ident(db), ident(snap));
    // A password we made: hex, nothing to escape.
    run(
        &mut c,
        server,
        &[
            format!("CREATE USER IF NOT EXISTS {d}@'%' IDENTIFIED BY '{password}'"),
            format!("ALTER USER {d}@'%' IDENTIFIED BY '{password}'"),
        ],
    )
    .await?;
    let whole: Option<String> =
        c.exec_first(format!("SELECT name FROM {META}.branches WHERE name = ?"), (db,)).await.map_err(e)?;
    if whole.is_none() {
        run(
            &mut c,
            server,
            &[
                format!("DROP DATABASE IF EXISTS {d}"),
                format!("CREATE DATABASE {d}"),
                // Rows go in in any order; the snapshot's are consistent.
                "SET SESSION foreign_key_checks = 0, unique_checks = 0".into(),
            ],
        )
        .await?;
        let tables: Vec<String> = c
            .exec(
                "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_TYPE = 'BASE TABLE'",
                (snap,),
            )
            .await
            .map_err(e)?;
        c.query_drop(format!("USE {d}")).await.map_err(e)?;
        for t in &tables {
            let create: Option<(String, String)> =
                c.query_first(format!("SHOW CREATE TABLE {s}.{}", ident(t))).await.map_err(e)?;
            let (_, create) = create.ok_or_else(|| server.failed(format!("table {t} of {snap} vanished")))?;
            c.query_drop(create).await.map_err(e)?;
        }
        for t in &tables {
            let cols: Vec<String> = c
                .exec(
                    "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
                     AND IS_GENERATED = 'NEVER' ORDER BY ORDINAL_POSITION",
                    (snap, t),
                )
                .await
                .map_err(e)?;
            let cols = cols.iter().map(|col| ident(col)).collect::<Vec<_>>().join(", ");
            let t = ident(t);
            c.query_drop(format!("INSERT INTO {d}.{t} ({cols}) SELECT {cols} FROM {s}.{t}")).await.map_err(e)?;
        }
        c.exec_drop(format!("INSERT INTO {META}.branches (name) VALUES (?)"), (db,)).await.map_err(e)?;
    }
    run(&mut c, server, &[format!("GRANT ALL PRIVILEGES ON {}.* TO {d}@'%'", grant_db(db))]).await?;
    let _ = c.disconnect().await;
    Ok(())
}

/// Drops an environment's database, user and mark. Idempotent.
pub async fn drop_branch(server: &DbAddr, db: &str) -> Result<(), DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    let d = ident(db);
    run(&mut c, server, &[format!("DROP DATABASE IF EXISTS {d}"), format!("DROP USER IF EXISTS {d}@'%'")]).await?;
    c.exec_drop(format!("DELETE FROM {META}.branches WHERE name = ?"), (db,)).await.map_err(|e| server_err(server, e))
}

/// Every database's size (data and indexes, as InnoDB estimates them), in
/// bytes, and each whole snapshot's time.
pub async fn sizes(server: &DbAddr) -> Result<BTreeMap<String, (i64, Option<i64>)>, DbError> {
    let mut c = connect(server, Duration::from_secs(5)).await?;
    let rows: Vec<(String, i64, Option<i64>)> = c
        .query(format!(
            "SELECT s.SCHEMA_NAME, CAST(COALESCE(SUM(t.DATA_LENGTH + t.INDEX_LENGTH), 0) AS SIGNED), m.taken_ms \
             FROM information_schema.SCHEMATA s \
             LEFT JOIN information_schema.TABLES t ON t.TABLE_SCHEMA = s.SCHEMA_NAME \
             LEFT JOIN {META}.snapshots m ON m.name = s.SCHEMA_NAME \
             GROUP BY s.SCHEMA_NAME, m.taken_ms"
        ))
        .await
        .map_err(|e| server_err(server, e))?;
    Ok(rows.into_iter().map(|(name, size, taken)| (name, (size, taken))).collect())
}

/// Debian's tool (MariaDB's name), else the MySQL name on PATH.
fn tool(mariadb: &str, mysql: &str) -> PathBuf {
    let p = PathBuf::from("/usr/bin").join(mariadb);
    if p.exists() { p } else { PathBuf::from(mysql) }
}

/// A tool connected to `a` over TCP; the password goes through the
/// environment, not the command line.
fn command(mariadb: &str, mysql: &str, a: &DbAddr) -> Command {
    let mut c = tools::command(&tool(mariadb, mysql));
    c.env("MYSQL_PWD", &a.password).args([
        "--no-defaults",
        "--protocol=TCP",
        &format!("--host={}", a.host),
        &format!("--port={}", a.port),
        &format!("--user={}", a.user),
    ]);
    c
}

/// Copies what `copy` and `tables` ask from `src` into `dst` (an empty
/// database), with mirrord's meaning, as for PostgreSQL: `empty` copies
/// nothing but the listed tables (schema, and the rows their filter
/// matches); `schema` every table's schema, and the listed tables' matching
/// rows; `all` everything, but only the matching rows of a listed table.
/// The source is read in one consistent transaction per dump.
pub async fn copy_into(
    src: &DbAddr,
    dst: &DbAddr,
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<(), String> {
    let restore = || {
        let mut c = command("mariadb", "mysql", dst);
        c.arg(format!("--database={}", dst.dbname));
        c
    };
    let dump = |args: &[String]| {
        let mut c = command("mariadb-dump", "mysqldump", src);
        c.args(["--single-transaction", "--quick", "--no-tablespaces", "--skip-triggers", "--skip-comments"]);
        c.args(args).arg("--").arg(&src.dbname);
        c
    };
    let db = &src.dbname;
    if tables.is_empty() {
        return match copy {
            CopyMode::Empty => Ok(()),
            CopyMode::Schema => pipe(dump(&["--no-data".into()]), restore()).await,
            CopyMode::All => pipe(dump(&[]), restore()).await,
        };
    }
    let schema = match copy {
        // Only the listed tables.
        CopyMode::Empty => {
            let mut c = command("mariadb-dump", "mysqldump", src);
            c.args(["--single-transaction", "--no-tablespaces", "--skip-triggers", "--skip-comments", "--no-data"]);
            c.arg("--").arg(db).args(tables.keys());
            c
        }
        _ => dump(&["--no-data".into()]),
    };
    pipe(schema, restore()).await?;
    if copy == CopyMode::All {
        let mut args = vec!["--no-create-info".to_string()];
        args.extend(tables.keys().map(|t| format!("--ignore-table={db}.{t}")));
        pipe(dump(&args), restore()).await?;
    }
    for (t, filter) in tables {
        let mut c = command("mariadb-dump", "mysqldump", src);
        c.args(["--single-transaction", "--quick", "--no-tablespaces", "--skip-triggers", "--skip-comments"]);
        c.arg("--no-create-info");
        if let Some(w) = filter {
            c.arg(format!("--where={w}"));
        }
        c.arg("--").arg(db).arg(t);
        pipe(c, restore()).await.map_err(|e| format!("table {t}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_from_a_url_or_parts() {
        let url = BTreeMap::from([("url".to_string(), "mysql://u:p%40w@db.example:3307/orders".to_string())]);
        let a = from_parts(&url, None).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.user.as_str(), a.dbname.as_str()), ("db.example", 3307, "u", "orders"));
        assert_eq!(a.password, "p@w");
        assert!(!format!("{a:?}").contains("p@w"), "Debug shows no password");
        let maria = BTreeMap::from([("url".to_string(), "mariadb://u@h/".to_string())]);
        assert_eq!(from_parts(&maria, Some("orders")).unwrap().dbname, "orders");
        assert!(from_parts(&maria, None).unwrap_err().contains("database"));
        let bad = BTreeMap::from([("url".to_string(), "postgres://x:secret@h/db".to_string())]);
        let e = from_parts(&bad, None).unwrap_err();
        assert!(!e.contains("secret"), "the error shows no value: {e}");
        let parts = BTreeMap::from([("host".to_string(), "h".to_string())]);
        assert_eq!(from_parts(&parts, Some("orders")).unwrap().port, PORT);
    }

    #[test]
    fn quotes_identifiers_and_grants() {
        assert_eq!(ident("a`b"), "`a``b`");
        assert_eq!(grant_db("br_k1"), "`br\\_k1`");
    }
}
