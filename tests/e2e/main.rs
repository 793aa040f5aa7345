//! End-to-end tests: the real `ferry` binary, real files, real SQLite
//! catalogs, and a real S3-compatible server (s3s-fs) on loopback that the
//! tests start themselves.

mod block;
mod bucket;
mod common;
mod delta;
mod deploy;
mod fleet;
mod fleet_bucket;
mod kube;
mod local;
mod maintenance;
mod migration;
mod s3;
