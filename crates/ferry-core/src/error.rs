//! Errors of the data path.
//!
//! Rules: every variant names the thing that failed (file, pack, object) so
//! that the one-line message a user sees is enough to act on; secrets never
//! appear in a message; lower-level errors are kept as the `source`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("wrong passphrase for vault {vault}")]
    WrongPassphrase { vault: String },

    #[error("no vault at {vault} (run `ferry vault init {vault}` first)")]
    NotInitialised { vault: String },

    #[error("a vault already exists at {vault}")]
    AlreadyInitialised { vault: String },

    #[error("invalid vault location {location:?}: {reason}")]
    BadLocation { location: String, reason: String },

    #[error("vault {vault}: {op} {object}: {source}")]
    Store {
        vault: String,
        op: &'static str,
        object: String,
        #[source]
        source: Box<object_store::Error>,
    },

    #[error("vault config {vault}: {reason}")]
    BadConfig { vault: String, reason: String },

    #[error("pack {pack} is damaged: {reason}")]
    DamagedPack { pack: String, reason: String },

    #[error("object {object} is damaged: {reason}")]
    DamagedObject { object: String, reason: String },

    #[error("blob {id} is not in the catalog or the vault")]
    MissingBlob { id: String },

    #[error("no snapshot matches {spec}")]
    NoSnapshot { spec: String },

    #[error("{spec} matches several snapshots; give more of the id")]
    AmbiguousSnapshot { spec: String },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("catalog: {0}")]
    Catalog(#[from] crate::catalog::CatalogError),

    #[error("restore into {target} failed: {summary}")]
    RestoreFailed { target: PathBuf, summary: String },

    #[error("verification of {target} failed: {count} path(s) differ from the snapshot: {paths}")]
    VerifyFailed {
        target: PathBuf,
        count: usize,
        paths: String,
    },

    #[error("{0}")]
    Invalid(String),

    #[error("refusing target {target}: {reason}")]
    Placement { target: PathBuf, reason: String },

    #[error("vault {vault} is locked by {holder}")]
    Locked { vault: String, holder: String },
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The object a store call named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Store { source, .. } if matches!(**source, object_store::Error::NotFound { .. }))
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
