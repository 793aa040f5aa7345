//! The coordinator's job queue and agent registry, in the catalog file.
//!
//! Jobs survive a coordinator restart (even `kill -9`): a job is a row whose
//! state moves queued → running (leased by its agent until `lease_until`) →
//! done or failed. An agent that stops renewing its lease loses the job,
//! which is marked failed; a retry is a new job, and it resumes because the
//! packs the first attempt committed are already in the catalog.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, roots TEXT NOT NULL, host TEXT NOT NULL, version TEXT NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent TEXT NOT NULL, kind TEXT NOT NULL, spec TEXT NOT NULL,
    state TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '', result TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', exit_code INTEGER NOT NULL DEFAULT -1,
    attempt INTEGER NOT NULL DEFAULT 0, lease_until_ms INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL, started INTEGER NOT NULL DEFAULT 0, finished INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, agent);
";

/// A job as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobRow {
    pub id: u64,
    pub agent: String,
    pub kind: String,
    pub spec: String,
    /// `queued`, `running`, `done` or `failed`.
    pub state: String,
    pub progress: String,
    pub result: String,
    pub error: String,
    pub exit_code: i32,
    pub attempt: u32,
    /// Unix seconds; 0 when not yet.
    pub created: i64,
    pub started: i64,
    pub finished: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentRow {
    pub name: String,
    pub roots: Vec<String>,
    pub host: String,
    pub version: String,
    pub last_seen_ms: i64,
}

pub struct JobQueue {
    conn: Mutex<Connection>,
    path: PathBuf,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

const JOB_COLUMNS: &str = "id, agent, kind, spec, state, progress, result, error, exit_code, attempt, created, started, finished";

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get::<_, i64>(0)? as u64,
        agent: r.get(1)?,
        kind: r.get(2)?,
        spec: r.get(3)?,
        state: r.get(4)?,
        progress: r.get(5)?,
        result: r.get(6)?,
        error: r.get(7)?,
        exit_code: r.get(8)?,
        attempt: r.get(9)?,
        created: r.get(10)?,
        started: r.get(11)?,
        finished: r.get(12)?,
    })
}

impl JobQueue {
    /// Opens the queue in the catalog file at `path` (its own connection;
    /// WAL lets it share the file with the catalog).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = crate::connect(path, SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.into(),
        })
    }

    fn run<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, Error> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(|source| Error::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Gives every running job a fresh lease: called when the coordinator
    /// starts, so that agents have time to reconnect after a restart.
    pub fn renew_all_leases(&self, lease: Duration) -> Result<usize, Error> {
        let until = now_ms() + lease.as_millis() as i64;
        self.run(|c| {
            c.execute(
                "UPDATE jobs SET lease_until_ms = ?1 WHERE state = 'running'",
                params![until],
            )
        })
    }

    pub fn register(&self, a: &AgentRow) -> Result<(), Error> {
        let roots = serde_json::to_string(&a.roots).unwrap_or_default();
        self.run(|c| {
            c.execute(
                "INSERT INTO agents (name, roots, host, version, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (name) DO UPDATE SET roots = ?2, host = ?3, version = ?4, last_seen_ms = ?5",
                params![a.name, roots, a.host, a.version, now_ms()],
            )
        })?;
        Ok(())
    }

    /// Fails the running jobs of an agent that registered again: it was
    /// restarted, so whatever it was doing stopped.
    pub fn fail_running_of(&self, agent: &str, reason: &str) -> Result<usize, Error> {
        self.run(|c| {
            c.execute(
                "UPDATE jobs SET state = 'failed', error = ?2, exit_code = 1, finished = ?3
                 WHERE agent = ?1 AND state = 'running'",
                params![agent, reason, now_ms() / 1000],
            )
        })
    }

    pub fn agent(&self, name: &str) -> Result<Option<AgentRow>, Error> {
        self.run(|c| {
            c.query_row(
                "SELECT name, roots, host, version, last_seen_ms FROM agents WHERE name = ?1",
                params![name],
                agent_row,
            )
            .optional()
        })
    }

    pub fn agents(&self) -> Result<Vec<AgentRow>, Error> {
        self.run(|c| {
            let mut st = c.prepare(
                "SELECT name, roots, host, version, last_seen_ms FROM agents ORDER BY name",
            )?;
            st.query_map([], agent_row)?.collect()
        })
    }

    pub fn touch_agent(&self, name: &str) -> Result<bool, Error> {
        let n = self.run(|c| {
            c.execute(
                "UPDATE agents SET last_seen_ms = ?2 WHERE name = ?1",
                params![name, now_ms()],
            )
        })?;
        Ok(n == 1)
    }

    pub fn submit(&self, agent: &str, kind: &str, spec: &str) -> Result<JobRow, Error> {
        let id = self.run(|c| {
            c.execute(
                "INSERT INTO jobs (agent, kind, spec, state, created) VALUES (?1, ?2, ?3, 'queued', ?4)",
                params![agent, kind, spec, now_ms() / 1000],
            )?;
            Ok(c.last_insert_rowid())
        })?;
        self.job(id as u64)?.ok_or_else(|| Error::Io {
            path: self.path.clone(),
            reason: format!("job {id} vanished"),
        })
    }

    /// Hands the agent its oldest queued job, leased until `lease` from now.
    pub fn lease(&self, agent: &str, lease: Duration) -> Result<Option<JobRow>, Error> {
        let until = now_ms() + lease.as_millis() as i64;
        let id = self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let id: Option<i64> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE agent = ?1 AND state = 'queued' ORDER BY id LIMIT 1",
                    params![agent],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = id {
                tx.execute(
                    "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_until_ms = ?2,
                     started = ?3 WHERE id = ?1",
                    params![id, until, now_ms() / 1000],
                )?;
            }
            tx.commit()?;
            Ok(id)
        })?;
        match id {
            Some(id) => self.job(id as u64),
            None => Ok(None),
        }
    }

    /// Renews the agent's lease on a running job and records its progress.
    /// False if the job is no longer running under this agent.
    pub fn heartbeat(
        &self,
        agent: &str,
        job: u64,
        progress: &str,
        lease: Duration,
    ) -> Result<bool, Error> {
        let until = now_ms() + lease.as_millis() as i64;
        let n = self.run(|c| {
            c.execute(
                "UPDATE jobs SET lease_until_ms = ?3, progress = ?4
                 WHERE id = ?1 AND agent = ?2 AND state = 'running'",
                params![job as i64, agent, until, progress],
            )
        })?;
        Ok(n == 1)
    }

    /// Records a job's outcome. A job failed only because its lease expired
    /// (the coordinator could not hear the agent) takes the agent's real
    /// outcome when it arrives. False if the job is not this agent's.
    pub fn finish(
        &self,
        agent: &str,
        job: u64,
        exit_code: i32,
        result: &str,
        error: &str,
    ) -> Result<bool, Error> {
        let state = if exit_code == 0 || exit_code == 3 {
            "done"
        } else {
            "failed"
        };
        let n =
            self.run(|c| {
                c.execute(
                "UPDATE jobs SET state = ?3, exit_code = ?4, result = ?5, error = ?6, finished = ?7
                 WHERE id = ?1 AND agent = ?2
                   AND (state = 'running' OR (state = 'failed' AND error LIKE 'lease expired%'))",
                params![job as i64, agent, state, exit_code, result, error, now_ms() / 1000],
            )
            })?;
        Ok(n == 1)
    }

    /// Fails running jobs whose lease has expired; returns their ids.
    pub fn expire(&self) -> Result<Vec<u64>, Error> {
        let now = now_ms();
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let ids: Vec<(i64, String)> = {
                let mut st = tx.prepare(
                    "SELECT id, agent FROM jobs WHERE state = 'running' AND lease_until_ms < ?1",
                )?;
                st.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for (id, agent) in &ids {
                tx.execute(
                    "UPDATE jobs SET state = 'failed', exit_code = 1, finished = ?2, error = ?3 WHERE id = ?1",
                    params![
                        id,
                        now / 1000,
                        format!(
                            "lease expired: agent {agent} stopped reporting (killed, or cut off from the coordinator); \
                             submit the job again to resume it"
                        )
                    ],
                )?;
            }
            tx.commit()?;
            Ok(ids.into_iter().map(|(id, _)| id as u64).collect())
        })
    }

    pub fn job(&self, id: u64) -> Result<Option<JobRow>, Error> {
        self.run(|c| {
            c.query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id as i64],
                job_row,
            )
            .optional()
        })
    }

    /// The most recent jobs, newest last.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRow>, Error> {
        self.run(|c| {
            let mut st = c.prepare(&format!(
                "SELECT * FROM (SELECT {JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT ?1) ORDER BY id"
            ))?;
            st.query_map(params![limit as i64], job_row)?.collect()
        })
    }

    pub fn running_job_of(&self, agent: &str) -> Result<Option<u64>, Error> {
        self.run(|c| {
            c.query_row(
                "SELECT id FROM jobs WHERE agent = ?1 AND state = 'running' ORDER BY id LIMIT 1",
                params![agent],
                |r| r.get::<_, i64>(0),
            )
            .optional()
        })
        .map(|o| o.map(|v| v as u64))
    }
}

fn agent_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AgentRow> {
    let roots: String = r.get(1)?;
    Ok(AgentRow {
        name: r.get(0)?,
        roots: serde_json::from_str(&roots).unwrap_or_default(),
        host: r.get(2)?,
        version: r.get(3)?,
        last_seen_ms: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (tempfile::TempDir, JobQueue) {
        let d = tempfile::tempdir().unwrap();
        let q = JobQueue::open(&d.path().join("c.sqlite")).unwrap();
        (d, q)
    }

    #[test]
    fn a_job_goes_to_its_agent_once_and_survives_reopen() {
        let (d, q) = queue();
        let j = q.submit("a", "snapshot", "{}").unwrap();
        assert_eq!(j.state, "queued");
        assert!(q.lease("b", Duration::from_secs(30)).unwrap().is_none());
        let l = q.lease("a", Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!((l.id, l.state.as_str(), l.attempt), (j.id, "running", 1));
        assert!(q.lease("a", Duration::from_secs(30)).unwrap().is_none());
        drop(q);
        let q = JobQueue::open(&d.path().join("c.sqlite")).unwrap();
        assert!(
            q.heartbeat("a", j.id, "{\"bytes\":1}", Duration::from_secs(30))
                .unwrap()
        );
        assert!(
            !q.heartbeat("b", j.id, "{}", Duration::from_secs(30))
                .unwrap()
        );
        assert!(q.finish("a", j.id, 0, "{\"ok\":1}", "").unwrap());
        let f = q.job(j.id).unwrap().unwrap();
        assert_eq!(
            (f.state.as_str(), f.progress.as_str()),
            ("done", "{\"bytes\":1}")
        );
        // Finished is final.
        assert!(!q.finish("a", j.id, 1, "", "late").unwrap());
        assert!(
            !q.heartbeat("a", j.id, "{}", Duration::from_secs(30))
                .unwrap()
        );
    }

    #[test]
    fn an_expired_lease_fails_the_job_but_a_late_result_still_lands() {
        let (_d, q) = queue();
        let j = q.submit("a", "restore", "{}").unwrap();
        q.lease("a", Duration::from_millis(0)).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(q.expire().unwrap(), vec![j.id]);
        let f = q.job(j.id).unwrap().unwrap();
        assert_eq!(f.state, "failed");
        assert!(f.error.starts_with("lease expired"), "{}", f.error);
        assert!(q.expire().unwrap().is_empty());
        assert!(q.finish("a", j.id, 0, "{}", "").unwrap());
        assert_eq!(q.job(j.id).unwrap().unwrap().state, "done");
    }

    #[test]
    fn a_restarted_agent_loses_its_running_jobs() {
        let (_d, q) = queue();
        q.register(&AgentRow {
            name: "a".into(),
            roots: vec!["/data".into()],
            ..Default::default()
        })
        .unwrap();
        let j = q.submit("a", "snapshot", "{}").unwrap();
        q.lease("a", Duration::from_secs(30)).unwrap();
        assert_eq!(q.running_job_of("a").unwrap(), Some(j.id));
        assert_eq!(q.fail_running_of("a", "agent restarted").unwrap(), 1);
        assert_eq!(q.running_job_of("a").unwrap(), None);
        assert_eq!(
            q.agent("a").unwrap().unwrap().roots,
            vec!["/data".to_string()]
        );
    }
}
