//! The memory of bucket syncs: one small SQLite file per source/destination
//! pair, under the state directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_core::bucket_state::{ObjectState, SyncState};
use ferry_core::catalog::{CatalogError, CatalogResult};
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY, src_etag TEXT NOT NULL, src_size INTEGER NOT NULL,
    dst_etag TEXT NOT NULL, dst_size INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (key TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (key, id)) WITHOUT ROWID;
";

pub struct SqliteSyncState {
    conn: Mutex<Connection>,
}

fn cerr(e: rusqlite::Error) -> CatalogError {
    CatalogError(Box::new(e))
}

/// `$XDG_STATE_HOME/ferry/buckets/<hash of the pair>.sqlite`.
pub fn default_path(src: &str, dst: &str) -> PathBuf {
    let h = blake3::hash(format!("{src}\n{dst}").as_bytes()).to_hex();
    crate::state_dir()
        .join("buckets")
        .join(format!("{}.sqlite", &h[..32]))
}

impl SqliteSyncState {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = crate::connect(path, SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl SyncState for SqliteSyncState {
    fn get(&self, keys: &[String]) -> CatalogResult<Vec<Option<ObjectState>>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT src_etag, src_size, dst_etag, dst_size FROM objects WHERE key = ?1",
            )
            .map_err(cerr)?;
        keys.iter()
            .map(|k| {
                st.query_row([k], |r| {
                    Ok(ObjectState {
                        src_etag: r.get(0)?,
                        src_size: r.get::<_, i64>(1)? as u64,
                        dst_etag: r.get(2)?,
                        dst_size: r.get::<_, i64>(3)? as u64,
                    })
                })
                .optional()
                .map_err(cerr)
            })
            .collect()
    }

    fn put(&self, items: &[(String, ObjectState)]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO objects (key, src_etag, src_size, dst_etag, dst_size)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(cerr)?;
            for (k, o) in items {
                st.execute(params![
                    k,
                    o.src_etag,
                    o.src_size as i64,
                    o.dst_etag,
                    o.dst_size as i64
                ])
                .map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn remove(&self, keys: &[String]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("DELETE FROM objects WHERE key = ?1")
                .map_err(cerr)?;
            for k in keys {
                st.execute([k]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn uploads(&self) -> CatalogResult<Vec<(String, String)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT key, id FROM uploads")
            .map_err(cerr)?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }

    fn add_upload(&self, key: &str, id: &str) -> CatalogResult<()> {
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO uploads (key, id) VALUES (?1, ?2)",
                params![key, id],
            )
            .map_err(cerr)?;
        Ok(())
    }

    fn remove_upload(&self, key: &str, id: &str) -> CatalogResult<()> {
        self.conn()
            .execute(
                "DELETE FROM uploads WHERE key = ?1 AND id = ?2",
                params![key, id],
            )
            .map_err(cerr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_persists_per_key_and_uploads_are_remembered() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.sqlite");
        let s = SqliteSyncState::open(&p).unwrap();
        let o = ObjectState {
            src_etag: "a".into(),
            src_size: 3,
            dst_etag: "b".into(),
            dst_size: 3,
        };
        s.put(&[("k 1/é".into(), o.clone())]).unwrap();
        s.add_upload("k", "u1").unwrap();
        drop(s);
        let s = SqliteSyncState::open(&p).unwrap();
        assert_eq!(
            s.get(&["k 1/é".into(), "x".into()]).unwrap(),
            vec![Some(o), None]
        );
        assert_eq!(s.uploads().unwrap(), vec![("k".into(), "u1".into())]);
        s.remove_upload("k", "u1").unwrap();
        s.remove(&["k 1/é".into()]).unwrap();
        assert!(s.uploads().unwrap().is_empty());
        assert_eq!(s.get(&["k 1/é".into()]).unwrap(), vec![None]);
        assert_ne!(default_path("a", "b"), default_path("b", "a"));
    }
}
