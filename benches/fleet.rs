//! Fleet-mode bench: chunk-id lookups per second through a real coordinator
//! (gRPC on loopback, SQLite catalog) with many concurrent agents, and the
//! catalog RPCs a snapshot costs per GiB.
//!
//! `cargo bench -p ferry-bench --bench fleet` (FERRY_BENCH_KNOWN=ids in the
//! catalog, default 1,000,000; FERRY_BENCH_SECONDS per run, default 3).
//! Each "agent" is its own `RemoteCatalog` (own connection), asking in
//! batches of 128 ids as the snapshot workers do; half the ids are known.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_catalog::SqliteCatalog;
use ferry_catalog::jobs::JobQueue;
use ferry_core::catalog::Catalog;
use ferry_core::id::{BlobId, BlobKind, PackId};
use ferry_core::pack::{PackEntry, PackRecord};
use ferry_fleet::conn::ConnectOptions;
use ferry_fleet::coordinator::{CoordinatorOptions, bind, serve};
use ferry_fleet::remote::RemoteCatalog;

const BATCH: usize = 128;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic ids: known ones are `known(i)`, unknown ones differ in
/// their first byte's high bit.
fn id(i: u64, known: bool) -> BlobId {
    let mut b = *blake3::hash(&i.to_le_bytes()).as_bytes();
    if known {
        b[0] &= 0x7f;
    } else {
        b[0] |= 0x80;
    }
    BlobId(b)
}

fn fill(catalog: &SqliteCatalog, n: u64) {
    let per_pack = 512u64;
    let mut packs = Vec::new();
    for p in 0..n.div_ceil(per_pack) {
        let blobs = (p * per_pack..((p + 1) * per_pack).min(n))
            .enumerate()
            .map(|(k, i)| PackEntry {
                kind: BlobKind::Data,
                id: id(i, true),
                index: k as u32,
                offset: 40 + k as u64 * 1000,
                stored_len: 1000,
                raw_len: 1000,
                compressed: false,
            })
            .collect();
        packs.push(PackRecord {
            id: PackId(*blake3::hash(&p.to_be_bytes()).as_bytes()),
            size: per_pack * 1000,
            salt: hex::encode([0u8; 32]),
            blobs,
        });
        if packs.len() == 64 {
            catalog.add_packs(&packs).unwrap();
            packs.clear();
        }
    }
    catalog.add_packs(&packs).unwrap();
}

fn main() {
    let known = env_num("FERRY_BENCH_KNOWN", 1_000_000);
    let seconds = env_num("FERRY_BENCH_SECONDS", 3);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let vault_dir = dir.path().join("vault");
    let loc = ferry_core::vault::Location::Local(vault_dir.clone());
    std::fs::create_dir_all(&vault_dir).unwrap();
    let vault = rt.block_on(async {
        ferry_core::vault::Vault::init(&loc, b"bench", &Default::default())
            .await
            .unwrap();
        ferry_core::vault::Vault::open(&loc, b"bench")
            .await
            .unwrap()
    });
    let path = dir.path().join("coordinator.sqlite");
    let (catalog, _) = SqliteCatalog::open(&path, vault.id()).unwrap();
    let t = Instant::now();
    fill(&catalog, known);
    eprintln!(
        "catalog: {known} chunk ids in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let opts = CoordinatorOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: Some("bench-token".into()),
        tls: None,
        lease: Duration::from_secs(30),
        vault_location: loc.to_string(),
        vault_id: vault.id().into(),
        keys: vault.master_keys().clone(),
        bucket_state_dir: path.with_extension("buckets"),
    };
    let listener = rt.block_on(bind(&opts)).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let queue = Arc::new(JobQueue::open(&path).unwrap());
    rt.spawn(serve(
        listener,
        Arc::new(catalog),
        queue,
        opts,
        std::future::pending(),
    ));
    let connect = ConnectOptions {
        url: url.clone(),
        token: Some("bench-token".into()),
        tls_ca: None,
    };

    println!("| agents | lookups/s | RPCs/s | mean RPC latency (ms) | known found |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for agents in [1usize, 4, 16, 64] {
        let stop = Arc::new(AtomicBool::new(false));
        let lookups = Arc::new(AtomicU64::new(0));
        let found = Arc::new(AtomicU64::new(0));
        let rpcs = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..agents)
            .map(|a| {
                let (stop, lookups, found, rpcs) =
                    (stop.clone(), lookups.clone(), found.clone(), rpcs.clone());
                let remote = RemoteCatalog::connect(&connect, Duration::from_secs(10)).unwrap();
                std::thread::spawn(move || {
                    let mut x = a as u64 * 7919;
                    while !stop.load(Ordering::Relaxed) {
                        let ids: Vec<BlobId> = (0..BATCH as u64)
                            .map(|k| {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                id((x >> 11) % known, k % 2 == 0)
                            })
                            .collect();
                        let r = remote.contains(&ids).unwrap();
                        found.fetch_add(r.iter().filter(|p| **p).count() as u64, Ordering::Relaxed);
                        lookups.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        rpcs.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        stop.store(true, Ordering::Relaxed);
        for th in threads {
            th.join().unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        let (l, r, f) = (
            lookups.load(Ordering::Relaxed),
            rpcs.load(Ordering::Relaxed),
            found.load(Ordering::Relaxed),
        );
        // Every even-numbered id of a batch is known: half must be found.
        assert_eq!(f * 2, l, "the catalog lost ids");
        println!(
            "| {agents} | {:.0} | {:.0} | {:.2} | {:.0}% |",
            l as f64 / s,
            r as f64 / s,
            agents as f64 * s * 1000.0 / r as f64,
            100.0 * f as f64 * 2.0 / l as f64
        );
    }

    // RPCs per GiB: a snapshot through the coordinator of incompressible
    // data (every chunk new: the worst case for lookups).
    let mib = env_num("FERRY_BENCH_SNAPSHOT_MIB", 256);
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut x = 1u64;
    for f in 0..mib / 4 {
        let data: Vec<u8> = (0..(4 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        std::fs::write(src.join(format!("f{f:04}")), data).unwrap();
    }
    let remote = Arc::new(RemoteCatalog::connect(&connect, Duration::from_secs(10)).unwrap());
    let vault = Arc::new(vault);
    let t = Instant::now();
    let s = rt
        .block_on(ferry_core::snapshot::snapshot(
            vault,
            remote.clone(),
            &src,
            &ferry_core::snapshot::SnapshotOptions::new("bench"),
            Arc::new(ferry_core::progress::NoProgress),
        ))
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let gib = s.bytes_scanned as f64 / (1u64 << 30) as f64;
    println!(
        "\nsnapshot through the coordinator: {} MiB, {} chunks, {} catalog RPCs = {:.0} RPCs/GiB, {:.0} MiB/s",
        s.bytes_scanned >> 20,
        s.chunks,
        remote.rpcs(),
        remote.rpcs() as f64 / gib,
        (s.bytes_scanned >> 20) as f64 / secs
    );
}
