//! The coordinator's job queue and agent registry, in the catalog file.
//!
//! Jobs survive a coordinator restart (even `kill -9`): a job is a row whose
//! state moves queued → running (leased by its agent until `lease_until`) →
//! done or failed. An agent that stops renewing its lease loses the job,
//! which is marked failed; a retry is a new job, and it resumes because the
//! packs the first attempt committed are already in the catalog.
//!
//! A distributed job (a bucket sync) is a parent row that no agent runs and
//! child tasks that any agent may lease (`agent = '*'` until leased). A
//! child whose agent is lost goes back to the queue (up to `MAX_ATTEMPTS`);
//! the keys a child could not do are kept in `task_failures`; the parent
//! settles when its last child does, with the children's counters summed.

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
    created INTEGER NOT NULL, started INTEGER NOT NULL DEFAULT 0, finished INTEGER NOT NULL DEFAULT 0,
    parent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, agent);
CREATE INDEX IF NOT EXISTS jobs_by_parent ON jobs (parent, state);
CREATE TABLE IF NOT EXISTS task_failures (
    parent INTEGER NOT NULL, task INTEGER NOT NULL, key TEXT NOT NULL, error TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS task_failures_by_parent ON task_failures (parent, task);
";

/// Any agent may lease a job queued for this agent name.
pub const ANY_AGENT: &str = "*";

/// A lost task is handed out this many times before it fails for good.
pub const MAX_ATTEMPTS: u32 = 5;

/// A key a task could not do, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaskFailure {
    pub key: String,
    pub error: String,
}

/// A distributed job's children, counted by state, and their counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChildSummary {
    pub queued: u64,
    pub running: u64,
    pub done: u64,
    pub failed: u64,
    /// Numeric fields of the finished children's results, summed, plus the
    /// running children's progress under `progress`.
    pub totals: serde_json::Map<String, serde_json::Value>,
    pub failures: u64,
}

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
    /// The distributed job this is a task of (0: none).
    pub parent: u64,
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

const JOB_COLUMNS: &str = "id, agent, kind, spec, state, progress, result, error, exit_code, attempt, created, started, finished, parent";

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
        parent: r.get::<_, i64>(13)? as u64,
    })
}

/// Adds the sums of `result`'s numeric fields into `totals`.
fn add_numbers(totals: &mut serde_json::Map<String, serde_json::Value>, result: &str) {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(result) else {
        return;
    };
    for (k, v) in m {
        let add = |old: Option<&serde_json::Value>| -> Option<serde_json::Value> {
            match (old, &v) {
                (None, serde_json::Value::Number(_)) => Some(v.clone()),
                (Some(serde_json::Value::Number(a)), serde_json::Value::Number(b)) => {
                    match (a.as_u64(), b.as_u64()) {
                        (Some(a), Some(b)) => Some(a.saturating_add(b).into()),
                        _ => serde_json::Number::from_f64(
                            a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0),
                        )
                        .map(serde_json::Value::Number),
                    }
                }
                _ => None,
            }
        };
        if let Some(n) = add(totals.get(&k)) {
            totals.insert(k, n);
        }
    }
}

impl JobQueue {
    /// Opens the queue in the catalog file at `path` (its own connection;
    /// WAL lets it share the file with the catalog).
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = crate::connect(path, "")?;
        let sql = |source| Error::Sqlite {
            path: path.into(),
            source,
        };
        // Catalogs made before distributed jobs lack `parent`.
        let columns = |name: &str| -> Result<i64, Error> {
            conn.query_row(
                "SELECT count(*) FROM pragma_table_info('jobs') WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .map_err(sql)
        };
        if columns("agent")? > 0 && columns("parent")? == 0 {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN parent INTEGER NOT NULL DEFAULT 0")
                .map_err(sql)?;
        }
        conn.execute_batch(SCHEMA).map_err(sql)?;
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
            let tx = c.unchecked_transaction()?;
            let ids: Vec<i64> = {
                let mut st =
                    tx.prepare("SELECT id FROM jobs WHERE agent = ?1 AND state = 'running'")?;
                st.query_map(params![agent], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for id in &ids {
                lose(&tx, *id, reason)?;
            }
            tx.commit()?;
            Ok(ids.len())
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
                    "SELECT id FROM jobs WHERE (agent = ?1 OR agent = ?2) AND state = 'queued'
                     ORDER BY agent = ?2, id LIMIT 1",
                    params![agent, ANY_AGENT],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = id {
                tx.execute(
                    "UPDATE jobs SET state = 'running', agent = ?4, attempt = attempt + 1,
                     lease_until_ms = ?2, started = ?3 WHERE id = ?1",
                    params![id, until, now_ms() / 1000, agent],
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
        // A task's failed keys go to their own table, not into the result.
        let mut failures: Vec<TaskFailure> = Vec::new();
        let mut result = result.to_string();
        let is_task = self.job(job)?.is_some_and(|j| j.parent != 0);
        if is_task && let Ok(serde_json::Value::Object(mut m)) = serde_json::from_str(&result) {
            if let Some(f) = m.remove("failed") {
                failures.extend(serde_json::from_value::<Vec<TaskFailure>>(f).unwrap_or_default());
            }
            if let Some(serde_json::Value::Array(keys)) = m.remove("mismatched") {
                failures.extend(keys.into_iter().filter_map(|k| {
                    k.as_str().map(|k| TaskFailure {
                        key: k.to_string(),
                        error: "the copy differs from the source (--verify)".into(),
                    })
                }));
            }
            m.remove("plan");
            result = serde_json::Value::Object(m).to_string();
        }
        let state = if failures.is_empty() { state } else { "failed" };
        let exit_code = if failures.is_empty() {
            exit_code
        } else {
            exit_code.max(1)
        };
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let n = tx.execute(
                "UPDATE jobs SET state = ?3, exit_code = ?4, result = ?5, error = ?6, finished = ?7
                 WHERE id = ?1 AND agent = ?2
                   AND (state = 'running' OR (state = 'failed' AND error LIKE 'lease expired%'))",
                params![job as i64, agent, state, exit_code, result, error, now_ms() / 1000],
            )?;
            if n == 1 {
                let parent: i64 =
                    tx.query_row("SELECT parent FROM jobs WHERE id = ?1", params![job as i64], |r| {
                        r.get(0)
                    })?;
                if parent != 0 {
                    tx.execute(
                        "DELETE FROM task_failures WHERE parent = ?1 AND task = ?2",
                        params![parent, job as i64],
                    )?;
                    let mut st = tx.prepare(
                        "INSERT INTO task_failures (parent, task, key, error) VALUES (?1, ?2, ?3, ?4)",
                    )?;
                    for f in &failures {
                        st.execute(params![parent, job as i64, f.key, f.error])?;
                    }
                    drop(st);
                    settle(&tx, parent)?;
                }
            }
            tx.commit()?;
            Ok(n == 1)
        })
    }

    /// Queues a distributed job: the parent, which no agent runs, and its
    /// first task, which any agent may take.
    pub fn submit_distributed(
        &self,
        kind: &str,
        spec: &str,
        task_kind: &str,
        task_spec: &str,
    ) -> Result<JobRow, Error> {
        let id = self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let now = now_ms() / 1000;
            tx.execute(
                "INSERT INTO jobs (agent, kind, spec, state, created, started) VALUES ('', ?1, ?2, 'running', ?3, ?3)",
                params![kind, spec, now],
            )?;
            let id = tx.last_insert_rowid();
            tx.execute(
                "INSERT INTO jobs (agent, kind, spec, state, created, parent) VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
                params![ANY_AGENT, task_kind, task_spec, now, id],
            )?;
            tx.commit()?;
            Ok(id)
        })?;
        self.job(id as u64)?.ok_or_else(|| Error::Io {
            path: self.path.clone(),
            reason: format!("job {id} vanished"),
        })
    }

    /// Adds tasks to the distributed job of `task` (a running task of
    /// `agent`, typically the one splitting the key space) and replaces
    /// that task's spec with `task_spec` (its cursor, so that a reissued
    /// split resumes where this one got to), in one transaction.
    /// False if `task` is not running under `agent`.
    ///
    /// Idempotent: `from_spec` is the task's spec the batch was cut from;
    /// if the stored spec is already `task_spec`, the batch was added by an
    /// earlier try of the same call (its reply was lost) and is not added
    /// again.
    #[allow(clippy::too_many_arguments)]
    pub fn add_tasks(
        &self,
        agent: &str,
        task: u64,
        kind: &str,
        specs: &[String],
        from_spec: &str,
        task_spec: &str,
    ) -> Result<bool, Error> {
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let row: Option<(i64, String)> = tx
                .query_row(
                    "SELECT parent, spec FROM jobs WHERE id = ?1 AND agent = ?2 AND state = 'running' AND parent != 0",
                    params![task as i64, agent],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((parent, stored)) = row else {
                return Ok(false);
            };
            if stored == task_spec {
                return Ok(true);
            }
            if stored != from_spec {
                return Ok(false);
            }
            let now = now_ms() / 1000;
            {
                let mut st = tx.prepare(
                    "INSERT INTO jobs (agent, kind, spec, state, created, parent) VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
                )?;
                for spec in specs {
                    st.execute(params![ANY_AGENT, kind, spec, now, parent])?;
                }
            }
            tx.execute(
                "UPDATE jobs SET spec = ?2 WHERE id = ?1",
                params![task as i64, task_spec],
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// Queues again every failed task of a distributed job (their failed
    /// keys are forgotten; the tasks record them anew). Done tasks stay
    /// done. Returns how many tasks were queued.
    pub fn rerun(&self, parent: u64) -> Result<usize, Error> {
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let ids: Vec<i64> = {
                let mut st =
                    tx.prepare("SELECT id FROM jobs WHERE parent = ?1 AND state = 'failed'")?;
                st.query_map(params![parent as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for id in &ids {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', agent = ?2, attempt = 0, error = '', result = '',
                     progress = '', exit_code = -1, lease_until_ms = 0, finished = 0 WHERE id = ?1",
                    params![id, ANY_AGENT],
                )?;
                tx.execute(
                    "DELETE FROM task_failures WHERE parent = ?1 AND task = ?2",
                    params![parent as i64, id],
                )?;
            }
            if !ids.is_empty() {
                tx.execute(
                    "UPDATE jobs SET state = 'running', error = '', exit_code = -1, finished = 0 WHERE id = ?1",
                    params![parent as i64],
                )?;
            }
            tx.commit()?;
            Ok(ids.len())
        })
    }

    /// The keys a distributed job's tasks could not do (at most `limit`).
    pub fn failures(&self, parent: u64, limit: usize) -> Result<Vec<TaskFailure>, Error> {
        self.run(|c| {
            let mut st = c.prepare(
                "SELECT key, error FROM task_failures WHERE parent = ?1 ORDER BY key LIMIT ?2",
            )?;
            st.query_map(params![parent as i64, limit as i64], |r| {
                Ok(TaskFailure {
                    key: r.get(0)?,
                    error: r.get(1)?,
                })
            })?
            .collect()
        })
    }

    /// A distributed job's tasks, counted, with their counters summed.
    pub fn children(&self, parent: u64) -> Result<ChildSummary, Error> {
        self.run(|c| summarize(c, parent as i64))
    }

    /// Fails running jobs whose lease has expired; returns their ids.
    pub fn expire(&self) -> Result<Vec<u64>, Error> {
        let now = now_ms();
        self.run(|c| {
            let tx = c.unchecked_transaction()?;
            let ids: Vec<(i64, String)> = {
                let mut st = tx.prepare(
                    "SELECT id, agent FROM jobs WHERE state = 'running' AND lease_until_ms < ?1 AND agent != ''",
                )?;
                st.query_map(params![now], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?
            };
            for (id, agent) in &ids {
                lose(
                    &tx,
                    *id,
                    &format!(
                        "lease expired: agent {agent} stopped reporting (killed, or cut off from the coordinator); \
                         submit the job again to resume it"
                    ),
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

    /// The most recent jobs (not the tasks of distributed jobs), newest last.
    pub fn jobs(&self, limit: usize) -> Result<Vec<JobRow>, Error> {
        self.run(|c| {
            let mut st = c.prepare(&format!(
                "SELECT * FROM (SELECT {JOB_COLUMNS} FROM jobs WHERE parent = 0 ORDER BY id DESC LIMIT ?1) ORDER BY id"
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

/// A running job whose agent is gone: a task of a distributed job goes
/// back to the queue for any agent (until `MAX_ATTEMPTS`); any other job
/// fails, and its parent settles if it was the last one running.
fn lose(tx: &rusqlite::Transaction<'_>, id: i64, reason: &str) -> rusqlite::Result<()> {
    let (parent, attempt): (i64, u32) = tx.query_row(
        "SELECT parent, attempt FROM jobs WHERE id = ?1",
        params![id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    if parent != 0 && attempt < MAX_ATTEMPTS {
        tx.execute(
            "UPDATE jobs SET state = 'queued', agent = ?2, progress = '', error = ?3 WHERE id = ?1",
            params![id, ANY_AGENT, reason],
        )?;
        return Ok(());
    }
    tx.execute(
        "UPDATE jobs SET state = 'failed', exit_code = 1, finished = ?2, error = ?3 WHERE id = ?1",
        params![id, now_ms() / 1000, reason],
    )?;
    if parent != 0 {
        settle(tx, parent)?;
    }
    Ok(())
}

fn summarize(c: &Connection, parent: i64) -> rusqlite::Result<ChildSummary> {
    let mut s = ChildSummary::default();
    let mut progress = serde_json::Map::new();
    let mut st = c.prepare("SELECT state, result, progress FROM jobs WHERE parent = ?1")?;
    let mut rows = st.query(params![parent])?;
    while let Some(r) = rows.next()? {
        let state: String = r.get(0)?;
        match state.as_str() {
            "queued" => s.queued += 1,
            "running" => {
                s.running += 1;
                add_numbers(&mut progress, &r.get::<_, String>(2)?);
            }
            "done" => s.done += 1,
            _ => s.failed += 1,
        }
        add_numbers(&mut s.totals, &r.get::<_, String>(1)?);
    }
    if !progress.is_empty() {
        s.totals
            .insert("progress".into(), serde_json::Value::Object(progress));
    }
    s.failures = c.query_row(
        "SELECT count(*) FROM task_failures WHERE parent = ?1",
        params![parent],
        |r| r.get::<_, i64>(0),
    )? as u64;
    Ok(s)
}

/// Ends a distributed job once none of its tasks is queued or running:
/// done if every task is, else failed; its result is the tasks' counters.
fn settle(tx: &rusqlite::Transaction<'_>, parent: i64) -> rusqlite::Result<()> {
    // Cheap first (indexed): most finishing tasks are not the last one.
    let active: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM jobs WHERE parent = ?1 AND state IN ('queued', 'running'))",
        params![parent],
        |r| r.get(0),
    )?;
    if active {
        return Ok(());
    }
    let s = summarize(tx, parent)?;
    let mut result = s.totals.clone();
    result.insert("tasks".into(), (s.done + s.failed).into());
    result.insert("tasks_failed".into(), s.failed.into());
    let ok = s.failed == 0 && s.failures == 0;
    let error = if ok {
        String::new()
    } else {
        // The first failed task's reason, so that the job's own error says
        // why without a look at each task.
        let first: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, error FROM jobs WHERE parent = ?1 AND state NOT IN ('queued', 'running', 'done') \
                 AND error IS NOT NULL AND error != '' ORDER BY id LIMIT 1",
                params![parent],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        format!(
            "{} of {} tasks failed, {} keys failed{}",
            s.failed,
            s.done + s.failed,
            s.failures,
            first
                .map(|(id, e)| format!(" (task job {id}: {e})"))
                .unwrap_or_default()
        )
    };
    tx.execute(
        "UPDATE jobs SET state = ?2, exit_code = ?3, result = ?4, error = ?5, finished = ?6 WHERE id = ?1",
        params![
            parent,
            if ok { "done" } else { "failed" },
            if ok { 0 } else { 1 },
            serde_json::Value::Object(result).to_string(),
            error,
            now_ms() / 1000
        ],
    )?;
    Ok(())
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
    fn a_distributed_job_settles_when_its_last_task_does() {
        let (_d, q) = queue();
        let p = q
            .submit_distributed("bucket", "{}", "bucket_split", "{\"at\":0}")
            .unwrap();
        assert_eq!(p.state, "running");
        // Any agent takes the split; it adds two tasks and moves its cursor.
        let split = q.lease("b", Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!((split.parent, split.agent.as_str()), (p.id, "b"));
        assert!(
            !q.add_tasks(
                "a",
                split.id,
                "bucket_range",
                &["{}".into()],
                "{\"at\":0}",
                "{}"
            )
            .unwrap()
        );
        assert!(
            q.add_tasks(
                "b",
                split.id,
                "bucket_range",
                &["{\"n\":1}".into(), "{\"n\":2}".into()],
                "{\"at\":0}",
                "{\"at\":2}"
            )
            .unwrap()
        );
        assert_eq!(q.job(split.id).unwrap().unwrap().spec, "{\"at\":2}");
        // The same batch again (a retried call whose reply was lost): accepted,
        // not added twice; a batch cut from a stale cursor: refused.
        let again = ["{\"n\":1}".to_string(), "{\"n\":2}".to_string()];
        assert!(
            q.add_tasks(
                "b",
                split.id,
                "bucket_range",
                &again,
                "{\"at\":0}",
                "{\"at\":2}"
            )
            .unwrap()
        );
        let stale = ["{\"n\":3}".to_string()];
        assert!(
            !q.add_tasks(
                "b",
                split.id,
                "bucket_range",
                &stale,
                "{\"at\":1}",
                "{\"at\":3}"
            )
            .unwrap()
        );
        assert!(q.finish("b", split.id, 0, "{}", "").unwrap());
        assert_eq!(q.job(p.id).unwrap().unwrap().state, "running");
        // One task lost with its agent goes back to the queue for anyone.
        let t1 = q.lease("a", Duration::from_millis(0)).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(q.expire().unwrap(), vec![t1.id]);
        assert_eq!(q.job(t1.id).unwrap().unwrap().state, "queued");
        let again = q.lease("c", Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!((again.id, again.attempt), (t1.id, 2));
        assert!(
            q.finish(
                "c",
                t1.id,
                0,
                "{\"objects_copied\":3,\"bytes_copied\":10}",
                ""
            )
            .unwrap()
        );
        let t2 = q.lease("a", Duration::from_secs(30)).unwrap().unwrap();
        let failed = r#"{"objects_copied":1,"bytes_copied":5,"failed":[{"key":"k1","error":"boom"}],"mismatched":["k2"]}"#;
        assert!(q.finish("a", t2.id, 0, failed, "").unwrap());
        let j = q.job(p.id).unwrap().unwrap();
        assert_eq!((j.state.as_str(), j.exit_code), ("failed", 1));
        let r: serde_json::Value = serde_json::from_str(&j.result).unwrap();
        assert_eq!(r["objects_copied"], 4);
        assert_eq!(r["bytes_copied"], 15);
        assert_eq!(r["tasks"], 3);
        let f = q.failures(p.id, 10).unwrap();
        assert_eq!(
            f.iter().map(|f| f.key.as_str()).collect::<Vec<_>>(),
            ["k1", "k2"]
        );
        assert_eq!(f[0].error, "boom");
        // Tasks are not listed as jobs.
        assert_eq!(q.jobs(10).unwrap().len(), 1);
        // A rerun queues only the failed task, and forgets its failures.
        assert_eq!(q.rerun(p.id).unwrap(), 1);
        assert_eq!(q.job(p.id).unwrap().unwrap().state, "running");
        assert!(q.failures(p.id, 10).unwrap().is_empty());
        let t = q.lease("a", Duration::from_secs(30)).unwrap().unwrap();
        assert_eq!(t.id, t2.id);
        assert!(q.lease("a", Duration::from_secs(30)).unwrap().is_none());
        assert!(
            q.finish(
                "a",
                t.id,
                0,
                "{\"objects_copied\":2,\"bytes_copied\":5}",
                ""
            )
            .unwrap()
        );
        let j = q.job(p.id).unwrap().unwrap();
        assert_eq!(j.state, "done");
        let r: serde_json::Value = serde_json::from_str(&j.result).unwrap();
        assert_eq!(r["objects_copied"], 5);
        assert_eq!(q.rerun(p.id).unwrap(), 0);
    }

    #[test]
    fn a_failed_distributed_job_says_why_its_first_task_failed() {
        let (_d, q) = queue();
        let p = q
            .submit_distributed("bucket", "{}", "bucket_split", "{\"at\":0}")
            .unwrap();
        let split = q.lease("a", Duration::from_secs(30)).unwrap().unwrap();
        assert!(
            q.add_tasks(
                "a",
                split.id,
                "bucket_range",
                &["{}".into()],
                "{\"at\":0}",
                "{\"at\":1}"
            )
            .unwrap()
        );
        assert!(q.finish("a", split.id, 0, "{}", "").unwrap());
        let t = q.lease("a", Duration::from_secs(30)).unwrap().unwrap();
        assert!(
            q.finish(
                "a",
                t.id,
                1,
                "{}",
                "no remote named \"r\" in the config file"
            )
            .unwrap()
        );
        let j = q.job(p.id).unwrap().unwrap();
        assert_eq!(j.state, "failed");
        assert_eq!(
            j.error,
            format!(
                "1 of 2 tasks failed, 0 keys failed (task job {}: no remote named \"r\" in the config file)",
                t.id
            )
        );
    }

    #[test]
    fn an_old_catalog_gains_the_parent_column() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.sqlite");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, agent TEXT NOT NULL, kind TEXT NOT NULL,
             spec TEXT NOT NULL, state TEXT NOT NULL, progress TEXT NOT NULL DEFAULT '', result TEXT NOT NULL DEFAULT '',
             error TEXT NOT NULL DEFAULT '', exit_code INTEGER NOT NULL DEFAULT -1, attempt INTEGER NOT NULL DEFAULT 0,
             lease_until_ms INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL, started INTEGER NOT NULL DEFAULT 0,
             finished INTEGER NOT NULL DEFAULT 0);
             INSERT INTO jobs (agent, kind, spec, state, created) VALUES ('a', 'snapshot', '{}', 'done', 1);",
        )
        .unwrap();
        drop(c);
        let q = JobQueue::open(&path).unwrap();
        assert_eq!(q.job(1).unwrap().unwrap().parent, 0);
        assert_eq!(q.jobs(10).unwrap().len(), 1);
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
