//! The blob codec: compress, then encrypt; and back.
//!
//! Every object in the vault that holds secrets has a 32-byte random salt in
//! its plaintext prefix. Its AES-256-GCM key is `BLAKE3-keyed(data key,
//! "ferry-object-key-v1" || salt)`, and its messages use the counter nonces
//! 0, 1, 2, ... So a nonce is never reused under one key without any
//! coordination between writers, and no key ever sees more than 2^32
//! messages (the limit for random 96-bit nonces).
//!
//! The associated data of a blob is its kind and id: a blob moved to another
//! place in its pack, or into another pack, or relabelled, fails to
//! authenticate.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{AeadInOut, KeyInit, Nonce};

use crate::id::{BlobId, BlobKind};

pub const TAG_LEN: usize = 16;

/// The key of one vault object.
pub struct ObjectCipher {
    cipher: Aes256Gcm,
}

impl ObjectCipher {
    pub fn new(data_key: &[u8; 32], salt: &[u8; 32]) -> Self {
        let mut h = blake3::Hasher::new_keyed(data_key);
        h.update(b"ferry-object-key-v1");
        h.update(salt);
        let key: [u8; 32] = *h.finalize().as_bytes();
        Self {
            cipher: Aes256Gcm::new(&key.into()),
        }
    }

    fn nonce(counter: u64) -> Nonce<Aes256Gcm> {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&counter.to_le_bytes());
        Nonce::<Aes256Gcm>::from(n)
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal(&self, counter: u64, aad: &[u8], buf: &mut Vec<u8>) {
        self.cipher
            .encrypt_in_place(&Self::nonce(counter), aad, buf)
            .expect("a Vec always has room for the tag");
    }

    /// Encrypts `buf[start..]` in place and appends its tag: a blob sealed
    /// where it lies in its pack, with no copy of its own.
    pub fn seal_tail(&self, counter: u64, aad: &[u8], buf: &mut Vec<u8>, start: usize) {
        let tag = self
            .cipher
            .encrypt_inout_detached(&Self::nonce(counter), aad, (&mut buf[start..]).into())
            .expect("a blob is far below AES-GCM's message limit");
        buf.extend_from_slice(&tag);
    }

    /// Decrypts `buf` in place (ciphertext || tag); false when it does not
    /// authenticate.
    pub fn open(&self, counter: u64, aad: &[u8], buf: &mut Vec<u8>) -> bool {
        self.cipher
            .decrypt_in_place(&Self::nonce(counter), aad, buf)
            .is_ok()
    }
}

pub fn blob_aad(kind: BlobKind, id: &BlobId) -> [u8; 46] {
    let mut aad = [0u8; 46];
    aad[..13].copy_from_slice(b"ferry-blob-v1");
    aad[13] = kind.code();
    aad[14..].copy_from_slice(&id.0);
    aad
}

thread_local! {
    /// One zstd context per thread, kept: making one per chunk (what
    /// `zstd::bulk::compress` does) allocated and cleared its tables for
    /// every 32 KiB chunk, a tenth of a snapshot's CPU time.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's zstd context at `level` (made or remade
/// when the level changes); `None` if zstd could not make one.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> Option<T>,
) -> Option<T> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        f(c)
    })
}

/// Compresses with zstd at `level`; `None` when that does not make the data
/// smaller (already-compressed data is stored raw).
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    with_compressor(level, |c| {
        let out = c.compress(data).ok()?;
        (out.len() < data.len()).then_some(out)
    })
}

/// Appends `data` compressed with zstd at `level` to `out`, with room left
/// for a tag; false, with `out` unchanged, when that does not make the data
/// smaller. Writing straight into the pack saves a buffer and a copy per
/// chunk (and for raw chunks the reallocation that appending the tag cost).
pub fn compress_into(data: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()) + TAG_LEN);
    let n = with_compressor(level, |c| {
        let mut tail = std::io::Cursor::new(&mut *out);
        tail.set_position(start as u64);
        c.compress_to_buffer(data, &mut tail).ok()
    });
    match n {
        Some(n) if n < data.len() => {
            debug_assert_eq!(out.len(), start + n);
            true
        }
        _ => {
            out.truncate(start);
            false
        }
    }
}

/// Decompresses a blob whose raw length is known from the pack header.
pub fn decompress(data: &[u8], raw_len: usize) -> Option<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        let out = slot.as_mut()?.decompress(data, raw_len).ok()?;
        (out.len() == raw_len).then_some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(any::<u8>(), 0..4096), counter in any::<u64>()) {
            let c = ObjectCipher::new(&[3; 32], &[4; 32]);
            let id = BlobId([9; 32]);
            let aad = blob_aad(BlobKind::Data, &id);
            let mut buf = data.clone();
            c.seal(counter, &aad, &mut buf);
            prop_assert_eq!(buf.len(), data.len() + TAG_LEN);
            prop_assert!(c.open(counter, &aad, &mut buf));
            prop_assert_eq!(buf, data);
        }

        #[test]
        fn compress_round_trip(data in proptest::collection::vec(0u8..4, 0..8192)) {
            if let Some(c) = compress(&data, 3) {
                prop_assert!(c.len() < data.len());
                prop_assert_eq!(decompress(&c, data.len()).unwrap(), data);
            }
        }
    }

    #[test]
    fn tamper_is_detected() {
        let c = ObjectCipher::new(&[3; 32], &[4; 32]);
        let id = BlobId([9; 32]);
        let aad = blob_aad(BlobKind::Data, &id);
        let mut sealed = b"some chunk data".to_vec();
        c.seal(7, &aad, &mut sealed);

        let mut flipped = sealed.clone();
        flipped[3] ^= 1;
        assert!(!c.open(7, &aad, &mut flipped), "flipped bit");
        let mut moved = sealed.clone();
        assert!(!c.open(8, &aad, &mut moved), "other position");
        let mut relabelled = sealed.clone();
        assert!(
            !c.open(7, &blob_aad(BlobKind::Tree, &id), &mut relabelled),
            "other kind"
        );
        let mut other_id = sealed.clone();
        assert!(
            !c.open(
                7,
                &blob_aad(BlobKind::Data, &BlobId([8; 32])),
                &mut other_id
            ),
            "other id"
        );
        let other_key = ObjectCipher::new(&[3; 32], &[5; 32]);
        let mut other_pack = sealed.clone();
        assert!(!other_key.open(7, &aad, &mut other_pack), "other pack");
        let mut ok = sealed;
        assert!(c.open(7, &aad, &mut ok));
        assert_eq!(ok, b"some chunk data");
    }

    proptest! {
        #[test]
        fn compress_into_appends_what_compress_returns(
            prefix in proptest::collection::vec(any::<u8>(), 0..64),
            data in proptest::collection::vec(0u8..4, 0..8192),
        ) {
            let mut out = prefix.clone();
            let appended = compress_into(&data, 3, &mut out);
            prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
            match compress(&data, 3) {
                Some(c) => {
                    prop_assert!(appended);
                    prop_assert_eq!(&out[prefix.len()..], &c[..]);
                }
                None => {
                    prop_assert!(!appended);
                    prop_assert_eq!(out.len(), prefix.len());
                }
            }
        }

        #[test]
        fn seal_tail_matches_seal(
            prefix in proptest::collection::vec(any::<u8>(), 0..64),
            data in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let c = ObjectCipher::new(&[3; 32], &[4; 32]);
            let aad = blob_aad(BlobKind::Data, &BlobId([9; 32]));
            let mut whole = data.clone();
            c.seal(5, &aad, &mut whole);
            let mut tail = prefix.clone();
            tail.extend_from_slice(&data);
            c.seal_tail(5, &aad, &mut tail, prefix.len());
            prop_assert_eq!(&tail[..prefix.len()], &prefix[..]);
            prop_assert_eq!(&tail[prefix.len()..], &whole[..]);
        }
    }

    #[test]
    fn incompressible_stays_raw() {
        let mut noise = vec![0u8; 4096];
        crate::keys::fill_random(&mut noise);
        assert!(compress(&noise, 3).is_none());
        assert!(compress(&[0u8; 4096], 3).is_some());
    }
}
