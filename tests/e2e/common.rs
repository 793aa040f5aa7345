//! Helpers: run ferry, generate trees, compare trees, start S3.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PASS: &str = "correct horse battery staple";

/// A sandbox: a home for the catalog, and the environment for ferry.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        Env {
            vars: vec![
                ("FERRY_PASSPHRASE".into(), PASS.into()),
                ("XDG_STATE_HOME".into(), state.display().to_string()),
            ],
            dir,
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.args(args);
        c.env_remove("FERRY_VAULT").env_remove("FERRY_CATALOG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c
    }

    /// Runs ferry; returns the output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs ferry, asserts success, parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.run(&a);
        assert!(
            out.status.success(),
            "ferry {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Env {
    /// Runs ferry as nobody when the tests run as root (root reads every
    /// file, so an unreadable one needs another user); as ourselves
    /// otherwise. The caller opens up the paths nobody must reach.
    pub fn run_unprivileged(&self, args: &[&str]) -> Output {
        let mut c = if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_ferry"),
            ]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_ferry"))
        };
        c.args(args);
        c.env_remove("FERRY_VAULT").env_remove("FERRY_CATALOG");
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Makes `p` (created if missing) and everything under it anyone's.
pub fn chmod_r(p: &Path) {
    let _ = std::fs::create_dir_all(p);
    let st = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Sets a file's modification time.
pub fn set_mtime(p: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Deterministic pseudo-random bytes.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tree with the cases a volume has: nested dirs, empty file and dir,
/// a large file over many chunks, compressible text, duplicates, a
/// symlink, a hard link, odd permissions and names, an xattr, ns mtimes.
pub fn make_tree(root: &Path) {
    use std::fs;
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    fs::write(root.join("empty-file"), b"").unwrap();
    fs::write(root.join("a/big.bin"), noise(3 * 1024 * 1024 + 17, 1)).unwrap();
    fs::write(
        root.join("a/b/text.log"),
        "hello world line\n".repeat(20_000),
    )
    .unwrap();
    fs::write(root.join("a/b/c/dup1"), noise(200_000, 2)).unwrap();
    fs::write(root.join("a/b/c/dup2"), noise(200_000, 2)).unwrap();
    fs::write(root.join("a/spaces and ünïcödé.txt"), b"name test").unwrap();
    fs::write(root.join("exec.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("exec.sh"), fs::Permissions::from_mode(0o751)).unwrap();
    fs::write(root.join("a/linked"), b"two names").unwrap();
    fs::hard_link(root.join("a/linked"), root.join("a/b/linked-again")).unwrap();
    std::os::unix::fs::symlink("../a/big.bin", root.join("a/b/symlink")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let _ = xattr::set(root.join("a/linked"), "user.ferry.test", b"xattr-value");
    fs::set_permissions(root.join("a/b/c"), fs::Permissions::from_mode(0o700)).unwrap();
    let t = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_times(root.join("a/b/text.log"), t, t).unwrap();
    filetime::set_file_times(root.join("a/b"), t, t).unwrap();
}

/// Everything restore must reproduce, per relative path.
pub fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut inodes: BTreeMap<(u64, u64), String> = BTreeMap::new();
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let md = p.symlink_metadata().unwrap();
            let xattrs: Vec<String> = xattr::list(&p)
                .map(|l| {
                    l.map(|n| {
                        format!(
                            "{}={:?}",
                            n.to_string_lossy(),
                            xattr::get(&p, &n).ok().flatten()
                        )
                    })
                    .collect()
                })
                .unwrap_or_default();
            let common = format!(
                "mode={:o} uid={} gid={} xattrs={xattrs:?}",
                md.mode() & 0o7777,
                md.uid(),
                md.gid()
            );
            let desc = if md.file_type().is_symlink() {
                format!(
                    "symlink -> {} mtime={}.{}",
                    std::fs::read_link(&p).unwrap().display(),
                    md.mtime(),
                    md.mtime_nsec()
                )
            } else if md.is_dir() {
                stack.push(p.clone());
                format!("dir {common} mtime={}.{}", md.mtime(), md.mtime_nsec())
            } else {
                let link = if md.nlink() > 1 {
                    let first = inodes.entry((md.dev(), md.ino())).or_insert(rel.clone());
                    format!(" linkgroup={first}")
                } else {
                    String::new()
                };
                let hash = blake3::hash(&std::fs::read(&p).unwrap());
                format!(
                    "file {common} size={} mtime={}.{} blake3={hash}{link}",
                    md.len(),
                    md.mtime(),
                    md.mtime_nsec()
                )
            };
            out.insert(rel, desc);
        }
    }
    out
}

pub fn assert_same_tree(a: &Path, b: &Path) {
    let (da, db) = (describe(a), describe(b));
    for (k, v) in &da {
        assert_eq!(Some(v), db.get(k), "{k} differs");
    }
    assert_eq!(
        da.len(),
        db.len(),
        "extra entries in {}: {:?}",
        b.display(),
        db.keys()
            .filter(|k| !da.contains_key(*k))
            .collect::<Vec<_>>()
    );
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A real S3 server (s3s-fs) on 127.0.0.1, serving `root` (a bucket is a
/// directory under it), on its own runtime thread for the test's life.
pub struct S3Server {
    pub endpoint: String,
    pub root: PathBuf,
    /// Milliseconds each PUT waits before it is served: a slow link, so a
    /// test can act while uploads are in flight.
    pub put_delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The next this many PUTs are refused with 503 SlowDown (throttling).
    pub fail_puts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// PUTs served (not refused) so far.
    pub puts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

pub const S3_KEY: &str = "ferrytest";
pub const S3_SECRET: &str = "ferrytestsecret";

impl S3Server {
    pub fn start(root: &Path) -> Self {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use hyper_util::server::conn::auto::Builder as ConnBuilder;
        use s3s::auth::SimpleAuth;
        use s3s::service::S3ServiceBuilder;

        std::fs::create_dir_all(root).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let fs_root = root.to_path_buf();
        let put_delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = put_delay_ms.clone();
        let fail_puts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let fail = fail_puts.clone();
        let puts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let served = puts.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut b = S3ServiceBuilder::new(s3s_fs::FileSystem::new(&fs_root).unwrap());
                b.set_auth(SimpleAuth::from_single(S3_KEY, S3_SECRET));
                let service = b.build();
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let http = ConnBuilder::new(TokioExecutor::new());
                let parts_root = fs_root.clone();
                let slow = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (service, delay, fail, served) =
                            (service.clone(), delay.clone(), fail.clone(), served.clone());
                        let parts_root = parts_root.clone();
                        async move {
                            // Aborting an upload that no longer exists is
                            // 404 NoSuchUpload on S3; s3s-fs answers 403
                            // AccessDenied. Answer as S3 does, so a second
                            // abort of one upload (a cancelled worker's and
                            // the interrupt's) is what it is in production.
                            let aborted_upload = (req.method() == hyper::Method::DELETE)
                                .then(|| req.uri().query().unwrap_or_default().to_string())
                                .and_then(|q| {
                                    q.split('&')
                                        .find_map(|kv| kv.strip_prefix("uploadId="))
                                        .map(str::to_string)
                                });
                            if let Some(id) = aborted_upload {
                                let r = service.call(req.map(s3s::Body::from)).await;
                                let gone = || {
                                    !std::fs::read_dir(&parts_root).unwrap().any(|e| {
                                        e.unwrap()
                                            .file_name()
                                            .to_string_lossy()
                                            .starts_with(&format!(".upload_id-{id}"))
                                    })
                                };
                                return match r {
                                    Ok(resp) if resp.status() == 403 && gone() => {
                                        Ok(hyper::Response::builder()
                                            .status(404)
                                            .body(s3s::Body::from(
                                                "<Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message></Error>"
                                                    .to_string(),
                                            ))
                                            .unwrap())
                                    }
                                    r => r,
                                };
                            }
                            use std::sync::atomic::Ordering::Relaxed;
                            if req.method() == hyper::Method::PUT {
                                let ms = delay.load(Relaxed);
                                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                                if fail
                                    .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
                                    .is_ok()
                                {
                                    // Read the body first, as a real server
                                    // does, then refuse.
                                    use http_body_util::BodyExt;
                                    let _ = req.into_body().collect().await;
                                    return Ok(hyper::Response::builder()
                                        .status(503)
                                        .body(s3s::Body::from(
                                            "<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                                                .to_string(),
                                        ))
                                        .unwrap());
                                }
                                served.fetch_add(1, Relaxed);
                            }
                            service.call(req.map(s3s::Body::from)).await
                        }
                    },
                );
                loop {
                    let (sock, _) = listener.accept().await.unwrap();
                    let conn = http
                        .serve_connection(TokioIo::new(sock), slow.clone())
                        .into_owned();
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
            });
        });
        let addr = rx.recv().unwrap();
        S3Server {
            endpoint: format!("http://{addr}"),
            root: root.to_path_buf(),
            put_delay_ms,
            fail_puts,
            puts,
        }
    }

    pub fn create_bucket(&self, name: &str) {
        std::fs::create_dir_all(self.root.join(name)).unwrap();
    }

    /// The standard AWS variables, as a user would set them.
    pub fn env(&self, env: &mut Env) {
        for (k, v) in [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", S3_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET),
            ("AWS_REGION", "us-east-1"),
        ] {
            env.vars.push((k.into(), v.into()));
        }
    }
}

/// moto (`moto_server`, an independent S3 implementation in Python, pip
/// install 'moto[server]'), for what s3s-fs lacks: tagging, storage
/// classes, etags in listings, "directory" marker objects. Killed on drop.
pub struct Moto {
    pub endpoint: String,
    child: std::process::Child,
}

impl Moto {
    pub fn start() -> Self {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        // Its output goes to a file, so a server that fails to start says why.
        let log_path = std::env::temp_dir().join(format!("ferry-moto-{port}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}): install it with pip install 'moto[server]' \
                     (.ci/run does)"
                )
            });
        let mut m = Moto {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
        };
        // Python imports a lot before it listens; on a loaded 2-core machine
        // that can take long, so wait generously but notice an early exit.
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = m.child.try_wait().unwrap();
            if exited.is_some() || start.elapsed() > std::time::Duration::from_secs(180) {
                let out = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!(
                    "moto_server did not come up ({}) after {:?}; its output:\n{out}",
                    exited.map_or("still running".to_string(), |s| s.to_string()),
                    start.elapsed()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = std::fs::remove_file(&log_path);
        m
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two S3 servers standing for two clouds, `src-bucket` on the first and
/// `dst-bucket` on the second, and a ferry config file naming them as the
/// remotes `cloud-a` and `cloud-b` (credentials from a file). Returns the
/// servers and the config file's path.
pub fn two_clouds(dir: &Path) -> (S3Server, S3Server, String) {
    let (a, b) = (
        S3Server::start(&dir.join("cloud-a")),
        S3Server::start(&dir.join("cloud-b")),
    );
    a.create_bucket("src-bucket");
    b.create_bucket("dst-bucket");
    let creds = dir.join("creds");
    std::fs::write(&creds, format!("{S3_KEY}\n{S3_SECRET}\n")).unwrap();
    let config = dir.join("remotes.toml");
    std::fs::write(
        &config,
        format!(
            "[remotes.cloud-a]\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n\
             [remotes.cloud-b]\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n",
            a.endpoint,
            creds.display(),
            b.endpoint,
            creds.display()
        ),
    )
    .unwrap();
    (a, b, config.to_str().unwrap().to_string())
}
