//! The work a job does, identical in embedded mode (the CLI calls it with
//! the SQLite catalog) and on an agent (with the remote catalog).

use std::path::Path;
use std::sync::Arc;

use ferry_catalog::target::SqliteTargetState;
use ferry_core::catalog::Catalog;
use ferry_core::id::BlobId;
use ferry_core::manifest::SnapshotRecord;
use ferry_core::progress::Progress;
use ferry_core::restore::ahead::Checked;
use ferry_core::restore::{Committing, RestoreOptions, RestoreSummary};
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
    let state = target_state(target, !snap.block)?;
    Ok(ferry_core::restore::restore(vault, catalog, state, snap, target, opts, progress).await?)
}

/// Restores a directory snapshot that is still committing (see
/// [`ferry_core::restore::restore_committing`]): `ferry sync` plans while
/// the snapshot's last packs upload.
#[allow(clippy::too_many_arguments)]
pub async fn restore_committing(
    vault: Arc<Vault>,
    catalog: Arc<dyn Catalog>,
    root: BlobId,
    record: Committing,
    target: &Path,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<RestoreSummary> {
    let state = target_state(target, true)?;
    Ok(ferry_core::restore::restore_committing(
        vault, catalog, state, root, record, target, opts, progress,
    )
    .await?)
}

/// The target's memory (under the state directory, keyed by the target's
/// canonical path), after creating a directory target if needed.
fn target_state(target: &Path, dir: bool) -> Result<Arc<dyn ferry_core::target::TargetState>> {
    if dir {
        std::fs::create_dir_all(target).map_err(|e| crate::Error::Io {
            what: format!("creating target {}", target.display()),
            source: e,
        })?;
    }
    Ok(Arc::new(SqliteTargetState::open(
        &ferry_catalog::target::default_path(target),
    )?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_catalog::SqliteCatalog;
    use ferry_core::progress::NoProgress;
    use ferry_core::vault::Location;

    /// Every file under `dir` with a hash of its contents, sorted.
    fn files(dir: &Path) -> Vec<(String, u64)> {
        use std::hash::{Hash, Hasher};
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().display().to_string();
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    std::fs::read(&p).unwrap().hash(&mut h);
                    out.push((rel, h.finish()));
                }
            }
        }
        out.sort();
        out
    }

    /// `ferry sync` plans its restore before the snapshot commits: when
    /// the commit fails, the target keeps what it had, with no temporary
    /// file left behind; when it succeeds, the target is the new tree.
    #[tokio::test]
    async fn a_restore_planned_before_the_commit_waits_for_it() {
        let d = tempfile::tempdir().unwrap();
        let (src, target) = (d.path().join("src"), d.path().join("target"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("a"), b"first a").unwrap();
        std::fs::write(src.join("sub/b"), vec![7u8; 300_000]).unwrap();
        let loc = Location::Local(d.path().join("vault"));
        std::fs::create_dir_all(d.path().join("vault")).unwrap();
        let mut vopts = ferry_core::config::VaultOptions::default();
        vopts.kdf.m_kib = 64;
        vopts.kdf.t = 1;
        Vault::init(&loc, b"pw", &vopts).await.unwrap();
        let vault = Arc::new(Vault::open(&loc, b"pw").await.unwrap());
        let (c, _) = SqliteCatalog::open(&d.path().join("c.sqlite"), vault.id()).unwrap();
        let catalog: Arc<dyn Catalog> = Arc::new(c);
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        // The target's memory in the test's directory, not the user's.
        let state: Arc<dyn ferry_core::target::TargetState> =
            Arc::new(SqliteTargetState::open(&d.path().join("t.sqlite")).unwrap());
        let opts = SnapshotOptions::new("v");
        let take = |n: u64| {
            let (vault, catalog, src, opts, progress) = (
                vault.clone(),
                catalog.clone(),
                src.clone(),
                opts.clone(),
                progress.clone(),
            );
            async move {
                let s = snapshot(vault, catalog.clone(), &src, &opts, progress)
                    .await
                    .unwrap();
                assert_eq!(s.files, n);
                ferry_core::sync::find_snapshot(catalog.as_ref(), &format!("v@{}", s.snapshot_id))
                    .unwrap()
            }
        };
        let first = take(2).await;
        let ropts = RestoreOptions {
            delete: true,
            ..Default::default()
        };
        ferry_core::restore::restore(
            vault.clone(),
            catalog.clone(),
            state.clone(),
            &first,
            &target,
            &ropts,
            progress.clone(),
        )
        .await
        .unwrap();
        let before = files(&target);

        std::fs::write(src.join("a"), b"second a, longer").unwrap();
        std::fs::write(src.join("sub/b"), vec![9u8; 300_000]).unwrap();
        std::fs::write(src.join("c"), b"new").unwrap();
        let second = take(3).await;
        let failing: Committing = Box::pin(async {
            Err(ferry_core::Error::Internal(
                "the snapshot was not committed".into(),
            ))
        });
        let r = ferry_core::restore::restore_committing(
            vault.clone(),
            catalog.clone(),
            state.clone(),
            second.root,
            failing,
            &target,
            &ropts,
            progress.clone(),
        )
        .await;
        assert!(r.is_err());
        assert_eq!(files(&target), before, "the target is untouched");

        // A record of another tree is refused the same way.
        let other: Committing = Box::pin(std::future::ready(Ok(first.clone())));
        let r = ferry_core::restore::restore_committing(
            vault.clone(),
            catalog.clone(),
            state.clone(),
            second.root,
            other,
            &target,
            &ropts,
            progress.clone(),
        )
        .await;
        assert!(r.is_err());
        assert_eq!(files(&target), before);

        let committed: Committing = Box::pin(std::future::ready(Ok(second.clone())));
        let r = ferry_core::restore::restore_committing(
            vault.clone(),
            catalog.clone(),
            state.clone(),
            second.root,
            committed,
            &target,
            &ropts,
            progress,
        )
        .await
        .unwrap();
        assert_eq!(r.snapshot_id, second.id);
        assert_eq!(files(&target), files(&src));
    }
}
