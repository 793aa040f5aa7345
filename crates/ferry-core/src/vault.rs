//! The vault: an object store holding a ferry repository.
//!
//! Everything goes through `object_store`, so a local directory, S3 and any
//! S3-compatible store (MinIO, OSS, OBS, COS) behave the same. Objects are
//! never overwritten: packs, index objects and snapshot records are written
//! with create-only puts, and their names are fresh (content hashes or random
//! ids). Layout:
//! ```text
//! config                     plaintext JSON (algorithms, wrapped keys)
//! packs/<2 hex>/<64 hex>     pack objects, named by BLAKE3 of their bytes
//! index/<32 hex>             sealed: the packs one snapshot run wrote
//! snapshots/<32 hex>         sealed: snapshot records
//! ```

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::ObjectCipher;
use crate::config::{FORMAT_NAME, FORMAT_VERSION, VaultConfig, VaultOptions};
use crate::error::{Error, Result};
use crate::id::{IdHasher, PackId};
use crate::keys::{self, MasterKeys};
use crate::pack::{FinishedPack, PackEntry, PackRecord};

mod file;

/// Reads of packs in a local vault from this size on skip the page cache
/// (`file`); smaller ones (a pack's header, one small blob) are cheaper
/// through it than as a disk read each.
const DIRECT_READ_MIN: u64 = 64 * 1024;

const META_MAGIC: &[u8; 8] = b"FERRYMD1";

/// Where a vault lives, parsed from what the user typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    Local(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// Accepts `s3://bucket[/prefix]`, `file:///abs/path` or a plain path.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadLocation {
            location: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid {
                return Err(bad(
                    "bucket names are 3-63 characters of a-z, 0-9, '-' and '.'",
                ));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "file:// needs an absolute path, as in file:///srv/vault",
                ));
            }
            return Ok(Location::Local(rest.into()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(bad(&format!(
                "unknown scheme {scheme:?} (use a path, file:// or s3://)"
            )));
        }
        Ok(Location::Local(s.into()))
    }

    /// A local vault's directory, as its object store resolves it.
    fn local_dir(&self) -> Option<std::path::PathBuf> {
        match self {
            Location::Local(path) => {
                Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
            }
            Location::S3 { .. } => None,
        }
    }

    fn store(&self, create: bool) -> Result<Arc<dyn ObjectStore>> {
        match self {
            Location::Local(path) => {
                if create {
                    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
                } else if !path.is_dir() {
                    return Err(Error::NotInitialised {
                        vault: self.to_string(),
                    });
                }
                // Synced before they are linked in, and their directories
                // after: an object the catalog lists survives a power cut.
                let fs = LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| Error::BadLocation {
                        location: self.to_string(),
                        reason: e.to_string(),
                    })?
                    .with_fsync(true);
                Ok(Arc::new(fs))
            }
            Location::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(RetryConfig {
                        max_retries: 4,
                        retry_timeout: Duration::from_secs(60),
                        ..Default::default()
                    });
                let endpoint =
                    std::env::var("AWS_ENDPOINT_URL").or_else(|_| std::env::var("AWS_ENDPOINT"));
                if endpoint.is_ok_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                if std::env::var("AWS_REGION").is_err()
                    && std::env::var("AWS_DEFAULT_REGION").is_err()
                {
                    b = b.with_region("us-east-1");
                }
                let s3 = b.build().map_err(|e| Error::BadLocation {
                    location: self.to_string(),
                    reason: e.to_string(),
                })?;
                if prefix.is_empty() {
                    Ok(Arc::new(s3))
                } else {
                    Ok(Arc::new(PrefixStore::new(s3, prefix.as_str())))
                }
            }
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// An open vault: its store, config and keys.
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    name: String,
    /// A directory on this machine (its puts are file writes): where it
    /// is, for the packs written past the page cache (`file`).
    local: Option<std::path::PathBuf>,
    config: VaultConfig,
    keys: MasterKeys,
    ids: IdHasher,
}

/// Reads and checks a vault's config object.
async fn read_config(store: &dyn ObjectStore, name: &str) -> Result<VaultConfig> {
    let body = match store.get(&Path::from("config")).await {
        Ok(r) => r
            .bytes()
            .await
            .map_err(|e| store_error(name, "read", "config", e))?,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(Error::NotInitialised { vault: name.into() });
        }
        Err(e) => return Err(store_error(name, "read", "config", e)),
    };
    let bad = |reason: String| Error::BadConfig {
        vault: name.into(),
        reason,
    };
    let config = VaultConfig::parse(&body).map_err(bad)?;
    if config.format != FORMAT_NAME {
        return Err(bad(format!(
            "not a ferry vault (format {:?})",
            config.format
        )));
    }
    if config.version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is not supported by this ferry (it reads version {FORMAT_VERSION})",
            config.version
        )));
    }
    Ok(config)
}

pub fn pack_path(id: &PackId) -> Path {
    let h = id.to_hex();
    Path::from(format!("packs/{}/{}", &h[..2], h))
}

impl Vault {
    /// Creates a vault. Fails if one is already there (create-only put of
    /// the config).
    pub async fn init(
        location: &Location,
        passphrase: &[u8],
        opts: &VaultOptions,
    ) -> Result<VaultConfig> {
        let store = location.store(true)?;
        Self::init_in(store, &location.to_string(), passphrase, opts).await
    }

    pub async fn init_in(
        store: Arc<dyn ObjectStore>,
        name: &str,
        passphrase: &[u8],
        opts: &VaultOptions,
    ) -> Result<VaultConfig> {
        opts.validate().map_err(Error::Invalid)?;
        // Reach the store before anything else: a missing bucket or bad
        // credentials fail here, with the store's reason.
        let probe = Path::from("config");
        store
            .list_with_delimiter(Some(&probe))
            .await
            .map_err(|e| store_error(name, "list", "", e))?;
        let vault_id = crate::id::random_hex_id();
        let keys = MasterKeys::generate();
        let wrapped = keys::wrap(&keys, &opts.kdf, passphrase, &vault_id)?;
        let config = VaultConfig {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            vault_id,
            created: now_rfc3339(),
            chunker: opts.chunker,
            compression: opts.compression.clone(),
            pack_size: opts.pack_size,
            id_hash: "blake3-keyed".into(),
            cipher: "aes-256-gcm".into(),
            kdf: opts.kdf.clone(),
            keys: hex::encode(wrapped),
        };
        let body =
            serde_json::to_vec_pretty(&config).map_err(|e| Error::Internal(e.to_string()))?;
        let r = store
            .put_opts(
                &Path::from("config"),
                PutPayload::from(body),
                PutOptions::from(PutMode::Create),
            )
            .await;
        match r {
            Ok(_) => Ok(config),
            Err(object_store::Error::AlreadyExists { .. }) => {
                Err(Error::AlreadyInitialised { vault: name.into() })
            }
            Err(e) => Err(store_error(name, "write", "config", e)),
        }
    }

    /// Opens a vault: reads the config and unwraps the keys.
    pub async fn open(location: &Location, passphrase: &[u8]) -> Result<Vault> {
        let store = location.store(false)?;
        let mut vault = Self::open_in(store, &location.to_string(), passphrase).await?;
        vault.local = location.local_dir();
        Ok(vault)
    }

    pub async fn open_in(
        store: Arc<dyn ObjectStore>,
        name: &str,
        passphrase: &[u8],
    ) -> Result<Vault> {
        let config = read_config(store.as_ref(), name).await?;
        let wrapped = hex::decode(&config.keys).map_err(|_| Error::BadConfig {
            vault: name.into(),
            reason: "bad wrapped keys".into(),
        })?;
        let keys = keys::unwrap(&wrapped, &config.kdf, passphrase, &config.vault_id)?
            .ok_or_else(|| Error::WrongPassphrase { vault: name.into() })?;
        Ok(Vault {
            ids: IdHasher::new(keys.id),
            store,
            name: name.into(),
            local: None,
            config,
            keys,
        })
    }

    /// Opens a vault with keys handed over by a coordinator instead of a
    /// passphrase (the coordinator unwrapped them). The vault at `location`
    /// must be the coordinator's (`vault_id`): an agent may reach the same
    /// vault through another endpoint, never another vault.
    pub async fn open_with_keys(
        location: &Location,
        vault_id: &str,
        keys: MasterKeys,
    ) -> Result<Vault> {
        let name = location.to_string();
        let store = location.store(false)?;
        let config = read_config(store.as_ref(), &name).await?;
        if config.vault_id != vault_id {
            return Err(Error::BadConfig {
                vault: name,
                reason: format!(
                    "this is vault {}, but the coordinator's vault is {vault_id}",
                    config.vault_id
                ),
            });
        }
        Ok(Vault {
            ids: IdHasher::new(keys.id),
            store,
            local: location.local_dir(),
            name,
            config,
            keys,
        })
    }

    /// The vault's secrets, for a coordinator to hand to its agents.
    pub fn master_keys(&self) -> &MasterKeys {
        &self.keys
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A directory on this machine rather than an object store.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    pub fn config(&self) -> &VaultConfig {
        &self.config
    }

    pub fn id(&self) -> &str {
        &self.config.vault_id
    }

    pub fn data_key(&self) -> &[u8; 32] {
        &self.keys.data
    }

    pub fn ids(&self) -> &IdHasher {
        &self.ids
    }

    fn err(&self, op: &'static str, object: &Path, e: object_store::Error) -> Error {
        store_error(&self.name, op, object.as_ref(), e)
    }

    /// Writes a finished pack, create-only. A pack already there under the
    /// same name has the same bytes (the name is their hash), so that is a
    /// success, not an overwrite.
    pub async fn put_pack(&self, pack: &FinishedPack) -> Result<()> {
        let path = pack_path(&pack.record.id);
        let started = std::time::Instant::now();
        if let Some(dir) = &self.local {
            let target = dir.join(path.as_ref());
            let (at, bytes) = (target.clone(), pack.bytes.clone());
            let r = blocking(move || file::put_new(&at, &bytes)).await;
            crate::telemetry::vault_request("put", started, r.is_ok());
            return r.map(drop).map_err(|e| Error::io(target, e));
        }
        let r = self
            .store
            .put_opts(
                &path,
                PutPayload::from(pack.bytes.clone()),
                PutOptions::from(PutMode::Create),
            )
            .await;
        crate::telemetry::vault_request(
            "put",
            started,
            matches!(r, Ok(_) | Err(object_store::Error::AlreadyExists { .. })),
        );
        match r {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(self.err("write", &path, e)),
        }
    }

    /// Staging files that puts killed midway left in a local vault (see
    /// [`file`]), older than [`STAGING_AGE`]: removed, or only counted when
    /// `dry_run`. Object stores keep no such files (a pack is one PUT).
    pub async fn sweep_staging(&self, dry_run: bool) -> Result<u64> {
        let Some(dir) = self.local.clone() else {
            return Ok(0);
        };
        let at = dir.clone();
        blocking(move || file::sweep_staging(&at, STAGING_AGE, dry_run))
            .await
            .map_err(|e| Error::io(dir, e))
    }

    pub async fn get_range(&self, path: &Path, range: Range<u64>) -> Result<Bytes> {
        let started = std::time::Instant::now();
        if let Some(dir) = self.local.as_ref().filter(|_| {
            range.end.saturating_sub(range.start) >= DIRECT_READ_MIN
                && path.as_ref().starts_with("packs/")
        }) {
            let file = dir.join(path.as_ref());
            let r = blocking(move || file::read_range(&file, range)).await;
            crate::telemetry::vault_request("get", started, r.is_ok());
            return r.map_err(|e| {
                let e = match e.kind() {
                    std::io::ErrorKind::NotFound => object_store::Error::NotFound {
                        path: path.to_string(),
                        source: e.into(),
                    },
                    _ => object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: e.into(),
                    },
                };
                self.err("read", path, e)
            });
        }
        let r = self.store.get_range(path, range).await;
        crate::telemetry::vault_request("get", started, r.is_ok());
        r.map_err(|e| self.err("read", path, e))
    }

    pub async fn get(&self, path: &Path) -> Result<Bytes> {
        let started = std::time::Instant::now();
        let r = match self.store.get(path).await {
            Ok(r) => r.bytes().await,
            Err(e) => Err(e),
        };
        crate::telemetry::vault_request("get", started, r.is_ok());
        r.map_err(|e| self.err("read", path, e))
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let p = Path::from(prefix);
        let started = std::time::Instant::now();
        let r: std::result::Result<Vec<ObjectMeta>, _> =
            self.store.list(Some(&p)).try_collect().await;
        crate::telemetry::vault_request("list", started, r.is_ok());
        r.map_err(|e| self.err("list", &p, e))
    }

    /// Deletes an object; one already gone is not an error. Only prune
    /// (packs it proved dead), forget (snapshot records) and locks delete.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let path = Path::from(name);
        let started = std::time::Instant::now();
        let r = self.store.delete(&path).await;
        crate::telemetry::vault_request(
            "delete",
            started,
            matches!(r, Ok(()) | Err(object_store::Error::NotFound { .. })),
        );
        match r {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", &path, e)),
        }
    }

    /// Seals and writes a metadata object (index, snapshot record),
    /// create-only. Returns the bytes written.
    pub async fn put_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<u64> {
        let json = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
        let mut body =
            zstd::bulk::compress(&json, 3).map_err(|e| Error::Internal(e.to_string()))?;
        let salt = keys::random32();
        ObjectCipher::new(&self.keys.data, &salt).seal(0, &meta_aad(name), &mut body);
        let mut out = Vec::with_capacity(40 + body.len());
        out.extend_from_slice(META_MAGIC);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&body);
        let path = Path::from(name);
        let len = out.len() as u64;
        let started = std::time::Instant::now();
        let r = self
            .store
            .put_opts(
                &path,
                PutPayload::from(out),
                PutOptions::from(PutMode::Create),
            )
            .await;
        crate::telemetry::vault_request("put", started, r.is_ok());
        r.map_err(|e| self.err("write", &path, e))?;
        Ok(len)
    }

    /// Reads and opens a metadata object; its name is authenticated, so an
    /// object copied to another name fails.
    pub async fn get_meta<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let bytes = self.get(&Path::from(name)).await?;
        let damaged = |reason: &str| Error::DamagedObject {
            object: name.into(),
            reason: reason.into(),
        };
        if bytes.len() < 40 + 16 || &bytes[..8] != META_MAGIC {
            return Err(damaged("not a ferry metadata object"));
        }
        let salt: [u8; 32] = bytes[8..40].try_into().expect("length checked");
        let mut body = bytes[40..].to_vec();
        if !ObjectCipher::new(&self.keys.data, &salt).open(0, &meta_aad(name), &mut body) {
            return Err(damaged("does not authenticate"));
        }
        let json =
            zstd::stream::decode_all(&body[..]).map_err(|_| damaged("does not decompress"))?;
        serde_json::from_slice(&json).map_err(|e| damaged(&e.to_string()))
    }

    /// Reads one blob through its catalog location.
    pub async fn read_blob(
        &self,
        pack: &PackId,
        salt: &[u8; 32],
        e: &PackEntry,
    ) -> Result<Vec<u8>> {
        let sealed = self
            .get_range(&pack_path(pack), e.offset..e.offset + e.stored_len as u64)
            .await
            .map_err(|err| missing_pack(pack, err))?;
        crate::pack::open_blob(&self.keys.data, &self.ids, pack, salt, e, sealed.to_vec())
    }

    /// Reads a pack's header with two range reads (prefix, then tail): what
    /// a catalog rebuild needs of a pack no index object covers.
    pub async fn read_pack_header(&self, id: &PackId, size: u64) -> Result<PackRecord> {
        let path = pack_path(id);
        let damaged = |r: &str| Error::DamagedPack {
            pack: id.to_hex(),
            reason: r.into(),
        };
        if size < (crate::pack::PREFIX_LEN + 4) as u64 {
            return Err(damaged("truncated"));
        }
        let prefix = self
            .get_range(&path, 0..crate::pack::PREFIX_LEN as u64)
            .await?;
        let salt = crate::pack::salt_from_prefix(id, &prefix)?;
        let trailer = self.get_range(&path, size - 4..size).await?;
        let hl = crate::pack::header_len_from_trailer(id, &trailer)? as u64;
        if hl + 4 + crate::pack::PREFIX_LEN as u64 > size {
            return Err(damaged("bad header length"));
        }
        let sealed = self.get_range(&path, size - 4 - hl..size - 4).await?;
        let blobs = crate::pack::read_header(&self.keys.data, id, &salt, sealed.to_vec())?;
        Ok(PackRecord {
            id: *id,
            size,
            salt: hex::encode(salt),
            blobs,
        })
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}

/// A pack the catalog knows but the store does not have is damage, and is
/// reported as such.
pub fn missing_pack(pack: &PackId, err: Error) -> Error {
    if err.is_not_found() {
        Error::DamagedPack {
            pack: pack.to_hex(),
            reason: "missing from the vault".into(),
        }
    } else {
        err
    }
}

fn meta_aad(name: &str) -> Vec<u8> {
    let mut aad = b"ferry-meta-v1:".to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// A staging file this old is no live put's: a put takes seconds, and the
/// sweep runs under the exclusive lock.
pub const STAGING_AGE: Duration = Duration::from_secs(3600);

/// Runs file I/O on tokio's blocking pool; a panic there is an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// Maps a store error once, so that the common failures read plainly.
fn store_error(vault: &str, op: &'static str, object: &str, e: object_store::Error) -> Error {
    let text = e.to_string();
    if text.contains("NoSuchBucket") {
        return Error::BadLocation {
            location: vault.into(),
            reason: "the bucket does not exist".into(),
        };
    }
    Error::Store {
        vault: vault.into(),
        op,
        object: object.into(),
        source: Box::new(e),
    }
}

/// The current UTC time as RFC 3339 with seconds, without a date crate.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(d.as_secs() as i64)
}

pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    pub(crate) fn fast_opts() -> VaultOptions {
        let mut o = VaultOptions::default();
        o.kdf.m_kib = 64;
        o.kdf.t = 1;
        o
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("/srv/v").unwrap(),
            Location::Local("/srv/v".into())
        );
        assert_eq!(
            Location::parse("file:///srv/v").unwrap(),
            Location::Local("/srv/v".into())
        );
        assert_eq!(
            Location::parse("s3://my-bucket/a/b/").unwrap(),
            Location::S3 {
                bucket: "my-bucket".into(),
                prefix: "a/b".into()
            }
        );
        for bad in ["", "s3://", "s3://Bad_Bucket", "file://rel", "gs://x/y"] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[tokio::test]
    async fn init_open_and_wrong_passphrase() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        Vault::init_in(store.clone(), "mem", b"pw", &fast_opts())
            .await
            .unwrap();
        let again = Vault::init_in(store.clone(), "mem", b"pw", &fast_opts()).await;
        assert!(matches!(again, Err(Error::AlreadyInitialised { .. })));
        let v = Vault::open_in(store.clone(), "mem", b"pw").await.unwrap();
        assert_eq!(v.config().chunker, crate::config::ChunkerParams::default());
        let e = Vault::open_in(store.clone(), "mem", b"nope")
            .await
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "wrong passphrase for vault mem");
        let empty: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        assert!(matches!(
            Vault::open_in(empty, "mem2", b"pw").await,
            Err(Error::NotInitialised { .. })
        ));
    }

    #[tokio::test]
    async fn meta_objects_are_sealed_and_bound_to_their_name() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        Vault::init_in(store.clone(), "mem", b"pw", &fast_opts())
            .await
            .unwrap();
        let v = Vault::open_in(store.clone(), "mem", b"pw").await.unwrap();
        v.put_meta("snapshots/a", &vec!["secret-file-name"])
            .await
            .unwrap();
        let raw = v.get(&Path::from("snapshots/a")).await.unwrap();
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        let back: Vec<String> = v.get_meta("snapshots/a").await.unwrap();
        assert_eq!(back, vec!["secret-file-name"]);
        // Never overwritten.
        assert!(v.put_meta("snapshots/a", &1).await.is_err());
        // Copied under another name: does not authenticate.
        store
            .copy(&Path::from("snapshots/a"), &Path::from("snapshots/b"))
            .await
            .unwrap();
        let e = v.get_meta::<Vec<String>>("snapshots/b").await.unwrap_err();
        assert!(
            e.to_string().contains("snapshots/b") && e.to_string().contains("authenticate"),
            "{e}"
        );
    }
}
