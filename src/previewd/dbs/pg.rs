//! PostgreSQL branches. A branch server holds, per copy mode, a snapshot
//! database of the source, and one database per environment cloned from it
//! with `CREATE DATABASE … TEMPLATE`, a file copy inside the server. The
//! first branch of a mode is copied straight from the source
//! (`pg_dump | psql`, Debian's tools), and the snapshot is cloned from it
//! before its role may log in; `refresh` copies the source into a new one.
//!
//! Snapshot objects are owned by `preview_snapshot` (a superuser that
//! cannot log in, so its objects can be handed over: the bootstrap
//! superuser's cannot); each clone hands them to the environment's own
//! role, which may connect to its database only.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, NoTls};

use super::pgcopy::{copy_into, ident};
use super::{DbAddr, DbError, SnapshotRest};
use crate::model::db::{CopyMode, DbType};

/// The role that owns what a snapshot holds.
const SNAPSHOT_OWNER: &str = "preview_snapshot";
/// The branch server's superuser (`initdb -U`).
pub const SUPERUSER: &str = "preview";
/// Marks a snapshot database's comment, with when it was taken.
const TAKEN: &str = "preview snapshot taken_ms=";

/// The port of a branch server.
pub const PORT: u16 = 5432;

fn config(a: &DbAddr, timeout: Duration) -> Config {
    let mut c = Config::new();
    c.host(&a.host)
        .port(a.port)
        .user(&a.user)
        .password(&a.password)
        .dbname(&a.dbname)
        .connect_timeout(timeout)
        // A kept session to a server gone unheard ends within a minute or so.
        .keepalives_idle(Duration::from_secs(30))
        .application_name("previewd");
    c
}

/// The source from the target's variables: a URL (`url`), or parts. The
/// error names what is wrong, never a value.
pub fn from_parts(parts: &BTreeMap<String, String>, name: Option<&str>) -> Result<DbAddr, String> {
    if let Some(url) = parts.get("url") {
        let c: Config = url.parse().map_err(|_| "is not a PostgreSQL connection URL".to_string())?;
        let host = match c.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            _ => return Err("names no TCP host".into()),
        };
        let dbname = c.get_dbname().map(str::to_string).or(name.map(str::to_string));
        return Ok(DbAddr {
            engine: DbType::Postgres,
            host,
            port: c.get_ports().first().copied().unwrap_or(5432),
            user: c.get_user().unwrap_or("postgres").to_string(),
            password: c.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default(),
            dbname: dbname.ok_or("names no database, and the branch gives no name")?,
        });
    }
    super::from_params(DbType::Postgres, parts, name, (5432, "postgres"))
}

/// Connects; the connection's task runs until the client is dropped.
pub async fn connect(a: &DbAddr, timeout: Duration) -> Result<Client, DbError> {
    let unavailable = |reason: String| DbError::Unavailable { addr: a.addr(), reason };
    match tokio::time::timeout(timeout, config(a, timeout).connect(NoTls)).await {
        Err(_) => Err(unavailable(format!("no answer within {} s", timeout.as_secs()))),
        Ok(Err(e)) => Err(classify(&e, a).unwrap_or_else(|| unavailable(e.to_string()))),
        Ok(Ok((client, conn))) => {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "postgres connection ended");
                }
            });
            Ok(client)
        }
    }
}

/// Superuser sessions kept per branch server (address, user, password,
/// database), so that a branch pays no login. Shared: only single
/// statements go through one, never a transaction of several. A closed one
/// is opened again; one that stops answering is dropped by `prepare`.
static ADMIN: LazyLock<Mutex<BTreeMap<String, Arc<Client>>>> = LazyLock::new(Default::default);

fn admin_key(server: &DbAddr) -> String {
    format!("{}|{}|{}|{}", server.addr(), server.user, server.password, server.dbname)
}

/// The kept superuser session to `server`.
async fn admin(server: &DbAddr) -> Result<Arc<Client>, DbError> {
    let key = admin_key(server);
    if let Some(c) = ADMIN.lock().unwrap_or_else(|e| e.into_inner()).get(&key).filter(|c| !c.is_closed()) {
        return Ok(c.clone());
    }
    let c = Arc::new(connect(server, Duration::from_secs(5)).await?);
    let mut kept = ADMIN.lock().unwrap_or_else(|e| e.into_inner());
    kept.retain(|_, c| !c.is_closed());
    kept.insert(key, c.clone());
    Ok(c)
}

/// A refusal by the server (credentials, database): `None` for the network.
fn classify(e: &tokio_postgres::Error, a: &DbAddr) -> Option<DbError> {
    let db = e.as_db_error()?;
    let code = db.code();
    Some(if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
        DbError::Refused(format!("{} refused the credentials of user {:?}", a.addr(), a.user))
    } else if *code == SqlState::INVALID_CATALOG_NAME {
        DbError::Refused(format!("database {:?} does not exist on {}", a.dbname, a.addr()))
    } else {
        DbError::Refused(format!("{} refused the connection: {}", a.addr(), db.message()))
    })
}

/// Runs statements one by one: a multi-statement query is one implicit
/// transaction, where CREATE and DROP DATABASE may not run.
async fn each(c: &Client, server: &DbAddr, statements: &[String]) -> Result<(), DbError> {
    for s in statements {
        c.batch_execute(s).await.map_err(|e| server_err(server, e))?;
    }
    Ok(())
}

fn server_err(server: &DbAddr, e: tokio_postgres::Error) -> DbError {
    let reason = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
    DbError::Server { server: server.addr(), reason }
}

/// Checks that the source answers, with the target's credentials.
pub async fn check_source(a: &DbAddr) -> Result<(), DbError> {
    let c = connect(a, Duration::from_secs(5)).await?;
    c.simple_query("SELECT 1").await.map_err(|e| DbError::Refused(format!("{}: {e}", a.addr())))?;
    Ok(())
}

/// Makes the server ready for snapshots, and its own databases closed to
/// the branches' roles (idempotent).
pub async fn prepare(server: &DbAddr) -> Result<(), DbError> {
    let c = admin(server).await?;
    let sql = format!(
        "DO $$BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SNAPSHOT_OWNER}') THEN \
         CREATE ROLE {SNAPSHOT_OWNER} SUPERUSER NOLOGIN; \
         REVOKE CONNECT, TEMPORARY ON DATABASE postgres, template1 FROM PUBLIC; END IF; END$$"
    );
    // The test of a kept session too: one whose server went away unheard
    // would hang every branch on it.
    match tokio::time::timeout(Duration::from_secs(5), c.batch_execute(&sql)).await {
        Ok(r) => r.map_err(|e| server_err(server, e)),
        Err(_) => {
            ADMIN.lock().unwrap_or_else(|e| e.into_inner()).remove(&admin_key(server));
            Err(DbError::Unavailable { addr: server.addr(), reason: "no answer within 5 s".into() })
        }
    }
}

/// When snapshot `snap` was taken; `None` if it does not exist.
pub async fn snapshot_at(server: &DbAddr, snap: &str) -> Result<Option<i64>, DbError> {
    let c = admin(server).await?;
    let row = c
        .query_opt("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1", &[&snap])
        .await
        .map_err(|e| server_err(server, e))?;
    Ok(row.map(|r| {
        let comment: Option<String> = r.get(0);
        comment.and_then(|c| c.strip_prefix(TAKEN)?.parse().ok()).unwrap_or(0)
    }))
}

/// Takes snapshot `snap` of `src` (replacing an older one): copied into a
/// temporary database first, renamed once whole, so a snapshot that exists
/// is complete. Returns when it was taken. The caller holds the server's lock.
pub async fn take_snapshot(
    server: &DbAddr,
    src: &DbAddr,
    snap: &str,
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<i64, DbError> {
    let tmp = format!("tmp_{snap}");
    let c = connect(server, Duration::from_secs(5)).await?;
    let t = ident(&tmp);
    let began = std::time::Instant::now();
    let fresh = [format!("DROP DATABASE IF EXISTS {t} WITH (FORCE)"), format!("CREATE DATABASE {t}")];
    let made = each(&c, server, &fresh);
    copy_into(src, &server.with_db(&tmp), SNAPSHOT_OWNER, (copy, tables), made).await?;
    tracing::info!(server = %server.addr(), snap, copy_ms = began.elapsed().as_millis() as u64, "snapshot copied");
    let taken = crate::model::now_ms();
    publish_snapshot(&c, server, &tmp, snap, taken).await?;
    Ok(taken)
}

/// The first branch of a copy mode: database `db` copied straight from
/// `src` (a snapshot and then a clone would copy it twice), then snapshot
/// `snap` made from it inside the server, before role `db` may log in.
/// Returns when the data was read, and the rest of the snapshot, to run
/// behind the branch while the caller still holds the server's lock.
/// Idempotent: a branch whose role may log in is whole; any other is made again.
pub async fn first_branch(
    server: &DbAddr,
    src: &DbAddr,
    (snap, db, password): (&str, &str, &str),
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<(i64, Option<SnapshotRest>), DbError> {
    let t0 = std::time::Instant::now();
    let c = admin(server).await?;
    let t_connect = t0.elapsed();
    let e = |e| server_err(server, e);
    let whole = "SELECT shobj_description(r.oid, 'pg_authid') FROM pg_roles r \
                 JOIN pg_database d ON d.datname = r.rolname WHERE r.rolname = $1 AND r.rolcanlogin";
    if let Some(row) = c.query_opt(whole, &[&db]).await.map_err(e)? {
        let comment: Option<String> = row.get(0);
        return Ok((comment.and_then(|c| c.strip_prefix(TAKEN)?.parse().ok()).unwrap_or(0), None));
    }
    let (d, tmp) = (ident(db), format!("tmp_{snap}"));
    let t = ident(&tmp);
    // A superuser while it loads, as the snapshot owner is (a dump may make
    // extensions only a superuser can), so that what it makes is its own.
    // Made anew: no session of an older role of that name gains the rights.
    let fresh = [
        format!("DROP DATABASE IF EXISTS {t} WITH (FORCE)"),
        format!("DROP DATABASE IF EXISTS {d} WITH (FORCE)"),
        format!("DROP ROLE IF EXISTS {d}"),
        format!("CREATE ROLE {d} SUPERUSER NOLOGIN"),
        format!("CREATE DATABASE {d} OWNER {d}"),
        format!("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC"),
    ];
    let setup = async {
        each(&c, server, &fresh).await?;
        tracing::debug!(database = db, ms = t0.elapsed().as_millis() as u64, "branch database made");
        Ok(())
    };
    // The snapshot's copy gets its own session, opened meanwhile.
    let cloner = async {
        let cloner = connect(server, Duration::from_secs(5)).await?;
        let pid: i32 = cloner.query_one("SELECT pg_backend_pid()", &[]).await.map_err(e)?.get(0);
        Ok::<_, DbError>((cloner, pid))
    };
    let dst = server.with_db(db);
    let (copied, cloner) = tokio::join!(copy_into(src, &dst, db, (copy, tables), setup), cloner);
    copied?;
    let (cloner, pid) = cloner?;
    let t_copy = t0.elapsed();
    let taken = crate::model::now_ms();
    // CREATE DATABASE … TEMPLATE takes a lock on `db` that holds every new
    // connection back until the copy is made: once it has that lock, what
    // the branch's pods write cannot reach the snapshot.
    let clone_sql = format!("CREATE DATABASE {t} TEMPLATE {d} STRATEGY = FILE_COPY");
    let clone = tokio::spawn(async move { cloner.batch_execute(&clone_sql).await });
    let locked = "SELECT 1 FROM pg_locks l JOIN pg_database d ON l.objid = d.oid WHERE l.pid = $1 \
                  AND l.locktype = 'object' AND l.classid = 'pg_database'::regclass AND l.granted AND d.datname = $2";
    while !clone.is_finished() && c.query_opt(locked, &[&pid, &db]).await.map_err(e)?.is_none() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Whole: its time, then the login, which marks it so. On the role: a
    // comment on the database would wait for the snapshot's copy.
    // One transaction; a password we made: hex, nothing to escape.
    let ready =
        format!("COMMENT ON ROLE {d} IS '{TAKEN}{taken}'; ALTER ROLE {d} NOSUPERUSER LOGIN PASSWORD '{password}'");
    let t_locked = t0.elapsed();
    c.batch_execute(&ready).await.map_err(e)?;
    let ms = |d: Duration| d.as_millis() as u64;
    tracing::info!(
        server = %server.addr(),
        database = db,
        connect_ms = ms(t_connect),
        copy_ms = ms(t_copy - t_connect),
        lock_ms = ms(t_locked - t_copy),
        login_ms = ms(t0.elapsed() - t_locked),
        "branch copied"
    );
    let (server, db, snap) = (server.clone(), db.to_string(), snap.to_string());
    let rest = async move {
        let made = async {
            clone
                .await
                .map_err(|j| server.failed(format!("the snapshot's copy: {j}")))?
                .map_err(|e| server_err(&server, e))?;
            // Its objects go to the snapshot owner, so that role `db` can be
            // dropped with its branch; REASSIGN takes database `db` too, given back at once.
            let inside = connect(&server.with_db(&tmp), Duration::from_secs(5)).await?;
            let (d, o) = (ident(&db), SNAPSHOT_OWNER);
            let sql = format!("BEGIN; REASSIGN OWNED BY {d} TO {o}; ALTER DATABASE {d} OWNER TO {d}; COMMIT");
            inside.batch_execute(&sql).await.map_err(|e| server_err(&server, e))?;
            drop(inside);
            publish_snapshot(&c, &server, &tmp, &snap, taken).await
        };
        let r = made.await;
        if r.is_err() {
            // A snapshot half-made holds role `db`: the next branch makes one anew.
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&tmp))).await;
        }
        r
    };
    Ok((taken, Some(Box::pin(rest))))
}

/// Puts whole snapshot `tmp` in the place of `snap`, with when it was taken.
async fn publish_snapshot(c: &Client, server: &DbAddr, tmp: &str, snap: &str, taken: i64) -> Result<(), DbError> {
    let (t, s) = (ident(tmp), ident(snap));
    each(
        c,
        server,
        &[
            format!("DROP DATABASE IF EXISTS {s} WITH (FORCE)"),
            format!("ALTER DATABASE {t} RENAME TO {s}"),
            format!("COMMENT ON DATABASE {s} IS '{TAKEN}{taken}'"),
            format!("REVOKE CONNECT, TEMPORARY ON DATABASE {s} FROM PUBLIC"),
        ],
    )
    .await
}

/// Drops what a copy killed half-way left (the caller holds the server's lock).
pub async fn drop_partial(server: &DbAddr, snap: &str) -> Result<(), DbError> {
    let c = connect(server, Duration::from_secs(5)).await?;
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", ident(&format!("tmp_{snap}"))))
        .await
        .map_err(|e| server_err(server, e))
}

/// Database `db`, cloned from `snap`, owned by role `db` (which may log in
/// with `password` and connect to this database only). Idempotent.
pub async fn make_branch(server: &DbAddr, snap: &str, db: &str, password: &str) -> Result<(), DbError> {
    let c = admin(server).await?;
    let e = |e| server_err(server, e);
    // A password we made: hex, nothing to escape.
    let verb = if c.query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&db]).await.map_err(e)?.is_some() {
        "ALTER"
    } else {
        "CREATE"
    };
    c.batch_execute(&format!("{verb} ROLE {} LOGIN PASSWORD '{password}'", ident(db))).await.map_err(e)?;
    if c.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db]).await.map_err(e)?.is_none() {
        let (d, s) = (ident(db), ident(snap));
        each(
            &c,
            server,
            &[
                // A file copy: WAL_LOG (the default) writes every page to the WAL too.
                format!("CREATE DATABASE {d} TEMPLATE {s} OWNER {d} STRATEGY = FILE_COPY"),
                format!("REVOKE CONNECT, TEMPORARY ON DATABASE {d} FROM PUBLIC"),
            ],
        )
        .await?;
    }
    let inside = connect(&server.with_db(db), Duration::from_secs(5)).await?;
    inside.batch_execute(&format!("REASSIGN OWNED BY {SNAPSHOT_OWNER} TO {}", ident(db))).await.map_err(e)
}

/// Drops an environment's database and role. Idempotent.
pub async fn drop_branch(server: &DbAddr, db: &str) -> Result<(), DbError> {
    let c = connect(server, Duration::from_secs(5)).await?;
    let d = ident(db);
    each(&c, server, &[format!("DROP DATABASE IF EXISTS {d} WITH (FORCE)"), format!("DROP ROLE IF EXISTS {d}")]).await
}

/// Every database's size, in bytes, and the time of each snapshot and of
/// each mode's first branch.
pub async fn sizes(server: &DbAddr) -> Result<BTreeMap<String, (i64, Option<i64>)>, DbError> {
    let c = connect(server, Duration::from_secs(5)).await?;
    let rows = c
        .query(
            // A snapshot's time is on its database; a mode's first branch
            // has its own, on its role.
            "SELECT d.datname, pg_database_size(d.oid), \
             COALESCE(shobj_description(d.oid, 'pg_database'), shobj_description(r.oid, 'pg_authid')) \
             FROM pg_database d LEFT JOIN pg_roles r ON r.rolname = d.datname \
             WHERE NOT d.datistemplate OR d.datname LIKE 'snap\\_%'",
            &[],
        )
        .await
        .map_err(|e| server_err(server, e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let comment: Option<String> = r.get(2);
            let taken = comment.and_then(|c| c.strip_prefix(TAKEN)?.parse().ok());
            // NULL while the database is being made or dropped: not known yet.
            let size: Option<i64> = r.get(1);
            (r.get::<_, String>(0), (size.unwrap_or(-1), taken))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::pgcopy::table;
    use super::*;

    #[test]
    fn sources_from_a_url_or_parts() {
        let url = BTreeMap::from([("url".to_string(), "postgres://u:p%40w@db.example:6543/orders".to_string())]);
        let a = from_parts(&url, None).unwrap();
        assert_eq!((a.host.as_str(), a.port, a.user.as_str(), a.dbname.as_str()), ("db.example", 6543, "u", "orders"));
        assert_eq!(a.password, "p@w");
        assert!(!format!("{a:?}").contains("p@w"), "Debug shows no password");
        let parts = BTreeMap::from([("host".to_string(), "h".to_string()), ("password".to_string(), "x".to_string())]);
        assert_eq!(from_parts(&parts, Some("orders")).unwrap().dbname, "orders");
        assert!(from_parts(&parts, None).unwrap_err().contains("database"));
        let bad = BTreeMap::from([("url".to_string(), "not a url at all ===".to_string())]);
        let e = from_parts(&bad, None).unwrap_err();
        assert!(!e.contains("==="), "the error shows no value: {e}");
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(table("public.orders"), "\"public\".\"orders\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }
}
