//! The `Catalog` trait over gRPC: what an agent's data path talks to.
//!
//! ferry-core calls the catalog from its pipeline threads and from async
//! code alike, synchronously. The gRPC client therefore runs on a runtime
//! of its own: a call is spawned there and waited for here, so a caller
//! blocking its thread can never starve the connection that would answer it.
//! Every call is idempotent and retried across a coordinator restart.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_core::catalog::{BlobLocation, Catalog, CatalogError, CatalogResult};
use ferry_core::id::{BlobId, PackId};
use ferry_core::manifest::SnapshotRecord;
use ferry_core::pack::PackRecord;
use tonic::Status;

use crate::conn::{Client, ConnectOptions, TREES_BUDGET, with_retry};
use crate::convert;
use crate::proto;

pub struct RemoteCatalog {
    client: Client,
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    /// How long a call keeps retrying while the coordinator is unreachable.
    patience: Duration,
    rpcs: AtomicU64,
    /// Calls made so far, by name.
    by_call: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl RemoteCatalog {
    pub fn connect(opts: &ConnectOptions, patience: Duration) -> crate::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-catalog-rpc")
            .enable_all()
            .build()
            .map_err(|e| crate::Error::Io {
                what: "starting the catalog client runtime".into(),
                source: e,
            })?;
        // The channel's background task must live on this runtime.
        let client = {
            let _guard = rt.enter();
            crate::conn::connect(opts)?
        };
        Ok(Self {
            client,
            url: opts.url.clone(),
            rt: Some(rt),
            patience,
            rpcs: AtomicU64::new(0),
            by_call: Default::default(),
        })
    }

    fn send_trees(&self, trees: Vec<proto::PutTreeRequest>) -> CatalogResult<()> {
        let req = proto::PutTreesRequest { trees };
        self.call("PutTrees", move |mut c| {
            let req = req.clone();
            async move { c.put_trees(req).await }
        })?;
        Ok(())
    }

    /// Calls made so far (for the RPCs-per-GiB figure).
    pub fn rpcs(&self) -> u64 {
        self.rpcs.load(Ordering::Relaxed)
    }

    /// Calls made so far, by name: where a job's round trips went.
    pub fn rpcs_by_call(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.by_call
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn call<T, F, Fut>(&self, name: &'static str, f: F) -> CatalogResult<T>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send,
    {
        self.rpcs.fetch_add(1, Ordering::Relaxed);
        *self
            .by_call
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name)
            .or_default() += 1;
        let (client, url, patience) = (self.client.clone(), self.url.clone(), self.patience);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        rt.spawn(async move {
            let r = with_retry(&url, name, patience, || f(client.clone())).await;
            let _ = tx.send(r);
        });
        match rx.recv() {
            Ok(r) => r.map_err(|e| CatalogError(Box::new(e))),
            Err(_) => Err(CatalogError::msg(format!(
                "coordinator {}: {name}: the client stopped",
                self.url
            ))),
        }
    }
}

impl Drop for RemoteCatalog {
    fn drop(&mut self) {
        // Dropping a runtime blocks; this may run inside async code.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn bad(what: &str, e: String) -> CatalogError {
    CatalogError::msg(format!("coordinator sent a bad {what}: {e}"))
}

impl Catalog for RemoteCatalog {
    fn is_remote(&self) -> bool {
        true
    }

    fn contains(&self, ids: &[BlobId]) -> CatalogResult<Vec<bool>> {
        let req = proto::BlobIds {
            ids: convert::ids_to_bytes(ids),
        };
        let r = self.call("Contains", move |mut c| {
            let req = req.clone();
            async move { c.contains(req).await }
        })?;
        if r.present.len() != ids.len() {
            return Err(bad(
                "reply",
                format!("{} answers for {} ids", r.present.len(), ids.len()),
            ));
        }
        Ok(r.present)
    }

    fn locate(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<BlobLocation>>> {
        let req = proto::BlobIds {
            ids: convert::ids_to_bytes(ids),
        };
        let r = self.call("Locate", move |mut c| {
            let req = req.clone();
            async move { c.locate(req).await }
        })?;
        if r.locations.len() != ids.len() {
            return Err(bad(
                "reply",
                format!("{} locations for {} ids", r.locations.len(), ids.len()),
            ));
        }
        r.locations
            .iter()
            .map(|l| convert::location_from_proto(l).map_err(|e| bad("location", e)))
            .collect()
    }

    fn add_packs(&self, packs: &[PackRecord]) -> CatalogResult<()> {
        let req = proto::AddPacksRequest {
            packs: packs
                .iter()
                .map(convert::pack_to_proto)
                .collect::<Result<_, _>>()
                .map_err(CatalogError::msg)?,
        };
        self.call("AddPacks", move |mut c| {
            let req = req.clone();
            async move { c.add_packs(req).await }
        })?;
        Ok(())
    }

    fn packs(&self) -> CatalogResult<Vec<(PackId, u64)>> {
        let r = self.call("ListPacks", |mut c| async move {
            c.list_packs(proto::Empty {}).await
        })?;
        r.packs
            .iter()
            .map(|p| {
                convert::pack_id(&p.id)
                    .map(|id| (id, p.size))
                    .map_err(|e| bad("pack", e))
            })
            .collect()
    }

    fn pack_blobs(&self, pack: &PackId) -> CatalogResult<Vec<BlobId>> {
        let req = proto::PackRef {
            id: pack.0.to_vec(),
        };
        let r = self.call("PackBlobs", move |mut c| {
            let req = req.clone();
            async move { c.pack_blobs(req).await }
        })?;
        convert::ids_from_bytes(&r.ids).map_err(|e| bad("id list", e))
    }

    fn add_snapshot(&self, snap: &SnapshotRecord) -> CatalogResult<()> {
        let req = convert::snapshot_to_proto(snap).map_err(CatalogError::msg)?;
        self.call("AddSnapshot", move |mut c| {
            let req = req.clone();
            async move { c.add_snapshot(req).await }
        })?;
        Ok(())
    }

    fn snapshots(&self) -> CatalogResult<Vec<SnapshotRecord>> {
        let r = self.call("ListSnapshots", |mut c| async move {
            c.list_snapshots(proto::Empty {}).await
        })?;
        r.snapshots
            .iter()
            .map(|s| convert::snapshot_from_proto(s).map_err(|e| bad("snapshot", e)))
            .collect()
    }

    fn tree(&self, id: &BlobId) -> CatalogResult<Option<Vec<u8>>> {
        let req = proto::BlobRef { id: id.0.to_vec() };
        let r = self.call("GetTree", move |mut c| {
            let req = req.clone();
            async move { c.get_tree(req).await }
        })?;
        Ok(r.found.then_some(r.data))
    }

    fn trees(&self, ids: &[BlobId]) -> CatalogResult<Vec<Option<Vec<u8>>>> {
        let mut out = Vec::with_capacity(ids.len());
        while out.len() < ids.len() {
            let req = proto::BlobIds {
                ids: convert::ids_to_bytes(&ids[out.len()..]),
            };
            let r = self.call("GetTrees", move |mut c| {
                let req = req.clone();
                async move { c.get_trees(req).await }
            })?;
            if r.trees.is_empty() || out.len() + r.trees.len() > ids.len() {
                return Err(bad(
                    "reply",
                    format!("{} trees for {} ids", r.trees.len(), ids.len() - out.len()),
                ));
            }
            out.extend(r.trees.into_iter().map(|t| t.found.then_some(t.data)));
        }
        Ok(out)
    }

    fn put_trees(&self, trees: &[(BlobId, Vec<u8>)]) -> CatalogResult<()> {
        let mut batch: Vec<proto::PutTreeRequest> = Vec::new();
        let mut size = 0;
        for (id, data) in trees {
            // As in `put_tree`: a tree too large for a message is not cached.
            if data.len() + 1024 > TREES_BUDGET {
                continue;
            }
            if size + data.len() + 1024 > TREES_BUDGET {
                self.send_trees(std::mem::take(&mut batch))?;
                size = 0;
            }
            size += data.len() + 64;
            batch.push(proto::PutTreeRequest {
                id: id.0.to_vec(),
                data: data.clone(),
            });
        }
        if !batch.is_empty() {
            self.send_trees(batch)?;
        }
        Ok(())
    }

    fn put_tree(&self, id: &BlobId, data: &[u8]) -> CatalogResult<()> {
        // The tree cache is an optimisation: a tree too large for one
        // message is simply read from the vault next time.
        if data.len() + 1024 > crate::conn::MAX_MESSAGE {
            return Ok(());
        }
        let req = proto::PutTreeRequest {
            id: id.0.to_vec(),
            data: data.to_vec(),
        };
        self.call("PutTree", move |mut c| {
            let req = req.clone();
            async move { c.put_tree(req).await }
        })?;
        Ok(())
    }

    fn seen_objects(&self) -> CatalogResult<HashSet<String>> {
        let r = self.call("SeenObjects", |mut c| async move {
            c.seen_objects(proto::Empty {}).await
        })?;
        Ok(r.names.into_iter().collect())
    }

    fn mark_seen(&self, names: &[String]) -> CatalogResult<()> {
        let req = proto::Names {
            names: names.to_vec(),
        };
        self.call("MarkSeen", move |mut c| {
            let req = req.clone();
            async move { c.mark_seen(req).await }
        })?;
        Ok(())
    }

    // Prune's accounting runs where the catalog is, never through an agent.
    fn remove_snapshots(&self, ids: &[String]) -> CatalogResult<()> {
        let req = proto::Names {
            names: ids.to_vec(),
        };
        self.call("RemoveSnapshots", move |mut c| {
            let req = req.clone();
            async move { c.remove_snapshots(req).await }
        })?;
        Ok(())
    }

    fn remove_packs(&self, packs: &[PackId]) -> CatalogResult<()> {
        let ids: Vec<BlobId> = packs.iter().map(|p| BlobId(p.0)).collect();
        let req = proto::BlobIds {
            ids: convert::ids_to_bytes(&ids),
        };
        self.call("RemovePacks", move |mut c| {
            let req = req.clone();
            async move { c.remove_packs(req).await }
        })?;
        Ok(())
    }

    fn blob_sizes(&self) -> CatalogResult<Vec<(BlobId, PackId, u32)>> {
        Err(CatalogError::msg(
            "prune is not available through the coordinator",
        ))
    }
}

/// A migration's record over gRPC: `ferry migration --coordinator` keeps
/// it in the coordinator's catalog.
impl ferry_core::migration::MigrationStore for RemoteCatalog {
    fn create_migration(&self, m: &ferry_core::migration::Migration) -> CatalogResult<bool> {
        let record_json = serde_json::to_string(m).map_err(|e| CatalogError(Box::new(e)))?;
        let r = self.call("CreateMigration", move |mut c| {
            let req = proto::MigrationMsg {
                record_json: record_json.clone(),
            };
            async move { c.create_migration(req).await }
        })?;
        Ok(r.created)
    }

    fn migration(&self, name: &str) -> CatalogResult<Option<ferry_core::migration::Migration>> {
        Ok(self.get_migration(name)?.map(|(m, _)| m))
    }

    fn rounds(&self, name: &str) -> CatalogResult<Vec<ferry_core::migration::Round>> {
        Ok(self
            .get_migration(name)?
            .map(|(_, r)| r)
            .unwrap_or_default())
    }

    fn add_round(&self, name: &str, r: &ferry_core::migration::Round) -> CatalogResult<()> {
        let round_json = serde_json::to_string(r).map_err(|e| CatalogError(Box::new(e)))?;
        let name = name.to_string();
        self.call("AddMigrationRound", move |mut c| {
            let req = proto::AddRoundRequest {
                name: name.clone(),
                round_json: round_json.clone(),
            };
            async move { c.add_migration_round(req).await }
        })?;
        Ok(())
    }
}

type MigrationWithRounds = (
    ferry_core::migration::Migration,
    Vec<ferry_core::migration::Round>,
);

impl RemoteCatalog {
    fn get_migration(&self, name: &str) -> CatalogResult<Option<MigrationWithRounds>> {
        let name = name.to_string();
        let r = self.call("GetMigration", move |mut c| {
            let req = proto::MigrationRef { name: name.clone() };
            async move { c.get_migration(req).await }
        })?;
        if !r.found {
            return Ok(None);
        }
        let m =
            serde_json::from_str(&r.record_json).map_err(|e| bad("migration", e.to_string()))?;
        let rounds = r
            .rounds_json
            .iter()
            .map(|j| serde_json::from_str(j).map_err(|e| bad("migration round", e.to_string())))
            .collect::<CatalogResult<Vec<_>>>()?;
        Ok(Some((m, rounds)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{CoordinatorOptions, bind, serve};
    use ferry_catalog::SqliteCatalog;
    use ferry_catalog::jobs::JobQueue;
    use std::sync::Arc;

    /// A coordinator on loopback, with its own vault and catalog.
    fn coordinator() -> (tempfile::TempDir, tokio::runtime::Runtime, ConnectOptions) {
        let d = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let loc = ferry_core::vault::Location::Local(d.path().join("vault"));
        std::fs::create_dir_all(d.path().join("vault")).unwrap();
        let mut vopts = ferry_core::config::VaultOptions::default();
        vopts.kdf.m_kib = 64;
        vopts.kdf.t = 1;
        let vault = rt.block_on(async {
            ferry_core::vault::Vault::init(&loc, b"pw", &vopts)
                .await
                .unwrap();
            ferry_core::vault::Vault::open(&loc, b"pw").await.unwrap()
        });
        let path = d.path().join("coordinator.sqlite");
        let (catalog, _) = SqliteCatalog::open(&path, vault.id()).unwrap();
        let opts = CoordinatorOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            token: None,
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
            url,
            token: None,
            tls_ca: None,
        };
        (d, rt, connect)
    }

    /// Trees go to a real coordinator and come back in batches: many per
    /// call, split where a message would pass the budget, in the order
    /// asked, with a tree too large for any message left uncached.
    #[test]
    fn trees_travel_in_batches_under_the_message_budget() {
        let (_d, _rt, connect) = coordinator();
        let remote = RemoteCatalog::connect(&connect, Duration::from_secs(10)).unwrap();

        // 40 trees of 1 MiB (2.5 budgets), one larger than the budget, and
        // 100 small ones.
        let tree = |k: u32, len: usize| {
            let id = BlobId(*blake3::hash(&k.to_le_bytes()).as_bytes());
            let data: Vec<u8> = (0..len).map(|i| (i as u32 ^ k) as u8).collect();
            (id, data)
        };
        let mut trees: Vec<(BlobId, Vec<u8>)> = (0..40).map(|k| tree(k, 1 << 20)).collect();
        let huge = tree(1000, TREES_BUDGET + 1);
        trees.push(huge.clone());
        trees.extend((2000..2100).map(|k| tree(k, 300)));
        let before = remote.rpcs();
        remote.put_trees(&trees).unwrap();
        let puts = remote.rpcs() - before;
        assert!(
            (3..=4).contains(&puts),
            "{puts} calls to put 41 MiB of trees"
        );

        let mut ids: Vec<BlobId> = trees.iter().map(|(id, _)| *id).collect();
        let unknown = tree(9999, 1).0;
        ids.insert(7, unknown);
        let before = remote.rpcs();
        let got = remote.trees(&ids).unwrap();
        let gets = remote.rpcs() - before;
        assert!(
            (3..=4).contains(&gets),
            "{gets} calls to get 41 MiB of trees"
        );
        assert_eq!(got.len(), ids.len());
        for (id, g) in ids.iter().zip(&got) {
            let want = trees
                .iter()
                .find(|(t, _)| t == id)
                .filter(|(t, _)| *t != huge.0)
                .map(|(_, d)| d);
            assert_eq!(g.as_ref(), want, "tree {}", id.short());
        }

        // The small ones alone: one call.
        let before = remote.rpcs();
        let small: Vec<BlobId> = trees[41..].iter().map(|(id, _)| *id).collect();
        assert!(remote.trees(&small).unwrap().iter().all(Option::is_some));
        assert_eq!(remote.rpcs() - before, 1);
    }

    /// A client following a job hears of its end when it ends: the
    /// coordinator holds a GetJob that asks to wait, and answers it at the
    /// job's Finish (a reply at the end of the wait would still say
    /// "running").
    #[test]
    fn a_waiting_get_job_is_answered_when_the_job_ends() {
        let (_d, rt, connect) = coordinator();
        rt.block_on(async {
            let mut c = crate::conn::connect(&connect).unwrap();
            c.register(proto::RegisterRequest {
                agent: "a".into(),
                roots: vec!["/data".into()],
                host: "h".into(),
                version: "test".into(),
            })
            .await
            .unwrap();
            let spec = crate::spec::JobSpec::Snapshot {
                source: "/data/v".into(),
                volume: "v".into(),
                reread: false,
                block: false,
                read_limit: None,
            };
            let job = c
                .submit(proto::SubmitRequest {
                    agent: "a".into(),
                    kind: spec.kind().into(),
                    spec_json: serde_json::to_string(&spec).unwrap(),
                })
                .await
                .unwrap()
                .into_inner();
            let leased = c
                .lease(proto::LeaseRequest {
                    agent: "a".into(),
                    wait_seconds: 1,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(leased.job.map(|j| j.id), Some(job.id));
            let mut follower = c.clone();
            let id = job.id;
            let waiting = tokio::spawn(async move {
                follower
                    .get_job(proto::JobRef { id, wait_ms: 5000 })
                    .await
                    .unwrap()
                    .into_inner()
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!waiting.is_finished(), "GetJob did not wait");
            c.finish(proto::FinishRequest {
                agent: "a".into(),
                job: job.id,
                exit_code: 0,
                result_json: "{}".into(),
                error: String::new(),
            })
            .await
            .unwrap();
            let seen = waiting.await.unwrap();
            assert_eq!(seen.state, "done");
            // Without asking to wait, the answer is immediate.
            let now = c
                .get_job(proto::JobRef { id, wait_ms: 0 })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(now.state, "done");
        });
    }
}
