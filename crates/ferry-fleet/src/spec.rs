//! What a job asks an agent to do, and the progress it reports; both travel
//! as JSON inside the gRPC messages so that the queue stores them as is.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    Snapshot {
        source: PathBuf,
        volume: String,
        #[serde(default)]
        reread: bool,
        #[serde(default)]
        block: bool,
    },
    Restore {
        /// NAME, NAME@ID-prefix or NAME@latest.
        snapshot: String,
        target: PathBuf,
        #[serde(default)]
        delete: bool,
        #[serde(default)]
        verify: bool,
        #[serde(default)]
        reread_target: bool,
    },
}

impl JobSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Snapshot { .. } => "snapshot",
            JobSpec::Restore { .. } => "restore",
        }
    }

    /// The local path the job reads or writes on its agent.
    pub fn path(&self) -> &std::path::Path {
        match self {
            JobSpec::Snapshot { source, .. } => source,
            JobSpec::Restore { target, .. } => target,
        }
    }
}

/// A running job's progress, as the agent reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    pub files: u64,
    pub bytes: u64,
    pub total_files: u64,
    pub total_bytes: u64,
    pub warnings: u64,
}

/// Counts progress events for heartbeats.
#[derive(Default)]
pub struct ProgressCounter {
    files: AtomicU64,
    bytes: AtomicU64,
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    warnings: AtomicU64,
}

impl ProgressCounter {
    pub fn snapshot(&self) -> JobProgress {
        JobProgress {
            files: self.files.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            total_files: self.total_files.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            warnings: self.warnings.load(Ordering::Relaxed),
        }
    }
}

impl ferry_core::progress::Progress for ProgressCounter {
    fn wants_totals(&self) -> bool {
        true
    }
    fn add_total(&self, files: u64, bytes: u64) {
        self.total_files.fetch_add(files, Ordering::Relaxed);
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    fn file_done(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
    }
    fn warn(&self, message: &str) {
        tracing::warn!("{message}");
        self.warnings.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_tagged_json() {
        let s = JobSpec::Restore {
            snapshot: "db@1a2b".into(),
            target: "/data/db".into(),
            delete: true,
            verify: false,
            reread_target: false,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"restore\""), "{j}");
        assert_eq!(serde_json::from_str::<JobSpec>(&j).unwrap(), s);
        let minimal: JobSpec =
            serde_json::from_str(r#"{"kind":"snapshot","source":"/d","volume":"v"}"#).unwrap();
        assert_eq!(minimal.path(), std::path::Path::new("/d"));
        assert!(serde_json::from_str::<JobSpec>(r#"{"kind":"format","source":"/"}"#).is_err());
    }
}
