//! A bucket sync spread over agents (`ferry bucket sync --coordinator`):
//! real coordinator and agent processes, and two S3 servers on loopback
//! standing for two clouds (plus a third holding the vault).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::bucket::{client, put, read_all};
use crate::common::*;
use crate::fleet::Fleet;

struct Clouds {
    a: S3Server,
    b: S3Server,
    config: String,
}

/// Two clouds, each a remote in a config file the agents read; the source
/// bucket holds `n` objects under `data/`.
fn clouds(f: &Fleet, n: usize) -> Clouds {
    let (a, b, config) = two_clouds(f.env.dir.path());
    let ca = client(&a);
    for i in 0..n {
        put(
            &ca,
            "src-bucket",
            &format!("data/{:03}/obj-{i}", i % 7),
            noise(500 + i * 13, i as u64),
            Some("text/plain"),
            &[],
        );
    }
    Clouds { a, b, config }
}

fn start_agents(f: &mut Fleet, c: &Clouds, names: &[&str]) {
    for name in names {
        let root = f.env.path(&format!("root-{name}"));
        f.start_agent_with(name, &root, &["--config", &c.config]);
    }
}

/// Submits `bucket sync` over the fleet and returns the job id.
fn submit(f: &Fleet, c: &Clouds, extra: &[&str]) -> u64 {
    let mut args = vec![
        "bucket",
        "sync",
        "cloud-a:src-bucket/data",
        "cloud-b:dst-bucket/copy",
        "--config",
        &c.config,
        "--task-objects",
        "25",
        "--workers",
        "4",
    ];
    args.extend_from_slice(extra);
    let v = f.json(&args);
    v["job"].as_u64().unwrap_or_else(|| panic!("no job in {v}"))
}

/// `ferry bucket report JOB --json`: its exit code and JSON.
fn report(f: &Fleet, job: u64) -> (i32, serde_json::Value) {
    let out = f
        .cmd(&["bucket", "report", &job.to_string(), "--json"])
        .output()
        .unwrap();
    let v =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("report: {}", stderr(&out)));
    (out.status.code().unwrap(), v)
}

/// Polls `ferry bucket report JOB` until the job has ended.
fn wait_report(f: &Fleet, job: u64) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let (code, v) = report(f, job);
        if v["state"] == "done" || v["state"] == "failed" {
            let want = if v["state"] == "done" { 0 } else { 1 };
            assert_eq!(code, want, "{v}");
            return v;
        }
        assert_eq!(code, 2, "a running job reports 2: {v}");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {job} never ended: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_copied_exactly(c: &Clouds) {
    let src = read_all(&client(&c.a), "src-bucket", "data/");
    let dst = read_all(&client(&c.b), "dst-bucket", "copy/");
    assert_eq!(
        src.keys().collect::<Vec<_>>(),
        dst.keys().collect::<Vec<_>>()
    );
    for (k, o) in &src {
        assert!(dst[k].body == o.body, "{k} differs");
    }
}

#[test]
fn a_bucket_sync_over_agents_splits_the_key_space_and_a_rerun_copies_nothing() {
    let mut f = Fleet::start();
    let c = clouds(&f, 240);
    start_agents(&mut f, &c, &["node1", "node2"]);

    let job = submit(&f, &c, &["--delete"]);
    let r = wait_report(&f, job);
    assert_eq!(r["state"], "done", "{r}");
    // 240 objects in tasks of 25: ten ranges, the last one open-ended.
    assert_eq!(r["tasks"]["done"], 11, "one split and ten ranges: {r}");
    assert_eq!(r["objects_listed"], 240, "{r}");
    assert_eq!(r["objects_copied"], 240, "{r}");
    assert_eq!(r["objects_failed"], 0, "{r}");
    assert_copied_exactly(&c);
    // Both agents took tasks (the jobs listing shows only the job itself).
    let jobs = f.json(&["jobs"]);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "{jobs}");

    // A new job over the unchanged bucket copies nothing: the coordinator
    // remembers what every agent copied.
    let again = wait_report(&f, submit(&f, &c, &["--delete"]));
    assert_eq!(again["objects_copied"], 0, "{again}");
    assert_eq!(again["objects_skipped"], 240, "{again}");

    // A change, an addition and a deletion at the source; a stray object at
    // the destination: only they are touched.
    let ca = client(&c.a);
    put(
        &ca,
        "src-bucket",
        "data/003/obj-3",
        b"changed".to_vec(),
        None,
        &[],
    );
    put(
        &ca,
        "src-bucket",
        "data/zzz-new",
        b"new".to_vec(),
        None,
        &[],
    );
    rt_delete(&ca, "src-bucket", "data/000/obj-0");
    put(
        &client(&c.b),
        "dst-bucket",
        "copy/stray",
        b"x".to_vec(),
        None,
        &[],
    );
    let third = wait_report(&f, submit(&f, &c, &["--delete"]));
    assert_eq!(third["objects_copied"], 2, "{third}");
    assert_eq!(third["objects_deleted"], 2, "{third}");
    assert_copied_exactly(&c);

    // Bad requests: a dry run is local only; an unknown job; a report of a
    // job that is not a bucket sync.
    let out = f.run(&[
        "bucket",
        "sync",
        "cloud-a:src-bucket/data",
        "cloud-b:dst-bucket/copy",
        "--config",
        &c.config,
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--dry-run"), "{}", stderr(&out));
    let out = f.run(&["bucket", "report", "999"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no job 999"), "{}", stderr(&out));
}

fn rt_delete(c: &aws_sdk_s3::Client, bucket: &str, key: &str) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(c.delete_object().bucket(bucket).key(key).send())
        .unwrap();
}

#[test]
fn failed_keys_are_reported_and_a_rerun_redoes_only_them() {
    let mut f = Fleet::start();
    let c = clouds(&f, 150);
    start_agents(&mut f, &c, &["node1"]);
    // The destination refuses the next 30 writes (503 SlowDown): more than
    // the retries (6 attempts) of the first keys in flight (4 workers) can
    // absorb.
    c.b.fail_puts.store(30, Ordering::SeqCst);
    let job = submit(&f, &c, &[]);
    let r = wait_report(&f, job);
    assert_eq!(r["state"], "failed", "{r}");
    let failed: Vec<String> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["key"].as_str().unwrap().to_string())
        .collect();
    assert!(!failed.is_empty(), "{r}");
    assert_eq!(r["objects_failed"], failed.len() as u64, "{r}");
    assert!(r["tasks"]["failed"].as_u64().unwrap() >= 1, "{r}");
    let dst = read_all(&client(&c.b), "dst-bucket", "copy/");
    for k in &failed {
        assert!(!dst.contains_key(k), "{k} failed but is there");
    }
    assert_eq!(dst.len() + failed.len(), 150, "every other key was copied");
    // The human report names the keys and what to do.
    let out = f.run(&["bucket", "report", &job.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&failed[0]), "{text}");
    assert!(text.contains("ferry bucket rerun"), "{text}");

    // The rerun runs the failed tasks only, and in them writes only the
    // failed keys (one PUT each: they are small).
    let puts = c.b.puts.load(Ordering::SeqCst);
    let v = f.json(&["bucket", "rerun", &job.to_string(), "--wait"]);
    assert_eq!(v["state"], "done", "{v}");
    assert_eq!(v["objects_failed"], 0, "{v}");
    assert_eq!(
        c.b.puts.load(Ordering::SeqCst) - puts,
        failed.len() as u64,
        "{v}"
    );
    // The failed tasks' new counters replace their old ones.
    assert_eq!(
        v["objects_copied"].as_u64().unwrap() + v["objects_skipped"].as_u64().unwrap(),
        150,
        "{v}"
    );
    assert_copied_exactly(&c);
    // Nothing left to rerun.
    let v = f.json(&["bucket", "rerun", &job.to_string()]);
    assert_eq!(v["tasks_queued"], 0, "{v}");
}

#[test]
fn a_task_lost_with_its_agent_is_reissued_to_another() {
    let mut f = Fleet::start();
    let c = clouds(&f, 160);
    start_agents(&mut f, &c, &["node1", "node2"]);
    // Slow writes, so that both agents are mid-task when one is killed.
    c.b.put_delay_ms.store(40, Ordering::SeqCst);
    let job = submit(&f, &c, &[]);
    let start = Instant::now();
    loop {
        let (_, v) = report(&f, job);
        if v["tasks"]["running"] == 2 && v["tasks"]["queued"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never two running: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    f.agent_mut("node1").kill9();
    let r = wait_report(&f, job);
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["objects_failed"], 0, "{r}");
    assert_copied_exactly(&c);
}
