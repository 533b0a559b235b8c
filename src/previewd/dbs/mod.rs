//! Database branches in previewd: the engines (`pg` for PostgreSQL, `my`
//! for MariaDB and MySQL), talking to a source database and to a branch
//! server, and copying one into the other with the engine's own dump tools
//! (`tools`). The manager decides what exists (from its records); this
//! module only does it, through the functions below, which pick the engine.

use std::collections::BTreeMap;

use crate::model::db::{CopyMode, DbType};

pub mod my;
pub mod pg;
mod pgcopy;
mod tools;

/// What went wrong with a source database or a branch server.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database {addr} is unreachable: {reason}")]
    Unavailable { addr: String, reason: String },
    /// The source refused what the target's connection says (credentials,
    /// a database that does not exist); never carries a password.
    #[error("{0}")]
    Refused(String),
    #[error("branch server {server}: {reason}")]
    Server { server: String, reason: String },
    #[error("copying {source_db} into branch server {server}: {reason}")]
    Copy { source_db: String, server: String, reason: String },
    #[error("{what}: not ready within {secs} s (creation_timeout_secs)")]
    Timeout { what: String, secs: u64 },
}

/// A password for a branch server or a branch: 128 random bits, hex.
pub fn new_password() -> String {
    let mut b = [0u8; 16];
    // The OS's random source does not fail on Linux once booted.
    getrandom::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Where a database is, and who connects. Debug leaves the password out:
/// these end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct DbAddr {
    pub engine: DbType,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub dbname: String,
}

impl std::fmt::Debug for DbAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}@{}:{}/{}", scheme(self.engine), self.user, self.host, self.port, self.dbname)
    }
}

fn scheme(engine: DbType) -> &'static str {
    match engine {
        DbType::Postgres => "postgres",
        DbType::MySql => "mysql",
    }
}

impl DbAddr {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// This server's error, for a reason of our own.
    fn failed(&self, reason: String) -> DbError {
        DbError::Server { server: self.addr(), reason }
    }

    /// `host:port/database`: what Status may show of a source.
    pub fn source(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    pub fn with_db(&self, dbname: &str) -> DbAddr {
        DbAddr { dbname: dbname.into(), ..self.clone() }
    }

    /// A connection URL, for the preview pods. Our branch names and hex
    /// passwords need no escaping.
    pub fn url(&self) -> String {
        format!("{}://{}:{}@{}:{}/{}", scheme(self.engine), self.user, self.password, self.host, self.port, self.dbname)
    }
}

/// The port a branch server of `engine` listens on.
pub fn server_port(engine: DbType) -> u16 {
    match engine {
        DbType::Postgres => pg::PORT,
        DbType::MySql => my::PORT,
    }
}

/// A branch server's superuser address, at `ip`.
pub fn server_admin(engine: DbType, ip: String, password: String) -> DbAddr {
    let (user, dbname) = match engine {
        DbType::Postgres => (pg::SUPERUSER, "postgres"),
        DbType::MySql => (my::SUPERUSER, ""),
    };
    DbAddr { engine, host: ip, port: server_port(engine), user: user.into(), password, dbname: dbname.into() }
}

/// The source from the target's variables: a URL (`url`), or parts. The
/// error names what is wrong, never a value.
pub fn from_parts(engine: DbType, parts: &BTreeMap<String, String>, name: Option<&str>) -> Result<DbAddr, String> {
    match engine {
        DbType::Postgres => pg::from_parts(parts, name),
        DbType::MySql => my::from_parts(parts, name),
    }
}

/// A source from one variable per part, with the engine's default port
/// and user.
fn from_params(
    engine: DbType,
    parts: &BTreeMap<String, String>,
    name: Option<&str>,
    (port, user): (u16, &str),
) -> Result<DbAddr, String> {
    let host = parts.get("host").cloned().ok_or("gives no host")?;
    let port = match parts.get("port") {
        Some(p) => p.trim().parse().map_err(|_| "port is not a port number".to_string())?,
        None => port,
    };
    Ok(DbAddr {
        engine,
        host,
        port,
        user: parts.get("user").cloned().unwrap_or_else(|| user.into()),
        password: parts.get("password").cloned().unwrap_or_default(),
        dbname: parts.get("database").cloned().or(name.map(str::to_string)).ok_or("gives no database")?,
    })
}

/// Checks that the source answers, with the target's credentials.
pub async fn check_source(a: &DbAddr) -> Result<(), DbError> {
    match a.engine {
        DbType::Postgres => pg::check_source(a).await,
        DbType::MySql => my::check_source(a).await,
    }
}

/// Makes the server ready for snapshots (idempotent).
pub async fn prepare(server: &DbAddr) -> Result<(), DbError> {
    match server.engine {
        DbType::Postgres => pg::prepare(server).await,
        DbType::MySql => my::prepare(server).await,
    }
}

/// When snapshot `snap` was taken; `None` if no whole one exists.
pub async fn snapshot_at(server: &DbAddr, snap: &str) -> Result<Option<i64>, DbError> {
    match server.engine {
        DbType::Postgres => pg::snapshot_at(server, snap).await,
        DbType::MySql => my::snapshot_at(server, snap).await,
    }
}

/// Takes snapshot `snap` of `src`, replacing an older one; a snapshot that
/// `snapshot_at` sees is whole. The caller holds the server's lock.
pub async fn take_snapshot(
    server: &DbAddr,
    src: &DbAddr,
    snap: &str,
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<i64, DbError> {
    match server.engine {
        DbType::Postgres => pg::take_snapshot(server, src, snap, copy, tables).await,
        DbType::MySql => my::take_snapshot(server, src, snap, copy, tables).await,
    }
}

/// What is left of a snapshot made from a first branch, to run behind it.
pub type SnapshotRest = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), DbError>> + Send>>;

/// The first branch of a copy mode, `db` for user `db` with `password`,
/// and snapshot `snap` for the next ones. Returns when the data was read
/// from the source, and what is left of the snapshot (PostgreSQL copies
/// the source once, into the branch, and makes the snapshot from it
/// behind the branch); the caller holds the server's lock until that ends.
pub async fn first_branch(
    server: &DbAddr,
    src: &DbAddr,
    (snap, db, password): (&str, &str, &str),
    copy: CopyMode,
    tables: &BTreeMap<String, Option<String>>,
) -> Result<(i64, Option<SnapshotRest>), DbError> {
    match server.engine {
        DbType::Postgres => pg::first_branch(server, src, (snap, db, password), copy, tables).await,
        DbType::MySql => {
            let taken = my::take_snapshot(server, src, snap, copy, tables).await?;
            my::make_branch(server, snap, db, password).await?;
            Ok((taken, None))
        }
    }
}

/// Drops what a copy killed half-way left (the caller holds the server's lock).
pub async fn drop_partial(server: &DbAddr, snap: &str) -> Result<(), DbError> {
    match server.engine {
        DbType::Postgres => pg::drop_partial(server, snap).await,
        DbType::MySql => my::drop_partial(server, snap).await,
    }
}

/// Database `db`, cloned from `snap`, for a user `db` that may use only
/// it, with `password`. Idempotent.
pub async fn make_branch(server: &DbAddr, snap: &str, db: &str, password: &str) -> Result<(), DbError> {
    match server.engine {
        DbType::Postgres => pg::make_branch(server, snap, db, password).await,
        DbType::MySql => my::make_branch(server, snap, db, password).await,
    }
}

/// Drops an environment's database and user. Idempotent.
pub async fn drop_branch(server: &DbAddr, db: &str) -> Result<(), DbError> {
    match server.engine {
        DbType::Postgres => pg::drop_branch(server, db).await,
        DbType::MySql => my::drop_branch(server, db).await,
    }
}

/// Every database's size, in bytes, and the time of each snapshot (and, for
/// PostgreSQL, of each mode's first branch).
pub async fn sizes(server: &DbAddr) -> Result<BTreeMap<String, (i64, Option<i64>)>, DbError> {
    match server.engine {
        DbType::Postgres => pg::sizes(server).await,
        DbType::MySql => my::sizes(server).await,
    }
}
