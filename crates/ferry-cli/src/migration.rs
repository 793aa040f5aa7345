//! `ferry migration`: a named migration of many source/target pairs, run
//! as rounds of the same snapshot + delta restore as `ferry sync`, with the
//! downtime estimate, the cutover sequence and the signed report of
//! `ferry_core::migration`.
//!
//! Embedded (the vault's catalog holds the record, pairs run one after the
//! other on this machine) or, with `--coordinator`, over agents (the
//! coordinator's catalog holds it, every pair's jobs run at once).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use ferry_core::catalog::Catalog;
use ferry_core::compare::{CompareOptions, Comparison};
use ferry_core::migration::{
    self, Estimate, Migration, MigrationStore, Pair, PairKind, PairRound, Round, RoundKind, Step,
};
use ferry_core::vault::Vault;
use ferry_fleet::client::FleetClient;
use ferry_fleet::spec::JobSpec;
use serde::Serialize;
use serde_json::{Value, json};

use crate::commands::print;
use crate::ui::human_bytes;
use crate::{DeltaArgs, Global, MigrationCmd, PairArgs};

/// Where the record lives and how pairs run.
struct Env {
    g: Global,
    store: Arc<dyn MigrationStore>,
    mode: Mode,
}

enum Mode {
    /// This machine runs the pairs, one after the other, into the vault.
    Embedded {
        vault: Arc<Vault>,
        catalog: Arc<dyn Catalog>,
        /// The default vault: kept small after each pre-sync round, as
        /// after each `ferry sync`.
        upkeep: bool,
    },
    /// Agents run them, every pair at once; the coordinator keeps the
    /// record and signs reports.
    Fleet {
        client: Box<FleetClient>,
        catalog: Arc<ferry_fleet::remote::RemoteCatalog>,
    },
}

impl Env {
    async fn open(g: &Global) -> Result<Env> {
        if g.coordinator.is_some() {
            let catalog = Arc::new(crate::fleet::remote_catalog(g)?);
            return Ok(Env {
                g: g.clone(),
                store: catalog.clone(),
                mode: Mode::Fleet {
                    client: Box::new(crate::fleet::fleet_client(g)?),
                    catalog,
                },
            });
        }
        let upkeep = g.vault.is_none();
        let (vault, catalog) = match upkeep {
            false => crate::commands::open(None, g).await?,
            true => crate::commands::open_default_vault(g).await?,
        };
        let store = ferry_catalog::migration::SqliteMigrations::open(
            &crate::commands::catalog_path(g, &vault),
        )?;
        Ok(Env {
            g: g.clone(),
            store: Arc::new(store),
            mode: Mode::Embedded {
                vault,
                catalog,
                upkeep,
            },
        })
    }

    fn load(&self, name: &str) -> Result<(Migration, Vec<Round>)> {
        let m = self.store.migration(name)?.ok_or_else(|| {
            anyhow!("no migration {name:?}: create it with `ferry migration create {name} --from SOURCE --to TARGET`")
        })?;
        let rounds = self.store.rounds(name)?;
        Ok((m, rounds))
    }

    /// Pairs run at once on agents, one after the other here.
    fn parallel(&self) -> bool {
        matches!(self.mode, Mode::Fleet { .. })
    }

    /// Signs a report with the vault's key (naming the vault in it).
    async fn sign(&self, doc: &mut Value) -> Result<()> {
        match &self.mode {
            Mode::Embedded { vault, .. } => {
                doc["vault"] = vault.id().into();
                migration::sign(doc, &migration::report_key(vault.data_key()));
            }
            Mode::Fleet { client, .. } => *doc = client.sign_report(doc).await?,
        }
        Ok(())
    }

    /// The default vault's upkeep after a pre-sync round: each pair's
    /// volume keeps its newest two snapshots, and the vault is pruned once
    /// it outgrows them (see `ferry_core::upkeep`). None for any other
    /// vault, and over agents (the coordinator's vault is the user's).
    async fn upkeep(&self, m: &Migration) -> Result<Option<ferry_core::upkeep::UpkeepSummary>> {
        let Mode::Embedded {
            vault,
            catalog,
            upkeep: true,
        } = &self.mode
        else {
            return Ok(None);
        };
        let volumes: Vec<&str> = m.pairs.iter().map(|p| p.volume.as_str()).collect();
        let u = ferry_core::upkeep::upkeep(
            vault.clone(),
            catalog.clone(),
            &volumes,
            &Default::default(),
        )
        .await
        .context("the default vault's upkeep (the round is done and recorded)")?;
        Ok(Some(u))
    }

    async fn verify(&self, doc: &Value) -> Result<std::result::Result<(), String>> {
        Ok(match &self.mode {
            Mode::Embedded { vault, .. } => {
                migration::verify(doc, &migration::report_key(vault.data_key()))
            }
            Mode::Fleet { client, .. } => client.verify_report(doc).await?,
        })
    }
}

pub async fn run(g: &Global, cmd: MigrationCmd) -> Result<u8> {
    match cmd {
        MigrationCmd::Create {
            name,
            from,
            to,
            from_agent,
            to_agent,
            config,
            block,
        } => create(g, name, from, to, (from_agent, to_agent), config, block).await,
        MigrationCmd::Presync {
            name,
            until_converged,
            max_rounds,
            window,
            bandwidth,
            pairs,
        } => {
            let window = window
                .map(|w| migration::Window::parse(&w))
                .transpose()
                .map_err(|e| anyhow!(e))?;
            let limit = bandwidth
                .map(|b| ferry_core::limit::parse_rate(&b))
                .transpose()
                .map_err(|e| anyhow!("--bandwidth: {e}"))?;
            let rounds = if until_converged {
                max_rounds.max(1)
            } else {
                1
            };
            presync(g, &name, rounds, until_converged, window, limit, &pairs).await
        }
        MigrationCmd::Status { name, pairs: _ } => status(g, &name).await,
        MigrationCmd::Cutover {
            name,
            quiesce_cmd,
            resume_cmd,
            rollback_cmd,
            max_downtime,
            verify,
            quiesce,
            resume,
            quiesce_timeout,
            pairs,
        } => {
            let c = Cutover {
                quiesce: quiesce_cmd,
                resume: resume_cmd,
                rollback: rollback_cmd,
                max_downtime_s: max_downtime.map(|d| d.as_secs_f64()),
                verify,
                scale_down: quiesce,
                scale_up: resume,
                quiesce_timeout: std::time::Duration::from_secs(quiesce_timeout),
            };
            cutover(g, &name, &c, &pairs).await
        }
        MigrationCmd::Report {
            name,
            output,
            pairs,
        } => report(g, &name, output, &pairs).await,
        MigrationCmd::VerifyReport { file, pairs: _ } => verify_report(g, &file).await,
    }
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!("migration name {name:?}: use 1-64 letters, digits, '.', '_' or '-'");
    }
    Ok(())
}

fn is_bucket(arg: &str, config: Option<&Path>) -> Result<bool> {
    if !arg.starts_with("s3://") && crate::bucket::remote_name(arg).is_none() {
        return Ok(false);
    }
    let cfg = ferry_bucket::config::Config::load(config)?;
    Ok(crate::bucket::names_bucket(arg, &cfg))
}

/// In fleet mode, where remotes are the agents' own: `s3://...` or
/// `REMOTE:bucket/prefix` (a path there is absolute).
fn fleet_bucket(arg: &str) -> bool {
    arg.starts_with("s3://")
        || (!arg.starts_with("pvc:") && crate::bucket::remote_name(arg).is_some())
}

/// An absolute path for a local side (so later commands work from any
/// directory), or the argument as given for buckets and claims.
fn absolute_local(arg: &str) -> Result<String> {
    let p = Path::new(arg);
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    };
    Ok(std::fs::canonicalize(&abs)
        .unwrap_or(abs)
        .to_string_lossy()
        .into_owned())
}

/// What kind of pair `source` → `target` is, checking what can be checked
/// now: local sources exist, buckets answer.
async fn pair_of(
    g: &Global,
    i: usize,
    name: &str,
    (source, target): (&str, &str),
    config: Option<&Path>,
    agents: (&Option<String>, &Option<String>),
    block: bool,
) -> Result<Pair> {
    let claim = |s: &str| s.starts_with("pvc:");
    let mut pair = Pair {
        source: source.to_string(),
        target: target.to_string(),
        volume: format!("{name}-{i}"),
        kind: PairKind::Dir,
        from_agent: agents.0.clone(),
        to_agent: agents.1.clone(),
    };
    if claim(source) || claim(target) {
        if g.coordinator.is_none() {
            bail!("pair {i}: claims are moved by agents: pass --coordinator URL");
        }
        for s in [source, target].into_iter().filter(|s| claim(s)) {
            crate::kube::claim_of(Path::new(s))?;
        }
        pair.kind = PairKind::Claim;
        return Ok(pair);
    }
    if g.coordinator.is_some() && (fleet_bucket(source) || fleet_bucket(target)) {
        // Remotes are the agents' (their --config): checked when jobs run.
        if pair.from_agent.is_none() || pair.to_agent.is_none() {
            bail!(
                "with --coordinator, name the agents of bucket pairs: --from-agent NAME --to-agent NAME"
            );
        }
        pair.kind = PairKind::Bucket;
        return Ok(pair);
    }
    let (src_bucket, dst_bucket) = (is_bucket(source, config)?, is_bucket(target, config)?);
    if src_bucket || dst_bucket {
        for (b, s) in [(src_bucket, source), (dst_bucket, target)] {
            if b {
                crate::bucket::objects_at(Path::new(s), config)
                    .await
                    .with_context(|| format!("pair {i}: {s}"))?;
            }
        }
        if !src_bucket {
            pair.source = absolute_local(source)?;
        }
        if !dst_bucket {
            pair.target = absolute_local(target)?;
        }
        pair.kind = PairKind::Bucket;
        return Ok(pair);
    }
    if g.coordinator.is_some() {
        // The paths are on the agents' nodes: checked when the jobs run.
        if pair.from_agent.is_none() || pair.to_agent.is_none() {
            bail!(
                "with --coordinator, name the agents of directory pairs: --from-agent NAME --to-agent NAME"
            );
        }
        for s in [source, target] {
            if !Path::new(s).is_absolute() {
                bail!("pair {i}: {s}: give an absolute path (the jobs run on the agents' nodes)");
            }
        }
        pair.kind = if std::path::Path::new(source)
            .extension()
            .is_some_and(|e| e == "img")
        {
            PairKind::Block
        } else {
            PairKind::Dir
        };
        return Ok(pair);
    }
    use std::os::unix::fs::FileTypeExt;
    let md = std::fs::metadata(source).with_context(|| format!("pair {i}: source {source}"))?;
    pair.kind = if md.is_dir() && !block {
        PairKind::Dir
    } else if md.is_file() || md.file_type().is_block_device() {
        PairKind::Block
    } else {
        bail!("pair {i}: source {source} is neither a directory, a block device nor an image file");
    };
    if pair.kind == PairKind::Dir
        && let Ok(t) = std::fs::metadata(target)
        && !t.is_dir()
    {
        bail!("pair {i}: target {target} is not a directory");
    }
    pair.source = absolute_local(source)?;
    pair.target = absolute_local(target)?;
    Ok(pair)
}

async fn create(
    g: &Global,
    name: String,
    from: Vec<String>,
    to: Vec<String>,
    (from_agent, to_agent): (Option<String>, Option<String>),
    config: Option<PathBuf>,
    block: Vec<usize>,
) -> Result<u8> {
    valid_name(&name)?;
    if let Some(b) = block.iter().find(|&&b| b == 0 || b > from.len()) {
        bail!("--block {b}: pairs are numbered 1 to {}", from.len());
    }
    if from.len() != to.len() {
        bail!(
            "{} --from and {} --to: give one target for each source, in the same order",
            from.len(),
            to.len()
        );
    }
    let env = Env::open(g).await?;
    let mut pairs = Vec::new();
    for (i, (s, t)) in from.iter().zip(&to).enumerate() {
        pairs.push(
            pair_of(
                g,
                i + 1,
                &name,
                (s, t),
                config.as_deref(),
                (&from_agent, &to_agent),
                block.contains(&(i + 1)),
            )
            .await?,
        );
    }
    if let Some(why) = migration::conflicts(&pairs) {
        bail!("migration {name}: {why}");
    }
    let m = Migration {
        name: name.clone(),
        created: now_text(),
        pairs,
    };
    if !env.store.create_migration(&m)? {
        bail!("migration {name:?} exists already (see `ferry migration status {name}`)");
    }
    print(g, &m, || {
        let mut s = format!("migration {name} created with {} pair(s):", m.pairs.len());
        for (i, p) in m.pairs.iter().enumerate() {
            s.push_str(&format!(
                "\n  {}. {} -> {} ({:?}, volume {})",
                i + 1,
                p.source,
                p.target,
                p.kind,
                p.volume
            ));
        }
        s.push_str(&format!(
            "\nnext: ferry migration presync {name} [--until-converged]"
        ));
        s
    })?;
    Ok(0)
}

fn now_text() -> String {
    ferry_core::vault::format_rfc3339(ferry_core::forget::now_ns() / 1_000_000_000)
}

/// Runs one round over every pair: in order here, at once on agents.
async fn round(
    env: &Env,
    m: &Migration,
    seq: u32,
    kind: RoundKind,
    limit: Option<u64>,
    pairs: &PairArgs,
) -> Round {
    let started = Instant::now();
    let started_ns = ferry_core::forget::now_ns();
    let strict = kind == RoundKind::Cutover;
    let pairs = if env.parallel() {
        futures::future::join_all(
            m.pairs
                .iter()
                .map(|p| run_pair(env, p, limit, strict, pairs)),
        )
        .await
    } else {
        let mut results = Vec::new();
        for p in &m.pairs {
            results.push(run_pair(env, p, limit, strict, pairs).await);
        }
        results
    };
    Round {
        seq,
        kind: Some(kind),
        started: ferry_core::vault::format_rfc3339(started_ns / 1_000_000_000),
        started_ns,
        duration_s: started.elapsed().as_secs_f64(),
        ok: pairs.iter().all(|p| p.ok),
        error: None,
        pairs,
        ..Default::default()
    }
}

/// One pair's snapshot and delta restore (with `--delete`: the target
/// becomes the source), embedded. Failures are kept in the record.
async fn run_pair(
    env: &Env,
    pair: &Pair,
    limit: Option<u64>,
    strict: bool,
    args: &PairArgs,
) -> PairRound {
    let mut out = PairRound {
        source: pair.source.clone(),
        target: pair.target.clone(),
        ..Default::default()
    };
    if let Err(e) = run_pair_inner(env, pair, limit, strict, args, &mut out).await {
        out.ok = false;
        out.error = Some(crate::ui::one_line(&e));
    }
    out
}

async fn run_pair_inner(
    env: &Env,
    pair: &Pair,
    limit: Option<u64>,
    strict: bool,
    args: &PairArgs,
    out: &mut PairRound,
) -> Result<()> {
    let (vault, catalog) = match &env.mode {
        Mode::Embedded { vault, catalog, .. } => (vault, catalog),
        Mode::Fleet { client, catalog } => {
            return run_pair_fleet(&env.g, client, catalog, pair, limit, strict, args, out).await;
        }
    };
    let cfg = args.config.as_deref();
    let t = Instant::now();
    let mut opts = ferry_core::snapshot::SnapshotOptions::new(pair.volume.clone());
    opts.block = pair.kind == PairKind::Block;
    opts.read_limit = limit;
    opts.skip = crate::commands::skip_own_state(&env.g);
    let target_objects = crate::bucket::objects_at(Path::new(&pair.target), cfg).await?;
    let source_objects = crate::bucket::objects_at(Path::new(&pair.source), cfg).await?;
    if source_objects.is_none() && target_objects.is_none() {
        let (source, target) = (Path::new(&pair.source), Path::new(&pair.target));
        crate::commands::check_placement(&env.g, target, Some(source), true)?;
    }
    // A directory target is checked beside the snapshot (see `ferry sync`).
    let ahead = match (opts.block, &target_objects) {
        (false, None) => {
            ferry_fleet::work::check_ahead(vault.clone(), catalog.clone(), Path::new(&pair.target))
        }
        _ => None,
    };
    if source_objects.is_none() && target_objects.is_none() && !opts.block {
        // Directory to directory: `ferry sync`'s way, the restore planning
        // while the snapshot's last packs upload.
        let delta = pair_delta();
        let synced = crate::commands::snapshot_and_restore(
            vault.clone(),
            catalog.clone(),
            Path::new(&pair.source),
            Path::new(&pair.target),
            opts,
            &delta,
            ahead,
            strict,
            |s| record_snapshot(out, s, t, strict, &pair.source),
            t,
        )
        .await?;
        // The round's time is the snapshot's and what the restore took
        // beyond it.
        out.snapshot_s = synced.snapshot.duration_s;
        out.restore_s = (t.elapsed().as_secs_f64() - out.snapshot_s).max(0.0);
        out.bytes_total = synced.record.bytes;
        out.bytes_written = synced.restore.bytes_written;
        out.files_written = synced.restore.files_written;
        out.files_deleted = synced.restore.files_deleted;
        out.ok = true;
        return Ok(());
    }
    let s = match source_objects {
        Some(objects) => {
            crate::bucket::snapshot_into(vault.clone(), catalog.clone(), objects, &opts).await?
        }
        None => {
            let bar = Arc::new(crate::ui::Bar::new("snapshot"));
            let r = ferry_fleet::work::snapshot(
                vault.clone(),
                catalog.clone(),
                Path::new(&pair.source),
                &opts,
                bar.clone(),
            )
            .await;
            bar.finish();
            r?
        }
    };
    record_snapshot(out, &s, t, strict, &pair.source)?;
    let snap = ferry_core::sync::find_snapshot(
        catalog.as_ref(),
        &format!("{}@{}", pair.volume, s.snapshot_id),
    )?;
    out.bytes_total = snap.bytes;
    let t = Instant::now();
    match target_objects {
        Some(objects) => {
            let opts = ferry_core::restore::objects::ObjectRestoreOptions {
                delete: true,
                ..Default::default()
            };
            let r =
                crate::bucket::restore_into(vault.clone(), catalog.clone(), &snap, objects, &opts)
                    .await?;
            out.bytes_written = r.bytes_written;
            out.files_written = r.files_written;
            out.files_deleted = r.files_deleted;
            if let Some((k, e)) = r.failed.first() {
                bail!("{} object(s) not written, first {k}: {e}", r.failed.len());
            }
        }
        None => {
            let delta = pair_delta();
            let checked = match ahead {
                Some(a) => a.finish().await,
                None => None,
            };
            let r = crate::commands::restore_into(
                vault.clone(),
                catalog.clone(),
                &snap,
                Path::new(&pair.target),
                &delta,
                checked,
            )
            .await?;
            out.bytes_written = r.bytes_written;
            out.files_written = r.files_written;
            out.files_deleted = r.files_deleted;
        }
    }
    out.restore_s = t.elapsed().as_secs_f64();
    out.ok = true;
    Ok(())
}

/// How a round restores into a directory target: the target becomes the
/// source.
fn pair_delta() -> DeltaArgs {
    DeltaArgs {
        delete: true,
        verify: false,
        reread_target: false,
        no_lock: false,
        batch_files: ferry_core::restore::BATCH_FILES as u64,
    }
}

/// A pair's snapshot figures into its round. While the application runs,
/// files change under the reader and the next round takes them again; once
/// it is quiesced (`strict`), nothing may be missing.
fn record_snapshot(
    out: &mut PairRound,
    s: &ferry_core::snapshot::SnapshotSummary,
    started: Instant,
    strict: bool,
    source: &str,
) -> Result<()> {
    out.snapshot_s = started.elapsed().as_secs_f64();
    out.snapshot_id = Some(s.snapshot_id.clone());
    out.files = s.files;
    out.bytes_scanned = s.bytes_scanned;
    out.bytes_new = s.bytes_new;
    out.warnings = s.warnings;
    if s.incomplete && strict {
        bail!(
            "snapshot {} of {source} is incomplete: {} entries could not be read or changed while read (is the source quiesced?)",
            s.snapshot_id.get(..8).unwrap_or(&s.snapshot_id),
            s.warnings
        );
    }
    Ok(())
}

/// Compares a pair's target with snapshot `id` of its volume.
async fn compare_pair(
    env: &Env,
    pair: &Pair,
    id: &str,
    opts: &CompareOptions,
    args: &PairArgs,
) -> Result<Comparison> {
    let spec = format!("{}@{id}", pair.volume);
    let (vault, catalog) = match &env.mode {
        Mode::Embedded { vault, catalog, .. } => (vault, catalog),
        Mode::Fleet { client, .. } => {
            let side = Side::place(&env.g, args, &pair.target, &pair.to_agent, false, true).await?;
            let job = if fleet_bucket(&pair.target) {
                JobSpec::CompareObjects {
                    snapshot: spec,
                    target: pair.target.clone(),
                    digests: opts.digests,
                    extra: opts.extra,
                }
            } else {
                JobSpec::Compare {
                    snapshot: spec,
                    target: side.path.clone(),
                    digests: opts.digests,
                    extra: opts.extra,
                }
            };
            let r = crate::fleet::run_and_wait(client, &side.agent, &job).await;
            side.release().await;
            let (_, v) = r?;
            return Ok(serde_json::from_value(v)?);
        }
    };
    let snap = ferry_core::sync::find_snapshot(catalog.as_ref(), &spec)?;
    match crate::bucket::objects_at(Path::new(&pair.target), args.config.as_deref()).await? {
        Some(objects) => {
            let (vault, catalog, opts) = (vault.clone(), catalog.clone(), opts.clone());
            let rt = tokio::runtime::Handle::current();
            Ok(tokio::task::spawn_blocking(move || {
                ferry_core::compare::compare_objects(
                    &rt,
                    &vault,
                    catalog.as_ref(),
                    &snap,
                    &objects,
                    &opts,
                )
            })
            .await??)
        }
        None => Ok(ferry_core::compare::compare_dir(
            vault,
            catalog.as_ref(),
            &snap,
            Path::new(&pair.target),
            opts,
        )
        .await?),
    }
}

fn spec_name(pair: &Pair, id: &str) -> String {
    format!("{}@{id}", pair.volume)
}

/// One side of a pair on an agent: its node's agent and path for a claim
/// (with the helper pod that mounts it, if one was needed), else the
/// pair's agent and path.
struct Side {
    agent: String,
    path: PathBuf,
    block: bool,
    claimed: Option<crate::kube::Claimed>,
}

impl Side {
    async fn place(
        g: &Global,
        args: &PairArgs,
        arg: &str,
        agent: &Option<String>,
        source: bool,
        read_only: bool,
    ) -> Result<Side> {
        if let Some((ns, claim)) = crate::kube::claim_of(Path::new(arg))? {
            let c = crate::kube::place(g, &args.kube_for(source), &ns, &claim, read_only).await?;
            return Ok(Side {
                agent: c.placement.node.clone(),
                path: c.placement.path.clone(),
                block: c.placement.block,
                claimed: Some(c),
            });
        }
        Ok(Side {
            agent: agent
                .clone()
                .ok_or_else(|| anyhow!("{arg}: the pair names no agent"))?,
            path: PathBuf::from(arg),
            block: false,
            claimed: None,
        })
    }

    async fn release(self) {
        if let Some(c) = self.claimed {
            c.release().await;
        }
    }
}

/// One pair's snapshot job on the source's agent, then the delta restore
/// of exactly that snapshot on the target's.
#[allow(clippy::too_many_arguments)]
async fn run_pair_fleet(
    g: &Global,
    client: &FleetClient,
    catalog: &Arc<ferry_fleet::remote::RemoteCatalog>,
    pair: &Pair,
    limit: Option<u64>,
    strict: bool,
    args: &PairArgs,
    out: &mut PairRound,
) -> Result<()> {
    let t = Instant::now();
    let src = Side::place(g, args, &pair.source, &pair.from_agent, true, true).await?;
    let spec = if fleet_bucket(&pair.source) {
        JobSpec::SnapshotObjects {
            source: pair.source.clone(),
            volume: pair.volume.clone(),
            read_limit: limit,
        }
    } else {
        JobSpec::Snapshot {
            source: src.path.clone(),
            volume: pair.volume.clone(),
            reread: false,
            block: pair.kind == PairKind::Block || src.block,
            read_limit: limit,
        }
    };
    let agent = src.agent.clone();
    let snap_job = match client.submit(&agent, &spec).await {
        Ok(j) => j,
        Err(e) => {
            src.release().await;
            return Err(e.into());
        }
    };
    // The target's agent checks the target while the snapshot is taken,
    // then restores the snapshot that job made; in a cutover (`strict`) it
    // refuses one that missed entries, before touching the target.
    let placed = Side::place(g, args, &pair.target, &pair.to_agent, false, false).await;
    let restore_job = match &placed {
        Ok(dst) => {
            let spec = if fleet_bucket(&pair.target) {
                None
            } else {
                Some(JobSpec::Restore {
                    snapshot: pair.volume.clone(),
                    target: dst.path.clone(),
                    delete: true,
                    verify: false,
                    reread_target: false,
                    after: Some(ferry_fleet::spec::After {
                        job: snap_job.id,
                        whole: strict,
                    }),
                })
            };
            match spec {
                Some(spec) => Some(client.submit(&dst.agent, &spec).await),
                None => None,
            }
        }
        Err(_) => None,
    };
    let r = crate::fleet::wait_for(client, &snap_job).await;
    src.release().await;
    let waited = async |job: Option<Result<ferry_fleet::proto::JobInfo, ferry_fleet::Error>>| {
        if let Some(Ok(j)) = job {
            let _ = crate::fleet::wait_for(client, &j).await;
        }
    };
    let dst = match placed {
        Ok(d) => d,
        Err(e) => {
            waited(restore_job).await;
            return Err(e);
        }
    };
    let (_, v) = match r {
        Ok(r) => r,
        Err(e) => {
            // The restore job fails on its own; its end is awaited so the
            // target is settled when the round reports.
            waited(restore_job).await;
            dst.release().await;
            return Err(e);
        }
    };
    let s: ferry_core::snapshot::SnapshotSummary = serde_json::from_value(v)?;
    if let Err(e) = record_snapshot(
        out,
        &s,
        t,
        strict,
        &format!("{} on agent {agent}", pair.source),
    ) {
        waited(restore_job).await;
        dst.release().await;
        return Err(e);
    }
    let t = Instant::now();
    let agent = dst.agent.clone();
    let r = match restore_job {
        Some(job) => match job {
            Ok(j) => crate::fleet::wait_for(client, &j).await,
            Err(e) => Err(e.into()),
        },
        None => {
            let spec = JobSpec::RestoreObjects {
                snapshot: spec_name(pair, &s.snapshot_id),
                target: pair.target.clone(),
                delete: true,
            };
            crate::fleet::run_and_wait(client, &agent, &spec).await
        }
    };
    dst.release().await;
    let (_, v) = r?;
    let num = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let r = (
        num("bytes_written"),
        num("files_written"),
        num("files_deleted"),
    );
    let (c, id) = (catalog.clone(), spec_name(pair, &s.snapshot_id));
    out.bytes_total = tokio::task::spawn_blocking(move || {
        ferry_core::sync::find_snapshot(c.as_ref(), &id).map(|r| r.bytes)
    })
    .await??;
    (out.bytes_written, out.files_written, out.files_deleted) = r;
    out.restore_s = t.elapsed().as_secs_f64();
    out.ok = true;
    Ok(())
}

fn seconds(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

fn round_text(m: &Migration, r: &Round) -> String {
    let mut s = format!(
        "round {} ({:?}) of {}: {} in {}",
        r.seq,
        r.kind.unwrap_or(RoundKind::Presync),
        m.name,
        if r.ok { "ok" } else { "FAILED" },
        seconds(r.duration_s)
    );
    for (i, p) in r.pairs.iter().enumerate() {
        match &p.error {
            Some(e) => s.push_str(&format!("\n  {}. {} -> {}: FAILED: {e}", i + 1, p.source, p.target)),
            None => s.push_str(&format!(
                "\n  {}. {} -> {}: {} read, {} new, {} written, {} deleted in {} (snapshot {}, restore {}){}",
                i + 1,
                p.source,
                p.target,
                human_bytes(p.bytes_scanned),
                human_bytes(p.bytes_new),
                human_bytes(p.bytes_written),
                p.files_deleted,
                seconds(p.duration_s()),
                seconds(p.snapshot_s),
                seconds(p.restore_s),
                if p.warnings > 0 {
                    format!("; {} entries changed while read, taken again next round", p.warnings)
                } else {
                    String::new()
                }
            )),
        }
    }
    if let Some(e) = r.estimate_s {
        s.push_str(&format!(
            "\n  estimated downtime of a cutover now: {}",
            seconds(e)
        ));
    }
    s
}

async fn presync(
    g: &Global,
    name: &str,
    max_rounds: u32,
    until_converged: bool,
    window: Option<migration::Window>,
    limit: Option<u64>,
    pairs: &PairArgs,
) -> Result<u8> {
    let env = Env::open(g).await?;
    let (m, mut rounds) = env.load(name)?;
    let mut ran = Vec::new();
    let mut upkeep = Vec::new();
    let mut stopped = None;
    let mut previous: Option<f64> = rounds
        .iter()
        .rev()
        .find(|r| r.kind == Some(RoundKind::Presync) && r.ok)
        .and_then(|r| r.estimate_s);
    for n in 0..max_rounds {
        if let Some(w) = window {
            let now_s = ferry_core::forget::now_ns() / 1_000_000_000;
            let wait = w.wait_s(now_s);
            if wait > 0 {
                if n > 0 {
                    stopped = Some("the window closed".to_string());
                    break;
                }
                eprintln!("waiting {} for the window to open", seconds(wait as f64));
                tokio::time::sleep(std::time::Duration::from_secs(wait as u64)).await;
            }
        }
        let seq = rounds.last().map(|r| r.seq + 1).unwrap_or(1);
        let mut r = round(&env, &m, seq, RoundKind::Presync, limit, pairs).await;
        let mut all = rounds.clone();
        all.push(r.clone());
        let e = migration::estimate(&m, &all, ferry_core::forget::now_ns(), env.parallel());
        r.estimate_s = e.downtime_s;
        env.store.add_round(name, &r)?;
        if !g.json {
            eprintln!("{}", round_text(&m, &r));
        }
        if let Some(u) = env.upkeep(&m).await? {
            if !g.json {
                let text = crate::commands::upkeep_text(&u);
                if !text.is_empty() {
                    eprintln!("{}", text.trim_start());
                }
            }
            upkeep.push(u);
        }
        rounds.push(r.clone());
        let ok = r.ok;
        let est = r.estimate_s;
        ran.push(r);
        if !ok {
            stopped = Some("a pair failed".into());
            break;
        }
        if until_converged {
            if let Some(e) = est
                && migration::converged(previous, e)
            {
                stopped = Some("the estimate stopped shrinking".into());
                break;
            }
            previous = est;
        }
    }
    if until_converged && stopped.is_none() {
        stopped = Some(format!("{max_rounds} rounds (--max-rounds)"));
    }
    let e = migration::estimate(&m, &rounds, ferry_core::forget::now_ns(), env.parallel());
    #[derive(Serialize)]
    struct Out<'a> {
        migration: &'a str,
        rounds: &'a [Round],
        #[serde(skip_serializing_if = "Option::is_none")]
        stopped: Option<String>,
        estimate: &'a Estimate,
        /// The default vault's upkeep after each round.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        upkeep: Vec<ferry_core::upkeep::UpkeepSummary>,
    }
    let failed = ran.iter().any(|r| !r.ok);
    print(
        g,
        &Out {
            migration: name,
            rounds: &ran,
            stopped: stopped.clone(),
            estimate: &e,
            upkeep,
        },
        || {
            format!(
                "{} round(s) run{}; estimated downtime of a cutover now: {}",
                ran.len(),
                stopped
                    .map(|s| format!(", stopped: {s}"))
                    .unwrap_or_default(),
                e.downtime_s
                    .map(seconds)
                    .unwrap_or_else(|| "unknown".into())
            )
        },
    )?;
    if failed {
        let r = ran.last().expect("a round ran");
        let (i, p) = r
            .pairs
            .iter()
            .enumerate()
            .find(|(_, p)| !p.ok)
            .expect("a pair failed");
        eprintln!(
            "error: round {} of {name}: pair {} ({} -> {}) failed: {}",
            r.seq,
            i + 1,
            p.source,
            p.target,
            p.error.as_deref().unwrap_or("no reason given")
        );
        return Ok(1);
    }
    Ok(0)
}

async fn status(g: &Global, name: &str) -> Result<u8> {
    let env = Env::open(g).await?;
    let (m, rounds) = env.load(name)?;
    let e = migration::estimate(&m, &rounds, ferry_core::forget::now_ns(), env.parallel());
    let cutover = rounds
        .iter()
        .rev()
        .find(|r| r.kind == Some(RoundKind::Cutover));
    #[derive(Serialize)]
    struct Out<'a> {
        migration: &'a Migration,
        rounds: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        cutover: Option<&'a Round>,
        estimate: &'a Estimate,
    }
    print(
        g,
        &Out {
            migration: &m,
            rounds: rounds.len(),
            cutover,
            estimate: &e,
        },
        || {
            let mut s = format!(
                "migration {name}: {} pair(s), {} round(s)",
                m.pairs.len(),
                rounds.len()
            );
            for (i, p) in e.pairs.iter().enumerate() {
                s.push_str(&format!(
                    "\n  {}. {} -> {}: last round {}, {}/h changing, final delta ~{}, downtime ~{}",
                    i + 1,
                    p.source,
                    p.target,
                    p.last_round.as_deref().unwrap_or("never"),
                    p.change_bytes_per_hour
                        .map(|b| human_bytes(b as u64))
                        .unwrap_or_else(|| "?".into()),
                    human_bytes(p.final_delta_bytes),
                    if p.rounds > 0 {
                        seconds(p.estimate_s)
                    } else {
                        "unknown".into()
                    }
                ));
            }
            s.push_str(&format!(
                "\nestimated downtime: {} ({} with --verify)",
                e.downtime_s
                    .map(seconds)
                    .unwrap_or_else(|| "unknown (run a presync round)".into()),
                e.downtime_verified_s
                    .map(seconds)
                    .unwrap_or_else(|| "unknown".into())
            ));
            if let Some(c) = cutover {
                s.push_str(&format!(
                    "\ncutover {} at {}: downtime {}",
                    if c.ok { "done" } else { "FAILED" },
                    c.started,
                    c.downtime_s.map(seconds).unwrap_or_default()
                ));
            }
            s
        },
    )?;
    Ok(0)
}

struct Cutover {
    quiesce: Option<String>,
    resume: Option<String>,
    rollback: Option<String>,
    max_downtime_s: Option<f64>,
    verify: bool,
    /// `--quiesce`/`--resume`: scale the claims' workloads.
    scale_down: bool,
    scale_up: bool,
    quiesce_timeout: std::time::Duration,
}

/// What `--quiesce` scaled to zero, to scale back on a rollback or up on
/// the target with `--resume`.
struct Scaled {
    kube: ferry_kube::Kube,
    workloads: Vec<ferry_kube::workload::Workload>,
}

/// Scales every workload that mounts a source claim to zero, then waits
/// until no pod mounts them.
async fn scale_down(
    m: &Migration,
    args: &PairArgs,
    timeout: std::time::Duration,
) -> (Step, Option<Scaled>) {
    let t = Instant::now();
    let claims: Vec<(String, String)> = m
        .pairs
        .iter()
        .filter_map(|p| crate::kube::claim_of(Path::new(&p.source)).ok().flatten())
        .collect();
    let r = scale_down_claims(&claims, args, timeout).await;
    let (ok, detail, scaled) = match r {
        Ok(s) => (
            true,
            Some(format!(
                "scaled to 0: {}",
                if s.workloads.is_empty() {
                    "nothing (no running pod mounts the claims)".to_string()
                } else {
                    s.workloads
                        .iter()
                        .map(|w| format!("{} (was {})", w.describe(), w.replicas))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )),
            Some(s),
        ),
        Err((e, scaled)) => (false, Some(crate::ui::one_line(&e)), scaled),
    };
    (
        Step {
            name: "quiesce workloads".into(),
            ok,
            duration_s: t.elapsed().as_secs_f64(),
            detail,
        },
        scaled,
    )
}

/// The work of [`scale_down`]; on failure, what was scaled so far.
async fn scale_down_claims(
    claims: &[(String, String)],
    args: &PairArgs,
    timeout: std::time::Duration,
) -> std::result::Result<Scaled, (anyhow::Error, Option<Scaled>)> {
    if claims.is_empty() {
        return Err((
            anyhow!(
                "--quiesce scales the workloads of claims, and no pair's source is a claim: use --quiesce-cmd"
            ),
            None,
        ));
    }
    let kube = ferry_kube::Kube::new(args.kube_for(true).kubeconfig.as_deref())
        .map_err(|e| (e.into(), None))?;
    let mut workloads: Vec<ferry_kube::workload::Workload> = Vec::new();
    for (ns, claim) in claims {
        let found = ferry_kube::workload::owners(&kube, ns, claim)
            .await
            .map_err(|e| (e.into(), None))?;
        for w in found {
            if !workloads.contains(&w) {
                workloads.push(w);
            }
        }
    }
    let mut scaled = Scaled {
        kube,
        workloads: Vec::new(),
    };
    for w in &workloads {
        if let Err(e) = ferry_kube::workload::scale(&scaled.kube, w, 0).await {
            return Err((e.into(), Some(scaled)));
        }
        scaled.workloads.push(w.clone());
    }
    for (ns, claim) in claims {
        if let Err(e) = ferry_kube::workload::wait_unmounted(&scaled.kube, ns, claim, timeout).await
        {
            return Err((e.into(), Some(scaled)));
        }
    }
    Ok(scaled)
}

/// `--resume`: the same workloads on the target cluster (in the namespace
/// of the claim their source claim moved to) get the source's replicas.
async fn scale_up_target(m: &Migration, args: &PairArgs, scaled: &Scaled) -> Step {
    let t = Instant::now();
    let r = async {
        let kube = ferry_kube::Kube::new(args.kube_for(false).kubeconfig.as_deref())?;
        let mut done = Vec::new();
        for w in &scaled.workloads {
            let ns = m
                .pairs
                .iter()
                .find_map(|p| {
                    let (sn, _) = crate::kube::claim_of(Path::new(&p.source)).ok()??;
                    let (tn, _) = crate::kube::claim_of(Path::new(&p.target)).ok()??;
                    (sn == w.namespace).then_some(tn)
                })
                .unwrap_or_else(|| w.namespace.clone());
            let target = ferry_kube::workload::Workload {
                namespace: ns,
                ..w.clone()
            };
            ferry_kube::workload::scale(&kube, &target, w.replicas).await?;
            done.push(format!("{} to {}", target.describe(), w.replicas));
        }
        anyhow::Ok(done)
    }
    .await;
    let (ok, detail) = match r {
        Ok(d) => (
            true,
            Some(format!("scaled on the target: {}", d.join(", "))),
        ),
        Err(e) => (false, Some(crate::ui::one_line(&e))),
    };
    Step {
        name: "resume workloads".into(),
        ok,
        duration_s: t.elapsed().as_secs_f64(),
        detail,
    }
}

/// Scales the source workloads back to their replicas.
async fn scale_back(scaled: &Scaled) -> Step {
    let t = Instant::now();
    let mut errors = Vec::new();
    for w in &scaled.workloads {
        if let Err(e) = ferry_kube::workload::scale(&scaled.kube, w, w.replicas).await {
            errors.push(format!("{}: {e}", w.describe()));
        }
    }
    Step {
        name: "rollback workloads".into(),
        ok: errors.is_empty(),
        duration_s: t.elapsed().as_secs_f64(),
        detail: Some(if errors.is_empty() {
            format!(
                "scaled back: {}",
                scaled
                    .workloads
                    .iter()
                    .map(|w| format!("{} to {}", w.describe(), w.replicas))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            errors.join("; ")
        }),
    }
}

/// Runs `cmd` with `sh -c`; its output goes to stderr.
async fn shell(what: &str, cmd: &str) -> Step {
    let t = Instant::now();
    let c = cmd.to_string();
    let r = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&c)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(std::io::stderr()))
            .status()
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let (ok, detail) = match r {
        Ok(s) if s.success() => (true, None),
        Ok(s) => (false, Some(format!("`{cmd}` exited with {s}"))),
        Err(e) => (false, Some(format!("`{cmd}` could not run: {e}"))),
    };
    Step {
        name: what.into(),
        ok,
        duration_s: t.elapsed().as_secs_f64(),
        detail,
    }
}

async fn cutover(g: &Global, name: &str, c: &Cutover, args: &PairArgs) -> Result<u8> {
    let env = Env::open(g).await?;
    let (m, rounds) = env.load(name)?;
    let e = migration::estimate(&m, &rounds, ferry_core::forget::now_ns(), env.parallel());
    let est = if c.verify {
        e.downtime_verified_s
    } else {
        e.downtime_s
    };
    if let Some(max) = c.max_downtime_s {
        match est {
            None => bail!(
                "no downtime estimate yet (run `ferry migration presync {name}`): refusing to cut over with --max-downtime; nothing was quiesced"
            ),
            Some(est) if est > max => bail!(
                "estimated downtime {} exceeds --max-downtime {}: run `ferry migration presync {name}` again (or raise the limit); nothing was quiesced",
                seconds(est),
                seconds(max)
            ),
            _ => {}
        }
    }
    let started = Instant::now();
    let mut steps = Vec::new();
    let seq = rounds.last().map(|r| r.seq + 1).unwrap_or(1);
    let mut scaled = None;
    if c.scale_down {
        let (s, sc) = scale_down(&m, args, c.quiesce_timeout).await;
        steps.push(s);
        scaled = sc;
    }
    if let Some(q) = &c.quiesce
        && steps.iter().all(|s| s.ok)
    {
        steps.push(shell("quiesce", q).await);
    }
    if let Some(failed) = steps.iter().find(|s| !s.ok) {
        let mut r = Round {
            seq,
            kind: Some(RoundKind::Cutover),
            started: now_text(),
            started_ns: ferry_core::forget::now_ns(),
            ok: false,
            error: failed.detail.clone(),
            steps: steps.clone(),
            ..Default::default()
        };
        let rolled = rollback(c, &mut r.steps, scaled.as_ref()).await;
        env.store.add_round(name, &r)?;
        bail!(
            "quiesce failed ({}): nothing was copied; the source may be partly quiesced: {}",
            r.error.as_deref().unwrap_or("?"),
            rolled
        );
    }
    // The final delta.
    let mut r = round(&env, &m, seq, RoundKind::Cutover, None, args).await;
    steps.push(Step {
        name: "final delta".into(),
        ok: r.ok,
        duration_s: r.duration_s,
        detail: (!r.ok).then(|| {
            r.pairs
                .iter()
                .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.source)))
                .collect::<Vec<_>>()
                .join("; ")
        }),
    });
    // Verification.
    let mut verified = vec![None; m.pairs.len()];
    if c.verify && r.ok {
        let t = Instant::now();
        let mut all = true;
        for (i, (pair, pr)) in m.pairs.iter().zip(r.pairs.iter_mut()).enumerate() {
            let id = pr.snapshot_id.clone().unwrap_or_default();
            let ct = Instant::now();
            match compare_pair(&env, pair, &id, &CompareOptions::default(), args).await {
                Ok(cmp) => {
                    let mut bad = cmp.missing.clone();
                    bad.extend(cmp.differing.iter().cloned());
                    bad.extend(cmp.extra.iter().cloned());
                    pr.mismatched = bad;
                    verified[i] = Some(pr.mismatched.is_empty());
                }
                Err(e) => {
                    pr.mismatched = vec![format!("could not compare: {}", crate::ui::one_line(&e))];
                    verified[i] = Some(false);
                }
            }
            pr.verify_s = ct.elapsed().as_secs_f64();
            all &= verified[i] == Some(true);
        }
        r.ok = all;
        steps.push(Step {
            name: "verify".into(),
            ok: all,
            duration_s: t.elapsed().as_secs_f64(),
            detail: (!all).then(|| {
                r.pairs
                    .iter()
                    .filter(|p| !p.mismatched.is_empty())
                    .map(|p| {
                        format!(
                            "{}: {} differ ({})",
                            p.target,
                            p.mismatched.len(),
                            p.mismatched
                                .iter()
                                .take(5)
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }),
        });
    }
    let mut outcome = String::new();
    if r.ok {
        if c.scale_up
            && let Some(sc) = &scaled
        {
            steps.push(scale_up_target(&m, args, sc).await);
        }
        if let Some(cmd) = &c.resume {
            steps.push(shell("resume", cmd).await);
        }
        if let Some(s) = steps.iter().rev().find(|s| !s.ok) {
            r.ok = false;
            outcome = format!(
                "every pair is copied{} but resuming failed ({}): start the application on the target by hand",
                if c.verify { " and verified" } else { "" },
                s.detail.clone().unwrap_or_default()
            );
        }
    } else {
        outcome = rollback(c, &mut steps, scaled.as_ref()).await;
    }
    r.steps = steps;
    r.downtime_s = Some(started.elapsed().as_secs_f64());
    r.estimate_s = est;
    r.error = (!r.ok).then(|| outcome.clone());
    env.store.add_round(name, &r)?;
    #[derive(Serialize)]
    struct Out<'a> {
        migration: &'a str,
        ok: bool,
        downtime_s: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        estimate_s: Option<f64>,
        steps: &'a [Step],
        pairs: Vec<Value>,
    }
    let pairs_state: Vec<Value> = m
        .pairs
        .iter()
        .zip(&r.pairs)
        .zip(&verified)
        .map(|((pair, pr), v)| {
            json!({
                "source": pair.source,
                "target": pair.target,
                "state": pair_state(pr, *v),
                "snapshot_id": pr.snapshot_id,
                "bytes_written": pr.bytes_written,
                "duration_s": pr.duration_s(),
                "verify_s": pr.verify_s,
                "mismatched": pr.mismatched,
                "error": pr.error,
            })
        })
        .collect();
    let downtime = r.downtime_s.unwrap_or(0.0);
    print(
        g,
        &Out {
            migration: name,
            ok: r.ok,
            downtime_s: downtime,
            estimate_s: est,
            steps: &r.steps,
            pairs: pairs_state.clone(),
        },
        || {
            let mut s = format!(
                "cutover of {name}: {} in {} (estimated {})",
                if r.ok { "done" } else { "FAILED" },
                seconds(downtime),
                est.map(seconds).unwrap_or_else(|| "?".into())
            );
            for st in &r.steps {
                s.push_str(&format!(
                    "\n  {:<12} {:<6} {}{}",
                    st.name,
                    if st.ok { "ok" } else { "FAILED" },
                    seconds(st.duration_s),
                    st.detail
                        .as_ref()
                        .map(|d| format!("  {d}"))
                        .unwrap_or_default()
                ));
            }
            for (i, p) in pairs_state.iter().enumerate() {
                s.push_str(&format!(
                    "\n  pair {}: {} -> {}: {}",
                    i + 1,
                    p["source"].as_str().unwrap_or(""),
                    p["target"].as_str().unwrap_or(""),
                    p["state"].as_str().unwrap_or("")
                ));
            }
            s
        },
    )?;
    if !r.ok {
        bail!("cutover of {name} failed: {outcome}");
    }
    Ok(0)
}

/// What a pair's target holds after a cutover, in words.
fn pair_state(p: &PairRound, verified: Option<bool>) -> &'static str {
    match (p.ok, verified) {
        (false, _) => "final delta failed: the target is incomplete",
        (true, Some(false)) => "copied, but verification found differences",
        (true, Some(true)) => "copied and verified",
        (true, None) => "copied (not verified)",
    }
}

/// After a failure past the quiesce: the rollback command if given, and
/// what the operator must do.
async fn rollback(c: &Cutover, steps: &mut Vec<Step>, scaled: Option<&Scaled>) -> String {
    let advice = "the source is unchanged (ferry only reads it): resume the application on the source to roll back";
    if let Some(sc) = scaled {
        let s = scale_back(sc).await;
        let ok = s.ok;
        let detail = s.detail.clone().unwrap_or_default();
        steps.push(s);
        if c.rollback.is_none() {
            return if ok {
                format!("rolled back: {detail}")
            } else {
                format!("scaling back failed ({detail}): {advice}")
            };
        }
    }
    match &c.rollback {
        Some(cmd) => {
            let s = shell("rollback", cmd).await;
            let msg = if s.ok {
                "rolled back: the rollback command resumed the source".to_string()
            } else {
                format!(
                    "the rollback command failed ({}): {advice}",
                    s.detail.clone().unwrap_or_default()
                )
            };
            steps.push(s);
            msg
        }
        None => advice.to_string(),
    }
}

async fn report(g: &Global, name: &str, output: Option<PathBuf>, args: &PairArgs) -> Result<u8> {
    let env = Env::open(g).await?;
    let (m, rounds) = env.load(name)?;
    // The snapshot each target should hold: the last successful round's.
    let cutover = rounds
        .iter()
        .rev()
        .find(|r| r.kind == Some(RoundKind::Cutover));
    let mut pairs = Vec::new();
    let mut all_ok = true;
    for (i, pair) in m.pairs.iter().enumerate() {
        let last = rounds
            .iter()
            .rev()
            .filter_map(|r| r.pairs.get(i).filter(|p| p.ok))
            .find(|p| p.snapshot_id.is_some());
        let Some(last) = last else {
            all_ok = false;
            pairs.push(json!({
                "source": pair.source, "target": pair.target, "volume": pair.volume,
                "ok": false, "error": "no round has copied this pair yet",
            }));
            continue;
        };
        let id = last.snapshot_id.clone().expect("filtered");
        let opts = CompareOptions {
            digests: true,
            extra: true,
        };
        let t = Instant::now();
        // A pair that cannot be compared (its target gone, its agent down)
        // is reported as such; the other pairs are still compared.
        let cmp = match compare_pair(&env, pair, &id, &opts, args).await {
            Ok(c) => c,
            Err(e) => {
                all_ok = false;
                pairs.push(json!({
                    "source": pair.source, "target": pair.target, "volume": pair.volume,
                    "kind": pair.kind, "snapshot_id": id, "ok": false,
                    "error": format!("cannot compare: {}", crate::ui::one_line(&e)),
                }));
                continue;
            }
        };
        let ok = cmp.content_equal() && cmp.extra.is_empty();
        all_ok &= ok;
        let timings = cutover.and_then(|c| c.pairs.get(i)).map(|p| {
            json!({
                "snapshot_s": p.snapshot_s, "restore_s": p.restore_s, "verify_s": p.verify_s,
                "bytes_written": p.bytes_written,
            })
        });
        pairs.push(json!({
            "source": pair.source,
            "target": pair.target,
            "volume": pair.volume,
            "kind": pair.kind,
            "snapshot_id": id,
            "ok": ok,
            "files": cmp.files,
            "bytes": cmp.bytes,
            "files_equal": cmp.files_equal,
            "missing": cmp.missing,
            "extra": cmp.extra,
            "differing": cmp.differing,
            "metadata_differences": cmp.metadata,
            "entries": cmp.digests,
            "compare_s": t.elapsed().as_secs_f64(),
            "cutover": timings,
        }));
    }
    let mut doc = json!({
        "format": "ferry-migration-report-v1",
        "migration": m.name,
        "created": m.created,
        "generated": now_text(),
        "ok": all_ok,
        "pairs": pairs,
        "rounds": rounds.iter().map(|r| json!({
            "seq": r.seq, "kind": r.kind, "started": r.started, "duration_s": r.duration_s,
            "ok": r.ok, "estimate_s": r.estimate_s,
            "bytes_written": r.pairs.iter().map(|p| p.bytes_written).sum::<u64>(),
        })).collect::<Vec<_>>(),
        "cutover": cutover.map(|c| json!({
            "started": c.started, "ok": c.ok, "downtime_s": c.downtime_s,
            "estimate_s": c.estimate_s, "steps": c.steps,
        })),
    });
    env.sign(&mut doc).await?;
    let text = if g.json {
        serde_json::to_string_pretty(&doc)? + "\n"
    } else {
        markdown(&doc)
    };
    match output {
        Some(p) => {
            write_new(&p, text.as_bytes())?;
            eprintln!(
                "report of {name} written to {} ({})",
                p.display(),
                if all_ok {
                    "all pairs match"
                } else {
                    "DIFFERENCES FOUND"
                }
            );
        }
        None => print!("{text}"),
    }
    if !all_ok {
        eprintln!(
            "error: migration {name}: some targets differ from their snapshots (see the report)"
        );
        return Ok(1);
    }
    Ok(0)
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.ferry-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The human form of a report.
fn markdown(doc: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let mut out = format!(
        "# Migration report: {}\n\nGenerated {} for vault `{}`. Result: **{}**.\n",
        s(&doc["migration"]),
        s(&doc["generated"]),
        s(&doc["vault"]),
        if doc["ok"].as_bool() == Some(true) {
            "every target matches its snapshot"
        } else {
            "differences found"
        }
    );
    if let Some(c) = doc["cutover"].as_object() {
        out.push_str(&format!(
            "\n## Cutover\n\nStarted {}, {}; downtime {} (estimated {}).\n\n| step | result | seconds |\n| --- | --- | ---: |\n",
            s(&c["started"]),
            if c["ok"].as_bool() == Some(true) { "succeeded" } else { "FAILED" },
            c["downtime_s"].as_f64().map(seconds).unwrap_or_default(),
            c["estimate_s"].as_f64().map(seconds).unwrap_or_else(|| "-".into()),
        ));
        for st in c["steps"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {} | {} | {:.2} |\n",
                s(&st["name"]),
                if st["ok"].as_bool() == Some(true) {
                    "ok"
                } else {
                    "failed"
                },
                st["duration_s"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    out.push_str("\n## Pairs\n\n| # | source | target | files | bytes | equal | missing | extra | differing | metadata |\n| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    let pairs = doc["pairs"].as_array().cloned().unwrap_or_default();
    for (i, p) in pairs.iter().enumerate() {
        let len = |k: &str| p[k].as_array().map(|a| a.len()).unwrap_or(0);
        out.push_str(&format!(
            "| {} | `{}` | `{}` | {} | {} | {} | {} | {} | {} | {} |\n",
            i + 1,
            s(&p["source"]),
            s(&p["target"]),
            n(&p["files"]),
            human_bytes(n(&p["bytes"])),
            n(&p["files_equal"]),
            len("missing"),
            len("extra"),
            len("differing"),
            len("metadata_differences"),
        ));
    }
    for (i, p) in pairs.iter().enumerate() {
        let mut lines = Vec::new();
        for k in ["missing", "extra", "differing"] {
            for e in p[k].as_array().into_iter().flatten() {
                lines.push(format!("- {k}: `{}`", s(e)));
            }
        }
        for d in p["metadata_differences"].as_array().into_iter().flatten() {
            lines.push(format!(
                "- metadata: `{}`: {}",
                s(&d["path"]),
                d["fields"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(e) = p["error"].as_str() {
            lines.push(format!("- {e}"));
        }
        if !lines.is_empty() {
            out.push_str(&format!(
                "\n### Pair {}: differences\n\n{}\n",
                i + 1,
                lines.join("\n")
            ));
        }
    }
    out.push_str("\n## Rounds\n\n| # | kind | started | seconds | written | estimate |\n| ---: | --- | --- | ---: | ---: | ---: |\n");
    for r in doc["rounds"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {} | {} |\n",
            n(&r["seq"]),
            s(&r["kind"]),
            s(&r["started"]),
            r["duration_s"].as_f64().unwrap_or(0.0),
            human_bytes(n(&r["bytes_written"])),
            r["estimate_s"]
                .as_f64()
                .map(seconds)
                .unwrap_or_else(|| "-".into())
        ));
    }
    out.push_str(&format!(
        "\nPer-file content digests are in the JSON report (`--json`), signed: `{}`.\n",
        s(&doc["signature"])
    ));
    out
}

async fn verify_report(g: &Global, file: &Path) -> Result<u8> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let doc: Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a JSON report (write it with --json)",
            file.display()
        )
    })?;
    if let Err(e) = serde_json::from_str::<migration::NoRepeatedKeys>(&text) {
        bail!(
            "{}: {e}: a report whose keys repeat reads one way and verifies another; refused",
            file.display()
        );
    }
    let env = Env::open(g).await?;
    match env.verify(&doc).await? {
        Ok(()) => {
            print(
                g,
                &json!({"file": file.display().to_string(), "valid": true, "migration": doc["migration"], "ok": doc["ok"]}),
                || {
                    format!(
                        "{}: valid signature: report of migration {} generated {}",
                        file.display(),
                        doc["migration"].as_str().unwrap_or("?"),
                        doc["generated"].as_str().unwrap_or("?")
                    )
                },
            )?;
            Ok(0)
        }
        Err(e) => bail!("{}: {e}", file.display()),
    }
}
