//! Pre-sync and final delta: restore into a target that holds an earlier
//! restore, and `ferry sync`.

use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};

use crate::common::*;

const PAGE: usize = 8192;

/// A volume with a 16 MiB database-like file of 8 KiB pages and small files.
fn make_volume(root: &std::path::Path) {
    std::fs::create_dir_all(root.join("db")).unwrap();
    std::fs::create_dir_all(root.join("app/conf")).unwrap();
    std::fs::write(root.join("db/table.dat"), noise(2048 * PAGE, 11)).unwrap();
    for i in 0..50 {
        std::fs::write(
            root.join(format!("app/f{i:02}.txt")),
            format!("file {i}\n").repeat(100 + i),
        )
        .unwrap();
    }
    std::fs::write(root.join("app/conf/settings.yaml"), b"a: 1\n").unwrap();
}

/// Rewrites 4 pages in place, appends one; returns the bytes changed.
fn mutate_db(root: &std::path::Path) -> u64 {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("db/table.dat"))
        .unwrap();
    for (i, page) in [7usize, 500, 1200, 1999].iter().enumerate() {
        f.write_all_at(&noise(PAGE, 100 + i as u64), (page * PAGE) as u64)
            .unwrap();
    }
    f.write_all_at(&noise(PAGE, 200), (2048 * PAGE) as u64)
        .unwrap();
    5 * PAGE as u64
}

fn init(env: &Env) -> String {
    let vault = env.path("vault").display().to_string();
    assert!(env.run(&["vault", "init", &vault]).status.success());
    vault
}

#[test]
fn final_delta_writes_only_what_changed() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let vault = init(&env);
    let d = dst.to_str().unwrap();
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg",
    ]);
    let first = env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_eq!(first["files_written"], 52);
    assert_same_tree(&src, &dst);

    // Nothing changed: nothing is written, nothing is compared.
    let again = env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_eq!(again["bytes_written"], 0, "{again}");
    assert_eq!(again["files_written"], 0, "{again}");
    assert_eq!(again["files_unchanged"], 52, "{again}");
    assert_eq!(again["bytes_compared"], 0, "{again}");

    // The change: pages of the big file, one small file, one added, one removed.
    let mut changed = mutate_db(&src);
    std::fs::write(src.join("app/f03.txt"), b"rewritten\n").unwrap();
    std::fs::write(src.join("app/new.txt"), b"new file\n").unwrap();
    std::fs::remove_file(src.join("app/f04.txt")).unwrap();
    changed += 10 + 9;
    let s = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg",
    ]);
    assert!(
        s["bytes_new"].as_u64().unwrap() <= 3 * changed + 4 * 131072,
        "{s}"
    );
    // The changed db file was chunked from its old chunk list; a full
    // re-read makes exactly the same chunks (nothing new to store).
    let full = env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg",
        "--reread",
    ]);
    assert_eq!(full["bytes_new"], 0, "{full}");

    let r = env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_eq!(r["files_patched"], 1, "{r}");
    assert_eq!(r["files_written"], 3, "patched db, f03, new: {r}");
    assert_eq!(r["files_unchanged"], 49, "{r}");
    assert_eq!(r["extra_entries"], 1, "{r}");
    assert_eq!(
        r["bytes_compared"], 0,
        "the memory vouched for the db file: {r}"
    );
    let written = r["bytes_written"].as_u64().unwrap();
    assert!(
        written <= 3 * changed + 4 * 131072,
        "wrote {written} for {changed} changed: {r}"
    );
    assert!(written < 16 * 1024 * 1024 / 4, "{r}");
    assert!(dst.join("app/f04.txt").exists(), "kept without --delete");
    assert_eq!(
        std::fs::read(dst.join("db/table.dat")).unwrap(),
        std::fs::read(src.join("db/table.dat")).unwrap()
    );

    // --delete removes what the snapshot lacks; --verify reads it all back.
    std::fs::write(dst.join("app/stray"), b"x").unwrap();
    std::fs::create_dir_all(dst.join("stray-dir/sub")).unwrap();
    let r = env.json(&[
        "restore", "pg", d, "--vault", &vault, "--delete", "--verify",
    ]);
    assert_eq!(r["files_deleted"], 3, "f04.txt, stray, stray-dir: {r}");
    assert_eq!(r["files_verified"], 52, "{r}");
    assert_same_tree(&src, &dst);
}

#[test]
fn target_changed_behind_our_back_is_corrected() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let vault = init(&env);
    let d = dst.to_str().unwrap();
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "pg",
    ]);
    env.json(&["restore", "pg", d, "--vault", &vault]);

    // Someone edits the target: same size, mtime put back. ctime betrays it.
    let victim = dst.join("db/table.dat");
    let md = std::fs::metadata(&victim).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap();
    f.write_all_at(&[0xAA; 100], 5000).unwrap();
    drop(f);
    filetime::set_file_mtime(
        &victim,
        filetime::FileTime::from_last_modification_time(&md),
    )
    .unwrap();
    std::fs::write(dst.join("app/f10.txt"), b"tampered").unwrap();
    // A stale temporary file from an interrupted restore.
    std::fs::write(dst.join("app/.ferry-0123456789abcdef.tmp"), b"junk").unwrap();

    let r = env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_eq!(r["files_written"], 2, "{r}");
    assert_eq!(r["files_patched"], 1, "{r}");
    assert!(
        r["bytes_compared"].as_u64().unwrap() >= 16 * 1024 * 1024,
        "the db file was compared by content: {r}"
    );
    assert!(
        r["bytes_written"].as_u64().unwrap() <= 2 * 131072 + 10_000,
        "{r}"
    );
    assert_same_tree(&src, &dst);

    // A directory where the snapshot has a file, and a file where it has a directory.
    std::fs::remove_file(dst.join("app/f11.txt")).unwrap();
    std::fs::create_dir_all(dst.join("app/f11.txt/inner")).unwrap();
    std::fs::remove_dir_all(dst.join("app/conf")).unwrap();
    std::fs::write(dst.join("app/conf"), b"not a dir").unwrap();
    env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_same_tree(&src, &dst);

    // The memory vouches for everything now; --reread-target trusts none
    // of it: every byte is read and compared, nothing needs writing.
    let quiet = env.json(&["restore", "pg", d, "--vault", &vault]);
    assert_eq!(quiet["bytes_compared"], 0, "{quiet}");
    let total: u64 = files_under(&src)
        .iter()
        .map(|p| p.symlink_metadata().unwrap().len())
        .sum();
    let reread = env.json(&["restore", "pg", d, "--vault", &vault, "--reread-target"]);
    assert_eq!(reread["bytes_compared"], total, "{reread}");
    assert_eq!(reread["bytes_written"], 0, "{reread}");
    assert_eq!(reread["files_unchanged"], 52, "{reread}");
}

#[test]
fn sparse_files_stay_sparse() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = std::fs::File::create(src.join("disk.img")).unwrap();
    f.set_len(64 * 1024 * 1024).unwrap();
    f.write_all_at(&noise(100_000, 3), 10 * 1024 * 1024)
        .unwrap();
    drop(f);
    // All zeros: no chunk of it is ever written, the finish makes it.
    std::fs::File::create(src.join("zeros.img"))
        .unwrap()
        .set_len(3 * 1024 * 1024)
        .unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "img",
    ]);
    let dst = env.path("dst");
    let r = env.json(&["restore", "img", dst.to_str().unwrap(), "--vault", &vault]);
    assert!(
        r["bytes_written"].as_u64().unwrap() < 1024 * 1024,
        "zero runs are not written: {r}"
    );
    let md = std::fs::metadata(dst.join("disk.img")).unwrap();
    assert_eq!(md.len(), 64 * 1024 * 1024);
    let zeros = std::fs::metadata(dst.join("zeros.img")).unwrap();
    assert_eq!(zeros.len(), 3 * 1024 * 1024);
    assert_eq!(zeros.blocks(), 0, "an all-zero file is all holes");
    assert!(
        md.blocks() * 512 < 4 * 1024 * 1024,
        "allocated {} bytes",
        md.blocks() * 512
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn sync_without_a_vault_repeats_cheaply() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let mut env2 = Env::new();
    // No passphrase needed: the default vault has its own key file.
    env2.vars.retain(|(k, _)| k != "FERRY_PASSPHRASE");
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let first = env2.json(&["sync", s, d]);
    assert!(
        first["bytes_written"].as_u64().unwrap() >= 16 * 1024 * 1024,
        "{first}"
    );
    assert_same_tree(&src, &dst);
    let key = env2.path("state/ferry/default-vault.key");
    assert_eq!(key.metadata().unwrap().mode() & 0o777, 0o600);

    // A target that is a file: refused before any snapshot is saved.
    let file = env.path("a-file");
    std::fs::write(&file, b"keep me").unwrap();
    let listed = || {
        env2.json(&["snapshots"])["snapshots"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(listed(), 1);
    let out = env2.run(&["sync", s, file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a directory"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    assert_eq!(listed(), 1);

    let second = env2.json(&["sync", s, d]);
    assert_eq!(second["bytes_written"], 0, "{second}");
    // Nothing changed: no content is read, stored or written (how fast
    // that is belongs to benches/, not to a test).
    assert_eq!(second["snapshot"]["bytes_scanned"], 0, "{second}");
    assert_eq!(second["snapshot"]["bytes_new"], 0, "{second}");
    assert_eq!(second["restore"]["files_unchanged"], 52, "{second}");

    let changed = mutate_db(&src);
    let third = env2.json(&["sync", s, d, "--verify"]);
    let w = third["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w <= 3 * changed + 4 * 131072, "{third}");
    assert_eq!(third["restore"]["files_verified"], 52, "{third}");
    // The cutover report: every phase of both halves on one timeline,
    // each with what it moved.
    let report = third["report"].as_array().unwrap();
    let names: Vec<&str> = report.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "scan", "upload", "commit", "plan", "fetch", "write", "finish", "verify"
        ],
        "{third}"
    );
    let phase = |n: &str| report.iter().find(|p| p["name"] == n).unwrap();
    let f = |p: &serde_json::Value, k: &str| p[k].as_f64().unwrap();
    let total = f(&third, "duration_s");
    for p in report {
        assert!(
            0.0 <= f(p, "start_s") && f(p, "start_s") <= f(p, "end_s") && f(p, "end_s") <= total,
            "{p} outside 0..{total}"
        );
        assert!(
            (f(p, "seconds") - (f(p, "end_s") - f(p, "start_s"))).abs() < 1e-6,
            "{p}"
        );
    }
    let (snap, rest) = (&third["snapshot"], &third["restore"]);
    assert_eq!(phase("scan")["bytes"], snap["bytes_scanned"], "{third}");
    assert!(phase("scan")["files"].as_u64().unwrap() >= 1, "{third}");
    assert!(phase("upload")["bytes"].as_u64().unwrap() > 0, "{third}");
    assert_eq!(
        phase("upload")["objects"],
        snap["packs_uploaded"],
        "{third}"
    );
    assert_eq!(
        phase("commit")["objects"],
        2,
        "index and snapshot record: {third}"
    );
    assert_eq!(phase("fetch")["bytes"], rest["bytes_fetched"], "{third}");
    assert_eq!(phase("fetch")["objects"], rest["packs_fetched"], "{third}");
    assert_eq!(phase("write")["bytes"], third["bytes_written"], "{third}");
    assert!(phase("write")["files"].as_u64().unwrap() >= 1, "{third}");
    assert_eq!(phase("verify")["files"], 52, "{third}");
    assert!(
        phase("verify")["seconds"].as_f64().unwrap() > 0.0,
        "{third}"
    );
    // The restore may plan while the snapshot's last packs upload, but
    // fetches nothing before the snapshot is committed.
    assert!(
        f(phase("fetch"), "start_s") >= f(phase("commit"), "end_s"),
        "{third}"
    );
    assert_same_tree(&src, &dst);
    // The human output carries the same table.
    mutate_db(&src);
    let human = env2.cmd(&["sync", s, d]).output().unwrap();
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(human.status.success(), "{text}");
    assert!(text.contains("cutover report"), "{text}");
    for n in ["scan", "upload", "fetch", "write", "finish"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(n)),
            "no {n} row in:\n{text}"
        );
    }
    drop(env);
}

#[test]
fn symlinks_in_the_target_are_never_followed() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let outside = env.path("outside");
    std::fs::create_dir_all(outside.join("conf")).unwrap();
    std::fs::write(outside.join("table.dat"), b"precious").unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    // The target holds symlinks where the snapshot has a directory and a file.
    std::fs::create_dir_all(&dst).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("db")).unwrap();
    std::fs::create_dir_all(dst.join("app")).unwrap();
    std::os::unix::fs::symlink(outside.join("table.dat"), dst.join("app/f00.txt")).unwrap();
    env.json(&["restore", "v", dst.to_str().unwrap(), "--vault", &vault]);
    assert_same_tree(&src, &dst);
    assert_eq!(
        std::fs::read(outside.join("table.dat")).unwrap(),
        b"precious"
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        2,
        "nothing written outside the target"
    );

    // The target given as a link to a directory (a volume reached through
    // a link) is followed, that once: the files land in the directory,
    // the link stays a link, and the next sync finds them in place.
    let real = env.path("mounted");
    std::fs::create_dir_all(&real).unwrap();
    let link = env.path("volume-link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (s, l) = (src.to_str().unwrap(), link.to_str().unwrap());
    let first = env.json(&["sync", s, l, "--vault", &vault]);
    assert!(first["bytes_written"].as_u64().unwrap() > 0, "{first}");
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_same_tree(&src, &real);
    let again = env.json(&["sync", s, l, "--vault", &vault]);
    assert_eq!(again["bytes_written"], 0, "{again}");
    // --block names an image file: a directory is one clear line.
    let out = env.run(&["sync", s, l, "--vault", &vault, "--block"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("a directory, not a disk image") && e.lines().count() == 1,
        "{e}"
    );
}

/// A full disk: a 3 MiB tmpfs in a private mount namespace (`unshare -rm`,
/// so no privileges and nothing left mounted).
#[test]
fn full_target_disk_is_one_clear_error_and_restored_files_stay_whole() {
    let env = Env::new();
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..5 {
        std::fs::write(src.join(format!("small{i}")), noise(20_000, i)).unwrap();
    }
    std::fs::write(src.join("zbig"), noise(6 << 20, 99)).unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    let (mnt, out) = (env.path("mnt"), env.path("out"));
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=3m tmpfs {mnt} && {{ \"$0\" restore v {mnt}/t --vault {vault}; echo \"exit=$?\" >&2; cp -a {mnt}/t {out}; }}",
        mnt = mnt.display(),
        vault = vault,
        out = out.display()
    );
    let mut c = std::process::Command::new("unshare");
    c.args(["-rm", "sh", "-c", &script, env!("CARGO_BIN_EXE_ferry")]);
    for (k, v) in &env.vars {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let err = stderr(&o);
    assert!(err.contains("exit=1"), "{err}");
    let first = err.lines().next().unwrap();
    assert!(
        first.starts_with("error: ") && first.contains("No space left") && first.contains("zbig"),
        "{err}"
    );
    assert!(
        !out.join("zbig").exists(),
        "the file that did not fit is not there under its name"
    );
    let mut whole = 0;
    for f in files_under(&out) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains(".ferry-"), "temporary file left: {name}");
        assert_eq!(
            std::fs::read(&f).unwrap(),
            std::fs::read(src.join(&name)).unwrap(),
            "{name}"
        );
        whole += 1;
    }
    assert!(whole >= 1, "files that fit were restored");
}

#[test]
fn a_file_written_while_it_is_read_is_named_unstable() {
    let env = Env::new();
    let src = env.path("src");
    make_volume(&src);
    // Large enough that reading it takes a while; a writer keeps touching it.
    let hot = src.join("db/hot.dat");
    std::fs::write(&hot, noise(48 << 20, 5)).unwrap();
    let vault = init(&env);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (hot, stop) = (hot.clone(), stop.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&hot).unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&i.to_le_bytes(), (i * 4099) % (48 << 20))
                    .unwrap();
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let out = env.run(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "hot",
        "--json",
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // Saved, but incomplete (exit 3), naming the file in JSON and on stderr.
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let hot_name = hot.display().to_string();
    assert_eq!(s["unstable"], serde_json::json!([hot_name]), "{s}");
    assert_eq!(s["incomplete"], true, "{s}");
    assert!(stderr(&out).contains("db/hot.dat"), "{}", stderr(&out));
    // The snapshot is listed and the stable files restore whole.
    let dst = env.path("dst");
    env.json(&["restore", "hot", dst.to_str().unwrap(), "--vault", &vault]);
    assert_eq!(
        std::fs::read(dst.join("db/table.dat")).unwrap(),
        std::fs::read(src.join("db/table.dat")).unwrap()
    );
}

#[test]
fn an_xattr_only_change_reaches_the_target_and_a_removed_one_leaves_it() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let f = src.join("app/f01.txt");
    if xattr::set(&f, "user.ferry.a", b"1").is_err() {
        panic!("this filesystem refuses user xattrs: the test needs them");
    }
    let vault = init(&env);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let sync = |env: &Env| env.json(&["sync", s, d, "--vault", &vault]);
    sync(&env);
    let g = dst.join("app/f01.txt");
    assert_eq!(xattr::get(&g, "user.ferry.a").unwrap(), Some(b"1".to_vec()));
    // Change one value, add another: content and mtime stay.
    xattr::set(&f, "user.ferry.a", b"2").unwrap();
    xattr::set(&f, "user.ferry.b", b"new").unwrap();
    let r = sync(&env);
    assert_eq!(r["bytes_written"], 0, "{r}");
    assert_eq!(xattr::get(&g, "user.ferry.a").unwrap(), Some(b"2".to_vec()));
    assert_eq!(
        xattr::get(&g, "user.ferry.b").unwrap(),
        Some(b"new".to_vec())
    );
    // Removed in the source: removed in the target.
    xattr::remove(&f, "user.ferry.a").unwrap();
    sync(&env);
    assert_eq!(xattr::get(&g, "user.ferry.a").unwrap(), None);
    assert_eq!(
        xattr::get(&g, "user.ferry.b").unwrap(),
        Some(b"new".to_vec())
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn verify_lists_a_file_that_differs_and_exits_1() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    std::fs::create_dir_all(&src).unwrap();
    const SIZE: usize = 64 << 20;
    std::fs::write(src.join("big.dat"), noise(SIZE, 3)).unwrap();
    std::fs::write(src.join("small.txt"), b"fine\n").unwrap();
    let vault = init(&env);
    env.json(&[
        "snapshot",
        src.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "v",
    ]);
    // Someone writes the file's last bytes the moment it appears under its
    // real name: the verify, which reads it from the start, must see it.
    let victim = dst.join("big.dat");
    let spoiler = {
        let victim = victim.clone();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            while t.elapsed() < std::time::Duration::from_secs(120) {
                if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&victim) {
                    f.write_all_at(b"SPOILED!", (SIZE - 8) as u64).unwrap();
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            false
        })
    };
    let out = env.run(&[
        "restore",
        "v",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--verify",
    ]);
    assert!(spoiler.join().unwrap(), "the file never appeared");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("big.dat") && !err.contains("small.txt"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The memory forgot the file: the next restore corrects it.
    let r = env.json(&[
        "restore",
        "v",
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--verify",
    ]);
    assert_eq!(r["files_verified"], 2, "{r}");
    assert_same_tree(&src, &dst);
}

/// `ferry sync` checks the target beside the snapshot: directories in
/// place whole are not planned again, and whatever changed in the target
/// (a file, an extra entry, a directory's mode) is still found and fixed.
#[test]
fn sync_checks_the_target_beside_the_snapshot_and_still_fixes_drift() {
    let env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let vault = init(&env);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    let sync = |extra: &[&str]| {
        let mut args = vec!["sync", s, d, "--vault", &vault, "--delete"];
        args.extend_from_slice(extra);
        env.json(&args)
    };
    let first = sync(&[]);
    assert_eq!(first["restore"]["dirs_checked_in_place"], 0, "{first}");

    // Nothing changed: app, app/conf and db are all skipped whole.
    let quiet = sync(&[]);
    assert_eq!(quiet["restore"]["dirs_checked_in_place"], 3, "{quiet}");
    assert_eq!(quiet["restore"]["files_unchanged"], 52, "{quiet}");
    assert_eq!(quiet["bytes_written"], 0, "{quiet}");

    // The target drifts in directories the source did not touch.
    std::fs::write(dst.join("app/conf/settings.yaml"), b"tampered").unwrap();
    std::fs::write(dst.join("db/extra.bin"), b"not in the snapshot").unwrap();
    let drift = sync(&[]);
    assert_eq!(drift["restore"]["dirs_checked_in_place"], 0, "{drift}");
    assert_eq!(drift["restore"]["files_written"], 1, "{drift}");
    assert_eq!(drift["restore"]["files_deleted"], 1, "{drift}");
    assert_same_tree(&src, &dst);

    // A directory's mode alone is drift too.
    std::fs::set_permissions(dst.join("app/conf"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mode = sync(&[]);
    assert_eq!(
        mode["restore"]["dirs_checked_in_place"], 1,
        "db only: {mode}"
    );
    assert_same_tree(&src, &dst);

    // Only the source's db changed: the app subtree is skipped whole, the
    // db directory is planned and patched.
    mutate_db(&src);
    let delta = sync(&[]);
    assert_eq!(delta["restore"]["dirs_checked_in_place"], 2, "{delta}");
    // The root and db are planned from the check's listing, not listed again.
    assert_eq!(delta["restore"]["dirs_listed_ahead"], 2, "{delta}");
    assert_eq!(delta["restore"]["files_patched"], 1, "{delta}");
    assert_same_tree(&src, &dst);

    // The source changes in app while the target drifts there too: app is
    // planned from what the check found in it, and every drift is fixed.
    let app = src.join("app");
    std::fs::write(app.join("f01.txt"), b"changed in the source").unwrap();
    std::fs::remove_file(app.join("f02.txt")).unwrap();
    std::fs::remove_file(app.join("f03.txt")).unwrap();
    std::os::unix::fs::symlink("f00.txt", app.join("f03.txt")).unwrap();
    std::fs::write(app.join("g-new.txt"), b"new in the source").unwrap();
    let app_dst = dst.join("app");
    std::fs::write(app_dst.join("f04.txt"), b"tampered in the target").unwrap();
    std::fs::remove_file(app_dst.join("f05.txt")).unwrap();
    std::fs::remove_file(app_dst.join("f06.txt")).unwrap();
    std::fs::create_dir(app_dst.join("f06.txt")).unwrap();
    std::fs::write(app_dst.join("stray.txt"), b"not in the snapshot").unwrap();
    let stale_tmp = app_dst.join(".ferry-0123456789abcdef.tmp");
    std::fs::write(&stale_tmp, b"left by a crash").unwrap();
    let both = sync(&[]);
    assert_eq!(
        both["restore"]["dirs_checked_in_place"], 2,
        "app/conf, db: {both}"
    );
    assert_eq!(
        both["restore"]["dirs_listed_ahead"], 2,
        "the root, app: {both}"
    );
    // f01, g-new, f04, f05, f06; f03 became a link.
    assert_eq!(both["restore"]["files_written"], 5, "{both}");
    assert_eq!(both["restore"]["files_deleted"], 2, "f02, stray: {both}");
    assert!(!stale_tmp.exists());
    assert_same_tree(&src, &dst);
    assert_eq!(
        std::fs::read_link(app_dst.join("f03.txt")).unwrap(),
        std::path::Path::new("f00.txt")
    );

    // --reread-target trusts no memory, so no check ahead either.
    let reread = sync(&["--reread-target"]);
    assert_eq!(reread["restore"]["dirs_checked_in_place"], 0, "{reread}");
    assert_eq!(reread["restore"]["dirs_listed_ahead"], 0, "{reread}");
}

/// A target that is, holds or lies inside its source, or that overlaps
/// the vault or ferry's state directory, is refused with one line before
/// anything is read or written; a target beside them is fine.
#[test]
fn a_target_over_the_source_or_ferrys_own_state_is_refused() {
    let env = Env::new();
    let src = env.path("data/src");
    make_volume(&src);
    std::fs::write(env.path("data/other"), b"keep me").unwrap();
    let vault = init(&env);
    let listing = |p: &std::path::Path| describe(p);
    let (before_data, before_vault) = (listing(&env.path("data")), listing(&env.path("vault")));
    let s = src.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["sync".into(), s.into(), s.into()], "it is the source"),
        (
            vec!["sync".into(), s.into(), format!("{s}/copy")],
            "inside the source",
        ),
        (
            vec![
                "sync".into(),
                s.into(),
                format!("{s}/.."),
                "--delete".into(),
            ],
            "holds the source",
        ),
        (
            vec!["sync".into(), s.into(), "/".into()],
            "holds the source",
        ),
        (
            vec![
                "sync".into(),
                s.into(),
                format!("{vault}/restored"),
                "--vault".into(),
                vault.clone(),
            ],
            "inside the vault",
        ),
        (
            vec![
                "restore".into(),
                "v".into(),
                env.dir.path().display().to_string(),
                "--vault".into(),
                vault.clone(),
                "--delete".into(),
            ],
            "which --delete would remove",
        ),
    ];
    for (args, why) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.run(&args);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {e}");
        assert!(
            e.starts_with("error: refusing target") && e.contains(why) && e.lines().count() == 1,
            "{args:?}: {e}"
        );
    }
    assert_eq!(listing(&env.path("data")), before_data);
    assert_eq!(listing(&env.path("vault")), before_vault);
    // Beside the source and the vault: fine.
    let dst = env.path("data/dst");
    env.json(&[
        "sync",
        s,
        dst.to_str().unwrap(),
        "--vault",
        &vault,
        "--delete",
    ]);
    assert_same_tree(&src, &dst);
}

/// `ferry sync ~ ...`: a source that holds ferry's own state (the state
/// directory with the default vault, or a `--vault` and `--catalog` given
/// inside it) is copied without it. Read, the vault would be copied into
/// itself, and grow with each run.
#[test]
fn a_source_holding_ferrys_state_is_copied_without_it() {
    let mut env = Env::new();
    let (src, dst) = (env.path("src"), env.path("dst"));
    make_volume(&src);
    let state = src.join("home/.state");
    env.vars.retain(|(k, _)| k != "XDG_STATE_HOME");
    env.vars
        .push(("XDG_STATE_HOME".into(), state.display().to_string()));
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    // Everything but the state: what the copy must equal.
    let user_data = |root: &std::path::Path| {
        let mut t = describe(root);
        t.retain(|k, _| !k.starts_with("home/.state") && !k.starts_with("backups/"));
        t
    };

    let first = env.json(&["sync", s, d]);
    let own = state.join("ferry").display().to_string();
    assert_eq!(first["snapshot"]["skipped_state"], serde_json::json!([own]));
    assert_eq!(first["snapshot"]["incomplete"], false, "{first}");
    assert_eq!(user_data(&src), user_data(&dst));
    assert!(!dst.join("home/.state/ferry").exists());
    // The vault grew during the first run; the second has nothing new.
    let second = env.json(&["sync", s, d]);
    assert_eq!(second["snapshot"]["bytes_new"], 0, "{second}");
    assert_eq!(second["bytes_written"], 0, "{second}");
    assert!(!dst.join("home/.state/ferry").exists());

    // A vault and a catalog named on the command line, inside the source.
    let vault = src.join("backups/vault");
    let catalog = src.join("backups/catalog.sqlite");
    let (v, c) = (vault.to_str().unwrap(), catalog.to_str().unwrap());
    assert!(env.run(&["vault", "init", v]).status.success());
    let third = env.json(&["sync", s, d, "--vault", v, "--catalog", c]);
    let skipped = third["snapshot"]["skipped_state"].as_array().unwrap();
    for p in [v, c, &own] {
        assert!(skipped.iter().any(|x| x == p), "{p} not left out: {third}");
    }
    let fourth = env.json(&["sync", s, d, "--vault", v, "--catalog", c]);
    assert_eq!(fourth["snapshot"]["bytes_new"], 0, "{fourth}");
    assert!(!dst.join("backups/vault").exists());
    assert!(!dst.join("backups/catalog.sqlite").exists());
    assert_eq!(user_data(&src), user_data(&dst));
}

fn tree_bytes(root: &std::path::Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                n += md.len();
            }
        }
    }
    n
}

/// `ferry sync` is rsync to its users: its default vault must not pile up.
/// Each run keeps the volume's newest two snapshots (the previous one
/// restores the target as it was before the run) and prunes once the packs
/// outgrow three times the volume; the other commands find the default
/// vault without `--vault`; a target synced from a snapshot since pruned
/// still syncs right.
#[test]
fn the_default_vault_keeps_two_snapshots_and_stays_bounded() {
    let mut env = Env::new();
    env.vars.retain(|(k, _)| k != "FERRY_PASSPHRASE");
    let (src, dst, early) = (env.path("src"), env.path("dst"), env.path("early"));
    make_volume(&src);
    let (s, d) = (src.to_str().unwrap(), dst.to_str().unwrap());
    env.json(&["sync", s, early.to_str().unwrap()]);
    let table = src.join("db/table.dat");
    let mut before_last = Vec::new();
    let (mut pruned, mut volume) = (0, String::new());
    for round in 0..4u64 {
        // The whole 16 MiB table rewritten: nothing dedups between rounds.
        before_last = std::fs::read(&table).unwrap();
        std::fs::write(&table, noise(2048 * PAGE, 1000 + round)).unwrap();
        let out = env.json(&["sync", s, d]);
        volume = out["snapshot"]["volume"].as_str().unwrap().to_string();
        let upkeep = &out["upkeep"];
        let forgotten = upkeep["forgotten"].as_array().unwrap().len();
        // Two snapshots before this round's (the early sync's and round 0's).
        assert_eq!(forgotten, usize::from(round >= 1), "round {round}: {out}");
        assert_eq!(upkeep["prune_error"], serde_json::Value::Null, "{out}");
        if let Some(p) = upkeep["pruned"].as_object() {
            assert!(p["bytes_reclaimed"].as_u64().unwrap() > 0, "{out}");
            pruned += 1;
        }
        let vault = tree_bytes(&env.path("state/ferry/default-vault"));
        assert!(
            vault <= 3 * 16 * 1024 * 1024 + 2 * 1024 * 1024,
            "round {round}: the default vault holds {vault} bytes"
        );
        assert_same_tree(&src, &dst);
    }
    // By round 2 four versions of the table (64 MiB) were written.
    assert!(pruned >= 1, "never pruned");

    // No --vault: the default vault's snapshots, and the one before the
    // last run restores the table as it was.
    let list = env.json(&["snapshots"]);
    let snaps = list["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{list}");
    let previous = snaps
        .iter()
        .min_by_key(|x| x["time_ns"].as_i64().unwrap())
        .unwrap();
    let spec = format!("{volume}@{}", previous["id"].as_str().unwrap());
    let undo = env.path("undo");
    env.json(&["restore", &spec, undo.to_str().unwrap()]);
    assert!(std::fs::read(undo.join("db/table.dat")).unwrap() == before_last);

    // The early target's snapshot is long pruned: it still syncs whole.
    env.json(&["sync", s, early.to_str().unwrap(), "--delete"]);
    assert_same_tree(&src, &early);
    let check = env.json(&["vault", "check", "--read-data"]);
    assert_eq!(check["snapshots"], 2, "{check}");
}
