//! Where a restore may write: never over its own source, never over ferry's
//! own state.
//!
//! `ferry sync /data /data/copy` would copy the copy again on every run;
//! `ferry sync /data/app /data --delete` would delete the very source it
//! reads; `ferry sync /data ~ --delete` would delete the vault and the
//! catalog. rsync does what was typed; ferry refuses these before anything
//! is read or written, since nothing may be lost to a slip of the keyboard.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// `path` absolute, with symlinks resolved as far as it exists; the part
/// that does not exist yet (a target a restore will create) is appended as
/// written.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut missing = Vec::new();
    let mut base = abs.as_path();
    loop {
        if let Ok(mut out) = std::fs::canonicalize(base) {
            for c in missing.iter().rev() {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(n) => out.push(n),
                    _ => {}
                }
            }
            return out;
        }
        match (base.parent(), base.components().next_back()) {
            (Some(parent), Some(last)) => {
                missing.push(last);
                base = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses a restore target that is, holds or lies inside `source`, that
/// lies inside one of `keep` (what ferry keeps its own state in: the
/// vault, the catalog, the targets' memories), or that holds one of them
/// when `delete` would remove what the snapshot does not have.
pub fn check_target(
    target: &Path,
    source: Option<&Path>,
    keep: &[(&str, &Path)],
    delete: bool,
) -> Result<()> {
    let t = resolve(target);
    let refuse = |reason: String| {
        Err(Error::Placement {
            target: target.to_path_buf(),
            reason,
        })
    };
    if let Some(source) = source {
        let s = resolve(source);
        if t == s {
            return refuse("it is the source".into());
        }
        if t.starts_with(&s) {
            return refuse(format!(
                "it is inside the source {}: each run would copy the copy again",
                source.display()
            ));
        }
        if s.starts_with(&t) {
            return refuse(format!(
                "it holds the source {}: the restore would write over what it reads",
                source.display()
            ));
        }
    }
    for (what, path) in keep {
        let k = resolve(path);
        if t.starts_with(&k) {
            return refuse(format!("it is inside {what} {}", path.display()));
        }
        if delete && k.starts_with(&t) {
            return refuse(format!(
                "it holds {what} {}, which --delete would remove",
                path.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_parts_are_appended_to_the_resolved_ancestor() {
        let d = tempfile::tempdir().unwrap();
        let real = resolve(d.path());
        std::fs::create_dir(d.path().join("a")).unwrap();
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("link")).unwrap();
        assert_eq!(resolve(&d.path().join("link/new/x")), real.join("a/new/x"));
        assert_eq!(resolve(&d.path().join("a/..")), real);
        assert_eq!(resolve(&d.path().join("a/nope/../y")), real.join("a/y"));
    }

    #[test]
    fn a_target_overlapping_its_source_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let check = |t: &Path| check_target(t, Some(&src), &[], false);
        for bad in [
            src.clone(),
            src.join("sub"),
            src.join("new"),
            src.join("sub/.."),
            d.path().to_path_buf(),
            PathBuf::from("/"),
        ] {
            let e = check(&bad).expect_err(&bad.display().to_string());
            assert!(e.to_string().starts_with("refusing target"), "{e}");
        }
        check(&d.path().join("dst")).unwrap();
        check(&d.path().join("src-copy")).unwrap();
    }

    #[test]
    fn ferrys_own_state_is_never_a_target_and_survives_delete() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("home/.local/state/ferry");
        std::fs::create_dir_all(&state).unwrap();
        let keep = [("the state directory", state.as_path())];
        let home = d.path().join("home");
        check_target(&state.join("x"), None, &keep, false).unwrap_err();
        check_target(&state, None, &keep, false).unwrap_err();
        let e = check_target(&home, None, &keep, true).unwrap_err();
        assert!(e.to_string().contains("--delete would remove"), "{e}");
        // Without --delete a restore into the home directory only adds.
        check_target(&home, None, &keep, false).unwrap();
        check_target(&d.path().join("elsewhere"), None, &keep, true).unwrap();
    }
}
