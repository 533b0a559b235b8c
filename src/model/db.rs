//! Database branches as a user asks for them (`feature.db_branches`, in
//! mirrord's shape): the engine, where the target keeps its connection, and
//! what to copy. Words only; previewd does not act on them yet.

use std::collections::BTreeMap;

/// The most branches one pod may ask for.
pub const MAX_BRANCHES: usize = 4;
/// The most tables one branch may filter.
pub const MAX_TABLES: usize = 64;
/// The longest table filter (a `WHERE` clause), in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbType {
    Postgres,
    /// `mysql` and `mariadb`: both speak the MySQL protocol.
    MySql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// An empty database (the user's migrations make the schema).
    #[default]
    Empty,
    /// Every table's schema, no rows.
    Schema,
    /// Schema and rows.
    All,
}

/// Where the target's pod spec keeps the source connection: env variable
/// names, never values (the values stay in the pod spec, a ConfigMap or a
/// Secret, and are read by previewd, not by the user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// One variable holding a URL.
    Url { variable: String, container: Option<String> },
    /// One variable per part; at least one is given.
    Params {
        host: Option<String>,
        port: Option<String>,
        user: Option<String>,
        password: Option<String>,
        database: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbBranchAsk {
    pub db_type: DbType,
    /// Shares one branch among environments that give the same id.
    pub id: Option<String>,
    pub version: Option<String>,
    /// The database's name when the connection does not carry it.
    pub name: Option<String>,
    pub ttl_secs: Option<u64>,
    pub creation_timeout_secs: u64,
    pub connection: Connection,
    pub copy: CopyMode,
    /// Per table, the `WHERE` clause of the rows to copy.
    pub tables: BTreeMap<String, Option<String>>,
}
