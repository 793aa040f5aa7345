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

use crate::conn::{Client, ConnectOptions, with_retry};
use crate::convert;
use crate::proto;

pub struct RemoteCatalog {
    client: Client,
    url: String,
    rt: Option<tokio::runtime::Runtime>,
    /// How long a call keeps retrying while the coordinator is unreachable.
    patience: Duration,
    rpcs: AtomicU64,
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
        })
    }

    /// Calls made so far (for the RPCs-per-GiB figure).
    pub fn rpcs(&self) -> u64 {
        self.rpcs.load(Ordering::Relaxed)
    }

    pub(crate) fn call<T, F, Fut>(&self, name: &'static str, f: F) -> CatalogResult<T>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<tonic::Response<T>, Status>> + Send,
    {
        self.rpcs.fetch_add(1, Ordering::Relaxed);
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
