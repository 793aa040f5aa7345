//! Prometheus metrics of the data path, through the `metrics` facade: the
//! calls cost next to nothing and record nothing unless a daemon installed
//! an exporter (`--metrics-addr`). Counters move while a job runs, so a
//! scrape shows progress, not only results.

use std::time::Instant;

pub const BYTES_READ: &str = "ferry_bytes_read_total";
pub const CHUNKS: &str = "ferry_chunks_total";
pub const CHUNKS_NEW: &str = "ferry_chunks_new_total";
pub const BYTES_NEW: &str = "ferry_bytes_new_total";
pub const PACKS_UPLOADED: &str = "ferry_packs_uploaded_total";
pub const BYTES_UPLOADED: &str = "ferry_bytes_uploaded_total";
pub const BYTES_WRITTEN: &str = "ferry_bytes_written_total";
pub const VAULT_SECONDS: &str = "ferry_vault_request_seconds";
pub const VAULT_ERRORS: &str = "ferry_vault_request_errors_total";
pub const DEDUP_RATIO: &str = "ferry_dedup_ratio";
pub const JOBS: &str = "ferry_jobs_finished_total";
pub const JOB_SECONDS: &str = "ferry_job_duration_seconds";

/// Names and helps, once the exporter is installed.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(BYTES_READ, Unit::Bytes, "Source bytes read and chunked");
    describe_counter!(CHUNKS, "Chunks produced by the chunker");
    describe_counter!(CHUNKS_NEW, "Chunks not yet in the vault (stored)");
    describe_counter!(
        BYTES_NEW,
        Unit::Bytes,
        "Bytes of new chunks, before compression"
    );
    describe_counter!(PACKS_UPLOADED, "Packs written to the vault");
    describe_counter!(
        BYTES_UPLOADED,
        Unit::Bytes,
        "Pack bytes written to the vault"
    );
    describe_counter!(
        BYTES_WRITTEN,
        Unit::Bytes,
        "Bytes written to restore targets"
    );
    describe_histogram!(VAULT_SECONDS, Unit::Seconds, "Vault requests by operation");
    describe_counter!(VAULT_ERRORS, "Vault requests that failed, by operation");
    describe_gauge!(
        DEDUP_RATIO,
        "Share of the last snapshot's bytes already in the vault"
    );
    describe_counter!(JOBS, "Jobs finished, by kind and state");
    describe_histogram!(JOB_SECONDS, Unit::Seconds, "Job durations, by kind");
}

pub fn bytes_read(n: u64) {
    metrics::counter!(BYTES_READ).increment(n);
    metrics::counter!(CHUNKS).increment(1);
}

pub fn new_chunk(len: u64) {
    metrics::counter!(CHUNKS_NEW).increment(1);
    metrics::counter!(BYTES_NEW).increment(len);
}

pub fn pack_uploaded(size: u64) {
    metrics::counter!(PACKS_UPLOADED).increment(1);
    metrics::counter!(BYTES_UPLOADED).increment(size);
}

pub fn bytes_written(n: u64) {
    metrics::counter!(BYTES_WRITTEN).increment(n);
}

/// One vault request of `op` (`put`, `get`, `list`, `delete`), started at
/// `started`.
pub fn vault_request(op: &'static str, started: Instant, ok: bool) {
    metrics::histogram!(VAULT_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    if !ok {
        metrics::counter!(VAULT_ERRORS, "op" => op).increment(1);
    }
}

pub fn snapshot_done(bytes_scanned: u64, bytes_new: u64) {
    if bytes_scanned > 0 {
        let ratio = 1.0 - (bytes_new.min(bytes_scanned) as f64 / bytes_scanned as f64);
        metrics::gauge!(DEDUP_RATIO).set(ratio);
    }
}

pub fn job_finished(kind: &str, state: &str, seconds: f64) {
    metrics::counter!(JOBS, "kind" => kind.to_string(), "state" => state.to_string()).increment(1);
    metrics::histogram!(JOB_SECONDS, "kind" => kind.to_string()).record(seconds);
}
