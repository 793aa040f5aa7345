//! The agent: registers with the coordinator, takes its jobs one at a
//! time, runs them next to the data with the remote catalog, and reports.
//!
//! It acts only under its roots: a job whose path resolves (symlinks
//! included) outside every root is refused. It survives coordinator
//! restarts: every call is retried with backoff, and a finished job's
//! outcome is kept until the coordinator has taken it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferry_core::keys::MasterKeys;
use ferry_core::restore::RestoreOptions;
use ferry_core::snapshot::SnapshotOptions;
use ferry_core::vault::{Location, Vault};
use serde_json::Value;

use crate::conn::{Client, ConnectOptions, jitter, with_retry};
use crate::proto;
use crate::remote::RemoteCatalog;
use crate::spec::{JobSpec, ProgressCounter};
use crate::{Error, Result};

/// How long an idle agent's Lease call waits for a job.
pub const LEASE_POLL: Duration = Duration::from_secs(20);

pub struct AgentOptions {
    pub connect: ConnectOptions,
    pub name: String,
    pub roots: Vec<PathBuf>,
    /// Reach the vault here instead of where the coordinator reaches it
    /// (another endpoint for the same vault).
    pub vault: Option<String>,
    /// How long catalog calls and reports keep retrying an unreachable
    /// coordinator before the job fails.
    pub patience: Duration,
    /// Named remotes for bucket tasks (this node's endpoints and
    /// credentials).
    pub bucket_config: ferry_bucket::config::Config,
}

/// Resolves `path` (which may not exist yet) and checks that it lies under
/// one of `roots` (already canonical). Returns the resolved path.
pub fn confine(roots: &[PathBuf], path: &Path) -> std::result::Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{}: not an absolute path", path.display()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{}: '..' is not allowed", path.display()));
    }
    let full = ferry_core::placement::resolve(path);
    if roots.iter().any(|r| full.starts_with(r)) {
        Ok(full)
    } else {
        Err(format!(
            "{} is outside this agent's roots ({})",
            path.display(),
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

pub struct Agent {
    opts: AgentOptions,
    roots: Vec<PathBuf>,
    client: Client,
}

impl Agent {
    pub fn new(opts: AgentOptions) -> Result<Self> {
        if opts.roots.is_empty() {
            return Err(Error::Invalid("an agent needs at least one --root".into()));
        }
        let roots = opts
            .roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| Error::Io {
                    what: format!("root {}", r.display()),
                    source: e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let client = crate::conn::connect(&opts.connect)?;
        Ok(Self {
            opts,
            roots,
            client,
        })
    }

    /// Registers (waiting for the coordinator if it is not up yet) and
    /// opens the vault with the keys it hands over.
    async fn register(&self) -> Result<(Arc<Vault>, Duration)> {
        let req = proto::RegisterRequest {
            agent: self.opts.name.clone(),
            roots: self.roots.iter().map(|r| r.display().to_string()).collect(),
            host: ferry_core::snapshot::SnapshotOptions::new("x").host,
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let client = self.client.clone();
        let r = with_retry(&self.opts.connect.url, "Register", Duration::MAX, || {
            let (mut c, req) = (client.clone(), req.clone());
            async move { c.register(req).await }
        })
        .await?;
        let key = |b: &[u8], what: &str| -> Result<[u8; 32]> {
            b.try_into()
                .map_err(|_| Error::Invalid(format!("coordinator sent a bad {what} key")))
        };
        let keys = MasterKeys {
            data: key(&r.data_key, "data")?,
            id: key(&r.id_key, "id")?,
        };
        let loc = Location::parse(self.opts.vault.as_deref().unwrap_or(&r.vault))?;
        let vault = Vault::open_with_keys(&loc, &r.vault_id, keys).await?;
        tracing::info!(agent = %self.opts.name, vault = %loc, "registered");
        Ok((
            Arc::new(vault),
            Duration::from_secs(u64::from(r.lease_seconds.max(1))),
        ))
    }

    /// Takes and runs jobs until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(stop);
        let (vault, lease) = tokio::select! {
            r = self.register() => r?,
            _ = &mut stop => return Ok(()),
        };
        let catalog = Arc::new(RemoteCatalog::connect(
            &self.opts.connect,
            self.opts.patience,
        )?);
        let mut wait = Duration::from_millis(200);
        loop {
            let mut c = self.client.clone();
            let req = proto::LeaseRequest {
                agent: self.opts.name.clone(),
                wait_seconds: LEASE_POLL.as_secs() as u32,
            };
            let leased = tokio::select! {
                r = c.lease(req) => r,
                _ = &mut stop => return Ok(()),
            };
            match leased {
                Ok(r) => {
                    wait = Duration::from_millis(200);
                    if let Some(job) = r.into_inner().job {
                        self.run_job(job, &vault, &catalog, lease).await;
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    // The coordinator lost our registration (a new catalog).
                    tracing::warn!("{}; registering again", crate::status_line(&s));
                    self.register().await?;
                }
                Err(s) if crate::retryable(&s) => {
                    tracing::warn!(
                        "coordinator {}: {}; retrying",
                        self.opts.connect.url,
                        crate::status_line(&s)
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(jitter(wait)) => {},
                        _ = &mut stop => return Ok(()),
                    }
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(s) => {
                    return Err(Error::Rpc {
                        url: self.opts.connect.url.clone(),
                        call: "Lease",
                        message: crate::status_line(&s),
                    });
                }
            }
        }
    }

    async fn run_job(
        &self,
        job: proto::Job,
        vault: &Arc<Vault>,
        catalog: &Arc<RemoteCatalog>,
        lease: Duration,
    ) {
        tracing::info!(job = job.id, kind = %job.kind, attempt = job.attempt, "job started");
        let progress = Arc::new(ProgressCounter::default());
        let rpcs_before = catalog.rpcs();
        let calls_before = catalog.rpcs_by_call();
        let heartbeats = {
            let (client, agent, id, p) = (
                self.client.clone(),
                self.opts.name.clone(),
                job.id,
                progress.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(lease / 3);
                loop {
                    tick.tick().await;
                    let req = proto::HeartbeatRequest {
                        agent: agent.clone(),
                        job: id,
                        progress_json: serde_json::to_string(&p.snapshot()).unwrap_or_default(),
                    };
                    match client.clone().heartbeat(req).await {
                        Ok(r) if r.get_ref().cancel => {
                            tracing::warn!(
                                job = id,
                                "the coordinator gave this job up (lease expired)"
                            );
                        }
                        Ok(_) => {}
                        Err(s) => tracing::warn!(job = id, "heartbeat: {}", crate::status_line(&s)),
                    }
                }
            })
        };
        let outcome = self
            .execute(&job, vault.clone(), catalog.clone(), progress.clone())
            .await;
        heartbeats.abort();
        let (exit_code, result_json, error) = match outcome {
            Ok((code, mut v)) => {
                if let Value::Object(m) = &mut v {
                    m.insert(
                        "catalog_rpcs".into(),
                        Value::from(catalog.rpcs() - rpcs_before),
                    );
                    let calls: serde_json::Map<String, Value> = catalog
                        .rpcs_by_call()
                        .into_iter()
                        .map(|(k, n)| (k, n - calls_before.get(k).copied().unwrap_or(0)))
                        .filter(|(_, n)| *n > 0)
                        .map(|(k, n)| (k.to_string(), Value::from(n)))
                        .collect();
                    m.insert("catalog_calls".into(), Value::Object(calls));
                }
                (code, v.to_string(), String::new())
            }
            Err(e) => {
                let msg = e.to_string().lines().next().unwrap_or("").to_string();
                tracing::warn!(job = job.id, "job failed: {msg}");
                (1, String::new(), msg)
            }
        };
        let req = proto::FinishRequest {
            agent: self.opts.name.clone(),
            job: job.id,
            exit_code,
            result_json,
            error,
        };
        let client = self.client.clone();
        let r = with_retry(&self.opts.connect.url, "Finish", self.opts.patience, || {
            let (mut c, req) = (client.clone(), req.clone());
            async move { c.finish(req).await }
        })
        .await;
        match r {
            Ok(_) => tracing::info!(job = job.id, exit_code, "job finished"),
            Err(e) => tracing::warn!(job = job.id, "could not report the outcome: {e}"),
        }
    }

    /// Whether the coordinator has heard from agent `name` lately.
    async fn online(&self, name: &str) -> Result<bool> {
        let client = self.client.clone();
        let agents = with_retry(
            &self.opts.connect.url,
            "ListAgents",
            self.opts.patience,
            || {
                let mut c = client.clone();
                async move { c.list_agents(proto::Empty {}).await }
            },
        )
        .await?;
        Ok(agents.agents.iter().any(|a| a.name == name && a.online))
    }

    /// Waits for the snapshot job a restore follows; the id of the
    /// snapshot it made.
    async fn snapshot_of(&self, me: u64, after: &crate::spec::After) -> Result<String> {
        loop {
            let client = self.client.clone();
            let id = after.job;
            let j = with_retry(&self.opts.connect.url, "GetJob", self.opts.patience, || {
                let mut c = client.clone();
                async move { c.get_job(proto::JobRef { id, wait_ms: 1000 }).await }
            })
            .await?;
            match j.state.as_str() {
                "done" => {}
                "failed" => {
                    return Err(Error::Invalid(format!(
                        "job {me}: the snapshot job {id} failed: {}; the target is left as it was",
                        j.error
                    )));
                }
                // Jobs are leased in order, so this cannot happen unless the
                // restore was submitted before its snapshot; it would wait
                // for itself.
                "queued" if j.agent == self.opts.name => {
                    return Err(Error::Invalid(format!(
                        "job {me}: the snapshot job {id} is queued behind it on this agent"
                    )));
                }
                // A snapshot waiting for an agent that is gone would hold
                // this agent, and restore whenever that one came back, long
                // after whoever asked for the sync gave up.
                "queued" if !self.online(&j.agent).await? => {
                    return Err(Error::Invalid(format!(
                        "job {me}: the snapshot job {id} waits for agent {}, which is offline; the target is left as it was",
                        j.agent
                    )));
                }
                _ => continue,
            }
            let v: Value = serde_json::from_str(&j.result_json).unwrap_or(Value::Null);
            let snapshot = v
                .get("snapshot_id")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    Error::Invalid(format!("job {me}: the snapshot job {id} named no snapshot"))
                })?;
            if after.whole && j.exit_code == 3 {
                return Err(Error::Invalid(format!(
                    "job {me}: snapshot {} is incomplete: {} entries could not be read or changed while read (is the source quiesced?); the target is left as it was",
                    snapshot.get(..8).unwrap_or(snapshot),
                    v.get("warnings").and_then(Value::as_u64).unwrap_or(0)
                )));
            }
            return Ok(snapshot.to_string());
        }
    }

    /// Runs one job: its exit code (0, or 3 for an incomplete snapshot) and
    /// its summary.
    async fn execute(
        &self,
        job: &proto::Job,
        vault: Arc<Vault>,
        catalog: Arc<RemoteCatalog>,
        progress: Arc<ProgressCounter>,
    ) -> Result<(i32, Value)> {
        let spec: JobSpec = serde_json::from_str(&job.spec_json)
            .map_err(|e| Error::Invalid(format!("job {}: bad spec: {e}", job.id)))?;
        let path = match spec.path() {
            Some(p) => confine(&self.roots, p).map_err(|e| {
                Error::Invalid(format!(
                    "agent {} refuses job {}: {e}",
                    self.opts.name, job.id
                ))
            })?,
            None => PathBuf::new(),
        };
        let json = |v: serde_json::Result<Value>| v.unwrap_or(Value::Null);
        let roots = self.roots.clone();
        let confine_local = move |p: &Path| confine(&roots, p);
        let bucket = crate::bucket::BucketContext {
            client: &self.client,
            url: &self.opts.connect.url,
            agent: &self.opts.name,
            config: &self.opts.bucket_config,
            confine: &confine_local,
            patience: self.opts.patience,
        };
        match spec {
            JobSpec::BucketSplit {
                job: b,
                after,
                complete,
            } => Ok((
                0,
                crate::bucket::split(&bucket, job.id, &job.spec_json, b, after, complete).await?,
            )),
            JobSpec::BucketRange { job: b, range } => {
                crate::bucket::range(&bucket, catalog, b, range, progress).await
            }
            JobSpec::BucketSync(_) => Err(Error::Invalid(format!(
                "job {}: a bucket sync is run by its tasks, not by one agent",
                job.id
            ))),
            JobSpec::Snapshot {
                volume,
                reread,
                block,
                read_limit,
                ..
            } => {
                let mut opts = SnapshotOptions::new(volume);
                opts.reread = reread;
                opts.block = block;
                opts.read_limit = read_limit;
                // The agent's own catalog cache and state, if its root holds them.
                opts.skip = vec![ferry_catalog::state_dir()];
                let s = crate::work::snapshot(vault, catalog, &path, &opts, progress).await?;
                Ok((
                    if s.incomplete { 3 } else { 0 },
                    json(serde_json::to_value(&s)),
                ))
            }
            JobSpec::SnapshotObjects {
                source,
                volume,
                read_limit,
            } => {
                let mut opts = SnapshotOptions::new(volume);
                opts.read_limit = read_limit;
                let s = crate::bucket::snapshot_objects(
                    &bucket, vault, catalog, &source, &opts, progress,
                )
                .await?;
                Ok((
                    if s.incomplete { 3 } else { 0 },
                    json(serde_json::to_value(&s)),
                ))
            }
            JobSpec::RestoreObjects {
                snapshot,
                target,
                delete,
            } => {
                let snap = find_snapshot(&catalog, snapshot).await?;
                let opts = ferry_core::restore::objects::ObjectRestoreOptions {
                    delete,
                    ..Default::default()
                };
                let s = crate::bucket::restore_objects(
                    &bucket, vault, catalog, &snap, &target, &opts, progress,
                )
                .await?;
                if let Some((k, e)) = s.failed.first() {
                    return Err(Error::Invalid(format!(
                        "{} object(s) not written into {target}, first {k}: {e}",
                        s.failed.len()
                    )));
                }
                Ok((0, json(serde_json::to_value(&s))))
            }
            JobSpec::CompareObjects {
                snapshot,
                target,
                digests,
                extra,
            } => {
                let snap = find_snapshot(&catalog, snapshot).await?;
                let opts = ferry_core::compare::CompareOptions { digests, extra };
                let c =
                    crate::bucket::compare_objects(&bucket, vault, catalog, snap, &target, opts)
                        .await?;
                Ok((0, json(serde_json::to_value(&c))))
            }
            JobSpec::Compare {
                snapshot,
                digests,
                extra,
                ..
            } => {
                let snap = find_snapshot(&catalog, snapshot).await?;
                let opts = ferry_core::compare::CompareOptions { digests, extra };
                let c =
                    ferry_core::compare::compare_dir(&vault, catalog.as_ref(), &snap, &path, &opts)
                        .await?;
                Ok((0, json(serde_json::to_value(&c))))
            }
            JobSpec::Restore {
                snapshot,
                delete,
                verify,
                reread_target,
                after,
                ..
            } => {
                let state = ferry_catalog::state_dir();
                let keep = [("this agent's state directory", state.as_path())];
                ferry_core::placement::check_target(&path, None, &keep, delete)?;
                let started = std::time::Instant::now();
                let (snapshot, checked) = match &after {
                    None => (snapshot, None),
                    Some(after) => {
                        // The target is checked while the snapshot is taken
                        // (on another node), as `ferry sync` does on one.
                        let ahead = match reread_target {
                            false => {
                                crate::work::check_ahead(vault.clone(), catalog.clone(), &path)
                            }
                            true => None,
                        };
                        let id = self.snapshot_of(job.id, after).await?;
                        let checked = match ahead {
                            Some(a) => a.finish().await,
                            None => None,
                        };
                        (format!("{snapshot}@{id}"), checked)
                    }
                };
                let waited_s = started.elapsed().as_secs_f64();
                let snap = find_snapshot(&catalog, snapshot).await?;
                let opts = RestoreOptions {
                    delete,
                    verify,
                    reread_target,
                    checked,
                    ..Default::default()
                };
                let s = crate::work::restore(vault, catalog, &snap, &path, &opts, progress).await?;
                let mut v = json(serde_json::to_value(&s));
                if let (Some(_), Value::Object(m)) = (&after, &mut v) {
                    m.insert("waited_s".into(), Value::from(waited_s));
                }
                Ok((0, v))
            }
        }
    }
}

/// `NAME[@ID]` through the remote catalog, off the async threads.
async fn find_snapshot(
    catalog: &Arc<RemoteCatalog>,
    spec: String,
) -> Result<ferry_core::manifest::SnapshotRecord> {
    let c = catalog.clone();
    tokio::task::spawn_blocking(move || ferry_core::sync::find_snapshot(c.as_ref(), &spec))
        .await
        .map_err(|e| Error::Invalid(format!("finding the snapshot: {e}")))?
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_stay_under_the_roots_even_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("vol")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        let roots = vec![std::fs::canonicalize(&root).unwrap()];
        let croot = &roots[0];

        assert_eq!(
            confine(&roots, &root.join("vol")).unwrap(),
            croot.join("vol")
        );
        // Not there yet: resolved through its existing parent.
        assert_eq!(
            confine(&roots, &root.join("new/deeper")).unwrap(),
            croot.join("new/deeper")
        );
        assert!(confine(&roots, &root.join("escape")).is_err());
        assert!(confine(&roots, &root.join("escape/new")).is_err());
        assert!(confine(&roots, &root.join("vol/../../outside")).is_err());
        assert!(confine(&roots, &outside).is_err());
        assert!(confine(&roots, Path::new("relative/path")).is_err());
        // A sibling whose name merely starts like the root.
        let sibling = d.path().join("rootkit");
        std::fs::create_dir_all(&sibling).unwrap();
        assert!(confine(&roots, &sibling).is_err());
    }
}
