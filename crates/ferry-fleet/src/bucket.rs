//! A bucket sync spread over agents, like ossimport's distributed mode.
//!
//! The job's first task lists the source and cuts the key space into
//! ranges of at most `task_objects` objects or `task_bytes` bytes; each
//! range is a task any agent may take. A range task is the single-machine
//! sync (`ferry_bucket::sync`) limited to its range, with its memory of
//! what was copied kept by the coordinator ([`RemoteSyncState`]), so a rerun
//! on any agent skips what any agent copied before.
//!
//! The split resumes: every batch of ranges is added together with the
//! split's new cursor (the last key cut), so a split whose agent dies is
//! reissued and goes on from there. The last range is open-ended, so
//! objects written after the listing passed are still covered.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_bucket::config::Config;
use ferry_bucket::location::Location;
use ferry_bucket::store::{self, KeyRange, Side};
use ferry_core::bucket_state::{ObjectState, SyncState};
use ferry_core::catalog::{CatalogError, CatalogResult};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::conn::{Client, with_retry};
use crate::proto;
use crate::remote::RemoteCatalog;
use crate::spec::{BucketJob, JobSpec, ProgressCounter};
use crate::{Error, Result};

/// Ranges are sent to the coordinator in batches of this many (or sooner,
/// every `SPLIT_FLUSH`, so agents start while the listing goes on).
const SPLIT_BATCH: usize = 64;
const SPLIT_FLUSH: Duration = Duration::from_secs(2);

/// A bucket sync's state, kept by the coordinator for the pair.
pub struct RemoteSyncState {
    catalog: Arc<RemoteCatalog>,
    pair: String,
}

impl RemoteSyncState {
    pub fn new(catalog: Arc<RemoteCatalog>, pair: String) -> Self {
        Self { catalog, pair }
    }

    /// Blocks until the coordinator answers; inside the sync's async code
    /// it tells the runtime first, so the other tasks (copies, heartbeats)
    /// keep their threads.
    fn call(&self, req: proto::BucketStateRequest) -> CatalogResult<proto::BucketStateReply> {
        let run = move || {
            self.catalog.call("BucketState", move |mut c| {
                let req = req.clone();
                async move { c.bucket_state(req).await }
            })
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        }
    }

    fn req(&self, op: proto::StateOp) -> proto::BucketStateRequest {
        proto::BucketStateRequest {
            pair: self.pair.clone(),
            op: op as i32,
            ..Default::default()
        }
    }
}

impl SyncState for RemoteSyncState {
    fn get(&self, keys: &[String]) -> CatalogResult<Vec<Option<ObjectState>>> {
        let mut req = self.req(proto::StateOp::StateGet);
        req.keys = keys.to_vec();
        let r = self.call(req)?;
        if r.items.len() != keys.len() {
            return Err(CatalogError::msg(format!(
                "coordinator answered {} states for {} keys",
                r.items.len(),
                keys.len()
            )));
        }
        Ok(r.items
            .into_iter()
            .map(|i| {
                i.found.then_some(ObjectState {
                    src_etag: i.src_etag,
                    src_size: i.src_size,
                    dst_etag: i.dst_etag,
                    dst_size: i.dst_size,
                })
            })
            .collect())
    }

    fn put(&self, items: &[(String, ObjectState)]) -> CatalogResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut req = self.req(proto::StateOp::StatePut);
        req.items = items
            .iter()
            .map(|(k, s)| proto::ObjectState {
                key: k.clone(),
                found: true,
                src_etag: s.src_etag.clone(),
                src_size: s.src_size,
                dst_etag: s.dst_etag.clone(),
                dst_size: s.dst_size,
            })
            .collect();
        self.call(req).map(|_| ())
    }

    fn remove(&self, keys: &[String]) -> CatalogResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut req = self.req(proto::StateOp::StateRemove);
        req.keys = keys.to_vec();
        self.call(req).map(|_| ())
    }

    fn uploads(&self) -> CatalogResult<Vec<(String, String)>> {
        let r = self.call(self.req(proto::StateOp::StateUploads))?;
        Ok(r.uploads.into_iter().map(|u| (u.key, u.id)).collect())
    }

    fn add_upload(&self, key: &str, id: &str) -> CatalogResult<()> {
        let mut req = self.req(proto::StateOp::StateAddUpload);
        req.upload = Some(proto::Upload {
            key: key.into(),
            id: id.into(),
        });
        self.call(req).map(|_| ())
    }

    fn remove_upload(&self, key: &str, id: &str) -> CatalogResult<()> {
        let mut req = self.req(proto::StateOp::StateRemoveUpload);
        req.upload = Some(proto::Upload {
            key: key.into(),
            id: id.into(),
        });
        self.call(req).map(|_| ())
    }
}

/// What an agent needs to run bucket tasks.
pub struct BucketContext<'a> {
    pub client: &'a Client,
    pub url: &'a str,
    pub agent: &'a str,
    pub config: &'a Config,
    /// A local directory side must lie under one of these.
    pub confine: &'a dyn Fn(&std::path::Path) -> std::result::Result<PathBuf, String>,
    pub patience: Duration,
}

fn bucket_err(e: ferry_bucket::Error) -> Error {
    Error::Invalid(e.to_string())
}

async fn open_side(ctx: &BucketContext<'_>, loc: &str) -> Result<Side> {
    let mut l = Location::parse(loc, ctx.config).map_err(bucket_err)?;
    if let Location::Local(p) = &l {
        let p = (ctx.confine)(p)
            .map_err(|e| Error::Invalid(format!("agent {} refuses the task: {e}", ctx.agent)))?;
        l = Location::Local(p);
    }
    store::open(&l, ctx.config).await.map_err(bucket_err)
}

/// The split: lists the source from the cursor on and adds range tasks.
/// `spec_json` is the task's spec as leased (the cursor the first batch is
/// cut from).
pub async fn split(
    ctx: &BucketContext<'_>,
    task: u64,
    spec_json: &str,
    job: BucketJob,
    after: Option<String>,
    complete: bool,
) -> Result<Value> {
    if complete {
        return Ok(serde_json::json!({ "split_tasks": 0 }));
    }
    let src = Arc::new(open_side(ctx, &job.source).await?);
    src.probe(false, false).await.map_err(bucket_err)?;
    let (tx, mut rx) = mpsc::channel(1000);
    let range = KeyRange {
        after: after.clone(),
        until: None,
    };
    let lister = {
        let src = src.clone();
        tokio::spawn(async move { src.list(&range, tx).await })
    };
    let mut cursor = after;
    let mut from = spec_json.to_string();
    let mut pending: Vec<String> = Vec::new();
    let (mut objects, mut bytes, mut listed, mut tasks) = (0u64, 0u64, 0u64, 0u64);
    let mut flushed = Instant::now();
    let range_spec = |job: &BucketJob, after: Option<String>, until: Option<String>| {
        serde_json::to_string(&JobSpec::BucketRange {
            job: job.clone(),
            range: KeyRange { after, until },
        })
        .map_err(|e| Error::Invalid(e.to_string()))
    };
    while let Some(e) = rx.recv().await {
        let e = e.map_err(bucket_err)?;
        listed += 1;
        objects += 1;
        bytes += e.size;
        if objects >= job.task_objects.max(1) || bytes >= job.task_bytes.max(1) {
            pending.push(range_spec(&job, cursor.clone(), Some(e.key.clone()))?);
            cursor = Some(e.key);
            (objects, bytes) = (0, 0);
        }
        if pending.len() >= SPLIT_BATCH || (!pending.is_empty() && flushed.elapsed() > SPLIT_FLUSH)
        {
            tasks += pending.len() as u64;
            from = add(
                ctx,
                task,
                &job,
                std::mem::take(&mut pending),
                &from,
                &cursor,
                false,
            )
            .await?;
            flushed = Instant::now();
        }
    }
    lister
        .await
        .map_err(|e| Error::Invalid(format!("listing: {e}")))?;
    // The last range is open-ended: keys after the listing's end too.
    pending.push(range_spec(&job, cursor.clone(), None)?);
    tasks += pending.len() as u64;
    add(ctx, task, &job, pending, &from, &cursor, true).await?;
    Ok(serde_json::json!({ "split_objects": listed, "split_tasks": tasks }))
}

/// Adds a batch of ranges and moves the cursor; returns the new cursor
/// spec (what the next batch is cut from).
#[allow(clippy::too_many_arguments)]
async fn add(
    ctx: &BucketContext<'_>,
    task: u64,
    job: &BucketJob,
    specs: Vec<String>,
    from: &str,
    cursor: &Option<String>,
    complete: bool,
) -> Result<String> {
    let cursor_spec = serde_json::to_string(&JobSpec::BucketSplit {
        job: job.clone(),
        after: cursor.clone(),
        complete,
    })
    .map_err(|e| Error::Invalid(e.to_string()))?;
    let req = proto::AddTasksRequest {
        agent: ctx.agent.into(),
        job: task,
        kind: "bucket_range".into(),
        specs_json: specs,
        cursor_spec_json: cursor_spec.clone(),
        from_spec_json: from.to_string(),
    };
    let client = ctx.client.clone();
    let r = with_retry(ctx.url, "AddTasks", ctx.patience, || {
        let (mut c, req) = (client.clone(), req.clone());
        async move { c.add_tasks(req).await }
    })
    .await?;
    if !r.accepted {
        return Err(Error::Invalid(format!(
            "task {task} is no longer this agent's (its lease expired); stopping the split"
        )));
    }
    Ok(cursor_spec)
}

/// One range: the single-machine sync over it. Exit code 1 when keys
/// failed (they travel in the result, and the coordinator keeps them).
pub async fn range(
    ctx: &BucketContext<'_>,
    catalog: Arc<RemoteCatalog>,
    job: BucketJob,
    range: KeyRange,
    progress: Arc<ProgressCounter>,
) -> Result<(i32, Value)> {
    let src = Arc::new(open_side(ctx, &job.source).await?);
    let dst = Arc::new(open_side(ctx, &job.destination).await?);
    let state = Arc::new(RemoteSyncState::new(catalog, job.pair()));
    let opts = job.options(range);
    let s = ferry_bucket::sync::sync(
        src,
        dst,
        state,
        &opts,
        progress,
        (job.source.clone(), job.destination.clone()),
    )
    .await
    .map_err(bucket_err)?;
    let code = if s.failed.is_empty() && s.mismatched.is_empty() {
        0
    } else {
        1
    };
    Ok((
        code,
        serde_json::to_value(&s).map_err(|e| Error::Invalid(e.to_string()))?,
    ))
}

/// A bucket (or a local directory under the agent's roots) opened as the
/// seam of a snapshot or restore through the vault.
async fn objects(
    ctx: &BucketContext<'_>,
    loc: &str,
) -> Result<ferry_bucket::objects::BucketObjects> {
    let side = open_side(ctx, loc).await?;
    Ok(ferry_bucket::objects::BucketObjects::new(
        side,
        loc.to_string(),
        tokio::runtime::Handle::current(),
    ))
}

/// `ferry migration` over agents: a bucket prefix saved as a snapshot, on
/// this agent, with its credentials.
pub async fn snapshot_objects(
    ctx: &BucketContext<'_>,
    vault: Arc<ferry_core::vault::Vault>,
    catalog: Arc<RemoteCatalog>,
    source: &str,
    opts: &ferry_core::snapshot::SnapshotOptions,
    progress: Arc<ProgressCounter>,
) -> Result<ferry_core::snapshot::SnapshotSummary> {
    let src = objects(ctx, source).await?;
    Ok(
        ferry_core::snapshot::snapshot_objects(vault, catalog, Arc::new(src), opts, progress)
            .await?,
    )
}

/// The restore into a bucket, its memory of what it wrote kept by the
/// coordinator (so any agent may run the next one).
pub async fn restore_objects(
    ctx: &BucketContext<'_>,
    vault: Arc<ferry_core::vault::Vault>,
    catalog: Arc<RemoteCatalog>,
    snap: &ferry_core::manifest::SnapshotRecord,
    target: &str,
    opts: &ferry_core::restore::objects::ObjectRestoreOptions,
    progress: Arc<ProgressCounter>,
) -> Result<ferry_core::restore::objects::ObjectRestoreSummary> {
    let dst = objects(ctx, target).await?;
    let state = RemoteSyncState::new(
        catalog.clone(),
        format!("restore\n{}\n{target}", vault.id()),
    );
    Ok(ferry_core::restore::objects::restore_objects(
        vault,
        catalog,
        snap,
        Arc::new(dst),
        Arc::new(state),
        opts,
        progress,
    )
    .await?)
}

/// A bucket target compared with a snapshot.
pub async fn compare_objects(
    ctx: &BucketContext<'_>,
    vault: Arc<ferry_core::vault::Vault>,
    catalog: Arc<RemoteCatalog>,
    snap: ferry_core::manifest::SnapshotRecord,
    target: &str,
    opts: ferry_core::compare::CompareOptions,
) -> Result<ferry_core::compare::Comparison> {
    let dst = objects(ctx, target).await?;
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        ferry_core::compare::compare_objects(&rt, &vault, catalog.as_ref(), &snap, &dst, &opts)
    })
    .await
    .map_err(|e| Error::Invalid(format!("compare: {e}")))?
    .map_err(Into::into)
}
