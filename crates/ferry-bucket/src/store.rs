//! The two kinds of side a bucket sync has: an S3-compatible bucket (through
//! aws-sdk-s3, which carries any key exactly, user metadata, storage class,
//! tags and server-side copy) and a local directory. Listings come out in
//! key byte order, so two sides are compared by a streaming merge.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective, StorageClass};
use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::location::Location;
use crate::{Error, Result};

/// One listed object; `key` is relative to the side's prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub size: u64,
    /// As the store reports it, quotes removed; empty for local files.
    pub etag: String,
    pub modified_ns: i64,
    /// Why a local directory's entry cannot be carried as an object (a
    /// symlink, a special file, a name that is not UTF-8): listed so that
    /// the sync says so and never deletes its namesake, never copied.
    pub unsupported: Option<&'static str>,
}

impl Entry {
    /// What identifies this version of the object in listings: the etag,
    /// or the modification time where a store lists no etags.
    pub fn token(&self) -> String {
        if self.etag.is_empty() {
            format!("m{}", self.modified_ns)
        } else {
            self.etag.clone()
        }
    }
}

/// What travels with an object besides its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_language: Option<String>,
    pub user: BTreeMap<String, String>,
    pub storage_class: Option<String>,
    /// URL-encoded `k=v&k2=v2`.
    pub tagging: Option<String>,
}

/// An object being read: its metadata and a stream of its bytes.
pub struct Download {
    pub size: u64,
    pub etag: String,
    pub meta: Meta,
    body: Body,
}

enum Body {
    S3(ByteStream),
    /// A local file, with its size and mtime when opened: checked again at
    /// the end, so a file rewritten while it was copied is never a torn copy.
    Local(
        tokio::fs::File,
        String,
        (u64, Option<std::time::SystemTime>),
    ),
}

impl Download {
    /// The next piece of the object, or None at its end.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        match &mut self.body {
            Body::S3(s) => s
                .try_next()
                .await
                .map_err(|e| Error::Transfer(format!("reading: {e}"))),
            Body::Local(f, key, opened) => {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 1 << 20];
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::Transfer(format!("reading: {e}")))?;
                if n == 0 {
                    let m = f
                        .metadata()
                        .await
                        .map_err(|e| Error::Transfer(format!("reading: {e}")))?;
                    if (m.len(), m.modified().ok()) != *opened {
                        return Err(Error::Changed(key.clone()));
                    }
                    return Ok(None);
                }
                buf.truncate(n);
                Ok(Some(Bytes::from(buf)))
            }
        }
    }
}

pub struct S3Side {
    client: Client,
    bucket: String,
    prefix: String,
    /// Endpoint and credentials identity: two sides with the same one can
    /// copy server-side.
    pub identity: String,
}

pub struct LocalSide {
    root: PathBuf,
}

pub enum Side {
    S3(S3Side),
    Local(LocalSide),
}

/// An error and its sources, by their Display only (the SDK's Debug forms
/// run to pages).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if parts.last() != Some(&t) {
            parts.push(t);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// The causes of an error, without the reply the SDK keeps in its context
/// (a whole listing), and at most 300 characters.
fn short_chain(e: &dyn std::error::Error) -> String {
    let mut why = source_chain(e);
    if let Some((cut, _)) = why.char_indices().nth(300) {
        why.truncate(cut);
        why.push_str("...");
    }
    why
}

/// One line for an SDK error: the service's code and message, or why the
/// request did not get an answer.
fn s3_err<E, R>(op: &str, what: &str, e: aws_sdk_s3::error::SdkError<E, R>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_s3::error::SdkError;
    let detail = match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            match (err.code(), err.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.to_string(),
                _ => short_chain(&e),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
            let chain = source_chain(&e);
            if chain.contains("loading credentials") {
                // No credentials anywhere: the SDK's chain goes on through
                // every provider it tried (IMDS and all); say what to set.
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use a remote with credentials in the config file".to_string()
            } else {
                format!("no answer from the endpoint: {chain}")
            }
        }
        // Not the reply itself (the SDK's context holds all of it).
        SdkError::ResponseError(_) => format!("the reply could not be read: {}", short_chain(&e)),
        _ => format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)),
    };
    Error::Store(format!("{op} {what}: {}", detail.replace('\n', " ")))
}

fn is_code<E: ProvideErrorMetadata, R>(
    e: &aws_sdk_s3::error::SdkError<E, R>,
    codes: &[&str],
) -> bool {
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| codes.contains(&c))
}

pub async fn open(loc: &Location, config: &Config) -> Result<Side> {
    match loc {
        Location::Local(p) => Ok(Side::Local(LocalSide { root: p.clone() })),
        Location::S3 {
            remote,
            bucket,
            prefix,
        } => {
            let r = loc.remote(config).cloned().unwrap_or_default();
            let name = remote.as_deref().unwrap_or("s3");
            let mut b = aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(6)
                    .with_initial_backoff(Duration::from_millis(200)),
            );
            let endpoint = r
                .endpoint
                .clone()
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .filter(|e| !e.is_empty());
            if let Some(e) = &endpoint {
                b = b.endpoint_url(e);
            }
            let region = r
                .region
                .clone()
                .or_else(|| std::env::var("AWS_REGION").ok())
                .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                .unwrap_or_else(|| "us-east-1".into());
            b = b.region(aws_config::Region::new(region));
            let creds = r.credentials(name)?;
            let key_id = match &creds {
                Some(c) => c.id.clone(),
                None => std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
            };
            if let Some(c) = creds {
                b = b.credentials_provider(aws_sdk_s3::config::Credentials::new(
                    c.id,
                    c.secret,
                    c.token,
                    None,
                    "ferry-remote",
                ));
            }
            let shared = b.load().await;
            let conf = aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(!r.virtual_hosted)
                .request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                )
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                )
                .build();
            Ok(Side::S3(S3Side {
                client: Client::from_conf(conf),
                bucket: bucket.clone(),
                prefix: prefix.clone(),
                identity: format!("{}|{key_id}", endpoint.unwrap_or_default()),
            }))
        }
    }
}

/// A listed S3 object as an entry under `key` (relative to the prefix).
fn listed_entry(key: &str, o: &aws_sdk_s3::types::Object) -> Entry {
    Entry {
        key: key.to_string(),
        size: o.size().unwrap_or(0).max(0) as u64,
        etag: unquote(o.e_tag().unwrap_or("")),
        modified_ns: o
            .last_modified()
            .map(|t| t.as_nanos().clamp(0, i64::MAX as i128) as i64)
            .unwrap_or(0),
        unsupported: None,
    }
}

fn unquote(s: &str) -> String {
    s.trim_matches('"').to_string()
}

/// Whether a request was answered with success but the reply could not be
/// read (the SDK reports it as an error without a code).
fn unreadable<E: ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    use aws_sdk_s3::error::SdkError;
    match e {
        SdkError::ResponseError(_) => true,
        SdkError::ServiceError(s) => s.raw().status().is_success() && s.err().code().is_none(),
        _ => false,
    }
}

/// A key from a listing asked for with `encoding-type=url`: S3 encodes
/// it as a form value (`+` for a space), so `+` decodes to a space and a
/// real `+` came as `%2B`. `None` when the bytes are not UTF-8.
fn url_decoded(key: &str) -> Option<String> {
    let spaced = key.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|k| k.into_owned())
}

/// A local file's stand-in for an etag: its mtime and inode, so that a
/// rewrite of the same size is noticed. It contains '-', like a multipart
/// etag, so it is never compared with a store's etag.
pub fn local_etag(md: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{LOCAL_ETAG}{}.{}-{}",
        md.mtime(),
        md.mtime_nsec(),
        md.ino()
    )
}

/// How a local file's stand-in etag begins.
pub const LOCAL_ETAG: &str = "local-";

/// Why a key cannot be a path under a local directory, if it cannot.
pub fn local_key_problem(key: &str) -> Option<&'static str> {
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.is_empty() || key.starts_with('/') {
        return Some("starts with '/' or is empty");
    }
    if body
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("has an empty, '.' or '..' component");
    }
    if key.contains('\0') {
        return Some("contains NUL");
    }
    None
}

impl Side {
    pub fn is_local(&self) -> bool {
        matches!(self, Side::Local(_))
    }

    /// Fails with the store's reason if the side cannot be reached (no such
    /// bucket, bad credentials, dead endpoint).
    /// A destination directory may be missing in a dry run (`missing_ok`):
    /// it lists as empty.
    pub async fn probe(&self, create_local: bool, missing_ok: bool) -> Result<()> {
        match self {
            Side::S3(s) => s
                .list_page(&s.prefix, None, None, Some(1), &mut false)
                .await
                .map(|_| ()),
            Side::Local(l) => {
                if create_local {
                    std::fs::create_dir_all(&l.root)
                        .map_err(|e| Error::Store(format!("creating {}: {e}", l.root.display())))?;
                }
                if missing_ok && !l.root.exists() {
                    return Ok(());
                }
                if l.root.is_dir() {
                    Ok(())
                } else {
                    Err(Error::Store(format!(
                        "{}: not a directory",
                        l.root.display()
                    )))
                }
            }
        }
    }

    /// Streams every entry under the side's prefix within `range`, in key
    /// byte order, into `tx` (bounded: the listing never runs far ahead of
    /// the sync).
    pub async fn list(&self, range: &KeyRange, tx: mpsc::Sender<Result<Entry>>) {
        self.list_swept(range, tx, false).await
    }

    /// `list`; with `sweep` (a sync's destination, not in a dry run) a
    /// directory's walk also removes the temporary files killed runs left
    /// (`.ferry-*.tmp`, an hour old: a live copy writes its own all the
    /// time).
    pub async fn list_swept(&self, range: &KeyRange, tx: mpsc::Sender<Result<Entry>>, sweep: bool) {
        let r = match self {
            Side::S3(s) => s.list(range, &tx).await,
            Side::Local(l) => l.list(range, &tx, sweep).await,
        };
        if let Err(e) = r {
            let _ = tx.send(Err(e)).await;
        }
    }

    pub async fn get(&self, key: &str, if_match: Option<&str>, tags: bool) -> Result<Download> {
        match self {
            Side::S3(s) => s.get(key, if_match, tags).await,
            Side::Local(l) => {
                let p = l.path(key)?;
                let f = tokio::fs::File::open(&p)
                    .await
                    .map_err(|e| Error::Transfer(format!("{}: {e}", p.display())))?;
                let m = f
                    .metadata()
                    .await
                    .map_err(|e| Error::Transfer(format!("{}: {e}", p.display())))?;
                let size = m.len();
                Ok(Download {
                    size,
                    etag: String::new(),
                    meta: Meta::default(),
                    body: Body::Local(f, key.to_string(), (size, m.modified().ok())),
                })
            }
        }
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Side::S3(s) => s
                .client
                .delete_object()
                .bucket(&s.bucket)
                .key(s.full(key))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_err("delete", &s.full(key), e)),
            Side::Local(l) => {
                let p = l.path(key)?;
                match tokio::fs::remove_file(&p).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(Error::Transfer(format!("{}: {e}", p.display()))),
                }
            }
        }
    }

    /// An object as a listing shows it (listings and HEAD may disagree
    /// on etags: some stores list none), or None if it is not there.
    pub async fn listed(&self, key: &str) -> Result<Option<Entry>> {
        match self {
            Side::S3(s) => {
                let full = s.full(key);
                let (page, _) = s.list_page(&full, None, None, Some(1), &mut false).await?;
                Ok(page.into_iter().find(|e| e.key == full).map(|mut e| {
                    e.key = key.to_string();
                    e
                }))
            }
            Side::Local(l) => {
                use std::os::unix::fs::MetadataExt;
                let p = l.path(key)?;
                match tokio::fs::symlink_metadata(&p).await {
                    Ok(md) if md.is_file() => Ok(Some(Entry {
                        key: key.to_string(),
                        size: md.len(),
                        etag: local_etag(&md),
                        modified_ns: ferry_core::manifest::time_ns(md.mtime(), md.mtime_nsec()),
                        unsupported: None,
                    })),
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::Transfer(format!("{}: {e}", p.display()))),
                }
            }
        }
    }

    /// Size and etag of an object as stored now (for --verify).
    pub async fn head(&self, key: &str) -> Result<(u64, String)> {
        match self {
            Side::S3(s) => {
                let h = s
                    .client
                    .head_object()
                    .bucket(&s.bucket)
                    .key(s.full(key))
                    .send()
                    .await
                    .map_err(|e| s3_err("head", &s.full(key), e))?;
                Ok((
                    h.content_length().unwrap_or(0) as u64,
                    unquote(h.e_tag().unwrap_or("")),
                ))
            }
            Side::Local(l) => {
                let p = l.path(key)?;
                let md = tokio::fs::metadata(&p)
                    .await
                    .map_err(|e| Error::Transfer(format!("{}: {e}", p.display())))?;
                Ok((md.len(), local_etag(&md)))
            }
        }
    }

    /// Starts writing `key`. Nothing is visible under the key until
    /// [`Upload::complete`]; [`Upload::abort`] leaves nothing behind.
    pub async fn begin(&self, key: &str, meta: &Meta, size: u64, part_size: u64) -> Result<Upload> {
        match self {
            Side::S3(s) => {
                if size <= part_size {
                    return Ok(Upload::S3Single {
                        key: s.full(key),
                        meta: meta.clone(),
                        buf: Vec::with_capacity(size as usize),
                    });
                }
                let mut req = s
                    .client
                    .create_multipart_upload()
                    .bucket(&s.bucket)
                    .key(s.full(key));
                req = apply_meta_mpu(req, meta);
                let r = req
                    .send()
                    .await
                    .map_err(|e| s3_err("start upload of", &s.full(key), e))?;
                Ok(Upload::S3Multi {
                    key: s.full(key),
                    id: r.upload_id().unwrap_or_default().to_string(),
                    parts: Vec::new(),
                })
            }
            Side::Local(l) => {
                let path = l.path(key)?;
                if key.ends_with('/') {
                    return Ok(Upload::LocalDir { path });
                }
                let dir = path.parent().unwrap_or(&l.root).to_path_buf();
                let root = l.root.clone();
                let made = dir.clone();
                tokio::task::spawn_blocking(move || make_dirs_within(&root, &made))
                    .await
                    .map_err(|e| Error::Transfer(e.to_string()))?
                    .map_err(|reason| Error::Key {
                        key: key.into(),
                        reason,
                    })?;
                let tmp = dir.join(format!(".ferry-{}.tmp", random_hex()));
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|e| Error::Transfer(format!("{}: {e}", tmp.display())))?;
                Ok(Upload::Local { path, tmp, file })
            }
        }
    }

    /// Server-side copy from `src` (same endpoint and credentials).
    /// With `storage_class`, the copy gets the source's class (read with a
    /// HEAD: a copy otherwise lands in the default class).
    pub async fn copy_from(
        &self,
        src: &S3Side,
        key: &str,
        etag: &str,
        size: u64,
        storage_class: bool,
    ) -> Result<()> {
        let Side::S3(d) = self else {
            return Err(Error::Transfer("server-side copy needs two buckets".into()));
        };
        let source = format!("{}/{}", src.bucket, encode_key(&src.full(key)));
        if size > 5 * 1024 * 1024 * 1024 {
            return Err(Error::Transfer(
                "objects over 5 GiB are streamed, not copied server-side".into(),
            ));
        }
        let mut req = d
            .client
            .copy_object()
            .bucket(&d.bucket)
            .key(d.full(key))
            .copy_source(source)
            .metadata_directive(MetadataDirective::Copy)
            .tagging_directive(aws_sdk_s3::types::TaggingDirective::Copy);
        if !etag.is_empty() {
            req = req.copy_source_if_match(format!("\"{etag}\""));
        }
        if storage_class {
            let h = src
                .client
                .head_object()
                .bucket(&src.bucket)
                .key(src.full(key))
                .send()
                .await
                .map_err(|e| s3_err("head", &src.full(key), e))?;
            if let Some(c) = h.storage_class() {
                req = req.storage_class(c.clone());
            }
        }
        req.send()
            .await
            .map(|_| ())
            .map_err(|e| s3_err("copy to", &d.full(key), e))
    }

    pub fn as_s3(&self) -> Option<&S3Side> {
        match self {
            Side::S3(s) => Some(s),
            Side::Local(_) => None,
        }
    }

    /// Aborts multipart uploads that an earlier, interrupted run started.
    /// Aborts an open multipart upload: true if it was open, false if the
    /// store no longer has it (it completed, or was aborted already).
    pub async fn abort_upload(&self, key: &str, id: &str) -> Result<bool> {
        if let Side::S3(s) = self {
            let r = s
                .client
                .abort_multipart_upload()
                .bucket(&s.bucket)
                .key(key)
                .upload_id(id)
                .send()
                .await;
            return match r {
                Ok(_) => Ok(true),
                Err(e) if is_code(&e, &["NoSuchUpload"]) => Ok(false),
                Err(e) => Err(s3_err("abort upload of", key, e)),
            };
        }
        Ok(false)
    }
}

/// Percent-encodes a key for `x-amz-copy-source` (everything but
/// unreserved characters and `/`).
fn encode_key(k: &str) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    const KEEP: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/');
    utf8_percent_encode(k, KEEP).to_string()
}

fn random_hex() -> String {
    let mut b = [0u8; 8];
    getrandom_fill(&mut b);
    hex::encode(b)
}

fn getrandom_fill(b: &mut [u8]) {
    // The time and a counter are enough to keep temporary names apart.
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let h = blake3::hash(
        &[
            t.to_le_bytes(),
            N.fetch_add(1, Ordering::Relaxed).to_le_bytes(),
            u64::from(std::process::id()).to_le_bytes(),
        ]
        .concat(),
    );
    b.copy_from_slice(&h.as_bytes()[..b.len()]);
}

macro_rules! with_meta {
    ($req:expr, $m:expr) => {{
        let m: &Meta = $m;
        let mut r = $req
            .set_content_type(m.content_type.clone())
            .set_content_encoding(m.content_encoding.clone())
            .set_cache_control(m.cache_control.clone())
            .set_content_disposition(m.content_disposition.clone())
            .set_content_language(m.content_language.clone())
            .set_tagging(m.tagging.clone());
        if !m.user.is_empty() {
            r = r.set_metadata(Some(m.user.clone().into_iter().collect()));
        }
        if let Some(c) = &m.storage_class {
            r = r.storage_class(StorageClass::from(c.as_str()));
        }
        r
    }};
}

fn apply_meta_mpu(
    req: aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder,
    m: &Meta,
) -> aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder {
    with_meta!(req, m)
}

impl S3Side {
    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Uploads part `n` of a multipart upload (parts go up in parallel).
    pub async fn upload_part(
        &self,
        key: String,
        id: String,
        n: i32,
        data: Bytes,
    ) -> Result<(i32, CompletedPart)> {
        let r = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(&id)
            .part_number(n)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| s3_err(&format!("upload part {n} of"), &key, e))?;
        Ok((
            n,
            CompletedPart::builder()
                .part_number(n)
                .set_e_tag(r.e_tag().map(String::from))
                .build(),
        ))
    }

    /// One page of a listing under `prefix`: its entries (full keys) and
    /// the next page's token. XML 1.0 cannot carry every character a key
    /// may hold (control characters): when a plain reply cannot be read,
    /// this page and the ones after it are asked for with url-encoded keys
    /// (`*encoded`), which are decoded only if the reply says it encoded
    /// them (a store that ignores the request sends keys as they are).
    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        token: Option<&str>,
        max_keys: Option<i32>,
        encoded: &mut bool,
    ) -> Result<(Vec<Entry>, Option<String>)> {
        use aws_sdk_s3::types::EncodingType;
        let what = || format!("s3://{}/{prefix}", self.bucket);
        loop {
            let r = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_start_after(start_after.map(String::from))
                .set_continuation_token(token.map(String::from))
                .set_max_keys(max_keys)
                .set_encoding_type(encoded.then_some(EncodingType::Url))
                .send()
                .await;
            let r = match r {
                Ok(r) => r,
                Err(e) if !*encoded && unreadable(&e) => {
                    *encoded = true;
                    continue;
                }
                Err(e) => return Err(s3_err("list", &what(), e)),
            };
            let decode = r.encoding_type() == Some(&EncodingType::Url);
            let mut page = Vec::with_capacity(r.contents().len());
            for o in r.contents() {
                let Some(key) = o.key() else { continue };
                if !decode {
                    page.push(listed_entry(key, o));
                    continue;
                }
                match url_decoded(key) {
                    Some(k) => page.push(listed_entry(&k, o)),
                    None => {
                        return Err(Error::Store(format!(
                            "list {}: the store sent a key that does not decode: {key:?}",
                            what()
                        )));
                    }
                }
            }
            let next = match r.next_continuation_token() {
                Some(t) if r.is_truncated() == Some(true) => Some(t.to_string()),
                _ => None,
            };
            return Ok((page, next));
        }
    }

    async fn list(&self, range: &KeyRange, tx: &mpsc::Sender<Result<Entry>>) -> Result<()> {
        let mut token: Option<String> = None;
        let start_after = range.after.as_ref().map(|a| self.full(a));
        let mut encoded = false;
        loop {
            let (page, next) = self
                .list_page(
                    &self.prefix,
                    start_after.as_deref(),
                    token.as_deref(),
                    None,
                    &mut encoded,
                )
                .await?;
            for mut e in page {
                let Some(key) = e.key.strip_prefix(&self.prefix) else {
                    continue;
                };
                if key.is_empty() || !range.after_start(key) {
                    continue; // the prefix's own marker
                }
                if range.past_end(key) {
                    return Ok(());
                }
                e.key = key.to_string();
                if tx.send(Ok(e)).await.is_err() {
                    return Ok(());
                }
            }
            match next {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }

    async fn get(&self, key: &str, if_match: Option<&str>, tags: bool) -> Result<Download> {
        let full = self.full(key);
        let mut req = self.client.get_object().bucket(&self.bucket).key(&full);
        if let Some(e) = if_match.filter(|e| !e.is_empty()) {
            req = req.if_match(format!("\"{e}\""));
        }
        let r = req.send().await.map_err(|e| {
            if is_code(&e, &["PreconditionFailed"]) {
                Error::Changed(full.clone())
            } else {
                s3_err("read", &full, e)
            }
        })?;
        let mut meta = Meta {
            content_type: r.content_type().map(String::from),
            content_encoding: r.content_encoding().map(String::from),
            cache_control: r.cache_control().map(String::from),
            content_disposition: r.content_disposition().map(String::from),
            content_language: r.content_language().map(String::from),
            user: r
                .metadata()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
            storage_class: r
                .storage_class()
                .map(|c| c.as_str().to_string())
                .filter(|c| c != "STANDARD"),
            tagging: None,
        };
        if tags && r.tag_count().unwrap_or(0) > 0 {
            let t = self
                .client
                .get_object_tagging()
                .bucket(&self.bucket)
                .key(&full)
                .send()
                .await
                .map_err(|e| s3_err("read tags of", &full, e))?;
            meta.tagging = Some(
                t.tag_set()
                    .iter()
                    .map(|t| format!("{}={}", form_encode(t.key()), form_encode(t.value())))
                    .collect::<Vec<_>>()
                    .join("&"),
            );
        }
        Ok(Download {
            size: r.content_length().unwrap_or(0).max(0) as u64,
            etag: unquote(r.e_tag().unwrap_or("")),
            meta,
            body: Body::S3(r.body),
        })
    }
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Makes the directories from `root` down to `dir` (which lies under it),
/// never through a symbolic link: a link planted in the target (to `/etc`,
/// or out of an agent's root) must not carry a write outside it. `root`
/// itself may be a link, as a restore's target may.
fn make_dirs_within(root: &Path, dir: &Path) -> std::result::Result<(), String> {
    let rel = dir
        .strip_prefix(root)
        .map_err(|_| format!("{} is not under {}", dir.display(), root.display()))?;
    std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut at = root.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(md) if md.is_dir() => continue,
            Ok(md) if md.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symbolic link in the target: not followed",
                    at.display()
                ));
            }
            Ok(_) => return Err(format!("{} is a file, not a directory", at.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
        match std::fs::create_dir(&at) {
            Ok(()) => {}
            // Made meanwhile by another transfer: a directory will do.
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists
                    && std::fs::symlink_metadata(&at).is_ok_and(|m| m.is_dir()) => {}
            Err(e) => return Err(format!("{}: {e}", at.display())),
        }
    }
    Ok(())
}

impl LocalSide {
    fn path(&self, key: &str) -> Result<PathBuf> {
        if let Some(why) = local_key_problem(key) {
            return Err(Error::Key {
                key: key.into(),
                reason: format!("a local directory cannot hold it: the key {why}"),
            });
        }
        let rel = Path::new(key.trim_end_matches('/'));
        debug_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
        Ok(self.root.join(rel))
    }

    /// Walks in key byte order: a directory sorts as its name plus '/'.
    async fn list(
        &self,
        range: &KeyRange,
        tx: &mpsc::Sender<Result<Entry>>,
        sweep: bool,
    ) -> Result<()> {
        let root = self.root.clone();
        if !root.exists() {
            return Ok(()); // a dry run into a directory not made yet
        }
        let (itx, mut irx) = mpsc::channel::<Result<Entry>>(1024);
        let range = range.clone();
        let walker = tokio::task::spawn_blocking(move || walk(&root, &range, &itx, sweep));
        while let Some(e) = irx.recv().await {
            if tx.send(e).await.is_err() {
                break;
            }
        }
        drop(irx);
        walker
            .await
            .map_err(|e| Error::Store(format!("listing: {e}")))?
    }
}

/// How old a temporary file of ours must be before a walk removes it.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

fn walk(
    root: &Path,
    range: &KeyRange,
    tx: &mpsc::Sender<Result<Entry>>,
    sweep: bool,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // Stack of (directory, key prefix); entries pushed in reverse order.
    let mut stack: Vec<(PathBuf, String, bool, Option<&'static str>)> =
        vec![(root.to_path_buf(), String::new(), true, None)];
    while let Some((path, key, is_dir, unsupported)) = stack.pop() {
        if range.past_end(&key) {
            return Ok(()); // in key order: everything after is past it too
        }
        if is_dir && !key.is_empty() && !range.may_hold_under(&key) {
            continue;
        }
        if !is_dir && !range.after_start(&key) {
            continue;
        }
        if !is_dir {
            let md = std::fs::symlink_metadata(&path)
                .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
            let unsupported = match () {
                _ if unsupported.is_some() => unsupported,
                _ if md.is_file() => None,
                _ if md.file_type().is_symlink() => Some("a symlink (not followed)"),
                _ => Some("not a regular file"),
            };
            let e = Entry {
                key,
                size: md.len(),
                etag: local_etag(&md),
                modified_ns: ferry_core::manifest::time_ns(md.mtime(), md.mtime_nsec()),
                unsupported,
            };
            if tx.blocking_send(Ok(e)).is_err() {
                return Ok(());
            }
            continue;
        }
        let mut names = Vec::new();
        for d in std::fs::read_dir(&path)
            .map_err(|e| Error::Store(format!("{}: {e}", path.display())))?
        {
            let d = d.map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
            let os_name = d.file_name();
            // A name no key can carry is listed (lossily) as unsupported,
            // whatever it is: never walked into, never copied.
            let (name, bad_name) = match os_name.to_str() {
                Some(n) => (n.to_string(), None),
                None => (
                    os_name.to_string_lossy().into_owned(),
                    Some("a name that is not UTF-8"),
                ),
            };
            if name.starts_with(".ferry-") && name.ends_with(".tmp") {
                if sweep {
                    let stale = d.metadata().ok().filter(|m| m.is_file()).and_then(|m| {
                        m.modified()
                            .ok()?
                            .elapsed()
                            .ok()
                            .filter(|age| *age > STALE_TMP)
                    });
                    if stale.is_some() {
                        let _ = std::fs::remove_file(d.path());
                    }
                }
                continue;
            }
            let ft = d
                .file_type()
                .map_err(|e| Error::Store(format!("{}: {e}", d.path().display())))?;
            let dir = ft.is_dir() && bad_name.is_none();
            let sort = if dir {
                format!("{name}/")
            } else {
                name.clone()
            };
            names.push((sort, name, os_name, dir, bad_name));
        }
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, name, os_name, dir, bad_name) in names.into_iter().rev() {
            let k = if dir {
                format!("{key}{name}/")
            } else {
                format!("{key}{name}")
            };
            stack.push((path.join(&os_name), k, dir, bad_name));
        }
    }
    Ok(())
}

/// A slice of the key space: the keys after `after` up to and including
/// `until` (open ends when `None`). A distributed sync hands one range to
/// each task; ranges that meet end to end cover every key exactly once.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRange {
    pub after: Option<String>,
    pub until: Option<String>,
}

impl KeyRange {
    pub fn after_start(&self, key: &str) -> bool {
        self.after
            .as_ref()
            .is_none_or(|a| key.as_bytes() > a.as_bytes())
    }

    pub fn past_end(&self, key: &str) -> bool {
        self.until
            .as_ref()
            .is_some_and(|u| key.as_bytes() > u.as_bytes())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.after_start(key) && !self.past_end(key)
    }

    /// Whether any key starting with `dir` (a directory's key, ending in
    /// '/') can fall after the range's start. Every such key is greater
    /// than `dir`; if `after` is at or beyond `dir` without starting with
    /// it, `after` is greater than all of them.
    pub fn may_hold_under(&self, dir: &str) -> bool {
        match &self.after {
            None => true,
            Some(a) => a.as_bytes() < dir.as_bytes() || a.starts_with(dir),
        }
    }
}

/// The part size for an object of `size` bytes: `preferred`, or more so
/// that the object fits in S3's 10,000 parts (rounded up to a MiB).
pub fn part_size_for(size: u64, preferred: u64) -> u64 {
    const MAX_PARTS: u64 = 10_000;
    let needed = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    preferred.max(needed)
}

/// A write in progress.
pub enum Upload {
    S3Single {
        key: String,
        meta: Meta,
        buf: Vec<u8>,
    },
    S3Multi {
        key: String,
        id: String,
        parts: Vec<CompletedPart>,
    },
    Local {
        path: PathBuf,
        tmp: PathBuf,
        file: tokio::fs::File,
    },
    LocalDir {
        path: PathBuf,
    },
}

impl Upload {
    /// The multipart upload id, to record so an interrupted run's upload
    /// can be aborted by the next.
    pub fn multipart_id(&self) -> Option<(&str, &str)> {
        match self {
            Upload::S3Multi { key, id, .. } => Some((key, id)),
            _ => None,
        }
    }

    /// Adds the next part (parts arrive in order; each but the last is the
    /// part size).
    pub async fn part(&mut self, side: &Side, data: Bytes) -> Result<()> {
        match (self, side) {
            (Upload::S3Single { buf, .. }, _) => {
                buf.extend_from_slice(&data);
                Ok(())
            }
            (Upload::S3Multi { key, id, parts }, Side::S3(s)) => {
                let n = parts.len() as i32 + 1;
                let r = s
                    .client
                    .upload_part()
                    .bucket(&s.bucket)
                    .key(key.as_str())
                    .upload_id(id.as_str())
                    .part_number(n)
                    .body(ByteStream::from(data))
                    .send()
                    .await
                    .map_err(|e| s3_err(&format!("upload part {n} of"), key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(r.e_tag().map(String::from))
                        .build(),
                );
                Ok(())
            }
            (Upload::Local { file, tmp, .. }, _) => file
                .write_all(&data)
                .await
                .map_err(|e| Error::Transfer(format!("{}: {e}", tmp.display()))),
            (Upload::LocalDir { .. }, _) => Ok(()),
            _ => Err(Error::Transfer("upload and side do not match".into())),
        }
    }

    pub async fn complete(self, side: &Side) -> Result<()> {
        match (self, side) {
            (Upload::S3Single { key, meta, buf }, Side::S3(s)) => {
                let req = s
                    .client
                    .put_object()
                    .bucket(&s.bucket)
                    .key(&key)
                    .body(ByteStream::from(buf));
                with_meta!(req, &meta)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| s3_err("write", &key, e))
            }
            (Upload::S3Multi { key, id, parts }, Side::S3(s)) => s
                .client
                .complete_multipart_upload()
                .bucket(&s.bucket)
                .key(&key)
                .upload_id(&id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_err("complete upload of", &key, e)),
            (
                Upload::Local {
                    path,
                    tmp,
                    mut file,
                },
                _,
            ) => {
                let io = |e: std::io::Error| Error::Transfer(format!("{}: {e}", tmp.display()));
                file.flush().await.map_err(io)?;
                file.sync_all().await.map_err(io)?;
                drop(file);
                match tokio::fs::rename(&tmp, &path).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        // Nothing is left behind under our temporary name.
                        let _ = tokio::fs::remove_file(&tmp).await;
                        Err(Error::Transfer(format!("{}: {e}", path.display())))
                    }
                }
            }
            (Upload::LocalDir { path }, Side::Local(l)) => {
                let root = l.root.clone();
                let shown = path.display().to_string();
                tokio::task::spawn_blocking(move || make_dirs_within(&root, &path))
                    .await
                    .map_err(|e| Error::Transfer(e.to_string()))?
                    .map_err(|reason| Error::Transfer(format!("{shown}: {reason}")))
            }
            _ => Err(Error::Transfer("upload and side do not match".into())),
        }
    }

    pub async fn abort(self, side: &Side) {
        match self {
            Upload::S3Multi { key, id, .. } => {
                if let Err(e) = side.abort_upload(&key, &id).await {
                    tracing::warn!("{e}");
                }
            }
            Upload::Local { tmp, file, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_stay_within_the_limit_of_ten_thousand() {
        let p = 8 << 20;
        assert_eq!(part_size_for(0, p), p);
        assert_eq!(part_size_for(5 << 30, p), p);
        let huge = 200u64 << 30;
        let part = part_size_for(huge, p);
        assert!(part > p && part.is_multiple_of(1 << 20));
        assert!(huge.div_ceil(part) <= 10_000);
        // 5 TiB, the largest S3 object.
        let max = 5u64 << 40;
        assert!(max.div_ceil(part_size_for(max, p)) <= 10_000);
    }

    #[test]
    fn local_keys_that_cannot_be_paths_are_named() {
        for k in ["/abs", "a//b", "a/../b", "..", "./x", ""] {
            assert!(local_key_problem(k).is_some(), "{k:?}");
        }
        for k in ["a", "a b/c+d%20é", "dir/", "x..y", "a/.hidden"] {
            assert!(local_key_problem(k).is_none(), "{k:?}");
        }
        assert_eq!(encode_key("a b/é+%"), "a%20b/%C3%A9%2B%25");
    }

    #[tokio::test]
    async fn a_local_listing_is_in_key_byte_order() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/b", "a-c", "a0", "b", "a/a/z"] {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let side = Side::Local(LocalSide {
            root: d.path().into(),
        });
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(async move { side.list(&KeyRange::default(), tx).await });
        let mut keys = Vec::new();
        while let Some(e) = rx.recv().await {
            keys.push(e.unwrap().key);
        }
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys, ["a-c", "a/a/z", "a/b", "a0", "b"]);
    }

    #[tokio::test]
    async fn ranges_that_meet_end_to_end_list_every_key_once() {
        let d = tempfile::tempdir().unwrap();
        let all = ["a-c", "a/a/z", "a/b", "a/c/d", "a0", "b", "c/x/y"];
        for p in all {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let side = std::sync::Arc::new(Side::Local(LocalSide {
            root: d.path().into(),
        }));
        let list = |r: KeyRange| {
            let side = side.clone();
            async move {
                let (tx, mut rx) = mpsc::channel(4);
                tokio::spawn(async move { side.list(&r, tx).await });
                let mut keys = Vec::new();
                while let Some(e) = rx.recv().await {
                    keys.push(e.unwrap().key);
                }
                keys
            }
        };
        let cuts = [None, Some("a/a/z"), Some("a/bb"), Some("a0"), None];
        let mut joined = Vec::new();
        for w in cuts.windows(2) {
            let r = KeyRange {
                after: w[0].map(String::from),
                until: w[1].map(String::from),
            };
            let keys = list(r.clone()).await;
            assert!(keys.iter().all(|k| r.contains(k)), "{r:?}: {keys:?}");
            joined.extend(keys);
        }
        assert_eq!(joined, all);
        // A cut inside a directory that sorts before it skips the directory.
        let r = KeyRange {
            after: Some("a0".into()),
            until: None,
        };
        assert!(!r.may_hold_under("a/"));
        assert!(r.may_hold_under("b/"));
        assert_eq!(list(r).await, ["b", "c/x/y"]);
    }

    /// A local file rewritten while it is read (same size, new content) is
    /// refused at the end of the read, never handed on as a torn copy; one
    /// left alone reads whole.
    #[tokio::test]
    async fn a_local_file_rewritten_while_read_is_changed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("obj");
        std::fs::write(&p, vec![1u8; 3 << 20]).unwrap();
        let side = Side::Local(LocalSide {
            root: d.path().into(),
        });
        let mut dl = side.get("obj", None, false).await.unwrap();
        let mut n = 0;
        while let Some(b) = dl.next().await.unwrap() {
            n += b.len();
        }
        assert_eq!(n, 3 << 20);

        let mut dl = side.get("obj", None, false).await.unwrap();
        assert!(dl.next().await.unwrap().is_some());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, vec![2u8; 3 << 20]).unwrap();
        let r = loop {
            match dl.next().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        };
        assert!(
            matches!(r, Err(Error::Changed(ref k)) if k == "obj"),
            "{r:?}"
        );
    }
}
