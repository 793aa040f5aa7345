//! What a job asks an agent to do, and the progress it reports; both travel
//! as JSON inside the gRPC messages so that the queue stores them as is.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use ferry_bucket::store::KeyRange;
use ferry_bucket::sync::SyncOptions;
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
        /// Read the source at most this fast, bytes per second.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_limit: Option<u64>,
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
        /// The restore follows a snapshot job that may still run: the
        /// agent checks its target meanwhile, then restores the snapshot
        /// that job made (`snapshot` names only the volume).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<After>,
    },
    /// Compare a target with a snapshot (`ferry migration`'s verification
    /// and report); the result is a `ferry_core::compare::Comparison`.
    Compare {
        snapshot: String,
        target: PathBuf,
        #[serde(default)]
        digests: bool,
        #[serde(default)]
        extra: bool,
    },
    /// A bucket prefix (or a directory under the agent's roots) saved as a
    /// snapshot through the vault, with the agent's remotes.
    SnapshotObjects {
        source: String,
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_limit: Option<u64>,
    },
    /// A snapshot restored into a bucket prefix.
    RestoreObjects {
        snapshot: String,
        target: String,
        #[serde(default)]
        delete: bool,
    },
    /// A bucket prefix compared with a snapshot.
    CompareObjects {
        snapshot: String,
        target: String,
        #[serde(default)]
        digests: bool,
        #[serde(default)]
        extra: bool,
    },
    /// A distributed bucket sync: the parent, which no agent runs.
    BucketSync(BucketJob),
    /// Its first task: list the source and cut the key space into ranges,
    /// from `after` on (the cursor, moved as ranges are added).
    BucketSplit {
        job: BucketJob,
        after: Option<String>,
        /// The last range is added: nothing left to split.
        #[serde(default)]
        complete: bool,
    },
    /// One range of the key space, synced by whichever agent takes it.
    BucketRange { job: BucketJob, range: KeyRange },
}

/// What a distributed bucket sync copies, and how. Locations are resolved
/// on each agent with the agent's own remotes and credentials.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketJob {
    pub source: String,
    pub destination: String,
    pub workers: usize,
    pub since_ns: Option<i64>,
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub delete: bool,
    #[serde(default)]
    pub verify: bool,
    /// Bytes per second, per agent.
    pub bandwidth: Option<u64>,
    pub part_size: u64,
    #[serde(default)]
    pub tags: bool,
    #[serde(default)]
    pub storage_class: bool,
    /// A range ends after this many objects or bytes, whichever first.
    pub task_objects: u64,
    pub task_bytes: u64,
}

impl BucketJob {
    pub fn options(&self, range: KeyRange) -> SyncOptions {
        SyncOptions {
            workers: self.workers.max(1),
            since_ns: self.since_ns,
            include: self.include.clone(),
            exclude: self.exclude.clone(),
            delete: self.delete,
            verify: self.verify,
            dry_run: false,
            bandwidth: self.bandwidth,
            part_size: self.part_size,
            tags: self.tags,
            storage_class: self.storage_class,
            range,
        }
    }

    /// Names the pair whose sync state the coordinator keeps.
    pub fn pair(&self) -> String {
        format!("{}\n{}", self.source, self.destination)
    }
}

impl JobSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Snapshot { .. } => "snapshot",
            JobSpec::Restore { .. } => "restore",
            JobSpec::Compare { .. } => "compare",
            JobSpec::SnapshotObjects { .. } => "snapshot",
            JobSpec::RestoreObjects { .. } => "restore",
            JobSpec::CompareObjects { .. } => "compare",
            JobSpec::BucketSync(_) => "bucket_sync",
            JobSpec::BucketSplit { .. } => "bucket_split",
            JobSpec::BucketRange { .. } => "bucket_range",
        }
    }

    /// The local path the job reads or writes on its agent, for jobs that
    /// name one.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            JobSpec::Snapshot { source, .. } => Some(source),
            JobSpec::Restore { target, .. } | JobSpec::Compare { target, .. } => Some(target),
            _ => None,
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

/// The snapshot job a restore follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct After {
    pub job: u64,
    /// Refuse a snapshot that missed entries (a cutover): the target is
    /// then not touched.
    #[serde(default)]
    pub whole: bool,
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
            after: Some(After {
                job: 7,
                whole: true,
            }),
        };
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"kind\":\"restore\""), "{j}");
        assert_eq!(serde_json::from_str::<JobSpec>(&j).unwrap(), s);
        let minimal: JobSpec =
            serde_json::from_str(r#"{"kind":"snapshot","source":"/d","volume":"v"}"#).unwrap();
        assert_eq!(minimal.path(), Some(std::path::Path::new("/d")));
        assert!(serde_json::from_str::<JobSpec>(r#"{"kind":"format","source":"/"}"#).is_err());
    }
}
