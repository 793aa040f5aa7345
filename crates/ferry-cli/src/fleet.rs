//! Fleet-mode commands: run the coordinator or an agent, submit jobs to
//! agents and follow them, list agents and jobs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use ferry_catalog::SqliteCatalog;
use ferry_catalog::jobs::JobQueue;
use ferry_fleet::client::FleetClient;
use ferry_fleet::conn::ConnectOptions;
use ferry_fleet::proto::{AgentInfo, JobInfo};
use ferry_fleet::spec::JobSpec;
use serde::Serialize;
use serde_json::Value;

use crate::commands::{print, restore_text, snapshot_text};
use crate::ui::{Bar, human_bytes};
use crate::{DeltaArgs, Global, RemoteArgs};

/// How long client calls keep retrying a coordinator that is restarting.
const PATIENCE: Duration = Duration::from_secs(300);

/// The shared token: from --token-file (or FERRY_TOKEN_FILE), else FERRY_TOKEN.
fn token(g: &Global) -> Result<Option<String>> {
    Ok(match &g.token_file {
        Some(f) => Some(ferry_fleet::conn::read_token(f)?),
        None => std::env::var("FERRY_TOKEN").ok().filter(|t| !t.is_empty()),
    })
}

fn connect_options(g: &Global, url: &str) -> Result<ConnectOptions> {
    let token = token(g)?;
    Ok(ConnectOptions {
        url: url.to_string(),
        token,
        tls_ca: g.tls_ca.clone(),
    })
}

pub fn fleet_client(g: &Global) -> Result<FleetClient> {
    let url = g.coordinator.as_deref().ok_or_else(|| {
        anyhow!("no coordinator given: pass --coordinator URL or set FERRY_COORDINATOR")
    })?;
    Ok(FleetClient::connect(&connect_options(g, url)?, PATIENCE)?)
}

/// The coordinator's catalog as a client sees it: `ferry migration` keeps
/// its record there.
pub fn remote_catalog(g: &Global) -> Result<ferry_fleet::remote::RemoteCatalog> {
    let url = g.coordinator.as_deref().ok_or_else(|| {
        anyhow!("no coordinator given: pass --coordinator URL or set FERRY_COORDINATOR")
    })?;
    Ok(ferry_fleet::remote::RemoteCatalog::connect(
        &connect_options(g, url)?,
        PATIENCE,
    )?)
}

/// Submits a job to `agent` and follows it to its end: its exit code and
/// result, or its failure as an error.
pub async fn run_and_wait(
    client: &FleetClient,
    agent: &str,
    spec: &JobSpec,
) -> Result<(u8, Value)> {
    let job = client.submit(agent, spec).await?;
    wait_for(client, &job).await
}

/// Follows a submitted job to its end: its exit code and summary.
pub async fn wait_for(
    client: &FleetClient,
    job: &ferry_fleet::proto::JobInfo,
) -> Result<(u8, Value)> {
    let done = follow(client, job).await?;
    outcome(&done)
}

/// The client for a job in fleet mode, or None for embedded mode.
pub fn client(g: &Global, remote: &RemoteArgs) -> Result<Option<FleetClient>> {
    match (&g.coordinator, &remote.agent) {
        (None, None) if !remote.wait => Ok(None),
        (None, _) => bail!("--agent and --wait need --coordinator URL (or FERRY_COORDINATOR)"),
        (Some(_), None) => {
            bail!("with --coordinator, name the agent that runs the job: --agent NAME")
        }
        (Some(_), Some(_)) => Ok(Some(fleet_client(g)?)),
    }
}

/// A path for a job on an agent's node: must be absolute, since it means
/// nothing relative to this shell's directory.
pub fn absolute(p: &Path) -> Result<PathBuf> {
    if !p.is_absolute() {
        bail!(
            "{}: give an absolute path (the job runs on the agent's node)",
            p.display()
        );
    }
    Ok(p.to_path_buf())
}

/// Submits a job; with --wait follows it and exits with its status.
pub async fn run_job(
    g: &Global,
    client: &FleetClient,
    remote: &RemoteArgs,
    spec: JobSpec,
) -> Result<u8> {
    let agent = remote.agent.as_deref().expect("checked by client()");
    let job = client.submit(agent, &spec).await?;
    if !remote.wait {
        let why = why_queued(client, job.id).await;
        #[derive(Serialize)]
        struct Out<'a> {
            job: u64,
            agent: &'a str,
            kind: &'a str,
            state: &'a str,
        }
        print(
            g,
            &Out {
                job: job.id,
                agent,
                kind: &job.kind,
                state: &job.state,
            },
            || match &why {
                Some(w) => format!("job {} ({}) queued on agent {agent}: {w}", job.id, job.kind),
                None => format!("job {} ({}) queued on agent {agent}", job.id, job.kind),
            },
        )?;
        return Ok(0);
    }
    let done = follow(client, &job).await?;
    let (code, result) = outcome(&done)?;
    print(g, &result, || human_result(&done, &result))?;
    Ok(code)
}

/// Waits for a job with a progress bar, saying why when it stays queued
/// (its agent offline or busy): a wait that says nothing looks like a hang.
pub async fn follow(client: &FleetClient, job: &JobInfo) -> Result<JobInfo> {
    let bar = Bar::new(&format!("{} on {}", job.kind, job.agent));
    let waiting = client.wait(job.id, |p| bar.set(p.bytes, p.total_bytes));
    tokio::pin!(waiting);
    let mut ask =
        tokio::time::interval_at(tokio::time::Instant::now() + QUEUED_FIRST, QUEUED_EVERY);
    let mut told = None;
    let r = loop {
        tokio::select! {
            r = &mut waiting => break r,
            _ = ask.tick() => {
                let why = why_queued(client, job.id).await;
                if let Some(w) = why.as_ref().filter(|w| told.as_ref() != Some(*w)) {
                    bar.note(&format!(
                        "job {} waits: {w} (Ctrl-C stops waiting; the job stays queued)",
                        job.id
                    ));
                }
                told = why;
            }
        }
    };
    bar.finish();
    Ok(r?)
}

/// How long a job may sit queued before `follow` asks why, and how often.
const QUEUED_FIRST: Duration = Duration::from_secs(2);
const QUEUED_EVERY: Duration = Duration::from_secs(5);

/// Why job `id` is still queued, if it is and the coordinator says (see
/// [`queued_because`]). A failed call is no reason (the wait itself
/// reports a coordinator that is gone).
async fn why_queued(client: &FleetClient, id: u64) -> Option<String> {
    let j = client.job(id).await.ok()?;
    if j.state != "queued" {
        return None;
    }
    queued_because(&j, &client.agents().await.ok()?)
}

/// Why the queued job `j` waits: its agent never connected, is offline, or
/// runs another job; none of these, no reason.
fn queued_because(j: &JobInfo, agents: &[AgentInfo]) -> Option<String> {
    match agents.iter().find(|a| a.name == j.agent) {
        None => Some(format!(
            "agent {} has not connected to the coordinator yet; the job starts when it does",
            j.agent
        )),
        Some(a) if !a.online => Some(format!(
            "agent {} is offline (last seen {}); the job starts when it reconnects",
            a.name,
            ferry_core::vault::format_rfc3339(a.last_seen)
        )),
        Some(a) if a.running_job != 0 && a.running_job != j.id => Some(format!(
            "agent {} is running job {} first",
            a.name, a.running_job
        )),
        Some(_) => None,
    }
}

/// A finished job's exit code and summary (with its job id and agent), or
/// its failure as an error.
fn outcome(job: &JobInfo) -> Result<(u8, Value)> {
    if job.state != "done" {
        bail!(
            "job {} ({}) on agent {} failed: {}",
            job.id,
            job.kind,
            job.agent,
            if job.error.is_empty() {
                "no reason given"
            } else {
                &job.error
            }
        );
    }
    let mut v: Value = serde_json::from_str(&job.result_json)
        .with_context(|| format!("job {}: unreadable result", job.id))?;
    if let Value::Object(m) = &mut v {
        m.insert("job".into(), Value::from(job.id));
        m.insert("agent".into(), Value::from(job.agent.clone()));
    }
    if job.exit_code == 3 {
        eprintln!(
            "warning: job {}: the snapshot is incomplete: some entries could not be read",
            job.id
        );
    }
    Ok((u8::try_from(job.exit_code).unwrap_or(1), v))
}

fn human_result(job: &JobInfo, v: &Value) -> String {
    let head = format!("job {} on agent {}: ", job.id, job.agent);
    match job.kind.as_str() {
        "snapshot" => match serde_json::from_value(v.clone()) {
            Ok(s) => head + &snapshot_text(&s),
            Err(_) => head + &v.to_string(),
        },
        _ => {
            let target = serde_json::from_str::<JobSpec>(&job.spec_json)
                .ok()
                .and_then(|s| s.path().map(Path::to_path_buf))
                .unwrap_or_default();
            match serde_json::from_value(v.clone()) {
                Ok(s) => head + &restore_text(&s, &target),
                Err(_) => head + &v.to_string(),
            }
        }
    }
}

pub struct SyncJob {
    pub source: PathBuf,
    pub target: PathBuf,
    pub volume: Option<String>,
    pub reread: bool,
    pub block: bool,
    pub delta: DeltaArgs,
    pub from_agent: Option<String>,
    pub to_agent: Option<String>,
}

/// `ferry sync` across two agents: a snapshot job on one, and a restore
/// job on the other that checks its target meanwhile and restores exactly
/// that snapshot.
pub async fn sync(g: &Global, s: SyncJob) -> Result<u8> {
    let (Some(from), Some(to)) = (&s.from_agent, &s.to_agent) else {
        bail!(
            "sync with a coordinator needs --coordinator URL, --from-agent NAME and --to-agent NAME"
        );
    };
    let client = fleet_client(g)?;
    let started = std::time::Instant::now();
    let source = absolute(&s.source)?;
    let target = absolute(&s.target)?;
    let volume = s
        .volume
        .clone()
        .unwrap_or_else(|| crate::commands::default_volume(&source));
    let snap_job = client
        .submit(
            from,
            &JobSpec::Snapshot {
                source,
                volume: volume.clone(),
                reread: s.reread,
                block: s.block,
                read_limit: None,
            },
        )
        .await?;
    // The restore is queued at once: the target's agent checks the target
    // while the snapshot is taken, then restores the snapshot it made.
    let restore_job = client
        .submit(
            to,
            &JobSpec::Restore {
                snapshot: volume.clone(),
                target,
                delete: s.delta.delete,
                verify: s.delta.verify,
                reread_target: s.delta.reread_target,
                after: Some(ferry_fleet::spec::After {
                    job: snap_job.id,
                    whole: false,
                }),
            },
        )
        .await?;
    let submitted_at = started.elapsed().as_secs_f64();
    let snap_done = follow(&client, &snap_job).await?;
    let (snap_code, snap) = outcome(&snap_done)?;
    let snapshot_id = snap
        .get("snapshot_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("job {}: no snapshot id in its result", snap_done.id))?
        .to_string();
    let restore_done = follow(&client, &restore_job).await?;
    let (_, restore) = outcome(&restore_done)?;
    // Its phases count from when it stopped waiting for the snapshot.
    let restore_at = submitted_at
        + restore
            .get("waited_s")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
    #[derive(Serialize)]
    struct Out<'a> {
        snapshot_id: &'a str,
        bytes_written: u64,
        duration_s: f64,
        report: Vec<ferry_core::phase::Phase>,
        snapshot: &'a Value,
        restore: &'a Value,
    }
    let phases = |v: &Value| -> Vec<ferry_core::phase::Phase> {
        v.get("report")
            .and_then(|r| serde_json::from_value(r.clone()).ok())
            .unwrap_or_default()
    };
    let out = Out {
        snapshot_id: &snapshot_id,
        bytes_written: restore
            .get("bytes_written")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        duration_s: started.elapsed().as_secs_f64(),
        report: crate::commands::sync_report(&phases(&snap), 0.0, &phases(&restore), restore_at),
        snapshot: &snap,
        restore: &restore,
    };
    print(g, &out, || {
        format!(
            "{}\n{}",
            human_result(&snap_done, &snap),
            human_result(&restore_done, &restore)
        )
    })?;
    Ok(snap_code)
}

pub async fn coordinator(
    g: &Global,
    listen: SocketAddr,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    lease_seconds: u64,
) -> Result<u8> {
    let token = token(g)?;
    let tls = match (&tls_cert, &tls_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        )),
        _ => None,
    };
    if lease_seconds == 0 {
        bail!("--lease-seconds must be at least 1");
    }
    let loc = crate::commands::location_of(None, g)?;
    let vault = ferry_core::vault::Vault::open(&loc, &crate::commands::passphrase(g)?).await?;
    let path = crate::commands::catalog_path(g, &vault);
    let (catalog, fresh) = SqliteCatalog::open(&path, vault.id())?;
    ferry_core::sync::sync_catalog(&vault, &catalog, fresh).await?;
    let queue = JobQueue::open(&path)?;
    let opts = ferry_fleet::coordinator::CoordinatorOptions {
        listen,
        token,
        tls,
        lease: Duration::from_secs(lease_seconds),
        vault_location: loc.to_string(),
        vault_id: vault.id().to_string(),
        keys: vault.master_keys().clone(),
        bucket_state_dir: path.with_extension("buckets"),
    };
    let listener = ferry_fleet::coordinator::bind(&opts).await?;
    let addr = listener.local_addr().context("listening socket")?;
    // One line on stdout, for scripts (and tests) that asked for port 0.
    println!(
        "coordinator listening on {}://{addr} (catalog {}, vault {})",
        if opts.tls.is_some() { "https" } else { "http" },
        path.display(),
        loc
    );
    ferry_fleet::coordinator::serve(
        listener,
        Arc::new(catalog),
        Arc::new(queue),
        opts,
        shutdown_signal(),
    )
    .await?;
    Ok(0)
}

pub async fn agent(
    g: &Global,
    name: String,
    roots: Vec<PathBuf>,
    config: Option<PathBuf>,
) -> Result<u8> {
    let url = g
        .coordinator
        .as_deref()
        .ok_or_else(|| anyhow!("an agent needs --coordinator URL (or FERRY_COORDINATOR)"))?;
    let opts = ferry_fleet::agent::AgentOptions {
        connect: connect_options(g, url)?,
        name,
        roots,
        vault: g.vault.clone(),
        patience: PATIENCE,
        bucket_config: ferry_bucket::config::Config::load(config.as_deref())?,
    };
    let agent = ferry_fleet::agent::Agent::new(opts)?;
    agent.run(shutdown_signal()).await?;
    Ok(0)
}

async fn shutdown_signal() {
    interrupted().await;
}

/// Waits for Ctrl-C or SIGTERM; returns the shell's exit code for it
/// (130 or 143).
pub(crate) async fn interrupted() -> u8 {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => 130,
                _ = term.recv() => 143,
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            130
        }
    }
}

pub async fn agents(g: &Global) -> Result<u8> {
    let agents = fleet_client(g)?.agents().await?;
    #[derive(Serialize)]
    struct A<'a> {
        name: &'a str,
        online: bool,
        host: &'a str,
        version: &'a str,
        roots: &'a [String],
        last_seen: String,
        running_job: Option<u64>,
    }
    let list: Vec<A> = agents
        .iter()
        .map(|a| A {
            name: &a.name,
            online: a.online,
            host: &a.host,
            version: &a.version,
            roots: &a.roots,
            last_seen: ferry_core::vault::format_rfc3339(a.last_seen),
            running_job: (a.running_job != 0).then_some(a.running_job),
        })
        .collect();
    #[derive(Serialize)]
    struct Out<'a> {
        agents: &'a [A<'a>],
    }
    print(g, &Out { agents: &list }, || {
        let mut s = format!(
            "{:<20} {:<8} {:<20} {:<8} {:<21} ROOTS",
            "NAME", "STATE", "HOST", "JOB", "LAST SEEN"
        );
        for a in &list {
            s.push_str(&format!(
                "\n{:<20} {:<8} {:<20} {:<8} {:<21} {}",
                a.name,
                if a.online { "online" } else { "offline" },
                a.host,
                a.running_job.map(|j| j.to_string()).unwrap_or("-".into()),
                a.last_seen,
                a.roots.join(",")
            ));
        }
        s.push_str(&format!("\n{} agent(s)", list.len()));
        s
    })?;
    Ok(0)
}

#[derive(Serialize)]
struct JobOut {
    id: u64,
    agent: String,
    kind: String,
    state: String,
    attempt: u32,
    exit_code: Option<i32>,
    spec: Value,
    progress: Option<Value>,
    result: Option<Value>,
    error: Option<String>,
    created: String,
    started: Option<String>,
    finished: Option<String>,
}

fn job_out(j: &JobInfo) -> JobOut {
    let json = |s: &str| serde_json::from_str::<Value>(s).ok();
    let time = |t: i64| (t != 0).then(|| ferry_core::vault::format_rfc3339(t));
    JobOut {
        id: j.id,
        agent: j.agent.clone(),
        kind: j.kind.clone(),
        state: j.state.clone(),
        attempt: j.attempt,
        exit_code: (j.exit_code >= 0).then_some(j.exit_code),
        spec: json(&j.spec_json).unwrap_or(Value::Null),
        progress: json(&j.progress_json),
        result: json(&j.result_json),
        error: (!j.error.is_empty()).then(|| j.error.clone()),
        created: ferry_core::vault::format_rfc3339(j.created),
        started: time(j.started),
        finished: time(j.finished),
    }
}

pub async fn jobs(g: &Global, id: Option<u64>) -> Result<u8> {
    let client = fleet_client(g)?;
    let jobs = match id {
        Some(id) => vec![client.job(id).await?],
        None => client.jobs().await?,
    };
    let list: Vec<JobOut> = jobs.iter().map(job_out).collect();
    #[derive(Serialize)]
    struct Out<'a> {
        jobs: &'a [JobOut],
    }
    print(g, &Out { jobs: &list }, || {
        let mut s = format!(
            "{:<6} {:<9} {:<16} {:<8} {:<21} {:>10}  DETAIL",
            "ID", "KIND", "AGENT", "STATE", "CREATED", "BYTES"
        );
        for (j, o) in jobs.iter().zip(&list) {
            // Finished: what it read (snapshot) or wrote (restore); else progress.
            let bytes = o
                .result
                .as_ref()
                .and_then(|r| r.get("bytes_scanned").or_else(|| r.get("bytes_written")))
                .or_else(|| o.progress.as_ref().and_then(|p| p.get("bytes")))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let detail = match j.state.as_str() {
                "failed" => j.error.clone(),
                _ => match serde_json::from_str::<JobSpec>(&j.spec_json) {
                    Ok(JobSpec::BucketSync(b)) => format!("{} -> {}", b.source, b.destination),
                    Ok(s) => s
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                },
            };
            s.push_str(&format!(
                "\n{:<6} {:<9} {:<16} {:<8} {:<21} {:>10}  {}",
                j.id,
                j.kind,
                j.agent,
                j.state,
                o.created,
                human_bytes(bytes),
                detail
            ));
        }
        s.push_str(&format!("\n{} job(s)", list.len()));
        s
    })?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_job_says_what_its_agent_is_doing() {
        let job = JobInfo {
            id: 7,
            agent: "node1".into(),
            state: "queued".into(),
            ..Default::default()
        };
        let agent = |online: bool, running_job: u64| AgentInfo {
            name: "node1".into(),
            online,
            running_job,
            last_seen: 1_700_000_000,
            ..Default::default()
        };
        let other = AgentInfo {
            name: "node2".into(),
            online: true,
            ..Default::default()
        };
        let why = |agents: &[AgentInfo]| queued_because(&job, agents);
        assert!(
            why(std::slice::from_ref(&other))
                .unwrap()
                .contains("has not connected")
        );
        let offline = why(&[other.clone(), agent(false, 0)]).unwrap();
        assert!(
            offline.contains("node1 is offline (last seen 2023-11-14T22:13:20Z)"),
            "{offline}"
        );
        assert_eq!(
            why(&[agent(true, 5)]).unwrap(),
            "agent node1 is running job 5 first"
        );
        // Idle, or already on this job (it is about to show as running).
        assert_eq!(why(&[agent(true, 0)]), None);
        assert_eq!(why(&[agent(true, 7)]), None);
    }
}
