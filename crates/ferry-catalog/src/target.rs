//! The restore target's memory (see `ferry_core::target`) in SQLite: one
//! small file per target directory under the state directory, one row per
//! file keyed by (directory, name) so a restore reads one directory's rows
//! in one query.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_core::catalog::{CatalogError, CatalogResult};
use ferry_core::target::{TargetFile, TargetState};
use rusqlite::{Connection, OptionalExtension, params};

/// Bumped when the table changes; an older file is emptied (it is only a
/// memory: a lost memory means files are compared by content once).
const LAYOUT: &str = "2";

pub struct SqliteTargetState {
    conn: Mutex<Connection>,
}

fn cerr(e: rusqlite::Error) -> CatalogError {
    CatalogError(Box::new(e))
}

/// `$XDG_STATE_HOME/ferry/targets/<hash of the canonical target path>.sqlite`.
pub fn default_path(target: &Path) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // The same key before and after the target exists (an image file is
    // created by its first restore).
    let canon = std::fs::canonicalize(target).unwrap_or_else(|_| {
        match (
            target.parent().map(std::fs::canonicalize),
            target.file_name(),
        ) {
            (Some(Ok(dir)), Some(name)) => dir.join(name),
            _ => target.to_path_buf(),
        }
    });
    let h = blake3::hash(canon.as_os_str().as_bytes());
    crate::state_dir()
        .join("targets")
        .join(format!("{}.sqlite", &h.to_hex()[..32]))
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl SqliteTargetState {
    pub fn open(path: &Path) -> Result<Self, crate::Error> {
        let conn = crate::connect(
            path,
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )?;
        let sql = |source| crate::Error::Sqlite {
            path: path.into(),
            source,
        };
        let layout: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'layout'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        if layout.as_deref() != Some(LAYOUT) {
            conn.execute_batch("DROP TABLE IF EXISTS files; DELETE FROM meta;")
                .map_err(sql)?;
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('layout', ?1)",
                [LAYOUT],
            )
            .map_err(sql)?;
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS files (
                 dir BLOB NOT NULL, name BLOB NOT NULL, content BLOB NOT NULL,
                 size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
                 inode INTEGER NOT NULL, PRIMARY KEY (dir, name)
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

    fn get_dir(&self, dir: &[u8]) -> CatalogResult<Vec<TargetFile>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT name, content, size, mtime_ns, ctime_ns, inode FROM files WHERE dir = ?1",
            )
            .map_err(cerr)?;
        let rows = st
            .query_map([dir], |r| {
                // Borrowed from the row: a final delta's check reads every
                // row of the memory.
                let name = r.get_ref(0)?.as_blob()?;
                let content = r.get_ref(1)?.as_blob()?;
                Ok(TargetFile {
                    path: join(dir, name),
                    content: content.try_into().unwrap_or([0; 32]),
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                    ctime_ns: r.get(4)?,
                    inode: r.get::<_, i64>(5)? as u64,
                })
            })
            .map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }

    fn get_file(&self, path: &[u8]) -> CatalogResult<Option<TargetFile>> {
        let (dir, name) = split(path);
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT content, size, mtime_ns, ctime_ns, inode FROM files WHERE dir = ?1 AND name = ?2",
            )
            .map_err(cerr)?;
        st.query_row(params![dir, name], |r| {
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
                .prepare_cached("DELETE FROM files WHERE dir = ?1 AND name = ?2")
                .map_err(cerr)?;
            for p in paths {
                let (d, n) = split(p);
                st.execute([d, n]).map_err(cerr)?;
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
                .prepare_cached(
                    "INSERT OR REPLACE INTO files (dir, name, content, size, mtime_ns, ctime_ns, inode)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(cerr)?;
            for f in files {
                let (d, n) = split(&f.path);
                st.execute(params![
                    d,
                    n,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, n: u8) -> TargetFile {
        TargetFile {
            path: path.as_bytes().to_vec(),
            content: [n; 32],
            size: n as u64,
            mtime_ns: 1,
            ctime_ns: 2,
            inode: 3,
        }
    }

    #[test]
    fn rows_by_directory_forget_and_snapshot_mark() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteTargetState::open(&dir.path().join("t.sqlite")).unwrap();
        s.update(
            &[
                file("a", 1),
                file("d/b", 2),
                file("d/c", 3),
                file("d/e/f", 4),
            ],
            Some("snap1"),
        )
        .unwrap();
        assert_eq!(s.last_snapshot().unwrap().as_deref(), Some("snap1"));
        let mut d = s.get_dir(b"d").unwrap();
        d.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(d, vec![file("d/b", 2), file("d/c", 3)]);
        assert_eq!(s.get_dir(b"").unwrap(), vec![file("a", 1)]);
        assert_eq!(s.get_file(b"d/e/f").unwrap(), Some(file("d/e/f", 4)));
        assert_eq!(s.get_file(b"a").unwrap(), Some(file("a", 1)));
        assert_eq!(s.get_file(b"d/e").unwrap(), None);
        // Forgetting a file also drops the "complete snapshot" mark.
        s.forget(&[b"d/b".to_vec()]).unwrap();
        assert_eq!(s.get_dir(b"d").unwrap(), vec![file("d/c", 3)]);
        assert_eq!(s.get_file(b"d/b").unwrap(), None);
        assert_eq!(s.last_snapshot().unwrap(), None);
    }
}
