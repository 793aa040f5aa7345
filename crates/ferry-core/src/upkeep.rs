//! Upkeep of a vault nobody manages: the default vault of `ferry sync` and
//! of embedded `ferry migration` rounds.
//!
//! A user of `ferry sync` expects rsync: nothing piles up anywhere. The
//! default vault is only the memory that makes the next run a delta, so
//! after each run the volume keeps its newest two snapshots (the next run's
//! parent, and the one before it: the last sync can be undone with `ferry
//! restore`), and once the packs outgrow three times the newest snapshot's
//! bytes (all volumes together: the two kept snapshots, uncompressed, and
//! as much again unreferenced), the vault is pruned. A prune is rare: a
//! run that changes a hundredth of a volume leaves about a hundredth of it
//! unreferenced, so the cost of pruning, spread over the runs between two
//! prunes, stays a small share of what those runs wrote.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::forget::KeepPolicy;
use crate::prune::{PruneOptions, PruneSummary};
use crate::vault::Vault;

#[derive(Clone, Debug)]
pub struct UpkeepPolicy {
    /// Snapshots of the volume kept (the newest; at least 1).
    pub keep_last: usize,
    /// Prune once the packs hold more than this many times the bytes of the
    /// newest snapshot of every volume.
    pub max_growth: f64,
}

impl Default for UpkeepPolicy {
    fn default() -> Self {
        Self {
            keep_last: 2,
            max_growth: 3.0,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct UpkeepSummary {
    /// Snapshot ids forgotten (older than the kept ones).
    pub forgotten: Vec<String>,
    /// Bytes of packs in the vault before any prune.
    pub pack_bytes: u64,
    /// Above this, the vault is pruned.
    pub limit_bytes: u64,
    pub pruned: Option<PruneSummary>,
    /// Why a prune that was due did not run (another process held the
    /// vault); the next run tries again.
    pub prune_error: Option<String>,
}

/// Keeps the newest snapshots of each of `volumes` (those that have any),
/// then prunes the vault if it outgrew `policy`. Runs after the sync (or
/// the migration round) is complete: its targets are already in place.
pub async fn upkeep(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    volumes: &[&str],
    policy: &UpkeepPolicy,
) -> Result<UpkeepSummary> {
    let all = catalog.snapshots()?;
    let keep = KeepPolicy {
        last: Some(policy.keep_last.max(1)),
        within: None,
    };
    let mut s = UpkeepSummary::default();
    for volume in volumes {
        if !all.iter().any(|r| r.volume == *volume) {
            continue;
        }
        let (kept, old) = crate::forget::plan(&all, volume, &keep, crate::forget::now_ns())?;
        let f = crate::forget::forget(&vault, catalog.as_ref(), &kept, &old, false).await?;
        s.forgotten.extend(f.forgotten);
    }
    s.pack_bytes = catalog.packs()?.iter().map(|(_, n)| n).sum();
    s.limit_bytes = limit(&catalog.snapshots()?, policy.max_growth);
    if s.pack_bytes > s.limit_bytes {
        match crate::prune::prune(vault, catalog, &PruneOptions::default()).await {
            Ok(p) => s.pruned = Some(p),
            Err(e) => s.prune_error = Some(e.to_string()),
        }
    }
    Ok(s)
}

/// `max_growth` times the bytes of each volume's newest snapshot.
fn limit(snapshots: &[crate::manifest::SnapshotRecord], max_growth: f64) -> u64 {
    let mut newest: HashMap<&str, (i64, u64)> = HashMap::new();
    for r in snapshots {
        let e = newest.entry(&r.volume).or_insert((r.time_ns, r.bytes));
        if r.time_ns > e.0 {
            *e = (r.time_ns, r.bytes);
        }
    }
    let live: u64 = newest.values().map(|(_, b)| b).sum();
    (live as f64 * max_growth) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_follows_each_volumes_newest_snapshot() {
        let snap = |v: &str, t: i64, bytes: u64| {
            let mut r = crate::forget::tests::snap(&format!("{v}{t}"), v, t);
            r.bytes = bytes;
            r
        };
        let all = [
            snap("a", 1, 1000),
            snap("a", 3, 100),
            snap("a", 2, 5000),
            snap("b", 7, 40),
        ];
        // a's newest (t=3) holds 100 bytes, b's 40: twice 140.
        assert_eq!(limit(&all, 2.0), 280);
        assert_eq!(limit(&[], 2.0), 0);
    }
}
