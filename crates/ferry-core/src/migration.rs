//! A migration as a whole: named source/target pairs, the rounds run for
//! them, the downtime a cutover would take now, and a signed report.
//!
//! The record and its rounds are plain data kept by a [`MigrationStore`]
//! (the catalog: SQLite embedded, or the coordinator's); running the pairs
//! is the caller's job (ferry-cli), with the same snapshot and restore as
//! `ferry sync`. What lives here is what must be the same wherever it
//! runs: the estimate, the off-peak window and the report's signature.

use serde::{Deserialize, Serialize};

use crate::catalog::CatalogResult;

/// A named migration: what moves where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub name: String,
    pub created: String,
    pub pairs: Vec<Pair>,
}

/// One source and the target it moves to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub source: String,
    pub target: String,
    /// The volume its snapshots are saved under.
    pub volume: String,
    pub kind: PairKind,
    /// Fleet mode: the agents that read the source and write the target
    /// (claims are placed on their node's agent when the round runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_agent: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PairKind {
    /// A directory into a directory.
    Dir,
    /// A block device or disk image onto a device or image.
    Block,
    /// A bucket prefix on at least one side.
    Bucket,
    /// A PersistentVolumeClaim on at least one side.
    Claim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundKind {
    Presync,
    Cutover,
}

/// One run over every pair.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Round {
    pub seq: u32,
    pub kind: Option<RoundKind>,
    pub started: String,
    pub started_ns: i64,
    pub duration_s: f64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub pairs: Vec<PairRound>,
    /// The downtime a cutover would have taken right after this round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate_s: Option<f64>,
    /// Cutover only: from the quiesce command's start to the resume
    /// command's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_s: Option<f64>,
    /// Cutover only: quiesce, final delta, verify, resume, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
}

/// A cutover step and how it went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub duration_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What one round did for one pair: the snapshot's and the restore's
/// figures, and their times.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairRound {
    pub source: String,
    pub target: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    pub files: u64,
    /// Bytes of the source read (changed files only, after the first round).
    pub bytes_scanned: u64,
    pub bytes_new: u64,
    /// Bytes written into the target: what changed since the last round.
    pub bytes_written: u64,
    pub files_written: u64,
    pub files_deleted: u64,
    /// Entries the snapshot could not read, or that changed while read
    /// (normal while the application runs; taken again next round).
    #[serde(default)]
    pub warnings: u64,
    /// Bytes of the whole volume.
    pub bytes_total: u64,
    pub snapshot_s: f64,
    pub restore_s: f64,
    pub verify_s: f64,
    /// Entries the restore's verification found different.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatched: Vec<String>,
}

impl PairRound {
    pub fn duration_s(&self) -> f64 {
        self.snapshot_s + self.restore_s
    }
}

/// Keeps migrations and their rounds (the catalog).
pub trait MigrationStore: Send + Sync {
    /// Records a new migration; false when the name is taken.
    fn create_migration(&self, m: &Migration) -> CatalogResult<bool>;
    fn migration(&self, name: &str) -> CatalogResult<Option<Migration>>;
    /// Every round of `name`, oldest first.
    fn rounds(&self, name: &str) -> CatalogResult<Vec<Round>>;
    /// Adds round `r` (its `seq` is the next one).
    fn add_round(&self, name: &str, r: &Round) -> CatalogResult<()>;
}

/// The downtime estimate of one pair, with what it is made of.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PairEstimate {
    pub source: String,
    pub target: String,
    /// Presync rounds that succeeded.
    pub rounds: u32,
    /// Of the last successful round.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_round: Option<String>,
    pub last_delta_bytes: u64,
    pub last_round_s: f64,
    /// Bytes the target received per second, at best (the full copy).
    pub throughput_bps: f64,
    /// The part of a round that does not grow with the change: walking the
    /// volume's metadata, reading changed files, committing.
    pub fixed_s: f64,
    /// Bytes changed per hour between the last two rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change_bytes_per_hour: Option<f64>,
    /// The final delta the cutover would carry, and its time.
    pub final_delta_bytes: u64,
    pub estimate_s: f64,
    pub bytes_total: u64,
    /// Reading the whole target back (`--verify`), at the measured rate.
    pub verify_s: f64,
}

/// The estimate of every pair, and in total.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    pub pairs: Vec<PairEstimate>,
    /// None until every pair has had a presync round.
    pub downtime_s: Option<f64>,
    /// With verification of every pair.
    pub downtime_verified_s: Option<f64>,
    /// Pairs run one after the other (embedded) or at once (agents).
    pub parallel: bool,
}

/// The downtime a cutover would take at `now_ns`, from the rounds so far.
///
/// The model: a round costs `fixed + delta / throughput`. The throughput
/// is the best bytes-per-second the target ever received (the first, full
/// round); the fixed part is what the last round took beyond its own
/// delta at that rate. The delta of a cutover at `now` is the change rate
/// of the last two rounds times the time since the last one started (with
/// a single round, its own delta: a pessimistic guess). Verification reads
/// the whole target at the best read rate seen.
pub fn estimate(m: &Migration, rounds: &[Round], now_ns: i64, parallel: bool) -> Estimate {
    let mut out = Estimate {
        parallel,
        ..Default::default()
    };
    let mut complete = true;
    for (i, pair) in m.pairs.iter().enumerate() {
        let done: Vec<(&Round, &PairRound)> = rounds
            .iter()
            .filter_map(|r| r.pairs.get(i).filter(|p| p.ok).map(|p| (r, p)))
            .collect();
        let mut e = PairEstimate {
            source: pair.source.clone(),
            target: pair.target.clone(),
            rounds: done.len() as u32,
            ..Default::default()
        };
        let Some(&(last_r, last)) = done.last() else {
            complete = false;
            out.pairs.push(e);
            continue;
        };
        e.last_round = Some(last_r.started.clone());
        e.last_delta_bytes = last.bytes_written;
        e.last_round_s = last.duration_s();
        e.bytes_total = last.bytes_total;
        e.throughput_bps = done
            .iter()
            .filter(|(_, p)| p.duration_s() > 0.0)
            .map(|(_, p)| p.bytes_written as f64 / p.duration_s())
            .fold(0.0, f64::max);
        let read_bps = done
            .iter()
            .filter(|(_, p)| p.snapshot_s > 0.0)
            .map(|(_, p)| p.bytes_scanned as f64 / p.snapshot_s)
            .fold(0.0, f64::max);
        let at_rate = |bytes: f64| {
            if e.throughput_bps > 0.0 {
                bytes / e.throughput_bps
            } else {
                0.0
            }
        };
        e.fixed_s = (e.last_round_s - at_rate(last.bytes_written as f64)).max(0.0);
        let delta = if done.len() >= 2 {
            let (prev_r, _) = done[done.len() - 2];
            let interval_s = (last_r.started_ns - prev_r.started_ns) as f64 / 1e9;
            let rate = last.bytes_written as f64 / interval_s.max(1e-3);
            e.change_bytes_per_hour = Some(rate * 3600.0);
            let since_s = ((now_ns - last_r.started_ns) as f64 / 1e9).max(0.0);
            rate * since_s
        } else {
            last.bytes_written as f64
        };
        e.final_delta_bytes = delta.round() as u64;
        e.estimate_s = e.fixed_s + at_rate(delta);
        e.verify_s = if read_bps > 0.0 {
            e.bytes_total as f64 / read_bps
        } else {
            0.0
        };
        out.pairs.push(e);
    }
    if complete && !out.pairs.is_empty() {
        let combine = |f: &dyn Fn(&PairEstimate) -> f64| {
            let v = out.pairs.iter().map(f);
            if parallel {
                v.fold(0.0, f64::max)
            } else {
                v.sum()
            }
        };
        out.downtime_s = Some(combine(&|p| p.estimate_s));
        out.downtime_verified_s = Some(combine(&|p| p.estimate_s + p.verify_s));
    }
    out
}

/// `--until-converged`: another round is worth it while the estimate still
/// shrinks by more than a tenth and by at least half a second.
pub fn converged(previous_s: Option<f64>, now_s: f64) -> bool {
    match previous_s {
        // Less than a tenth, or less than half a second, is not worth a round.
        Some(p) => now_s >= p * 0.9 || p - now_s < 0.5,
        None => false,
    }
}

/// An off-peak window, `HH:MM-HH:MM` in UTC or with an offset
/// (`01:00-05:00+08:00`); it may wrap past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight UTC.
    start: i64,
    end: i64,
}

impl Window {
    pub fn parse(s: &str) -> Result<Window, String> {
        let bad = || {
            format!("--window {s:?}: write HH:MM-HH:MM (UTC), or add an offset: 01:00-05:00+08:00")
        };
        let (range, offset) = match s.get(11..) {
            Some(off) if !off.is_empty() => (&s[..11], off),
            _ => (s, "Z"),
        };
        let offset_min = match offset {
            "Z" | "" => 0,
            o => {
                let sign = match o.as_bytes()[0] {
                    b'+' => 1,
                    b'-' => -1,
                    _ => return Err(bad()),
                };
                sign * hhmm(&o[1..]).ok_or_else(bad)?
            }
        };
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let (a, b) = (hhmm(a).ok_or_else(bad)?, hhmm(b).ok_or_else(bad)?);
        if a == b {
            return Err(format!("--window {s:?}: start and end are the same"));
        }
        Ok(Window {
            start: (a - offset_min).rem_euclid(1440),
            end: (b - offset_min).rem_euclid(1440),
        })
    }

    /// Seconds from `unix_s` until the window opens; 0 inside it.
    pub fn wait_s(&self, unix_s: i64) -> i64 {
        let now = unix_s.rem_euclid(86_400);
        let start = self.start * 60;
        if self.contains(unix_s) {
            0
        } else {
            (start - now).rem_euclid(86_400)
        }
    }

    pub fn contains(&self, unix_s: i64) -> bool {
        let m = unix_s.rem_euclid(86_400) / 60;
        if self.start < self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

fn hhmm(s: &str) -> Option<i64> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// The report's signing key: derived from the vault's data key, so only
/// who can open the vault can sign or check a report.
pub fn report_key(data_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("ferry migration report v1", data_key)
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn mac(key: &[u8; 32], body: &serde_json::Value) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(canonical(body).as_bytes());
    m
}

/// Signs a JSON report: HMAC-SHA256 of its canonical form (keys sorted,
/// no whitespace) without the `signature` field, which it then gets.
pub fn sign(report: &mut serde_json::Value, key: &[u8; 32]) {
    use hmac::Mac;
    if let Some(o) = report.as_object_mut() {
        o.remove("signature");
    }
    let tag = mac(key, report).finalize().into_bytes();
    if let Some(o) = report.as_object_mut() {
        o.insert(
            "signature".into(),
            serde_json::Value::String(format!("hmac-sha256:{}", hex::encode(tag))),
        );
    }
}

/// Checks a signed report; anything changed in it, or another vault's key,
/// fails.
pub fn verify(report: &serde_json::Value, key: &[u8; 32]) -> Result<(), String> {
    use hmac::Mac;
    let sig = report
        .get("signature")
        .and_then(|s| s.as_str())
        .ok_or("the report has no signature")?;
    let given = sig
        .strip_prefix("hmac-sha256:")
        .and_then(|h| hex::decode(h).ok())
        .ok_or("unknown or malformed signature (expected hmac-sha256:HEX)")?;
    let mut body = report.clone();
    if let Some(o) = body.as_object_mut() {
        o.remove("signature");
    }
    // verify_slice compares in constant time.
    mac(key, &body).verify_slice(&given).map_err(|_| {
        "the signature does not match: the report was changed, or signed with another vault's key"
            .to_string()
    })
}

/// Sorted keys, no whitespace: the same bytes for the same report.
fn canonical(v: &serde_json::Value) -> String {
    use serde_json::Value;
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                let mut m = serde_json::Map::new();
                for k in keys {
                    m.insert(k.clone(), sorted(&o[k]));
                }
                Value::Object(m)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// Parses any JSON document and fails on an object that repeats a key.
/// A signed report with a repeated key reads one way to a person (the
/// first value) and another to the signature check (the last one wins):
/// such a report is refused whatever its signature.
pub struct NoRepeatedKeys;

impl<'de> serde::Deserialize<'de> for NoRepeatedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoRepeatedKeysVisitor)
    }
}

struct NoRepeatedKeysVisitor;

impl<'de> serde::de::Visitor<'de> for NoRepeatedKeysVisitor {
    type Value = NoRepeatedKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(NoRepeatedKeys)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<NoRepeatedKeys>()?.is_some() {}
        Ok(NoRepeatedKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "key {key:?} appears twice"
                )));
            }
            map.next_value::<NoRepeatedKeys>()?;
        }
        Ok(NoRepeatedKeys)
    }
}

/// Why these pairs cannot run together, if they cannot: a target that
/// another pair also writes (one `--delete` would remove the other's files),
/// or a target that overlaps a source (each round would copy the copy, or
/// write over what it reads). Places on different agents never overlap;
/// bucket URLs are the same place wherever they are named from.
pub fn conflicts(pairs: &[Pair]) -> Option<String> {
    let is_bucket = |p: &Pair| p.kind == PairKind::Bucket && p.target.contains(':');
    let place = |text: &str, agent: &Option<String>, bucket: bool| {
        let machine = if bucket {
            String::new()
        } else {
            agent.clone().unwrap_or_default()
        };
        (
            machine,
            std::path::PathBuf::from(text.trim_end_matches('/')),
        )
    };
    let overlap = |a: &(String, std::path::PathBuf), b: &(String, std::path::PathBuf)| {
        a.0 == b.0 && (a.1.starts_with(&b.1) || b.1.starts_with(&a.1))
    };
    let targets: Vec<_> = pairs
        .iter()
        .map(|p| place(&p.target, &p.to_agent, is_bucket(p)))
        .collect();
    let sources: Vec<_> = pairs
        .iter()
        .map(|p| place(&p.source, &p.from_agent, p.kind == PairKind::Bucket))
        .collect();
    for (i, t) in targets.iter().enumerate() {
        for (j, u) in targets.iter().enumerate().skip(i + 1) {
            if overlap(t, u) {
                return Some(format!(
                    "pairs {} and {} write into the same place ({} and {}): give each pair a target of its own",
                    i + 1,
                    j + 1,
                    pairs[i].target,
                    pairs[j].target
                ));
            }
        }
        for (j, s) in sources.iter().enumerate() {
            if overlap(t, s) {
                return Some(format!(
                    "the target of pair {} ({}) overlaps the source of pair {} ({}): a round would write over what it reads",
                    i + 1,
                    pairs[i].target,
                    j + 1,
                    pairs[j].source
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_are_found_at_any_depth() {
        let ok = r#"{"a": 1, "b": [{"a": 2}, {"a": 3}], "c": {"a": null}}"#;
        assert!(serde_json::from_str::<NoRepeatedKeys>(ok).is_ok());
        for bad in [
            r#"{"ok": false, "ok": true}"#,
            r#"{"pairs": [{"files": 1, "x": 0, "files": 2}]}"#,
            r#"{"a": {"b": {"c": 1, "c": 1}}}"#,
        ] {
            let e = serde_json::from_str::<NoRepeatedKeys>(bad).err().unwrap();
            assert!(e.to_string().contains("appears twice"), "{bad}: {e}");
        }
    }

    #[test]
    fn pairs_that_share_a_target_or_write_into_a_source_conflict() {
        let pair = |s: &str, t: &str, to_agent: Option<&str>| Pair {
            source: s.into(),
            target: t.into(),
            volume: "v".into(),
            kind: PairKind::Dir,
            from_agent: None,
            to_agent: to_agent.map(String::from),
        };
        let ok = [pair("/a", "/x/a", None), pair("/b", "/x/b", None)];
        assert_eq!(conflicts(&ok), None);
        let same = [pair("/a", "/same", None), pair("/b", "/same/", None)];
        assert!(conflicts(&same).unwrap().contains("pairs 1 and 2"));
        let nested = [pair("/a", "/x", None), pair("/b", "/x/b", None)];
        assert!(conflicts(&nested).unwrap().contains("pairs 1 and 2"));
        let into_own = [pair("/a", "/a", None)];
        assert!(conflicts(&into_own).unwrap().contains("source of pair 1"));
        let into_other = [pair("/a", "/x", None), pair("/b", "/a/sub", None)];
        assert!(conflicts(&into_other).unwrap().contains("source of pair 1"));
        // Look-alike names are not nested.
        let alike = [pair("/a", "/xy", None), pair("/b", "/x", None)];
        assert_eq!(conflicts(&alike), None);
        // The same path on two agents is two places.
        let agents = [pair("/a", "/t", Some("n1")), pair("/b", "/t", Some("n2"))];
        assert_eq!(conflicts(&agents), None);
        let one_agent = [pair("/a", "/t", Some("n1")), pair("/b", "/t", Some("n1"))];
        assert!(conflicts(&one_agent).is_some());
    }

    fn pr(written: u64, scanned: u64, snap_s: f64, rest_s: f64) -> PairRound {
        PairRound {
            ok: true,
            bytes_written: written,
            bytes_scanned: scanned,
            bytes_total: 1000,
            snapshot_s: snap_s,
            restore_s: rest_s,
            ..Default::default()
        }
    }

    fn round(seq: u32, at_s: i64, pairs: Vec<PairRound>) -> Round {
        Round {
            seq,
            started_ns: at_s * 1_000_000_000,
            ok: true,
            pairs,
            ..Default::default()
        }
    }

    fn mig(n: usize) -> Migration {
        Migration {
            name: "m".into(),
            created: String::new(),
            pairs: (0..n)
                .map(|i| Pair {
                    source: format!("s{i}"),
                    target: format!("t{i}"),
                    volume: format!("v{i}"),
                    kind: PairKind::Dir,
                    from_agent: None,
                    to_agent: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_estimate_is_fixed_cost_plus_the_expected_delta_at_the_full_copy_rate() {
        let m = mig(1);
        // Full copy: 1000 bytes in 10 s (100 B/s). Then 100 bytes changed
        // in the 3600 s between rounds; that round took 3 s.
        let rounds = vec![
            round(1, 0, vec![pr(1000, 1000, 5.0, 5.0)]),
            round(2, 3600, vec![pr(100, 500, 2.0, 1.0)]),
        ];
        // Right after round 2 started + 1800 s: half an interval of change.
        let e = estimate(&m, &rounds, 5400 * 1_000_000_000, false);
        let p = &e.pairs[0];
        assert_eq!(p.throughput_bps, 100.0);
        assert!((p.fixed_s - 2.0).abs() < 1e-9, "{p:?}"); // 3 s - 100 B at 100 B/s
        assert_eq!(p.change_bytes_per_hour, Some(100.0));
        assert_eq!(p.final_delta_bytes, 50);
        assert!((p.estimate_s - 2.5).abs() < 1e-9, "{p:?}");
        // Verify reads 1000 bytes at the best read rate (round 2's 250 B/s).
        assert!((p.verify_s - 4.0).abs() < 1e-9, "{p:?}");
        assert_eq!(e.downtime_s, Some(p.estimate_s));

        // A single round: its own delta, pessimistic.
        let e = estimate(&m, &rounds[..1], 0, false);
        assert!((e.pairs[0].estimate_s - 10.0).abs() < 1e-9);
        // No round: no estimate.
        assert_eq!(estimate(&m, &[], 0, false).downtime_s, None);
    }

    #[test]
    fn pairs_add_up_one_after_the_other_or_overlap_on_agents() {
        let m = mig(2);
        let rounds = vec![round(
            1,
            0,
            vec![pr(1000, 1000, 5.0, 5.0), pr(1000, 1000, 2.0, 2.0)],
        )];
        let seq = estimate(&m, &rounds, 0, false).downtime_s.unwrap();
        let par = estimate(&m, &rounds, 0, true).downtime_s.unwrap();
        assert!((seq - 14.0).abs() < 1e-9, "{seq}");
        assert!((par - 10.0).abs() < 1e-9, "{par}");
        // A pair whose round failed has no estimate yet.
        let mut bad = rounds.clone();
        bad[0].pairs[1].ok = false;
        assert_eq!(estimate(&m, &bad, 0, false).downtime_s, None);
    }

    #[test]
    fn convergence_is_when_the_estimate_stops_shrinking() {
        assert!(!converged(None, 5.0));
        assert!(!converged(Some(10.0), 5.0));
        assert!(converged(Some(10.0), 9.5));
        assert!(converged(Some(10.0), 12.0));
        assert!(
            converged(Some(0.4), 0.1),
            "sub-second gains are not worth a round"
        );
    }

    #[test]
    fn windows_wrap_midnight_and_take_offsets() {
        let at = |h: i64, m: i64| h * 3600 + m * 60;
        let w = Window::parse("22:00-02:00").unwrap();
        assert!(w.contains(at(23, 0)) && w.contains(at(1, 59)));
        assert!(!w.contains(at(2, 0)) && !w.contains(at(12, 0)));
        assert_eq!(w.wait_s(at(21, 0)), 3600);
        assert_eq!(w.wait_s(at(3, 0)), 19 * 3600);
        assert_eq!(w.wait_s(at(23, 0)), 0);
        // 01:00-05:00 at +08:00 is 17:00-21:00 UTC.
        let w = Window::parse("01:00-05:00+08:00").unwrap();
        assert!(w.contains(at(18, 0)) && !w.contains(at(2, 0)));
        for bad in [
            "1:00-2:00",
            "25:00-02:00",
            "01:00",
            "01:00-01:00",
            "01:00-02:00x",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_signed_report_fails_when_changed_or_checked_with_another_key() {
        let key = report_key(&[7u8; 32]);
        let mut r = serde_json::json!({"migration": "m", "pairs": [{"files": 3, "ok": true}]});
        sign(&mut r, &key);
        assert!(verify(&r, &key).is_ok());
        // Key order does not matter; content does.
        let reordered: serde_json::Value =
            serde_json::from_str(&r.to_string().replace("\"migration\":\"m\",", "")).unwrap();
        let mut reordered = reordered;
        reordered["migration"] = "m".into();
        assert!(verify(&reordered, &key).is_ok());
        let mut changed = r.clone();
        changed["pairs"][0]["files"] = 4.into();
        assert!(
            verify(&changed, &key)
                .unwrap_err()
                .contains("does not match")
        );
        assert!(verify(&r, &report_key(&[8u8; 32])).is_err());
        let mut unsigned = r.clone();
        unsigned.as_object_mut().unwrap().remove("signature");
        assert!(verify(&unsigned, &key).is_err());
    }
}
