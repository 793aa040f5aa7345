//! ferry's data path.
//!
//! A byte travels through the modules in this order when it is saved:
//! [`source`] (walk a directory, read metadata) → [`chunker`] (FastCDC) →
//! [`id`] (keyed BLAKE3 chunk id) → dedup against the [`catalog`] →
//! [`codec`] (zstd, then AES-256-GCM) → [`pack`] (group blobs into pack
//! objects) → [`vault`] (object store). [`snapshot`] drives that pipeline and
//! writes a [`manifest`] tree per directory.
//!
//! And back when it is restored: [`vault`] → [`pack`] (unpack) → [`codec`]
//! (decrypt, decompress) → [`restore`] (scatter into files under the target).
//!
//! The crate knows nothing of SQLite, gRPC or the command line: the catalog
//! is a trait ([`catalog::Catalog`]) the caller hands in.

pub mod block;
pub mod bucket_state;
pub mod catalog;
pub mod check;
pub mod chunker;
pub mod codec;
pub mod compare;
pub mod config;
pub mod error;
pub mod forget;
pub mod id;
pub mod keys;
pub mod limit;
pub mod lock;
pub mod manifest;
pub mod migration;
pub mod objects;
pub mod pack;
pub mod phase;
pub mod placement;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod snapshot;
pub mod source;
pub mod sync;
pub mod target;
pub mod telemetry;
mod tree_ahead;
pub mod upkeep;
pub mod vault;

pub use error::{Error, Result};
