//! Durable environment records in an embedded redb database.
//!
//! All table definitions live here. Every helper runs its transaction inside
//! `spawn_blocking`, commits on Ok and aborts (drops) on Err, and never holds a
//! transaction across an `.await`.
//!
//! After an I/O error (a full volume, say) redb refuses every later operation
//! until the database is reopened, so the store drops it then and the next
//! call opens it again: once space is freed, previewd writes again without a
//! restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::EnvRecord;
use crate::model::share::{EndedLink, MAX_ENDED};

/// key → JSON-encoded [`EnvRecord`].
const ENVS: TableDefinition<&str, &[u8]> = TableDefinition::new("environments_v1");
/// slug → JSON-encoded [`EndedLink`]: links whose environment (or they
/// themselves) ended, so their URL answers "ended" rather than "unknown".
const ENDED_LINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("ended_links_v1");

/// Both tables of one write transaction.
struct Tables<'t> {
    envs: redb::Table<'t, &'static str, &'static [u8]>,
    ended: redb::Table<'t, &'static str, &'static [u8]>,
}

impl Tables<'_> {
    fn end_links(&mut self, ended: &[EndedLink]) -> Result<(), DbError> {
        for e in ended {
            // Serialising a plain struct of strings and numbers cannot fail.
            let bytes = serde_json::to_vec(e).expect("EndedLink serialises");
            self.ended.insert(e.slug.as_str(), bytes.as_slice())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: redb::DatabaseError },
    /// The volume holding the store is full (ENOSPC or a quota).
    #[error("store: the volume holding {path} is full ({message}); free space there and retry")]
    Full { path: PathBuf, message: String },
    /// Another I/O error; the next call reopens the database.
    #[error("store: I/O error on {path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store record {key:?} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A redb error, with its storage error when it has one (I/O is told apart).
struct DbError(String, Option<StorageKind>);

enum StorageKind {
    Full,
    Io,
}

fn storage_kind(e: &redb::StorageError) -> Option<StorageKind> {
    match e {
        redb::StorageError::Io(io)
            if io.kind() == std::io::ErrorKind::StorageFull
                || io.kind() == std::io::ErrorKind::QuotaExceeded
                || io.raw_os_error() == Some(libc::ENOSPC) =>
        {
            Some(StorageKind::Full)
        }
        redb::StorageError::Io(_) | redb::StorageError::PreviousIo => Some(StorageKind::Io),
        _ => None,
    }
}

macro_rules! db_err {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for DbError {
            fn from(e: redb::$t) -> Self {
                let kind = match &e { redb::$t::Storage(s) => storage_kind(s), _ => None };
                DbError(e.to_string(), kind)
            }
        }
    )*};
}
db_err!(TransactionError, TableError, CommitError);

impl From<redb::StorageError> for DbError {
    fn from(e: redb::StorageError) -> Self {
        let kind = storage_kind(&e);
        DbError(e.to_string(), kind)
    }
}

impl From<redb::SetDurabilityError> for DbError {
    fn from(e: redb::SetDurabilityError) -> Self {
        DbError(e.to_string(), None)
    }
}

#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// None after an I/O error: the next call reopens.
    db: Mutex<Option<Arc<Database>>>,
}

impl DbError {
    /// The store's error for it, naming the file when it is the volume's fault.
    fn at(self, path: &Path) -> StoreError {
        let path = path.to_path_buf();
        match self.1 {
            Some(StorageKind::Full) => StoreError::Full { path, message: self.0 },
            Some(StorageKind::Io) => StoreError::Io { path, message: self.0 },
            None => StoreError::Db(self.0),
        }
    }
}

impl Inner {
    /// The open database, opening it again after an I/O error. Blocking.
    fn db(&self) -> Result<Arc<Database>, StoreError> {
        // A poisoned lock only means a panic elsewhere; the Option is still whole.
        let mut slot = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        let db = Arc::new(open(&self.path)?);
        *slot = Some(db.clone());
        tracing::info!(path = %self.path.display(), "store reopened after an I/O error");
        Ok(db)
    }

    /// Runs `f` on the database; after an I/O error drops it, so the next
    /// call reopens it (redb fails every operation until then).
    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, DbError>) -> Result<T, StoreError> {
        let db = self.db()?;
        f(&db).map_err(|e| {
            let err = e.at(&self.path);
            if matches!(err, StoreError::Full { .. } | StoreError::Io { .. }) {
                let mut slot = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if slot.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, &db)) {
                    *slot = None;
                }
            }
            err
        })
    }
}

/// Opens (or creates) the database at `path` with its table. Blocking.
fn open(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(|source| StoreError::Open { path: path.to_path_buf(), source })?;
    let table = || -> Result<(), DbError> {
        let tx = db.begin_write()?;
        tx.open_table(ENVS)?;
        tx.open_table(ENDED_LINKS)?;
        tx.commit()?;
        Ok(())
    };
    table().map_err(|e| e.at(path))?;
    Ok(db)
}

impl Store {
    /// Opens (or creates) the database file `previewd.redb` in `dir`.
    pub async fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("previewd.redb");
        let db = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
                    .map_err(|e| StoreError::Db(format!("creating {}: {e}", path.display())))?;
                open(&path)
            }
        })
        .await??;
        Ok(Store { inner: Arc::new(Inner { path, db: Mutex::new(Some(Arc::new(db))) }) })
    }

    /// Runs `f` in one write transaction: committed if it returns Ok.
    /// A `durable: false` commit is persisted by the next durable one (or lost
    /// in a crash); use it only where losing it is safe.
    async fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.with(|db| {
                let mut tx = db.begin_write()?;
                if !durable {
                    tx.set_durability(redb::Durability::None)?;
                }
                let out = {
                    let mut tables = Tables { envs: tx.open_table(ENVS)?, ended: tx.open_table(ENDED_LINKS)? };
                    f(&mut tables)?
                };
                tx.commit()?;
                Ok(out)
            })
        })
        .await?
    }

    pub async fn put(&self, rec: &EnvRecord) -> Result<(), StoreError> {
        self.put_with(rec, true).await
    }

    /// A put that may be lost in a crash, for updates that recovery redoes
    /// anyway (marking a record settled: a pending one is simply completed).
    pub async fn put_relaxed(&self, rec: &EnvRecord) -> Result<(), StoreError> {
        self.put_with(rec, false).await
    }

    async fn put_with(&self, rec: &EnvRecord, durable: bool) -> Result<(), StoreError> {
        let key = rec.key.clone();
        // Serialising a plain struct of strings and numbers cannot fail.
        let bytes = serde_json::to_vec(rec).expect("EnvRecord serialises");
        self.write(durable, move |t| {
            t.envs.insert(key.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Writes a record and keeps `ended` links, in one transaction (a
    /// revoked link never both lives and has ended).
    pub async fn put_ending(&self, rec: &EnvRecord, ended: Vec<EndedLink>) -> Result<(), StoreError> {
        let key = rec.key.clone();
        let bytes = serde_json::to_vec(rec).expect("EnvRecord serialises");
        self.write(true, move |t| {
            t.end_links(&ended)?;
            t.envs.insert(key.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Removes a record; true when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.delete_ending(key, Vec::new()).await
    }

    /// Removes a record and keeps its `ended` links, in one transaction.
    pub async fn delete_ending(&self, key: &str, ended: Vec<EndedLink>) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(true, move |t| {
            t.end_links(&ended)?;
            Ok(t.envs.remove(key.as_str())?.is_some())
        })
        .await
    }

    /// Every ended link kept, after dropping those older than `keep_after_ms`
    /// and all but the newest [`MAX_ENDED`]. A read, unless something is to
    /// be dropped (gateway streams ask on every change).
    pub async fn ended_links(&self, keep_after_ms: i64) -> Result<Vec<EndedLink>, StoreError> {
        let inner = self.inner.clone();
        let (kept, stale) = tokio::task::spawn_blocking(move || {
            inner.with(|db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(ENDED_LINKS)?;
                let mut all = Vec::new();
                for row in table.iter()? {
                    let (k, v) = row?;
                    // One that does not parse is dropped below, like an old one.
                    let parsed: Option<EndedLink> = serde_json::from_slice(v.value()).ok();
                    all.push((k.value().to_string(), parsed));
                }
                all.sort_by_key(|(_, e)| std::cmp::Reverse(e.as_ref().map_or(i64::MIN, |e| e.ended_at_ms)));
                let (mut kept, mut stale) = (Vec::new(), Vec::new());
                for (slug, e) in all {
                    match e {
                        Some(e) if e.ended_at_ms > keep_after_ms && kept.len() < MAX_ENDED => kept.push(e),
                        _ => stale.push(slug),
                    }
                }
                Ok((kept, stale))
            })
        })
        .await??;
        if !stale.is_empty() {
            self.write(true, move |t| {
                for slug in &stale {
                    t.ended.remove(slug.as_str())?;
                }
                Ok(())
            })
            .await?;
        }
        Ok(kept)
    }

    /// Every record. One that does not parse does not stop the others: it
    /// comes back as an error naming its key.
    pub async fn load_all(&self) -> Result<Vec<Result<EnvRecord, StoreError>>, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.with(|db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(ENVS)?;
                let mut out = Vec::new();
                for row in table.iter()? {
                    let (k, v) = row?;
                    out.push(
                        serde_json::from_slice(v.value())
                            .map_err(|source| StoreError::Corrupt { key: k.value().to_string(), source }),
                    );
                }
                Ok(out)
            })
        })
        .await?
    }

    /// Writes raw bytes under `key` (tests: a record that does not parse).
    pub async fn put_raw(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_string();
        self.write(true, move |t| {
            t.envs.insert(key.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::FilterSpec;
    use crate::model::{Key, Mode, PodRecord, Target};

    fn rec(key: &str) -> EnvRecord {
        EnvRecord {
            key: Key::parse("key", key).unwrap(),
            namespace: "ns".into(),
            created_at_ms: 1,
            expires_at_ms: Some(10),
            mode: Mode::Steal,
            pending: true,
            deleting: false,
            pods: vec![PodRecord {
                group: "orders".into(),
                target: Target::Targetless,
                container: "app".into(),
                image: "img".into(),
                mode: Mode::Steal,
                filter: FilterSpec::Key(key.into()),
                ports: vec![80],
                pod_names: vec!["orders-k".into()],
                template: serde_json::json!({"spec": {}}),
            }],
            creator: String::new(),
            shares: Vec::new(),
            queues: Vec::new(),
            dbs: Vec::new(),
        }
    }

    #[test]
    fn a_full_volume_and_other_io_errors_are_told_apart() {
        let io = |code| redb::StorageError::Io(std::io::Error::from_raw_os_error(code));
        assert!(matches!(storage_kind(&io(libc::ENOSPC)), Some(StorageKind::Full)));
        assert!(matches!(storage_kind(&io(libc::EDQUOT)), Some(StorageKind::Full)));
        assert!(matches!(storage_kind(&io(libc::EIO)), Some(StorageKind::Io)));
        assert!(matches!(storage_kind(&redb::StorageError::PreviousIo), Some(StorageKind::Io)));
        assert!(storage_kind(&redb::StorageError::Corrupted("x".into())).is_none());
        let e = DbError::from(redb::CommitError::Storage(io(libc::ENOSPC))).at(Path::new("/v/previewd.redb"));
        assert!(e.to_string().contains("the volume holding /v/previewd.redb is full"), "{e}");
    }

    #[tokio::test]
    async fn put_load_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).await.unwrap();
            s.put(&rec("a")).await.unwrap();
            s.put(&rec("b")).await.unwrap();
            assert!(s.delete("a").await.unwrap());
            assert!(!s.delete("a").await.unwrap());
        }
        let s = Store::open(dir.path()).await.unwrap();
        s.put_raw("bad", b"{not json".to_vec()).await.unwrap();
        let all = s.load_all().await.unwrap();
        assert_eq!(all.len(), 2);
        // In key order: "b" before "bad"; the unreadable one names its key.
        assert_eq!(all[0].as_ref().unwrap(), &rec("b"));
        assert!(matches!(&all[1], Err(StoreError::Corrupt { key, .. }) if key == "bad"), "{all:?}");
        assert!(rec("b").expired_at(10));
        assert!(!rec("b").expired_at(9));
    }

    #[tokio::test]
    async fn ended_links_are_kept_with_the_delete_and_pruned_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let ended = |slug: &str, at| EndedLink {
            slug: slug.into(),
            ended_at_ms: at,
            reason: "cleaned".into(),
            staging_url: String::new(),
        };
        {
            let s = Store::open(dir.path()).await.unwrap();
            s.put(&rec("a")).await.unwrap();
            // The record goes and its links end in one transaction.
            assert!(s.delete_ending("a", vec![ended("old", 100), ended("new", 300)]).await.unwrap());
            s.put_ending(&rec("b"), vec![ended("revoked", 200)]).await.unwrap();
        }
        let s = Store::open(dir.path()).await.unwrap();
        assert_eq!(s.load_all().await.unwrap().len(), 1);
        let kept = s.ended_links(150).await.unwrap();
        let slugs: Vec<&str> = kept.iter().map(|e| e.slug.as_str()).collect();
        assert_eq!(slugs, vec!["new", "revoked"], "newest first, the one older than the cut dropped");
        // Dropped for good, not just filtered.
        assert_eq!(s.ended_links(0).await.unwrap().len(), 2);
    }
}
