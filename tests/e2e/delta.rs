//! Pre-sync and final delta: restore into a target that holds an earlier
//! restore, and `ferry sync`.

use std::os::unix::fs::{FileExt, MetadataExt};

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

    let second = env2.json(&["sync", s, d]);
    assert_eq!(second["bytes_written"], 0, "{second}");
    assert_eq!(second["snapshot"]["bytes_scanned"], 0, "{second}");
    assert_eq!(second["restore"]["files_unchanged"], 52, "{second}");

    let changed = mutate_db(&src);
    let third = env2.json(&["sync", s, d, "--verify"]);
    let w = third["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w <= 3 * changed + 4 * 131072, "{third}");
    assert_eq!(third["restore"]["files_verified"], 52, "{third}");
    // The downtime breakdown: phases of both halves.
    let sp = &third["snapshot"]["phases"];
    assert!(
        sp["upload_s"].as_f64().unwrap() >= sp["scan_s"].as_f64().unwrap(),
        "{sp}"
    );
    let rp = &third["restore"]["phases"];
    assert!(rp["verify_s"].as_f64().unwrap() > 0.0, "{rp}");
    assert_same_tree(&src, &dst);
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
