//! Raw block volumes, as disk image files (a loop device needs privileges a
//! test cannot count on; devices take the same path but are compared by
//! reading).

use std::os::unix::fs::{FileExt, MetadataExt};

use crate::common::*;

/// A 48 MiB image: data regions and long zero runs (holes in the source).
fn make_image(path: &std::path::Path) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(48 << 20).unwrap();
    for (i, at) in [0u64, 5 << 20, 20 << 20, 47 << 20].iter().enumerate() {
        f.write_all_at(&noise(700_000, 60 + i as u64), *at).unwrap();
    }
}

fn same_bytes(a: &std::path::Path, b: &std::path::Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

#[test]
fn image_file_snapshot_and_in_place_delta_restore() {
    let env = Env::new();
    let img = env.path("disk.img");
    make_image(&img);
    let vault = env.path("vault").display().to_string();
    assert!(env.run(&["vault", "init", &vault]).status.success());

    // A regular file without --block is refused with a hint.
    let out = env.run(&[
        "snapshot",
        img.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "disk",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--block"), "{}", stderr(&out));

    let s = env.json(&[
        "snapshot",
        img.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "disk",
        "--block",
    ]);
    assert_eq!(s["bytes_scanned"], 48 << 20, "{s}");
    assert_eq!(
        env.json(&["snapshots", "--vault", &vault])["snapshots"][0]["block"],
        true
    );

    // Restore onto a new image: created sparse, zero runs not written.
    let out_img = env.path("restored.img");
    let r = env.json(&[
        "restore",
        "disk",
        out_img.to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert!(r["bytes_written"].as_u64().unwrap() < 4 << 20, "{r}");
    same_bytes(&img, &out_img);
    assert!(
        out_img.metadata().unwrap().blocks() * 512 < 8 << 20,
        "sparse"
    );

    // Change 3 blocks of 4 KiB; the delta restore writes only around them,
    // and reads nothing (the memory vouches for the image).
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for (i, at) in [100_000u64, 21 << 20, 30 << 20].iter().enumerate() {
        f.write_all_at(&noise(4096, 90 + i as u64), *at).unwrap();
    }
    drop(f);
    let s2 = env.json(&[
        "snapshot",
        img.to_str().unwrap(),
        "--vault",
        &vault,
        "--volume",
        "disk",
        "--block",
    ]);
    assert!(s2["bytes_new"].as_u64().unwrap() <= 3 * 2 * 131072, "{s2}");
    let r2 = env.json(&[
        "restore",
        "disk",
        out_img.to_str().unwrap(),
        "--vault",
        &vault,
        "--verify",
    ]);
    let w = r2["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w <= 3 * 2 * 131072, "{r2}");
    assert_eq!(r2["bytes_compared"], 0, "{r2}");
    assert_eq!(r2["files_verified"], 1, "{r2}");
    same_bytes(&img, &out_img);

    // Someone writes to the restored image: compared by reading, corrected.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out_img)
        .unwrap()
        .write_all_at(b"garbage", 6 << 20)
        .unwrap();
    let r3 = env.json(&[
        "restore",
        "disk",
        out_img.to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(r3["bytes_compared"], 48 << 20, "{r3}");
    assert!(r3["bytes_written"].as_u64().unwrap() <= 2 * 131072, "{r3}");
    same_bytes(&img, &out_img);

    // A directory is not a block target.
    let out = env.run(&[
        "restore",
        "disk",
        env.path("").to_str().unwrap(),
        "--vault",
        &vault,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("block device or an image file"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn sync_of_an_image_repeats_cheaply() {
    let env = Env::new();
    let img = env.path("disk.img");
    make_image(&img);
    let vault = env.path("vault").display().to_string();
    assert!(env.run(&["vault", "init", &vault]).status.success());
    let target = env.path("copy.img");
    let (s, t) = (img.to_str().unwrap(), target.to_str().unwrap());
    env.json(&["sync", s, t, "--vault", &vault, "--block"]);
    same_bytes(&img, &target);
    let again = env.json(&["sync", s, t, "--vault", &vault, "--block"]);
    assert_eq!(again["bytes_written"], 0, "{again}");
    assert_eq!(again["snapshot"]["bytes_new"], 0, "{again}");
    // An unchanged image is not even read (its metadata vouches for it).
    assert_eq!(again["snapshot"]["bytes_scanned"], 0, "{again}");
    assert_eq!(again["snapshot"]["files_unchanged"], 1, "{again}");
    // A changed one is read, but only its new chunks are stored and written.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&noise(4096, 7), 9 << 20)
        .unwrap();
    let third = env.json(&["sync", s, t, "--vault", &vault, "--block"]);
    assert_eq!(third["snapshot"]["bytes_scanned"], 48 << 20, "{third}");
    let new = third["snapshot"]["bytes_new"].as_u64().unwrap();
    assert!(new > 0 && new <= 2 * 131072, "{third}");
    let w = third["bytes_written"].as_u64().unwrap();
    assert!(w > 0 && w <= 2 * 131072, "{third}");
    same_bytes(&img, &target);
}
