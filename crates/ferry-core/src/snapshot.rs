//! Snapshot: the save pipeline.
//!
//! Threads joined by bounded channels, so memory stays bounded whatever the
//! volume's size and work is spread per chunk, not per file:
//!
//! ```text
//! reader ──jobs (chunk bytes)──▶ lookups ×L ──batches──▶ workers ×N ──packs──▶ uploader
//!    │                       hash, dedup      compress, encrypt, pack   (async, U puts at once)
//!    └──items (ordered)──▶ collector ◀──────── one reply per chunk
//!                          builds tree blobs, bottom up
//! ```
//!
//! The reader walks the source in name order (a directory's other entries
//! before its subdirectories), chunks each file and sends
//! each chunk to be looked up and stored; in order, it tells the collector what it saw,
//! with a one-shot receiver per chunk for its id. Each worker fills a pack of
//! its own, so no lock guards the hot path but the dedup claim set. The
//! uploader records a pack in the catalog only once it is in the vault. The
//! snapshot record is written last: it is the commit point.

use std::collections::{HashMap, HashSet};
use std::fs::{File, Metadata};
use std::io::BufReader;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::chunker::Chunker;
use crate::config::ChunkerParams;
use crate::error::{Error, Result};
use crate::id::{BlobId, BlobKind, IdHasher, random_hex_id};
use crate::manifest::{ChunkRef, IndexObject, Name, Node, NodeKind, SnapshotRecord, Tree, Xattr};
use crate::objects::ObjectSource;
use crate::pack::{FinishedPack, PackRecord, PackWriter};
use crate::progress::Progress;
use crate::source::{self, EntryType, Meta};

mod objects;
use crate::tree_ahead::{TreeSource, TreesAhead};
use crate::vault::Vault;

#[derive(Clone, Debug)]
pub struct SnapshotOptions {
    pub volume: String,
    pub host: String,
    /// Hash/compress/encrypt threads. Default: the number of cores.
    pub workers: usize,
    /// Pack uploads in flight. Default 4.
    pub uploads: usize,
    /// Read every file, even those unchanged since the parent snapshot.
    pub reread: bool,
    /// Snapshot a regular file as a raw block volume (a disk image).
    /// Block devices are always taken as block volumes.
    pub block: bool,
    /// Read the source at most this fast (bytes per second): a pre-sync
    /// while the application runs must not starve it.
    pub read_limit: Option<u64>,
    /// Told the root tree once every tree of the snapshot is in the catalog,
    /// before the last packs are uploaded and the snapshot is committed,
    /// and whether every entry was read (the snapshot will not be marked
    /// incomplete).
    pub on_trees: Option<OnTrees>,
    /// Left out wherever they appear in the source, matched by device and
    /// inode: ferry's own state (the state directory, a local vault, the
    /// catalog). A snapshot of a home directory would otherwise copy the
    /// vault it is writing into itself, and grow with each run.
    pub skip: Vec<PathBuf>,
}

/// A callback with the root tree's id: `ferry sync` starts planning its
/// restore there (see [`crate::restore::restore_committing`]) while the
/// snapshot's last packs upload.
#[derive(Clone)]
pub struct OnTrees(pub Arc<dyn Fn(BlobId, bool) + Send + Sync>);

impl std::fmt::Debug for OnTrees {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnTrees")
    }
}

impl SnapshotOptions {
    pub fn new(volume: impl Into<String>) -> Self {
        Self {
            volume: volume.into(),
            host: hostname(),
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            uploads: 4,
            reread: false,
            block: false,
            read_limit: None,
            on_trees: None,
            skip: Vec::new(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What a snapshot did; printed as JSON by `ferry snapshot --json`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SnapshotSummary {
    pub snapshot_id: String,
    pub volume: String,
    pub parent: Option<String>,
    pub files: u64,
    /// Files not read: metadata equal to the parent snapshot's.
    pub files_unchanged: u64,
    pub dirs: u64,
    /// Source bytes read.
    pub bytes_scanned: u64,
    /// Raw bytes of chunks the vault did not have.
    pub bytes_new: u64,
    /// Bytes written to the vault (packs and metadata).
    pub bytes_uploaded: u64,
    pub chunks: u64,
    pub chunks_new: u64,
    pub packs_uploaded: u64,
    pub duration_s: f64,
    pub phases: SnapshotPhases,
    /// The cutover report: scan, upload and commit, with their windows,
    /// bytes, files and vault objects (see [`crate::phase`]).
    pub report: Vec<crate::phase::Phase>,
    /// True when some entries could not be read (see `warnings`).
    pub incomplete: bool,
    /// Files that changed while they were read: saved as read, but the
    /// application was writing them (quiesce it for a consistent copy).
    pub unstable: Vec<String>,
    pub warnings: u64,
    /// Sockets, FIFOs and device nodes, which are not saved.
    pub skipped_special: u64,
    /// Where ferry's own state (see [`SnapshotOptions::skip`]) was found in
    /// the source and left out.
    #[serde(default)]
    pub skipped_state: Vec<String>,
    /// When `report`'s clock started (see [`crate::restore::RestoreSummary`]).
    #[serde(skip)]
    pub started: Option<Instant>,
}

/// When each part of a snapshot ended, in seconds from its start (they
/// overlap: uploads run while files are read).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct SnapshotPhases {
    /// Walking the source, reading and chunking: until the last file was read.
    pub scan_s: f64,
    /// Until the last pack was in the vault.
    pub upload_s: f64,
    /// Writing the index object and the snapshot record (the commit).
    pub commit_s: f64,
}

#[derive(Default)]
struct Stats {
    /// Paces `bytes_scanned` (`read_limit`).
    limit: Option<crate::limit::Limiter>,
    bytes_scanned: AtomicU64,
    bytes_new: AtomicU64,
    bytes_uploaded: AtomicU64,
    chunks: AtomicU64,
    chunks_new: AtomicU64,
    unchanged: AtomicU64,
    packs: AtomicU64,
    warnings: AtomicU64,
    special: AtomicU64,
    /// Pack puts, for the cutover report.
    upload: crate::phase::PhaseClock,
    /// Files that changed while they were read (capped at [`MAX_NAMED`]).
    /// Warnings are rare, so a lock is fine here.
    unstable: Mutex<Vec<String>>,
    /// Ferry's own state found in the source (rare too).
    skipped_state: Mutex<Vec<String>>,
}

/// How many unstable files a snapshot names (the count is always exact).
const MAX_NAMED: usize = 1000;

impl Stats {
    /// Counts `n` source bytes read, and waits if they came too fast.
    fn read(&self, n: u64) {
        self.bytes_scanned.fetch_add(n, Ordering::Relaxed);
        crate::telemetry::bytes_read(n);
        if let Some(l) = &self.limit {
            l.take_blocking(n);
        }
    }
}

/// Chunks looked up in the catalog at once, at most.
const DEDUP_BATCH: usize = 128;

/// Bytes of chunks in one lookup batch, at most: batches wait in a queue
/// for the workers, and this bounds what the queue holds.
const DEDUP_BATCH_BYTES: usize = 2 << 20;

/// Lookup threads with a remote catalog, at least: it answers a batch after
/// a round trip, and several batches in flight hide the round trips behind
/// each other and behind the workers' compression (a final delta over a
/// 40 ms link made one lookup at a time per worker, and waited on them).
/// A local catalog gets one per worker: more threads only held more chunks.
const REMOTE_LOOKUPS: usize = 4;

/// Decides which blobs this run stores: those neither in the catalog nor
/// already claimed by another worker of this run.
struct Dedup {
    catalog: Arc<dyn Catalog>,
    claimed: Mutex<HashSet<BlobId>>,
}

impl Dedup {
    /// For each id, whether this worker stores it. One catalog call for the
    /// whole batch: with a remote catalog, one round trip per batch.
    fn claim_batch(&self, ids: &[BlobId]) -> Result<Vec<bool>> {
        let ask: Vec<BlobId> = {
            let claimed = self.claimed.lock().expect("poisoned");
            let mut seen = HashSet::new();
            ids.iter()
                .filter(|id| !claimed.contains(*id) && seen.insert(**id))
                .copied()
                .collect()
        };
        let known: HashSet<BlobId> = if ask.is_empty() {
            HashSet::new()
        } else {
            let present = self.catalog.contains(&ask)?;
            ask.iter()
                .zip(present)
                .filter(|(_, p)| *p)
                .map(|(id, _)| *id)
                .collect()
        };
        // Only ids asked about may be claimed here: one claimed before the
        // lookup may have been released since (its pack is recorded).
        let asked: HashSet<&BlobId> = ask.iter().collect();
        let mut claimed = self.claimed.lock().expect("poisoned");
        Ok(ids
            .iter()
            .map(|id| asked.contains(id) && !known.contains(id) && claimed.insert(*id))
            .collect())
    }

    /// Forgets the claims on a recorded pack's blobs: the catalog answers for
    /// them now, so the claims held in memory are only those in flight, not
    /// one per new chunk of the whole snapshot.
    fn release(&self, record: &PackRecord) {
        let mut claimed = self.claimed.lock().expect("poisoned");
        for b in &record.blobs {
            claimed.remove(&b.id);
        }
    }
}

struct Job {
    data: Vec<u8>,
    reply: SyncSender<ChunkRef>,
}

/// Items sent to the collector per batch, not one by one: a walk of
/// unchanged files produces items faster than a channel can wake the
/// collector for each. A batch leaves when full, before a large file is
/// handed to the chunker pool (the collector must be able to drain its
/// stream meanwhile), and at the end.
struct Items {
    tx: crossbeam_channel::Sender<Vec<Item>>,
    batch: std::cell::RefCell<Vec<Item>>,
}

const ITEM_BATCH: usize = 256;

impl Items {
    fn new(tx: crossbeam_channel::Sender<Vec<Item>>) -> Self {
        Items {
            tx,
            batch: std::cell::RefCell::new(Vec::with_capacity(ITEM_BATCH)),
        }
    }

    fn send(&self, item: Item) -> Result<()> {
        let full = {
            let mut b = self.batch.borrow_mut();
            b.push(item);
            if b.len() < ITEM_BATCH {
                return Ok(());
            }
            std::mem::replace(&mut *b, Vec::with_capacity(ITEM_BATCH))
        };
        self.tx.send(full).map_err(|_| stopped())
    }

    fn flush(&self) -> Result<()> {
        let b = std::mem::take(&mut *self.batch.borrow_mut());
        if b.is_empty() {
            return Ok(());
        }
        self.tx.send(b).map_err(|_| stopped())
    }
}

enum Item {
    EnterDir {
        name: Name,
        md: Meta,
        xattrs: Vec<Xattr>,
        /// The parent snapshot's tree at this place: if the directory's
        /// tree comes out the same, the vault holds it (the parent is
        /// live) and it needs no dedup lookup.
        parent_tree: Option<BlobId>,
    },
    LeaveDir,
    FileStart {
        name: Name,
        md: Meta,
        xattrs: Vec<Xattr>,
    },
    Chunk(Receiver<ChunkRef>),
    FileEnd {
        error: Option<String>,
    },
    Leaf(Node),
    /// A file unchanged since the parent snapshot, with its old chunks.
    Reused(Node),
    /// The chunks of a large file, chunked on the pool, then its end.
    Stream(crossbeam_channel::Receiver<Piece>),
}

/// A channel closed under us: another stage failed and holds the cause.
fn stopped() -> Error {
    Error::Internal("pipeline stopped".into())
}

/// What a snapshot reads.
enum Input {
    /// A directory, or a block device or image file (`block`).
    Path {
        path: PathBuf,
        root_md: Metadata,
        block: bool,
    },
    /// A bucket (or prefix): keys become paths.
    Objects(Arc<dyn ObjectSource>),
}

/// Saves `source` into the vault as a new snapshot of `opts.volume`.
pub async fn snapshot(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    source: &Path,
    opts: &SnapshotOptions,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotSummary> {
    let root_md = std::fs::metadata(source).map_err(|e| Error::io(source, e))?;
    let block = {
        use std::os::unix::fs::FileTypeExt;
        root_md.file_type().is_block_device() || (opts.block && root_md.is_file())
    };
    if opts.block && root_md.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: a directory, not a disk image (drop --block)",
            source.display()
        )));
    }
    if !root_md.is_dir() && !block {
        return Err(Error::Invalid(format!(
            "{}: not a directory (a disk image file needs --block)",
            source.display()
        )));
    }
    let input = Input::Path {
        path: source.to_path_buf(),
        root_md,
        block,
    };
    locked(vault, catalog, input, opts, progress).await
}

/// Saves the objects of `source` (a bucket or prefix) into the vault as a
/// new snapshot of `opts.volume`, with the incremental rule of
/// [`crate::objects`].
pub async fn snapshot_objects(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    source: Arc<dyn ObjectSource>,
    opts: &SnapshotOptions,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotSummary> {
    locked(vault, catalog, Input::Objects(source), opts, progress).await
}

async fn locked(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    input: Input,
    opts: &SnapshotOptions,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotSummary> {
    let (v, c) = (vault.clone(), catalog.clone());
    crate::lock::shared(
        &v,
        c.as_ref(),
        "snapshot",
        crate::lock::SHARED_WAIT,
        snapshot_locked(vault, catalog, input, opts, progress),
    )
    .await
}

async fn snapshot_locked(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    input: Input,
    opts: &SnapshotOptions,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotSummary> {
    let started = Instant::now();
    let block = matches!(input, Input::Path { block: true, .. });
    // Listed in tables and typed back in `NAME@ID`: no '@', nothing a
    // terminal would act on.
    if opts.volume.is_empty()
        || opts.volume.len() > 255
        || opts.volume.chars().any(|c| c == '@' || c.is_control())
    {
        return Err(Error::Invalid(format!(
            "bad volume name {:?} (1-255 bytes, no '@', no control characters)",
            opts.volume
        )));
    }
    let parent = crate::sync::find_snapshot(catalog.as_ref(), &opts.volume).ok();
    let stats = Arc::new(Stats {
        limit: opts.read_limit.map(crate::limit::Limiter::new),
        upload: crate::phase::PhaseClock::new(started),
        ..Default::default()
    });
    let dedup = Arc::new(Dedup {
        catalog: catalog.clone(),
        claimed: Mutex::new(HashSet::new()),
    });
    let cfg = vault.config().clone();
    let workers = opts.workers.max(1);

    let skip = skip_set(&opts.skip);
    let scan_stop = Arc::new(AtomicBool::new(false));
    if progress.wants_totals()
        && let Input::Path { path, .. } = &input
    {
        if block {
            use std::io::{Seek, SeekFrom};
            if let Ok(n) = File::open(path).and_then(|mut f| f.seek(SeekFrom::End(0))) {
                progress.add_total(1, n);
            }
        } else {
            spawn_scanner(
                path.clone(),
                skip.clone(),
                progress.clone(),
                scan_stop.clone(),
            );
        }
    }

    let (packs_tx, packs_rx) = mpsc::channel::<FinishedPack>(2);
    let uploader = tokio::spawn(upload(
        vault.clone(),
        catalog.clone(),
        dedup.clone(),
        packs_rx,
        // A local vault's put is a file write into the page cache: more
        // than two at once only holds more 16 MiB packs in memory.
        match vault.is_local() {
            true => opts.uploads.clamp(1, 2),
            false => opts.uploads.max(1),
        },
        stats.clone(),
    ));

    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(workers * DEDUP_BATCH / 2);
    let (items_tx, items_rx) = crossbeam_channel::bounded::<Vec<Item>>(64);

    let (batches_tx, batches_rx) = crossbeam_channel::bounded::<Claimed>(workers);
    let mut worker_handles = Vec::new();
    let lookups = match catalog.is_remote() {
        true => workers.max(REMOTE_LOOKUPS),
        false => workers,
    };
    for _ in 0..lookups {
        let (rx, dedup, tx, ids) = (
            jobs_rx.clone(),
            dedup.clone(),
            batches_tx.clone(),
            vault.ids().clone(),
        );
        worker_handles.push(std::thread::spawn(move || look_up(rx, &dedup, &ids, &tx)));
    }
    drop((jobs_rx, batches_tx));
    for _ in 0..workers {
        let (rx, tx, stats) = (batches_rx.clone(), packs_tx.clone(), stats.clone());
        let (key, level, size) = (
            *vault.data_key(),
            cfg.compression.level,
            cfg.pack_size as usize,
        );
        worker_handles.push(std::thread::spawn(move || {
            work(rx, &key, level, size, &tx, &stats)
        }));
    }
    drop(batches_rx);

    // Chunkers for large files: FastCDC of several big files at once.
    let (pool_tx, pool_rx) = crossbeam_channel::bounded::<LargeFile>(1);
    let mut pool_handles = Vec::new();
    for _ in 0..workers.min(4) {
        let (rx, jobs, stats, progress, chunker) = (
            pool_rx.clone(),
            jobs_tx.clone(),
            stats.clone(),
            progress.clone(),
            cfg.chunker,
        );
        let ids = vault.ids().clone();
        let verify = VerifyAhead {
            threads: workers,
            span: VERIFY_SPAN,
        };
        pool_handles.push(std::thread::spawn(move || {
            chunk_pool(rx, chunker, ids, verify, jobs, stats, progress)
        }));
    }
    drop(pool_rx);

    let reader = {
        let (src, stats, progress, chunker, skip) = (
            match &input {
                Input::Path { path, .. } => Ok(path.clone()),
                Input::Objects(o) => Err(o.clone()),
            },
            stats.clone(),
            progress.clone(),
            cfg.chunker,
            skip,
        );
        let previous = match (&parent, opts.reread) {
            (Some(p), false) => Some(Previous {
                root: p.root,
                trees: TreeSource {
                    vault: vault.clone(),
                    catalog: catalog.clone(),
                    rt: tokio::runtime::Handle::current(),
                },
            }),
            _ => None,
        };
        std::thread::spawn(move || {
            let items = Items::new(items_tx);
            match src {
                Ok(path) => read_source(
                    &path,
                    chunker,
                    previous,
                    &items,
                    &jobs_tx,
                    &stats,
                    progress.as_ref(),
                    Some(pool_tx),
                    block,
                    &skip,
                ),
                Err(objects) => objects::read_objects(
                    objects.as_ref(),
                    chunker,
                    previous,
                    &items,
                    &jobs_tx,
                    &stats,
                    progress.as_ref(),
                ),
            }
            .and_then(|()| items.flush())
        })
    };

    let collector = {
        let (dedup, tx, catalog) = (dedup.clone(), packs_tx, catalog.clone());
        let (key, ids, level, size) = (
            *vault.data_key(),
            vault.ids().clone(),
            cfg.compression.level,
            cfg.pack_size as usize,
        );
        let on_trees = opts.on_trees.clone();
        let stats = stats.clone();
        std::thread::spawn(move || {
            let (trees_tx, trees_rx) = crossbeam_channel::bounded::<NewTrees>(2);
            let c = std::thread::scope(|s| {
                let store = s.spawn(|| {
                    store_trees(trees_rx, &dedup, &key, level, size, &tx, catalog.as_ref())
                });
                let c = collect(items_rx, &ids, &trees_tx);
                drop(trees_tx);
                let stored = store
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("tree store panicked".into())));
                // A failed store stops the collector: its error is the cause.
                stored.and(c)
            });
            // Every reader and worker is done with its items, so with
            // its warnings too.
            if let (Ok(c), Some(f)) = (&c, on_trees) {
                f.0(c.root, stats.warnings.load(Ordering::Relaxed) == 0);
            }
            c
        })
    };

    let joined = tokio::task::spawn_blocking(move || {
        let r = reader
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("reader panicked".into())));
        // Reading ends when the large-file chunkers have read their files.
        let mut w: Vec<Result<()>> = pool_handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("worker panicked".into())))
            })
            .collect();
        let scan_s = started.elapsed().as_secs_f64();
        w.extend(worker_handles.into_iter().map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Internal("worker panicked".into())))
        }));
        let c = collector
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("collector panicked".into())));
        (r, w, c, scan_s)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    scan_stop.store(true, Ordering::Relaxed);
    let uploaded = uploader.await.map_err(|e| Error::Internal(e.to_string()))?;
    let upload_s = started.elapsed().as_secs_f64();

    // The first real cause wins over the "stopped" errors it caused.
    let (reader_r, worker_rs, collect_r, scan_s) = joined;
    let mut errors: Vec<Error> = Vec::new();
    let uploaded = match uploaded {
        Ok(r) => Some(r),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    for r in worker_rs.into_iter().chain([reader_r]) {
        if let Err(e) = r {
            errors.push(e);
        }
    }
    let out = match collect_r {
        Ok(o) => Some(o),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    if let Some(e) = errors
        .into_iter()
        .find(|e| !matches!(e, Error::Internal(m) if m == "pipeline stopped"))
    {
        return Err(e);
    }
    let (Some(Uploaded { records, indexes }), Some(out)) = (uploaded, out) else {
        return Err(stopped());
    };

    // Commit: the last index object, then the snapshot record.
    let bytes_before_commit = stats.bytes_uploaded.load(Ordering::Relaxed);
    let mut seen = indexes;
    if !records.is_empty() {
        let name = format!("index/{}", random_hex_id());
        let n = vault
            .put_meta(&name, &IndexObject { packs: records })
            .await?;
        stats.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
        seen.push(name);
    }
    let warnings = stats.warnings.load(Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let (root_meta, root_xattrs, source_name) = match &input {
        Input::Path { path, root_md, .. } => (
            Meta::from(root_md),
            source::read_xattrs(path).unwrap_or_default(),
            std::fs::canonicalize(path)
                .unwrap_or(path.clone())
                .display()
                .to_string(),
        ),
        Input::Objects(o) => (crate::objects::DIR_META, vec![], o.name()),
    };
    let root_node = source::node_from(
        Name(b".".to_vec()),
        &root_meta,
        NodeKind::Dir { subtree: out.root },
        root_xattrs,
    );
    let record = SnapshotRecord {
        id: random_hex_id(),
        volume: opts.volume.clone(),
        time: crate::vault::format_rfc3339(now.as_secs() as i64),
        time_ns: now.as_nanos() as i64,
        root: out.root,
        root_node,
        parent: parent.map(|p| p.id),
        host: opts.host.clone(),
        source: source_name,
        files: out.files,
        dirs: out.dirs,
        bytes: out.bytes,
        incomplete: warnings > 0,
        warnings,
        block,
        unstable: stats
            .unstable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
    };
    let name = format!("snapshots/{}", record.id);
    let n = vault.put_meta(&name, &record).await?;
    stats.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
    seen.push(name);
    catalog.add_snapshot(&record)?;
    catalog.mark_seen(&seen)?;
    crate::telemetry::snapshot_done(
        stats.bytes_scanned.load(Ordering::Relaxed),
        stats.bytes_new.load(Ordering::Relaxed),
    );

    let duration_s = started.elapsed().as_secs_f64();
    let bytes_scanned = stats.bytes_scanned.load(Ordering::Relaxed);
    let files_unchanged = stats.unchanged.load(Ordering::Relaxed);
    let report = vec![
        crate::phase::span(
            "scan",
            0.0,
            scan_s,
            bytes_scanned,
            out.files.saturating_sub(files_unchanged),
            0,
        ),
        stats.upload.phase("upload", scan_s),
        crate::phase::span(
            "commit",
            upload_s,
            duration_s,
            stats.bytes_uploaded.load(Ordering::Relaxed) - bytes_before_commit,
            0,
            seen.len() as u64,
        ),
    ];
    Ok(SnapshotSummary {
        snapshot_id: record.id,
        volume: record.volume,
        parent: record.parent,
        files: out.files,
        files_unchanged,
        dirs: out.dirs,
        bytes_scanned,
        bytes_new: stats.bytes_new.load(Ordering::Relaxed),
        bytes_uploaded: stats.bytes_uploaded.load(Ordering::Relaxed),
        chunks: stats.chunks.load(Ordering::Relaxed),
        chunks_new: stats.chunks_new.load(Ordering::Relaxed),
        packs_uploaded: stats.packs.load(Ordering::Relaxed),
        duration_s,
        phases: SnapshotPhases {
            scan_s,
            upload_s,
            commit_s: duration_s - upload_s,
        },
        report,
        incomplete: record.incomplete,
        unstable: record.unstable.clone(),
        warnings,
        skipped_special: stats.special.load(Ordering::Relaxed),
        skipped_state: stats
            .skipped_state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        started: Some(started),
    })
}

/// Device and inode of each path to leave out (those that exist).
type Skip = Arc<HashSet<(u64, u64)>>;

fn skip_set(paths: &[PathBuf]) -> Skip {
    Arc::new(
        paths
            .iter()
            .filter_map(|p| std::fs::symlink_metadata(p).ok())
            .map(|md| (md.dev(), md.ino()))
            .collect(),
    )
}

/// Walks ahead to size the progress bar; stops early when the snapshot ends.
fn spawn_scanner(root: PathBuf, skip: Skip, progress: Arc<dyn Progress>, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(md) = e.path().symlink_metadata() else {
                    continue;
                };
                if skip.contains(&(md.dev(), md.ino())) {
                    continue;
                }
                if md.is_dir() {
                    stack.push(e.path());
                } else if md.is_file() {
                    progress.add_total(1, md.len());
                }
            }
        }
    });
}

/// Reads the source in name order; see the module doc.
/// The parent snapshot, for change detection: its trees are walked in step
/// with the source.
struct Previous {
    root: BlobId,
    trees: TreeSource,
}

impl Previous {
    /// The parent's tree, if it can be read (if not, files are just read).
    fn tree(&self, id: &BlobId) -> Option<Tree> {
        self.trees.tree(id)
    }
}

/// A file is unchanged when size, mtime, ctime, inode and mode are: then its
/// chunk list is reused without reading it (ctime catches a file whose
/// mtime was set back).
#[allow(clippy::too_many_arguments)]
fn read_source(
    root: &Path,
    chunker: ChunkerParams,
    previous: Option<Previous>,
    items: &Items,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
    pool: Option<crossbeam_channel::Sender<LargeFile>>,
    block: bool,
    skip: &HashSet<(u64, u64)>,
) -> Result<()> {
    let mut r = Reader {
        chunker,
        items,
        jobs,
        stats,
        progress,
        links: HashMap::new(),
        pool,
        skip,
    };
    let md = std::fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
    r.send(Item::EnterDir {
        name: Name(b".".to_vec()),
        md: Meta::from(&md),
        xattrs: vec![],
        parent_tree: previous.as_ref().map(|p| p.root),
    })?;
    if block {
        // A raw volume: one stream, the single entry `block` of the root.
        let file = File::open(root).map_err(|e| Error::io(root, e))?;
        let md = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        let sig = (md.len(), md.mtime(), md.mtime_nsec());
        // An image file follows the directory rules: unchanged metadata
        // reuses the parent's chunk list, a changed image is chunked from
        // it (verified by hash, FastCDC only where it changed). A device's
        // metadata says nothing of its content: it is always read.
        let old = match (&previous, md.is_file()) {
            (Some(p), true) => p.tree(&p.root).and_then(|t| t.entry(BLOCK_ENTRY).cloned()),
            _ => None,
        };
        let meta = Meta::from(&md);
        if let Some(chunks) = old.as_ref().and_then(|n| source::unchanged(n, &meta)) {
            let node = source::node_from(
                Name(BLOCK_ENTRY.to_vec()),
                &meta,
                NodeKind::File {
                    size: md.len(),
                    chunks,
                },
                vec![],
            );
            r.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            r.progress.advance(md.len());
            r.progress.file_done();
            r.send(Item::Reused(node))?;
            return r.send(Item::LeaveDir);
        }
        r.send(Item::FileStart {
            name: Name(BLOCK_ENTRY.to_vec()),
            md: meta,
            xattrs: vec![],
        })?;
        let hint = match old.map(|n| n.kind) {
            Some(NodeKind::File { chunks, .. }) => Some(chunks),
            _ => None,
        };
        if let (Some(hint), Some(pool)) = (hint, r.pool.as_ref()) {
            let (tx, rx) = crossbeam_channel::bounded(65536);
            r.send(Item::Stream(rx))?;
            r.items.flush()?;
            pool.send(LargeFile {
                file,
                path: root.to_path_buf(),
                sig,
                hint: Some(hint),
                pieces: tx,
            })
            .map_err(|_| stopped())?;
            return r.send(Item::LeaveDir);
        }
        let error = chunk_file(
            file,
            root,
            sig,
            &r.chunker,
            r.jobs,
            r.stats,
            r.progress,
            |rx| r.send(Item::Chunk(rx)),
        )?;
        if let Some(e) = error {
            return Err(Error::io(root, std::io::Error::other(e)));
        }
        r.send(Item::FileEnd { error: None })?;
        return r.send(Item::LeaveDir);
    }
    let ahead = previous.map(|p| (p.root, TreesAhead::start(p.trees, p.root)));
    let old = ahead.as_ref().and_then(|(root, a)| a.take(root));
    let ahead = ahead.as_ref().map(|(_, a)| a);
    r.dir(root, &[], ahead, old.as_ref())?;
    r.send(Item::LeaveDir)
}

struct Reader<'a> {
    chunker: ChunkerParams,
    items: &'a Items,
    jobs: &'a crossbeam_channel::Sender<Job>,
    stats: &'a Stats,
    progress: &'a dyn Progress,
    /// (dev, inode) of files with several links → their path in the snapshot.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Where large files go to be chunked in parallel.
    pool: Option<crossbeam_channel::Sender<LargeFile>>,
    /// Ferry's own state: never read (see [`SnapshotOptions::skip`]).
    skip: &'a HashSet<(u64, u64)>,
}

impl Reader<'_> {
    fn send(&self, item: Item) -> Result<()> {
        self.items.send(item)
    }

    fn warn(&self, msg: String) {
        warn(self.stats, self.progress, msg);
    }

    fn xattrs(&self, path: &Path) -> Vec<Xattr> {
        source::read_xattrs(path).unwrap_or_else(|e| {
            self.warn(format!(
                "{}: cannot read extended attributes: {e}",
                path.display()
            ));
            vec![]
        })
    }

    fn dir(
        &mut self,
        dir: &Path,
        rel: &[u8],
        ahead: Option<&TreesAhead>,
        old: Option<&Tree>,
    ) -> Result<()> {
        let old_node = |name: &Name| -> Option<&Node> { old?.entry(&name.0) };
        let entries = match source::sorted_entries(dir) {
            Ok(n) => n,
            Err(e) => {
                self.warn(format!("{}: cannot list directory: {e}", dir.display()));
                return Ok(());
            }
        };
        // Subdirectories are read after the directory's other entries, once
        // its listing (and the descriptor it holds open) is dropped: a deep
        // tree must not hold a descriptor per level. The collector sorts
        // each directory's entries, so the tree is the same.
        let mut subdirs = Vec::new();
        for (os_name, entry) in entries {
            let path = dir.join(&os_name);
            let name = Name::from_os(&os_name);
            let mut child_rel = rel.to_vec();
            if !child_rel.is_empty() {
                child_rel.push(b'/');
            }
            child_rel.extend_from_slice(&name.0);
            // Relative to the listed directory (`fstatat`): no walk of the
            // whole path per entry.
            let md = match entry.metadata() {
                Ok(md) => md,
                Err(e) => {
                    self.warn(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            if self.skip.contains(&(md.dev(), md.ino())) {
                tracing::info!("{}: ferry's own state, left out", path.display());
                self.stats
                    .skipped_state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(path.display().to_string());
                continue;
            }
            match source::entry_type(&md) {
                EntryType::Dir => subdirs.push((path, name, child_rel, md)),
                EntryType::File => {
                    let old = old_node(&name);
                    // An unchanged file keeps its extended attributes too:
                    // setting or removing one moves the ctime.
                    let reuse = old.and_then(|n| {
                        source::unchanged(n, &Meta::from(&md)).map(|c| (c, n.xattrs.clone()))
                    });
                    let hint = match old.map(|n| &n.kind) {
                        Some(NodeKind::File { chunks, .. }) if reuse.is_none() => {
                            Some(chunks.clone())
                        }
                        _ => None,
                    };
                    self.file(&path, name, md, child_rel, reuse, hint)?
                }
                EntryType::Symlink => match std::fs::read_link(&path) {
                    Ok(t) => {
                        let target = Name::from_os(t.as_os_str());
                        let xattrs = self.xattrs(&path);
                        self.send(Item::Leaf(source::node_from(
                            name,
                            &Meta::from(&md),
                            NodeKind::Symlink { target },
                            xattrs,
                        )))?;
                    }
                    Err(e) => self.warn(format!("{}: cannot read link: {e}", path.display())),
                },
                EntryType::Special(kind) => {
                    self.stats.special.fetch_add(1, Ordering::Relaxed);
                    self.warn(format!("{}: skipped {kind}", path.display()));
                }
            }
        }
        let parent_trees: Vec<Option<BlobId>> = subdirs
            .iter()
            .map(|(_, name, _, _)| match old_node(name).map(|n| &n.kind) {
                Some(NodeKind::Dir { subtree }) if ahead.is_some() => Some(*subtree),
                _ => None,
            })
            .collect();
        for (k, (path, name, child_rel, md)) in subdirs.into_iter().enumerate() {
            let xattrs = self.xattrs(&path);
            let sub = match (ahead, parent_trees[k]) {
                (Some(a), Some(id)) => a.take(&id),
                _ => None,
            };
            self.send(Item::EnterDir {
                name,
                md: Meta::from(&md),
                xattrs,
                parent_tree: parent_trees[k],
            })?;
            self.dir(&path, &child_rel, ahead, sub.as_ref())?;
            self.send(Item::LeaveDir)?;
        }
        Ok(())
    }

    fn file(
        &mut self,
        path: &Path,
        name: Name,
        md: Metadata,
        rel: Vec<u8>,
        reuse: Option<(Vec<ChunkRef>, Vec<Xattr>)>,
        hint: Option<Vec<ChunkRef>>,
    ) -> Result<()> {
        if md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(first) = self.links.get(&key) {
                let node = source::node_from(
                    name,
                    &Meta::from(&md),
                    NodeKind::Hardlink {
                        target: Name(first.clone()),
                    },
                    vec![],
                );
                return self.send(Item::Leaf(node));
            }
        }
        if let Some((chunks, xattrs)) = reuse {
            if md.nlink() > 1 {
                self.links.insert((md.dev(), md.ino()), rel);
            }
            let size = md.len();
            let node = source::node_from(
                name,
                &Meta::from(&md),
                NodeKind::File { size, chunks },
                xattrs,
            );
            self.stats.unchanged.fetch_add(1, Ordering::Relaxed);
            self.progress.advance(size);
            self.progress.file_done();
            return self.send(Item::Reused(node));
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.warn(format!("{}: {e}", path.display()));
                return Ok(());
            }
        };
        if md.nlink() > 1 {
            self.links.insert((md.dev(), md.ino()), rel);
        }
        let xattrs = self.xattrs(path);
        let sig = (md.len(), md.mtime(), md.mtime_nsec());
        self.send(Item::FileStart {
            name,
            md: Meta::from(&md),
            xattrs,
        })?;
        if let Some(pool) = self.pool.as_ref().filter(|_| sig.0 >= LARGE_FILE) {
            // Chunked on a pool thread, in parallel with the files after it;
            // the collector still takes its chunks in order.
            // Room for 64Ki chunk replies (a few MB): the pool runs ahead of
            // the collector by up to ~2 GiB of a file; the data itself is
            // bounded by the jobs channel.
            let (tx, rx) = crossbeam_channel::bounded(65536);
            self.send(Item::Stream(rx))?;
            // The collector must see the stream before the pool may block
            // on it: handing the file over can wait for a busy pool.
            self.items.flush()?;
            return pool
                .send(LargeFile {
                    file,
                    path: path.to_path_buf(),
                    sig,
                    hint,
                    pieces: tx,
                })
                .map_err(|_| stopped());
        }
        let error = chunk_file(
            file,
            path,
            sig,
            &self.chunker,
            self.jobs,
            self.stats,
            self.progress,
            |rx| self.send(Item::Chunk(rx)),
        )?;
        self.send(Item::FileEnd { error })
    }
}

/// The name of the one entry of a block volume's root tree.
pub const BLOCK_ENTRY: &[u8] = b"block";

/// Files at least this large are chunked on the pool, so that several
/// large files use several cores for FastCDC.
const LARGE_FILE: u64 = 8 << 20;

/// A large file for the chunking pool, with the channel its pieces go to.
struct LargeFile {
    file: File,
    path: PathBuf,
    sig: (u64, i64, i64),
    /// The file's chunk list in the parent snapshot, if it had one.
    hint: Option<Vec<ChunkRef>>,
    pieces: crossbeam_channel::Sender<Piece>,
}

enum Piece {
    Chunk(Receiver<ChunkRef>),
    End(Option<String>),
}

/// A chunking pool thread: chunks whole files it is handed.
fn chunk_pool(
    files: crossbeam_channel::Receiver<LargeFile>,
    chunker: ChunkerParams,
    ids: IdHasher,
    verify: VerifyAhead,
    jobs: crossbeam_channel::Sender<Job>,
    stats: Arc<Stats>,
    progress: Arc<dyn Progress>,
) -> Result<()> {
    for f in files {
        let pieces = f.pieces;
        if let Some(hint) = f.hint {
            let error = chunk_file_hinted(
                f.file,
                &f.path,
                f.sig,
                &chunker,
                &hint,
                &ids,
                &verify,
                &jobs,
                &stats,
                progress.as_ref(),
                |rx| pieces.send(Piece::Chunk(rx)).map_err(|_| stopped()),
            )?;
            pieces.send(Piece::End(error)).map_err(|_| stopped())?;
            continue;
        }
        let error = chunk_file(
            f.file,
            &f.path,
            f.sig,
            &chunker,
            &jobs,
            &stats,
            progress.as_ref(),
            |rx| pieces.send(Piece::Chunk(rx)).map_err(|_| stopped()),
        )?;
        pieces.send(Piece::End(error)).map_err(|_| stopped())?;
    }
    Ok(())
}

/// How far ahead of [`chunk_file_hinted`] the parent's chunks are checked,
/// and on how many threads.
#[derive(Clone, Copy, Debug)]
struct VerifyAhead {
    threads: usize,
    /// Bytes of the parent's chunks checked at once.
    span: u64,
}

/// Checked at once: enough to keep every thread busy for a while, little
/// enough that a file which changed all over wastes little hashing.
const VERIFY_SPAN: u64 = 32 << 20;

/// Which of the parent's chunks are still at their offsets, checked a span
/// at a time on several threads: a database file of which a few pages
/// changed is almost all verification, which on one thread was the longest
/// part of a final delta.
struct Verifier<'a> {
    file: &'a File,
    size: u64,
    old_at: &'a [(u64, ChunkRef)],
    ids: &'a IdHasher,
    ahead: VerifyAhead,
    /// `same[k]` is old chunk `start + k`'s result.
    start: usize,
    same: Vec<bool>,
    /// The last span mostly failed (the file changed all over, or its data
    /// moved): check one chunk at a time, as the chunker reaches it.
    sparse: bool,
}

impl Verifier<'_> {
    /// Whether old chunk `i` is still at its offset with the same content.
    fn check(&mut self, i: usize) -> std::io::Result<bool> {
        if i < self.start || i >= self.start + self.same.len() {
            self.fill(i)?;
        }
        Ok(self.same[i - self.start])
    }

    fn fill(&mut self, i: usize) -> std::io::Result<()> {
        let end = if self.sparse {
            i + 1
        } else {
            let limit = self.old_at[i].0 + self.ahead.span;
            i + 1 + self.old_at[i + 1..].partition_point(|(at, _)| *at < limit)
        };
        let part = &self.old_at[i..end];
        let (file, size, ids) = (self.file, self.size, self.ids);
        let threads = self.ahead.threads.clamp(1, part.len());
        let same = if threads == 1 {
            verify_chunks(file, size, part, ids)?
        } else {
            let per = part.len().div_ceil(threads);
            std::thread::scope(|s| {
                let others: Vec<_> = part
                    .chunks(per)
                    .skip(1)
                    .map(|p| s.spawn(move || verify_chunks(file, size, p, ids)))
                    .collect();
                let mut same = verify_chunks(file, size, &part[..per], ids)?;
                for h in others {
                    let more = h
                        .join()
                        .map_err(|_| std::io::Error::other("a verifying thread panicked"))??;
                    same.extend(more);
                }
                Ok::<_, std::io::Error>(same)
            })?
        };
        let matched = same.iter().filter(|s| **s).count();
        self.sparse = matched * 2 < same.len();
        self.start = i;
        self.same = same;
        Ok(())
    }
}

/// Reads and hashes each chunk at its offset: true where the id matches.
/// A chunk reaching past the end of the file does not match.
fn verify_chunks(
    file: &File,
    size: u64,
    chunks: &[(u64, ChunkRef)],
    ids: &IdHasher,
) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    // One buffer for all: verified chunks are hashed and dropped, so a
    // fresh (zeroed) allocation each would be waste.
    let mut buf = Vec::new();
    chunks
        .iter()
        .map(|(at, c)| {
            let n = c.1 as usize;
            if at + n as u64 > size {
                return Ok(false);
            }
            buf.resize(n, 0);
            file.read_exact_at(&mut buf, *at)?;
            Ok(ids.id(&buf) == c.0)
        })
        .collect()
}

/// A chunk that [`chunk_file_hinted`] hands on.
enum Out {
    /// Verified against the parent's chunk at the same offset: length, id.
    Known(u32, BlobId),
    /// To store (or dedup): its bytes.
    New(Vec<u8>),
}

/// Chunks a changed large file using its chunk list in the parent snapshot:
/// each old chunk still at its offset is verified by hashing it (no
/// content-defined chunking needed: its boundaries are known); from the
/// first chunk that differs, FastCDC runs until one of its cuts falls on an
/// old boundary, where verification resumes. A database file with scattered
/// rewritten pages costs a read and a hash, not a read, FastCDC and a hash.
/// The cuts are the ones FastCDC makes over the whole file (it restarts at
/// boundaries FastCDC made before), so dedup is unaffected.
#[allow(clippy::too_many_arguments)]
fn chunk_file_hinted(
    file: File,
    path: &Path,
    sig: (u64, i64, i64),
    chunker: &ChunkerParams,
    old: &[ChunkRef],
    ids: &IdHasher,
    ahead: &VerifyAhead,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
    mut emit: impl FnMut(Receiver<ChunkRef>) -> Result<()>,
) -> Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let size = sig.0;
    let old_at: Vec<(u64, ChunkRef)> = old
        .iter()
        .scan(0u64, |off, c| {
            let at = *off;
            *off += c.1 as u64;
            Some((at, *c))
        })
        .collect();
    let boundaries: HashSet<u64> = old_at.iter().map(|(o, _)| *o).collect();
    let (min, avg, max) = (
        chunker.min as usize,
        chunker.avg as usize,
        chunker.max as usize,
    );
    // FastCDC's window: enough for two chunks (a cut is mostly found within
    // one or two after a change), doubled while a changed region goes on.
    // One buffer for the whole file: a fresh zeroed megabyte per changed
    // page cost more than reading and hashing the file.
    let (first_window, max_window) = (2 * max, (16 * max).max(4 << 20));
    let mut window;
    let mut cdc_buf: Vec<u8> = Vec::new();
    let level = crate::chunker::level(chunker.normalization);
    let mut send = |chunk: Out| -> Result<()> {
        let (tx, rx) = sync_channel(1);
        let n = match chunk {
            // A chunk of the parent snapshot, verified by its hash where the
            // parent had it: the vault holds it (the parent is live, and
            // prune waits for our shared lock), so it needs no worker and no
            // dedup lookup, and its bytes are not kept.
            Out::Known(n, id) => {
                stats.chunks.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(ChunkRef(id, n));
                n as u64
            }
            Out::New(data) => {
                let n = data.len() as u64;
                jobs.send(Job { data, reply: tx }).map_err(|_| stopped())?;
                n
            }
        };
        emit(rx)?;
        stats.read(n);
        progress.advance(n);
        Ok(())
    };
    let fail = |e: std::io::Error| {
        warn(
            stats,
            progress,
            format!("{}: read error: {e}", path.display()),
        );
        Ok(Some(e.to_string()))
    };
    // FastCDC decides a cut with the byte after it, so a verified chunk is
    // a sure cut only once the next one verifies too (its first byte is
    // then unchanged): until then it is held back, and if the next one
    // fails, chunking restarts from the held chunk's start.
    let mut held: Option<(u64, u32, BlobId)> = None;
    let mut verifier = Verifier {
        file: &file,
        size,
        old_at: &old_at,
        ids,
        ahead: *ahead,
        start: 0,
        same: Vec::new(),
        sparse: false,
    };
    let (mut pos, mut i) = (0u64, 0usize);
    while pos < size {
        while i < old_at.len() && old_at[i].0 < pos {
            i += 1;
        }
        // The old last chunk was cut by the old end of file: if the file
        // grew, FastCDC may cut elsewhere now, so it is not trusted.
        let cut_by_eof = |at: u64, c: &ChunkRef| i + 1 == old_at.len() && at + c.1 as u64 != size;
        if let Some((at, c)) = old_at
            .get(i)
            .copied()
            .filter(|(at, c)| *at == pos && at + c.1 as u64 <= size && !cut_by_eof(*at, c))
        {
            let same = match verifier.check(i) {
                Ok(same) => same,
                Err(e) => return fail(e),
            };
            if same {
                if let Some((_, n, hid)) = held.take() {
                    send(Out::Known(n, hid))?;
                }
                held = Some((at, c.1, c.0));
                pos += c.1 as u64;
                i += 1;
                continue;
            }
        }
        if let Some((at, _, _)) = held.take() {
            // Back up: the held chunk's end may no longer be a cut.
            pos = at;
            i = i.saturating_sub(1);
        }
        // FastCDC from `pos` (a cut of the full-file chunking) until a cut
        // lands on an old boundary.
        window = first_window;
        'cdc: loop {
            let len = window.min((size - pos) as usize);
            if cdc_buf.len() < len {
                cdc_buf.resize(len, 0);
            }
            let buf = &mut cdc_buf[..len];
            if let Err(e) = file.read_exact_at(buf, pos) {
                return fail(e);
            }
            let buf = &*buf;
            let at_eof = pos + len as u64 >= size;
            let cdc = fastcdc::v2020::FastCDC::with_level(buf, min, avg, max, level);
            let mut start = 0usize;
            while start < len {
                let (_, cut) = cdc.cut(start, len - start);
                if cut >= len && !at_eof && len - start < max {
                    pos += start as u64;
                    window = (window * 2).min(max_window);
                    continue 'cdc;
                }
                send(Out::New(buf[start..cut].to_vec()))?;
                start = cut;
                if boundaries.contains(&(pos + start as u64)) {
                    pos += start as u64;
                    break 'cdc;
                }
            }
            pos += len as u64;
            break;
        }
    }
    if let Some((_, n, hid)) = held.take() {
        send(Out::Known(n, hid))?;
    }
    end_of_read(path, sig, stats, progress);
    Ok(None)
}

/// After a file was read whole: a file written to while it was read is
/// saved as read, and named in a warning.
fn end_of_read(path: &Path, sig: (u64, i64, i64), stats: &Stats, progress: &dyn Progress) {
    let changed = std::fs::symlink_metadata(path).map_or(true, |now| {
        (now.len(), now.mtime(), now.mtime_nsec()) != sig
    });
    if changed {
        warn(
            stats,
            progress,
            format!("{}: changed while it was read (unstable)", path.display()),
        );
        let mut u = stats.unstable.lock().unwrap_or_else(|e| e.into_inner());
        if u.len() < MAX_NAMED {
            u.push(path.display().to_string());
        }
    }
    progress.file_done();
}

fn warn(stats: &Stats, progress: &dyn Progress, msg: String) {
    stats.warnings.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("{msg}");
    progress.warn(&msg);
}

/// Reads and chunks one file, sending each chunk to the workers and its
/// reply channel to `emit`, in order. Returns the read error, if any (the
/// file is then left out of the snapshot, which is marked incomplete).
#[allow(clippy::too_many_arguments)]
fn chunk_file(
    file: File,
    path: &Path,
    sig: (u64, i64, i64),
    chunker: &ChunkerParams,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
    emit: impl FnMut(Receiver<ChunkRef>) -> Result<()>,
) -> Result<Option<String>> {
    let error = chunk_reader(file, &path.display(), chunker, jobs, stats, progress, emit)?;
    if error.is_none() {
        end_of_read(path, sig, stats, progress);
    } else {
        progress.file_done();
    }
    Ok(error)
}

/// Chunks a stream, as [`chunk_file`] does a file; `what` names it in
/// warnings.
fn chunk_reader(
    reader: impl std::io::Read,
    what: &dyn std::fmt::Display,
    chunker: &ChunkerParams,
    jobs: &crossbeam_channel::Sender<Job>,
    stats: &Stats,
    progress: &dyn Progress,
    mut emit: impl FnMut(Receiver<ChunkRef>) -> Result<()>,
) -> Result<Option<String>> {
    let mut error = None;
    for chunk in Chunker::new(BufReader::with_capacity(1 << 20, reader), chunker) {
        match chunk {
            Ok(data) => {
                let n = data.len() as u64;
                let (tx, rx) = sync_channel(1);
                jobs.send(Job { data, reply: tx }).map_err(|_| stopped())?;
                emit(rx)?;
                stats.read(n);
                progress.advance(n);
            }
            Err(e) => {
                warn(stats, progress, format!("{what}: read error: {e}"));
                error = Some(e.to_string());
                break;
            }
        }
    }
    Ok(error)
}

/// Chunks with their ids and, for each, whether this run stores it.
struct Claimed {
    jobs: Vec<Job>,
    ids: Vec<BlobId>,
    claims: Vec<bool>,
}

/// A lookup thread: hashes chunks and asks the catalog which of them this
/// run stores, a batch (what is queued, up to a bound) per call.
fn look_up(
    jobs: crossbeam_channel::Receiver<Job>,
    dedup: &Dedup,
    ids: &IdHasher,
    batches: &crossbeam_channel::Sender<Claimed>,
) -> Result<()> {
    while let Ok(first) = jobs.recv() {
        let mut bytes = first.data.len();
        let mut batch = vec![first];
        while batch.len() < DEDUP_BATCH && bytes < DEDUP_BATCH_BYTES {
            match jobs.try_recv() {
                Ok(j) => {
                    bytes += j.data.len();
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        let ids_: Vec<BlobId> = batch.iter().map(|j| ids.id(&j.data)).collect();
        let claims = dedup.claim_batch(&ids_)?;
        batches
            .send(Claimed {
                jobs: batch,
                ids: ids_,
                claims,
            })
            .map_err(|_| stopped())?;
    }
    Ok(())
}

/// A worker: compresses and encrypts the chunks this run stores into a pack
/// of its own, and answers each chunk's reply.
fn work(
    batches: crossbeam_channel::Receiver<Claimed>,
    key: &[u8; 32],
    level: i32,
    pack_size: usize,
    packs: &mpsc::Sender<FinishedPack>,
    stats: &Stats,
) -> Result<()> {
    let mut pack = PackWriter::new(key, pack_size);
    for batch in batches {
        for ((job, id), claim) in batch.jobs.into_iter().zip(batch.ids).zip(batch.claims) {
            let len = job.data.len();
            stats.chunks.fetch_add(1, Ordering::Relaxed);
            if claim {
                pack.add(BlobKind::Data, id, &job.data, level);
                stats.bytes_new.fetch_add(len as u64, Ordering::Relaxed);
                stats.chunks_new.fetch_add(1, Ordering::Relaxed);
                crate::telemetry::new_chunk(len as u64);
                if pack.is_full() {
                    let full = std::mem::replace(&mut pack, PackWriter::new(key, pack_size));
                    packs.blocking_send(full.finish()).map_err(|_| stopped())?;
                }
            }
            // The collector may be gone after a failure elsewhere.
            let _ = job.reply.send(ChunkRef(id, len as u32));
        }
    }
    if !pack.is_empty() {
        packs.blocking_send(pack.finish()).map_err(|_| stopped())?;
    }
    Ok(())
}

struct Collected {
    root: BlobId,
    files: u64,
    dirs: u64,
    bytes: u64,
}

struct OpenDir {
    name: Name,
    md: Meta,
    xattrs: Vec<Xattr>,
    parent_tree: Option<BlobId>,
    entries: Vec<Node>,
}

struct OpenFile {
    name: Name,
    md: Meta,
    xattrs: Vec<Xattr>,
    chunks: Vec<ChunkRef>,
}

fn push_chunk(file: &mut Option<OpenFile>, rx: Receiver<ChunkRef>) -> Result<()> {
    let c = rx.recv().map_err(|_| stopped())?;
    file.as_mut()
        .ok_or_else(|| Error::Internal("chunk outside a file".into()))?
        .chunks
        .push(c);
    Ok(())
}

/// Closes the open file: its node joins its directory, unless reading it
/// failed (then it is left out and the snapshot is marked incomplete).
fn end_file(
    file: &mut Option<OpenFile>,
    error: Option<String>,
    stack: &mut [OpenDir],
    files: &mut u64,
    bytes: &mut u64,
) -> Result<()> {
    let f = file
        .take()
        .ok_or_else(|| Error::Internal("file end outside a file".into()))?;
    if error.is_some() {
        return Ok(());
    }
    let size: u64 = f.chunks.iter().map(|c| c.1 as u64).sum();
    *files += 1;
    *bytes += size;
    let node = source::node_from(
        f.name,
        &f.md,
        NodeKind::File {
            size,
            chunks: f.chunks,
        },
        f.xattrs,
    );
    stack
        .last_mut()
        .ok_or_else(|| Error::Internal("file outside a directory".into()))?
        .entries
        .push(node);
    Ok(())
}

/// Trees cached per catalog commit: a few hundred KiB at a time.
const TREE_BATCH: usize = 128;

/// Trees the parent lacks at their place, with their encoded blobs: one
/// dedup lookup per batch.
type NewTrees = Vec<(BlobId, Vec<u8>, Tree)>;

/// Stores the trees the vault lacks, and caches them in the catalog, on a
/// thread of its own: with a coordinator each batch costs two round trips,
/// which the collector (and the walk behind it) would otherwise wait for.
fn store_trees(
    batches: crossbeam_channel::Receiver<NewTrees>,
    dedup: &Dedup,
    key: &[u8; 32],
    level: i32,
    pack_size: usize,
    packs: &mpsc::Sender<FinishedPack>,
    catalog: &dyn Catalog,
) -> Result<()> {
    let mut pack = PackWriter::new(key, pack_size);
    // Trees to cache, written to the catalog in batches (one commit each).
    let mut trees: Vec<(BlobId, Vec<u8>)> = Vec::new();
    for new in batches {
        let ids: Vec<BlobId> = new.iter().map(|t| t.0).collect();
        let claims = dedup.claim_batch(&ids)?;
        for ((id, blob, tree), claim) in new.into_iter().zip(claims) {
            if !claim {
                continue;
            }
            pack.add(BlobKind::Tree, id, &blob, level);
            if pack.is_full() {
                let full = std::mem::replace(&mut pack, PackWriter::new(key, pack_size));
                packs.blocking_send(full.finish()).map_err(|_| stopped())?;
            }
            trees.push((id, tree.encode_cached()));
            if trees.len() >= TREE_BATCH {
                catalog.put_trees(&std::mem::take(&mut trees))?;
            }
        }
    }
    if !pack.is_empty() {
        packs.blocking_send(pack.finish()).map_err(|_| stopped())?;
    }
    catalog.put_trees(&trees)?;
    Ok(())
}

/// Builds tree blobs bottom up from the reader's ordered items; those the
/// parent lacks go to [`store_trees`].
fn collect(
    items: crossbeam_channel::Receiver<Vec<Item>>,
    ids: &IdHasher,
    trees_tx: &crossbeam_channel::Sender<NewTrees>,
) -> Result<Collected> {
    let mut stack: Vec<OpenDir> = Vec::new();
    let mut file: Option<OpenFile> = None;
    let (mut files, mut dirs, mut bytes) = (0u64, 0u64, 0u64);
    let mut root = None;
    let mut new_trees: NewTrees = Vec::new();
    for item in items.into_iter().flatten() {
        match item {
            Item::EnterDir {
                name,
                md,
                xattrs,
                parent_tree,
            } => stack.push(OpenDir {
                name,
                md,
                xattrs,
                parent_tree,
                entries: Vec::new(),
            }),
            Item::LeaveDir => {
                let d = stack
                    .pop()
                    .ok_or_else(|| Error::Internal("unbalanced directories".into()))?;
                // In name order (an object listing is in key order,
                // where `a/x` sorts after `a-b`).
                let mut entries = d.entries;
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                let tree = Tree { entries };
                let blob = tree.encode();
                let id = ids.id(&blob);
                // A tree the vault already holds (most of them in a
                // pre-sync) is not cached again: the cache is filled on
                // first read where it lacks one. One the parent has at the
                // same place is not even looked up; the others are looked
                // up in batches (a round trip each, with a coordinator).
                if d.parent_tree != Some(id) {
                    new_trees.push((id, blob, tree));
                    if new_trees.len() >= TREE_BATCH {
                        trees_tx
                            .send(std::mem::take(&mut new_trees))
                            .map_err(|_| stopped())?;
                    }
                }
                match stack.last_mut() {
                    Some(parent) => {
                        dirs += 1;
                        parent.entries.push(source::node_from(
                            d.name,
                            &d.md,
                            NodeKind::Dir { subtree: id },
                            d.xattrs,
                        ));
                    }
                    None => root = Some(id),
                }
            }
            Item::FileStart { name, md, xattrs } => {
                file = Some(OpenFile {
                    name,
                    md,
                    xattrs,
                    chunks: Vec::new(),
                })
            }
            Item::Chunk(rx) => push_chunk(&mut file, rx)?,
            Item::FileEnd { error } => {
                end_file(&mut file, error, &mut stack, &mut files, &mut bytes)?
            }
            Item::Stream(rx) => {
                let mut end = None;
                for piece in rx {
                    match piece {
                        Piece::Chunk(r) => push_chunk(&mut file, r)?,
                        Piece::End(e) => {
                            end = Some(e);
                            break;
                        }
                    }
                }
                // No end: the pool thread stopped (its error is reported).
                let error = end.ok_or_else(stopped)?;
                end_file(&mut file, error, &mut stack, &mut files, &mut bytes)?;
            }
            Item::Reused(node) => {
                if let NodeKind::File { size, .. } = node.kind {
                    files += 1;
                    bytes += size;
                }
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Internal("entry outside a directory".into()))?
                    .entries
                    .push(node)
            }
            Item::Leaf(node) => {
                if matches!(node.kind, NodeKind::Hardlink { .. }) {
                    files += 1;
                }
                stack
                    .last_mut()
                    .ok_or_else(|| Error::Internal("entry outside a directory".into()))?
                    .entries
                    .push(node)
            }
        }
    }
    if !new_trees.is_empty() {
        trees_tx.send(new_trees).map_err(|_| stopped())?;
    }
    let root = root.ok_or_else(stopped)?;
    Ok(Collected {
        root,
        files,
        dirs,
        bytes,
    })
}

/// Puts packs into the vault, `concurrency` at a time, and records each in
/// the catalog once it is there.
async fn upload(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    dedup: Arc<Dedup>,
    mut packs: mpsc::Receiver<FinishedPack>,
    concurrency: usize,
    stats: Arc<Stats>,
) -> Result<Uploaded> {
    let mut running = tokio::task::JoinSet::new();
    // Catalog calls recording uploaded packs, a few at once: with a
    // coordinator each is a round trip, and the last packs of a snapshot
    // (each worker's, the trees') finish one after another.
    let mut recording: tokio::task::JoinSet<Result<Vec<PackRecord>>> = tokio::task::JoinSet::new();
    let mut records: Vec<PackRecord> = Vec::new();
    let mut indexes = Vec::new();
    // Every upload finished by then is recorded in one catalog transaction:
    // packs finish together at the end of a snapshot, and each commit of
    // random blob ids rewrites most of the index's pages.
    type Joined = Result<Result<PackRecord>, tokio::task::JoinError>;
    let done = |first: Joined,
                running: &mut tokio::task::JoinSet<Result<PackRecord>>,
                recording: &mut tokio::task::JoinSet<Result<Vec<PackRecord>>>|
     -> Result<()> {
        let mut batch = vec![first];
        while let Some(r) = running.try_join_next() {
            batch.push(r);
        }
        let recs = batch
            .into_iter()
            .map(|r| r.map_err(|e| Error::Internal(e.to_string()))?)
            .collect::<Result<Vec<PackRecord>>>()?;
        let catalog = catalog.clone();
        recording.spawn_blocking(move || {
            catalog.add_packs(&recs)?;
            Ok(recs)
        });
        Ok(())
    };
    type Recorded = Result<Result<Vec<PackRecord>>, tokio::task::JoinError>;
    let recorded = |r: Recorded, records: &mut Vec<PackRecord>| -> Result<()> {
        for rec in r.map_err(|e| Error::Internal(e.to_string()))?? {
            dedup.release(&rec);
            stats.bytes_uploaded.fetch_add(rec.size, Ordering::Relaxed);
            stats.packs.fetch_add(1, Ordering::Relaxed);
            stats.upload.end(rec.size);
            stats.upload.count(0, 1);
            crate::telemetry::pack_uploaded(rec.size);
            records.push(rec);
        }
        Ok(())
    };
    loop {
        while running.len() >= concurrency {
            let r = running.join_next().await.expect("not empty");
            done(r, &mut running, &mut recording)?;
        }
        while recording.len() >= RECORDING_CALLS {
            let r = recording.join_next().await.expect("not empty");
            recorded(r, &mut records)?;
        }
        if records.iter().map(|r| r.blobs.len()).sum::<usize>() >= INDEX_BLOBS {
            // Index objects as the packs come, not one at the end: the
            // records held in memory stay bounded. Each lists only packs
            // already in the vault; should the snapshot fail, they index
            // packs no snapshot uses, which prune deletes.
            let name = format!("index/{}", random_hex_id());
            let packs = std::mem::take(&mut records);
            let n = vault.put_meta(&name, &IndexObject { packs }).await?;
            stats.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
            indexes.push(name);
        }
        tokio::select! {
            p = packs.recv() => match p {
                Some(p) => {
                    let vault = vault.clone();
                    stats.upload.begin();
                    running.spawn(async move { vault.put_pack(&p).await.map(|_| p.record) });
                }
                None => break,
            },
            Some(r) = running.join_next(), if !running.is_empty() => {
                done(r, &mut running, &mut recording)?
            }
            Some(r) = recording.join_next(), if !recording.is_empty() => {
                recorded(r, &mut records)?
            }
        }
    }
    while let Some(r) = running.join_next().await {
        done(r, &mut running, &mut recording)?;
    }
    while let Some(r) = recording.join_next().await {
        recorded(r, &mut records)?;
    }
    Ok(Uploaded { records, indexes })
}

/// Catalog calls recording packs in flight at once, at most.
const RECORDING_CALLS: usize = 4;

/// Blob entries an index object lists (about 1 MB of it in memory).
const INDEX_BLOBS: usize = 16_384;

/// What [`upload`] leaves to the commit: the records not yet in an index
/// object, and the index objects it wrote.
struct Uploaded {
    records: Vec<PackRecord>,
    indexes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Chunks `data` as a file, with `hint` as the parent's chunk list;
    /// returns the chunk list the collector would see.
    fn hinted(
        data: &[u8],
        hint: &[ChunkRef],
        p: &ChunkerParams,
        ids: &IdHasher,
        ahead: VerifyAhead,
    ) -> Vec<ChunkRef> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, data).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        let sig = (md.len(), md.mtime(), md.mtime_nsec());
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(1024);
        let h = ids.clone();
        let worker = std::thread::spawn(move || {
            for j in jobs_rx {
                let id = h.id(&j.data);
                j.reply.send(ChunkRef(id, j.data.len() as u32)).unwrap();
            }
        });
        let stats = Stats::default();
        let mut replies = Vec::new();
        let err = chunk_file_hinted(
            File::open(&path).unwrap(),
            &path,
            sig,
            p,
            hint,
            ids,
            &ahead,
            &jobs_tx,
            &stats,
            &crate::progress::NoProgress,
            |rx| {
                replies.push(rx);
                Ok(())
            },
        )
        .unwrap();
        assert!(err.is_none());
        drop(jobs_tx);
        let out = replies.into_iter().map(|r| r.recv().unwrap()).collect();
        worker.join().unwrap();
        out
    }

    fn plain(data: &[u8], p: &ChunkerParams, ids: &IdHasher) -> Vec<ChunkRef> {
        Chunker::new(data, p)
            .map(|c| c.unwrap())
            .map(|c| ChunkRef(ids.id(&c), c.len() as u32))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Chunking a changed file from its old chunk list gives exactly the
        /// chunks a full FastCDC pass gives: overwrites anywhere (chunk
        /// edges included), growth and shrinking, whatever the spans
        /// verified ahead and the threads verifying them.
        #[test]
        fn hinted_chunking_equals_full_chunking(
            seed in any::<u64>(),
            span in 1u64..120_000,
            threads in 1usize..4,
            edits in proptest::collection::vec((0usize..300_000, 1usize..64), 0..4),
            edge_edit in any::<bool>(),
            resize in -20_000i64..20_000,
        ) {
            let p = ChunkerParams { min: 1024, avg: 4096, max: 16384, ..ChunkerParams::default() };
            let ids = IdHasher::new([9; 32]);
            let old = noise(300_000, seed);
            let old_chunks = plain(&old, &p, &ids);
            let mut new = old.clone();
            for (at, n) in &edits {
                for b in new.iter_mut().skip(*at).take(*n) {
                    *b ^= 0x5a;
                }
            }
            if edge_edit {
                // The first byte after a chunk: decides that chunk's cut.
                let at = old_chunks[..old_chunks.len() / 2].iter().map(|c| c.1 as usize).sum::<usize>();
                new[at] ^= 0xff;
            }
            let len = (new.len() as i64 + resize) as usize;
            new.resize(len, 7);
            let ahead = VerifyAhead { threads, span };
            prop_assert_eq!(hinted(&new, &old_chunks, &p, &ids, ahead), plain(&new, &p, &ids));
        }
    }
}
