//! The sync: merge two sorted listings, decide per key, copy with a pool of
//! workers, record what was done.
//!
//! Per key (after `--include/--exclude` and `--since`):
//! - only in the source: copy;
//! - in both: skip when the pair is what the last run left (state), or when
//!   sizes and plain etags agree; else copy;
//! - only in the destination: delete with `--delete`.
//!
//! Memory is bounded: listings stream through bounded channels, decisions
//! are made in batches, at most `workers` objects are in flight, each with
//! at most `PARTS_IN_FLIGHT` parts of `part_size` bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferry_core::bucket_state::{ObjectState, SyncState};
use ferry_core::progress::Progress;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Serialize;
use tokio::sync::mpsc;

/// The longest a finished copy or delete waits to be recorded.
const STATE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

use crate::store::{Entry, KeyRange, LOCAL_ETAG, Side, Upload};
use crate::{Error, Result};
use ferry_core::limit::Limiter;

pub const PARTS_IN_FLIGHT: usize = 4;

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub workers: usize,
    pub since_ns: Option<i64>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub delete: bool,
    pub verify: bool,
    pub dry_run: bool,
    /// Bytes per second for all workers together.
    pub bandwidth: Option<u64>,
    pub part_size: u64,
    /// Copy object tags (one more request per tagged object).
    pub tags: bool,
    /// Keep the source's storage class (default: the destination's default).
    pub storage_class: bool,
    /// Only this slice of the key space (one task of a distributed sync).
    pub range: KeyRange,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            workers: 16,
            since_ns: None,
            include: Vec::new(),
            exclude: Vec::new(),
            delete: false,
            verify: false,
            dry_run: false,
            bandwidth: None,
            part_size: 8 << 20,
            tags: false,
            storage_class: false,
            range: KeyRange::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FailedKey {
    pub key: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Planned {
    pub action: &'static str,
    pub key: String,
    pub size: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncSummary {
    pub source: String,
    pub destination: String,
    pub dry_run: bool,
    pub objects_listed: u64,
    pub objects_copied: u64,
    pub objects_skipped: u64,
    pub objects_deleted: u64,
    pub objects_failed: u64,
    /// Source entries no object can stand for (a directory's symlinks,
    /// special files, names that are not UTF-8): skipped, each with a
    /// warning.
    pub objects_unsupported: u64,
    /// Copied by the store itself (same endpoint): no bytes through ferry.
    pub objects_copied_server_side: u64,
    pub objects_verified: u64,
    pub bytes_copied: u64,
    pub duration_s: f64,
    pub failed: Vec<FailedKey>,
    /// Keys whose copy did not match the source on --verify.
    pub mismatched: Vec<String>,
    /// With --dry-run: what would be done.
    pub plan: Vec<Planned>,
    /// Multipart uploads a previous, interrupted run left open, aborted.
    pub stale_uploads_aborted: u64,
}

/// Parses an RFC 3339 time (`2026-11-01T00:00:00Z`, or with an offset such
/// as `+08:00`) into nanoseconds.
pub fn parse_since(s: &str) -> Result<i64> {
    aws_sdk_s3::primitives::DateTime::from_str(
        s,
        aws_sdk_s3::primitives::DateTimeFormat::DateTimeWithOffset,
    )
    .map(|t| t.as_nanos().clamp(i64::MIN as i128, i64::MAX as i128) as i64)
    .map_err(|e| {
        Error::Config(format!(
            "bad time {s:?} (RFC 3339, e.g. 2026-11-01T00:00:00Z): {e}"
        ))
    })
}

/// Checks include/exclude patterns without running anything (a job that
/// runs elsewhere should fail here, not on every agent).
pub fn check_patterns(patterns: &[String]) -> Result<()> {
    globs(patterns).map(|_| ())
}

struct Filter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
    since_ns: Option<i64>,
}

fn globs(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    // Read as rclone reads them: `*` and `?` stay within one segment of the
    // key, `**` crosses segments, and a pattern that does not start with
    // `/` matches at any depth (`*.log` is every log, `/*.log` only those
    // at the top, `logs/*` the files directly in any `logs/`).
    // A pattern ending in `/` names a directory: everything under it.
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        if p.is_empty() {
            return Err(Error::Config(
                "an empty pattern (an unset variable?) would match nothing or everything".into(),
            ));
        }
        let body = match p.strip_suffix('/') {
            Some(dir) => format!("{dir}/**"),
            None => p.clone(),
        };
        let forms = match body.strip_prefix('/') {
            Some(top) => vec![top.to_string()],
            None => vec![body.clone(), format!("**/{body}")],
        };
        for f in forms {
            let g = GlobBuilder::new(&f)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Config(format!("bad pattern {p:?}: {e}")))?;
            b.add(g);
        }
    }
    b.build()
        .map(Some)
        .map_err(|e| Error::Config(format!("patterns: {e}")))
}

impl Filter {
    /// Whether the sync looks at `key` at all (both for copy and delete).
    fn wants(&self, key: &str) -> bool {
        self.include.as_ref().is_none_or(|g| g.is_match(key))
            && self.exclude.as_ref().is_none_or(|g| !g.is_match(key))
    }
}

enum Task {
    Copy(Entry),
    Delete(String),
}

enum Outcome {
    Copied {
        entry: Entry,
        dst_etag: String,
        dst_size: u64,
        server_side: bool,
        verified: Option<bool>,
    },
    Deleted(String),
    Failed(String, String),
}

struct Ctx {
    src: Arc<Side>,
    dst: Arc<Side>,
    state: Arc<dyn SyncState>,
    opts: SyncOptions,
    limiter: Option<Limiter>,
    progress: Arc<dyn Progress>,
    server_side: bool,
    bytes: AtomicU64,
}

fn st(e: ferry_core::catalog::CatalogError) -> Error {
    Error::State(format!("sync state: {e}"))
}

/// Aborts the multipart uploads recorded as open on `dst` for the keys
/// `mine` accepts: those of a run that was killed, or of this run when it is
/// interrupted. Returns how many were still open (a record may outlive its
/// upload: a run killed between completing it and forgetting it).
pub async fn abort_open_uploads(
    dst: &Side,
    state: &dyn SyncState,
    mine: impl Fn(&str) -> bool,
) -> Result<u64> {
    let mut n = 0;
    for (key, id) in state.uploads().map_err(st)? {
        if mine(&key) {
            if dst.abort_upload(&key, &id).await? {
                n += 1;
            }
            state.remove_upload(&key, &id).map_err(st)?;
        }
    }
    Ok(n)
}

/// Syncs `src` into `dst`.
pub async fn sync(
    src: Arc<Side>,
    dst: Arc<Side>,
    state: Arc<dyn SyncState>,
    opts: &SyncOptions,
    progress: Arc<dyn Progress>,
    names: (String, String),
) -> Result<SyncSummary> {
    let started = Instant::now();
    let filter = Filter {
        include: globs(&opts.include)?,
        exclude: globs(&opts.exclude)?,
        since_ns: opts.since_ns,
    };
    src.probe(false, false).await?;
    dst.probe(!opts.dry_run, opts.dry_run).await?;
    let mut summary = SyncSummary {
        source: names.0,
        destination: names.1,
        dry_run: opts.dry_run,
        ..Default::default()
    };

    // Uploads an interrupted run left open: abort them, nothing is kept.
    if !opts.dry_run {
        // Only this range's: other ranges may be copying right now.
        summary.stale_uploads_aborted =
            abort_open_uploads(&dst, state.as_ref(), |k| opts.range.contains(k)).await?;
    }

    let server_side = match (src.as_s3(), dst.as_s3()) {
        (Some(a), Some(b)) => a.identity == b.identity && opts.bandwidth.is_none(),
        _ => false,
    };
    let ctx = Arc::new(Ctx {
        src: src.clone(),
        dst: dst.clone(),
        state: state.clone(),
        opts: opts.clone(),
        limiter: opts.bandwidth.map(Limiter::new),
        progress: progress.clone(),
        server_side,
        bytes: AtomicU64::new(0),
    });

    let (stx, mut srx) = mpsc::channel::<Result<Entry>>(1000);
    let (dtx, mut drx) = mpsc::channel::<Result<Entry>>(1000);
    let (s2, d2) = (src.clone(), dst.clone());
    let (r1, r2) = (opts.range.clone(), opts.range.clone());
    let lister_s = tokio::spawn(async move { s2.list(&r1, stx).await });
    let sweep = !opts.dry_run;
    let lister_d = tokio::spawn(async move { d2.list_swept(&r2, dtx, sweep).await });

    let workers = opts.workers.max(1);
    let (task_tx, task_rx) = async_channel(workers * 4);
    let (out_tx, mut out_rx) = mpsc::channel::<Outcome>(workers * 4);
    // A JoinSet: when the sync is dropped (Ctrl-C), its copies stop at
    // once and start no new upload while the open ones are aborted.
    let mut pool = tokio::task::JoinSet::new();
    if !opts.dry_run {
        for _ in 0..workers {
            let (rx, tx, ctx) = (task_rx.clone(), out_tx.clone(), ctx.clone());
            pool.spawn(async move {
                while let Ok(t) = rx.recv().await {
                    let o = run_task(&ctx, t).await;
                    if tx.send(o).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    drop(out_tx);
    drop(task_rx);

    // The collector: outcomes into the summary and the state, in batches.
    let collector = {
        let state = state.clone();
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut s = CollectorSummary::default();
            let mut batch: Vec<(String, ObjectState)> = Vec::new();
            let mut gone: Vec<String> = Vec::new();
            // Written every 500 outcomes, and at most a second after the
            // oldest unwritten one: a run killed while a large object is in
            // flight has recorded what it finished, and its rerun skips it.
            let mut due: Option<tokio::time::Instant> = None;
            loop {
                let o = match due {
                    Some(at) => match tokio::time::timeout_at(at, out_rx.recv()).await {
                        Ok(o) => o,
                        Err(_) => {
                            state.put(&std::mem::take(&mut batch)).map_err(st)?;
                            state.remove(&std::mem::take(&mut gone)).map_err(st)?;
                            due = None;
                            continue;
                        }
                    },
                    None => out_rx.recv().await,
                };
                let Some(o) = o else { break };
                match o {
                    Outcome::Copied {
                        entry,
                        dst_etag,
                        dst_size,
                        server_side,
                        verified,
                    } => {
                        s.copied += 1;
                        s.bytes += entry.size;
                        if server_side {
                            s.server_side += 1;
                        }
                        match verified {
                            Some(true) => s.verified += 1,
                            Some(false) => s.mismatched.push(entry.key.clone()),
                            None => {}
                        }
                        progress.file_done();
                        if verified != Some(false) {
                            batch.push((
                                entry.key.clone(),
                                ObjectState {
                                    src_etag: entry.token(),
                                    src_size: entry.size,
                                    dst_etag,
                                    dst_size,
                                },
                            ));
                        }
                    }
                    Outcome::Deleted(k) => {
                        s.deleted += 1;
                        gone.push(k);
                    }
                    Outcome::Failed(key, error) => {
                        if error.starts_with(&format!("{key}: ")) {
                            progress.warn(&error);
                        } else {
                            progress.warn(&format!("{key}: {error}"));
                        }
                        s.failed.push(FailedKey { key, error });
                    }
                }
                if batch.len() >= 500 {
                    state.put(&std::mem::take(&mut batch)).map_err(st)?;
                }
                if gone.len() >= 500 {
                    state.remove(&std::mem::take(&mut gone)).map_err(st)?;
                }
                if batch.is_empty() && gone.is_empty() {
                    due = None;
                } else if due.is_none() {
                    due = Some(tokio::time::Instant::now() + STATE_EVERY);
                }
            }
            state.put(&batch).map_err(st)?;
            state.remove(&gone).map_err(st)?;
            Ok::<_, Error>(s)
        })
    };

    // The merge: both listings in key order.
    let mut pending: Vec<(Entry, Option<Entry>)> = Vec::new();
    let mut s_head = next(&mut srx).await?;
    let mut d_head = next(&mut drx).await?;
    let mut plan = Vec::new();
    let mut shields = Shields::default();
    loop {
        let step = match (&s_head, &d_head) {
            (None, None) => break,
            (Some(s), Some(d)) => s.key.as_bytes().cmp(d.key.as_bytes()),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        match step {
            std::cmp::Ordering::Less => {
                let s = s_head.take().expect("some");
                s_head = next(&mut srx).await?;
                summary.objects_listed += 1;
                shields.add(&s);
                if filter.wants(&s.key) && supported(&s, &progress, &mut summary) {
                    pending.push((s, None));
                }
            }
            std::cmp::Ordering::Equal => {
                let s = s_head.take().expect("some");
                let d = d_head.take().expect("some");
                s_head = next(&mut srx).await?;
                d_head = next(&mut drx).await?;
                summary.objects_listed += 1;
                shields.add(&s);
                // An unsupported source entry keeps its namesake: what it
                // stands for is still there.
                if filter.wants(&s.key) && supported(&s, &progress, &mut summary) {
                    pending.push((s, Some(d)));
                }
            }
            std::cmp::Ordering::Greater => {
                let d = d_head.take().expect("some");
                d_head = next(&mut drx).await?;
                // A symlink or special file in a target directory is not
                // ferry's to delete.
                if opts.delete
                    && d.unsupported.is_none()
                    && !shields.covers(&d.key)
                    && filter.wants(&d.key)
                {
                    if opts.dry_run {
                        plan.push(Planned {
                            action: "delete",
                            key: d.key,
                            size: d.size,
                        });
                    } else {
                        task_tx.send(Task::Delete(d.key)).await.ok();
                    }
                }
            }
        }
        if pending.len() >= 256 {
            decide(
                &ctx,
                &filter,
                std::mem::take(&mut pending),
                &task_tx,
                &mut plan,
                &mut summary,
            )
            .await?;
        }
    }
    decide(&ctx, &filter, pending, &task_tx, &mut plan, &mut summary).await?;
    drop(task_tx);
    lister_s.await.ok();
    lister_d.await.ok();
    while pool.join_next().await.is_some() {}
    let c = collector
        .await
        .map_err(|e| Error::State(format!("collector: {e}")))??;
    summary.objects_copied = c.copied;
    summary.objects_deleted = c.deleted;
    summary.objects_failed = c.failed.len() as u64;
    summary.objects_copied_server_side = c.server_side;
    summary.objects_verified = c.verified;
    summary.bytes_copied = if opts.dry_run {
        plan.iter()
            .filter(|p| p.action == "copy")
            .map(|p| p.size)
            .sum()
    } else {
        c.bytes
    };
    summary.failed = c.failed;
    summary.mismatched = c.mismatched;
    summary.plan = plan;
    summary.duration_s = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[derive(Default)]
struct CollectorSummary {
    copied: u64,
    deleted: u64,
    server_side: u64,
    verified: u64,
    bytes: u64,
    failed: Vec<FailedKey>,
    mismatched: Vec<String>,
}

/// The destination keys `--delete` must spare: those under a source entry
/// that was not followed (a symlink to a directory, say `ext`, stands for
/// whatever the destination holds under `ext/`). Keys come in byte order,
/// so a shield is dropped once the merge is past every key it covers.
#[derive(Default)]
struct Shields(Vec<String>);

impl Shields {
    fn add(&mut self, e: &Entry) {
        if e.unsupported.is_some() {
            self.0.push(format!("{}/", e.key));
        }
    }

    fn covers(&mut self, key: &str) -> bool {
        self.0
            .retain(|p| key.starts_with(p.as_str()) || key.as_bytes() < p.as_bytes());
        self.0.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// Whether a source entry can be copied; if not, says why (as rclone
/// does for the symlinks it does not follow) and counts it.
fn supported(e: &Entry, progress: &Arc<dyn Progress>, summary: &mut SyncSummary) -> bool {
    match e.unsupported {
        None => true,
        Some(why) => {
            progress.warn(&format!("{}: skipped: {why}", e.key));
            summary.objects_unsupported += 1;
            false
        }
    }
}

async fn next(rx: &mut mpsc::Receiver<Result<Entry>>) -> Result<Option<Entry>> {
    rx.recv().await.transpose()
}

/// A multi-consumer channel for the workers (tokio's mpsc has one consumer).
fn async_channel(cap: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(cap);
    (Sender(tx), Receiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

struct Sender(mpsc::Sender<Task>);

impl Sender {
    async fn send(&self, t: Task) -> std::result::Result<(), ()> {
        self.0.send(t).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct Receiver(Arc<tokio::sync::Mutex<mpsc::Receiver<Task>>>);

impl Receiver {
    async fn recv(&self) -> std::result::Result<Task, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Decides a batch of source entries: one state lookup for all of them.
async fn decide(
    ctx: &Arc<Ctx>,
    filter: &Filter,
    batch: Vec<(Entry, Option<Entry>)>,
    tasks: &Sender,
    plan: &mut Vec<Planned>,
    summary: &mut SyncSummary,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = batch.iter().map(|(s, _)| s.key.clone()).collect();
    let state = ctx.state.clone();
    let known = tokio::task::spawn_blocking(move || state.get(&keys))
        .await
        .map_err(|e| Error::State(e.to_string()))?
        .map_err(st)?;
    let mut total = 0u64;
    let mut files = 0u64;
    let mut learned = Vec::new();
    for ((s, d), k) in batch.into_iter().zip(known) {
        let unchanged = match (&d, &k) {
            (Some(d), Some(k)) => {
                let same = k.src_etag == s.token()
                    && k.src_size == s.size
                    && k.dst_size == d.size
                    && (k.dst_etag.is_empty() || k.dst_etag == d.token());
                // The destination's listing token is learned on the first
                // run after the copy (a copy cannot know it).
                if same && k.dst_etag.is_empty() {
                    learned.push((
                        s.key.clone(),
                        ObjectState {
                            dst_etag: d.token(),
                            ..k.clone()
                        },
                    ));
                }
                same
            }
            (Some(d), None) => {
                // Equal sizes and equal plain (single-part) etags.
                let etags = d.size == s.size
                    && !s.etag.is_empty()
                    && d.etag == s.etag
                    && !s.etag.contains('-');
                // Two directories: equal sizes and modification times,
                // rsync's and rclone's quick check (a tree copied before
                // with `cp -a` or `rsync -a` is not copied again).
                let times = s.etag.starts_with(LOCAL_ETAG)
                    && d.etag.starts_with(LOCAL_ETAG)
                    && d.size == s.size
                    && d.modified_ns == s.modified_ns;
                etags || times
            }
            _ => false,
        };
        if unchanged || filter.since_ns.is_some_and(|t| s.modified_ns < t) {
            summary.objects_skipped += 1;
            continue;
        }
        files += 1;
        total += s.size;
        if ctx.opts.dry_run {
            plan.push(Planned {
                action: "copy",
                key: s.key,
                size: s.size,
            });
        } else {
            tasks.send(Task::Copy(s)).await.ok();
        }
    }
    if !learned.is_empty() && !ctx.opts.dry_run {
        ctx.state.put(&learned).map_err(st)?;
    }
    ctx.progress.add_total(files, total);
    Ok(())
}

async fn run_task(ctx: &Ctx, t: Task) -> Outcome {
    match t {
        Task::Delete(key) => match ctx.dst.delete(&key).await {
            Ok(()) => Outcome::Deleted(key),
            Err(e) => Outcome::Failed(key, e.to_string()),
        },
        Task::Copy(entry) => {
            // An object rewritten while it is read is read again (twice at
            // most), never copied torn.
            let mut attempt = 0;
            loop {
                attempt += 1;
                match copy_one(ctx, &entry, attempt == 1).await {
                    Ok((dst_etag, dst_size, server_side, verified, _read_etag)) => {
                        return Outcome::Copied {
                            entry,
                            dst_etag,
                            dst_size,
                            server_side,
                            verified,
                        };
                    }
                    Err(Error::Changed(_)) if attempt < 3 => continue,
                    Err(e) => return Outcome::Failed(entry.key, e.to_string()),
                }
            }
        }
    }
}

/// Copies one object; returns the destination's etag and size, whether it
/// was copied server-side, the verification result, and the source etag
/// actually read.
async fn copy_one(
    ctx: &Ctx,
    e: &Entry,
    strict: bool,
) -> Result<(String, u64, bool, Option<bool>, String)> {
    let (src, dst) = (&*ctx.src, &*ctx.dst);
    if ctx.server_side && e.size <= 5 * 1024 * 1024 * 1024 {
        let s3 = src.as_s3().expect("server-side needs S3");
        let etag = if strict { e.etag.as_str() } else { "" };
        dst.copy_from(s3, &e.key, etag, e.size, ctx.opts.storage_class)
            .await
            .map_err(|err| {
                if err.to_string().contains("PreconditionFailed") {
                    Error::Changed(e.key.clone())
                } else {
                    err
                }
            })?;
        let verified = if ctx.opts.verify {
            let (size, _) = dst.head(&e.key).await?;
            Some(size == e.size && hash_of(src, &e.key).await? == hash_of(dst, &e.key).await?)
        } else {
            None
        };
        return Ok((String::new(), e.size, true, verified, String::new()));
    }

    // The first attempt insists on the listed version; a retry after a
    // change takes whatever is there now.
    let etag = (strict && !src.is_local()).then_some(e.etag.as_str());
    let mut dl = src.get(&e.key, etag, ctx.opts.tags).await?;
    if !ctx.opts.storage_class {
        dl.meta.storage_class = None;
    }
    let size = dl.size;
    let read_etag = dl.etag.clone();
    let part = crate::store::part_size_for(size, ctx.opts.part_size);
    let mut up = dst.begin(&e.key, &dl.meta, size, part).await?;
    if let Some((k, id)) = up.multipart_id() {
        ctx.state.add_upload(k, id).map_err(st)?;
    }
    let mut hasher = blake3::Hasher::new();
    let r = stream_into(ctx, &mut dl, &mut up, &mut hasher, part as usize).await;
    let mpu = up
        .multipart_id()
        .map(|(k, id)| (k.to_string(), id.to_string()));
    let r = match r {
        Ok(n) if n == size => up.complete(dst).await,
        Ok(n) => {
            up.abort(dst).await;
            Err(Error::Changed(format!("{} ({n} of {size} bytes)", e.key)))
        }
        Err(err) => {
            up.abort(dst).await;
            Err(err)
        }
    };
    if let Some((k, id)) = mpu {
        ctx.state.remove_upload(&k, &id).map_err(st)?;
    }
    r?;
    let verified = if ctx.opts.verify {
        let (dst_size, _) = dst.head(&e.key).await?;
        Some(dst_size == size && hash_of(dst, &e.key).await? == hasher.finalize())
    } else {
        None
    };
    // The destination's token is learned from its listing next time.
    Ok((String::new(), size, false, verified, read_etag))
}

/// Moves the download into the upload in parts; returns the bytes moved.
async fn stream_into(
    ctx: &Ctx,
    dl: &mut crate::store::Download,
    up: &mut Upload,
    hasher: &mut blake3::Hasher,
    part: usize,
) -> Result<u64> {
    let mut buf = BytesMut::with_capacity(part.min(dl.size as usize + 1));
    let mut total = 0u64;
    let mut inflight = futures::stream::FuturesOrdered::new();
    let mut done_parts: Vec<(i32, aws_sdk_s3::types::CompletedPart)> = Vec::new();
    let multi = up
        .multipart_id()
        .map(|(k, id)| (k.to_string(), id.to_string()));
    let mut n = 0i32;
    loop {
        let piece = dl.next().await?;
        let end = piece.is_none();
        if let Some(p) = piece {
            if let Some(l) = &ctx.limiter {
                l.take(p.len() as u64).await;
            }
            hasher.update(&p);
            total += p.len() as u64;
            ctx.bytes.fetch_add(p.len() as u64, Ordering::Relaxed);
            ctx.progress.advance(p.len() as u64);
            buf.extend_from_slice(&p);
        }
        while buf.len() >= part || (end && !buf.is_empty()) {
            let take = buf.len().min(part);
            let data: Bytes = buf.split_to(take).freeze();
            match (&multi, &ctx.dst.as_s3()) {
                (Some((key, id)), Some(s3)) => {
                    n += 1;
                    if inflight.len() >= PARTS_IN_FLIGHT {
                        use futures::StreamExt;
                        let r: Result<(i32, aws_sdk_s3::types::CompletedPart)> =
                            inflight.next().await.expect("non-empty");
                        done_parts.push(r?);
                    }
                    inflight.push_back(s3.upload_part(key.clone(), id.clone(), n, data));
                }
                _ => up.part(&ctx.dst, data).await?,
            }
        }
        if end {
            break;
        }
    }
    use futures::StreamExt;
    while let Some(r) = inflight.next().await {
        done_parts.push(r?);
    }
    if let Upload::S3Multi { parts, .. } = up {
        done_parts.sort_by_key(|(n, _)| *n);
        *parts = done_parts.into_iter().map(|(_, p)| p).collect();
    }
    Ok(total)
}

async fn hash_of(side: &Side, key: &str) -> Result<blake3::Hash> {
    let mut dl = side.get(key, None, false).await?;
    let mut h = blake3::Hasher::new();
    while let Some(p) = dl.next().await? {
        h.update(&p);
    }
    Ok(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::{Entry, Filter, Shields, globs, parse_since};

    #[test]
    fn a_skipped_source_entry_shields_what_lies_under_its_name() {
        let entry = |key: &str, unsupported| Entry {
            key: key.into(),
            size: 0,
            etag: String::new(),
            modified_ns: 0,
            unsupported,
        };
        let mut s = Shields::default();
        s.add(&entry("a", None));
        s.add(&entry("ext", Some("a symlink (not followed)")));
        assert!(!s.covers("ext"), "the name itself is the caller's");
        assert!(!s.covers("ext-a"));
        assert!(s.covers("ext/keep.txt") && s.covers("ext/deep/er"));
        assert!(!s.covers("extra/x") && !s.covers("f"));
        // Past its range, a shield is gone for good.
        assert!(!s.covers("ext/late"));
        assert!(!s.covers("a/b"));
    }

    #[test]
    fn patterns_read_as_rclone_reads_them() {
        let f = |include: &[&str], exclude: &[&str]| Filter {
            include: globs(&include.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap(),
            exclude: globs(&exclude.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap(),
            since_ns: None,
        };
        let logs = f(&["*.log"], &[]);
        assert!(logs.wants("a.log") && logs.wants("x/y/a.log"));
        assert!(!logs.wants("a.log/b") && !logs.wants("a.txt"));
        let top = f(&["/*.log"], &[]);
        assert!(top.wants("a.log") && !top.wants("x/a.log"));
        let dir = f(&["logs/*"], &[]);
        assert!(dir.wants("logs/a") && dir.wants("app/logs/a"));
        assert!(!dir.wants("logs/old/a"), "* must not cross a /");
        let deep = f(&["logs/**"], &[]);
        assert!(deep.wants("logs/old/a") && deep.wants("app/logs/old/a"));
        let all_txt = f(&["**.txt"], &["/unicode/**"]);
        assert!(all_txt.wants("a/b/c.txt") && all_txt.wants("c.txt"));
        assert!(!all_txt.wants("unicode/c.txt") && all_txt.wants("x/unicode/c.txt"));
        assert!(f(&[], &[]).wants("anything/at/all"));
        assert!(globs(&["a[".to_string()]).is_err());
        assert!(globs(&[String::new()]).is_err(), "an empty pattern");
        let dirs = f(&[], &["cache/"]);
        assert!(!dirs.wants("cache/a") && !dirs.wants("x/cache/a/b"));
        assert!(dirs.wants("cache") && dirs.wants("caches/a"));
        assert!(!f(&[], &["/"]).wants("a/b"), "/ is the whole tree");
    }

    #[test]
    fn since_takes_utc_and_offsets_and_refuses_garbage() {
        let utc = parse_since("2026-11-01T00:00:00Z").unwrap();
        assert_eq!(utc, 1_793_491_200 * 1_000_000_000);
        // The same instant written in UTC+8.
        assert_eq!(parse_since("2026-11-01T08:00:00+08:00").unwrap(), utc);
        assert!(parse_since("yesterday").is_err());
    }
}
