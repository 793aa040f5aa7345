//! Bucket migration: incremental bucket-to-bucket (or bucket/directory)
//! sync across providers, ossimport-style.
//!
//! Flow: `location` parses each side (named remotes from `config`), `store`
//! opens it and streams its listing in key order, `sync` merges the two
//! listings with what the last run recorded (`ferry_core::bucket_state`),
//! and a pool of workers copies (streamed, multipart with parallel parts,
//! or server-side on one endpoint), deletes and verifies.
//! `ferry_core::limit` paces the bytes.

pub mod config;
pub mod location;
pub mod objects;
pub mod store;
pub mod sync;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Store(String),
    #[error("{0}")]
    Transfer(String),
    #[error("{key}: {reason}")]
    Key { key: String, reason: String },
    #[error("{0} changed while it was read")]
    Changed(String),
    #[error("{0}")]
    State(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
