//! `ferry bucket sync` between two S3-compatible servers on loopback (two
//! "clouds" with their own endpoints), within one server, and to a local
//! directory.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;

use crate::common::*;

pub(crate) fn client(s3: &S3Server) -> Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(&s3.endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            S3_KEY, S3_SECRET, None, None, "test",
        ))
        .force_path_style(true)
        .request_checksum_calculation(aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(conf)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub(crate) struct Obj {
    pub(crate) body: Vec<u8>,
    pub(crate) content_type: Option<String>,
    pub(crate) user: BTreeMap<String, String>,
}

/// Every object under `prefix`, with its bytes and metadata.
pub(crate) fn read_all(c: &Client, bucket: &str, prefix: &str) -> BTreeMap<String, Obj> {
    rt().block_on(async {
        let mut out = BTreeMap::new();
        let mut token = None;
        loop {
            let r = c
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            for o in r.contents() {
                let k = o.key().unwrap();
                let g = c.get_object().bucket(bucket).key(k).send().await.unwrap();
                let (ct, user) = (
                    g.content_type().map(String::from),
                    g.metadata()
                        .map(|m| m.iter().map(|(a, b)| (a.clone(), b.clone())).collect())
                        .unwrap_or_default(),
                );
                let body = g.body.collect().await.unwrap().into_bytes().to_vec();
                out.insert(
                    k.strip_prefix(prefix).unwrap().to_string(),
                    Obj {
                        body,
                        content_type: ct,
                        user,
                    },
                );
            }
            match r.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                None => return out,
            }
        }
    })
}

pub(crate) fn put(
    c: &Client,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    ct: Option<&str>,
    user: &[(&str, &str)],
) {
    rt().block_on(async {
        let mut r = c
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .set_content_type(ct.map(String::from));
        for (k, v) in user {
            r = r.metadata(*k, *v);
        }
        r.send()
            .await
            .unwrap_or_else(|e| panic!("put {key}: {e:?}"));
    })
}

/// Keys a migration must carry exactly.
fn awkward_keys() -> Vec<String> {
    let mut v: Vec<String> = [
        "plain.txt",
        "with space.txt",
        "unicode/日本語-ü.txt",
        "plus+sign.txt",
        "per%cent.txt",
        "x..y/dots.txt",
        "deep/a/b/c/d/e.txt",
        "empty.bin",
        "marker/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A 1,000-byte key (components short enough for a filesystem server).
    let long = (0..11)
        .map(|i| format!("{i}{}", "k".repeat(98)))
        .collect::<Vec<_>>()
        .join("/");
    v.push(long[..1000].to_string());
    v
}

fn sync_json(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["bucket", "sync"];
    a.extend_from_slice(args);
    env.json(&a)
}

#[test]
fn bucket_sync_between_two_clouds_is_incremental_exact_and_keeps_metadata() {
    let mut env = Env::new();
    let (a, b) = (
        S3Server::start(&env.path("cloud-a")),
        S3Server::start(&env.path("cloud-b")),
    );
    a.create_bucket("src-bucket");
    b.create_bucket("dst-bucket");
    let (ca, cb) = (client(&a), client(&b));
    // Each cloud its own remote; credentials by variable name.
    let cfg = env.path("ferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[remotes.cloud-a]\nendpoint = \"{}\"\naccess_key_id_env = \"A_ID\"\nsecret_access_key_env = \"A_SECRET\"\n\
             [remotes.cloud-b]\nendpoint = \"{}\"\ncredentials_file = \"{}\"\n",
            a.endpoint,
            b.endpoint,
            env.path("b-creds").display()
        ),
    )
    .unwrap();
    std::fs::write(env.path("b-creds"), format!("{S3_KEY}\n{S3_SECRET}\n")).unwrap();
    env.vars.push(("A_ID".into(), S3_KEY.into()));
    env.vars.push(("A_SECRET".into(), S3_SECRET.into()));
    env.vars.push((
        "XDG_CONFIG_HOME".into(),
        env.path("xdg").display().to_string(),
    ));
    let cfg = cfg.to_str().unwrap().to_string();

    let keys = awkward_keys();
    for (i, k) in keys.iter().enumerate() {
        let body = if k.ends_with('/') || k == "empty.bin" {
            vec![]
        } else {
            noise(1000 + i * 37, i as u64)
        };
        put(
            &ca,
            "src-bucket",
            &format!("data/{k}"),
            body,
            Some("text/plain; charset=utf-8"),
            &[("owner", "team-a")],
        );
    }
    // A large object: multipart with parallel parts.
    put(
        &ca,
        "src-bucket",
        "data/big/video.mp4",
        noise(20 << 20, 77),
        Some("video/mp4"),
        &[("origin", "x")],
    );
    // What the source server holds (s3s-fs, a filesystem, cannot list a
    // "directory" marker as an object): every one of them must arrive.
    let n = read_all(&ca, "src-bucket", "data/").len() as u64;
    assert!(n >= keys.len() as u64 - 1, "the test server lost keys");

    let args = [
        "cloud-a:src-bucket/data",
        "cloud-b:dst-bucket/copy",
        "--config",
        &cfg,
    ];
    let first = sync_json(&env, &[&args[..], &["--verify"]].concat());
    assert_eq!(first["objects_copied"], n, "{first}");
    assert_eq!(first["objects_verified"], n, "{first}");
    assert_eq!(first["objects_failed"], 0, "{first}");
    let src = read_all(&ca, "src-bucket", "data/");
    let dst = read_all(&cb, "dst-bucket", "copy/");
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        dst.keys().collect::<Vec<_>>()
    );
    for (k, o) in &src {
        let d = &dst[k];
        assert!(o.body == d.body, "{k}: bytes differ");
        assert_eq!(o.content_type, d.content_type, "{k}");
        assert_eq!(o.user, d.user, "{k}");
    }

    // Nothing changed: nothing copied.
    let again = sync_json(&env, &args);
    assert_eq!(again["objects_copied"], 0, "{again}");
    assert_eq!(again["objects_skipped"], n, "{again}");

    // One rewritten (same size), one deleted, one added; dry run first.
    put(
        &ca,
        "src-bucket",
        "data/plain.txt",
        noise(1000, 999),
        None,
        &[],
    );
    rt().block_on(
        ca.delete_object()
            .bucket("src-bucket")
            .key("data/with space.txt")
            .send(),
    )
    .unwrap();
    put(
        &ca,
        "src-bucket",
        "data/new.txt",
        b"new".to_vec(),
        None,
        &[],
    );
    let dry = sync_json(&env, &[&args[..], &["--delete", "--dry-run"]].concat());
    let mut plan: Vec<(String, String)> = dry["plan"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["action"].as_str().unwrap().into(),
                p["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    plan.sort();
    assert_eq!(
        plan,
        [
            ("copy", "new.txt"),
            ("copy", "plain.txt"),
            ("delete", "with space.txt")
        ]
        .map(|(a, k)| (a.to_string(), k.to_string()))
    );
    assert_eq!(
        read_all(&cb, "dst-bucket", "copy/").len(),
        src.len(),
        "a dry run changes nothing"
    );
    let third = sync_json(&env, &[&args[..], &["--delete"]].concat());
    assert_eq!(
        (
            third["objects_copied"].as_u64(),
            third["objects_deleted"].as_u64()
        ),
        (Some(2), Some(1)),
        "{third}"
    );
    let src = read_all(&ca, "src-bucket", "data/");
    let dst = read_all(&cb, "dst-bucket", "copy/");
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        dst.keys().collect::<Vec<_>>()
    );
    assert!(src.iter().all(|(k, o)| dst[k].body == o.body));

    // Filters and --since.
    let only = sync_json(
        &env,
        &[
            "cloud-a:src-bucket/data",
            "cloud-b:dst-bucket/txt",
            "--config",
            &cfg,
            "--include",
            "**.txt",
            "--exclude",
            "unicode/**",
        ],
    );
    let got = read_all(&cb, "dst-bucket", "txt/");
    assert!(
        got.keys()
            .all(|k| k.ends_with(".txt") && !k.starts_with("unicode/")),
        "{:?}",
        got.keys()
    );
    assert_eq!(only["objects_copied"].as_u64().unwrap(), got.len() as u64);
    let later = sync_json(
        &env,
        &[
            "cloud-a:src-bucket/data",
            "cloud-b:dst-bucket/later",
            "--config",
            &cfg,
            "--since",
            "2999-01-01T00:00:00Z",
        ],
    );
    assert_eq!(later["objects_copied"], 0, "{later}");

    // Into a local directory: keys become paths, the marker a directory.
    let local = env.path("local-copy");
    let dry = sync_json(
        &env,
        &[
            "cloud-a:src-bucket/data",
            local.to_str().unwrap(),
            "--config",
            &cfg,
            "--dry-run",
        ],
    );
    assert_eq!(
        dry["plan"].as_array().unwrap().len() as u64,
        dry["objects_listed"].as_u64().unwrap()
    );
    assert!(!local.exists(), "a dry run creates nothing");
    let l = sync_json(
        &env,
        &[
            "cloud-a:src-bucket/data",
            local.to_str().unwrap(),
            "--config",
            &cfg,
        ],
    );
    assert_eq!(l["objects_failed"], 0, "{l}");
    if src.contains_key("marker/") {
        assert!(local.join("marker").is_dir());
    }
    assert_eq!(
        std::fs::read(local.join("unicode/日本語-ü.txt")).unwrap(),
        src["unicode/日本語-ü.txt"].body
    );
    assert_eq!(
        std::fs::read(local.join("big/video.mp4")).unwrap().len(),
        20 << 20
    );
    // And back up from the directory into a third place.
    let up = sync_json(
        &env,
        &[
            local.to_str().unwrap(),
            "cloud-b:dst-bucket/from-local",
            "--config",
            &cfg,
        ],
    );
    assert_eq!(up["objects_failed"], 0, "{up}");
    // Overlapping sides are refused before anything is copied, as rclone
    // does: the copy would be copied again on every run.
    let copy = local.join("copy");
    for (from, to) in [
        (local.to_str().unwrap(), copy.to_str().unwrap()),
        (
            "cloud-b:dst-bucket/from-local",
            "cloud-b:dst-bucket/from-local/again",
        ),
    ] {
        let out = env.run(&["bucket", "sync", from, to, "--config", &cfg]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains("overlaps the source"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(!copy.exists());
}

#[test]
fn one_endpoint_copies_server_side_and_faults_are_clear() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3"));
    s3.create_bucket("one-src");
    s3.create_bucket("one-dst");
    s3.env(&mut env);
    let c = client(&s3);
    for i in 0..20u64 {
        put(
            &c,
            "one-src",
            &format!("obj-{i:02}"),
            noise(5000, i),
            Some("application/json"),
            &[("i", "x")],
        );
    }
    let s = sync_json(&env, &["s3://one-src", "s3://one-dst/p", "--verify"]);
    assert_eq!(s["objects_copied_server_side"], 20, "{s}");
    assert_eq!(s["objects_verified"], 20, "{s}");
    let dst = read_all(&c, "one-dst", "p/");
    assert_eq!(dst.len(), 20);
    assert_eq!(
        dst["obj-03"].content_type.as_deref(),
        Some("application/json")
    );

    // Throttled: retried with backoff, the sync completes.
    s3.fail_puts.store(4, Relaxed);
    let local = env.path("src-dir");
    std::fs::create_dir_all(&local).unwrap();
    for i in 0..10u64 {
        std::fs::write(local.join(format!("f{i}")), noise(3000, 50 + i)).unwrap();
    }
    let t = sync_json(&env, &[local.to_str().unwrap(), "s3://one-dst/throttled"]);
    assert_eq!(t["objects_copied"], 10, "{t}");
    assert_eq!(s3.fail_puts.load(Relaxed), 0);

    // Refused for good: the keys are listed, the others copied, exit 1.
    std::fs::write(local.join("f-new"), b"new").unwrap();
    s3.fail_puts.store(u64::MAX, Relaxed);
    let out = env.run(&[
        "bucket",
        "sync",
        local.to_str().unwrap(),
        "s3://one-dst/throttled",
        "--json",
    ]);
    s3.fail_puts.store(0, Relaxed);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["objects_failed"], 1, "{v}");
    assert_eq!(v["failed"][0]["key"], "f-new");
    assert!(stderr(&out).contains("f-new"), "{}", stderr(&out));
    // The rerun copies only what failed.
    let r = sync_json(&env, &[local.to_str().unwrap(), "s3://one-dst/throttled"]);
    assert_eq!(r["objects_copied"], 1, "{r}");

    // A missing bucket, a dead endpoint, a bad remote: one line, exit 1.
    for (args, want) in [
        (
            vec!["s3://no-such-bucket", "s3://one-dst/x"],
            "NoSuchBucket",
        ),
        (vec!["nowhere:bucket", "s3://one-dst/x"], "no remote named"),
    ] {
        let mut a = vec!["bucket", "sync"];
        a.extend(args);
        let out = env.run(&a);
        assert_eq!(out.status.code(), Some(1), "{a:?}");
        assert!(stderr(&out).contains(want), "{a:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    }
    let mut dead = Env::new();
    dead.vars
        .push(("AWS_ENDPOINT_URL".into(), "http://127.0.0.1:9".into()));
    dead.vars.push(("AWS_ACCESS_KEY_ID".into(), "x".into()));
    dead.vars.push(("AWS_SECRET_ACCESS_KEY".into(), "y".into()));
    let out = dead.run(&[
        "bucket",
        "sync",
        "s3://some-bucket",
        local.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn an_interrupted_sync_leaves_no_partial_object_and_the_rerun_cleans_up() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3"));
    s3.create_bucket("resume");
    s3.env(&mut env);
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("big.bin"), noise(40 << 20, 1)).unwrap();
    for i in 0..5u64 {
        std::fs::write(src.join(format!("small{i}")), noise(1000, i)).unwrap();
    }
    let open_parts = |root: &std::path::Path| -> Vec<String> {
        // s3s-fs keeps an open upload's parts as `.upload_id-*` files (it
        // has no ListMultipartUploads).
        std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload_id-"))
            .collect()
    };
    // Slow parts. First Ctrl-C while the big object's parts are in flight:
    // exit 130 at once, and the uploads it opened are aborted.
    s3.put_delay_ms.store(400, Relaxed);
    let spawn_sync = |err: Stdio| {
        env.cmd(&[
            "bucket",
            "sync",
            src.to_str().unwrap(),
            "s3://resume/dst",
            "--workers",
            "2",
        ])
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
    };
    let child = spawn_sync(Stdio::piped());
    let start = Instant::now();
    while open_parts(&s3.root).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The upload is open; let ferry record it and its first parts fly.
    std::thread::sleep(Duration::from_millis(300));
    // The shell's own kill: no procps needed.
    let sent = std::process::Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("open multipart upload(s) aborted"),
        "{}",
        stderr(&out)
    );
    assert!(open_parts(&s3.root).is_empty(), "Ctrl-C left parts behind");
    assert!(!read_all(&client(&s3), "resume", "dst/").contains_key("big.bin"));

    // Then kill -9, which can abort nothing: the rerun does.
    let mut child = spawn_sync(Stdio::null());
    let uploads = s3.root.join("resume");
    let start = Instant::now();
    // Wait for the first part to land somewhere under the server's root.
    while files_under(&s3.root).len() < 2 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    s3.put_delay_ms.store(0, Relaxed);
    let c = client(&s3);
    let visible = read_all(&c, "resume", "dst/");
    assert!(
        !visible.contains_key("big.bin"),
        "a partial object is visible"
    );

    let r = sync_json(
        &env,
        &[src.to_str().unwrap(), "s3://resume/dst", "--verify"],
    );
    assert_eq!(r["objects_failed"], 0, "{r}");
    assert_eq!(r["stale_uploads_aborted"], 1, "{r}");
    let visible = read_all(&c, "resume", "dst/");
    assert_eq!(visible["big.bin"].body.len(), 40 << 20);
    assert_eq!(visible.len(), 6);
    let parts = open_parts(&s3.root);
    assert!(parts.is_empty(), "parts of aborted uploads left: {parts:?}");
    let _ = uploads;
}

#[test]
fn a_killed_sync_has_recorded_what_it_finished() {
    // Small objects finish at once; the large one, paced, is still in
    // flight a second and a half later when the run is killed. The rerun
    // copies only the large one (the small ones' state was written within
    // a second, not at the 500th copy or the end).
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..5u64 {
        std::fs::write(src.join(format!("small{i}")), noise(1000, i)).unwrap();
    }
    std::fs::write(src.join("zbig.bin"), noise(16 << 20, 9)).unwrap();
    let mut child = env
        .cmd(&[
            "bucket",
            "sync",
            src.to_str().unwrap(),
            dst.to_str().unwrap(),
            "--bandwidth",
            "1M",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while (0..5).any(|i| !dst.join(format!("small{i}")).exists()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "small objects not copied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !dst.join("zbig.bin").exists(),
        "the paced object finished too soon"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let r = sync_json(&env, &[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(r["objects_copied"], 1, "{r}");
    assert_eq!(r["objects_failed"], 0, "{r}");
    assert_eq!(
        std::fs::read(dst.join("zbig.bin")).unwrap(),
        noise(16 << 20, 9)
    );
}

#[test]
fn a_directory_source_says_what_it_cannot_carry_and_deletes_none_of_it() {
    use std::os::unix::ffi::OsStrExt;
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("real.txt"), b"real").unwrap();
    std::fs::write(src.join("link"), b"a file, for now").unwrap();
    std::fs::create_dir_all(src.join("ext")).unwrap();
    std::fs::write(src.join("ext/keep.txt"), b"under a directory, for now").unwrap();
    let first = sync_json(&env, &[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(first["objects_copied"], 3, "{first}");
    assert_eq!(first["objects_unsupported"], 0, "{first}");

    // The file becomes a symlink; a FIFO and a name no key can carry
    // appear.
    std::fs::remove_file(src.join("link")).unwrap();
    std::os::unix::fs::symlink("real.txt", src.join("link")).unwrap();
    let fifo = std::process::Command::new("mkfifo")
        .arg(src.join("pipe"))
        .status()
        .unwrap();
    assert!(fifo.success());
    let bad = src.join(std::ffi::OsStr::from_bytes(b"bad-\xff-name"));
    std::fs::write(&bad, b"latin-1").unwrap();
    // The directory moves away and a symlink takes its place; a name that
    // would forge a second warning line.
    std::fs::rename(src.join("ext"), env.path("moved")).unwrap();
    std::os::unix::fs::symlink(env.path("moved"), src.join("ext")).unwrap();
    std::os::unix::fs::symlink("real.txt", src.join("evil\nwarning: fake")).unwrap();
    let out = env.run(&[
        "bucket",
        "sync",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--delete",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["objects_unsupported"], 5, "{r}");
    assert_eq!(r["objects_deleted"], 0, "{r}");
    let err = stderr(&out);
    for line in [
        "link: skipped: a symlink (not followed)",
        "ext: skipped: a symlink (not followed)",
        "pipe: skipped: not a regular file",
        "skipped: a name that is not UTF-8",
        "evil\u{240a}warning: fake: skipped: a symlink (not followed)",
    ] {
        assert!(err.contains(line), "no {line:?} in: {err}");
    }
    assert!(
        !err.lines().any(|l| l.starts_with("warning: fake")),
        "a key forged a line: {err}"
    );
    // What the directory symlink stands for is still in the destination.
    assert_eq!(
        std::fs::read(dst.join("ext/keep.txt")).unwrap(),
        b"under a directory, for now"
    );
    // The symlink's namesake stays: what it stands for is still there.
    assert_eq!(std::fs::read(dst.join("link")).unwrap(), b"a file, for now");
    assert_eq!(std::fs::read(dst.join("real.txt")).unwrap(), b"real");
    assert!(!dst.join("pipe").exists());
}

#[test]
fn a_tree_copied_before_with_its_times_is_not_copied_again() {
    // A destination made by `cp -a` (sizes and modification times kept):
    // the first sync skips what is the same, as rsync and rclone do, and
    // copies what differs in size or time.
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::create_dir_all(dst.join("d")).unwrap();
    let when = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for (i, name) in ["a", "d/b", "same-size", "grown"].iter().enumerate() {
        std::fs::write(src.join(name), noise(1000, i as u64)).unwrap();
        std::fs::write(dst.join(name), noise(1000, i as u64)).unwrap();
        for root in [&src, &dst] {
            set_mtime(&root.join(name), when);
        }
    }
    // Rewritten in place, same size, a later time; and grown.
    std::fs::write(src.join("same-size"), noise(1000, 99)).unwrap();
    std::fs::write(src.join("grown"), noise(1001, 3)).unwrap();
    let r = sync_json(&env, &[src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert_eq!(r["objects_skipped"], 2, "{r}");
    assert_eq!(r["objects_copied"], 2, "{r}");
    assert_eq!(
        std::fs::read(dst.join("same-size")).unwrap(),
        noise(1000, 99)
    );
    assert_eq!(std::fs::read(dst.join("grown")).unwrap(), noise(1001, 3));
}

#[test]
fn a_destination_loses_the_temporary_files_of_killed_runs() {
    // What a copy killed midway leaves: `.ferry-*.tmp` beside its object.
    // The next sync into the directory removes those an hour old; a fresh
    // one (a copy that may be running) stays, a dry run removes nothing,
    // and a source's are left alone.
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::create_dir_all(dst.join("d")).unwrap();
    std::fs::write(src.join("d/a"), b"a").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    let plant = |p: std::path::PathBuf, aged: bool| {
        std::fs::write(&p, b"half a copy").unwrap();
        if aged {
            set_mtime(&p, old);
        }
        p
    };
    let stale = plant(dst.join("d/.ferry-00112233aabbccdd.tmp"), true);
    let top = plant(dst.join(".ferry-44556677eeff0011.tmp"), true);
    let fresh = plant(dst.join("d/.ferry-8899aabbccddeeff.tmp"), false);
    let in_source = plant(src.join(".ferry-0000000000000000.tmp"), true);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let dry = sync_json(&env, &[s, d, "--dry-run"]);
    assert_eq!(dry["plan"].as_array().unwrap().len(), 1, "{dry}");
    assert!(
        stale.exists() && top.exists(),
        "a dry run removed something"
    );
    let r = sync_json(&env, &[s, d]);
    assert_eq!(r["objects_copied"], 1, "{r}");
    assert!(
        !stale.exists() && !top.exists(),
        "stale temporary files stayed"
    );
    assert!(fresh.exists(), "a fresh temporary file was removed");
    assert!(in_source.exists(), "the source was touched");
    assert_eq!(std::fs::read(dst.join("d/a")).unwrap(), b"a");
}

#[test]
fn an_object_rewritten_during_its_copy_is_never_copied_torn() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut env = Env::new();
    let (a, b) = (
        S3Server::start(&env.path("a")),
        S3Server::start(&env.path("b")),
    );
    a.create_bucket("live-src");
    b.create_bucket("live-dst");
    let cfg = env.path("ferry.toml");
    std::fs::write(
        &cfg,
        format!(
            "[remotes.a]\nendpoint = \"{}\"\naccess_key_id = \"{S3_KEY}\"\nsecret_access_key = \"{S3_SECRET}\"\n\
             [remotes.b]\nendpoint = \"{}\"\naccess_key_id = \"{S3_KEY}\"\nsecret_access_key = \"{S3_SECRET}\"\n",
            a.endpoint, b.endpoint
        ),
    )
    .unwrap();
    env.vars.push((
        "XDG_CONFIG_HOME".into(),
        env.path("xdg").display().to_string(),
    ));
    let (ca, cb) = (client(&a), client(&b));
    let (old, new) = (noise(24 << 20, 1), noise(24 << 20, 2));
    put(&ca, "live-src", "db.dump", old.clone(), None, &[]);
    // Slow parts on the destination: the source is rewritten mid-copy.
    b.put_delay_ms.store(300, Relaxed);
    let cfg = cfg.to_str().unwrap().to_string();
    let child = env
        .cmd(&[
            "bucket",
            "sync",
            "a:live-src",
            "b:live-dst",
            "--config",
            &cfg,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    put(&ca, "live-src", "db.dump", new.clone(), None, &[]);
    let out = child.wait_with_output().unwrap();
    b.put_delay_ms.store(0, Relaxed);
    assert!(out.status.success(), "{}", stderr(&out));
    let got = read_all(&cb, "live-dst", "")["db.dump"].body.clone();
    assert!(
        got == old || got == new,
        "the copy is a mix of two versions"
    );
    // The rerun brings the newest version.
    let r = sync_json(
        &env,
        &["a:live-src", "b:live-dst", "--config", &cfg, "--verify"],
    );
    let got = read_all(&cb, "live-dst", "")["db.dump"].body.clone();
    assert!(got == new, "{r}");
}

/// `ferry snapshot BUCKET` and `ferry restore NAME BUCKET`: a bucket through
/// the encrypted, deduplicated vault, with the incremental rules of
/// directories.
#[test]
fn a_bucket_goes_through_the_vault_incrementally_with_its_metadata() {
    let env = Env::new();
    let (a, b, cfg) = two_clouds(env.dir.path());
    let vault = env.path("vault");
    let vault = vault.to_str().unwrap();
    let out = env.run(&["vault", "init", vault]);
    assert!(out.status.success(), "{}", stderr(&out));

    let ca = client(&a);
    let keys = [
        "plain.txt",
        "with space.txt",
        "unicode/日本語-ü.txt",
        "plus+sign.txt",
        "per%cent.txt",
        "deep/a/b/c.txt",
        "deep/a-b",
        "empty.bin",
    ];
    let mut total = 0u64;
    for (i, k) in keys.iter().enumerate() {
        let body = if *k == "empty.bin" {
            vec![]
        } else {
            noise(3000 + i * 101, i as u64)
        };
        total += body.len() as u64;
        put(
            &ca,
            "src-bucket",
            &format!("data/{k}"),
            body,
            Some("text/plain; charset=utf-8"),
            &[("owner", "team-a")],
        );
    }
    // Large: many chunks, several parts on the way out.
    put(
        &ca,
        "src-bucket",
        "data/big/video.mp4",
        noise(12 << 20, 99),
        Some("video/mp4"),
        &[],
    );
    total += 12 << 20;
    let n = keys.len() as u64 + 1;

    let snap = |extra: &[&str]| {
        let mut args = vec![
            "snapshot",
            "cloud-a:src-bucket/data",
            "--volume",
            "media",
            "--vault",
            vault,
            "--config",
            &cfg,
        ];
        args.extend_from_slice(extra);
        env.json(&args)
    };
    let s1 = snap(&[]);
    assert_eq!(s1["files"], n, "{s1}");
    assert_eq!(s1["bytes_scanned"], total, "{s1}");
    assert_eq!(s1["incomplete"], false, "{s1}");
    // Unchanged: nothing is read.
    let s2 = snap(&[]);
    assert_eq!(s2["bytes_scanned"], 0, "{s2}");
    assert_eq!(s2["files_unchanged"], n, "{s2}");
    assert_eq!(s2["bytes_new"], 0, "{s2}");
    // One object rewritten: only it is read.
    let changed = noise(5000, 1234);
    put(
        &ca,
        "src-bucket",
        "data/plain.txt",
        changed.clone(),
        Some("text/markdown"),
        &[("owner", "team-b")],
    );
    let s3 = snap(&[]);
    assert_eq!(s3["bytes_scanned"], 5000, "{s3}");
    assert_eq!(s3["files_unchanged"], n - 1, "{s3}");

    // Into the other cloud, exact, with metadata.
    let restore = |extra: &[&str]| {
        let mut args = vec![
            "restore",
            "media",
            "cloud-b:dst-bucket/copy",
            "--vault",
            vault,
            "--config",
            &cfg,
        ];
        args.extend_from_slice(extra);
        env.json(&args)
    };
    let r1 = restore(&["--verify"]);
    assert_eq!(r1["files"], n, "{r1}");
    assert_eq!(r1["files_written"], n, "{r1}");
    assert_eq!(r1["files_verified"], n, "{r1}");
    let src = read_all(&ca, "src-bucket", "data/");
    let cb = client(&b);
    let dst = read_all(&cb, "dst-bucket", "copy/");
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        dst.keys().collect::<Vec<_>>()
    );
    for (k, o) in &src {
        let d = &dst[k];
        assert!(d.body == o.body, "{k}: content differs");
        assert_eq!(d.content_type, o.content_type, "{k}");
        assert_eq!(d.user, o.user, "{k}");
    }
    assert_eq!(dst["plain.txt"].body, changed);
    assert_eq!(
        dst["plain.txt"].content_type.as_deref(),
        Some("text/markdown")
    );

    // Again: nothing written. A stray object is left and counted, then
    // removed with --delete; an object changed behind ferry's back is
    // noticed by its etag and written again.
    let r2 = restore(&[]);
    assert_eq!(r2["files_written"], 0, "{r2}");
    assert_eq!(r2["files_unchanged"], n, "{r2}");
    put(&cb, "dst-bucket", "copy/stray", b"x".to_vec(), None, &[]);
    put(
        &cb,
        "dst-bucket",
        "copy/deep/a-b",
        b"tampered".to_vec(),
        None,
        &[],
    );
    let r3 = restore(&[]);
    assert_eq!(r3["files_extra"], 1, "{r3}");
    assert_eq!(r3["files_written"], 1, "{r3}");
    let r4 = restore(&["--delete"]);
    assert_eq!(r4["files_deleted"], 1, "{r4}");
    assert_eq!(r4["files_written"], 0, "{r4}");
    let dst = read_all(&cb, "dst-bucket", "copy/");
    assert!(!dst.contains_key("stray"));
    assert!(dst["deep/a-b"].body == src["deep/a-b"].body);

    // The same snapshot restores into a directory, metadata as user xattrs.
    let dir = env.path("restored");
    let out = env.run(&["restore", "media", dir.to_str().unwrap(), "--vault", vault]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (k, o) in &src {
        assert!(
            std::fs::read(dir.join(k)).unwrap() == o.body,
            "{k} differs in the directory"
        );
    }

    // Bad input: a bucket that does not exist; a block snapshot of a bucket.
    let out = env.run(&[
        "snapshot",
        "cloud-a:no-such-bucket/x",
        "--volume",
        "v",
        "--vault",
        vault,
        "--config",
        &cfg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = env.run(&[
        "snapshot",
        "cloud-a:src-bucket/data",
        "--volume",
        "v",
        "--block",
        "--vault",
        vault,
        "--config",
        &cfg,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--block"), "{}", stderr(&out));
}

/// Points ferry's standard AWS variables at `moto`.
fn use_moto(env: &mut Env, moto: &Moto) {
    for (k, v) in [
        ("AWS_ENDPOINT_URL", moto.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "moto"),
        ("AWS_SECRET_ACCESS_KEY", "moto"),
        ("AWS_REGION", "us-east-1"),
    ] {
        env.vars.push((k.into(), v.into()));
    }
}

fn moto_client(endpoint: &str) -> Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "moto", "moto", None, None, "test",
        ))
        .force_path_style(true)
        .build();
    Client::from_conf(conf)
}

/// Against moto, which keeps tags and storage classes, lists etags and
/// stores "directory" markers: all of them travel, both when ferry streams
/// the bytes (`--bandwidth` forces it) and when the store copies them
/// server-side (one endpoint).
#[test]
fn tags_storage_classes_and_markers_survive_on_a_store_that_has_them() {
    let mut env = Env::new();
    let moto = Moto::start();
    use_moto(&mut env, &moto);
    let c = moto_client(&moto.endpoint);
    rt().block_on(async {
        for b in ["src-bucket", "dst-stream", "dst-server"] {
            c.create_bucket().bucket(b).send().await.unwrap();
        }
        c.put_object()
            .bucket("src-bucket")
            .key("data/report.csv")
            .body(ByteStream::from(noise(70_000, 5)))
            .content_type("text/csv")
            .metadata("owner", "team-a")
            .tagging("team=a&env=prod")
            .storage_class(aws_sdk_s3::types::StorageClass::StandardIa)
            .send()
            .await
            .unwrap();
        c.put_object()
            .bucket("src-bucket")
            .key("data/folder/")
            .body(ByteStream::from(Vec::new()))
            .send()
            .await
            .unwrap();
        c.put_object()
            .bucket("src-bucket")
            .key("data/folder/inside.txt")
            .body(ByteStream::from(b"inside".to_vec()))
            .send()
            .await
            .unwrap();
    });
    for (dst, extra) in [
        ("dst-stream", vec!["--bandwidth", "1G"]),
        ("dst-server", vec![]),
    ] {
        let target = format!("s3://{dst}/copy");
        let mut args = vec![
            "s3://src-bucket/data",
            target.as_str(),
            "--tags",
            "--storage-class",
        ];
        args.extend(extra.iter().copied());
        let v = sync_json(&env, &args);
        assert_eq!(v["objects_copied"], 3, "{dst}: {v}");
        if dst == "dst-server" {
            assert_eq!(v["objects_copied_server_side"], 3, "{v}");
        } else {
            assert_eq!(v["objects_copied_server_side"], 0, "{v}");
        }
        rt().block_on(async {
            let h = c
                .head_object()
                .bucket(dst)
                .key("copy/report.csv")
                .send()
                .await
                .unwrap();
            assert_eq!(h.content_type(), Some("text/csv"), "{dst}");
            assert_eq!(
                h.metadata()
                    .and_then(|m| m.get("owner"))
                    .map(String::as_str),
                Some("team-a"),
                "{dst}"
            );
            assert_eq!(
                h.storage_class(),
                Some(&aws_sdk_s3::types::StorageClass::StandardIa),
                "{dst}"
            );
            let t = c
                .get_object_tagging()
                .bucket(dst)
                .key("copy/report.csv")
                .send()
                .await
                .unwrap();
            let mut tags: Vec<(String, String)> = t
                .tag_set()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string()))
                .collect();
            tags.sort();
            assert_eq!(
                tags,
                [("env".into(), "prod".into()), ("team".into(), "a".into())],
                "{dst}"
            );
            // The marker is an object of its own.
            let m = c
                .head_object()
                .bucket(dst)
                .key("copy/folder/")
                .send()
                .await
                .unwrap();
            assert_eq!(m.content_length(), Some(0), "{dst}");
        });
        // Listing etags are plain here: the rerun needs no state to skip.
        let again = sync_json(&env, &args);
        assert_eq!(again["objects_copied"], 0, "{dst}: {again}");
        assert_eq!(again["objects_skipped"], 3, "{dst}: {again}");
    }
}

/// A directory target's symlinks are never followed: a key under a link
/// planted in the target (to elsewhere, or out of an agent's root) fails
/// that key, and nothing is written where the link points. A key whose
/// file cannot be made leaves no temporary file behind.
#[test]
fn a_directory_target_never_writes_through_a_symlink() {
    let env = Env::new();
    let (src, dst, outside) = (env.path("src"), env.path("dst"), env.path("outside"));
    std::fs::create_dir_all(src.join("escdir")).unwrap();
    std::fs::write(src.join("escdir/pwned"), b"pwned").unwrap();
    std::fs::write(src.join("fine"), b"ok").unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("escdir")).unwrap();
    // A file whose place in the target is a directory with something in
    // it: its rename fails.
    std::fs::write(src.join("clash"), b"file").unwrap();
    std::fs::create_dir_all(dst.join("clash")).unwrap();
    std::fs::write(dst.join("clash/inner"), b"kept").unwrap();
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    for _ in 0..2 {
        let out = env.run(&["bucket", "sync", s, d, "--json"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let failed = v["failed"].as_array().unwrap();
        assert!(
            failed.iter().any(|f| f["key"] == "escdir/pwned"
                && f["error"].as_str().unwrap().contains("symbolic link")),
            "{v}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(std::fs::read(dst.join("fine")).unwrap(), b"ok");
        assert!(dst.join("escdir").is_symlink());
        assert!(failed.iter().any(|f| f["key"] == "clash"), "{v}");
    }
    // Nothing under a temporary name anywhere in the target.
    let leftovers: Vec<_> = files_under(&dst)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".ferry-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A key may hold control characters that an XML 1.0 listing cannot carry
/// (S3 allows them; AWS's own advice is `encoding-type=url`). ferry asks
/// for url-encoded keys when a plain listing cannot be read and decodes
/// them, `+` and `%` in other keys included.
#[test]
fn keys_with_control_characters_are_listed_and_copied() {
    let mut env = Env::new();
    let moto = Moto::start();
    use_moto(&mut env, &moto);
    let c = moto_client(&moto.endpoint);
    let keys = ["ctl\u{1}key", "plain", "space and+plus%20.txt", "tab\there"];
    rt().block_on(async {
        for b in ["ctl-src", "ctl-dst"] {
            c.create_bucket().bucket(b).send().await.unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            c.put_object()
                .bucket("ctl-src")
                .key(*k)
                .body(ByteStream::from(format!("body {i}").into_bytes()))
                .send()
                .await
                .unwrap();
        }
    });
    let dir = env.path("ctl-copy");
    let first = sync_json(&env, &["s3://ctl-src", dir.to_str().unwrap()]);
    assert_eq!(first["objects_copied"], 4, "{first}");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            std::fs::read(dir.join(k)).unwrap(),
            format!("body {i}").into_bytes(),
            "{k:?}"
        );
    }
    let again = sync_json(&env, &["s3://ctl-src", dir.to_str().unwrap()]);
    assert_eq!(again["objects_copied"], 0, "{again}");
    assert_eq!(again["objects_skipped"], 4, "{again}");
    // Bucket to bucket, and back from the directory.
    let b2b = sync_json(&env, &["s3://ctl-src", "s3://ctl-dst/b2b"]);
    assert_eq!(b2b["objects_copied"], 4, "{b2b}");
    let back = sync_json(&env, &[dir.to_str().unwrap(), "s3://ctl-dst/back"]);
    assert_eq!(back["objects_copied"], 4, "{back}");
    rt().block_on(async {
        for (i, k) in keys.iter().enumerate() {
            for prefix in ["b2b/", "back/"] {
                let got = c
                    .get_object()
                    .bucket("ctl-dst")
                    .key(format!("{prefix}{k}"))
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("{prefix}{k:?}: {e:?}"));
                let body = got.body.collect().await.unwrap().into_bytes();
                assert_eq!(&body[..], format!("body {i}").as_bytes(), "{prefix}{k:?}");
            }
        }
    });
}
