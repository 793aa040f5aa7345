//! The coordinator: serves the SQLite catalog and the job queue over gRPC.
//!
//! It never touches file or pack data. It holds the vault's keys (it opened
//! the vault with the passphrase) and hands them to agents that present the
//! token, so that agents read and write the vault directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use ferry_catalog::SqliteCatalog;
use ferry_catalog::bucket::SqliteSyncState;
use ferry_catalog::jobs::{AgentRow, JobQueue, JobRow, now_ms};
use ferry_catalog::migration::SqliteMigrations;
use ferry_core::bucket_state::{ObjectState, SyncState};
use ferry_core::catalog::Catalog;
use ferry_core::keys::MasterKeys;
use ferry_core::migration::MigrationStore;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::conn::{MAX_MESSAGE, TREES_BUDGET};
use crate::convert;
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::{self, Empty};
use crate::spec::JobSpec;

pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    /// Required unless `listen` is a loopback address.
    pub token: Option<String>,
    /// Certificate chain and key, PEM.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    /// How long a job stays an agent's without a heartbeat.
    pub lease: Duration,
    /// The vault's location as agents should reach it.
    pub vault_location: String,
    pub vault_id: String,
    pub keys: MasterKeys,
    /// Where the state of distributed bucket syncs is kept (one SQLite
    /// file per source/destination pair), next to the catalog.
    pub bucket_state_dir: std::path::PathBuf,
}

struct State {
    catalog: Arc<SqliteCatalog>,
    /// Migrations and their rounds, in the catalog file.
    migrations: Arc<SqliteMigrations>,
    queue: Arc<JobQueue>,
    opts: CoordinatorOptions,
    /// Open bucket sync states, by pair.
    bucket_states: std::sync::Mutex<HashMap<String, Arc<SqliteSyncState>>>,
    /// Woken when a job is submitted, so waiting leases return at once.
    submitted: Notify,
    /// Woken when a job ends, so a client following it hears at once.
    ended: Notify,
}

#[derive(Clone)]
pub struct Service(Arc<State>);

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn failed(e: impl std::fmt::Display) -> Status {
    Status::failed_precondition(e.to_string())
}

/// Runs SQLite work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("catalog task failed: {e}")))?
}

const AGENT_NAME_MAX: usize = 128;

fn check_agent_name(name: &str) -> Result<(), Status> {
    if name.is_empty()
        || name.len() > AGENT_NAME_MAX
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(format!(
            "bad agent name {name:?}: use letters, digits, '-', '_', '.' (at most {AGENT_NAME_MAX})"
        )));
    }
    Ok(())
}

fn job_info(j: JobRow) -> proto::JobInfo {
    proto::JobInfo {
        id: j.id,
        agent: j.agent,
        kind: j.kind,
        spec_json: j.spec,
        state: j.state,
        progress_json: j.progress,
        result_json: j.result,
        error: j.error,
        exit_code: j.exit_code,
        created: j.created,
        started: j.started,
        finished: j.finished,
        attempt: j.attempt,
    }
}

impl Service {
    fn catalog(&self) -> Arc<SqliteCatalog> {
        self.0.catalog.clone()
    }
    fn queue(&self) -> Arc<JobQueue> {
        self.0.queue.clone()
    }

    fn bucket_state(&self, pair: &str) -> Result<Arc<SqliteSyncState>, Status> {
        let mut m = self
            .0
            .bucket_states
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get(pair) {
            return Ok(s.clone());
        }
        let h = blake3::hash(pair.as_bytes()).to_hex();
        let path = self
            .0
            .opts
            .bucket_state_dir
            .join(format!("{}.sqlite", &h[..32]));
        let s = Arc::new(SqliteSyncState::open(&path).map_err(failed)?);
        m.insert(pair.to_string(), s.clone());
        Ok(s)
    }

    /// A job as users see it: a distributed job's progress is its tasks'
    /// (summed off the async threads: a large job has many tasks).
    async fn info(&self, j: JobRow) -> Result<proto::JobInfo, Status> {
        let distributed = j.kind == "bucket_sync";
        let id = j.id;
        let mut info = job_info(j);
        if distributed && info.state == "running" {
            let q = self.queue();
            let c = blocking(move || q.children(id).map_err(failed)).await?;
            let num = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
                m.get(k).and_then(|v| v.as_u64()).unwrap_or(0)
            };
            let running = c
                .totals
                .get("progress")
                .and_then(|p| p.as_object())
                .cloned()
                .unwrap_or_default();
            let p = crate::spec::JobProgress {
                files: num(&c.totals, "objects_copied") + num(&running, "files"),
                bytes: num(&c.totals, "bytes_copied") + num(&running, "bytes"),
                total_files: 0,
                total_bytes: 0,
                warnings: c.failures,
            };
            info.progress_json = serde_json::to_string(&p).unwrap_or_default();
        }
        Ok(info)
    }
}

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let r = req.into_inner();
        check_agent_name(&r.agent)?;
        let q = self.queue();
        let row = AgentRow {
            name: r.agent.clone(),
            roots: r.roots,
            host: r.host,
            version: r.version,
            last_seen_ms: 0,
        };
        let failed_jobs = blocking(move || {
            q.register(&row).map_err(failed)?;
            q.fail_running_of(
                &row.name,
                &format!(
                    "agent {} restarted while running the job; submit it again to resume",
                    row.name
                ),
            )
            .map_err(failed)
        })
        .await?;
        tracing::info!(agent = %r.agent, failed_jobs, "agent registered");
        if failed_jobs > 0 {
            // Some may be distributed tasks, queued again for other agents.
            self.0.submitted.notify_waiters();
        }
        let o = &self.0.opts;
        Ok(Response::new(proto::RegisterReply {
            vault: o.vault_location.clone(),
            vault_id: o.vault_id.clone(),
            data_key: o.keys.data.to_vec(),
            id_key: o.keys.id.to_vec(),
            lease_seconds: o.lease.as_secs().max(1) as u32,
        }))
    }

    async fn lease(
        &self,
        req: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseReply>, Status> {
        let r = req.into_inner();
        check_agent_name(&r.agent)?;
        let wait = Duration::from_secs(u64::from(r.wait_seconds.min(60)));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Listen before looking, so a job submitted in between wakes us.
            let notified = self.0.submitted.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (q, agent, lease) = (self.queue(), r.agent.clone(), self.0.opts.lease);
            let job = blocking(move || {
                if !q.touch_agent(&agent).map_err(failed)? {
                    return Err(Status::not_found(format!(
                        "agent {agent} is not registered"
                    )));
                }
                q.lease(&agent, lease).map_err(failed)
            })
            .await?;
            if let Some(j) = job {
                tracing::info!(job = j.id, agent = %j.agent, kind = %j.kind, "job leased");
                return Ok(Response::new(proto::LeaseReply {
                    job: Some(proto::Job {
                        id: j.id,
                        kind: j.kind,
                        spec_json: j.spec,
                        attempt: j.attempt,
                    }),
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(proto::LeaseReply { job: None }));
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let r = req.into_inner();
        let (q, lease) = (self.queue(), self.0.opts.lease);
        let ours = blocking(move || {
            q.touch_agent(&r.agent).map_err(failed)?;
            q.heartbeat(&r.agent, r.job, &r.progress_json, lease)
                .map_err(failed)
        })
        .await?;
        Ok(Response::new(proto::HeartbeatReply { cancel: !ours }))
    }

    async fn finish(&self, req: Request<proto::FinishRequest>) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let q = self.queue();
        let (agent, job, code) = (r.agent.clone(), r.job, r.exit_code);
        let ok = blocking(move || {
            let parent_was_running = match q.job(r.job).map_err(failed)? {
                Some(j) if j.parent != 0 => q
                    .job(j.parent)
                    .map_err(failed)?
                    .is_some_and(|p| p.state == "running"),
                _ => false,
            };
            let ok = q
                .finish(&r.agent, r.job, r.exit_code, &r.result_json, &r.error)
                .map_err(failed)?;
            if ok && let Some(j) = q.job(r.job).map_err(failed)? {
                let secs = (j.finished - j.started).max(0) as f64;
                ferry_core::telemetry::job_finished(&j.kind, &j.state, secs);
                if j.parent != 0
                    && parent_was_running
                    && let Some(p) = q.job(j.parent).map_err(failed)?
                    && p.state != "running"
                {
                    // The task settled its distributed job.
                    let secs = (p.finished - p.started).max(0) as f64;
                    ferry_core::telemetry::job_finished(&p.kind, &p.state, secs);
                }
            }
            Ok(ok)
        })
        .await?;
        if !ok {
            return Err(failed(format!(
                "job {job} is not running under agent {agent}"
            )));
        }
        tracing::info!(job, %agent, exit_code = code, "job finished");
        self.0.ended.notify_waiters();
        Ok(Response::new(Empty {}))
    }

    async fn contains(
        &self,
        req: Request<proto::BlobIds>,
    ) -> Result<Response<proto::ContainsReply>, Status> {
        let ids = convert::ids_from_bytes(&req.into_inner().ids).map_err(invalid)?;
        let c = self.catalog();
        let present = blocking(move || c.contains(&ids).map_err(failed)).await?;
        Ok(Response::new(proto::ContainsReply { present }))
    }

    async fn locate(
        &self,
        req: Request<proto::BlobIds>,
    ) -> Result<Response<proto::LocateReply>, Status> {
        let ids = convert::ids_from_bytes(&req.into_inner().ids).map_err(invalid)?;
        let c = self.catalog();
        let locs = blocking(move || c.locate(&ids).map_err(failed)).await?;
        Ok(Response::new(proto::LocateReply {
            locations: locs.into_iter().map(convert::location_to_proto).collect(),
        }))
    }

    async fn add_packs(
        &self,
        req: Request<proto::AddPacksRequest>,
    ) -> Result<Response<Empty>, Status> {
        let packs = req
            .into_inner()
            .packs
            .iter()
            .map(convert::pack_from_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let c = self.catalog();
        blocking(move || c.add_packs(&packs).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn list_packs(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<proto::ListPacksReply>, Status> {
        let c = self.catalog();
        let packs = blocking(move || c.packs().map_err(failed)).await?;
        Ok(Response::new(proto::ListPacksReply {
            packs: packs
                .into_iter()
                .map(|(id, size)| proto::PackSize {
                    id: id.0.to_vec(),
                    size,
                })
                .collect(),
        }))
    }

    async fn pack_blobs(
        &self,
        req: Request<proto::PackRef>,
    ) -> Result<Response<proto::BlobIds>, Status> {
        let id = convert::pack_id(&req.into_inner().id).map_err(invalid)?;
        let c = self.catalog();
        let ids = blocking(move || c.pack_blobs(&id).map_err(failed)).await?;
        Ok(Response::new(proto::BlobIds {
            ids: convert::ids_to_bytes(&ids),
        }))
    }

    async fn add_snapshot(
        &self,
        req: Request<proto::SnapshotMsg>,
    ) -> Result<Response<Empty>, Status> {
        let snap = convert::snapshot_from_proto(&req.into_inner()).map_err(invalid)?;
        let c = self.catalog();
        blocking(move || c.add_snapshot(&snap).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn list_snapshots(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<proto::ListSnapshotsReply>, Status> {
        let c = self.catalog();
        let snaps = blocking(move || c.snapshots().map_err(failed)).await?;
        Ok(Response::new(proto::ListSnapshotsReply {
            snapshots: snaps
                .iter()
                .map(convert::snapshot_to_proto)
                .collect::<Result<_, _>>()
                .map_err(failed)?,
        }))
    }

    async fn get_tree(
        &self,
        req: Request<proto::BlobRef>,
    ) -> Result<Response<proto::TreeReply>, Status> {
        let id = convert::blob_id(&req.into_inner().id).map_err(invalid)?;
        let c = self.catalog();
        let t = blocking(move || c.tree(&id).map_err(failed)).await?;
        Ok(Response::new(proto::TreeReply {
            found: t.is_some(),
            data: t.unwrap_or_default(),
        }))
    }

    async fn get_trees(
        &self,
        req: Request<proto::BlobIds>,
    ) -> Result<Response<proto::TreesReply>, Status> {
        let mut ids = convert::ids_from_bytes(&req.into_inner().ids).map_err(invalid)?;
        if ids.is_empty() {
            return Err(Status::invalid_argument("no tree ids"));
        }
        // At most this many read per call, whatever a client asks.
        ids.truncate(1024);
        let c = self.catalog();
        let found = blocking(move || c.trees(&ids).map_err(failed)).await?;
        // Whole trees in the order asked, up to the budget; the client asks
        // again for the rest. A tree larger than a message on its own is
        // answered as not cached: it is read from the vault instead.
        let mut size = 0;
        let mut trees = Vec::new();
        for t in found {
            let n = t.as_ref().map_or(0, Vec::len) + 64;
            if !trees.is_empty() && size + n > TREES_BUDGET {
                break;
            }
            size += n;
            let t = t.filter(|d| d.len() + 1024 <= TREES_BUDGET);
            trees.push(proto::TreeReply {
                found: t.is_some(),
                data: t.unwrap_or_default(),
            });
        }
        Ok(Response::new(proto::TreesReply { trees }))
    }

    async fn put_trees(
        &self,
        req: Request<proto::PutTreesRequest>,
    ) -> Result<Response<Empty>, Status> {
        let trees = req
            .into_inner()
            .trees
            .into_iter()
            .map(|t| Ok((convert::blob_id(&t.id)?, t.data)))
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(invalid)?;
        let c = self.catalog();
        blocking(move || c.put_trees(&trees).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn put_tree(
        &self,
        req: Request<proto::PutTreeRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let id = convert::blob_id(&r.id).map_err(invalid)?;
        let c = self.catalog();
        blocking(move || c.put_tree(&id, &r.data).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn seen_objects(&self, _req: Request<Empty>) -> Result<Response<proto::Names>, Status> {
        let c = self.catalog();
        let names = blocking(move || c.seen_objects().map_err(failed)).await?;
        Ok(Response::new(proto::Names {
            names: names.into_iter().collect(),
        }))
    }

    async fn mark_seen(&self, req: Request<proto::Names>) -> Result<Response<Empty>, Status> {
        let names = req.into_inner().names;
        let c = self.catalog();
        blocking(move || c.mark_seen(&names).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn remove_snapshots(
        &self,
        req: Request<proto::Names>,
    ) -> Result<Response<Empty>, Status> {
        let ids = req.into_inner().names;
        let c = self.catalog();
        blocking(move || c.remove_snapshots(&ids).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    /// Pack ids travel as a `BlobIds` list (the same 32-byte form).
    async fn remove_packs(&self, req: Request<proto::BlobIds>) -> Result<Response<Empty>, Status> {
        let packs: Vec<ferry_core::id::PackId> = convert::ids_from_bytes(&req.into_inner().ids)
            .map_err(invalid)?
            .into_iter()
            .map(|b| ferry_core::id::PackId(b.0))
            .collect();
        let c = self.catalog();
        blocking(move || c.remove_packs(&packs).map_err(failed)).await?;
        Ok(Response::new(Empty {}))
    }

    async fn submit(
        &self,
        req: Request<proto::SubmitRequest>,
    ) -> Result<Response<proto::JobInfo>, Status> {
        let r = req.into_inner();
        let spec: JobSpec = serde_json::from_str(&r.spec_json)
            .map_err(|e| invalid(format!("bad job spec: {e}")))?;
        if spec.kind() != r.kind {
            return Err(invalid(format!(
                "job kind {:?} does not match its spec ({})",
                r.kind,
                spec.kind()
            )));
        }
        match &spec {
            JobSpec::BucketSync(b) => {
                if !r.agent.is_empty() {
                    return Err(invalid(
                        "a bucket sync runs on every agent that takes its tasks: name no agent",
                    ));
                }
                let split = JobSpec::BucketSplit {
                    job: b.clone(),
                    after: None,
                    complete: false,
                };
                let (q, spec_json, split_json) = (
                    self.queue(),
                    serde_json::to_string(&spec).map_err(failed)?,
                    serde_json::to_string(&split).map_err(failed)?,
                );
                let job = blocking(move || {
                    q.submit_distributed("bucket_sync", &spec_json, "bucket_split", &split_json)
                        .map_err(failed)
                })
                .await?;
                tracing::info!(job = job.id, kind = %job.kind, "distributed job submitted");
                self.0.submitted.notify_waiters();
                return Ok(Response::new(job_info(job)));
            }
            JobSpec::BucketSplit { .. } | JobSpec::BucketRange { .. } => {
                return Err(invalid("tasks are made by the coordinator, not submitted"));
            }
            _ => {}
        }
        check_agent_name(&r.agent)?;
        if let Some(p) = spec.path().filter(|p| !p.is_absolute()) {
            return Err(invalid(format!(
                "{}: a job's path must be absolute (it is a path on the agent's node)",
                p.display()
            )));
        }
        let q = self.queue();
        let job = blocking(move || {
            if q.agent(&r.agent).map_err(failed)?.is_none() {
                return Err(Status::not_found(format!(
                    "no agent named {} has registered with this coordinator",
                    r.agent
                )));
            }
            let spec_json = serde_json::to_string(&spec).map_err(failed)?;
            q.submit(&r.agent, spec.kind(), &spec_json).map_err(failed)
        })
        .await?;
        tracing::info!(job = job.id, agent = %job.agent, kind = %job.kind, "job submitted");
        self.0.submitted.notify_waiters();
        Ok(Response::new(job_info(job)))
    }

    async fn get_job(
        &self,
        req: Request<proto::JobRef>,
    ) -> Result<Response<proto::JobInfo>, Status> {
        let r = req.into_inner();
        let id = r.id;
        // A follower may wait (a little) for the job to end: it hears of
        // the end when it happens, not at its next poll.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(r.wait_ms.min(5000)));
        loop {
            // Listen before looking, so an end in between wakes us.
            let ended = self.0.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let q = self.queue();
            let job = blocking(move || q.job(id).map_err(failed)).await?;
            match job {
                Some(j) if j.state == "done" || j.state == "failed" => {
                    return Ok(Response::new(self.info(j).await?));
                }
                Some(j) => {
                    tokio::select! {
                        _ = &mut ended => continue,
                        _ = tokio::time::sleep_until(deadline) => {
                            return Ok(Response::new(self.info(j).await?));
                        }
                    }
                }
                None => return Err(Status::not_found(format!("no job {id}"))),
            }
        }
    }

    async fn add_tasks(
        &self,
        req: Request<proto::AddTasksRequest>,
    ) -> Result<Response<proto::AddTasksReply>, Status> {
        let r = req.into_inner();
        for s in &r.specs_json {
            match serde_json::from_str::<JobSpec>(s) {
                Ok(JobSpec::BucketRange { .. }) if r.kind == "bucket_range" => {}
                _ => return Err(invalid("AddTasks takes bucket_range tasks only")),
            }
        }
        if !matches!(
            serde_json::from_str::<JobSpec>(&r.cursor_spec_json),
            Ok(JobSpec::BucketSplit { .. })
        ) {
            return Err(invalid("AddTasks: the cursor must be a bucket_split spec"));
        }
        let q = self.queue();
        let n = r.specs_json.len();
        let accepted = blocking(move || {
            q.add_tasks(
                &r.agent,
                r.job,
                &r.kind,
                &r.specs_json,
                &r.from_spec_json,
                &r.cursor_spec_json,
            )
            .map_err(failed)
        })
        .await?;
        if accepted && n > 0 {
            self.0.submitted.notify_waiters();
        }
        Ok(Response::new(proto::AddTasksReply { accepted }))
    }

    async fn bucket_state(
        &self,
        req: Request<proto::BucketStateRequest>,
    ) -> Result<Response<proto::BucketStateReply>, Status> {
        let r = req.into_inner();
        let state = self.bucket_state(&r.pair)?;
        let op = proto::StateOp::try_from(r.op).map_err(|_| invalid("unknown state op"))?;
        let reply = blocking(move || {
            let mut reply = proto::BucketStateReply::default();
            let upload = || r.upload.clone().ok_or_else(|| invalid("no upload given"));
            match op {
                proto::StateOp::StateGet => {
                    let got = state.get(&r.keys).map_err(failed)?;
                    reply.items = r
                        .keys
                        .iter()
                        .zip(got)
                        .map(|(k, s)| match s {
                            Some(s) => proto::ObjectState {
                                key: k.clone(),
                                found: true,
                                src_etag: s.src_etag,
                                src_size: s.src_size,
                                dst_etag: s.dst_etag,
                                dst_size: s.dst_size,
                            },
                            None => proto::ObjectState {
                                key: k.clone(),
                                ..Default::default()
                            },
                        })
                        .collect();
                }
                proto::StateOp::StatePut => {
                    let items: Vec<(String, ObjectState)> = r
                        .items
                        .into_iter()
                        .map(|i| {
                            (
                                i.key,
                                ObjectState {
                                    src_etag: i.src_etag,
                                    src_size: i.src_size,
                                    dst_etag: i.dst_etag,
                                    dst_size: i.dst_size,
                                },
                            )
                        })
                        .collect();
                    state.put(&items).map_err(failed)?;
                }
                proto::StateOp::StateRemove => state.remove(&r.keys).map_err(failed)?,
                proto::StateOp::StateUploads => {
                    reply.uploads = state
                        .uploads()
                        .map_err(failed)?
                        .into_iter()
                        .map(|(key, id)| proto::Upload { key, id })
                        .collect();
                }
                proto::StateOp::StateAddUpload => {
                    let u = upload()?;
                    state.add_upload(&u.key, &u.id).map_err(failed)?;
                }
                proto::StateOp::StateRemoveUpload => {
                    let u = upload()?;
                    state.remove_upload(&u.key, &u.id).map_err(failed)?;
                }
            }
            Ok(reply)
        })
        .await?;
        Ok(Response::new(reply))
    }

    async fn rerun(&self, req: Request<proto::JobRef>) -> Result<Response<proto::JobInfo>, Status> {
        let id = req.into_inner().id;
        let q = self.queue();
        let (job, n) = blocking(move || {
            let j = q
                .job(id)
                .map_err(failed)?
                .ok_or_else(|| Status::not_found(format!("no job {id}")))?;
            if j.kind != "bucket_sync" {
                return Err(invalid(format!(
                    "job {id} is a {}: only distributed jobs are rerun; submit it again",
                    j.kind
                )));
            }
            let n = q.rerun(id).map_err(failed)?;
            Ok((q.job(id).map_err(failed)?.unwrap_or(j), n))
        })
        .await?;
        tracing::info!(job = id, tasks = n, "job rerun");
        if n > 0 {
            self.0.submitted.notify_waiters();
        }
        Ok(Response::new(self.info(job).await?))
    }

    async fn report(
        &self,
        req: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportReply>, Status> {
        let r = req.into_inner();
        let q = self.queue();
        let (job, c, failures) = blocking(move || {
            let j = q
                .job(r.id)
                .map_err(failed)?
                .ok_or_else(|| Status::not_found(format!("no job {}", r.id)))?;
            if j.kind != "bucket_sync" {
                return Err(invalid(format!(
                    "job {} is a {}, not a bucket sync: `ferry jobs {}` shows it",
                    r.id, j.kind, r.id
                )));
            }
            let c = q.children(r.id).map_err(failed)?;
            let f = q.failures(r.id, r.limit as usize).map_err(failed)?;
            Ok((j, c, f))
        })
        .await?;
        Ok(Response::new(proto::ReportReply {
            job: Some(self.info(job).await?),
            tasks_queued: c.queued,
            tasks_running: c.running,
            tasks_done: c.done,
            tasks_failed: c.failed,
            totals_json: serde_json::Value::Object(c.totals).to_string(),
            keys_failed: c.failures,
            failures: failures
                .into_iter()
                .map(|f| proto::KeyFailure {
                    key: f.key,
                    error: f.error,
                })
                .collect(),
        }))
    }

    async fn list_jobs(&self, _req: Request<Empty>) -> Result<Response<proto::JobList>, Status> {
        let q = self.queue();
        let jobs = blocking(move || q.jobs(1000).map_err(failed)).await?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            out.push(self.info(j).await?);
        }
        Ok(Response::new(proto::JobList { jobs: out }))
    }

    async fn create_migration(
        &self,
        req: Request<proto::MigrationMsg>,
    ) -> Result<Response<proto::CreateMigrationReply>, Status> {
        let m: ferry_core::migration::Migration =
            serde_json::from_str(&req.into_inner().record_json).map_err(invalid)?;
        let store = self.0.migrations.clone();
        let created = blocking(move || store.create_migration(&m).map_err(failed)).await?;
        Ok(Response::new(proto::CreateMigrationReply { created }))
    }

    async fn get_migration(
        &self,
        req: Request<proto::MigrationRef>,
    ) -> Result<Response<proto::MigrationReply>, Status> {
        let name = req.into_inner().name;
        let store = self.0.migrations.clone();
        blocking(move || {
            let Some(m) = store.migration(&name).map_err(failed)? else {
                return Ok(Response::new(proto::MigrationReply::default()));
            };
            let rounds = store.rounds(&name).map_err(failed)?;
            let enc =
                |v: serde_json::Result<String>| v.map_err(|e| Status::internal(e.to_string()));
            Ok(Response::new(proto::MigrationReply {
                found: true,
                record_json: enc(serde_json::to_string(&m))?,
                rounds_json: rounds
                    .iter()
                    .map(|r| enc(serde_json::to_string(r)))
                    .collect::<Result<_, _>>()?,
            }))
        })
        .await
    }

    async fn add_migration_round(
        &self,
        req: Request<proto::AddRoundRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = req.into_inner();
        let round: ferry_core::migration::Round =
            serde_json::from_str(&r.round_json).map_err(invalid)?;
        let store = self.0.migrations.clone();
        blocking(move || {
            if store.migration(&r.name).map_err(failed)?.is_none() {
                return Err(Status::not_found(format!("no migration {:?}", r.name)));
            }
            store.add_round(&r.name, &round).map_err(failed)
        })
        .await?;
        Ok(Response::new(Empty {}))
    }

    async fn sign_report(
        &self,
        req: Request<proto::ReportDoc>,
    ) -> Result<Response<proto::ReportDoc>, Status> {
        let mut doc: serde_json::Value =
            serde_json::from_str(&req.into_inner().json).map_err(invalid)?;
        if !doc.is_object() {
            return Err(invalid("a report is a JSON object"));
        }
        doc["vault"] = self.0.opts.vault_id.clone().into();
        let key = ferry_core::migration::report_key(&self.0.opts.keys.data);
        ferry_core::migration::sign(&mut doc, &key);
        Ok(Response::new(proto::ReportDoc {
            json: doc.to_string(),
        }))
    }

    async fn verify_report(
        &self,
        req: Request<proto::ReportDoc>,
    ) -> Result<Response<proto::VerifyReportReply>, Status> {
        let doc: serde_json::Value =
            serde_json::from_str(&req.into_inner().json).map_err(invalid)?;
        let key = ferry_core::migration::report_key(&self.0.opts.keys.data);
        Ok(Response::new(
            match ferry_core::migration::verify(&doc, &key) {
                Ok(()) => proto::VerifyReportReply {
                    valid: true,
                    error: String::new(),
                },
                Err(e) => proto::VerifyReportReply {
                    valid: false,
                    error: e,
                },
            },
        ))
    }

    async fn list_agents(
        &self,
        _req: Request<Empty>,
    ) -> Result<Response<proto::AgentList>, Status> {
        let q = self.queue();
        let online_ms = online_window(self.0.opts.lease).as_millis() as i64;
        let agents = blocking(move || {
            let now = now_ms();
            q.agents()
                .map_err(failed)?
                .into_iter()
                .map(|a| {
                    let running = q.running_job_of(&a.name).map_err(failed)?;
                    Ok(proto::AgentInfo {
                        online: now - a.last_seen_ms <= online_ms,
                        name: a.name,
                        roots: a.roots,
                        host: a.host,
                        version: a.version,
                        last_seen: a.last_seen_ms / 1000,
                        running_job: running.unwrap_or(0),
                    })
                })
                .collect::<Result<Vec<_>, Status>>()
        })
        .await?;
        Ok(Response::new(proto::AgentList { agents }))
    }
}

/// An agent is online if it called within this window: idle agents call
/// Lease at least every `LEASE_POLL`, busy ones heartbeat every lease/3.
fn online_window(lease: Duration) -> Duration {
    lease.max(crate::agent::LEASE_POLL) + Duration::from_secs(5)
}

/// Checks the bearer token on every call, in constant time.
#[derive(Clone)]
pub struct TokenCheck(Option<Arc<[u8]>>);

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("a token is required"))?;
        if !constant_time_eq(given.as_bytes(), expected) {
            return Err(Status::unauthenticated("wrong token"));
        }
        Ok(req)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare keyed hashes: equal length, and no early exit on content.
    let k = [0x5a; 32];
    blake3::keyed_hash(&k, a) == blake3::keyed_hash(&k, b)
}

/// Binds the listening socket, refusing an open address without a token.
pub async fn bind(opts: &CoordinatorOptions) -> crate::Result<tokio::net::TcpListener> {
    if !opts.listen.ip().is_loopback() && opts.token.is_none() {
        return Err(crate::Error::Invalid(format!(
            "refusing to listen on {} without a token: pass --token-file FILE (or listen on 127.0.0.1)",
            opts.listen
        )));
    }
    tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|e| crate::Error::Io {
            what: format!("listening on {}", opts.listen),
            source: e,
        })
}

/// Serves until `shutdown` resolves. Expired leases are failed once a second.
pub async fn serve(
    listener: tokio::net::TcpListener,
    catalog: Arc<SqliteCatalog>,
    queue: Arc<JobQueue>,
    opts: CoordinatorOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> crate::Result<()> {
    // After a restart, give agents one lease to reconnect before their jobs
    // are declared lost.
    queue.renew_all_leases(opts.lease)?;
    let token = opts.token.as_ref().map(|t| Arc::from(t.as_bytes()));
    let tls = opts.tls.clone();
    let migrations = Arc::new(SqliteMigrations::open(catalog.path())?);
    let state = Arc::new(State {
        migrations,
        catalog,
        queue: queue.clone(),
        opts,
        bucket_states: Default::default(),
        submitted: Notify::new(),
        ended: Notify::new(),
    });
    let reaper = {
        let (q, state) = (queue.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let q = q.clone();
                match tokio::task::spawn_blocking(move || q.expire()).await {
                    Ok(Ok(ids)) if !ids.is_empty() => {
                        tracing::warn!(
                            ?ids,
                            "leases expired: jobs failed, distributed tasks queued again"
                        );
                        state.submitted.notify_waiters();
                        state.ended.notify_waiters();
                    }
                    Ok(Err(e)) => tracing::warn!("expiring leases: {e}"),
                    _ => {}
                }
            }
        })
    };
    let svc = CoordinatorServer::new(Service(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let svc = InterceptedService::new(svc, TokenCheck(token));
    let mut server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(20)));
    if let Some((cert, key)) = tls {
        server = server
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| crate::Error::Invalid(format!("TLS certificate or key: {e}")))?;
    }
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let r = server
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    reaper.abort();
    r.map_err(|e| crate::Error::Invalid(format!("serving gRPC: {e}")))
}
