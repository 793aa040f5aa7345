//! The embedded default on a local-directory vault, as a new user runs it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;

fn init(env: &Env) -> String {
    let vault = env.path("vault").display().to_string();
    let out = env.run(&["vault", "init", &vault]);
    assert!(out.status.success(), "{}", stderr(&out));
    vault
}

#[test]
fn snapshot_and_restore_round_trip_with_metadata() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let vault = init(&env);

    let s = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg-data",
    ]);
    let id = s["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(s["files"], 9, "{s}");
    let scanned = s["bytes_scanned"].as_u64().unwrap();
    assert!(scanned > 3_000_000);
    // dup2 repeats dup1 and the hard link is not read twice: new < scanned.
    assert!(s["bytes_new"].as_u64().unwrap() <= scanned - 200_000, "{s}");
    // text.log compresses well: less is uploaded than is new.
    assert!(s["bytes_uploaded"].as_u64().unwrap() < s["bytes_new"].as_u64().unwrap());
    assert_eq!(s["incomplete"], false);
    assert!(s["duration_s"].as_f64().unwrap() >= 0.0);

    let list = env.json(&["snapshots", "--vault", &vault]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(list["snapshots"][0]["id"], id.as_str());
    assert_eq!(list["snapshots"][0]["volume"], "pg-data");

    let dst = env.path("dst");
    let r = env.json(&[
        "restore",
        &format!("pg-data@{}", &id[..8]),
        dst.to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(r["files"], 9, "{r}");
    assert_eq!(r["files_written"], 9, "{r}");
    assert!(r["bytes_written"].as_u64().unwrap() >= 3 * 1024 * 1024);
    assert_same_tree(&src, &dst);

    // No temporary file is left behind.
    assert!(
        files_under(&dst)
            .iter()
            .all(|p| !p.to_string_lossy().contains(".ferry-"))
    );

    // In batches of one file (each directory its own batch: the hard link's
    // two names, directory metadata and the root come in different ones),
    // the same tree; a delta restore in batches rewrites only what changed.
    let dst1 = env.path("dst1");
    let d1 = dst1.to_str().unwrap();
    let batched = |extra: &[&str]| {
        let mut a = vec![
            "restore",
            "pg-data",
            d1,
            "--vault",
            &vault,
            "--batch-files",
            "1",
        ];
        a.extend_from_slice(extra);
        env.json(&a)
    };
    let r1 = batched(&[]);
    assert_eq!(r1["files"], 9, "{r1}");
    assert_same_tree(&src, &dst1);
    std::fs::write(src.join("a/b/c/dup1"), noise(200_000, 7)).unwrap();
    std::fs::remove_file(src.join("exec.sh")).unwrap();
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg-data",
    ]);
    let r2 = batched(&["--delete"]);
    assert_eq!(r2["files_written"], 1, "{r2}");
    assert_eq!(r2["files_deleted"], 1, "{r2}");
    assert_same_tree(&src, &dst1);
    let bad = env.run(&[
        "restore",
        "pg-data",
        "x",
        "--vault",
        &vault,
        "--batch-files",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}

#[test]
fn second_snapshot_of_unchanged_data_stores_nothing_new() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    let s2 = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    assert_eq!(s2["bytes_new"], 0, "{s2}");
    assert!(s2["parent"].is_string());
    // Unchanged files are not even read.
    assert_eq!(s2["bytes_scanned"], 0, "{s2}");
    assert_eq!(
        s2["files_unchanged"], 8,
        "the ninth is a second hard link: {s2}"
    );
    // --reread reads them all again, and still stores nothing new.
    let s2r = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
        "--reread",
    ]);
    assert_eq!(s2r["files_unchanged"], 0, "{s2r}");
    assert!(s2r["bytes_scanned"].as_u64().unwrap() > 3_000_000, "{s2r}");
    assert_eq!(s2r["bytes_new"], 0, "{s2r}");
    // Only the snapshot record (and no pack) was written.
    assert_eq!(s2["packs_uploaded"], 0, "{s2}");

    // A changed file stores only its own new chunks.
    std::fs::write(src.join("a/b/new.txt"), noise(50_000, 9)).unwrap();
    let s3 = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    let new = s3["bytes_new"].as_u64().unwrap();
    assert!((50_000..60_000).contains(&new), "{s3}");
    assert_eq!(
        s3["bytes_scanned"], 50_000,
        "only the new file is read: {s3}"
    );

    // A file rewritten with the same size and mtime is still caught (ctime).
    let log = src.join("a/b/text.log");
    let md = std::fs::metadata(&log).unwrap();
    let mut content = std::fs::read(&log).unwrap();
    content[0] = b'J';
    std::fs::write(&log, &content).unwrap();
    filetime::set_file_mtime(&log, filetime::FileTime::from_last_modification_time(&md)).unwrap();
    let s4 = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    assert_eq!(s4["bytes_scanned"], md.len(), "{s4}");
    assert!(s4["bytes_new"].as_u64().unwrap() > 0, "{s4}");

    let list = env.json(&["snapshots", "v", "--vault", &vault]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 5);
    let dst = env.path("dst");
    env.json(&["restore", "v", dst.to_str().unwrap(), "--vault", &vault]);
    assert_same_tree(&src, &dst);
}

#[test]
fn vault_holds_no_plaintext_names_or_content() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("very-secret-file-name.txt"),
        "TOP SECRET CONTENT ".repeat(1000),
    )
    .unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    for f in files_under(&env.path("vault")) {
        let bytes = std::fs::read(&f).unwrap();
        for needle in [&b"very-secret-file-name"[..], b"TOP SECRET", b"\"size\""] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} leaks {:?}",
                f.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
}

#[test]
fn wrong_passphrase_and_usage_errors() {
    let mut env = Env::new();
    let vault = init(&env);
    // Initialising twice refuses, and does not touch the vault.
    let again = env.run(&["vault", "init", &vault]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    env.vars.retain(|(k, _)| k != "FERRY_PASSPHRASE");
    env.vars.push(("FERRY_PASSPHRASE".into(), "not it".into()));
    let out = env.run(&["snapshots", "--vault", &vault]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        format!("error: wrong passphrase for vault {vault}")
    );

    // The passphrase file takes precedence and works.
    let pf = env.path("pass");
    std::fs::write(&pf, format!("{PASS}\n")).unwrap();
    let out = env.run(&[
        "snapshots",
        "--vault",
        &vault,
        "--passphrase-file",
        pf.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.run(&[
        "snapshots",
        "--vault",
        &vault,
        "--passphrase-file",
        env.path("no-file").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no-file"), "{}", stderr(&out));

    let out = env.run(&[
        "snapshots",
        "--vault",
        env.path("nothing-here").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.starts_with("error: no vault at") && e.contains("ferry vault init"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");

    let out = env.run(&["snapshots", "--vault", "gs://bucket/x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown scheme"), "{}", stderr(&out));

    env.vars.retain(|(k, _)| k != "FERRY_PASSPHRASE");
    env.vars.push(("FERRY_PASSPHRASE".into(), PASS.into()));
    let out = env.run(&["snapshot", "--vault", &vault]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing arguments are a usage error"
    );
    let out = env.run(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));

    let out = env.run(&[
        "restore",
        "no-such-volume",
        env.path("t").to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no snapshot matches no-such-volume"),
        "{}",
        stderr(&out)
    );
}

/// Finds the pack holding the most data (the big file's chunks).
fn biggest_pack(vault: &std::path::Path) -> std::path::PathBuf {
    files_under(&vault.join("packs"))
        .into_iter()
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap()
}

#[test]
fn corrupted_truncated_and_missing_packs_are_named() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    std::fs::create_dir_all(src.join("z")).unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    assert_eq!(
        env.json(&["vault", "check", &vault, "--read-data"])["ok"],
        true
    );

    let pack = biggest_pack(&env.path("vault"));
    let pack_name = pack.file_name().unwrap().to_string_lossy().to_string();
    let original = std::fs::read(&pack).unwrap();

    // One flipped byte in the middle.
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    std::fs::set_permissions(&pack, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&pack, &bad).unwrap();

    let out = env.run(&["vault", "check", &vault, "--read-data", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["damaged_packs"][0]["pack"], pack_name.as_str());
    let affected: Vec<String> = report["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    assert!(
        affected.iter().any(|p| p.ends_with("big.bin")),
        "{affected:?}"
    );

    let dst = env.path("dst");
    let out = env.run(&["restore", "v", dst.to_str().unwrap(), "--vault", &vault]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains(&pack_name) && e.contains("big.bin"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    // The damaged file is absent (not half-written); the others are intact.
    assert!(!dst.join("a/big.bin").exists());
    assert!(
        files_under(&dst)
            .iter()
            .all(|p| !p.to_string_lossy().contains(".ferry-"))
    );
    // Every file the error does not name is restored, byte for byte.
    let mut restored = 0;
    for f in files_under(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy().to_string();
        if e.contains(&name) {
            continue;
        }
        let d = dst.join(rel);
        if f.symlink_metadata().unwrap().file_type().is_symlink() {
            continue;
        }
        assert_eq!(
            std::fs::read(&d).unwrap(),
            std::fs::read(&f).unwrap(),
            "{}",
            rel.display()
        );
        restored += 1;
    }
    assert!(restored >= 5, "{restored}");

    // Truncated: the cheap check already sees the size.
    std::fs::write(&pack, &original[..original.len() - 100]).unwrap();
    let out = env.run(&["vault", "check", &vault, "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["damaged_packs"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{report}"
    );

    // Missing.
    std::fs::remove_file(&pack).unwrap();
    let out = env.run(&[
        "restore",
        "v",
        env.path("dst2").to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));

    // Put back: healthy again, and restore completes.
    std::fs::write(&pack, &original).unwrap();
    assert_eq!(
        env.json(&["vault", "check", &vault, "--read-data"])["ok"],
        true
    );
    env.json(&[
        "restore",
        "v",
        env.path("dst3").to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_same_tree(&src, &env.path("dst3"));
}

#[test]
fn lost_catalog_is_rebuilt_from_the_vault() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let vault = init(&env);
    let s = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    std::fs::remove_dir_all(env.path("state")).unwrap();

    // Any command rebuilds a missing catalog on its own.
    let list = env.json(&["snapshots", "--vault", &vault]);
    assert_eq!(list["snapshots"][0]["id"], s["snapshot_id"]);
    let dst = env.path("dst");
    env.json(&["restore", "v", dst.to_str().unwrap(), "--vault", &vault]);
    assert_same_tree(&src, &dst);

    // And on request, into a chosen file; dedup knowledge comes back too.
    let cat = env.path("elsewhere/catalog.sqlite");
    let r = env.json(&[
        "catalog",
        "rebuild",
        "--vault",
        &vault,
        "--catalog",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(r["snapshots"], 1);
    let s2 = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
        "--catalog",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(s2["bytes_new"], 0, "{s2}");
    // Rebuilt again over that catalog: it is replaced, and still knows.
    let rebuild = |cat: &str| {
        env.run(&[
            "catalog",
            "rebuild",
            "--vault",
            &vault,
            "--catalog",
            cat,
            "--json",
        ])
    };
    let again = rebuild(cat.to_str().unwrap());
    assert!(again.status.success(), "{}", stderr(&again));
    let list = env.json(&[
        "snapshots",
        "--vault",
        &vault,
        "--catalog",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 2, "{list}");

    // What is not a catalog is never replaced: not a mistyped file, not the
    // vault's own config (its wrapped keys), not another vault's catalog.
    let notes = env.path("notes.txt");
    std::fs::write(&notes, b"my notes").unwrap();
    let config = Path::new(&vault).join("config");
    let config_before = std::fs::read(&config).unwrap();
    for victim in [&notes, &config] {
        let out = rebuild(victim.to_str().unwrap());
        assert!(!out.status.success(), "{}", victim.display());
        let err = stderr(&out);
        assert!(err.contains("not a catalog"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert_eq!(std::fs::read(&notes).unwrap(), b"my notes");
    assert_eq!(std::fs::read(&config).unwrap(), config_before);
    let other = env.path("other-vault").display().to_string();
    assert!(env.run(&["vault", "init", &other]).status.success());
    let out = env.run(&[
        "catalog",
        "rebuild",
        "--vault",
        &other,
        "--catalog",
        cat.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("belongs to vault"),
        "{}",
        stderr(&out)
    );
    let list = env.json(&[
        "snapshots",
        "--vault",
        &vault,
        "--catalog",
        cat.to_str().unwrap(),
    ]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 2, "{list}");
}

#[test]
fn special_files_are_skipped_and_counted() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("regular"), b"x").unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(src.join("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    let vault = init(&env);
    let out = env.run(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
        "--json",
    ]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["skipped_special"], 1, "{s}");
    assert_eq!(s["files"], 1);
    assert!(stderr(&out).contains("skipped fifo"), "{}", stderr(&out));
}

#[test]
fn unreadable_file_gives_an_incomplete_but_consistent_snapshot() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("readable"), b"fine").unwrap();
    std::fs::write(src.join("big"), noise(2 << 20, 3)).unwrap();
    std::fs::write(src.join("secret"), b"no").unwrap();
    std::fs::set_permissions(src.join("secret"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads everything: run ferry as nobody when we are root.
    for p in [env.dir.path().to_path_buf(), src.clone()] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let vault = init(&env);
    let as_nobody = |args: &[&str]| env.run_unprivileged(args);
    if is_root() {
        chmod_r(&env.path("vault"));
        chmod_r(&env.path("state"));
    }
    let out = as_nobody(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["incomplete"], true);
    assert_eq!(s["warnings"], 1);
    assert_eq!(s["files"], 2);
    assert!(stderr(&out).contains("secret"), "{}", stderr(&out));
    let list = as_nobody(&["snapshots", "--vault", &vault, "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list["snapshots"][0]["incomplete"], true);
    let dst = env.path("dst");
    let out = as_nobody(&[
        "restore",
        "v",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dst.join("readable")).unwrap(), b"fine");
    assert!(!dst.join("secret").exists());

    // Target files changed behind ferry's back and shut to the user (mode
    // 000): they cannot be read to compare, so they are written whole
    // under a temporary name and renamed over (rsync does the same).
    std::fs::write(dst.join("readable"), b"edit").unwrap();
    let mut big = std::fs::read(dst.join("big")).unwrap();
    big[1000] ^= 1;
    std::fs::write(dst.join("big"), &big).unwrap();
    for f in ["readable", "big"] {
        std::fs::set_permissions(dst.join(f), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let out = as_nobody(&[
        "restore",
        "v",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(dst.join("readable")).unwrap(), b"fine");
    assert_eq!(
        std::fs::read(dst.join("big")).unwrap(),
        std::fs::read(src.join("big")).unwrap()
    );
    let mode = std::fs::metadata(dst.join("big"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        std::fs::metadata(src.join("big"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    );

    // A target directory the user cannot write: one line, exit 1.
    let ro = env.path("ro-target");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let out = as_nobody(&["restore", "v", ro.to_str().unwrap(), "--vault", &vault]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.starts_with("error: ") && e.contains("ro-target") && e.lines().count() == 1,
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

#[test]
fn unwritable_target_is_one_clear_line() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    // A regular file where the target directory should be.
    let target = env.path("occupied");
    std::fs::write(&target, b"x").unwrap();
    let out = env.run(&["restore", "v", target.to_str().unwrap(), "--vault", &vault]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.starts_with("error: ") && e.contains("occupied") && e.lines().count() == 1,
        "{e}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"x");

    // A snapshot id that does not exist, of a volume that does.
    let out = env.run(&[
        "restore",
        "v@0123abcd",
        env.path("t").to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.starts_with("error: ") && e.contains("v@0123abcd") && e.lines().count() == 1,
        "{e}"
    );
    assert!(!env.path("t").exists(), "nothing created for a bad id");
}

#[test]
fn two_concurrent_snapshots_into_one_vault() {
    let env = Env::new();
    let (s1, s2) = (env.path("s1"), env.path("s2"));
    make_tree(&s1);
    make_tree(&s2);
    std::fs::write(s2.join("only-in-2"), noise(300_000, 77)).unwrap();
    let vault = init(&env);
    let a = env
        .cmd(&[
            "snapshot",
            s1.to_str().unwrap(),
            "--vault",
            &vault,
            "--volume",
            "one",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = env
        .cmd(&[
            "snapshot",
            s2.to_str().unwrap(),
            "--vault",
            &vault,
            "--volume",
            "two",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(
        env.json(&["snapshots", "--vault", &vault])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        env.json(&["vault", "check", &vault, "--read-data"])["ok"],
        true
    );
    for (vol, src) in [("one", &s1), ("two", &s2)] {
        let dst = env.path(&format!("r-{vol}"));
        env.json(&["restore", vol, dst.to_str().unwrap(), "--vault", &vault]);
        assert_same_tree(src, &dst);
    }
}

#[test]
fn several_large_files_chunked_in_parallel_keep_their_order() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    for (i, mib) in [9usize, 12, 10].iter().enumerate() {
        std::fs::write(
            src.join(format!("d/large{i}")),
            noise(mib * 1024 * 1024 + i, 40 + i as u64),
        )
        .unwrap();
        std::fs::write(
            src.join(format!("d/small{i}")),
            noise(1000 + i, 50 + i as u64),
        )
        .unwrap();
    }
    // The same large content twice: deduplicated across pool threads.
    std::fs::write(src.join("d/large-copy"), noise(9 * 1024 * 1024, 40)).unwrap();
    let vault = init(&env);
    let s = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "big",
    ]);
    assert_eq!(s["files"], 7);
    let new = s["bytes_new"].as_u64().unwrap();
    assert!(new < 32 * 1024 * 1024, "the copy is not stored twice: {s}");
    let dst = env.path("dst");
    env.json(&[
        "restore",
        "big",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--verify",
    ]);
    assert_same_tree(&src, &dst);
}

/// Many small files share one pack span: restore writes them all while
/// holding few descriptors, so a low open-files limit (64 here; a
/// million-file volume against the usual 1,024 or 20,000) is no failure.
#[test]
fn a_restore_of_many_small_files_stays_under_the_open_files_limit() {
    let env = Env::new();
    let vault = init(&env);
    let src = env.path("src");
    for d in 0..3 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..1000u32 {
            std::fs::write(
                dir.join(format!("f{i}")),
                (d * 1000 + i).to_le_bytes().repeat(64),
            )
            .unwrap();
        }
    }
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "many",
    ]);
    let dst = env.path("dst");
    let mut c = std::process::Command::new("sh");
    c.args([
        "-c",
        "ulimit -n 64 && exec \"$@\"",
        "sh",
        env!("CARGO_BIN_EXE_ferry"),
    ])
    .args([
        "restore",
        "many",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--json",
    ]);
    for (k, v) in &env.vars {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["files"], 3000, "{r}");
    assert_same_tree(&src, &dst);
}

/// Volume names end up in tables and in `NAME@ID` specs: one with '@' or a
/// control character is refused, and `ferry sync` makes a valid one from
/// any directory name.
#[test]
fn volume_names_are_checked_and_defaults_are_valid() {
    let env = Env::new();
    let src = env.path("data@2024\x1b[31m");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"x").unwrap();
    let vault = init(&env);
    for bad in ["a\nb", "\x1b[31mRED", "v@1", ""] {
        let out = env.run(&[
            "snapshot",
            src.to_str().unwrap(),
            "--vault",
            &vault,
            "--volume",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("bad volume name"), "{}", stderr(&out));
    }
    let dst = env.path("dst");
    let synced = env.json(&["sync", src.to_str().unwrap(), dst.to_str().unwrap()]);
    let volume = synced["snapshot"]["volume"].as_str().unwrap();
    assert!(volume.starts_with("data_2024_[31m-"), "{volume}");
    assert_same_tree(&src, &dst);
}

/// A file dated past what a tree's i64 nanoseconds hold comes back at the
/// end of that range (2262), not wrapped around into 1901.
#[test]
fn file_times_past_2262_are_clamped_not_wrapped() {
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = src.join("future");
    std::fs::write(&f, b"x").unwrap();
    let y2300 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10_413_792_000);
    set_mtime(&f, y2300);
    let vault = init(&env);
    let dst = env.path("dst");
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    env.json(&["restore", "v", dst.to_str().unwrap(), "--vault", &vault]);
    let back = std::fs::metadata(dst.join("future")).unwrap().mtime();
    // 2262-04-11T23:47:16Z.
    assert_eq!(back, 9_223_372_036, "restored mtime {back}");
}

/// Two restores into one target would delete each other's temporary files
/// and leave a mix of both snapshots: while one holds the target (a lock
/// on the directory, as a running restore takes it), another fails at once
/// and changes nothing.
#[test]
fn one_restore_at_a_time_into_a_target() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    let dst = env.path("dst");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("mine"), b"x").unwrap();
    let held = std::fs::File::open(&dst).unwrap();
    held.try_lock().unwrap();
    for args in [
        vec![
            "restore",
            "v",
            dst.to_str().unwrap(),
            "--vault",
            &vault,
            "--delete",
        ],
        vec!["sync", src.to_str().unwrap(), dst.to_str().unwrap()],
    ] {
        let out = env.run(&args);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("being restored by another process"),
            "{}",
            stderr(&out)
        );
        let names: Vec<_> = std::fs::read_dir(&dst).unwrap().collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
    drop(held);
    env.json(&[
        "restore",
        "v",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--delete",
    ]);
    assert_same_tree(&src, &dst);
}
