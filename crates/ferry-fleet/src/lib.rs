//! Fleet mode: one coordinator owns the catalog and the job queue; agents
//! next to the data run the jobs, reading and writing the vault themselves.
//!
//! The data path is ferry-core's, unchanged: an agent runs the same
//! `snapshot` and `restore` as the embedded CLI ([`work`]); only the
//! catalog seam differs ([`remote::RemoteCatalog`], the `Catalog` trait
//! over gRPC, against [`coordinator`], which serves the SQLite catalog).

pub mod agent;
pub mod bucket;
pub mod client;
pub mod conn;
mod convert;
pub mod coordinator;
pub mod remote;
pub mod spec;
pub mod work;

/// The generated gRPC types (proto/ferry.proto).
pub mod proto {
    tonic::include_proto!("ferry.v1");
}

/// A fleet failure, named by what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("coordinator {url}: {call}: {message}")]
    Rpc {
        url: String,
        call: &'static str,
        message: String,
    },
    #[error("{0}")]
    Core(#[from] ferry_core::Error),
    #[error("{0}")]
    Catalog(#[from] ferry_catalog::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A status as one readable line (tonic's Display carries metadata and
/// details too).
pub fn status_line(s: &tonic::Status) -> String {
    let code = match s.code() {
        tonic::Code::Unavailable => "unreachable",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::NotFound => "not found",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::DeadlineExceeded => "timed out",
        tonic::Code::FailedPrecondition => "failed",
        tonic::Code::OutOfRange => "message too large",
        tonic::Code::ResourceExhausted => "message too large or overloaded",
        _ => "error",
    };
    let msg = s.message().lines().next().unwrap_or("").trim();
    if msg.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {msg}")
    }
}

/// Whether a call may succeed if tried again: the coordinator is down,
/// restarting or overloaded. Errors it chose to return are final.
pub fn retryable(s: &tonic::Status) -> bool {
    // A certificate the client does not trust will not become trusted.
    let m = s.message();
    if m.contains("certificate") || m.contains("InvalidCertificate") {
        return false;
    }
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}
