//! What the last bucket sync of a source/destination pair left: per key,
//! the source's and the destination's etag and size. It lets a rerun skip
//! an object without asking the destination about it (cross-provider
//! etags differ, so the listing alone cannot prove two copies equal), and
//! it names the multipart uploads an interrupted run left open.

use crate::catalog::CatalogResult;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectState {
    pub src_etag: String,
    pub src_size: u64,
    pub dst_etag: String,
    pub dst_size: u64,
}

pub trait SyncState: Send + Sync {
    fn get(&self, keys: &[String]) -> CatalogResult<Vec<Option<ObjectState>>>;
    fn put(&self, items: &[(String, ObjectState)]) -> CatalogResult<()>;
    fn remove(&self, keys: &[String]) -> CatalogResult<()>;
    /// Open multipart uploads: (destination key, upload id).
    fn uploads(&self) -> CatalogResult<Vec<(String, String)>>;
    fn add_upload(&self, key: &str, id: &str) -> CatalogResult<()>;
    fn remove_upload(&self, key: &str, id: &str) -> CatalogResult<()>;
}
