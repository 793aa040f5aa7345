//! `ferry migration`: three pairs (a directory, a block image, a bucket
//! prefix between two S3 servers standing for two clouds), pre-sync rounds
//! while a writer keeps changing the sources, a refused cutover, a cutover
//! with quiesce and resume commands, the signed report and its checks, and
//! a cutover that fails after quiescing.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::bucket::{client, put, read_all};
use crate::common::*;

/// Changes the sources until `quiesce` exists, then acknowledges by
/// creating `ack`: the application a quiesce command stops.
fn writer(src: &Path, img: &Path, quiesce: &Path, ack: &Path) -> std::thread::JoinHandle<u64> {
    let (src, img, quiesce, ack) = (
        src.to_path_buf(),
        img.to_path_buf(),
        quiesce.to_path_buf(),
        ack.to_path_buf(),
    );
    std::thread::spawn(move || {
        let mut n = 0u64;
        std::fs::create_dir_all(src.join("w")).unwrap();
        while !quiesce.exists() {
            n += 1;
            std::fs::write(src.join(format!("w/f{}", n % 40)), noise(20_000, n)).unwrap();
            if n.is_multiple_of(4) {
                // A database's hot pages: the first 512 KiB.
                let big = std::fs::OpenOptions::new()
                    .write(true)
                    .open(src.join("a/big.bin"))
                    .unwrap();
                big.write_all_at(&noise(512, n + 7), (n * 40_961) % (512 << 10))
                    .unwrap();
            }
            let disk = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
            disk.write_all_at(&noise(4096, n + 9), (n * 65_537) % (8 << 20))
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::write(&ack, b"").unwrap();
        n
    })
}

fn same_bytes(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

#[test]
fn a_migration_presyncs_while_sources_change_cuts_over_and_reports() {
    let env = Env::new();
    let dir = env.path("clouds");
    let (cloud_a, cloud_b, config) = two_clouds(&dir);
    let (ca, cb) = (client(&cloud_a), client(&cloud_b));
    for i in 0..12 {
        put(
            &ca,
            "src-bucket",
            &format!("assets/img-{i}.bin"),
            noise(30_000 + i * 1000, 100 + i as u64),
            Some("image/png"),
            &[("owner", "shop")],
        );
    }
    let src = env.path("src");
    make_tree(&src);
    let img = env.path("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&noise(1 << 20, 5), 2 << 20).unwrap();
    drop(f);
    let (dst, img2) = (env.path("dst"), env.path("disk-new.img"));
    let vault = env.path("vault");
    let v = vault.to_str().unwrap().to_string();
    let out = env.run(&["vault", "init", &v]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--vault", &v, "--config", &config]);
        env.run(&a)
    };
    let json = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--vault", &v, "--config", &config]);
        env.json(&a)
    };

    let created = json(&[
        "migration",
        "create",
        "shop",
        "--from",
        src.to_str().unwrap(),
        "--to",
        dst.to_str().unwrap(),
        "--from",
        img.to_str().unwrap(),
        "--to",
        img2.to_str().unwrap(),
        "--from",
        "cloud-a:src-bucket/assets",
        "--to",
        "cloud-b:dst-bucket/assets",
    ]);
    let kinds: Vec<_> = created["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["dir", "block", "bucket"], "{created}");
    // Bad input: a taken name, unpaired sources, a missing source.
    let fail = |args: &[&str], want: &str| {
        let out = run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    let s = src.to_str().unwrap();
    fail(
        &["migration", "create", "shop", "--from", s, "--to", "/tmp/x"],
        "exists already",
    );
    fail(
        &[
            "migration",
            "create",
            "m2",
            "--from",
            s,
            "--from",
            s,
            "--to",
            "/tmp/x",
        ],
        "2 --from and 1 --to",
    );
    fail(
        &[
            "migration",
            "create",
            "m3",
            "--from",
            "/nonexistent",
            "--to",
            "/tmp/x",
        ],
        "/nonexistent",
    );
    // Two pairs into one target (the second's --delete would remove the
    // first's files), a target inside a source.
    let other = env.path("other-src");
    std::fs::create_dir_all(&other).unwrap();
    let o = other.to_str().unwrap();
    let one = env.path("one-target");
    let one_in = one.join("sub");
    fail(
        &[
            "migration",
            "create",
            "m4",
            "--from",
            s,
            "--to",
            one.to_str().unwrap(),
            "--from",
            o,
            "--to",
            one_in.to_str().unwrap(),
        ],
        "pairs 1 and 2 write into the same place",
    );
    let inside = src.join("copy");
    fail(
        &[
            "migration",
            "create",
            "m5",
            "--from",
            o,
            "--to",
            inside.to_str().unwrap(),
            "--from",
            s,
            "--to",
            env.path("t5").to_str().unwrap(),
        ],
        "overlaps the source of pair 2",
    );
    assert!(!inside.exists() && !one.exists());
    fail(&["migration", "status", "m4"], "no migration \"m4\"");
    fail(&["migration", "status", "nope"], "no migration \"nope\"");

    // Rounds while the application writes.
    let (quiesce, ack) = (env.path("quiesced"), env.path("quiesce-ack"));
    let w = writer(&src, &img, &quiesce, &ack);
    std::thread::sleep(Duration::from_millis(300));
    let r1 = json(&["migration", "presync", "shop"]);
    let first = &r1["rounds"][0];
    assert_eq!(first["ok"], true, "{r1}");
    let pairs = first["pairs"].as_array().unwrap();
    assert!(
        pairs
            .iter()
            .all(|p| p["bytes_written"].as_u64().unwrap() > 0),
        "{r1}"
    );
    put(
        &ca,
        "src-bucket",
        "assets/new-during-presync.css",
        b"body{}".to_vec(),
        Some("text/css"),
        &[],
    );
    let r2 = json(&[
        "migration",
        "presync",
        "shop",
        "--until-converged",
        "--max-rounds",
        "4",
    ]);
    let rounds = r2["rounds"].as_array().unwrap();
    assert!(!rounds.is_empty() && rounds.len() <= 4, "{r2}");
    assert!(rounds.iter().all(|r| r["ok"] == true), "{r2}");
    let later = &rounds[0]["pairs"];
    // Later rounds move only the change: far less than the first.
    let written = |p: &serde_json::Value| p["bytes_written"].as_u64().unwrap();
    assert!(
        written(&later[0]) < written(&pairs[0]) / 2,
        "dir: {} then {}",
        written(&pairs[0]),
        written(&later[0])
    );
    assert!(r2["stopped"].is_string(), "{r2}");
    let st = json(&["migration", "status", "shop"]);
    let est = &st["estimate"];
    assert!(est["downtime_s"].as_f64().unwrap() >= 0.0, "{st}");
    for p in est["pairs"].as_array().unwrap() {
        assert!(p["rounds"].as_u64().unwrap() >= 2, "{p}");
        assert!(p["change_bytes_per_hour"].is_number(), "{p}");
        assert!(p["throughput_bps"].as_f64().unwrap() > 0.0, "{p}");
    }

    // Over the limit: refused before quiescing.
    let marker = env.path("refused-quiesce-ran");
    let out = run(&[
        "migration",
        "cutover",
        "shop",
        "--max-downtime",
        "0.001",
        "--quiesce-cmd",
        &format!("touch {}", marker.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("exceeds --max-downtime")
            && stderr(&out).contains("nothing was quiesced"),
        "{}",
        stderr(&out)
    );
    assert!(!marker.exists(), "the quiesce command ran");

    // The cutover: the quiesce command stops the writer and waits for it.
    let resumed = env.path("resumed");
    let c = json(&[
        "migration",
        "cutover",
        "shop",
        "--verify",
        "--max-downtime",
        "10m",
        "--quiesce-cmd",
        &format!(
            "touch {} && while [ ! -e {} ]; do sleep 0.05; done",
            quiesce.display(),
            ack.display()
        ),
        "--resume-cmd",
        &format!("touch {}", resumed.display()),
    ]);
    let writes = w.join().unwrap();
    assert!(writes > 10, "the writer ran {writes} times");
    assert_eq!(c["ok"], true, "{c}");
    let steps: Vec<_> = c["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(steps, ["quiesce", "final delta", "verify", "resume"], "{c}");
    assert!(resumed.exists());
    for p in c["pairs"].as_array().unwrap() {
        assert_eq!(p["state"], "copied and verified", "{c}");
    }
    // The copies are exact.
    assert_same_tree(&src, &dst);
    same_bytes(&img, &img2);
    let (a, b) = (
        read_all(&ca, "src-bucket", "assets/"),
        read_all(&cb, "dst-bucket", "assets/"),
    );
    assert_eq!(a.len(), 13);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, o) in &a {
        assert!(o.body == b[k].body, "{k}");
        assert_eq!(o.content_type, b[k].content_type, "{k}");
        assert_eq!(o.user, b[k].user, "{k}");
    }
    // The estimate against the downtime taken (reported in the note).
    let (estimate, downtime) = (
        c["estimate_s"].as_f64().unwrap(),
        c["downtime_s"].as_f64().unwrap(),
    );
    eprintln!("cutover estimate {estimate:.2}s, downtime taken {downtime:.2}s");
    assert!(
        downtime <= 4.0 * estimate + 2.0 && estimate <= 4.0 * downtime + 2.0,
        "estimate {estimate}s, downtime {downtime}s"
    );

    // The report: every file's digest on both sides, all equal; signed.
    let report = env.path("report.json");
    let out = run(&[
        "migration",
        "report",
        "shop",
        "--json",
        "-o",
        report.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["cutover"]["ok"], true);
    let rp = doc["pairs"].as_array().unwrap();
    assert_eq!(rp.len(), 3);
    for p in rp {
        let entries = p["entries"].as_array().unwrap();
        assert_eq!(entries.len() as u64, p["files"].as_u64().unwrap(), "{p}");
        assert!(!entries.is_empty());
        assert!(entries.iter().all(|e| e["source"] == e["target"]), "{p}");
        assert!(p["missing"].as_array().unwrap().is_empty(), "{p}");
        assert!(p["extra"].as_array().unwrap().is_empty(), "{p}");
    }
    assert_eq!(rp[2]["files"], 13, "objects: {}", rp[2]);
    let out = run(&["migration", "verify-report", report.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A changed report, or another vault's key, fails the check.
    let forged = env.path("forged.json");
    let mut f = doc.clone();
    f["pairs"][0]["files_equal"] = (rp[0]["files_equal"].as_u64().unwrap() + 1).into();
    std::fs::write(&forged, f.to_string()).unwrap();
    fail(
        &["migration", "verify-report", forged.to_str().unwrap()],
        "does not match",
    );
    // A forged value placed before the signed one: a person reads the
    // first, a JSON parser keeps the last. Refused.
    let text = std::fs::read_to_string(&report).unwrap();
    let at = text.find("\"ok\"").unwrap();
    std::fs::write(
        &forged,
        format!("{}\"ok\": false, {}", &text[..at], &text[at..]),
    )
    .unwrap();
    fail(
        &["migration", "verify-report", forged.to_str().unwrap()],
        "appears twice",
    );
    let other = env.path("other-vault");
    assert!(
        env.run(&["vault", "init", other.to_str().unwrap()])
            .status
            .success()
    );
    let out = env.run(&[
        "migration",
        "verify-report",
        report.to_str().unwrap(),
        "--vault",
        other.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));

    // Someone touches the target after the cutover: the report says what.
    std::fs::write(dst.join("a/b/text.log"), b"changed behind ferry's back").unwrap();
    std::fs::write(dst.join("stray"), b"not in the source").unwrap();
    std::fs::remove_file(dst.join("exec.sh")).unwrap();
    std::fs::set_permissions(
        dst.join("a/spaces and ünïcödé.txt"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = run(&["migration", "report", "shop", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &doc["pairs"][0];
    assert_eq!(p["differing"], serde_json::json!(["/a/b/text.log"]), "{p}");
    assert_eq!(p["extra"], serde_json::json!(["/stray"]), "{p}");
    assert_eq!(p["missing"], serde_json::json!(["/exec.sh"]), "{p}");
    let meta = p["metadata_differences"].as_array().unwrap();
    assert!(
        meta.iter().any(|m| m["path"] == "/a/spaces and ünïcödé.txt"
            && m["fields"][0].as_str().unwrap().starts_with("mode")),
        "{p}"
    );
    let md = String::from_utf8(run(&["migration", "report", "shop"]).stdout).unwrap();
    assert!(
        md.contains("# Migration report: shop") && md.contains("differing: `/a/b/text.log`"),
        "{md}"
    );

    // A cutover that fails after quiescing (the destination bucket is
    // gone): each pair's state, and the rollback command runs.
    std::fs::remove_dir_all(cloud_b.root.join("dst-bucket")).unwrap();
    let rolled = env.path("rolled-back");
    let out = run(&[
        "migration",
        "cutover",
        "shop",
        "--json",
        "--quiesce-cmd",
        "true",
        "--resume-cmd",
        &format!("touch {}", env.path("resumed-2").display()),
        "--rollback-cmd",
        &format!("touch {}", rolled.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("rolled back"), "{}", stderr(&out));
    assert!(rolled.exists() && !env.path("resumed-2").exists());
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<_> = c["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states[2], "final delta failed: the target is incomplete",
        "{c}"
    );
    assert!(states[0].starts_with("copied"), "{c}");

    // The report still compares the pairs it can reach and names the one
    // it cannot (its bucket is gone).
    let out = run(&["migration", "report", "shop", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &doc["pairs"];
    assert!(
        p[2]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot compare") && e.contains("dst-bucket")),
        "{doc}"
    );
    assert_eq!(p[2]["ok"], false);
    assert!(p[1]["files"].as_u64().unwrap() > 0, "{doc}");
    assert_eq!(p[1]["ok"], true, "{doc}");

    // A quiesce command that fails: nothing copied, the rollback runs.
    std::fs::remove_file(&rolled).unwrap();
    let out = run(&[
        "migration",
        "cutover",
        "shop",
        "--quiesce-cmd",
        "exit 3",
        "--rollback-cmd",
        &format!("touch {}", rolled.display()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("quiesce failed"), "{}", stderr(&out));
    assert!(rolled.exists());
}

#[test]
fn presync_bandwidth_and_window_hold() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("data"), noise(3 << 20, 1)).unwrap();
    let dst = env.path("dst");
    // No --vault: the embedded default vault, as `ferry sync` uses.
    let out = env.run(&[
        "migration",
        "create",
        "slow",
        "--from",
        src.to_str().unwrap(),
        "--to",
        dst.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = std::time::Instant::now();
    let r = env.json(&["migration", "presync", "slow", "--bandwidth", "2M"]);
    let took = t.elapsed().as_secs_f64();
    assert_eq!(r["rounds"][0]["ok"], true, "{r}");
    // 3 MiB at 2 MiB/s take at least 1.5 s (the bucket starts empty).
    assert!(took >= 1.4, "3 MiB at 2 MiB/s took {took:.2}s");
    assert_same_tree(&src, &dst);
    // A window that is open now runs; a bad one is one clear line.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let hm = |s: i64| format!("{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60);
    let open = format!("{}-{}", hm(now - 600), hm(now + 600));
    let r = env.json(&["migration", "presync", "slow", "--window", &open]);
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "{r}");
    let out = env.run(&["migration", "presync", "slow", "--window", "25:00-01:00"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HH:MM-HH:MM"), "{}", stderr(&out));
    // A closed window waits (and says so) rather than run.
    let closed = format!("{}-{}", hm(now + 3 * 3600), hm(now + 4 * 3600));
    let mut child = env
        .cmd(&["migration", "presync", "slow", "--window", &closed])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "it ran outside the window"
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("waiting"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = env.json(&["migration", "status", "slow"]);
    assert_eq!(st["rounds"], 2, "{st}");
    // The default vault keeps itself small, as after `ferry sync`: a
    // third round forgets the first round's snapshot.
    std::fs::write(src.join("more"), noise(100_000, 2)).unwrap();
    let r = env.json(&["migration", "presync", "slow"]);
    assert_eq!(
        r["upkeep"][0]["forgotten"].as_array().unwrap().len(),
        1,
        "{r}"
    );
    let snaps = env.json(&["snapshots"]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 2, "{snaps}");
    assert_same_tree(&src, &dst);
    let report = env.json(&["migration", "report", "slow"]);
    assert_eq!(report["ok"], true, "{report}");
}

/// A cutover whose snapshot missed an entry (the application was not
/// stopped: a file it holds cannot be read) fails, and the target is left
/// as the last pre-sync made it: nothing planned, deleted or written. Once
/// the file can be read, the cutover goes through.
#[test]
fn a_cutover_refuses_an_incomplete_snapshot_before_touching_the_target() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(src.join("db")).unwrap();
    std::fs::write(src.join("db/table"), noise(200_000, 1)).unwrap();
    std::fs::write(src.join("log"), b"one").unwrap();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    chmod_r(&src);
    chmod_r(&env.path("state"));
    let run = |args: &[&str]| {
        let out = env.run_unprivileged(args);
        (out.status.code(), stderr(&out))
    };
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let (code, err) = run(&["migration", "create", "m", "--from", s, "--to", d]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&["migration", "presync", "m"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        std::fs::read(dst.join("db/table")).unwrap(),
        noise(200_000, 1)
    );

    std::fs::write(src.join("db/table"), noise(200_000, 2)).unwrap();
    std::fs::remove_file(src.join("log")).unwrap();
    std::fs::write(src.join("db/lock"), b"held").unwrap();
    std::fs::set_permissions(src.join("db/lock"), std::fs::Permissions::from_mode(0o000)).unwrap();
    std::fs::write(dst.join("stray"), b"x").unwrap();
    let out = env.run_unprivileged(&[
        "migration",
        "cutover",
        "m",
        "--json",
        "--quiesce-cmd",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = c["pairs"][0]["error"].as_str().unwrap();
    assert!(e.contains("incomplete") && e.contains("quiesced?"), "{c}");
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&dst), ["db", "log", "stray"]);
    assert_eq!(names(&dst.join("db")), ["table"]);
    assert_eq!(
        std::fs::read(dst.join("db/table")).unwrap(),
        noise(200_000, 1)
    );
    assert_eq!(std::fs::read(dst.join("log")).unwrap(), b"one");

    std::fs::set_permissions(src.join("db/lock"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, err) = run(&["migration", "cutover", "m", "--quiesce-cmd", "true"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(names(&dst), ["db"]);
    assert_eq!(names(&dst.join("db")), ["lock", "table"]);
    assert_eq!(
        std::fs::read(dst.join("db/table")).unwrap(),
        noise(200_000, 2)
    );

    // A pair whose target lies inside its source is refused when the
    // migration is created (a round would refuse it too), with one line.
    let inner = format!("{s}/db/copy");
    let (code, err) = run(&["migration", "create", "nested", "--from", s, "--to", &inner]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("overlaps the source of pair 1"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, err) = run(&["migration", "presync", "nested"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no migration \"nested\""), "{err}");
    assert!(!src.join("db/copy").exists());
}

/// A source that became an empty directory between the pre-sync and the
/// cutover (its volume no longer mounted) does not empty the target: the
/// cutover fails before anything is deleted, the resume command does not
/// run, the rollback does. `ferry sync --delete` refuses the same way.
#[test]
fn an_emptied_source_never_empties_the_target() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..3u64 {
        std::fs::write(src.join(format!("d/f{i}")), noise(50_000, i)).unwrap();
    }
    let vault = env.path("vault").display().to_string();
    assert!(env.run(&["vault", "init", &vault]).status.success());
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--vault", vault.as_str()]);
        env.run(&a)
    };
    assert!(
        run(&["migration", "create", "m", "--from", s, "--to", d])
            .status
            .success()
    );
    assert!(run(&["migration", "presync", "m"]).status.success());
    assert_same_tree(&src, &dst);

    std::fs::remove_dir_all(&src).unwrap();
    std::fs::create_dir(&src).unwrap();
    let (resumed, rolled) = (env.path("resumed"), env.path("rolled-back"));
    let out = run(&[
        "migration",
        "cutover",
        "m",
        "--quiesce-cmd",
        "true",
        "--resume-cmd",
        &format!("touch {}", resumed.display()),
        "--rollback-cmd",
        &format!("touch {}", rolled.display()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("the snapshot is empty"), "{text}");
    assert!(!resumed.exists() && rolled.exists());
    assert_eq!(files_under(&dst).len(), 3);

    let out = env.run(&["sync", s, d, "--delete"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--delete would empty"),
        "{}",
        stderr(&out)
    );
    assert_eq!(files_under(&dst).len(), 3);
    // Without --delete an empty snapshot changes nothing, as before.
    let out = env.run(&["sync", s, d]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files_under(&dst).len(), 3);
}
