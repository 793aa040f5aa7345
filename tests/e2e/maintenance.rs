//! Forget, prune, locks, and crash safety under kill -9.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn local_env(pack: &str) -> Env {
    let mut env = Env::new();
    let vault = env.path("vault");
    env.vars
        .push(("FERRY_VAULT".into(), vault.display().to_string()));
    let out = env.run(&["vault", "init", "--pack-size", pack]);
    assert!(out.status.success(), "{}", stderr(&out));
    env
}

/// The same vault seen from another machine: its own catalog.
fn other_machine(env: &Env) -> Env {
    let mut vars = env.vars.clone();
    for (k, v) in vars.iter_mut() {
        if k == "XDG_STATE_HOME" {
            *v = env.path("other-state").display().to_string();
        }
    }
    Env {
        dir: tempfile::tempdir().unwrap(),
        vars,
    }
}

fn dir_bytes(p: &Path) -> u64 {
    files_under(p)
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum()
}

#[test]
fn forget_and_prune_reclaim_what_nothing_references_and_every_catalog_learns_it() {
    let env = local_env("1M");
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..60u64 {
        std::fs::write(src.join(format!("f{i:02}")), noise(50_000, i)).unwrap();
    }
    let first = env.json(&["snapshot", s(&src), "--volume", "db"]);
    // Another machine's catalog knows the first snapshot's chunks.
    let other = other_machine(&env);
    assert_eq!(
        other.json(&["snapshots"])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Every other file goes: each pack is about half dead.
    for i in (0..60u64).step_by(2) {
        std::fs::remove_file(src.join(format!("f{i:02}"))).unwrap();
    }
    env.json(&["snapshot", s(&src), "--volume", "db"]);
    let dry = env.json(&["forget", "db", "--keep-last", "1", "--dry-run"]);
    assert_eq!(dry["forgotten"].as_array().unwrap().len(), 1);
    assert_eq!(
        env.json(&["snapshots"])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let f = env.json(&["forget", "db", "--keep-last", "1"]);
    assert_eq!(f["forgotten"][0], first["snapshot_id"]);

    let packs = env.path("vault/packs");
    let before = dir_bytes(&packs);
    let dry = env.json(&["prune", "--dry-run"]);
    assert_eq!(dir_bytes(&packs), before, "a dry run changes nothing");
    let p = env.json(&["prune"]);
    let (real, est) = (
        p["bytes_reclaimed"].as_u64().unwrap() as f64,
        dry["bytes_reclaimed"].as_u64().unwrap() as f64,
    );
    assert!(
        (real - est).abs() <= real * 0.02,
        "dry run estimate {dry} vs {p}"
    );
    assert!(p["packs_repacked"].as_u64().unwrap() > 0, "{p}");
    let unreferenced = p["unreferenced_bytes"].as_u64().unwrap();
    let reclaimed = p["bytes_reclaimed"].as_u64().unwrap();
    assert!(unreferenced >= 1_400_000, "{p}");
    assert!(
        reclaimed * 10 >= unreferenced * 9,
        "reclaimed {reclaimed} of {unreferenced} unreferenced bytes"
    );
    assert_eq!(before - dir_bytes(&packs), reclaimed, "{p}");
    assert_eq!(env.json(&["vault", "check", "--read-data"])["ok"], true);
    let dst = env.path("dst");
    env.json(&["restore", "db", s(&dst), "--verify"]);
    assert_same_tree(&src, &dst);

    // The other machine learns the prune on open: it restores from the new
    // packs and does not dedup against deleted chunks.
    assert_eq!(
        other.json(&["snapshots"])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let dst2 = other.path("dst");
    other.json(&["restore", "db", s(&dst2), "--verify"]);
    assert_same_tree(&src, &dst2);
    std::fs::write(src.join("f00"), noise(50_000, 0)).unwrap();
    let again = other.json(&["snapshot", s(&src), "--volume", "db"]);
    assert!(again["bytes_new"].as_u64().unwrap() >= 50_000, "{again}");
    assert_eq!(env.json(&["vault", "check", "--read-data"])["ok"], true);

    // A rebuilt catalog agrees, and a second prune finds nothing to do.
    assert!(env.run(&["catalog", "rebuild"]).status.success());
    let p2 = env.json(&["prune"]);
    assert_eq!(p2["packs_deleted"], 0, "{p2}");
    let dst3 = env.path("dst3");
    env.json(&["restore", "db", s(&dst3), "--verify"]);
    assert_same_tree(&src, &dst3);

    // Bad input: one line each.
    for args in [
        &["forget", "db"][..],
        &["forget", "nope", "--keep-last", "1"],
        &["forget", "db", "--keep-within", "7x"],
        &["prune", "--max-repack-ratio", "2"],
    ] {
        let out = env.run(args);
        let e = stderr(&out);
        assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: {e}");
        assert!(
            e.starts_with("error: ") && !e.contains("panicked"),
            "{args:?}: {e}"
        );
        if out.status.code() == Some(1) {
            assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        }
    }
}

/// A write killed midway leaves its staging file (`<name>#<n>`) beside the
/// object's name in a local vault; prune removes it once it is an hour old,
/// and never a young one (a write in progress); a dry run only counts.
#[test]
fn prune_sweeps_the_staging_files_of_killed_writes() {
    let env = local_env("1M");
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a"), noise(200_000, 1)).unwrap();
    env.json(&["snapshot", s(&src), "--volume", "v"]);
    let pack = files_under(&env.path("vault/packs"))
        .into_iter()
        .next()
        .expect("a pack");
    let staging = |n: u32| {
        let mut name = pack.file_name().unwrap().to_owned();
        name.push(format!("#{n}"));
        pack.with_file_name(name)
    };
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let (old, young) = (staging(1), staging(2));
    let bytes = std::fs::read(&pack).unwrap();
    for p in [&old, &young] {
        std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
    }
    set_mtime(&old, two_hours_ago);

    let dry = env.json(&["prune", "--dry-run"]);
    assert_eq!(dry["staging_removed"], 1, "{dry}");
    assert!(old.exists(), "a dry run removes nothing");
    let out = env.run(&["prune"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed 1 staging files of killed writes"),
        "{text}"
    );
    assert!(!old.exists());
    assert!(young.exists(), "a young staging file may be a live write's");
    assert_eq!(env.json(&["prune"])["staging_removed"], 0);
    assert_eq!(env.json(&["vault", "check", "--read-data"])["ok"], true);
    let d = env.path("back");
    env.json(&["restore", "v", s(&d), "--verify"]);
    assert_same_tree(&src, &d);
}

#[test]
fn prune_and_snapshots_exclude_each_other_through_the_vault_lock() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3"));
    s3.create_bucket("locked");
    s3.env(&mut env);
    env.vars
        .push(("FERRY_VAULT".into(), "s3://locked/v".into()));
    assert!(
        env.run(&["vault", "init", "--pack-size", "1M"])
            .status
            .success()
    );
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8u64 {
        std::fs::write(src.join(format!("old{i}")), noise(1_000_000, i)).unwrap();
    }
    env.json(&["snapshot", s(&src), "--volume", "v"]);

    // A slow snapshot holds its shared lock: prune refuses, or waits.
    for i in 0..8u64 {
        std::fs::write(src.join(format!("new{i}")), noise(1_000_000, 50 + i)).unwrap();
    }
    s3.put_delay_ms.store(400, Relaxed);
    let snap = env
        .cmd(&["snapshot", s(&src), "--volume", "v", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let locks = s3.root.join("locked/v/locks");
    let start = Instant::now();
    while !locks.exists() || files_under(&locks).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = env.run(&["prune"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("locked by snapshot"),
        "{}",
        stderr(&out)
    );
    let waited = env.json(&["prune", "--lock-wait", "120"]);
    let out = snap.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        waited["packs_deleted"], 0,
        "nothing was forgotten: {waited}"
    );

    // The race that matters: prune deletes the old files' chunks while a
    // snapshot brings the old files back. Whoever goes first, the result
    // restores.
    for i in 0..8u64 {
        std::fs::remove_file(src.join(format!("old{i}"))).unwrap();
    }
    env.json(&["snapshot", s(&src), "--volume", "v"]);
    env.json(&["forget", "v", "--keep-last", "1"]);
    for i in 0..8u64 {
        std::fs::write(src.join(format!("old{i}")), noise(1_000_000, i)).unwrap();
    }
    s3.put_delay_ms.store(150, Relaxed);
    // Either may take the lock first (the prune has a head start, which a
    // busy machine can eat): the prune waits for the snapshot if need be.
    let prune = env
        .cmd(&["prune", "--json", "--lock-wait", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let snap = env.json(&["snapshot", s(&src), "--volume", "v"]);
    let out = prune.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    s3.put_delay_ms.store(0, Relaxed);
    assert_eq!(env.json(&["vault", "check", "--read-data"])["ok"], true);
    let dst = env.path("dst");
    let r = env.json(&[
        "restore",
        &format!("v@{}", snap["snapshot_id"].as_str().unwrap()),
        s(&dst),
        "--verify",
    ]);
    assert_eq!(r["files"], 16);
    assert_same_tree(&src, &dst);
    assert!(files_under(&locks).is_empty(), "every lock was released");
}

/// Content hash of every regular file under `root`, by relative path.
fn contents(root: &Path) -> BTreeMap<String, blake3::Hash> {
    files_under(root)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            (rel, blake3::hash(&std::fs::read(&p).unwrap()))
        })
        .collect()
}

/// Runs ferry and kills it (SIGKILL) after `after`; returns whether it
/// finished first.
fn run_killed(env: &Env, args: &[&str], after: Duration) -> bool {
    let mut child = env
        .cmd(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn timed(env: &Env, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = env.run(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    t.elapsed()
}

const KILLS: u32 = 20;

#[test]
fn kill_9_during_snapshot_restore_and_prune_loses_nothing() {
    let env = local_env("1M");
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let write_gen = |g: u64| {
        for i in 0..24u64 {
            std::fs::write(src.join(format!("f{i:02}")), noise(400_000, g * 100 + i)).unwrap();
        }
    };
    write_gen(0);
    let full = timed(&env, &["snapshot", s(&src), "--volume", "v"]);

    // Snapshot: killed at 20 points; only whole snapshots are ever listed,
    // and the rerun reuses the packs the killed runs completed.
    let mut listed = HashSet::new();
    for k in 0..KILLS {
        write_gen(1 + u64::from(k));
        let at = full.mul_f64(0.1 + 0.9 * f64::from(k) / f64::from(KILLS));
        run_killed(&env, &["snapshot", s(&src), "--volume", "v"], at);
        let check = env.json(&["vault", "check"]);
        assert_eq!(check["ok"], true, "after a kill at {at:?}: {check}");
        for snap in env.json(&["snapshots"])["snapshots"].as_array().unwrap() {
            listed.insert(snap["id"].as_str().unwrap().to_string());
        }
    }
    write_gen(1 + u64::from(KILLS) - 1);
    let rerun = env.json(&["snapshot", s(&src), "--volume", "v"]);
    assert!(
        rerun["bytes_new"].as_u64().unwrap() < 24 * 400_000,
        "the rerun reused nothing the killed run stored: {rerun}"
    );
    let check = env.json(&["vault", "check", "--read-data"]);
    assert_eq!(check["ok"], true, "{check}");
    // Every snapshot ever listed is whole: it restores.
    for id in &listed {
        let d = env.path(&format!("r-{id}"));
        env.json(&["restore", &format!("v@{id}"), s(&d)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    // Restore over a pre-synced target: killed at 20 points; every file
    // under its real name is whole, old or new; the rerun completes it.
    let dst = env.path("dst");
    let first_id = env.json(&["snapshots"])["snapshots"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    env.json(&["restore", &format!("v@{first_id}"), s(&dst)]);
    let old = contents(&dst);
    let new = contents(&src);
    let full = timed(&env, &["restore", "v", s(&env.path("scratch"))]);
    for k in 0..KILLS {
        let at = full.mul_f64(0.05 + 0.95 * f64::from(k) / f64::from(KILLS));
        let done = run_killed(&env, &["restore", "v", s(&dst)], at);
        for (path, h) in contents(&dst) {
            let name = Path::new(&path).file_name().unwrap().to_str().unwrap();
            if name.starts_with(".ferry-") && name.ends_with(".tmp") {
                continue; // a temporary file, never a real name
            }
            assert!(
                old.get(&path) == Some(&h) || new.get(&path) == Some(&h),
                "{path} is torn after a kill at {at:?}"
            );
        }
        if done {
            break;
        }
        // Back to the old state now and then, so later kills land mid-write.
        if k % 4 == 3 {
            env.json(&["restore", &format!("v@{first_id}"), s(&dst)]);
        }
    }
    env.json(&["restore", "v", s(&dst), "--delete", "--verify"]);
    assert_same_tree(&src, &dst);

    // Prune: killed at 20 points, each time with something to delete.
    for k in 0..KILLS {
        env.json(&["forget", "v", "--keep-last", "1"]);
        let full = if k == 0 {
            timed(&env, &["prune", "--dry-run"]) * 3
        } else {
            Duration::from_millis(300)
        };
        let at = full.mul_f64(f64::from(k) / f64::from(KILLS));
        run_killed(&env, &["prune"], at);
        let check = env.json(&["vault", "check"]);
        assert_eq!(check["ok"], true, "after a prune killed at {at:?}: {check}");
        if k % 5 == 4 {
            let d = env.path(&format!("p{k}"));
            env.json(&["restore", "v", s(&d), "--verify"]);
            assert_same_tree(&src, &d);
        }
        // New data for the next round.
        std::fs::write(
            src.join(format!("g{k}")),
            noise(300_000, 900 + u64::from(k)),
        )
        .unwrap();
        env.json(&["snapshot", s(&src), "--volume", "v"]);
    }
    env.json(&["forget", "v", "--keep-last", "1"]);
    let p = env.json(&["prune"]);
    assert_eq!(
        env.json(&["vault", "check", "--read-data"])["ok"],
        true,
        "{p}"
    );
    let again = env.json(&["prune"]);
    assert_eq!(
        again["packs_deleted"], 0,
        "the rerun finished the job: {again}"
    );
    assert_eq!(again["packs_unknown"], 0, "{again}");
    let d = env.path("final");
    env.json(&["restore", "v", s(&d), "--verify"]);
    assert_same_tree(&src, &d);

    // Lost catalog: rebuilt from the vault, nothing lost.
    std::fs::remove_dir_all(env.path("state/ferry/catalogs")).unwrap();
    let d = env.path("after-rebuild");
    env.json(&["restore", "v", s(&d), "--verify"]);
    assert_same_tree(&src, &d);
}

/// A snapshot of more blobs than one index object lists writes its index as
/// the packs come (its memory for them stays bounded): a catalog rebuilt
/// from those objects alone restores it, and a prune deletes none of it.
#[test]
fn a_large_snapshot_writes_its_index_as_it_goes_and_a_rebuilt_catalog_restores_it() {
    let env = local_env("1M");
    let src = env.path("src");
    // 20,000 distinct incompressible 1 KiB files: about 20 packs of 1 MiB
    // holding more blobs than the 16,384 one index object lists.
    for d in 0..20u64 {
        let dir = src.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..1000u64 {
            std::fs::write(dir.join(format!("f{i:03}")), noise(1024, d * 1000 + i)).unwrap();
        }
    }
    let snap = env.json(&["snapshot", s(&src), "--volume", "many"]);
    assert_eq!(snap["files"], 20_000, "{snap}");
    let indexes = files_under(&env.path("vault/index")).len();
    assert!(indexes >= 2, "{indexes} index object(s) for 20,000 blobs");

    let r = env.json(&["catalog", "rebuild"]);
    assert_eq!(r["index_objects"], indexes as u64, "{r}");
    // Every pack was indexed: the rebuild read no pack header.
    assert_eq!(r["packs_from_headers"], 0, "{r}");
    let p = env.json(&["prune"]);
    assert_eq!(p["packs_deleted"], 0, "{p}");
    let dst = env.path("dst");
    // In batches of 3,000 files (three directories each).
    let restored = env.json(&[
        "restore",
        "many",
        s(&dst),
        "--verify",
        "--batch-files",
        "3000",
    ]);
    assert_eq!(restored["files"], 20_000, "{restored}");
    assert_same_tree(&src, &dst);
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = std::fs::read(p).unwrap();
    b[at] ^= 0xff;
    std::fs::write(p, b).unwrap();
}

/// One damaged snapshot record or index object costs what it held, not the
/// vault: a new machine lists and restores the other snapshots (the packs
/// a damaged index described are read from their headers), `vault check`
/// names the damaged objects, and prune deletes nothing while a snapshot
/// record cannot be read (what it references is unknown).
#[test]
fn a_damaged_snapshot_record_or_index_object_leaves_the_rest_usable() {
    let env = local_env("1M");
    let src = env.path("src");
    make_tree(&src);
    std::fs::write(src.join("only-first"), noise(1_500_000, 5)).unwrap();
    let first = env.json(&["snapshot", s(&src), "--volume", "v"]);
    std::fs::remove_file(src.join("only-first")).unwrap();
    std::fs::write(src.join("added"), noise(200_000, 7)).unwrap();
    let second = env.json(&["snapshot", s(&src), "--volume", "v"]);
    let first_id = first["snapshot_id"].as_str().unwrap();
    let second_id = second["snapshot_id"].as_str().unwrap();

    flip_byte(&env.path(&format!("vault/snapshots/{first_id}")), 60);
    let indexes = files_under(&env.path("vault/index"));
    assert!(!indexes.is_empty());
    for idx in &indexes {
        flip_byte(idx, 60);
    }
    std::fs::write(env.path("vault/snapshots/notanid"), b"stray").unwrap();

    let other = other_machine(&env);
    let out = other.run(&["snapshots", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second_id], "{list}");
    let err = stderr(&out);
    for object in [format!("snapshots/{first_id}"), "snapshots/notanid".into()] {
        assert!(
            err.lines()
                .any(|l| l.starts_with("warning: vault object") && l.contains(&object)),
            "{err}"
        );
    }
    let dst = other.path("dst");
    other.json(&["restore", "v", s(&dst), "--verify"]);
    assert_same_tree(&src, &dst);

    let check = other.run(&["vault", "check", "--json"]);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    let named: HashSet<&str> = report["damaged_objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["object"].as_str().unwrap())
        .collect();
    assert_eq!(named.len(), indexes.len() + 2, "{report}");
    assert!(
        named.contains(format!("snapshots/{first_id}").as_str()),
        "{report}"
    );

    // Only the damaged record references the first snapshot's own file.
    let packs = || {
        let mut p = files_under(&env.path("vault/packs"));
        p.sort();
        p
    };
    let packs_before = packs();
    let pruned = other.run(&["prune"]);
    assert!(!pruned.status.success());
    let err = stderr(&pruned);
    assert!(
        err.contains("prune stopped") && err.contains(first_id),
        "{err}"
    );
    assert_eq!(packs(), packs_before);
    // Once the damaged records are gone from the vault, prune runs (and
    // reclaims the first snapshot's file); the second snapshot restores.
    std::fs::remove_file(env.path(&format!("vault/snapshots/{first_id}"))).unwrap();
    std::fs::remove_file(env.path("vault/snapshots/notanid")).unwrap();
    let p = other.json(&["prune"]);
    assert!(p["bytes_deleted"].as_u64().unwrap() > 1_000_000, "{p}");
    let again = other.path("again");
    other.json(&["restore", "v", s(&again), "--verify"]);
    assert_same_tree(&src, &again);
}

/// An index object lost from the vault leaves packs that a catalog which
/// never read it does not know. Prune deletes unknown packs (a killed
/// snapshot's), but never one that holds what a snapshot needs: those are
/// read from their headers and indexed again.
#[test]
fn prune_never_deletes_a_pack_a_snapshot_needs_when_an_index_object_is_lost() {
    let env = local_env("1M");
    let src = env.path("src");
    make_tree(&src);
    std::fs::write(src.join("big"), noise(3_000_000, 11)).unwrap();
    // The other machine's catalog is in step with the vault before the
    // snapshot: it will learn the snapshot, but not the lost index.
    let other = other_machine(&env);
    assert!(other.run(&["snapshots"]).status.success());
    let mut dry_machine = other_machine(&env);
    for (k, v) in dry_machine.vars.iter_mut() {
        if k == "XDG_STATE_HOME" {
            *v = env.path("dry-state").display().to_string();
        }
    }
    assert!(dry_machine.run(&["snapshots"]).status.success());
    env.json(&["snapshot", s(&src), "--volume", "v"]);
    for idx in files_under(&env.path("vault/index")) {
        std::fs::remove_file(idx).unwrap();
    }
    // A killed snapshot's pack, which nothing needs, is still deleted.
    let packs_dir = env.path("vault/packs");
    let stray = noise(64, 99);
    let stray_id = blake3::hash(&stray).to_hex().to_string();
    let stray_path = packs_dir.join(&stray_id[..2]).join(&stray_id);
    std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
    std::fs::write(&stray_path, &stray).unwrap();
    let packs_before = files_under(&packs_dir).len();

    let dry = dry_machine.json(&["prune", "--dry-run"]);
    assert!(dry["packs_recovered"].as_u64().unwrap() >= 2, "{dry}");
    assert_eq!(dry["packs_unknown"], 1, "{dry}");
    assert_eq!(files_under(&packs_dir).len(), packs_before);
    assert!(!env.path("vault/index").exists() || files_under(&env.path("vault/index")).is_empty());
    let p = other.json(&["prune"]);
    assert_eq!(p["packs_recovered"], dry["packs_recovered"], "{p}");
    assert_eq!(p["packs_unknown"], 1, "{p}");
    assert!(!stray_path.exists());
    assert_eq!(files_under(&packs_dir).len(), packs_before - 1);
    assert_eq!(files_under(&env.path("vault/index")).len(), 1);
    let dst = other.path("dst");
    other.json(&["restore", "v", s(&dst), "--verify"]);
    assert_same_tree(&src, &dst);
    // A new machine finds the packs through the new index object.
    let third = Env {
        dir: tempfile::tempdir().unwrap(),
        vars: env.vars.clone(),
    };
    let mut third = third;
    for (k, v) in third.vars.iter_mut() {
        if k == "XDG_STATE_HOME" {
            *v = env.path("third-state").display().to_string();
        }
    }
    let r = third.json(&["catalog", "rebuild"]);
    assert_eq!(r["packs_from_headers"], 0, "{r}");
    assert_eq!(third.json(&["vault", "check"])["ok"], true);
}
