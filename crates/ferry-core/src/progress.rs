//! Progress events, for a bar or a log. The library never prints.

/// Receives progress from long operations. Implementations must be cheap:
/// they are called from the pipeline's threads.
pub trait Progress: Send + Sync {
    /// Whether totals are shown: if not, nobody walks ahead to count them.
    fn wants_totals(&self) -> bool {
        false
    }
    /// More work discovered (the scanner walks ahead of the readers).
    fn add_total(&self, _files: u64, _bytes: u64) {}
    /// Bytes processed.
    fn advance(&self, _bytes: u64) {}
    /// A file was finished.
    fn file_done(&self) {}
    /// A non-fatal problem (unreadable file, skipped special file).
    fn warn(&self, _message: &str) {}
}

/// Ignores everything.
pub struct NoProgress;

impl Progress for NoProgress {}
