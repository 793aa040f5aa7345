//! `ferry bucket sync`.

use std::sync::Arc;

use anyhow::{Result, bail};
use ferry_bucket::config::Config;
use ferry_bucket::location::Location;
use ferry_bucket::sync::SyncOptions;
use ferry_catalog::bucket::SqliteSyncState;

use crate::commands::print;
use crate::ui::{Bar, human_bytes};
use crate::{BucketCmd, Global};

pub async fn run(g: &Global, cmd: BucketCmd) -> Result<u8> {
    let BucketCmd::Sync {
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
    } = cmd;
    if g.coordinator.is_some() {
        bail!(
            "bucket sync over agents (--coordinator) is not available yet; run it on one machine"
        );
    }
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let cfg = Config::load(config.as_deref())?;
    let (sl, dl) = (Location::parse(&src, &cfg)?, Location::parse(&dst, &cfg)?);
    let since_ns = since
        .as_deref()
        .map(ferry_bucket::sync::parse_since)
        .transpose()?;
    let (src_side, dst_side) = (
        ferry_bucket::store::open(&sl, &cfg).await?,
        ferry_bucket::store::open(&dl, &cfg).await?,
    );
    let state = SqliteSyncState::open(&ferry_catalog::bucket::default_path(
        &sl.to_string(),
        &dl.to_string(),
    ))?;
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
    let bar = Arc::new(Bar::new("bucket sync"));
    let r = ferry_bucket::sync::sync(
        Arc::new(src_side),
        Arc::new(dst_side),
        Arc::new(state),
        &opts,
        bar.clone(),
        (sl.to_string(), dl.to_string()),
    )
    .await;
    bar.finish();
    let s = r?;
    print(g, &s, || {
        let mut out = String::new();
        for p in &s.plan {
            out.push_str(&format!(
                "would {} {} ({})\n",
                p.action,
                p.key,
                human_bytes(p.size)
            ));
        }
        for f in &s.failed {
            out.push_str(&format!("failed: {}: {}\n", f.key, f.error));
        }
        for k in &s.mismatched {
            out.push_str(&format!("differs after copy: {k}\n"));
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
            keys.join(", "),
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
