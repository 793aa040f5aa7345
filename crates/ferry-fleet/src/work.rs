//! The work a job does, identical in embedded mode (the CLI calls it with
//! the SQLite catalog) and on an agent (with the remote catalog).

use std::path::Path;
use std::sync::Arc;

use ferry_catalog::target::SqliteTargetState;
use ferry_core::catalog::Catalog;
use ferry_core::manifest::SnapshotRecord;
use ferry_core::progress::Progress;
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
