//! Keys: the random master keys of a vault and their wrapping.
//!
//! A vault has two random 256-bit secrets: the data key (AES-256-GCM, never
//! used directly: every object gets its own key derived from it) and the id
//! key (keys BLAKE3 for blob ids). Both are wrapped with a key derived from
//! the passphrase by Argon2id; the Argon2 parameters and salt are stored in
//! the vault config so that any reader can derive the same key.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random source failed");
}

pub fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    fill_random(&mut b);
    b
}

/// The vault's secrets. Never logged, never printed.
#[derive(Clone)]
pub struct MasterKeys {
    pub data: [u8; 32],
    pub id: [u8; 32],
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeys(..)")
    }
}

impl MasterKeys {
    pub fn generate() -> Self {
        Self {
            data: random32(),
            id: random32(),
        }
    }
}

/// Argon2id parameters, stored in the vault config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub algorithm: String,
    /// Memory in KiB.
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    /// 32 random bytes, hex.
    pub salt: String,
}

impl KdfParams {
    /// 64 MiB and 3 passes, costly for a guesser with a GPU. Two lanes,
    /// derived on two threads: the guesser's cost (memory times passes) is
    /// the same as with one (RFC 9106 recommends four lanes), and every
    /// command waits less before it starts (0.13 s against 0.16 s here:
    /// the first touch of the 64 MiB does not halve).
    pub fn new_default() -> Self {
        Self {
            algorithm: "argon2id".into(),
            m_kib: 64 * 1024,
            t: 3,
            p: 2,
            salt: hex::encode(random32()),
        }
    }

    fn derive(&self, passphrase: &[u8]) -> Result<[u8; 32]> {
        if self.algorithm != "argon2id" {
            return Err(Error::Invalid(format!(
                "unsupported key derivation {:?}",
                self.algorithm
            )));
        }
        let salt = hex::decode(&self.salt)
            .map_err(|_| Error::Invalid("vault config: bad kdf salt".into()))?;
        let params = argon2::Params::new(self.m_kib, self.t, self.p, Some(32))
            .map_err(|e| Error::Invalid(format!("vault config: bad argon2 parameters: {e}")))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = [0u8; 32];
        argon
            .hash_password_into(passphrase, &salt, &mut out)
            .map_err(|e| Error::Invalid(format!("argon2: {e}")))?;
        Ok(out)
    }
}

/// Associated data of the wrapped keys: binds them to one vault.
fn wrap_aad(vault_id: &str) -> Vec<u8> {
    let mut aad = b"ferry-keys-v1:".to_vec();
    aad.extend_from_slice(vault_id.as_bytes());
    aad
}

/// Encrypts the master keys under the passphrase key: `nonce(12) || ct`.
/// One message per (salt, passphrase), so a random nonce is safe.
pub fn wrap(
    keys: &MasterKeys,
    kdf: &KdfParams,
    passphrase: &[u8],
    vault_id: &str,
) -> Result<Vec<u8>> {
    let kek = kdf.derive(passphrase)?;
    let cipher = Aes256Gcm::new(&kek.into());
    let mut nonce = [0u8; 12];
    fill_random(&mut nonce);
    let mut plain = Vec::with_capacity(64);
    plain.extend_from_slice(&keys.data);
    plain.extend_from_slice(&keys.id);
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &plain,
                aad: &wrap_aad(vault_id),
            },
        )
        .map_err(|_| Error::Internal("key wrapping failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens the wrapped keys; `None` when the passphrase is wrong (the GCM tag
/// does not verify).
pub fn unwrap(
    wrapped: &[u8],
    kdf: &KdfParams,
    passphrase: &[u8],
    vault_id: &str,
) -> Result<Option<MasterKeys>> {
    if wrapped.len() < 12 + 64 + 16 {
        return Err(Error::Invalid(
            "vault config: wrapped keys too short".into(),
        ));
    }
    let kek = kdf.derive(passphrase)?;
    let cipher = Aes256Gcm::new(&kek.into());
    let nonce: [u8; 12] = wrapped[..12].try_into().expect("length checked");
    let Ok(plain) = cipher.decrypt(
        &Nonce::from(nonce),
        Payload {
            msg: &wrapped[12..],
            aad: &wrap_aad(vault_id),
        },
    ) else {
        return Ok(None);
    };
    Ok(Some(MasterKeys {
        data: plain[..32].try_into().expect("64 bytes"),
        id: plain[32..64].try_into().expect("64 bytes"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast_kdf() -> KdfParams {
        KdfParams {
            m_kib: 64,
            t: 1,
            ..KdfParams::new_default()
        }
    }

    #[test]
    fn wrap_unwrap_and_wrong_passphrase() {
        let keys = MasterKeys::generate();
        let kdf = fast_kdf();
        let w = wrap(&keys, &kdf, b"secret", "v1").unwrap();
        let k = unwrap(&w, &kdf, b"secret", "v1").unwrap().unwrap();
        assert_eq!(k.data, keys.data);
        assert_eq!(k.id, keys.id);
        assert!(unwrap(&w, &kdf, b"wrong", "v1").unwrap().is_none());
        // Bound to the vault id: the same blob under another vault fails.
        assert!(unwrap(&w, &kdf, b"secret", "v2").unwrap().is_none());
    }
}
