//! The restore target's memory (see `ferry_core::target`) in SQLite: one
//! small file per target directory under the state directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ferry_core::catalog::{CatalogError, CatalogResult};
use ferry_core::target::{TargetFile, TargetState};
use rusqlite::{Connection, OptionalExtension, params};

pub struct SqliteTargetState {
    conn: Mutex<Connection>,
}

fn cerr(e: rusqlite::Error) -> CatalogError {
    CatalogError(Box::new(e))
}

/// `$XDG_STATE_HOME/ferry/targets/<hash of the canonical target path>.sqlite`.
pub fn default_path(target: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let canon = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let h = blake3::hash(canon.as_os_str().as_bytes());
    crate::state_dir()
        .join("targets")
        .join(format!("{}.sqlite", &h.to_hex()[..32]))
}

impl SqliteTargetState {
    pub fn open(path: &Path) -> Result<Self, crate::Error> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| crate::Error::Io {
                path: path.into(),
                reason: e.to_string(),
            })?;
        }
        let sql = |source| crate::Error::Sqlite {
            path: path.into(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(60)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS files (
                 path BLOB PRIMARY KEY, content BLOB NOT NULL, size INTEGER NOT NULL,
                 mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(sql)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TargetState for SqliteTargetState {
    fn last_snapshot(&self) -> CatalogResult<Option<String>> {
        self.conn()
            .query_row("SELECT value FROM meta WHERE key = 'snapshot'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(cerr)
    }

    fn get(&self, path: &[u8]) -> CatalogResult<Option<TargetFile>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT content, size, mtime_ns, ctime_ns, inode FROM files WHERE path = ?1",
            )
            .map_err(cerr)?;
        st.query_row([path], |r| {
            let content: Vec<u8> = r.get(0)?;
            Ok(TargetFile {
                path: path.to_vec(),
                content: content.try_into().unwrap_or([0; 32]),
                size: r.get::<_, i64>(1)? as u64,
                mtime_ns: r.get(2)?,
                ctime_ns: r.get(3)?,
                inode: r.get::<_, i64>(4)? as u64,
            })
        })
        .optional()
        .map_err(cerr)
    }

    fn forget(&self, paths: &[Vec<u8>]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        tx.execute("DELETE FROM meta WHERE key = 'snapshot'", [])
            .map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("DELETE FROM files WHERE path = ?1")
                .map_err(cerr)?;
            for p in paths {
                st.execute([p]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn update(&self, files: &[TargetFile], snapshot: Option<&str>) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        tx.execute("DELETE FROM meta WHERE key = 'snapshot'", [])
            .map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR REPLACE INTO files (path, content, size, mtime_ns, ctime_ns, inode) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(cerr)?;
            for f in files {
                st.execute(params![
                    f.path,
                    &f.content[..],
                    f.size as i64,
                    f.mtime_ns,
                    f.ctime_ns,
                    f.inode as i64
                ])
                .map_err(cerr)?;
            }
        }
        if let Some(s) = snapshot {
            tx.execute("INSERT INTO meta (key, value) VALUES ('snapshot', ?1)", [s])
                .map_err(cerr)?;
        }
        tx.commit().map_err(cerr)
    }
}
