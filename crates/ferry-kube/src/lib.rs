//! The Kubernetes side of a migration: from a PersistentVolumeClaim to the
//! node that holds its data and the directory (or device) under the
//! kubelet's pod directory where an agent on that node finds it, the way
//! Velero's node-agent does.
//!
//! A small client of its own ([`client::Kube`]: kubeconfig or in-cluster
//! config, JSON over reqwest) rather than the `kube` crate: ferry reads
//! claims, volumes, pods and replica sets, creates and deletes helper pods
//! and scales workloads, and kube with k8s-openapi would double the build.

pub mod client;
pub mod helper;
pub mod resolve;
pub mod workload;

pub use client::Kube;
pub use helper::{Helper, HelperOptions};
pub use resolve::{Placement, PlanRow, plan, resolve, resolve_mounting};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes config: {0}")]
    Config(String),
    #[error("kubernetes API {server}: {path}: {message}")]
    Api {
        server: String,
        path: String,
        message: String,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unusable(String),
    /// No running pod mounts the claim, so no node has its data laid out.
    #[error("{0}")]
    NotMounted(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
