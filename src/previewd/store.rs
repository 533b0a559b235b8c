//! Durable environment records in an embedded redb database.
//!
//! All table definitions live here. Every helper runs its transaction inside
//! `spawn_blocking`, commits on Ok and aborts (drops) on Err, and never holds a
//! transaction across an `.await`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::model::EnvRecord;

/// key → JSON-encoded [`EnvRecord`].
const ENVS: TableDefinition<&str, &[u8]> = TableDefinition::new("environments_v1");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open { path: PathBuf, source: redb::DatabaseError },
    #[error("store: {0}")]
    Db(String),
    #[error("store record {key:?} is corrupt: {source}")]
    Corrupt { key: String, source: serde_json::Error },
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self { StoreError::Db(e.to_string()) }
        }
    )*};
}
db_err!(redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl Store {
    /// Opens (or creates) the database file `previewd.redb` in `dir`.
    pub async fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("previewd.redb");
        let db = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))
                .map_err(|e| StoreError::Db(format!("creating {}: {e}", path.display())))?;
            let db = Database::create(&path).map_err(|source| StoreError::Open { path, source })?;
            let tx = db.begin_write()?;
            tx.open_table(ENVS)?;
            tx.commit()?;
            Ok::<_, StoreError>(db)
        })
        .await??;
        Ok(Store { db: Arc::new(db) })
    }

    /// Runs `f` in one write transaction: committed if it returns Ok.
    /// A `durable: false` commit is persisted by the next durable one (or lost
    /// in a crash); use it only where losing it is safe.
    async fn write<T: Send + 'static>(
        &self,
        durable: bool,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let mut tx = db.begin_write()?;
            if !durable {
                tx.set_durability(redb::Durability::None).map_err(|e| StoreError::Db(e.to_string()))?;
            }
            let out = {
                let mut table = tx.open_table(ENVS)?;
                f(&mut table)?
            };
            tx.commit()?;
            Ok(out)
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
            t.insert(key.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Removes a record; true when it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.write(true, move |t| Ok(t.remove(key.as_str())?.is_some())).await
    }

    /// Every record. One that does not parse does not stop the others: it
    /// comes back as an error naming its key.
    pub async fn load_all(&self) -> Result<Vec<Result<EnvRecord, StoreError>>, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
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
        .await?
    }

    /// Writes raw bytes under `key` (tests: a record that does not parse).
    pub async fn put_raw(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        let key = key.to_string();
        self.write(true, move |t| {
            t.insert(key.as_str(), bytes.as_slice())?;
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
        }
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
}
