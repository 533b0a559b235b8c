//! Database branches as plain data: what a user asks for
//! (`feature.db_branches`, in mirrord's shape: the engine, where the target
//! keeps its connection, what to copy), what an environment records about
//! each branch before anything is made, and the names previewd gives the
//! branch server, its snapshots and each environment's database.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The most branches one pod may ask for.
pub const MAX_BRANCHES: usize = 4;
/// The most tables one branch may filter.
pub const MAX_TABLES: usize = 64;
/// The longest table filter (a `WHERE` clause), in bytes.
pub const MAX_FILTER_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbType {
    Postgres,
    /// `mysql` and `mariadb`: both speak the MySQL protocol.
    MySql,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl DbType {
    pub fn as_str(self) -> &'static str {
        match self {
            DbType::Postgres => "pg",
            DbType::MySql => "mysql",
        }
    }
}

impl CopyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::Empty => "empty",
            CopyMode::Schema => "schema",
            CopyMode::All => "all",
        }
    }
}

/// The parts of a connection, each possibly kept in its own variable.
pub const PARTS: [&str; 6] = ["url", "host", "port", "user", "password", "database"];

impl Connection {
    /// `(part, variable)` for each variable the connection names.
    pub fn variables(&self) -> Vec<(&'static str, &str)> {
        match self {
            Connection::Url { variable, .. } => vec![("url", variable.as_str())],
            Connection::Params { host, port, user, password, database } => {
                [("host", host), ("port", port), ("user", user), ("password", password), ("database", database)]
                    .into_iter()
                    .filter_map(|(p, v)| v.as_deref().map(|v| (p, v)))
                    .collect()
            }
        }
    }
}

/// What an environment records about one branch, before anything is made:
/// enough to make, show and drop it. No connection value is kept here (the
/// record is shown on its PreviewEnvironment): the source is read again from
/// the target when needed, the branch's credentials live in `secret`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbBinding {
    pub db_type: DbType,
    /// The preview pod group whose target holds the source connection.
    pub group: String,
    /// The target's container whose variables hold it.
    pub container: String,
    /// `(part, variable)`: which variable holds which part.
    pub variables: Vec<(String, String)>,
    /// The source's database name when no variable carries it.
    pub name: Option<String>,
    /// `host:port/database` of the source: no user, no password.
    pub source: String,
    /// The branch server's Pod, Service and Secret (one per source).
    pub server: String,
    pub copy: CopyMode,
    pub tables: BTreeMap<String, Option<String>>,
    /// The snapshot database this branch is cloned from.
    pub snapshot: String,
    /// The environment's database in the branch server, and its role.
    pub database: String,
    /// The Secret the preview pods read their connection from.
    pub secret: String,
    pub creation_timeout_secs: u64,
}

impl DbBinding {
    /// The connection as asked, from what was recorded.
    pub fn connection(&self) -> Connection {
        let var = |p: &str| self.variables.iter().find(|(part, _)| part == p).map(|(_, v)| v.clone());
        match var("url") {
            Some(variable) => Connection::Url { variable, container: Some(self.container.clone()) },
            None => Connection::Params {
                host: var("host"),
                port: var("port"),
                user: var("user"),
                password: var("password"),
                database: var("database"),
            },
        }
    }
}

/// The branch server of one source database in one namespace.
pub fn server_name(namespace: &str, db_type: DbType, source: &str) -> String {
    let h = super::stable_hash(format!("{namespace}/{}/{source}", db_type.as_str()).as_bytes());
    format!("preview-db-{h:016x}")
}

/// A snapshot: one per copy mode and tables (and filters), per server.
pub fn snapshot_name(copy: CopyMode, tables: &BTreeMap<String, Option<String>>) -> String {
    // serde_json of a BTreeMap of strings cannot fail.
    let t = serde_json::to_string(tables).expect("tables serialise");
    let h = super::stable_hash(format!("{}/{t}", copy.as_str()).as_bytes());
    format!("snap_{}_{h:012x}", copy.as_str())
}

/// An environment's database (and role) on a server: a function of the key
/// and which branch of which pod it is (`within`), so a retry names the same one.
pub fn branch_database(key: &str, within: &str) -> String {
    let readable: String =
        key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).take(32).collect();
    format!("br_{readable}_{:012x}", super::stable_hash(format!("{key}/{within}").as_bytes()) & 0xffff_ffff_ffff)
}

/// The Secret holding an environment's branch connection.
pub fn branch_secret(server: &str, database: &str) -> String {
    format!("{server}-{:012x}", super::stable_hash(database.as_bytes()) & 0xffff_ffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_valid() {
        let s = server_name("ns", DbType::Postgres, "198.18.255.254:5432/orders");
        assert_eq!(s, server_name("ns", DbType::Postgres, "198.18.255.254:5432/orders"));
        assert_ne!(s, server_name("ns2", DbType::Postgres, "198.18.255.254:5432/orders"));
        assert!(s.len() <= 63);
        let mut t = BTreeMap::new();
        assert_ne!(snapshot_name(CopyMode::All, &t), snapshot_name(CopyMode::Schema, &t));
        let plain = snapshot_name(CopyMode::All, &t);
        t.insert("orders".into(), Some("id < 3".into()));
        assert_ne!(plain, snapshot_name(CopyMode::All, &t));
        let db = branch_database("Feature-X.1", "orders/0");
        assert!(db.starts_with("br_feature_x_1_") && db.len() <= 63, "{db}");
        assert_ne!(db, branch_database("Feature-X.1", "orders/1"));
        assert!(branch_secret(&s, &db).len() <= 63);
    }
}
