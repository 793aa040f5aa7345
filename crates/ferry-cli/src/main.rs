//! `ferry`: the command line. Parses, opens the vault and catalog, calls
//! ferry-core, prints. No data-path logic lives here.
//!
//! Exit codes: 0 success; 1 operational failure (one `error: ...` line on
//! stderr); 2 usage error; 3 snapshot saved but incomplete (some entries
//! could not be read; the snapshot is consistent and says so).

mod bucket;
mod commands;
mod fleet;
mod kube;
mod migration;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Incremental, encrypted, deduplicated data mover for stateful workloads"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Clone)]
pub struct Global {
    /// The vault: a path, file:///path or s3://bucket/prefix.
    #[arg(long, global = true, env = "FERRY_VAULT")]
    pub vault: Option<String>,
    /// Read the passphrase from this file (first line) instead of FERRY_PASSPHRASE.
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// The embedded catalog file (default: under $XDG_STATE_HOME/ferry, by vault id).
    #[arg(long, global = true, env = "FERRY_CATALOG", value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Run the work on agents of this coordinator (http://HOST:PORT or https://...).
    #[arg(long, global = true, env = "FERRY_COORDINATOR", value_name = "URL")]
    pub coordinator: Option<String>,
    /// The coordinator's token, first line of this file (or FERRY_TOKEN).
    #[arg(long, global = true, env = "FERRY_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https coordinator.
    #[arg(long, global = true, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Print one JSON object on stdout when the command ends.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log lines as text or as JSON objects (for log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create or check a vault.
    #[command(subcommand)]
    Vault(VaultCmd),
    /// Save a directory as a new snapshot of a volume.
    Snapshot {
        /// The directory to save (a volume's contents), a bucket (s3://bucket/prefix, REMOTE:bucket/prefix) or a claim (pvc:NAMESPACE/CLAIM).
        source: PathBuf,
        /// The volume's name; snapshots of one volume form its history.
        #[arg(long)]
        volume: String,
        /// Read every file, even those whose metadata is unchanged since the last snapshot.
        #[arg(long)]
        reread: bool,
        /// SOURCE is a disk image file to save as a raw block volume (block devices are detected).
        #[arg(long)]
        block: bool,
        /// Named remotes for a bucket SOURCE (default: $XDG_CONFIG_HOME/ferry/config.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        kube: KubeArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// List snapshots, of one volume or all (with --coordinator: those in its vault).
    Snapshots {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Restore a snapshot into a directory or a bucket (empty, or holding an earlier restore).
    Restore {
        /// NAME (latest snapshot of the volume) or NAME@ID (an id prefix).
        snapshot: String,
        /// The target directory (created if missing), a bucket (s3://bucket/prefix, REMOTE:bucket/prefix) or a claim (pvc:NAMESPACE/CLAIM).
        target: PathBuf,
        #[command(flatten)]
        delta: DeltaArgs,
        /// Named remotes for a bucket TARGET (default: $XDG_CONFIG_HOME/ferry/config.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        kube: KubeArgs,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Snapshot SOURCE, then restore it into TARGET, writing only what changed.
    Sync {
        source: PathBuf,
        target: PathBuf,
        /// The volume name (default: from the source path).
        #[arg(long)]
        volume: Option<String>,
        /// Read every source file, even those whose metadata is unchanged.
        #[arg(long)]
        reread: bool,
        /// SOURCE is a disk image file to move as a raw block volume (block devices are detected).
        #[arg(long)]
        block: bool,
        #[command(flatten)]
        delta: DeltaArgs,
        /// With --coordinator: the agent that snapshots SOURCE.
        #[arg(long, value_name = "NAME")]
        from_agent: Option<String>,
        /// With --coordinator: the agent that restores into TARGET.
        #[arg(long, value_name = "NAME")]
        to_agent: Option<String>,
    },
    /// Catalog maintenance.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Drop snapshots by policy (their data goes with the next prune).
    Forget {
        /// NAME (apply the --keep-* policy to the volume) or NAME@ID (forget one snapshot).
        snapshot: String,
        /// Keep the newest N snapshots.
        #[arg(long, value_name = "N")]
        keep_last: Option<usize>,
        /// Keep snapshots newer than this (e.g. 7d, 12h, 1d12h).
        #[arg(long, value_name = "DURATION", value_parser = ferry_core::forget::parse_duration)]
        keep_within: Option<std::time::Duration>,
        /// Show what would be forgotten; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete data no snapshot references; repack mostly-dead packs.
    Prune {
        /// Show what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Repack a pack when at least this fraction of it is unreferenced (0..1).
        #[arg(long, default_value_t = 0.3, value_name = "R")]
        max_repack_ratio: f64,
        /// Wait this many seconds for running snapshots to finish (default: fail at once).
        #[arg(long, default_value_t = 0, value_name = "SECONDS")]
        lock_wait: u64,
    },
    /// Serve the catalog and the job queue to agents (fleet mode).
    Coordinator {
        /// Address to listen on; anything but loopback needs --token-file.
        #[arg(long, default_value = "127.0.0.1:7300")]
        listen: std::net::SocketAddr,
        /// Serve TLS with this certificate chain (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The TLS private key (PEM).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Seconds a job stays an agent's without a heartbeat.
        #[arg(long, default_value_t = 30)]
        lease_seconds: u64,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Run jobs from a coordinator next to the data (fleet mode).
    Agent {
        /// This agent's name, as jobs address it.
        #[arg(long)]
        name: String,
        /// A directory the agent may read or write; repeat for several.
        #[arg(long = "root", value_name = "PATH", required = true)]
        roots: Vec<PathBuf>,
        /// Named remotes for bucket tasks (default: $XDG_CONFIG_HOME/ferry/config.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics on http://ADDR/metrics.
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Bucket migration.
    #[command(subcommand)]
    Bucket(BucketCmd),
    /// The claims of a namespace to move: sizes, storage classes, nodes.
    Plan {
        /// The namespace (default: the kubeconfig context's).
        #[arg(long, short)]
        namespace: Option<String>,
        /// Only claims with these labels (a label selector, e.g. app=db).
        #[arg(long, short = 'l')]
        selector: Option<String>,
        /// The target cluster's class for a source class: OLD=NEW (repeatable).
        #[arg(long, value_name = "OLD=NEW")]
        storage_class_map: Vec<String>,
        #[command(flatten)]
        kube: KubeArgs,
    },
    /// A whole migration: pre-sync rounds with a downtime estimate, cutover, report.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// List the coordinator's agents.
    Agents,
    /// List the coordinator's jobs, or show one.
    Jobs {
        /// Only this job.
        id: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum MigrationCmd {
    /// Record a migration: sources paired in order with targets.
    Create {
        name: String,
        /// A directory, block device or image, bucket (s3://b/p, REMOTE:b/p) or claim (pvc:NS/CLAIM); repeat.
        #[arg(long = "from", value_name = "SOURCE", required = true)]
        from: Vec<String>,
        /// Where the source of the same rank goes; repeat.
        #[arg(long = "to", value_name = "TARGET", required = true)]
        to: Vec<String>,
        /// With --coordinator: the agent that reads the sources (claims go to their node's).
        #[arg(long, value_name = "NAME")]
        from_agent: Option<String>,
        /// With --coordinator: the agent that writes the targets.
        #[arg(long, value_name = "NAME")]
        to_agent: Option<String>,
        /// Named remotes for bucket pairs (default: $XDG_CONFIG_HOME/ferry/config.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Pair N (from 1) is a disk image to move as a raw block volume (devices are found on their own).
        #[arg(long, value_name = "N")]
        block: Vec<usize>,
    },
    /// Run a pre-sync round over every pair and estimate the downtime.
    Presync {
        name: String,
        /// Repeat rounds until the estimate stops shrinking.
        #[arg(long)]
        until_converged: bool,
        /// At most this many rounds with --until-converged.
        #[arg(long, default_value_t = 10, value_name = "N")]
        max_rounds: u32,
        /// Run only inside this window: HH:MM-HH:MM in UTC, or with an offset (01:00-05:00+08:00).
        #[arg(long, value_name = "HH:MM-HH:MM")]
        window: Option<String>,
        /// Cap the rate the sources are read at (e.g. 50M for 50 MiB/s).
        #[arg(long, value_name = "RATE")]
        bandwidth: Option<String>,
        #[command(flatten)]
        pairs: PairArgs,
    },
    /// Per pair and in total: last round, change rate, estimated final delta and downtime.
    Status {
        name: String,
        #[command(flatten)]
        pairs: PairArgs,
    },
    /// Quiesce, final delta of every pair, verify, resume.
    Cutover {
        name: String,
        /// Run before the final delta (e.g. scale the application to zero).
        #[arg(long, value_name = "CMD")]
        quiesce_cmd: Option<String>,
        /// Claims: scale the Deployments and StatefulSets whose pods mount the source claims to zero first.
        #[arg(long)]
        quiesce: bool,
        /// With --quiesce: scale the same workloads on the target cluster to the source's replicas on success.
        #[arg(long, requires = "quiesce")]
        resume: bool,
        /// How long --quiesce waits for the pods to go.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        quiesce_timeout: u64,
        /// Run on success (e.g. start the application on the target).
        #[arg(long, value_name = "CMD")]
        resume_cmd: Option<String>,
        /// Run when anything fails after quiescing (e.g. restart the application on the source).
        #[arg(long, value_name = "CMD")]
        rollback_cmd: Option<String>,
        /// Refuse, before quiescing, when the estimate is longer (e.g. 90s, 5m, 1h30m, or seconds: 0.5).
        #[arg(long, value_name = "DURATION", value_parser = parse_seconds)]
        max_downtime: Option<std::time::Duration>,
        /// Read every target back and check it against its snapshot before resuming.
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        pairs: PairArgs,
    },
    /// Compare every target with its last snapshot; a signed JSON (--json) or Markdown report.
    Report {
        name: String,
        /// Write the report to FILE instead of stdout.
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        pairs: PairArgs,
    },
    /// Check the signature of a JSON report with the vault's key.
    VerifyReport {
        file: PathBuf,
        #[command(flatten)]
        pairs: PairArgs,
    },
}

/// A duration as `parse_duration` takes it, or plain (fractional) seconds.
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(std::time::Duration::from_secs_f64(v)),
        Ok(_) => Err(format!("bad duration {s:?}")),
        Err(_) => ferry_core::forget::parse_duration(s),
    }
}

/// How the pairs of a migration are reached.
#[derive(Args, Clone)]
pub struct PairArgs {
    /// Named remotes for bucket pairs (default: $XDG_CONFIG_HOME/ferry/config.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The source cluster's kubeconfig, for claim sources (default: --kubeconfig).
    #[arg(long, value_name = "FILE")]
    pub source_kubeconfig: Option<PathBuf>,
    /// The target cluster's kubeconfig, for claim targets (default: --kubeconfig).
    #[arg(long, value_name = "FILE")]
    pub target_kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

impl PairArgs {
    /// The cluster of one side of the pairs.
    pub fn kube_for(&self, source: bool) -> KubeArgs {
        let mut k = self.kube.clone();
        let side = if source {
            &self.source_kubeconfig
        } else {
            &self.target_kubeconfig
        };
        if side.is_some() {
            k.kubeconfig = side.clone();
        }
        k
    }
}

/// How a restore treats what is already in the target.
#[derive(Args, Clone)]
pub struct DeltaArgs {
    /// Remove target entries that are not in the snapshot.
    #[arg(long)]
    pub delete: bool,
    /// Read every file back and check it against the snapshot; mismatches exit 1.
    #[arg(long)]
    pub verify: bool,
    /// Compare existing target files by content instead of trusting what ferry remembers.
    #[arg(long)]
    pub reread_target: bool,
    /// Take no vault lock (for read-only vault credentials; do not prune meanwhile).
    #[arg(long)]
    pub no_lock: bool,
    /// Files planned and written per batch: a restore's memory is about 1.2 KB per file of
    /// one batch (whole directories; fewer files, more pack fetches).
    #[arg(long, value_name = "N", default_value_t = ferry_core::restore::BATCH_FILES as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_files: u64,
}

/// How `pvc:` arguments reach the cluster.
#[derive(Args, Clone)]
pub struct KubeArgs {
    /// The cluster's kubeconfig (default: KUBECONFIG, ~/.kube/config, or the pod's service account).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubelet's root directory on the nodes.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// A claim no running pod mounts: start a pod that mounts it for the job's duration, then delete it (implies --wait).
    #[arg(long)]
    pub mount_helper: bool,
    /// The helper pod's image (it only has to stay up).
    #[arg(
        long,
        value_name = "IMAGE",
        default_value = "registry.k8s.io/pause:3.10"
    )]
    pub helper_image: String,
    /// How long to wait for the helper pod to run.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub helper_timeout: u64,
}

/// Where a job runs in fleet mode.
#[derive(Args, Clone)]
pub struct RemoteArgs {
    /// With --coordinator: the agent that runs the job.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// With --coordinator: follow the job until it ends; exit with its status.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand)]
pub enum VaultCmd {
    /// Create a new encrypted vault.
    Init {
        /// Where (or use --vault / FERRY_VAULT).
        location: Option<String>,
        /// FastCDC minimum chunk size (e.g. 16K).
        #[arg(long, value_parser = ui::parse_size)]
        chunk_min: Option<u64>,
        /// FastCDC average chunk size (e.g. 32K).
        #[arg(long, value_parser = ui::parse_size)]
        chunk_avg: Option<u64>,
        /// FastCDC maximum chunk size (e.g. 128K).
        #[arg(long, value_parser = ui::parse_size)]
        chunk_max: Option<u64>,
        /// Target pack size (e.g. 16M).
        #[arg(long, value_parser = ui::parse_size)]
        pack_size: Option<u64>,
        /// zstd level, 1..=19.
        #[arg(long)]
        compression_level: Option<i32>,
    },
    /// Verify that every snapshot can be restored.
    Check {
        /// Where (or use --vault / FERRY_VAULT).
        location: Option<String>,
        /// Also download every pack and verify every blob.
        #[arg(long, conflicts_with = "read_data_subset")]
        read_data: bool,
        /// Download and verify this percentage of the packs, chosen at random.
        #[arg(long, value_name = "PERCENT")]
        read_data_subset: Option<f64>,
    },
}

#[derive(Subcommand)]
pub enum BucketCmd {
    /// Copy what changed from SRC to DST (s3://bucket/prefix, REMOTE:bucket/prefix or a directory).
    Sync {
        src: String,
        dst: String,
        /// Objects copied at once.
        #[arg(long, default_value_t = 16)]
        workers: usize,
        /// Only objects modified at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only keys matching this glob (repeatable; as rclone: `*` within a segment, `**` across, a leading `/` anchors at the top).
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        /// Skip keys matching this glob (repeatable).
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
        /// Delete destination objects the source does not have.
        #[arg(long)]
        delete: bool,
        /// Read every copied object back and compare size and content.
        #[arg(long)]
        verify: bool,
        /// Print the plan; copy and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many bytes per second in total (e.g. 50M).
        #[arg(long, value_name = "RATE", value_parser = ferry_core::limit::parse_rate)]
        bandwidth: Option<u64>,
        /// Copy object tags too.
        #[arg(long)]
        tags: bool,
        /// Keep the source's storage class.
        #[arg(long)]
        storage_class: bool,
        /// Named remotes (default: $XDG_CONFIG_HOME/ferry/config.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// With --coordinator: follow the job until it ends; exit with its status.
        #[arg(long)]
        wait: bool,
        /// With --coordinator: a task covers at most this many objects...
        #[arg(long, default_value_t = 1000, value_name = "N")]
        task_objects: u64,
        /// ...or this many bytes (e.g. 1G), whichever comes first.
        #[arg(long, default_value = "1G", value_name = "SIZE", value_parser = ui::parse_size)]
        task_bytes: u64,
    },
    /// A distributed bucket sync's tasks, totals and failed keys.
    Report {
        /// The job id `bucket sync --coordinator` printed.
        job: u64,
        /// List at most this many failed keys.
        #[arg(long, default_value_t = 1000, value_name = "N")]
        limit: u32,
    },
    /// Run a distributed bucket sync's failed tasks again (done ones stay done).
    Rerun {
        /// The job id `bucket sync --coordinator` printed.
        job: u64,
        /// Follow the job until it ends; exit with its status.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
pub enum CatalogCmd {
    /// Recreate the catalog from the vault alone.
    Rebuild,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Coordinator { .. } | Command::Agent { .. }
    );
    ui::init_tracing(
        cli.global.verbose,
        daemon,
        cli.global.log_format == LogFormat::Json,
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", ui::one_line(&e));
            ExitCode::from(1)
        }
    }
}
