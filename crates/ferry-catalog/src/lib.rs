//! The catalog in SQLite: chunk index, packs, snapshots, cached trees.
//!
//! One file per vault, in WAL mode so that readers never wait for a writer
//! and two processes can snapshot into the same vault at once (writes are
//! short transactions; `busy_timeout` queues them). The catalog is an index
//! of the vault: delete it and `ferry catalog rebuild` (or the next command)
//! recreates it from the vault alone.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use ferry_core::catalog::{BlobLocation, Catalog, CatalogError, CatalogResult};
use ferry_core::id::{BlobId, BlobKind, PackId};
use ferry_core::manifest::SnapshotRecord;
use ferry_core::pack::{PackEntry, PackRecord};
use rusqlite::{Connection, OptionalExtension, params};

pub mod bucket;
pub mod jobs;
pub mod migration;
pub mod target;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (
    id BLOB PRIMARY KEY, size INTEGER NOT NULL, salt BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    id BLOB PRIMARY KEY, kind INTEGER NOT NULL, pack BLOB NOT NULL, idx INTEGER NOT NULL,
    offset INTEGER NOT NULL, stored_len INTEGER NOT NULL, raw_len INTEGER NOT NULL,
    compressed INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs (pack);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, volume TEXT NOT NULL, time_ns INTEGER NOT NULL, record TEXT NOT NULL
);
-- A rowid table, not WITHOUT ROWID: trees average a few KiB, past what an index
-- b-tree cell holds, and lookups by id ran twice as slow there. Catalogs made
-- before keep their WITHOUT ROWID table; the same statements work on both.
CREATE TABLE IF NOT EXISTS trees (id BLOB PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seen (name TEXT PRIMARY KEY) WITHOUT ROWID;
";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("catalog {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("catalog {path} belongs to vault {found}, not {expected}")]
    OtherVault {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("catalog {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

pub struct SqliteCatalog {
    conn: Mutex<Connection>,
    /// Idle read-only connections for the lookups every stage makes at
    /// once (trees, dedup, blob locations): WAL lets readers run beside
    /// the writer and each other, and with one connection behind one lock
    /// the snapshot's reader, its collector and a restore's check queued
    /// on each other for every tree. As many as ever ran at once.
    readers: Mutex<Vec<Connection>>,
    path: PathBuf,
}

fn cerr(e: rusqlite::Error) -> CatalogError {
    CatalogError(Box::new(e))
}

/// A large log is folded into the file and emptied when the catalog
/// closes: left as it was, the next command recovered it at its start
/// (16-20 MiB after a first snapshot: a twentieth of a second on the
/// downtime path). A small one is cheap to recover, and folding it costs
/// the closing command an fsync (a final delta's). Emptied, not removed
/// (what SQLite does when the last connection closes), so that a catalog
/// kept inside a synced tree leaves its directory as it was; and only if
/// no other process is writing: a close never waits.
impl Drop for SqliteCatalog {
    fn drop(&mut self) {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        if std::fs::metadata(&wal).is_ok_and(|m| m.len() > FOLD_LOG_OVER) {
            let conn = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
            let _ = conn.busy_timeout(Duration::ZERO);
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
    }
}

/// The size of log a closing catalog folds in (see `Drop`).
const FOLD_LOG_OVER: u64 = 4 << 20;

impl SqliteCatalog {
    /// Opens (or creates) the catalog of vault `vault_id` at `path`.
    /// Returns the catalog and whether it was just created (and so must be
    /// filled from the vault).
    pub fn open(path: &Path, vault_id: &str) -> Result<(Self, bool), Error> {
        let conn = connect(path, SCHEMA)?;
        let sql = |source| Error::Sqlite {
            path: path.into(),
            source,
        };
        let found: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'vault_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql)?;
        let fresh = match found {
            Some(f) if f != vault_id => {
                return Err(Error::OtherVault {
                    path: path.into(),
                    found: f,
                    expected: vault_id.into(),
                });
            }
            Some(_) => false,
            None => {
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('vault_id', ?1), ('schema', ?2)",
                    params![vault_id, SCHEMA_VERSION.to_string()],
                )
                .map_err(sql)?;
                true
            }
        };
        // The writer's transactions insert blob ids at random places in
        // the index: with SQLite's 2 MiB cache a batch of packs spilled
        // dirty pages to the WAL before its commit wrote them again.
        conn.pragma_update(None, "cache_size", -8192).map_err(sql)?;
        Ok((
            Self {
                conn: Mutex::new(conn),
                readers: Mutex::new(Vec::new()),
                path: path.into(),
            },
            fresh,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a read on an idle read-only connection (opened if none is
    /// idle), then makes it idle again. It sees every committed write.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> CatalogResult<T> {
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => open_reader(&self.path).map_err(cerr)?,
        };
        let out = f(&conn);
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        out.map_err(cerr)
    }
}

/// A read-only connection to a catalog the writer connection has set up
/// (WAL, schema).
fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // No memory map here: while a snapshot writes, the file grows with
    // every commit and each reader's map was torn down and faulted in
    // again (more system time than all the catalog's reads).
    conn.pragma_update(None, "mmap_size", 0)?;
    // Lookups of random keys: the kernel's page cache holds the file, so a
    // big cache per connection would only multiply memory by the readers.
    conn.pragma_update(None, "cache_size", -1024)?;
    Ok(conn)
}

/// Opens (or creates, with its directory) a SQLite file the way every
/// ferry database is opened: WAL (readers never wait for the writer), a
/// long busy timeout (writers queue), and `schema` applied.
pub(crate) fn connect(path: &Path, schema: &str) -> Result<Connection, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io {
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    let sql = |source| Error::Sqlite {
        path: path.into(),
        source,
    };
    let conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql)?;
    use_wal(&conn).map_err(sql)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(sql)?;
    // No memory map: the hot reads (trees, dedup lookups) go through the
    // catalog's read-only connections, and a mapped file that grows with
    // every commit is torn down and faulted in again, its pages counted in
    // the process's RSS.
    conn.pragma_update(None, "mmap_size", 0).map_err(sql)?;
    // Checkpoint every 16 MiB of WAL, not SQLite's 4 MiB: a snapshot
    // commits a batch of packs every few hundred milliseconds, and each
    // checkpoint copies the same hot index pages back again (a fifth of
    // `add_packs` in a final delta's profile).
    conn.pragma_update(None, "wal_autocheckpoint", 4096)
        .map_err(sql)?;
    conn.execute_batch(schema).map_err(sql)?;
    Ok(conn)
}

/// How long a statement waits for another process's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Puts the file in WAL mode, once: the mode is the file's, so later opens
/// find it set and take no lock. SQLite does not run the busy handler for
/// the switch, so processes opening a new catalog at once (two snapshots
/// into one vault) would fail with "database is locked": the switch is
/// retried, and done by another process meanwhile is as good.
fn use_wal(conn: &Connection) -> rusqlite::Result<()> {
    let busy = |e: &rusqlite::Error| {
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    };
    let mode = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, String>(0));
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    loop {
        let r = match mode("PRAGMA journal_mode") {
            Ok(m) if m.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(_) => mode("PRAGMA journal_mode = WAL"),
            Err(e) => Err(e),
        };
        match r {
            Ok(m) if m.eq_ignore_ascii_case("wal") => return Ok(()),
            // Refused (the old mode is answered) or busy: another process
            // holds the file.
            Ok(_) => {}
            Err(e) if busy(&e) => {}
            Err(e) => return Err(e),
        }
        if std::time::Instant::now() >= deadline {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                Some("could not switch the catalog to WAL mode: another process holds it".into()),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Where the embedded catalog of a vault lives by default:
/// `$XDG_STATE_HOME/ferry/catalogs/<vault id>.sqlite`, else
/// `~/.local/state/ferry/...`.
pub fn default_path(vault_id: &str) -> PathBuf {
    state_dir()
        .join("catalogs")
        .join(format!("{vault_id}.sqlite"))
}

/// `$XDG_STATE_HOME/ferry`, else `~/.local/state/ferry`.
pub fn state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ferry")
}

fn locate(conn: &Connection, ids: &[BlobId]) -> rusqlite::Result<Vec<Option<BlobLocation>>> {
    let mut st = conn.prepare_cached(
        "SELECT b.kind, b.pack, b.idx, b.offset, b.stored_len, b.raw_len, b.compressed, p.salt
         FROM blobs b JOIN packs p ON p.id = b.pack WHERE b.id = ?1",
    )?;
    ids.iter()
        .map(|id| {
            st.query_row([&id.0[..]], |r| {
                let kind: u8 = r.get(0)?;
                let salt: Vec<u8> = r.get(7)?;
                Ok(BlobLocation {
                    pack: pack_id(r.get(1)?)?,
                    salt: salt.try_into().map_err(|_| {
                        rusqlite::Error::InvalidColumnType(
                            7,
                            "salt".into(),
                            rusqlite::types::Type::Blob,
                        )
                    })?,
                    entry: PackEntry {
                        kind: BlobKind::from_code(kind).unwrap_or(BlobKind::Data),
                        id: *id,
                        index: r.get(2)?,
                        offset: r.get::<_, i64>(3)? as u64,
                        stored_len: r.get(4)?,
                        raw_len: r.get(5)?,
                        compressed: r.get(6)?,
                    },
                })
            })
            .optional()
        })
        .collect()
}

fn blob_id(v: Vec<u8>) -> rusqlite::Result<BlobId> {
    BlobId::from_slice(&v).ok_or_else(|| {
        rusqlite::Error::InvalidColumnType(0, "id".into(), rusqlite::types::Type::Blob)
    })
}

fn pack_id(v: Vec<u8>) -> rusqlite::Result<PackId> {
    PackId::from_slice(&v).ok_or_else(|| {
        rusqlite::Error::InvalidColumnType(0, "pack".into(), rusqlite::types::Type::Blob)
    })
}

impl Catalog for SqliteCatalog {
    // A batch of lookups runs in one read transaction: each statement on its
    // own would take and drop the WAL read lock, two fcntl calls per id
    // (1% of a full restore's CPU went to them).
    fn contains(&self, ids: &[BlobId]) -> CatalogResult<Vec<bool>> {
        self.read(|conn| {
            let _one_read = conn.unchecked_transaction()?;
            let mut st = conn.prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")?;
            ids.iter().map(|id| st.exists([&id.0[..]])).collect()
        })
    }

    fn locate(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<BlobLocation>>> {
        self.read(|conn| {
            let _one_read = conn.unchecked_transaction()?;
            locate(conn, ids)
        })
    }

    fn add_packs(&self, packs: &[PackRecord]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(cerr)?;
        {
            let mut p = tx
                .prepare_cached("INSERT OR IGNORE INTO packs (id, size, salt) VALUES (?1, ?2, ?3)")
                .map_err(cerr)?;
            let mut b = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO blobs (id, kind, pack, idx, offset, stored_len, raw_len, compressed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(cerr)?;
            for pack in packs {
                let salt = pack
                    .salt_bytes()
                    .map_err(|e| CatalogError::msg(e.to_string()))?;
                p.execute(params![&pack.id.0[..], pack.size as i64, &salt[..]])
                    .map_err(cerr)?;
                for e in &pack.blobs {
                    b.execute(params![
                        &e.id.0[..],
                        e.kind.code(),
                        &pack.id.0[..],
                        e.index,
                        e.offset as i64,
                        e.stored_len,
                        e.raw_len,
                        e.compressed
                    ])
                    .map_err(cerr)?;
                }
            }
        }
        tx.commit().map_err(cerr)
    }

    fn packs(&self) -> CatalogResult<Vec<(PackId, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id, size FROM packs")
            .map_err(cerr)?;
        let rows = st
            .query_map([], |r| {
                Ok((pack_id(r.get(0)?)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }

    fn pack_blobs(&self, pack: &PackId) -> CatalogResult<Vec<BlobId>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id FROM blobs WHERE pack = ?1")
            .map_err(cerr)?;
        let rows = st
            .query_map([&pack.0[..]], |r| blob_id(r.get(0)?))
            .map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }

    fn add_snapshot(&self, snap: &SnapshotRecord) -> CatalogResult<()> {
        let json = serde_json::to_string(snap).map_err(|e| CatalogError::msg(e.to_string()))?;
        self.conn()
            .execute(
                "INSERT OR IGNORE INTO snapshots (id, volume, time_ns, record) VALUES (?1, ?2, ?3, ?4)",
                params![snap.id, snap.volume, snap.time_ns, json],
            )
            .map_err(cerr)?;
        Ok(())
    }

    fn snapshots(&self) -> CatalogResult<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT record FROM snapshots ORDER BY time_ns, id")
            .map_err(cerr)?;
        let rows = st.query_map([], |r| r.get::<_, String>(0)).map_err(cerr)?;
        let mut out = Vec::new();
        for json in rows {
            let json = json.map_err(cerr)?;
            out.push(
                serde_json::from_str(&json)
                    .map_err(|e| CatalogError::msg(format!("snapshot record: {e}")))?,
            );
        }
        Ok(out)
    }

    fn tree(&self, id: &BlobId) -> CatalogResult<Option<Vec<u8>>> {
        self.read(|conn| {
            let mut st = conn.prepare_cached("SELECT data FROM trees WHERE id = ?1")?;
            st.query_row([&id.0[..]], |r| r.get(0)).optional()
        })
    }

    fn trees(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<Vec<u8>>>> {
        self.read(|conn| {
            let mut st = conn.prepare_cached("SELECT data FROM trees WHERE id = ?1")?;
            ids.iter()
                .map(|id| st.query_row([&id.0[..]], |r| r.get(0)).optional())
                .collect()
        })
    }

    fn put_tree(&self, id: &BlobId, data: &[u8]) -> CatalogResult<()> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("INSERT OR IGNORE INTO trees (id, data) VALUES (?1, ?2)")
            .map_err(cerr)?;
        st.execute(params![&id.0[..], data]).map_err(cerr)?;
        Ok(())
    }

    fn put_trees(&self, trees: &[(BlobId, Vec<u8>)]) -> CatalogResult<()> {
        if trees.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO trees (id, data) VALUES (?1, ?2)")
                .map_err(cerr)?;
            for (id, data) in trees {
                st.execute(params![&id.0[..], data]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn seen_objects(&self) -> CatalogResult<HashSet<String>> {
        let conn = self.conn();
        let mut st = conn.prepare_cached("SELECT name FROM seen").map_err(cerr)?;
        let rows = st.query_map([], |r| r.get(0)).map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }

    fn mark_seen(&self, names: &[String]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("INSERT OR IGNORE INTO seen (name) VALUES (?1)")
                .map_err(cerr)?;
            for n in names {
                st.execute([n]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn remove_snapshots(&self, ids: &[String]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(cerr)?;
        {
            let mut st = tx
                .prepare_cached("DELETE FROM snapshots WHERE id = ?1")
                .map_err(cerr)?;
            for id in ids {
                st.execute([id]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn remove_packs(&self, packs: &[PackId]) -> CatalogResult<()> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(cerr)?;
        {
            let mut b = tx
                .prepare_cached("DELETE FROM blobs WHERE pack = ?1")
                .map_err(cerr)?;
            let mut p = tx
                .prepare_cached("DELETE FROM packs WHERE id = ?1")
                .map_err(cerr)?;
            for id in packs {
                b.execute([&id.0[..]]).map_err(cerr)?;
                p.execute([&id.0[..]]).map_err(cerr)?;
            }
        }
        tx.commit().map_err(cerr)
    }

    fn blob_sizes(&self) -> CatalogResult<Vec<(BlobId, PackId, u32)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id, pack, stored_len FROM blobs")
            .map_err(cerr)?;
        let rows = st
            .query_map([], |r| {
                Ok((blob_id(r.get(0)?)?, pack_id(r.get(1)?)?, r.get(2)?))
            })
            .map_err(cerr)?;
        rows.collect::<rusqlite::Result<_>>().map_err(cerr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Processes that open a new catalog at once (two snapshots into one
    /// vault) all get it: the switch to WAL, which SQLite does not queue
    /// behind its busy timeout, is retried.
    #[test]
    fn many_open_a_new_catalog_at_once() {
        for round in 0..8 {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("c.sqlite");
            let start = std::sync::Arc::new(std::sync::Barrier::new(16));
            let opened: Vec<_> = (0..16)
                .map(|_| {
                    let (path, start) = (path.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        SqliteCatalog::open(&path, "vault-1").map(|_| ())
                    })
                })
                .collect();
            for t in opened {
                if let Err(e) = t.join().unwrap() {
                    panic!("round {round}: {e}");
                }
            }
            let conn = Connection::open(&path).unwrap();
            let mode: String = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get(0))
                .unwrap();
            assert_eq!(mode, "wal");
        }
    }
    use ferry_core::manifest::{Name, Node, NodeKind};

    fn pack(n: u8) -> PackRecord {
        PackRecord {
            id: PackId([n; 32]),
            size: 1000 + n as u64,
            salt: hex::encode([n; 32]),
            blobs: vec![PackEntry {
                kind: BlobKind::Data,
                id: BlobId([n + 100; 32]),
                index: 0,
                offset: 40,
                stored_len: 30,
                raw_len: 50,
                compressed: true,
            }],
        }
    }

    #[test]
    fn packs_blobs_and_snapshots_persist_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/c.sqlite");
        let (c, fresh) = SqliteCatalog::open(&path, "v1").unwrap();
        assert!(fresh);
        c.add_packs(&[pack(1), pack(2)]).unwrap();
        let root = Node {
            name: Name(b".".to_vec()),
            kind: NodeKind::Dir {
                subtree: BlobId([9; 32]),
            },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
            xattrs: vec![],
        };
        let snap = SnapshotRecord {
            id: "abc".into(),
            volume: "vol".into(),
            time: "t".into(),
            time_ns: 5,
            root: BlobId([9; 32]),
            root_node: root,
            parent: None,
            host: "h".into(),
            source: "/s".into(),
            files: 1,
            dirs: 0,
            bytes: 50,
            incomplete: false,
            warnings: 0,
            block: false,
            unstable: vec![],
        };
        c.add_snapshot(&snap).unwrap();
        drop(c);

        let (c, fresh) = SqliteCatalog::open(&path, "v1").unwrap();
        assert!(!fresh);
        assert_eq!(
            c.contains(&[BlobId([101; 32]), BlobId([7; 32])]).unwrap(),
            vec![true, false]
        );
        let loc = c
            .locate(&[BlobId([102; 32])])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(loc.pack, PackId([2; 32]));
        assert_eq!(loc.salt, [2; 32]);
        assert_eq!(loc.entry, pack(2).blobs[0]);
        assert_eq!(c.snapshots().unwrap(), vec![snap]);
        assert_eq!(
            c.pack_blobs(&PackId([1; 32])).unwrap(),
            vec![BlobId([101; 32])]
        );
        let mut packs = c.packs().unwrap();
        packs.sort();
        assert_eq!(
            packs,
            vec![(PackId([1; 32]), 1001), (PackId([2; 32]), 1002)]
        );

        assert!(matches!(
            SqliteCatalog::open(&path, "v2"),
            Err(Error::OtherVault { .. })
        ));
    }

    #[test]
    fn two_packs_with_the_same_chunk_are_harmless_and_recording_is_idempotent() {
        // Two agents stored the same new chunk at once, each in its own pack.
        let dir = tempfile::tempdir().unwrap();
        let (c, _) = SqliteCatalog::open(&dir.path().join("c.sqlite"), "v").unwrap();
        let first = pack(1);
        let mut second = pack(2);
        second.blobs[0].id = first.blobs[0].id;
        c.add_packs(std::slice::from_ref(&first)).unwrap();
        c.add_packs(std::slice::from_ref(&second)).unwrap();
        // A retried call after a lost reply changes nothing.
        c.add_packs(std::slice::from_ref(&second)).unwrap();
        assert_eq!(c.packs().unwrap().len(), 2);
        let loc = c
            .locate(&[first.blobs[0].id])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(loc.pack, first.id, "the first record wins");
        assert!(c.pack_blobs(&second.id).unwrap().is_empty());
    }

    /// Trees live in a rowid table; a catalog made when they lived in a
    /// WITHOUT ROWID table opens and serves them the same way.
    #[test]
    fn trees_are_a_rowid_table_and_older_catalogs_still_serve_them() {
        let dir = tempfile::tempdir().unwrap();
        let trees_sql = |path: &Path| -> String {
            Connection::open(path)
                .unwrap()
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'trees'",
                    [],
                    |r| r.get(0),
                )
                .unwrap()
        };
        let fresh = dir.path().join("new.sqlite");
        let (c, _) = SqliteCatalog::open(&fresh, "v").unwrap();
        c.put_tree(&BlobId([1; 32]), &[5u8; 9000]).unwrap();
        assert_eq!(c.tree(&BlobId([1; 32])).unwrap(), Some(vec![5u8; 9000]));
        drop(c);
        assert!(!trees_sql(&fresh).contains("WITHOUT ROWID"));

        let old = dir.path().join("old.sqlite");
        Connection::open(&old)
            .unwrap()
            .execute_batch(
                "CREATE TABLE trees (id BLOB PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
                 INSERT INTO trees VALUES (x'0202020202020202020202020202020202020202020202020202020202020202', x'0707');",
            )
            .unwrap();
        let (c, _) = SqliteCatalog::open(&old, "v").unwrap();
        assert_eq!(c.tree(&BlobId([2; 32])).unwrap(), Some(vec![7, 7]));
        c.put_tree(&BlobId([3; 32]), &[8u8; 5000]).unwrap();
        c.put_tree(&BlobId([3; 32]), &[8u8; 5000]).unwrap();
        assert_eq!(c.tree(&BlobId([3; 32])).unwrap(), Some(vec![8u8; 5000]));
        assert_eq!(c.tree(&BlobId([4; 32])).unwrap(), None);
        drop(c);
        assert!(trees_sql(&old).contains("WITHOUT ROWID"));
    }

    /// A batch of trees is cached in one transaction, the first copy of a
    /// tree wins, and the batch is seen by a second catalog on the file.
    #[test]
    fn trees_cached_in_a_batch_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sqlite");
        let (c, _) = SqliteCatalog::open(&path, "v").unwrap();
        c.put_tree(&BlobId([1; 32]), b"first").unwrap();
        let batch: Vec<(BlobId, Vec<u8>)> = (1..=200u8)
            .map(|i| (BlobId([i; 32]), vec![i; 100 + i as usize]))
            .collect();
        c.put_trees(&batch).unwrap();
        c.put_trees(&[]).unwrap();
        let (other, _) = SqliteCatalog::open(&path, "v").unwrap();
        assert_eq!(
            other.tree(&BlobId([1; 32])).unwrap(),
            Some(b"first".to_vec())
        );
        for (id, data) in &batch[1..] {
            assert_eq!(other.tree(id).unwrap().as_ref(), Some(data));
        }
        assert_eq!(other.tree(&BlobId([201; 32])).unwrap(), None);
    }
}
