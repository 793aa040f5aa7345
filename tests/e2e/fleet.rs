//! Fleet mode: a real coordinator and real agents (separate `ferry`
//! processes) over gRPC on loopback, a real S3 server as the vault.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// A child process killed (SIGKILL) when dropped.
pub(crate) struct Proc(Child);

impl Proc {
    pub(crate) fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The URL a coordinator prints on its first stdout line.
fn coordinator_url(child: &mut Child, scheme: &str) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.split_whitespace()
        .find(|w| w.starts_with(scheme))
        .unwrap_or_else(|| panic!("no {scheme} URL in {line:?}"))
        .to_string()
}

pub(crate) struct Fleet {
    pub(crate) env: Env,
    s3: S3Server,
    pub(crate) url: String,
    port: u16,
    token_file: PathBuf,
    coordinator: Option<Proc>,
    agents: Vec<(String, Proc)>,
    /// More arguments for every start of the coordinator.
    coordinator_args: Vec<String>,
}

const LEASE: &str = "3";

impl Fleet {
    /// An S3 vault (1 MiB packs, so that jobs write many), a token, and a
    /// coordinator on a free loopback port.
    pub(crate) fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`Fleet::start`], the coordinator with more arguments.
    pub(crate) fn start_with(coordinator_args: &[&str]) -> Self {
        let mut env = Env::new();
        let s3 = S3Server::start(&env.path("s3"));
        s3.create_bucket("vault");
        s3.env(&mut env);
        let out = env.run(&["vault", "init", "s3://vault/fleet", "--pack-size", "1M"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let token_file = env.path("token");
        std::fs::write(&token_file, "s3cret-token\n").unwrap();
        let mut f = Fleet {
            env,
            s3,
            url: String::new(),
            port: 0,
            token_file,
            coordinator: None,
            agents: Vec::new(),
            coordinator_args: Vec::new(),
        };
        f.coordinator_args = coordinator_args.iter().map(|a| a.to_string()).collect();
        f.start_coordinator();
        f
    }

    fn start_coordinator(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        let catalog = self.env.path("coordinator.sqlite");
        let mut c = self.env.cmd(&[
            "coordinator",
            "--listen",
            &listen,
            "--vault",
            "s3://vault/fleet",
            "--catalog",
            catalog.to_str().unwrap(),
            "--lease-seconds",
            LEASE,
        ]);
        c.args(&self.coordinator_args)
            .arg("--token-file")
            .arg(&self.token_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().unwrap();
        let url = coordinator_url(&mut child, "http://");
        self.port = url.rsplit(':').next().unwrap().parse().unwrap();
        self.url = url;
        self.coordinator = Some(Proc(child));
    }

    /// An agent with its own state directory and no passphrase: it gets
    /// the keys from the coordinator.
    pub(crate) fn start_agent(&mut self, name: &str, root: &Path) {
        self.start_agent_with(name, root, &[]);
    }

    pub(crate) fn start_agent_with(&mut self, name: &str, root: &Path, extra: &[&str]) {
        std::fs::create_dir_all(root).unwrap();
        let mut c = self.env.cmd(&["agent", "--name", name]);
        c.args(extra);
        c.arg("--root")
            .arg(root)
            .args(["--coordinator", &self.url, "--token-file"])
            .arg(&self.token_file)
            .env_remove("FERRY_PASSPHRASE")
            .env("XDG_STATE_HOME", self.env.path(&format!("agent-{name}")))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.agents.push((name.into(), Proc(c.spawn().unwrap())));
        self.wait_online(name);
    }

    /// An agent running as nobody (when the tests run as root): files
    /// it may not read stay unreadable to it.
    pub(crate) fn start_agent_unprivileged(&mut self, name: &str, root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(root).unwrap();
        let state = self.env.path(&format!("agent-{name}"));
        std::fs::create_dir_all(&state).unwrap();
        for p in [self.env.dir.path(), state.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        std::fs::set_permissions(&self.token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let base = self.env.cmd(&[]);
        let mut c = std::process::Command::new(if is_root() { "setpriv" } else { "env" });
        if is_root() {
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"]);
        }
        c.arg(env!("CARGO_BIN_EXE_ferry"));
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.args(["agent", "--name", name, "--root"])
            .arg(root)
            .args(["--coordinator", &self.url, "--token-file"])
            .arg(&self.token_file)
            .env_remove("FERRY_PASSPHRASE")
            .env("XDG_STATE_HOME", &state)
            .env("HOME", &state)
            .env_remove("XDG_CONFIG_HOME")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        self.agents.push((name.into(), Proc(c.spawn().unwrap())));
        self.wait_online(name);
    }

    pub(crate) fn agent_mut(&mut self, name: &str) -> &mut Proc {
        &mut self.agents.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    fn wait_online(&self, name: &str) {
        let start = Instant::now();
        loop {
            let v = self.json(&["agents"]);
            if v["agents"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["name"] == name && a["online"] == true)
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent {name} never came online: {v}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ferry ARGS --coordinator URL --token-file F`.
    pub(crate) fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut c = self.env.cmd(args);
        c.args(["--coordinator", &self.url, "--token-file"])
            .arg(&self.token_file)
            .env_remove("FERRY_PASSPHRASE");
        c
    }

    pub(crate) fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().unwrap()
    }

    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cmd(args).arg("--json").output().unwrap();
        assert!(out.status.success(), "ferry {args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn packs_in_vault(&self) -> usize {
        let dir = self.s3.root.join("vault/fleet/packs");
        if dir.exists() {
            files_under(&dir).len()
        } else {
            0
        }
    }

    /// Waits until the vault holds at least `n` packs.
    fn wait_packs(&self, n: usize) {
        let start = Instant::now();
        while self.packs_in_vault() < n {
            assert!(start.elapsed() < Duration::from_secs(60), "no packs appear");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_snapshot_on_one_agent_restores_on_another_and_dedups_across_the_fleet() {
    let mut f = Fleet::start();
    let (src_root, dst_root) = (f.env.path("node1"), f.env.path("node2"));
    let src = src_root.join("pvc-db");
    make_tree(&src);
    f.start_agent("node1", &src_root);
    f.start_agent("node2", &dst_root);

    let agents = f.json(&["agents"]);
    assert_eq!(agents["agents"].as_array().unwrap().len(), 2, "{agents}");

    let snap = f.json(&[
        "snapshot",
        s(&src),
        "--volume",
        "db",
        "--agent",
        "node1",
        "--wait",
    ]);
    assert_eq!(snap["agent"], "node1");
    assert!(snap["bytes_new"].as_u64().unwrap() > 0, "{snap}");
    let rpcs = snap["catalog_rpcs"].as_u64().unwrap();
    let chunks = snap["chunks"].as_u64().unwrap();
    assert!(
        rpcs < chunks,
        "dedup lookups must be batched: {rpcs} RPCs for {chunks} chunks"
    );

    let target = dst_root.join("restored");
    let r = f.json(&[
        "restore",
        "db",
        s(&target),
        "--agent",
        "node2",
        "--wait",
        "--verify",
    ]);
    assert_eq!(r["agent"], "node2");
    assert_eq!(r["snapshot_id"], snap["snapshot_id"]);
    assert!(r["files_verified"].as_u64().unwrap() > 0);
    assert_same_tree(&src, &target);

    // The same content snapshotted by the other agent: nothing new stored.
    let copy = f.json(&[
        "snapshot",
        s(&target),
        "--volume",
        "copy",
        "--agent",
        "node2",
        "--wait",
    ]);
    assert_eq!(copy["bytes_new"], 0, "{copy}");
    assert_eq!(copy["chunks_new"], 0, "{copy}");

    // A change on node1, pre-sync again, and a sync job pair moves only it.
    std::fs::write(src.join("new-file"), noise(200_000, 9)).unwrap();
    let sync_args = [
        "sync",
        s(&src),
        s(&target),
        "--volume",
        "db",
        "--from-agent",
        "node1",
        "--to-agent",
        "node2",
        "--delete",
    ];
    let sync = f.json(&sync_args);
    assert_eq!(sync["bytes_written"], 200_000, "{sync}");
    assert_same_tree(&src, &target);

    // Jobs are listed with their outcome.
    let jobs = f.json(&["jobs"]);
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 5);
    assert!(jobs.iter().all(|j| j["state"] == "done"), "{jobs:?}");

    // Directories cost neither walk a round trip each: the parent's trees
    // (and the target's old ones) come many per call, and a tree the
    // parent has at the same place is not looked up.
    for d in 0..300 {
        let dir = src.join(format!("many/d{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), format!("file {d}")).unwrap();
    }
    f.json(&sync_args);
    std::fs::write(src.join("many/d150/f"), b"changed").unwrap();
    let again = f.json(&sync_args);
    assert_eq!(again["restore"]["files_written"], 1, "{again}");
    assert_same_tree(&src, &target);
    for side in ["snapshot", "restore"] {
        let rpcs = again[side]["catalog_rpcs"].as_u64().unwrap();
        let calls = &again[side]["catalog_calls"];
        assert!(
            rpcs < 40,
            "{side}: {rpcs} catalog calls for 300 directories: {calls}"
        );
        let summed: u64 = calls
            .as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(summed, rpcs, "{calls}");
    }

    // The vault holds what the agents wrote: the embedded CLI, with the
    // passphrase and a catalog of its own, sees every snapshot and checks it.
    let check = f
        .env
        .json(&["vault", "check", "s3://vault/fleet", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["snapshots"], 5, "{check}");

    // With the coordinator named, `ferry snapshots` lists its vault's
    // snapshots (no embedded catalog on this machine has any).
    let listed = f.json(&["snapshots"]);
    let listed = listed["snapshots"].as_array().unwrap();
    assert_eq!(listed.len(), 5, "{listed:?}");
    let db = f.json(&["snapshots", "db"]);
    let db = db["snapshots"].as_array().unwrap();
    assert!(!db.is_empty() && db.len() < 5, "{db:?}");
    assert!(db.iter().all(|s| s["volume"] == "db"), "{db:?}");
}

#[test]
fn tokens_roots_and_bad_requests_are_refused_with_one_line() {
    let mut f = Fleet::start();
    let (root1, root2) = (f.env.path("node1"), f.env.path("node2"));
    make_tree(&root1.join("vol"));
    f.start_agent("node1", &root1);

    // Wrong token, no token.
    std::fs::write(f.env.path("bad-token"), "guess\n").unwrap();
    let out = f
        .env
        .cmd(&["agents", "--coordinator", &f.url, "--token-file"])
        .arg(f.env.path("bad-token"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("wrong token"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = f.env.run(&["agents", "--coordinator", &f.url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("token is required"),
        "{}",
        stderr(&out)
    );

    // A job outside the agent's roots fails, and nothing is written there.
    let outside = root2.join("escape");
    let snap = f.json(&[
        "snapshot",
        s(&root1.join("vol")),
        "--volume",
        "v",
        "--agent",
        "node1",
        "--wait",
    ]);
    assert!(snap["files"].as_u64().unwrap() > 0);
    let out = f.run(&["restore", "v", s(&outside), "--agent", "node1", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("outside this agent's roots"),
        "{}",
        stderr(&out)
    );
    assert!(!outside.exists());
    // Through a symlink planted under the root: still refused.
    std::fs::create_dir_all(&root2).unwrap();
    std::os::unix::fs::symlink(&root2, root1.join("link")).unwrap();
    let out = f.run(&[
        "restore",
        "v",
        s(&root1.join("link/x")),
        "--agent",
        "node1",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("outside this agent's roots"),
        "{}",
        stderr(&out)
    );
    assert!(!root2.join("x").exists());

    // Unknown agent, unknown snapshot, relative path.
    let out = f.run(&["snapshot", s(&root1), "--volume", "v", "--agent", "ghost"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no agent named ghost"),
        "{}",
        stderr(&out)
    );
    let out = f.run(&[
        "restore",
        "nope",
        s(&root1.join("t")),
        "--agent",
        "node1",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    let out = f.run(&[
        "snapshot",
        "relative/dir",
        "--volume",
        "v",
        "--agent",
        "node1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("absolute"), "{}", stderr(&out));

    // Without a token the coordinator will not listen beyond loopback.
    let out = f.env.run(&[
        "coordinator",
        "--listen",
        "0.0.0.0:0",
        "--vault",
        "s3://vault/fleet",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("without a token"), "{}", stderr(&out));

    // Secrets stay out of the process list.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", f.agents[0].1.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("s3cret-token"));
}

#[test]
fn a_job_survives_a_coordinator_kill_and_a_killed_agent_fails_then_resumes() {
    let mut f = Fleet::start();
    let (root1, root2) = (f.env.path("node1"), f.env.path("node2"));
    let src = root1.join("big");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..12u64 {
        std::fs::write(src.join(format!("f{i}")), noise(2_000_000, i)).unwrap();
    }
    f.start_agent("node1", &root1);
    f.start_agent("node2", &root2);

    // Coordinator killed with -9 while packs are being uploaded, restarted
    // on the same port: the job completes.
    f.s3.put_delay_ms
        .store(300, std::sync::atomic::Ordering::Relaxed);
    let waiter = f
        .cmd(&[
            "snapshot",
            s(&src),
            "--volume",
            "big",
            "--agent",
            "node1",
            "--wait",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    f.wait_packs(2);
    f.coordinator.as_mut().unwrap().kill9();
    assert!(f.packs_in_vault() < 20, "the job ended before the kill");
    std::thread::sleep(Duration::from_millis(1500));
    f.start_coordinator();
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["files"], 12);
    f.s3.put_delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    let target = root2.join("big");
    f.json(&[
        "restore",
        "big",
        s(&target),
        "--agent",
        "node2",
        "--wait",
        "--verify",
    ]);
    assert_same_tree(&src, &target);

    // An agent killed mid-job: the job fails when its lease expires.
    for i in 0..12u64 {
        std::fs::write(src.join(format!("g{i}")), noise(2_000_000, 100 + i)).unwrap();
    }
    let before = f.packs_in_vault();
    f.s3.put_delay_ms
        .store(300, std::sync::atomic::Ordering::Relaxed);
    let waiter = f
        .cmd(&[
            "snapshot",
            s(&src),
            "--volume",
            "big",
            "--agent",
            "node1",
            "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    f.wait_packs(before + 4);
    std::thread::sleep(Duration::from_millis(500));
    f.agent_mut("node1").kill9();
    assert!(
        f.packs_in_vault() < before + 20,
        "the job ended before the kill"
    );
    let out = waiter.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("lease expired"), "{}", stderr(&out));
    let jobs = f.json(&["jobs"]);
    let last = jobs["jobs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["state"], "failed", "{last}");

    // Submitted again, it resumes: what the first attempt committed is not
    // uploaded again.
    f.s3.put_delay_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);
    f.agents.retain(|(n, _)| n != "node1");
    f.start_agent("node1", &root1);
    let retry = f.json(&[
        "snapshot",
        s(&src),
        "--volume",
        "big",
        "--agent",
        "node1",
        "--wait",
    ]);
    let new = retry["bytes_new"].as_u64().unwrap();
    assert!(
        new < 24_000_000,
        "the retry stored everything again: {retry}"
    );
    assert_eq!(retry["files"], 24);
    f.json(&[
        "restore",
        "big",
        s(&target),
        "--agent",
        "node2",
        "--wait",
        "--verify",
    ]);
    assert_same_tree(&src, &target);
}

#[test]
fn a_tls_coordinator_is_reached_with_its_ca_and_refused_without() {
    let env = Env::new();
    let (cert, key) = (env.path("cert.pem"), env.path("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed to make the test certificate");
    assert!(out.status.success(), "{}", stderr(&out));
    let vault = env.path("vault");
    assert!(env.run(&["vault", "init", s(&vault)]).status.success());
    let mut c = env.cmd(&[
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--vault",
        s(&vault),
    ]);
    c.arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = Proc(c.spawn().unwrap());
    let url = coordinator_url(&mut child.0, "https://");

    let root = env.path("node");
    std::fs::create_dir_all(&root).unwrap();
    let mut a = env.cmd(&["agent", "--name", "tls-agent", "--coordinator", &url]);
    a.arg("--root")
        .arg(&root)
        .arg("--tls-ca")
        .arg(&cert)
        .env_remove("FERRY_PASSPHRASE")
        .stderr(Stdio::inherit());
    let _agent = Proc(a.spawn().unwrap());
    let start = Instant::now();
    loop {
        let out = env
            .cmd(&["agents", "--json", "--coordinator", &url, "--tls-ca"])
            .arg(&cert)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["agents"][0]["online"] == true {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    make_tree(&root.join("vol"));
    let out = env
        .cmd(&[
            "snapshot",
            s(&root.join("vol")),
            "--volume",
            "v",
            "--agent",
            "tls-agent",
        ])
        .args(["--wait", "--json", "--coordinator", &url, "--tls-ca"])
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // Without the CA the certificate is not trusted.
    let out = env.run(&["agents", "--coordinator", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    drop(child);
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// GET http://ADDR/metrics, the body.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let start = Instant::now();
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            return out
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no metrics on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of a sample (`name` with its labels, as exposed), 0 if absent.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[test]
fn metrics_move_while_a_job_runs() {
    let coord_metrics = free_addr();
    let mut f = Fleet::start_with(&["--metrics-addr", &coord_metrics]);
    let root = f.env.path("node1");
    let src = root.join("vol");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8 {
        std::fs::write(src.join(format!("f{i}")), noise(1 << 20, i)).unwrap();
    }
    let agent_metrics = free_addr();
    f.start_agent_with(
        "node1",
        &root,
        &["--metrics-addr", &agent_metrics, "--log-format", "json"],
    );
    // Slow pack uploads: the job lasts long enough to be watched.
    f.s3.put_delay_ms
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    let job = f.json(&["snapshot", s(&src), "--volume", "vol", "--agent", "node1"]);
    let id = job["job"].as_u64().unwrap();
    let mut seen = Vec::new();
    let start = Instant::now();
    loop {
        let j = f.json(&["jobs", &id.to_string()]);
        let state = j["jobs"][0]["state"].as_str().unwrap().to_string();
        let body = scrape(&agent_metrics);
        seen.push((
            state.clone(),
            sample(&body, "ferry_bytes_read_total"),
            sample(&body, "ferry_packs_uploaded_total"),
        ));
        if state == "done" || state == "failed" {
            assert_eq!(state, "done", "{j}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "job never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Counters move while the job runs: some scrape during the job saw the
    // volume read and the packs still going up.
    let body = scrape(&agent_metrics);
    let packs = sample(&body, "ferry_packs_uploaded_total");
    assert!(
        seen.iter()
            .any(|(s, read, p)| s == "running" && *read > 0.0 && *p < packs),
        "no scrape saw the job under way: {seen:?}"
    );
    assert_eq!(
        sample(&body, "ferry_bytes_read_total"),
        (8 << 20) as f64,
        "{body}"
    );
    assert!(sample(&body, "ferry_packs_uploaded_total") >= 1.0, "{body}");
    assert!(sample(&body, "ferry_chunks_new_total") >= 1.0, "{body}");
    assert!(
        sample(&body, "ferry_vault_request_seconds_count{op=\"put\"}") >= 1.0,
        "{body}"
    );
    assert_eq!(sample(&body, "ferry_dedup_ratio"), 0.0, "all new: {body}");
    let body = scrape(&coord_metrics);
    assert_eq!(
        sample(
            &body,
            "ferry_jobs_finished_total{kind=\"snapshot\",state=\"done\"}"
        ),
        1.0,
        "{body}"
    );
    assert!(body.contains("ferry_job_duration_seconds"), "{body}");

    // --log-format json: every log line is one JSON object.
    let mut c = f.cmd(&["agent", "--name", "node2", "--log-format", "json"]);
    c.arg("--root")
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Proc(c.spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.0.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill9();
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    assert_eq!(v["level"], "INFO", "{v}");
    assert!(v["fields"]["message"].is_string(), "{v}");
}

/// Over agents, the target's agent checks its target while the source's
/// agent takes the snapshot, then restores exactly that snapshot; in a
/// cutover it refuses a snapshot that missed entries, and the target is
/// left as it was.
#[test]
fn a_cutover_over_agents_restores_only_a_whole_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let mut f = Fleet::start();
    let (src_root, dst_root) = (f.env.path("node1"), f.env.path("node2"));
    let (src, dst) = (src_root.join("db"), dst_root.join("db"));
    std::fs::create_dir_all(src.join("data")).unwrap();
    std::fs::write(src.join("data/table"), noise(300_000, 1)).unwrap();
    std::fs::write(src.join("log"), b"one").unwrap();
    f.start_agent_unprivileged("node1", &src_root);
    f.start_agent("node2", &dst_root);
    let create = f.run(&[
        "migration",
        "create",
        "m",
        "--from",
        s(&src),
        "--to",
        s(&dst),
        "--from-agent",
        "node1",
        "--to-agent",
        "node2",
    ]);
    assert!(create.status.success(), "{}", stderr(&create));
    let r = f.json(&["migration", "presync", "m"]);
    assert_eq!(r["rounds"][0]["pairs"][0]["ok"], true, "{r}");
    assert_same_tree(&src, &dst);

    // The table changes, and a file the source's agent cannot read appears.
    std::fs::write(src.join("data/table"), noise(300_000, 2)).unwrap();
    std::fs::write(src.join("data/lock"), b"held").unwrap();
    std::fs::set_permissions(
        src.join("data/lock"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    std::fs::write(dst.join("stray"), b"x").unwrap();
    let cutover = || {
        f.cmd(&[
            "migration",
            "cutover",
            "m",
            "--json",
            "--quiesce-cmd",
            "true",
        ])
        .output()
        .unwrap()
    };
    let out = cutover();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = c["pairs"][0]["error"].as_str().unwrap_or_default();
    assert!(e.contains("incomplete") && e.contains("quiesced?"), "{c}");
    // The restore job refused it on its agent, and said why.
    let jobs = f.json(&["jobs"]);
    let last = jobs["jobs"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["kind"], "restore", "{jobs}");
    assert_eq!(last["state"], "failed", "{jobs}");
    assert!(
        last["error"].as_str().unwrap().contains("incomplete"),
        "{jobs}"
    );
    assert_eq!(
        std::fs::read(dst.join("data/table")).unwrap(),
        noise(300_000, 1)
    );
    assert!(dst.join("stray").exists() && !dst.join("data/lock").exists());

    std::fs::set_permissions(
        src.join("data/lock"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = cutover();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&src, &dst);
}

/// A restore queued after a snapshot whose agent is offline does not wait
/// for it (and restore whenever it comes back): it fails, and the target is
/// left as it was.
#[test]
fn a_restore_does_not_wait_for_a_snapshot_on_an_offline_agent() {
    let mut f = Fleet::start();
    let (src_root, dst_root) = (f.env.path("node1"), f.env.path("node2"));
    let (src, dst) = (src_root.join("db"), dst_root.join("db"));
    make_tree(&src);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("keep"), b"mine").unwrap();
    f.start_agent("node1", &src_root);
    f.start_agent("node2", &dst_root);
    f.agent_mut("node1").kill9();
    let start = Instant::now();
    while f.json(&["agents"])["agents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "node1" && a["online"] == true)
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "node1 stays online"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The client follows the snapshot job, which waits for node1, and
    // says so.
    let mut client = Proc(
        f.cmd(&[
            "sync",
            s(&src),
            s(&dst),
            "--from-agent",
            "node1",
            "--to-agent",
            "node2",
            "--delete",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let said = {
        let (tx, rx) = std::sync::mpsc::channel();
        let err = client.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        rx
    };
    let start = Instant::now();
    let restore = loop {
        let jobs = f.json(&["jobs"]);
        let r = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "restore" && j["state"] == "failed")
            .cloned();
        if let Some(r) = r {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{jobs}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut lines = Vec::new();
    while !lines
        .iter()
        .any(|l: &String| l.contains("waits: agent node1 is offline"))
    {
        match said.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => lines.push(l),
            Err(e) => panic!("the client did not say why it waits ({e}): {lines:?}"),
        }
    }
    client.kill9();
    let e = restore["error"].as_str().unwrap();
    assert!(e.contains("node1") && e.contains("offline"), "{restore}");
    let names: Vec<_> = std::fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"]);
    // A job submitted without --wait says as much.
    let out = f.run(&["snapshot", s(&src), "--volume", "db", "--agent", "node1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("queued on agent node1: agent node1 is offline"),
        "{text}"
    );
}
