//! Forget: drop snapshot records by policy. Their data stays until
//! `prune` proves it unreferenced.

use std::time::Duration;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::manifest::SnapshotRecord;
use crate::vault::Vault;

/// Which snapshots of a volume to keep. A snapshot is kept if any rule
/// keeps it; with no rule, only an explicit id is forgotten.
#[derive(Clone, Debug, Default)]
pub struct KeepPolicy {
    pub last: Option<usize>,
    pub within: Option<Duration>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ForgetSummary {
    pub kept: Vec<String>,
    pub forgotten: Vec<String>,
    pub dry_run: bool,
}

/// Chooses the snapshots of `spec` (`NAME` or `NAME@ID`) to forget.
pub fn plan(
    all: &[SnapshotRecord],
    spec: &str,
    policy: &KeepPolicy,
    now_ns: i64,
) -> Result<(Vec<SnapshotRecord>, Vec<SnapshotRecord>)> {
    let (volume, id) = match spec.split_once('@') {
        Some((v, id)) => (v, Some(id)),
        None => (spec, None),
    };
    let mut of_volume: Vec<SnapshotRecord> =
        all.iter().filter(|s| s.volume == volume).cloned().collect();
    if of_volume.is_empty() {
        return Err(Error::NoSnapshot { spec: spec.into() });
    }
    of_volume.sort_by_key(|s| std::cmp::Reverse(s.time_ns));
    if let Some(prefix) = id {
        if policy.last.is_some() || policy.within.is_some() {
            return Err(Error::Invalid(
                "give either NAME@ID or a --keep-* policy, not both".into(),
            ));
        }
        let (forget, keep): (Vec<_>, Vec<_>) = of_volume
            .into_iter()
            .partition(|s| s.id.starts_with(prefix));
        return match forget.len() {
            0 => Err(Error::NoSnapshot { spec: spec.into() }),
            1 => Ok((keep, forget)),
            _ => Err(Error::AmbiguousSnapshot { spec: spec.into() }),
        };
    }
    if policy.last.is_none() && policy.within.is_none() {
        return Err(Error::Invalid(format!(
            "say what to keep of {volume}: --keep-last N and/or --keep-within DURATION (or forget one snapshot: {volume}@ID)"
        )));
    }
    let (mut keep, mut forget) = (Vec::new(), Vec::new());
    for (i, s) in of_volume.into_iter().enumerate() {
        let by_count = policy.last.is_some_and(|n| i < n);
        let by_age = policy
            .within
            .is_some_and(|d| i128::from(now_ns) - i128::from(s.time_ns) <= d.as_nanos() as i128);
        if by_count || by_age {
            keep.push(s);
        } else {
            forget.push(s);
        }
    }
    Ok((keep, forget))
}

/// Deletes the records of `forget` from the vault, then from the catalog.
pub async fn forget(
    vault: &Vault,
    catalog: &dyn Catalog,
    keep: &[SnapshotRecord],
    forget: &[SnapshotRecord],
    dry_run: bool,
) -> Result<ForgetSummary> {
    if !dry_run {
        for s in forget {
            vault.delete(&format!("snapshots/{}", s.id)).await?;
        }
        let ids: Vec<String> = forget.iter().map(|s| s.id.clone()).collect();
        catalog.remove_snapshots(&ids)?;
    }
    Ok(ForgetSummary {
        kept: keep.iter().map(|s| s.id.clone()).collect(),
        forgotten: forget.iter().map(|s| s.id.clone()).collect(),
        dry_run,
    })
}

/// Now, in nanoseconds since the epoch (snapshot times are in these).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Parses `30m`, `12h`, `7d`, `2w`, `1y`, or combinations like `1d12h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("bad duration {s:?} (e.g. 7d, 12h, 1d12h)"))?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(format!("bad unit {c:?} in {s:?} (use s, m, h, d, w, y)")),
        };
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("duration {s:?} too large"))?;
    }
    if !num.is_empty() || total == 0 {
        return Err(format!("bad duration {s:?} (e.g. 7d, 12h, 1d12h)"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A snapshot record with only what tests look at.
    pub(crate) fn snap(id: &str, volume: &str, t: i64) -> SnapshotRecord {
        serde_json::from_value(serde_json::json!({
            "id": id, "volume": volume, "time": "", "time_ns": t,
            "root": "00".repeat(32),
            "root_node": {"name": ".", "type": "dir", "subtree": "00".repeat(32),
                          "mode": 0, "uid": 0, "gid": 0, "mtime_ns": 0, "ctime_ns": 0, "inode": 0},
            "host": "h", "source": "/", "files": 0, "dirs": 0, "bytes": 0,
            "incomplete": false, "warnings": 0
        }))
        .unwrap()
    }

    #[test]
    fn policies_keep_the_newest_and_the_recent() {
        let day = 86_400 * 1_000_000_000i64;
        let now = 100 * day;
        let all: Vec<_> = (0..10)
            .map(|i| snap(&format!("s{i}"), "db", now - (9 - i) * day))
            .chain([snap("other", "web", 0)])
            .collect();
        let ids = |v: &[SnapshotRecord]| v.iter().map(|s| s.id.clone()).collect::<Vec<_>>();

        let (keep, forget) = plan(
            &all,
            "db",
            &KeepPolicy {
                last: Some(3),
                within: None,
            },
            now,
        )
        .unwrap();
        assert_eq!(ids(&keep), ["s9", "s8", "s7"]);
        assert_eq!(forget.len(), 7);
        assert!(forget.iter().all(|s| s.volume == "db"));

        let p = KeepPolicy {
            last: Some(1),
            within: Some(Duration::from_secs(86_400 * 4)),
        };
        let (keep, _) = plan(&all, "db", &p, now).unwrap();
        assert_eq!(ids(&keep), ["s9", "s8", "s7", "s6", "s5"]);

        // A span longer than i64 nanoseconds (292 years) keeps everything:
        // it once wrapped around and forgot every snapshot.
        for years in [293, 1000, 100_000] {
            let p = KeepPolicy {
                last: None,
                within: Some(parse_duration(&format!("{years}y")).unwrap()),
            };
            let (keep, forget) = plan(&all, "db", &p, now).unwrap();
            assert_eq!((keep.len(), forget.len()), (10, 0), "{years}y");
        }

        let (keep, forget) = plan(&all, "db@s3", &KeepPolicy::default(), now).unwrap();
        assert_eq!(ids(&forget), ["s3"]);
        assert_eq!(keep.len(), 9);

        assert!(
            plan(&all, "db", &KeepPolicy::default(), now).is_err(),
            "no policy"
        );
        assert!(
            plan(
                &all,
                "nope",
                &KeepPolicy {
                    last: Some(1),
                    within: None
                },
                now
            )
            .is_err()
        );
        assert!(plan(&all, "db@zz", &KeepPolicy::default(), now).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("d").is_err());
        assert!(parse_duration("7x").is_err());
        assert!(parse_duration("0d").is_err());
    }
}
