//! Content ids.
//!
//! A blob id is BLAKE3 keyed with the vault's secret id key: equal content
//! gives equal ids inside one vault (that is the dedup), while someone who
//! holds the bucket but not the key cannot test a guess of the content.
//! Pack ids are the plain BLAKE3 of the whole pack object, so anyone can
//! check a pack's integrity without keys.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! hash_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("A 32-byte ", $what, " id, shown as 64 hex digits.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            pub fn from_hex(s: &str) -> Option<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).ok()?;
                Some(Self(out))
            }

            pub fn from_slice(b: &[u8]) -> Option<Self> {
                Some(Self(b.try_into().ok()?))
            }

            /// The first 8 hex digits, for messages.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                // On the stack: trees serialize an id per chunk.
                let mut buf = [0u8; 64];
                hex::encode_to_slice(self.0, &mut buf).expect("64 digits for 32 bytes");
                s.serialize_str(std::str::from_utf8(&buf).expect("hex digits are ASCII"))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(concat!("a ", $what, " id (64 hex digits)"))
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::from_hex(v).ok_or_else(|| E::custom(concat!("bad ", $what, " id")))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

hash_id!(BlobId, "blob");
hash_id!(PackId, "pack");

impl PackId {
    pub fn of(bytes: &[u8]) -> Self {
        PackId(*blake3::hash(bytes).as_bytes())
    }
}

/// What a blob holds; part of its authenticated data, so a tree cannot be
/// passed off as file data or the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    Data,
    Tree,
}

impl BlobKind {
    pub fn code(self) -> u8 {
        match self {
            BlobKind::Data => 0,
            BlobKind::Tree => 1,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

/// Computes blob ids with the vault's id key.
#[derive(Clone)]
pub struct IdHasher {
    key: [u8; 32],
}

impl IdHasher {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub fn id(&self, data: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.key, data).as_bytes())
    }
}

/// 16 hex digits of the plain BLAKE3 of `data`: short, stable names.
pub fn short_hash(data: &[u8]) -> String {
    hex::encode(&blake3::hash(data).as_bytes()[..8])
}

/// A random 128-bit id as 32 hex digits (snapshots, index objects).
pub fn random_hex_id() -> String {
    let mut b = [0u8; 16];
    crate::keys::fill_random(&mut b);
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_differ_between_keys() {
        let a = IdHasher::new([1; 32]).id(b"hello");
        let b = IdHasher::new([2; 32]).id(b"hello");
        assert_ne!(a, b);
        assert_eq!(a, IdHasher::new([1; 32]).id(b"hello"));
        assert_ne!(a.0, *blake3::hash(b"hello").as_bytes());
    }

    #[test]
    fn hex_round_trip() {
        let a = IdHasher::new([7; 32]).id(b"x");
        assert_eq!(BlobId::from_hex(&a.to_hex()), Some(a));
        assert_eq!(BlobId::from_hex("zz"), None);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<BlobId>(&json).unwrap(), a);
    }
}
