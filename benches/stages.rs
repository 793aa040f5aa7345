//! Per-stage throughput of the save pipeline, in bytes per second on one
//! core: FastCDC, keyed BLAKE3, zstd, AES-256-GCM, pack write and read.
//! `pack_write` fills a pack (so it includes zstd and AES again);
//! `pack_store` is what comes after them, finishing the pack and putting it
//! into a local vault, per byte of input: the snapshot's fifth stage.
//! Run: `cargo bench -p ferry-bench --bench stages`.
//!
//! Input: 16 MiB of half-compressible data (text-like runs mixed with
//! noise), group `stage`. With `FERRY_STAGE_INPUT=DIR`, group
//! `stage_volume`: 16 MiB sampled from the files under DIR (windows of
//! 64 KiB at even steps through them), so that the stages see the mix of
//! the volume being snapshotted. The two differ most for zstd: real
//! text and database pages compress several times slower than the
//! synthetic runs, and the machine's limit for a volume is the limit on
//! its own bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ferry_core::chunker::Chunker;
use ferry_core::codec::ObjectCipher;
use ferry_core::config::ChunkerParams;
use ferry_core::id::{BlobKind, IdHasher};
use ferry_core::pack::{PackWriter, read_whole};

const SIZE: usize = 16 << 20;

/// `SIZE` bytes from the files under `dir`: the files (sorted walk) read as
/// one stream, as tar would, and 256 windows of 64 KiB taken at even
/// steps along it. Each window is contiguous real content; each kind of
/// data gets windows in proportion to its bytes.
fn sample(dir: &std::path::Path) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u64)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("FERRY_STAGE_INPUT: a readable directory")
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                walk(&p, out);
            } else if md.is_file() && md.len() > 0 {
                out.push((p, md.len()));
            }
        }
    }
    const WINDOW: usize = 64 << 10;
    let mut files = Vec::new();
    walk(dir, &mut files);
    // starts[i]: where file i begins in the stream.
    let starts: Vec<u64> = files
        .iter()
        .scan(0u64, |at, f| {
            let s = *at;
            *at += f.1;
            Some(s)
        })
        .collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    let windows = SIZE / WINDOW;
    let mut out = Vec::with_capacity(SIZE);
    for w in 0..windows as u64 {
        let mut at = total.saturating_sub(WINDOW as u64) * w / windows as u64;
        let mut i = starts.partition_point(|&s| s <= at) - 1;
        let mut left = WINDOW;
        while left > 0 && i < files.len() {
            let mut f = std::fs::File::open(&files[i].0).unwrap();
            f.seek(SeekFrom::Start(at - starts[i])).unwrap();
            let n = f.take(left as u64).read_to_end(&mut out).unwrap();
            left -= n;
            at += n as u64;
            i += 1;
        }
    }
    out
}

fn input() -> Vec<u8> {
    let mut x = 0x2545F4914F6CDD1Du64;
    let words: Vec<&[u8]> = vec![
        b"INFO ",
        b"request ",
        b"duration=",
        b"user_id ",
        b"GET /api/v1/items ",
        b"200 OK\n",
    ];
    let mut out = Vec::with_capacity(SIZE);
    while out.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(2) {
            for i in 0..64 {
                out.extend_from_slice(words[((x >> i) % 6) as usize]);
            }
        } else {
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
    out.truncate(SIZE);
    out
}

fn stages(c: &mut Criterion) {
    let (data, group) = match std::env::var_os("FERRY_STAGE_INPUT") {
        Some(dir) => (sample(std::path::Path::new(&dir)), "stage_volume"),
        None => (input(), "stage"),
    };
    let params = ChunkerParams::default();
    let chunks: Vec<Vec<u8>> = Chunker::new(&data[..], &params)
        .map(|c| c.unwrap())
        .collect();
    let ids = IdHasher::new([7; 32]);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);

    g.bench_function("fastcdc", |b| {
        b.iter(|| {
            Chunker::new(black_box(&data[..]), &params)
                .map(|c| c.unwrap().len())
                .sum::<usize>()
        })
    });
    g.bench_function("blake3_keyed", |b| {
        b.iter(|| {
            chunks
                .iter()
                .map(|c| ids.id(black_box(c)).0[0] as usize)
                .sum::<usize>()
        })
    });
    for level in [1, 3] {
        g.bench_function(format!("zstd_{level}"), |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .map(|c| {
                        ferry_core::codec::compress(black_box(c), level).map_or(0, |v| v.len())
                    })
                    .sum::<usize>()
            })
        });
    }
    let cipher = ObjectCipher::new(&[1; 32], &[2; 32]);
    g.bench_function("aes256gcm", |b| {
        b.iter(|| {
            for (i, c) in chunks.iter().enumerate() {
                let mut buf = c.clone();
                cipher.seal(i as u64, b"aad", &mut buf);
                black_box(&buf);
            }
        })
    });
    let pack_with_ids: Vec<_> = chunks.iter().map(|c| (ids.id(c), c)).collect();
    g.bench_function("pack_write", |b| {
        b.iter(|| {
            let mut w = PackWriter::new(&[1; 32], SIZE * 2);
            for (id, c) in &pack_with_ids {
                w.add(BlobKind::Data, *id, c, 1);
            }
            black_box(w.finish().bytes.len())
        })
    });
    // The store stage: what every new byte costs after it is sealed in
    // its pack (the pack's header and id hash, and the put into a local
    // vault: the copy into the page cache), per byte of input. A new pack
    // (new salt, new name) each time: puts are create-only.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let location = ferry_core::vault::Location::Local(dir.path().join("vault"));
    let vault = rt.block_on(async {
        ferry_core::vault::Vault::init(&location, b"bench", &Default::default())
            .await
            .unwrap();
        ferry_core::vault::Vault::open(&location, b"bench")
            .await
            .unwrap()
    });
    g.bench_function("pack_store", |b| {
        b.iter_batched(
            || {
                let mut w = PackWriter::new(vault.data_key(), SIZE * 2);
                for (id, c) in &pack_with_ids {
                    w.add(BlobKind::Data, *id, c, 1);
                }
                w
            },
            |w| {
                let pack = w.finish();
                rt.block_on(vault.put_pack(&pack)).unwrap();
                pack.record.size
            },
            criterion::BatchSize::PerIteration,
        )
    });
    drop(dir);
    let mut w = PackWriter::new(&[1; 32], SIZE * 2);
    for (id, c) in &pack_with_ids {
        w.add(BlobKind::Data, *id, c, 1);
    }
    let pack = w.finish();
    g.bench_function("pack_read", |b| {
        b.iter(|| {
            let rec = read_whole(&[1; 32], &pack.record.id, &pack.bytes).unwrap();
            let cipher = ObjectCipher::new(&[1; 32], &rec.salt_bytes().unwrap());
            for e in &rec.blobs {
                let mut buf = pack.bytes
                    [e.offset as usize..(e.offset + e.stored_len as u64) as usize]
                    .to_vec();
                ferry_core::pack::open_blob_with(&cipher, &ids, &rec.id, e, &mut buf).unwrap();
                black_box(&buf);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
