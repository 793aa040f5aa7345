//! A bucket as a snapshot source and a restore target through the vault:
//! ferry-core's `ObjectSource` and `ObjectSink` over a [`Side`].
//!
//! ferry-core calls them from its pipeline threads, blocking; each call
//! runs on the runtime whose handle is kept here. Bodies stream through a
//! bounded channel (reads) or go up part by part (writes), so memory is
//! bounded whatever the object's size.

use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use ferry_core::objects::{Headers, Listing, ObjectEntry, ObjectSink, ObjectSource};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use crate::store::{Entry, KeyRange, Meta, Side};

/// Parts of this size go up one after the other.
const PART: u64 = 8 << 20;

pub struct BucketObjects {
    side: Arc<Side>,
    name: String,
    rt: Handle,
}

impl BucketObjects {
    /// `name` is what snapshots record as their source.
    pub fn new(side: Side, name: String, rt: Handle) -> Self {
        Self {
            side: Arc::new(side),
            name,
            rt,
        }
    }
}

fn io(e: crate::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn headers_of(m: &Meta) -> Headers {
    let mut h = Vec::new();
    for (k, v) in [
        ("content-type", &m.content_type),
        ("content-encoding", &m.content_encoding),
        ("cache-control", &m.cache_control),
        ("content-disposition", &m.content_disposition),
        ("content-language", &m.content_language),
    ] {
        if let Some(v) = v {
            h.push((k.to_string(), v.clone()));
        }
    }
    for (k, v) in &m.user {
        h.push((format!("meta.{k}"), v.clone()));
    }
    h
}

fn meta_of(h: &Headers) -> Meta {
    let mut m = Meta::default();
    for (k, v) in h {
        let field = match k.as_str() {
            "content-type" => &mut m.content_type,
            "content-encoding" => &mut m.content_encoding,
            "cache-control" => &mut m.cache_control,
            "content-disposition" => &mut m.content_disposition,
            "content-language" => &mut m.content_language,
            other => {
                if let Some(u) = other.strip_prefix("meta.") {
                    m.user.insert(u.to_string(), v.clone());
                }
                continue;
            }
        };
        *field = Some(v.clone());
    }
    m
}

fn entry(e: Entry) -> ObjectEntry {
    ObjectEntry {
        etag: e.token(),
        key: e.key,
        size: e.size,
        modified_ns: e.modified_ns,
    }
}

impl BucketObjects {
    fn listing(&self) -> Listing<'_> {
        let (tx, mut rx) = mpsc::channel(1000);
        let side = self.side.clone();
        self.rt
            .spawn(async move { side.list(&KeyRange::default(), tx).await });
        Box::new(std::iter::from_fn(move || {
            // A bucket holds no symlinks or special files; a directory's
            // are not objects.
            loop {
                match rx.blocking_recv()? {
                    Ok(e) if e.unsupported.is_some() => continue,
                    r => return Some(r.map(entry).map_err(io)),
                }
            }
        }))
    }

    /// Streams an object's body into a blocking reader.
    fn reader(&self, key: &str, etag: Option<&str>) -> std::io::Result<(Headers, BodyReader)> {
        let mut d = self
            .rt
            .block_on(self.side.get(key, etag, false))
            .map_err(io)?;
        let headers = headers_of(&d.meta);
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(4);
        self.rt.spawn(async move {
            loop {
                match d.next().await {
                    Ok(Some(b)) => {
                        if tx.send(Ok(b)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(io(e))).await;
                        return;
                    }
                }
            }
        });
        Ok((
            headers,
            BodyReader {
                rx,
                buf: Bytes::new(),
            },
        ))
    }
}

struct BodyReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    buf: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.buf = b?,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf.split_to(n));
        Ok(n)
    }
}

impl ObjectSource for BucketObjects {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn list(&self) -> Listing<'_> {
        self.listing()
    }

    fn open(&self, e: &ObjectEntry) -> std::io::Result<(Headers, Box<dyn Read + Send>)> {
        // Insist on the listed version: a rewrite in between fails the
        // read (If-Match) instead of mixing versions.
        let etag = (!e.etag.is_empty() && !e.etag.starts_with('m')).then_some(e.etag.as_str());
        let (h, r) = self.reader(&e.key, etag)?;
        Ok((h, Box::new(r)))
    }
}

impl ObjectSink for BucketObjects {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn list(&self) -> Listing<'_> {
        self.listing()
    }

    fn put(
        &self,
        key: &str,
        size: u64,
        headers: &Headers,
        body: &mut dyn Read,
    ) -> std::io::Result<String> {
        if let Some(p) = self
            .side
            .is_local()
            .then(|| crate::store::local_key_problem(key))
            .flatten()
        {
            return Err(std::io::Error::other(format!(
                "{key}: a directory cannot hold this key ({p})"
            )));
        }
        let side = &*self.side;
        let part = crate::store::part_size_for(size, PART);
        let mut up = self
            .rt
            .block_on(side.begin(key, &meta_of(headers), size, part))
            .map_err(io)?;
        let mut written = 0u64;
        let r: std::io::Result<()> = (|| {
            loop {
                let mut buf = Vec::with_capacity(part.min(size.max(1)) as usize);
                Read::take(&mut *body, part).read_to_end(&mut buf)?;
                if buf.is_empty() {
                    break;
                }
                written += buf.len() as u64;
                self.rt
                    .block_on(up.part(side, Bytes::from(buf)))
                    .map_err(io)?;
            }
            if written != size {
                return Err(std::io::Error::other(format!(
                    "{key}: {written} bytes read from the vault, {size} expected"
                )));
            }
            Ok(())
        })();
        if let Err(e) = r {
            self.rt.block_on(up.abort(side));
            return Err(e);
        }
        // A failed completion must not leave the upload open (billed).
        let open = up
            .multipart_id()
            .map(|(k, id)| (k.to_string(), id.to_string()));
        if let Err(e) = self.rt.block_on(up.complete(side)) {
            if let Some((k, id)) = open {
                let _ = self.rt.block_on(side.abort_upload(&k, &id));
            }
            return Err(io(e));
        }
        if key.ends_with('/') && side.is_local() {
            // A directory made for a marker lists as nothing.
            return Ok(String::new());
        }
        // What the next listing will show, to compare with then.
        let listed = self.rt.block_on(side.listed(key)).map_err(io)?;
        Ok(listed.map(|e| e.token()).unwrap_or_default())
    }

    fn delete(&self, key: &str) -> std::io::Result<()> {
        self.rt.block_on(self.side.delete(key)).map_err(io)
    }

    fn read(&self, key: &str) -> std::io::Result<Box<dyn Read + Send>> {
        let (_, r) = self.reader(key, None)?;
        Ok(Box::new(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_maps_to_headers_and_back() {
        let mut m = Meta {
            content_type: Some("text/plain".into()),
            cache_control: Some("no-cache".into()),
            ..Default::default()
        };
        m.user.insert("owner".into(), "team-a".into());
        let h = headers_of(&m);
        assert!(h.contains(&("meta.owner".into(), "team-a".into())));
        assert_eq!(meta_of(&h), m);
    }
}
