//! The vault config: the one plaintext object of a vault.
//!
//! It names every algorithm and parameter a reader needs (format version,
//! chunker, compression, pack size, key derivation) and holds the wrapped
//! master keys. See `docs/FORMAT.md`.

use serde::{Deserialize, Serialize};

use crate::keys::KdfParams;

pub const FORMAT_NAME: &str = "ferry-vault";
pub const FORMAT_VERSION: u32 = 1;

/// FastCDC 2020 parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub algorithm: ChunkerAlgorithm,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    /// FastCDC normalization level (0..=3).
    pub normalization: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkerAlgorithm {
    #[serde(rename = "fastcdc-2020")]
    FastCdc2020,
}

impl Default for ChunkerParams {
    /// 16 KiB / 32 KiB / 128 KiB: chosen by measurement on 8 KiB-page
    /// database files (see `docs/FORMAT.md`, "Chunk size").
    fn default() -> Self {
        Self {
            algorithm: ChunkerAlgorithm::FastCdc2020,
            min: 16 * 1024,
            avg: 32 * 1024,
            max: 128 * 1024,
            normalization: 1,
        }
    }
}

impl ChunkerParams {
    /// The limits of the fastcdc crate's 2020 variant.
    pub fn validate(&self) -> Result<(), String> {
        if !(64..=1024 * 1024).contains(&self.min) {
            return Err(format!("chunk min {} not in 64..=1MiB", self.min));
        }
        if !(256..=4 * 1024 * 1024).contains(&self.avg) {
            return Err(format!("chunk avg {} not in 256..=4MiB", self.avg));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max) {
            return Err(format!("chunk max {} not in 1KiB..=16MiB", self.max));
        }
        if !(self.min.is_multiple_of(2) && self.avg.is_multiple_of(2) && self.max.is_multiple_of(2))
        {
            return Err("chunk sizes must be even".into());
        }
        if !(self.min <= self.avg && self.avg <= self.max) {
            return Err("chunk sizes must satisfy min <= avg <= max".into());
        }
        if self.normalization > 3 {
            return Err("normalization must be 0..=3".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompressionParams {
    pub algorithm: String,
    pub level: i32,
}

impl Default for CompressionParams {
    /// zstd level 1: near level 3's ratio on mixed volume data at about three
    /// times its speed; in a migration the downtime window is the budget.
    fn default() -> Self {
        Self {
            algorithm: "zstd".into(),
            level: 1,
        }
    }
}

/// What `vault init` may choose; everything else is fixed by the format.
#[derive(Clone, Debug)]
pub struct VaultOptions {
    pub chunker: ChunkerParams,
    pub compression: CompressionParams,
    /// Target pack object size in bytes.
    pub pack_size: u32,
    pub kdf: KdfParams,
}

impl Default for VaultOptions {
    fn default() -> Self {
        Self {
            chunker: ChunkerParams::default(),
            compression: CompressionParams::default(),
            pack_size: 16 * 1024 * 1024,
            kdf: KdfParams::new_default(),
        }
    }
}

impl VaultOptions {
    pub fn validate(&self) -> Result<(), String> {
        self.chunker.validate()?;
        if self.compression.algorithm != "zstd" {
            return Err(format!(
                "unknown compression {:?}",
                self.compression.algorithm
            ));
        }
        if !(1..=19).contains(&self.compression.level) {
            return Err(format!(
                "zstd level {} not in 1..=19",
                self.compression.level
            ));
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.pack_size) {
            return Err(format!("pack size {} not in 1MiB..=1GiB", self.pack_size));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VaultConfig {
    pub format: String,
    pub version: u32,
    /// 128 random bits, hex; names the vault in the catalog.
    pub vault_id: String,
    pub created: String,
    pub chunker: ChunkerParams,
    pub compression: CompressionParams,
    pub pack_size: u32,
    pub id_hash: String,
    pub cipher: String,
    pub kdf: KdfParams,
    /// `nonce || AES-256-GCM(data key || id key)` under the Argon2id key, hex.
    pub keys: String,
}

impl VaultConfig {
    /// Parses a config object and checks every parameter the data path
    /// relies on: a damaged or hostile config is an error, never a panic
    /// deeper in (FastCDC asserts its ranges, pack sizes bound memory).
    pub fn parse(bytes: &[u8]) -> Result<VaultConfig, String> {
        let c: VaultConfig = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        VaultOptions {
            chunker: c.chunker,
            compression: c.compression.clone(),
            pack_size: c.pack_size,
            kdf: c.kdf.clone(),
        }
        .validate()?;
        if c.kdf.m_kib > 4 * 1024 * 1024 || c.kdf.t > 100 || c.kdf.p == 0 || c.kdf.p > 64 {
            return Err("key derivation parameters out of range".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> Vec<u8> {
        let o = VaultOptions::default();
        serde_json::to_vec(&VaultConfig {
            format: "ferry".into(),
            version: 1,
            vault_id: "00".repeat(16),
            created: String::new(),
            chunker: o.chunker,
            compression: o.compression,
            pack_size: o.pack_size,
            id_hash: String::new(),
            cipher: String::new(),
            kdf: o.kdf,
            keys: String::new(),
        })
        .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Fuzzing the config decoder: damaged bytes and out-of-range
        /// numbers are errors; whatever parses builds a chunker safely.
        #[test]
        fn config_decoder_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            min in any::<u32>(), avg in any::<u32>(), max in any::<u32>(), pack in any::<u32>(),
            numbers in any::<bool>(),
        ) {
            let mut b = valid();
            if numbers {
                let mut v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                v["chunker"]["min"] = min.into();
                v["chunker"]["avg"] = avg.into();
                v["chunker"]["max"] = max.into();
                v["pack_size"] = pack.into();
                b = serde_json::to_vec(&v).unwrap();
            }
            for (i, x) in &flips {
                let n = b.len();
                b[i.index(n)] = *x;
            }
            if let Ok(c) = VaultConfig::parse(&b) {
                let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
                let mut total = 0;
                for chunk in crate::chunker::Chunker::new(&data[..], &c.chunker) {
                    total += chunk.unwrap().len();
                }
                prop_assert_eq!(total, data.len());
            }
        }
    }

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        VaultOptions::default().validate().unwrap();
        let mut o = VaultOptions::default();
        o.chunker.avg = 100;
        assert!(o.validate().unwrap_err().contains("avg"));
        let mut o = VaultOptions::default();
        o.chunker.min = 200 * 1024;
        assert!(o.validate().unwrap_err().contains("min <= avg"));
        let o = VaultOptions {
            pack_size: 10,
            ..Default::default()
        };
        assert!(o.validate().unwrap_err().contains("pack size"));
    }
}
