//! `ferry bucket sync`.

use std::sync::Arc;

use anyhow::{Result, bail};
use ferry_bucket::config::Config;
use ferry_bucket::location::Location;
use ferry_bucket::objects::BucketObjects;
use ferry_bucket::sync::SyncOptions;
use ferry_catalog::bucket::SqliteSyncState;
use ferry_fleet::spec::{BucketJob, JobSpec};
use serde::Serialize;
use serde_json::Value;

use crate::commands::print;
use crate::ui::{Bar, human_bytes, printable};
use crate::{BucketCmd, Global};

pub async fn run(g: &Global, cmd: BucketCmd) -> Result<u8> {
    match cmd {
        BucketCmd::Report { job, limit } => report(g, job, limit).await,
        BucketCmd::Rerun { job, wait } => rerun(g, job, wait).await,
        BucketCmd::Sync {
            src,
            dst,
            workers,
            since,
            include,
            exclude,
            delete,
            verify,
            dry_run,
            bandwidth,
            tags,
            storage_class,
            config,
            wait,
            task_objects,
            task_bytes,
        } => {
            if workers == 0 {
                bail!("--workers must be at least 1");
            }
            let cfg = Config::load(config.as_deref())?;
            let (sl, dl) = (Location::parse(&src, &cfg)?, Location::parse(&dst, &cfg)?);
            if sl.overlaps(&dl) {
                bail!(
                    "{dst} overlaps the source {src}: each run would copy the copy again; \
                     choose a destination outside the source"
                );
            }
            let since_ns = since
                .as_deref()
                .map(ferry_bucket::sync::parse_since)
                .transpose()?;
            ferry_bucket::sync::check_patterns(&include)?;
            ferry_bucket::sync::check_patterns(&exclude)?;
            if g.coordinator.is_some() {
                if dry_run {
                    bail!("--dry-run plans on this machine: drop --coordinator");
                }
                for l in [&sl, &dl] {
                    if let Location::Local(p) = l
                        && !p.is_absolute()
                    {
                        bail!(
                            "{}: give an absolute path (the tasks run on the agents' nodes)",
                            p.display()
                        );
                    }
                }
                let job = BucketJob {
                    source: src,
                    destination: dst,
                    workers,
                    since_ns,
                    include,
                    exclude,
                    delete,
                    verify,
                    bandwidth,
                    part_size: SyncOptions::default().part_size,
                    tags,
                    storage_class,
                    task_objects: task_objects.max(1),
                    task_bytes: task_bytes.max(1),
                };
                return distributed(g, job, wait).await;
            }
            let opts = SyncOptions {
                workers,
                since_ns,
                include,
                exclude,
                delete,
                verify,
                dry_run,
                bandwidth,
                tags,
                storage_class,
                ..Default::default()
            };
            local(g, &cfg, sl, dl, opts).await
        }
    }
}

async fn local(
    g: &Global,
    cfg: &Config,
    sl: Location,
    dl: Location,
    opts: SyncOptions,
) -> Result<u8> {
    let dry_run = opts.dry_run;
    let cfg = cfg.clone();
    let (src_side, dst_side) = (
        ferry_bucket::store::open(&sl, &cfg).await?,
        ferry_bucket::store::open(&dl, &cfg).await?,
    );
    let state = Arc::new(SqliteSyncState::open(
        &ferry_catalog::bucket::default_path(&sl.to_string(), &dl.to_string()),
    )?);
    let dst_side = Arc::new(dst_side);
    let bar = Arc::new(Bar::new("bucket sync"));
    let run = ferry_bucket::sync::sync(
        Arc::new(src_side),
        dst_side.clone(),
        state.clone(),
        &opts,
        bar.clone(),
        (sl.to_string(), dl.to_string()),
    );
    // Ctrl-C or SIGTERM: stop copying and abort the multipart uploads this
    // run opened, so no partial upload is left behind (a kill -9 leaves them
    // recorded, and the next run aborts them first).
    let r = tokio::select! {
        r = run => r,
        code = crate::fleet::interrupted() => {
            bar.finish();
            match ferry_bucket::sync::abort_open_uploads(&dst_side, state.as_ref(), |_| true).await {
                Ok(n) => eprintln!(
                    "interrupted: {n} open multipart upload(s) aborted; run the same command again to resume"
                ),
                Err(e) => eprintln!(
                    "interrupted: open multipart uploads not aborted ({e}); the next run of the same command aborts them"
                ),
            }
            return Ok(code);
        }
    };
    bar.finish();
    let s = r?;
    print(g, &s, || {
        let mut out = String::new();
        for p in &s.plan {
            out.push_str(&format!(
                "would {} {} ({})\n",
                p.action,
                printable(&p.key),
                human_bytes(p.size)
            ));
        }
        for f in &s.failed {
            // Errors about one key often name it already.
            let why = f
                .error
                .strip_prefix(&format!("{}: ", f.key))
                .unwrap_or(&f.error);
            out.push_str(&format!(
                "failed: {}: {}\n",
                printable(&f.key),
                printable(why)
            ));
        }
        for k in &s.mismatched {
            out.push_str(&format!("differs after copy: {}\n", printable(k)));
        }
        out.push_str(&format!(
            "{}: listed {}, {} {} ({}{}), skipped {}, {} {}, failed {} in {:.1}s",
            if dry_run { "dry run" } else { "bucket sync" },
            s.objects_listed,
            if dry_run { "would copy" } else { "copied" },
            if dry_run {
                s.plan.iter().filter(|p| p.action == "copy").count() as u64
            } else {
                s.objects_copied
            },
            human_bytes(s.bytes_copied),
            if s.objects_copied_server_side > 0 {
                format!(", {} server-side", s.objects_copied_server_side)
            } else {
                String::new()
            },
            s.objects_skipped,
            if dry_run { "would delete" } else { "deleted" },
            if dry_run {
                s.plan.iter().filter(|p| p.action == "delete").count() as u64
            } else {
                s.objects_deleted
            },
            s.objects_failed,
            s.duration_s
        ));
        if s.objects_unsupported > 0 {
            out.push_str(&format!(
                "\n{} source entries skipped: symlinks, special files or names that are not UTF-8 (listed above)",
                s.objects_unsupported
            ));
        }
        out
    })?;
    if !s.mismatched.is_empty() || !s.failed.is_empty() {
        let keys: Vec<&str> = s
            .mismatched
            .iter()
            .map(String::as_str)
            .chain(s.failed.iter().map(|f| f.key.as_str()))
            .take(10)
            .collect();
        eprintln!(
            "error: {} object(s) failed or differ: {}{}",
            s.mismatched.len() + s.failed.len(),
            printable(&keys.join(", ")),
            if s.mismatched.len() + s.failed.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
        return Ok(1);
    }
    Ok(0)
}

/// Submits the sync as a distributed job; with `wait`, follows it.
async fn distributed(g: &Global, job: BucketJob, wait: bool) -> Result<u8> {
    let client = crate::fleet::fleet_client(g)?;
    let info = client.submit("", &JobSpec::BucketSync(job)).await?;
    if !wait {
        #[derive(Serialize)]
        struct Out<'a> {
            job: u64,
            kind: &'a str,
            state: &'a str,
        }
        print(
            g,
            &Out {
                job: info.id,
                kind: &info.kind,
                state: &info.state,
            },
            || {
                format!(
                    "job {} (bucket sync) queued for any agent; `ferry bucket report {}` follows it",
                    info.id, info.id
                )
            },
        )?;
        return Ok(0);
    }
    crate::fleet::follow(&client, &info).await?;
    report(g, info.id, 1000).await
}

async fn rerun(g: &Global, job: u64, wait: bool) -> Result<u8> {
    let client = crate::fleet::fleet_client(g)?;
    let before = client.report(job, 0).await?;
    let failed = before.tasks_failed;
    let info = client.rerun(job).await?;
    if !wait {
        #[derive(Serialize)]
        struct Out<'a> {
            job: u64,
            tasks_queued: u64,
            state: &'a str,
        }
        print(
            g,
            &Out {
                job,
                tasks_queued: failed,
                state: &info.state,
            },
            || format!("job {job}: {failed} failed task(s) queued again"),
        )?;
        return Ok(0);
    }
    crate::fleet::follow(&client, &info).await?;
    report(g, job, 1000).await
}

/// `ferry bucket report JOB`: exit 0 when the job is done with nothing
/// failed, 1 when it failed, 2 while it still runs.
async fn report(g: &Global, job: u64, limit: u32) -> Result<u8> {
    let client = crate::fleet::fleet_client(g)?;
    let r = client.report(job, limit).await?;
    let info = r.job.clone().unwrap_or_default();
    let totals: serde_json::Map<String, Value> =
        serde_json::from_str(&r.totals_json).unwrap_or_default();
    let num = |k: &str| totals.get(k).and_then(Value::as_u64).unwrap_or(0);
    let spec = match serde_json::from_str::<JobSpec>(&info.spec_json) {
        Ok(JobSpec::BucketSync(b)) => Some(b),
        _ => None,
    };
    #[derive(Serialize)]
    struct Tasks {
        queued: u64,
        running: u64,
        done: u64,
        failed: u64,
    }
    #[derive(Serialize)]
    struct Failure<'a> {
        key: &'a str,
        error: &'a str,
    }
    #[derive(Serialize)]
    struct Out<'a> {
        job: u64,
        state: &'a str,
        source: &'a str,
        destination: &'a str,
        tasks: Tasks,
        objects_listed: u64,
        objects_copied: u64,
        objects_skipped: u64,
        objects_deleted: u64,
        objects_failed: u64,
        objects_unsupported: u64,
        bytes_copied: u64,
        duration_s: u64,
        failed: Vec<Failure<'a>>,
    }
    let end = if info.finished > 0 {
        info.finished
    } else {
        (ferry_catalog::jobs::now_ms() / 1000).max(info.created)
    };
    let out = Out {
        job,
        state: &info.state,
        source: spec.as_ref().map(|s| s.source.as_str()).unwrap_or(""),
        destination: spec.as_ref().map(|s| s.destination.as_str()).unwrap_or(""),
        tasks: Tasks {
            queued: r.tasks_queued,
            running: r.tasks_running,
            done: r.tasks_done,
            failed: r.tasks_failed,
        },
        objects_listed: num("objects_listed"),
        objects_copied: num("objects_copied"),
        objects_skipped: num("objects_skipped"),
        objects_deleted: num("objects_deleted"),
        objects_failed: r.keys_failed,
        objects_unsupported: num("objects_unsupported"),
        bytes_copied: num("bytes_copied"),
        duration_s: (end - info.created).max(0) as u64,
        failed: r
            .failures
            .iter()
            .map(|f| Failure {
                key: &f.key,
                error: &f.error,
            })
            .collect(),
    };
    print(g, &out, || {
        let mut s = format!(
            "job {job} ({} -> {}): {}\ntasks: {} done, {} running, {} queued, {} failed\n\
             listed {}, copied {} ({}), skipped {}, deleted {}, failed {} in {}s",
            out.source,
            out.destination,
            out.state,
            out.tasks.done,
            out.tasks.running,
            out.tasks.queued,
            out.tasks.failed,
            out.objects_listed,
            out.objects_copied,
            human_bytes(out.bytes_copied),
            out.objects_skipped,
            out.objects_deleted,
            out.objects_failed,
            out.duration_s
        );
        if out.objects_unsupported > 0 {
            s.push_str(&format!(
                "\n{} source entries skipped: symlinks, special files or names that are not UTF-8",
                out.objects_unsupported
            ));
        }
        if !info.error.is_empty() {
            s.push_str(&format!("\n{}", info.error));
        }
        for f in &out.failed {
            s.push_str(&format!(
                "\nfailed: {}: {}",
                printable(f.key),
                printable(f.error)
            ));
        }
        if r.keys_failed > out.failed.len() as u64 {
            s.push_str(&format!(
                "\n... and {} more (--limit)",
                r.keys_failed - out.failed.len() as u64
            ));
        }
        if info.state == "failed" {
            s.push_str(&format!(
                "\n`ferry bucket rerun {job}` runs the failed tasks again"
            ));
        }
        s
    })?;
    Ok(match info.state.as_str() {
        "done" => 0,
        "failed" => 1,
        _ => 2,
    })
}

/// The REMOTE of a `REMOTE:bucket/prefix` argument, if it has that shape.
/// A remote's name has no '/': `./a:b` and `/x:y` stay paths.
pub fn remote_name(s: &str) -> Option<&str> {
    s.split_once(':')
        .map(|(name, _)| name)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// Whether `s` names a bucket: `s3://...`, or a remote of `cfg`.
pub fn names_bucket(s: &str, cfg: &Config) -> bool {
    s.starts_with("s3://") || remote_name(s).is_some_and(|n| cfg.remotes.contains_key(n))
}

/// A bucket named by `arg` (`s3://...`, or `REMOTE:...` with a remote of
/// the config file), as a snapshot source or restore target; `None` for a
/// local path.
pub async fn objects_at(
    arg: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<Option<BucketObjects>> {
    let Some(s) = arg.to_str() else {
        return Ok(None);
    };
    if !s.starts_with("s3://") && remote_name(s).is_none() {
        return Ok(None);
    }
    let cfg = Config::load(config)?;
    if !names_bucket(s, &cfg) {
        return Ok(None);
    }
    let loc = Location::parse(s, &cfg)?;
    let side = ferry_bucket::store::open(&loc, &cfg).await?;
    side.probe(false, false).await?;
    Ok(Some(BucketObjects::new(
        side,
        loc.to_string(),
        tokio::runtime::Handle::current(),
    )))
}

/// `ferry snapshot BUCKET --volume NAME`.
pub async fn snapshot(
    g: &Global,
    objects: BucketObjects,
    volume: String,
    reread: bool,
) -> Result<u8> {
    let (vault, catalog) = crate::commands::open(None, g).await?;
    let mut opts = ferry_core::snapshot::SnapshotOptions::new(volume);
    opts.reread = reread;
    let s = snapshot_into(vault, catalog, objects, &opts).await?;
    print(g, &s, || crate::commands::snapshot_text(&s))?;
    if s.incomplete {
        eprintln!(
            "warning: snapshot {} is incomplete: {} objects could not be read or named",
            &s.snapshot_id[..8],
            s.warnings
        );
        return Ok(3);
    }
    Ok(0)
}

/// Saves a bucket as a snapshot, with a progress bar.
pub async fn snapshot_into(
    vault: Arc<ferry_core::vault::Vault>,
    catalog: Arc<dyn ferry_core::catalog::Catalog>,
    objects: BucketObjects,
    opts: &ferry_core::snapshot::SnapshotOptions,
) -> Result<ferry_core::snapshot::SnapshotSummary> {
    let bar = Arc::new(Bar::new("snapshot"));
    let r = ferry_core::snapshot::snapshot_objects(
        vault,
        catalog,
        Arc::new(objects),
        opts,
        bar.clone(),
    )
    .await;
    bar.finish();
    Ok(r?)
}

/// Restores a snapshot into a bucket, with the target's memory and a
/// progress bar.
pub async fn restore_into(
    vault: Arc<ferry_core::vault::Vault>,
    catalog: Arc<dyn ferry_core::catalog::Catalog>,
    snap: &ferry_core::manifest::SnapshotRecord,
    objects: BucketObjects,
    opts: &ferry_core::restore::objects::ObjectRestoreOptions,
) -> Result<ferry_core::restore::objects::ObjectRestoreSummary> {
    use ferry_core::objects::ObjectSink;
    let target = ObjectSink::name(&objects);
    let state = SqliteSyncState::open(&ferry_catalog::bucket::default_path(
        "restore",
        &format!("{}\n{target}", vault.id()),
    ))?;
    let bar = Arc::new(Bar::new("restore"));
    let r = ferry_core::restore::objects::restore_objects(
        vault,
        catalog,
        snap,
        Arc::new(objects),
        Arc::new(state),
        opts,
        bar.clone(),
    )
    .await;
    bar.finish();
    Ok(r?)
}

/// `ferry restore NAME BUCKET`.
pub async fn restore(
    g: &Global,
    snapshot: &str,
    objects: BucketObjects,
    delta: &crate::DeltaArgs,
) -> Result<u8> {
    if delta.reread_target {
        bail!("--reread-target is for directories; a bucket's objects are compared by their etags");
    }
    let (vault, catalog) = crate::commands::open(None, g).await?;
    let snap = ferry_core::sync::find_snapshot(catalog.as_ref(), snapshot)?;
    let opts = ferry_core::restore::objects::ObjectRestoreOptions {
        delete: delta.delete,
        verify: delta.verify,
        no_lock: delta.no_lock,
        ..Default::default()
    };
    let s = restore_into(vault, catalog, &snap, objects, &opts).await?;
    print(g, &s, || {
        let mut out = String::new();
        for (k, e) in &s.failed {
            out.push_str(&format!("failed: {k}: {e}\n"));
        }
        for k in &s.mismatched {
            out.push_str(&format!("differs after writing: {k}\n"));
        }
        out.push_str(&format!(
            "restored {} into {}: {} objects, {} unchanged, {} written ({}), {} deleted{}{} in {:.1}s",
            &s.snapshot_id[..8],
            s.target,
            s.files,
            s.files_unchanged,
            s.files_written,
            human_bytes(s.bytes_written),
            s.files_deleted,
            if s.files_extra > 0 {
                format!(", {} extra left (--delete removes them)", s.files_extra)
            } else {
                String::new()
            },
            if s.skipped > 0 {
                format!(", {} entries a bucket cannot hold skipped", s.skipped)
            } else {
                String::new()
            },
            s.duration_s
        ));
        out
    })?;
    if !s.failed.is_empty() || !s.mismatched.is_empty() {
        eprintln!(
            "error: {} object(s) failed or differ",
            s.failed.len() + s.mismatched.len()
        );
        return Ok(1);
    }
    Ok(0)
}
