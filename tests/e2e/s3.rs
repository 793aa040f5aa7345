//! The same, against a real S3-compatible server on loopback.

use crate::common::*;

#[test]
fn s3_vault_round_trip_with_standard_aws_variables() {
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3root"));
    s3.create_bucket("ferry-vault");
    s3.env(&mut env);
    let vault = "s3://ferry-vault/cluster-a/volumes";

    let out = env.run(&["vault", "init", vault]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        env.path("s3root/ferry-vault/cluster-a/volumes/config")
            .exists()
    );
    // Create-only: a second init is refused by the server's conditional put.
    assert_eq!(env.run(&["vault", "init", vault]).status.code(), Some(1));

    let src = env.path("src");
    make_tree(&src);
    env.vars.push(("FERRY_VAULT".into(), vault.into()));
    let s = env.json(&["snapshot", src.to_str().unwrap(), "--volume", "web"]);
    assert!(s["bytes_uploaded"].as_u64().unwrap() > 0);
    let dst = env.path("dst");
    env.json(&["restore", "web", dst.to_str().unwrap()]);
    assert_same_tree(&src, &dst);
    assert_eq!(env.json(&["vault", "check", "--read-data"])["ok"], true);

    // Lost catalog: rebuilt from the bucket alone.
    std::fs::remove_dir_all(env.path("state")).unwrap();
    let r = env.json(&["catalog", "rebuild"]);
    assert_eq!(r["snapshots"], 1);
    let dst2 = env.path("dst2");
    env.json(&["restore", "web", dst2.to_str().unwrap()]);
    assert_same_tree(&src, &dst2);
}

#[test]
fn s3_errors_are_one_clear_line() {
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3root"));
    s3.env(&mut env);
    let out = env.run(&["vault", "init", "s3://no-such-bucket/x"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("no-such-bucket") && e.contains("does not exist"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        !s3.root.join("no-such-bucket").exists(),
        "nothing was written"
    );
    let out = env.run(&["snapshots", "--vault", "s3://no-such-bucket/x"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("no-such-bucket"), "{e}");

    s3.create_bucket("empty");
    let out = env.run(&["snapshots", "--vault", "s3://empty/p"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no vault at s3://empty/p"),
        "{}",
        stderr(&out)
    );

    env.vars.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    env.vars
        .push(("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()));
    let out = env.run(&["snapshots", "--vault", "s3://empty/p"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn throttled_puts_are_retried_then_fail_with_one_line_and_no_snapshot() {
    use std::sync::atomic::Ordering::Relaxed;
    let mut env = Env::new();
    let s3 = S3Server::start(&env.path("s3root"));
    s3.create_bucket("throttled");
    s3.env(&mut env);
    env.vars
        .push(("FERRY_VAULT".into(), "s3://throttled/x".into()));
    let out = env.run(&["vault", "init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let src = env.path("src");
    make_tree(&src);

    // A burst of 503 SlowDown: retried with backoff, the snapshot lands.
    s3.fail_puts.store(3, Relaxed);
    let s = env.json(&["snapshot", src.to_str().unwrap(), "--volume", "web"]);
    assert_eq!(s3.fail_puts.load(Relaxed), 0, "the server refused puts");
    let dst = env.path("dst");
    env.json(&["restore", "web", dst.to_str().unwrap(), "--verify"]);
    assert_same_tree(&src, &dst);

    // Throttled for good: a clear error naming the object, no snapshot.
    std::fs::write(src.join("changed"), noise(100_000, 5)).unwrap();
    s3.fail_puts.store(u64::MAX, Relaxed);
    let out = env.run(&["snapshot", src.to_str().unwrap(), "--volume", "web"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("503") || e.contains("SlowDown"), "{e}");
    s3.fail_puts.store(0, Relaxed);
    let list = env.json(&["snapshots"]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["snapshots"][0]["id"], s["snapshot_id"]);
}
