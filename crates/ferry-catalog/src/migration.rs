//! Migrations and their rounds, in the catalog file (embedded, or the
//! coordinator's): the durable record `ferry migration` works from.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_core::catalog::{CatalogError, CatalogResult};
use ferry_core::migration::{Migration, MigrationStore, Round};
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS migrations (
    name TEXT PRIMARY KEY, record TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS migration_rounds (
    migration TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL,
    PRIMARY KEY (migration, seq)
) WITHOUT ROWID;
";

pub struct SqliteMigrations {
    conn: Mutex<Connection>,
    path: PathBuf,
}

fn cerr(e: impl std::error::Error + Send + Sync + 'static) -> CatalogError {
    CatalogError(Box::new(e))
}

impl SqliteMigrations {
    /// Opens the migration tables of the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            conn: Mutex::new(crate::connect(path, SCHEMA)?),
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MigrationStore for SqliteMigrations {
    fn create_migration(&self, m: &Migration) -> CatalogResult<bool> {
        let json = serde_json::to_string(m).map_err(cerr)?;
        let n = self
            .conn()
            .execute(
                "INSERT OR IGNORE INTO migrations (name, record) VALUES (?1, ?2)",
                params![m.name, json],
            )
            .map_err(cerr)?;
        Ok(n == 1)
    }

    fn migration(&self, name: &str) -> CatalogResult<Option<Migration>> {
        let rec: Option<String> = self
            .conn()
            .query_row(
                "SELECT record FROM migrations WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(cerr)?;
        rec.map(|r| serde_json::from_str(&r).map_err(cerr))
            .transpose()
    }

    fn rounds(&self, name: &str) -> CatalogResult<Vec<Round>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT record FROM migration_rounds WHERE migration = ?1 ORDER BY seq")
            .map_err(cerr)?;
        let rows = st
            .query_map([name], |r| r.get::<_, String>(0))
            .map_err(cerr)?;
        rows.map(|r| {
            let s = r.map_err(cerr)?;
            serde_json::from_str(&s).map_err(cerr)
        })
        .collect()
    }

    fn add_round(&self, name: &str, r: &Round) -> CatalogResult<()> {
        let json = serde_json::to_string(r).map_err(cerr)?;
        // A retried call (over gRPC) carries the same seq: recorded once.
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO migration_rounds (migration, seq, record) VALUES (?1, ?2, ?3)",
                params![name, r.seq, json],
            )
            .map_err(cerr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::migration::{Pair, PairKind, RoundKind};

    #[test]
    fn migrations_and_rounds_survive_reopening() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("catalog.sqlite");
        let m = Migration {
            name: "shop".into(),
            created: "2026-12-01T00:00:00Z".into(),
            pairs: vec![Pair {
                source: "/a".into(),
                target: "/b".into(),
                volume: "shop-1".into(),
                kind: PairKind::Dir,
                from_agent: None,
                to_agent: None,
            }],
        };
        {
            let s = SqliteMigrations::open(&p).unwrap();
            assert!(s.create_migration(&m).unwrap());
            assert!(!s.create_migration(&m).unwrap(), "the name is taken");
            for seq in [1, 2] {
                s.add_round(
                    "shop",
                    &Round {
                        seq,
                        kind: Some(RoundKind::Presync),
                        ok: true,
                        ..Default::default()
                    },
                )
                .unwrap();
            }
            // A retried add of round 2 does not make a third.
            s.add_round(
                "shop",
                &Round {
                    seq: 2,
                    kind: Some(RoundKind::Presync),
                    ok: true,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let s = SqliteMigrations::open(&p).unwrap();
        assert_eq!(s.migration("shop").unwrap(), Some(m));
        assert_eq!(s.migration("nope").unwrap(), None);
        let r = s.rounds("shop").unwrap();
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(s.rounds("nope").unwrap().is_empty());
    }
}
