//! The work a job does, identical in embedded mode (the CLI calls it with
//! the SQLite catalog) and on an agent (with the remote catalog).

use std::path::Path;
use std::sync::Arc;

use ferry_catalog::target::SqliteTargetState;
use ferry_core::catalog::Catalog;
use ferry_core::manifest::SnapshotRecord;
use ferry_core::progress::Progress;
use ferry_core::restore::ahead::Checked;
use ferry_core::restore::{RestoreOptions, RestoreSummary};
use ferry_core::snapshot::{SnapshotOptions, SnapshotSummary};
use ferry_core::vault::Vault;

use crate::Result;

pub async fn snapshot(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    source: &Path,
    opts: &SnapshotOptions,
    progress: Arc<dyn Progress>,
) -> Result<SnapshotSummary> {
    Ok(ferry_core::snapshot::snapshot(vault, catalog, source, opts, progress).await?)
}

/// Restores with the target's memory (kept under the state directory, by
/// the target's canonical path), creating the target directory if needed.
pub async fn restore(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    snap: &SnapshotRecord,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    if !snap.block {
        std::fs::create_dir_all(target).map_err(|e| crate::Error::Io {
            what: format!("creating target {}", target.display()),
            source: e,
        })?;
    }
    let state = SqliteTargetState::open(&ferry_catalog::target::default_path(target))?;
    Ok(ferry_core::restore::restore(
        vault,
        catalog,
        Arc::new(state),
        snap,
        target,
        opts,
        progress,
    )
    .await?)
}

/// A check of a directory target running beside the snapshot that a
/// restore into it follows (see [`ferry_core::restore::ahead`]).
pub struct CheckAhead(std::thread::JoinHandle<ferry_core::Result<Option<Checked>>>);

/// Starts checking `target` against the snapshot its memory says it holds;
/// `None` when it is not a directory ferry restored into before.
pub fn check_ahead(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    target: &Path,
) -> Option<CheckAhead> {
    if !target.is_dir() {
        return None;
    }
    let state = SqliteTargetState::open(&ferry_catalog::target::default_path(target)).ok()?;
    Some(CheckAhead(ferry_core::restore::ahead::check_ahead(
        vault,
        catalog,
        Arc::new(state),
        target.to_path_buf(),
    )))
}

impl CheckAhead {
    /// Waits for the check; a check that failed is none (the restore then
    /// plans every directory).
    pub async fn finish(self) -> Option<Arc<Checked>> {
        tokio::task::spawn_blocking(move || ferry_core::restore::ahead::finish(self.0))
            .await
            .ok()
            .flatten()
            .map(Arc::new)
    }
}
