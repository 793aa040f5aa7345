//! Between the gRPC messages and ferry-core's types. Everything arriving
//! off the wire is checked: a malformed id or record is an error, not a
//! panic.

use ferry_core::catalog::BlobLocation;
use ferry_core::id::{BlobId, BlobKind, PackId};
use ferry_core::manifest::SnapshotRecord;
use ferry_core::pack::{PackEntry, PackRecord};

use crate::proto;

pub type Bad = String;

pub fn ids_to_bytes(ids: &[BlobId]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ids.len() * 32);
    for id in ids {
        v.extend_from_slice(&id.0);
    }
    v
}

pub fn ids_from_bytes(b: &[u8]) -> Result<Vec<BlobId>, Bad> {
    if !b.len().is_multiple_of(32) {
        return Err(format!(
            "id list of {} bytes is not a multiple of 32",
            b.len()
        ));
    }
    Ok(b.chunks_exact(32)
        .map(|c| BlobId::from_slice(c).expect("32 bytes"))
        .collect())
}

pub fn blob_id(b: &[u8]) -> Result<BlobId, Bad> {
    BlobId::from_slice(b).ok_or_else(|| format!("bad blob id of {} bytes", b.len()))
}

pub fn pack_id(b: &[u8]) -> Result<PackId, Bad> {
    PackId::from_slice(b).ok_or_else(|| format!("bad pack id of {} bytes", b.len()))
}

fn salt(b: &[u8]) -> Result<[u8; 32], Bad> {
    b.try_into()
        .map_err(|_| format!("bad pack salt of {} bytes", b.len()))
}

pub fn entry_to_proto(e: &PackEntry) -> proto::PackEntry {
    proto::PackEntry {
        kind: u32::from(e.kind.code()),
        id: e.id.0.to_vec(),
        index: e.index,
        offset: e.offset,
        stored_len: e.stored_len,
        raw_len: e.raw_len,
        compressed: e.compressed,
    }
}

pub fn entry_from_proto(e: &proto::PackEntry) -> Result<PackEntry, Bad> {
    let kind = u8::try_from(e.kind)
        .ok()
        .and_then(BlobKind::from_code)
        .ok_or_else(|| format!("bad blob kind {}", e.kind))?;
    Ok(PackEntry {
        kind,
        id: blob_id(&e.id)?,
        index: e.index,
        offset: e.offset,
        stored_len: e.stored_len,
        raw_len: e.raw_len,
        compressed: e.compressed,
    })
}

pub fn pack_to_proto(p: &PackRecord) -> Result<proto::PackRecord, Bad> {
    let salt = hex::decode(&p.salt).map_err(|_| format!("pack {}: bad salt", p.id))?;
    Ok(proto::PackRecord {
        id: p.id.0.to_vec(),
        size: p.size,
        salt,
        blobs: p.blobs.iter().map(entry_to_proto).collect(),
    })
}

pub fn pack_from_proto(p: &proto::PackRecord) -> Result<PackRecord, Bad> {
    Ok(PackRecord {
        id: pack_id(&p.id)?,
        size: p.size,
        salt: hex::encode(salt(&p.salt)?),
        blobs: p
            .blobs
            .iter()
            .map(entry_from_proto)
            .collect::<Result<_, _>>()?,
    })
}

pub fn location_to_proto(l: Option<BlobLocation>) -> proto::Location {
    match l {
        None => proto::Location::default(),
        Some(l) => proto::Location {
            found: true,
            pack: l.pack.0.to_vec(),
            salt: l.salt.to_vec(),
            entry: Some(entry_to_proto(&l.entry)),
        },
    }
}

pub fn location_from_proto(l: &proto::Location) -> Result<Option<BlobLocation>, Bad> {
    if !l.found {
        return Ok(None);
    }
    let entry = l.entry.as_ref().ok_or("location without an entry")?;
    Ok(Some(BlobLocation {
        pack: pack_id(&l.pack)?,
        salt: salt(&l.salt)?,
        entry: entry_from_proto(entry)?,
    }))
}

pub fn snapshot_to_proto(s: &SnapshotRecord) -> Result<proto::SnapshotMsg, Bad> {
    Ok(proto::SnapshotMsg {
        record_json: serde_json::to_string(s).map_err(|e| e.to_string())?,
    })
}

pub fn snapshot_from_proto(s: &proto::SnapshotMsg) -> Result<SnapshotRecord, Bad> {
    serde_json::from_str(&s.record_json).map_err(|e| format!("bad snapshot record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_locations_round_trip_and_bad_ids_are_errors() {
        let rec = PackRecord {
            id: PackId([7; 32]),
            size: 99,
            salt: hex::encode([3u8; 32]),
            blobs: vec![PackEntry {
                kind: BlobKind::Tree,
                id: BlobId([9; 32]),
                index: 2,
                offset: 40,
                stored_len: 50,
                raw_len: 70,
                compressed: true,
            }],
        };
        let back = pack_from_proto(&pack_to_proto(&rec).unwrap()).unwrap();
        assert_eq!(back, rec);
        let loc = BlobLocation {
            pack: rec.id,
            salt: [3; 32],
            entry: rec.blobs[0].clone(),
        };
        let p = location_to_proto(Some(loc.clone()));
        assert_eq!(location_from_proto(&p).unwrap(), Some(loc));
        assert_eq!(location_from_proto(&location_to_proto(None)).unwrap(), None);

        let ids = vec![BlobId([1; 32]), BlobId([2; 32])];
        assert_eq!(ids_from_bytes(&ids_to_bytes(&ids)).unwrap(), ids);
        assert!(ids_from_bytes(&[0; 33]).is_err());
        let mut bad = pack_to_proto(&rec).unwrap();
        bad.blobs[0].kind = 7;
        assert!(pack_from_proto(&bad).is_err());
        bad.blobs[0].kind = 0;
        bad.salt.pop();
        assert!(pack_from_proto(&bad).is_err());
    }
}
