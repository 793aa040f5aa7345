//! One function per command: open what it needs, call ferry-core, print.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use ferry_catalog::SqliteCatalog;
use ferry_core::catalog::Catalog;
use ferry_core::config::VaultOptions;
use ferry_core::restore::RestoreOptions;
use ferry_core::snapshot::SnapshotOptions;
use ferry_core::vault::{Location, Vault};
use serde::Serialize;

use crate::ui::{Bar, human_bytes};
use crate::{CatalogCmd, Cli, Command, Global, VaultCmd};

pub async fn run(cli: Cli) -> Result<u8> {
    let g = &cli.global;
    match cli.command {
        Command::Vault(VaultCmd::Init {
            location,
            chunk_min,
            chunk_avg,
            chunk_max,
            pack_size,
            compression_level,
        }) => {
            let loc = location_of(location.as_deref(), g)?;
            let mut opts = VaultOptions::default();
            let small = |v: u64| u32::try_from(v).map_err(|_| anyhow!("size {v} too large"));
            if let Some(v) = chunk_min {
                opts.chunker.min = small(v)?;
            }
            if let Some(v) = chunk_avg {
                opts.chunker.avg = small(v)?;
            }
            if let Some(v) = chunk_max {
                opts.chunker.max = small(v)?;
            }
            if let Some(v) = pack_size {
                opts.pack_size = small(v)?;
            }
            if let Some(v) = compression_level {
                opts.compression.level = v;
            }
            let pass = passphrase(g)?;
            let cfg = Vault::init(&loc, &pass, &opts).await?;
            #[derive(Serialize)]
            struct Out<'a> {
                vault: String,
                vault_id: &'a str,
                chunker: &'a ferry_core::config::ChunkerParams,
                pack_size: u32,
            }
            print(
                g,
                &Out {
                    vault: loc.to_string(),
                    vault_id: &cfg.vault_id,
                    chunker: &cfg.chunker,
                    pack_size: cfg.pack_size,
                },
                || format!("created vault {} at {loc}", cfg.vault_id),
            )?;
            Ok(0)
        }
        Command::Vault(VaultCmd::Check {
            location,
            read_data,
            read_data_subset,
        }) => {
            use ferry_core::check::ReadData;
            let read = match (read_data, read_data_subset) {
                (true, _) => ReadData::All,
                (false, Some(p)) if (0.0..=100.0).contains(&p) => ReadData::Subset(p),
                (false, Some(p)) => bail!("--read-data-subset {p}: give a percentage, 0 to 100"),
                (false, None) => ReadData::None,
            };
            let read_data = read != ReadData::None;
            let (vault, catalog) = open(location.as_deref(), g).await?;
            let report = ferry_core::check::check(&vault, catalog.as_ref(), read).await?;
            print(g, &report, || {
                let mut s = format!(
                    "checked {} snapshots, {} packs{}",
                    report.snapshots,
                    report.packs,
                    if read_data {
                        format!(
                            ", read {} packs and verified {} blobs",
                            report.packs_read, report.blobs_verified
                        )
                    } else {
                        String::new()
                    }
                );
                for d in &report.damaged_objects {
                    s.push_str(&format!("\ndamaged object {}: {}", d.object, d.reason));
                }
                for d in &report.damaged_packs {
                    s.push_str(&format!("\ndamaged pack {}: {}", d.pack, d.reason));
                }
                for a in &report.affected {
                    s.push_str(&format!(
                        "\naffected: {}@{} {}: {}",
                        a.volume,
                        &a.snapshot[..8.min(a.snapshot.len())],
                        a.path,
                        a.reason
                    ));
                }
                s.push_str(if report.ok {
                    "\nno errors found"
                } else {
                    "\nthe vault is damaged"
                });
                s
            })?;
            if report.ok {
                Ok(0)
            } else {
                eprintln!(
                    "error: vault {} is damaged: {} damaged object(s), {} damaged pack(s), {} missing blob(s), {} affected file(s)",
                    vault.name(),
                    report.damaged_objects.len(),
                    report.damaged_packs.len(),
                    report.missing_blobs.len(),
                    report.affected.len()
                );
                Ok(1)
            }
        }
        Command::Snapshot {
            source,
            volume,
            reread,
            block,
            config,
            kube,
            remote,
        } => {
            if let Some((ns, claim)) = crate::kube::claim_of(&source)? {
                let claimed = crate::kube::place(g, &kube, &ns, &claim, true).await?;
                return crate::kube::run_on_node(g, claimed, remote, |p| {
                    ferry_fleet::spec::JobSpec::Snapshot {
                        source: p.path.clone(),
                        volume,
                        reread,
                        block: block || p.block,
                        read_limit: None,
                    }
                })
                .await;
            }
            if let Some(objects) = crate::bucket::objects_at(&source, config.as_deref()).await? {
                if g.coordinator.is_some() || block {
                    bail!(
                        "a bucket is snapshotted on this machine, as a tree of objects: drop --coordinator and --block"
                    );
                }
                return crate::bucket::snapshot(g, objects, volume, reread).await;
            }
            if let Some(client) = crate::fleet::client(g, &remote)? {
                let spec = ferry_fleet::spec::JobSpec::Snapshot {
                    source: crate::fleet::absolute(&source)?,
                    volume,
                    reread,
                    block,
                    read_limit: None,
                };
                return crate::fleet::run_job(g, &client, &remote, spec).await;
            }
            let (vault, catalog) = open(None, g).await?;
            let bar = Arc::new(Bar::new("snapshot"));
            let mut opts = SnapshotOptions::new(volume);
            opts.reread = reread;
            opts.block = block;
            opts.skip = skip_own_state(g);
            let r = ferry_fleet::work::snapshot(vault, catalog, &source, &opts, bar.clone()).await;
            bar.finish();
            let s = r?;
            print(g, &s, || snapshot_text(&s))?;
            if s.incomplete {
                eprintln!(
                    "warning: snapshot {} is incomplete: {} entries could not be read{}",
                    &s.snapshot_id[..8],
                    s.warnings,
                    unstable_text(&s.unstable)
                );
                return Ok(3);
            }
            Ok(0)
        }
        Command::Snapshots { volume } => {
            // With a coordinator, its vault's snapshots: those its agents
            // took, which no embedded catalog on this machine knows of.
            let catalog: Arc<dyn Catalog> = match g.coordinator {
                Some(_) => Arc::new(crate::fleet::remote_catalog(g)?),
                None => open(None, g).await?.1,
            };
            let list: Vec<_> = catalog
                .snapshots()?
                .into_iter()
                .filter(|s| volume.as_ref().is_none_or(|v| &s.volume == v))
                .collect();
            #[derive(Serialize)]
            struct Out<'a> {
                snapshots: &'a [ferry_core::manifest::SnapshotRecord],
            }
            print(g, &Out { snapshots: &list }, || {
                let mut s = format!(
                    "{:<10} {:<21} {:<20} {:>8} {:>11}  {}",
                    "ID", "TIME", "VOLUME", "FILES", "SIZE", "HOST"
                );
                for r in &list {
                    s.push_str(&format!(
                        "\n{:<10} {:<21} {:<20} {:>8} {:>11}  {}{}",
                        &r.id[..8],
                        r.time,
                        r.volume,
                        r.files,
                        human_bytes(r.bytes),
                        r.host,
                        if r.incomplete { "  (incomplete)" } else { "" }
                    ));
                }
                s.push_str(&format!("\n{} snapshot(s)", list.len()));
                s
            })?;
            Ok(0)
        }
        Command::Restore {
            snapshot,
            target,
            delta,
            config,
            kube,
            remote,
        } => {
            if let Some((ns, claim)) = crate::kube::claim_of(&target)? {
                let claimed = crate::kube::place(g, &kube, &ns, &claim, false).await?;
                return crate::kube::run_on_node(g, claimed, remote, |p| {
                    ferry_fleet::spec::JobSpec::Restore {
                        snapshot,
                        target: p.path.clone(),
                        delete: delta.delete,
                        verify: delta.verify,
                        reread_target: delta.reread_target,
                        after: None,
                    }
                })
                .await;
            }
            if let Some(objects) = crate::bucket::objects_at(&target, config.as_deref()).await? {
                if g.coordinator.is_some() {
                    bail!("a restore into a bucket runs on this machine: drop --coordinator");
                }
                return crate::bucket::restore(g, &snapshot, objects, &delta).await;
            }
            if let Some(client) = crate::fleet::client(g, &remote)? {
                let spec = ferry_fleet::spec::JobSpec::Restore {
                    snapshot,
                    target: crate::fleet::absolute(&target)?,
                    delete: delta.delete,
                    verify: delta.verify,
                    reread_target: delta.reread_target,
                    after: None,
                };
                return crate::fleet::run_job(g, &client, &remote, spec).await;
            }
            check_placement(g, &target, None, delta.delete)?;
            let (vault, catalog) = open(None, g).await?;
            let snap = ferry_core::sync::find_snapshot(catalog.as_ref(), &snapshot)?;
            if !snap.block {
                directory_target(&target)?;
            }
            let s = restore_into(vault, catalog, &snap, &target, &delta, None).await?;
            print(g, &s, || restore_text(&s, &target))?;
            Ok(0)
        }
        Command::Sync {
            source,
            target,
            volume,
            reread,
            block,
            delta,
            from_agent,
            to_agent,
        } => {
            if g.coordinator.is_some() || from_agent.is_some() || to_agent.is_some() {
                return crate::fleet::sync(
                    g,
                    crate::fleet::SyncJob {
                        source,
                        target,
                        volume,
                        reread,
                        block,
                        delta,
                        from_agent,
                        to_agent,
                    },
                )
                .await;
            }
            let started = std::time::Instant::now();
            check_placement(g, &target, Some(&source), delta.delete)?;
            if !block {
                // Before the snapshot: a sync that cannot restore saves none.
                directory_target(&target)?;
            }
            let default_vault = g.vault.is_none();
            let (vault, catalog) = match default_vault {
                false => open(None, g).await?,
                true => open_default_vault(g).await?,
            };
            let volume = volume.unwrap_or_else(|| default_volume(&source));
            // The target is checked beside the snapshot: the restore then
            // plans only the directories that changed.
            let ahead = match block || delta.reread_target {
                true => None,
                false => ferry_fleet::work::check_ahead(vault.clone(), catalog.clone(), &target),
            };
            let mut opts = SnapshotOptions::new(volume);
            opts.reread = reread;
            opts.block = block;
            opts.skip = skip_own_state(g);
            let Synced {
                snapshot: snap_summary,
                restore: rs,
                snapshot_at,
                restore_at,
                ..
            } = snapshot_and_restore(
                vault.clone(),
                catalog.clone(),
                &source,
                &target,
                opts,
                &delta,
                ahead,
                false,
                |_| Ok(()),
                started,
            )
            .await?;
            #[derive(Serialize)]
            struct Out<'a> {
                snapshot_id: &'a str,
                bytes_written: u64,
                duration_s: f64,
                /// The whole sync's phases on one timeline.
                report: Vec<ferry_core::phase::Phase>,
                snapshot: &'a ferry_core::snapshot::SnapshotSummary,
                restore: &'a ferry_core::restore::RestoreSummary,
                /// The default vault's upkeep, after the target is in place.
                upkeep: Option<ferry_core::upkeep::UpkeepSummary>,
            }
            let duration_s = started.elapsed().as_secs_f64();
            let upkeep = match default_vault {
                true => Some(
                    ferry_core::upkeep::upkeep(
                        vault,
                        catalog,
                        &[snap_summary.volume.as_str()],
                        &Default::default(),
                    )
                    .await
                    .context("the default vault's upkeep (the target is in place)")?,
                ),
                false => None,
            };
            let out = Out {
                snapshot_id: &snap_summary.snapshot_id,
                bytes_written: rs.bytes_written,
                duration_s,
                report: sync_report(&snap_summary.report, snapshot_at, &rs.report, restore_at),
                snapshot: &snap_summary,
                restore: &rs,
                upkeep,
            };
            print(g, &out, || {
                format!(
                    "{}\n{}\ncutover report ({:.2}s in all):\n{}{}",
                    snapshot_text(&snap_summary),
                    restore_text(&rs, &target),
                    out.duration_s,
                    ferry_core::phase::table(&out.report),
                    out.upkeep.as_ref().map(upkeep_text).unwrap_or_default()
                )
            })?;
            if let Some(e) = out.upkeep.as_ref().and_then(|u| u.prune_error.as_ref()) {
                eprintln!(
                    "warning: the default vault was not pruned ({e}); the next sync tries again"
                );
            }
            Ok(if snap_summary.incomplete { 3 } else { 0 })
        }
        Command::Coordinator {
            listen,
            tls_cert,
            tls_key,
            lease_seconds,
            metrics_addr,
        } => {
            crate::ui::serve_metrics(metrics_addr)?;
            crate::fleet::coordinator(g, listen, tls_cert, tls_key, lease_seconds).await
        }
        Command::Agent {
            name,
            roots,
            config,
            metrics_addr,
        } => {
            crate::ui::serve_metrics(metrics_addr)?;
            crate::fleet::agent(g, name, roots, config).await
        }
        Command::Agents => crate::fleet::agents(g).await,
        Command::Plan {
            namespace,
            selector,
            storage_class_map,
            kube,
        } => crate::kube::plan(g, &kube, namespace, selector, storage_class_map).await,
        Command::Bucket(cmd) => crate::bucket::run(g, cmd).await,
        Command::Migration(cmd) => crate::migration::run(g, cmd).await,
        Command::Jobs { id } => crate::fleet::jobs(g, id).await,
        Command::Forget {
            snapshot,
            keep_last,
            keep_within,
            dry_run,
        } => {
            let (vault, catalog) = open(None, g).await?;
            let policy = ferry_core::forget::KeepPolicy {
                last: keep_last,
                within: keep_within,
            };
            let now = ferry_core::forget::now_ns();
            let (keep, forget) =
                ferry_core::forget::plan(&catalog.snapshots()?, &snapshot, &policy, now)?;
            let s = ferry_core::forget::forget(&vault, catalog.as_ref(), &keep, &forget, dry_run)
                .await?;
            print(g, &s, || {
                let mut out = String::new();
                for f in &forget {
                    out.push_str(&format!(
                        "{} {} {} {}\n",
                        if dry_run { "would forget" } else { "forgot" },
                        &f.id[..8],
                        f.volume,
                        f.time
                    ));
                }
                out.push_str(&format!(
                    "{} snapshot(s) kept, {} {}",
                    keep.len(),
                    forget.len(),
                    if dry_run {
                        "would be forgotten"
                    } else {
                        "forgotten; run `ferry prune` to reclaim their space"
                    }
                ));
                out
            })?;
            Ok(0)
        }
        Command::Prune {
            dry_run,
            max_repack_ratio,
            lock_wait,
        } => {
            if !(0.0..=1.0).contains(&max_repack_ratio) {
                bail!("--max-repack-ratio {max_repack_ratio}: give a fraction between 0 and 1");
            }
            let (vault, catalog) = open(None, g).await?;
            let opts = ferry_core::prune::PruneOptions {
                dry_run,
                max_repack_ratio,
                lock_wait: std::time::Duration::from_secs(lock_wait),
            };
            let s = ferry_core::prune::prune(vault, catalog, &opts).await?;
            print(g, &s, || {
                format!(
                    "{} {} of {} packs ({} unknown), repacked {} into {}; {} {} ({} of unreferenced data) in {:.1}s",
                    if dry_run { "would delete" } else { "deleted" },
                    s.packs_deleted + s.packs_unknown,
                    s.packs,
                    s.packs_unknown,
                    s.packs_repacked,
                    s.packs_written,
                    if dry_run {
                        "would reclaim"
                    } else {
                        "reclaimed"
                    },
                    human_bytes(s.bytes_reclaimed),
                    human_bytes(s.unreferenced_bytes),
                    s.duration_s
                ) + &match s.staging_removed {
                    0 => String::new(),
                    n => format!(
                        "; {} {n} staging files of killed writes",
                        if dry_run { "would remove" } else { "removed" }
                    ),
                } + &match s.packs_recovered {
                    0 => String::new(),
                    n => format!(
                        "; {} {n} packs no index object listed (they hold what snapshots need)",
                        if dry_run { "would index" } else { "indexed" }
                    ),
                }
            })?;
            Ok(0)
        }
        Command::Catalog(CatalogCmd::Rebuild) => {
            let vault = open_vault(g).await?;
            let path = catalog_path(g, &vault);
            let s = rebuild_catalog(&vault, &path).await?;
            #[derive(Serialize)]
            struct Out<'a> {
                catalog: String,
                #[serde(flatten)]
                summary: &'a ferry_core::sync::SyncSummary,
            }
            print(
                g,
                &Out {
                    catalog: path.display().to_string(),
                    summary: &s,
                },
                || {
                    format!(
                        "rebuilt catalog {}: {} index objects, {} packs from headers, {} snapshots",
                        path.display(),
                        s.index_objects,
                        s.packs_from_headers,
                        s.snapshots
                    )
                },
            )?;
            Ok(0)
        }
    }
}

pub(crate) fn snapshot_text(s: &ferry_core::snapshot::SnapshotSummary) -> String {
    format!(
        "snapshot {} of {} saved: {} files ({} unchanged), {} read, {} new, {} uploaded in {:.1}s \
         (scan {:.1}s, upload done {:.1}s, commit {:.1}s){}",
        &s.snapshot_id[..8],
        s.volume,
        s.files,
        s.files_unchanged,
        human_bytes(s.bytes_scanned),
        human_bytes(s.bytes_new),
        human_bytes(s.bytes_uploaded),
        s.duration_s,
        s.phases.scan_s,
        s.phases.upload_s,
        s.phases.commit_s,
        if s.incomplete {
            format!(" (INCOMPLETE: {} warnings)", s.warnings)
        } else {
            String::new()
        }
    ) + "\n"
        + &skipped_state_text(&s.skipped_state)
        + &ferry_core::phase::table(&s.report)
}

/// Only when the upkeep did something.
pub(crate) fn upkeep_text(u: &ferry_core::upkeep::UpkeepSummary) -> String {
    let mut out = String::new();
    if !u.forgotten.is_empty() {
        out.push_str(&format!(
            "\ndefault vault: forgot {} older snapshot(s)",
            u.forgotten.len()
        ));
    }
    if let Some(p) = &u.pruned {
        out.push_str(&format!(
            "\ndefault vault: pruned (it held {}, over {}): {} reclaimed in {:.1}s",
            human_bytes(u.pack_bytes),
            human_bytes(u.limit_bytes),
            human_bytes(p.bytes_reclaimed),
            p.duration_s
        ));
    }
    out
}

/// Ferry's own state found in the source is named, so nobody wonders where
/// it went in the copy.
fn skipped_state_text(paths: &[String]) -> String {
    match paths {
        [] => String::new(),
        p => format!("left out ferry's own state: {}\n", p.join(", ")),
    }
}

pub(crate) fn restore_text(s: &ferry_core::restore::RestoreSummary, target: &Path) -> String {
    let p = &s.phases;
    format!(
        "restored snapshot {} of {} into {}: {} files written ({} patched), {} unchanged, {} deleted, {} extra; {} written in {:.1}s \
         (plan {:.1}s, transfer {:.1}s, finish {:.1}s, verify {:.1}s){}",
        &s.snapshot_id[..8],
        s.volume,
        target.display(),
        s.files_written,
        s.files_patched,
        s.files_unchanged,
        s.files_deleted,
        s.extra_entries,
        human_bytes(s.bytes_written),
        s.duration_s,
        p.plan_s,
        p.transfer_s,
        p.finish_s,
        p.verify_s,
        if s.files_verified > 0 {
            format!("; verified {} files", s.files_verified)
        } else {
            String::new()
        }
    ) + "\n"
        + &ferry_core::phase::table(&s.report)
}

/// "; changed while read: a, b (+N more)" for the incomplete-snapshot warning.
pub(crate) fn unstable_text(unstable: &[String]) -> String {
    if unstable.is_empty() {
        return String::new();
    }
    let more = unstable.len().saturating_sub(5);
    format!(
        " or changed while read (quiesce the application): {}{}",
        unstable[..unstable.len().min(5)].join(", "),
        if more > 0 {
            format!(" (+{more} more)")
        } else {
            String::new()
        }
    )
}

/// A sync's cutover report: the snapshot's phases, then the restore's, on
/// the sync's timeline (their clocks began `snapshot_at` and `restore_at`
/// seconds into it).
pub(crate) fn sync_report(
    snapshot: &[ferry_core::phase::Phase],
    snapshot_at: f64,
    restore: &[ferry_core::phase::Phase],
    restore_at: f64,
) -> Vec<ferry_core::phase::Phase> {
    snapshot
        .iter()
        .cloned()
        .map(|p| p.shifted(snapshot_at))
        .chain(restore.iter().cloned().map(|p| p.shifted(restore_at)))
        .collect()
}

/// What [`snapshot_and_restore`] did.
pub(crate) struct Synced {
    pub snapshot: ferry_core::snapshot::SnapshotSummary,
    /// The committed snapshot's record.
    pub record: ferry_core::manifest::SnapshotRecord,
    pub restore: ferry_core::restore::RestoreSummary,
    /// When the snapshot's and the restore's clocks started, in seconds
    /// from `started`.
    pub snapshot_at: f64,
    pub restore_at: f64,
}

/// A snapshot of `source` and the delta restore of it into `target`, the
/// way `ferry sync` and a migration round move a directory. A directory
/// snapshot tells its root tree as soon as every tree is in the catalog:
/// the restore plans the changed directories while the snapshot's last
/// packs upload, and fetches once the snapshot is committed. `check` sees
/// the snapshot's summary before the restore's result is taken. With
/// `whole_only` (a cutover), a snapshot that missed entries (the source
/// changed under the reader) is not restored at all: the restore does not
/// start early, and `check` refuses it before the target is touched.
/// `ahead` is the target's check, started beside the snapshot.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn snapshot_and_restore(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    source: &Path,
    target: &Path,
    mut opts: SnapshotOptions,
    delta: &crate::DeltaArgs,
    mut ahead: Option<ferry_fleet::work::CheckAhead>,
    whole_only: bool,
    check: impl FnOnce(&ferry_core::snapshot::SnapshotSummary) -> Result<()>,
    started: std::time::Instant,
) -> Result<Synced> {
    let bar = Arc::new(Bar::new("snapshot"));
    let (root_tx, root_rx) = tokio::sync::oneshot::channel();
    let root_tx = Arc::new(std::sync::Mutex::new(Some(root_tx)));
    let take_root = |t: &std::sync::Mutex<Option<_>>| t.lock().ok().and_then(|mut t| t.take());
    if !opts.block {
        let root_tx = root_tx.clone();
        opts.on_trees = Some(ferry_core::snapshot::OnTrees(Arc::new(
            move |root, complete| {
                let tx = take_root(&root_tx);
                if let (Some(tx), true) = (tx, complete || !whole_only) {
                    let _ = tx.send(root);
                }
            },
        )));
    }
    let (record_tx, record_rx) = tokio::sync::oneshot::channel();
    // Its own task: the restore's plan works between its awaits, and must
    // not hold up the snapshot's last uploads and commit.
    let snapshot = tokio::spawn({
        let (vault, catalog, source) = (vault.clone(), catalog.clone(), source.to_path_buf());
        let (bar, root_tx) = (bar.clone(), root_tx.clone());
        async move {
            let r = ferry_fleet::work::snapshot(
                vault.clone(),
                catalog.clone(),
                &source,
                &opts,
                bar.clone(),
            )
            .await;
            bar.finish();
            // Without a root told (a block snapshot, or one that failed),
            // the restore does not start early.
            drop(take_root(&root_tx));
            let record = r.as_ref().ok().and_then(|s| {
                ferry_core::sync::find_snapshot(
                    catalog.as_ref(),
                    &format!("{}@{}", s.volume, s.snapshot_id),
                )
                .ok()
            });
            let _ = record_tx.send(record.clone());
            (r, record)
        }
    });
    drop(root_tx);
    let early = async {
        let root = root_rx.await.ok()?;
        let checked = match ahead.take() {
            Some(a) => a.finish().await,
            None => None,
        };
        let bar = Arc::new(Bar::hidden("restore"));
        let shown = bar.clone();
        let record: ferry_core::restore::Committing = Box::pin(async move {
            let r = record_rx
                .await
                .ok()
                .flatten()
                .filter(|r| !(whole_only && r.incomplete))
                .ok_or_else(|| {
                    ferry_core::Error::Internal("the snapshot was not committed whole".into())
                });
            // The snapshot's bar is finished by now.
            shown.show();
            r
        });
        let restore_at = started.elapsed().as_secs_f64();
        let r = ferry_fleet::work::restore_committing(
            vault.clone(),
            catalog.clone(),
            root,
            record,
            target,
            &restore_options(delta, checked),
            bar.clone(),
        )
        .await;
        bar.finish();
        Some((r, restore_at))
    };
    let early = early.await;
    let (snapshotted, record) = snapshot.await.context("the snapshot task failed")?;
    let snapshot = snapshotted?;
    check(&snapshot)?;
    let Some(record) = record else {
        bail!("snapshot {} is not in the catalog", snapshot.snapshot_id);
    };
    let (restore, restore_at) = match early {
        Some((r, at)) => (r?, at),
        None => {
            let restore_at = started.elapsed().as_secs_f64();
            let checked = match ahead {
                Some(a) => a.finish().await,
                None => None,
            };
            let rs = restore_into(vault, catalog, &record, target, delta, checked).await?;
            (rs, restore_at)
        }
    };
    // Each side's phases count from its own clock, started inside it
    // (after the lock, the catalog sync): put them on the sync's from there.
    let since = |at: Option<std::time::Instant>, otherwise: f64| {
        at.map_or(otherwise, |at| {
            at.saturating_duration_since(started).as_secs_f64()
        })
    };
    Ok(Synced {
        snapshot_at: since(snapshot.started, 0.0),
        restore_at: since(restore.started, restore_at),
        snapshot,
        record,
        restore,
    })
}

pub(crate) async fn restore_into(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    snap: &ferry_core::manifest::SnapshotRecord,
    target: &Path,
    delta: &crate::DeltaArgs,
    checked: Option<Arc<ferry_core::restore::ahead::Checked>>,
) -> Result<ferry_core::restore::RestoreSummary> {
    let opts = restore_options(delta, checked);
    let bar = Arc::new(Bar::new("restore"));
    let r = ferry_fleet::work::restore(vault, catalog, snap, target, &opts, bar.clone()).await;
    bar.finish();
    Ok(r?)
}

/// The restore options of `ferry sync` and `ferry restore`.
fn restore_options(
    delta: &crate::DeltaArgs,
    checked: Option<Arc<ferry_core::restore::ahead::Checked>>,
) -> RestoreOptions {
    RestoreOptions {
        delete: delta.delete,
        verify: delta.verify,
        reread_target: delta.reread_target,
        no_lock: delta.no_lock,
        batch_files: delta.batch_files as usize,
        checked,
        ..Default::default()
    }
}

/// The volume name `ferry sync` uses when none is given: stable per source.
pub(crate) fn default_volume(source: &Path) -> String {
    let canon = std::fs::canonicalize(source).unwrap_or_else(|_| source.to_path_buf());
    // Whatever the directory is called, the name is a valid volume name.
    let base: String = canon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
        .chars()
        .map(|c| if c == '@' || c.is_control() { '_' } else { c })
        .take(64)
        .collect();
    let h = ferry_core::id::short_hash(canon.as_os_str().as_encoded_bytes());
    format!("{base}-{h}")
}

/// A directory restore's target is a directory (or a link to one), or is
/// yet to be made.
fn directory_target(target: &Path) -> Result<()> {
    match std::fs::metadata(target) {
        Ok(md) if !md.is_dir() => bail!(
            "target {} exists and is not a directory: a directory snapshot restores into a directory",
            target.display()
        ),
        Err(_) if std::fs::symlink_metadata(target).is_ok() => bail!(
            "target {} is a link to nothing: give a directory",
            target.display()
        ),
        _ => Ok(()),
    }
}

/// Refuses a target that is, holds or lies inside its source, or that
/// overlaps what ferry keeps its own state in (see
/// [`ferry_core::placement`]): the state directory (default vault,
/// catalogs, the targets' memories), a local `--vault`, a `--catalog`.
pub(crate) fn check_placement(
    g: &Global,
    target: &Path,
    source: Option<&Path>,
    delete: bool,
) -> Result<()> {
    let own = own_state(g);
    let keep: Vec<(&str, &Path)> = own.iter().map(|(l, p)| (*l, p.as_path())).collect();
    ferry_core::placement::check_target(target, source, &keep, delete)?;
    Ok(())
}

/// Ferry's own state on this machine: the state directory (default vault,
/// catalogs, target memories), a local `--vault` and a `--catalog`. A
/// restore never lands in it, a snapshot leaves it out.
pub(crate) fn own_state(g: &Global) -> Vec<(&'static str, PathBuf)> {
    let mut own = vec![("ferry's state directory", ferry_catalog::state_dir())];
    if let Some(Ok(Location::Local(p))) = g.vault.as_deref().map(Location::parse) {
        own.push(("the vault", p));
    }
    if let Some(c) = &g.catalog {
        own.push(("the catalog", c.clone()));
    }
    own
}

/// What a snapshot on this machine leaves out of its source: ferry's own
/// state, with the catalog's SQLite companions.
pub(crate) fn skip_own_state(g: &Global) -> Vec<PathBuf> {
    let mut skip: Vec<PathBuf> = own_state(g).into_iter().map(|(_, p)| p).collect();
    if let Some(c) = &g.catalog {
        for ext in ["-wal", "-shm", "-journal"] {
            let mut p = c.clone().into_os_string();
            p.push(ext);
            skip.push(p.into());
        }
    }
    skip
}

/// The embedded default vault of `ferry sync`: a local vault under the state
/// directory, with a random key in a 0600 file beside it (no passphrase to
/// choose for the simplest migration).
fn default_vault_exists() -> bool {
    let dir = ferry_catalog::state_dir();
    dir.join("default-vault.key").exists() && dir.join("default-vault/config").exists()
}

/// Vault objects the catalog could not take in, one line each on stderr
/// (commands log nothing below errors otherwise).
pub(crate) fn warn_damaged(s: &ferry_core::sync::SyncSummary) {
    // A command may sync more than once: each object is named once.
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
    for d in &s.damaged {
        if said.contains(d) {
            continue;
        }
        said.push(d.clone());
        eprintln!(
            "warning: vault object {d}; left out (`ferry vault check` lists what is damaged)"
        );
    }
}

/// The vault alone, without its catalog: the one named, else the one
/// `ferry sync` made (when it exists).
async fn open_vault(g: &Global) -> Result<Vault> {
    if g.vault.is_none() && default_vault_exists() {
        let key_file = ferry_catalog::state_dir().join("default-vault.key");
        let pass =
            std::fs::read(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let loc = Location::Local(ferry_catalog::state_dir().join("default-vault"));
        return Ok(Vault::open(&loc, &pass).await?);
    }
    let loc = location_of(None, g)?;
    Ok(Vault::open(&loc, &passphrase(g)?).await?)
}

/// Builds a new catalog of `vault` beside `path` and renames it over the
/// old one once it is complete: a rebuild that fails keeps the old
/// catalog. Only a catalog is ever replaced: a file that is not an SQLite
/// database (a mistyped `--catalog`, a vault's own config) or the catalog of
/// another vault is refused, never overwritten.
async fn rebuild_catalog(vault: &Vault, path: &Path) -> Result<ferry_core::sync::SyncSummary> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("catalog {}", path.display())),
        Ok(md) if !md.is_file() => {
            bail!(
                "{} is not a catalog file: refusing to replace it",
                path.display()
            )
        }
        Ok(_) => {
            let mut head = [0u8; 16];
            let n = std::io::Read::read(
                &mut std::fs::File::open(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                &mut head,
            )
            .with_context(|| format!("reading {}", path.display()))?;
            if n > 0 && head[..n] != b"SQLite format 3\0"[..n] {
                bail!(
                    "{} is not a catalog (not an SQLite database): refusing to replace it; \
                     name another --catalog path",
                    path.display()
                );
            }
            // A catalog too damaged to open is what a rebuild is for; one
            // that opens must be this vault's.
            if let Err(e @ ferry_catalog::Error::OtherVault { .. }) =
                SqliteCatalog::open(path, vault.id())
            {
                bail!("{e}: refusing to replace it");
            }
        }
    }
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        PathBuf::from(p)
    };
    let fresh = with(&format!(".rebuild-{}", std::process::id()));
    let remove = |p: &Path| match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", p.display()))
        }
        _ => Ok(()),
    };
    let built = async {
        let (catalog, _) = SqliteCatalog::open(&fresh, vault.id())?;
        let s = ferry_core::sync::sync_catalog(vault, &catalog, true).await?;
        warn_damaged(&s);
        drop(catalog);
        anyhow::Ok(s)
    }
    .await;
    let s = match built {
        Ok(s) => s,
        Err(e) => {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = fresh.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
    };
    // The old catalog's log must not be replayed into the new one.
    for suffix in ["-wal", "-shm"] {
        remove(&with(suffix))?;
    }
    for suffix in ["-wal", "-shm", ""] {
        let mut from = fresh.clone().into_os_string();
        from.push(suffix);
        let from = PathBuf::from(from);
        if suffix.is_empty() || from.exists() {
            std::fs::rename(&from, with(suffix))
                .with_context(|| format!("renaming {} into place", from.display()))?;
        }
    }
    Ok(s)
}

pub(crate) async fn open_default_vault(g: &Global) -> Result<(Arc<Vault>, Arc<dyn Catalog>)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = ferry_catalog::state_dir();
    let vault_dir = dir.join("default-vault");
    let key_file = dir.join("default-vault.key");
    if !key_file.exists() {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = hex_key();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .with_context(|| format!("creating {}", key_file.display()))?;
        std::io::Write::write_all(&mut f, key.as_bytes())?;
    }
    let pass =
        std::fs::read(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
    let loc = Location::Local(vault_dir.clone());
    if !vault_dir.join("config").exists() {
        // The key file holds 256 random bits: stretching it would only cost
        // every sync a quarter of a second.
        let mut opts = VaultOptions::default();
        opts.kdf.m_kib = 64;
        opts.kdf.t = 1;
        Vault::init(&loc, &pass, &opts).await?;
    }
    let vault = Vault::open(&loc, &pass).await?;
    let path = catalog_path(g, &vault);
    let (catalog, fresh) = SqliteCatalog::open(&path, vault.id())?;
    warn_damaged(&ferry_core::sync::sync_catalog(&vault, &catalog, fresh).await?);
    Ok((Arc::new(vault), Arc::new(catalog)))
}

fn hex_key() -> String {
    let mut b = [0u8; 32];
    ferry_core::keys::fill_random(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn location_of(positional: Option<&str>, g: &Global) -> Result<Location> {
    let s = positional
        .or(g.vault.as_deref())
        .ok_or_else(|| {
            anyhow!(
                "no vault given: pass --vault VAULT or set FERRY_VAULT (ferry sync's default vault is used once it exists)"
            )
        })?;
    Ok(Location::parse(s)?)
}

pub(crate) fn passphrase(g: &Global) -> Result<Vec<u8>> {
    if let Some(f) = &g.passphrase_file {
        let s =
            std::fs::read(f).with_context(|| format!("reading passphrase file {}", f.display()))?;
        let line = s.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            bail!("passphrase file {} is empty", f.display());
        }
        return Ok(line.to_vec());
    }
    match std::env::var_os("FERRY_PASSPHRASE") {
        Some(p) if !p.is_empty() => {
            use std::os::unix::ffi::OsStrExt;
            Ok(p.as_bytes().to_vec())
        }
        _ => bail!("no passphrase: set FERRY_PASSPHRASE or pass --passphrase-file FILE"),
    }
}

pub(crate) fn catalog_path(g: &Global, vault: &Vault) -> std::path::PathBuf {
    g.catalog
        .clone()
        .unwrap_or_else(|| ferry_catalog::default_path(vault.id()))
}

/// Opens the vault and its embedded catalog, bringing the catalog up to
/// date with the vault (a new catalog is filled from the vault).
pub(crate) async fn open(
    positional: Option<&str>,
    g: &Global,
) -> Result<(Arc<Vault>, Arc<dyn Catalog>)> {
    // No vault named: the one `ferry sync` made, if it did (its snapshots
    // are listed, restored, forgotten and pruned like any vault's).
    if positional.is_none() && g.vault.is_none() && default_vault_exists() {
        return open_default_vault(g).await;
    }
    let loc = location_of(positional, g)?;
    let vault = Vault::open(&loc, &passphrase(g)?).await?;
    let path = catalog_path(g, &vault);
    let (catalog, fresh) = SqliteCatalog::open(&path, vault.id())?;
    warn_damaged(&ferry_core::sync::sync_catalog(&vault, &catalog, fresh).await?);
    Ok((Arc::new(vault), Arc::new(catalog)))
}

/// JSON on stdout with --json, else the human text.
pub(crate) fn print<T: Serialize>(
    g: &Global,
    value: &T,
    human: impl FnOnce() -> String,
) -> Result<()> {
    if g.json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{}", human());
    }
    Ok(())
}
