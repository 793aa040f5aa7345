//! Where a bucket sync reads or writes: `s3://bucket/prefix` (the standard
//! `AWS_*` variables), `REMOTE:bucket/prefix` (a named remote), or a local
//! directory.

use std::path::PathBuf;

use crate::config::{Config, Remote};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    S3 {
        /// The remote's name; `None` for `s3://` (the `AWS_*` variables).
        remote: Option<String>,
        bucket: String,
        /// Empty, or ends with `/`.
        prefix: String,
    },
    Local(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::S3 {
                remote: None,
                bucket,
                prefix,
            } => write!(f, "s3://{bucket}/{prefix}"),
            Location::S3 {
                remote: Some(r),
                bucket,
                prefix,
            } => write!(f, "{r}:{bucket}/{prefix}"),
            Location::Local(p) => write!(f, "{}", p.display()),
        }
    }
}

fn bucket_and_prefix(s: &str, whole: &str) -> Result<(String, String)> {
    let (bucket, prefix) = s.split_once('/').unwrap_or((s, ""));
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        return Err(Error::Config(format!(
            "{whole}: bucket names are 3-63 characters of a-z, 0-9, '-' and '.'"
        )));
    }
    let prefix = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_string()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.into(), prefix))
}

impl Location {
    pub fn parse(s: &str, config: &Config) -> Result<Location> {
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_and_prefix(rest, s)?;
            return Ok(Location::S3 {
                remote: None,
                bucket,
                prefix,
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            return Ok(Location::Local(rest.into()));
        }
        // REMOTE:bucket/prefix, unless it looks like a path.
        if let Some((name, rest)) = s.split_once(':')
            && !name.is_empty()
            && !name.contains('/')
        {
            if !config.remotes.contains_key(name) {
                return Err(Error::Config(format!(
                    "{s}: no remote named {name:?} in the config file (known: {})",
                    if config.remotes.is_empty() {
                        "none".to_string()
                    } else {
                        config
                            .remotes
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                )));
            }
            let (bucket, prefix) = bucket_and_prefix(rest, s)?;
            return Ok(Location::S3 {
                remote: Some(name.into()),
                bucket,
                prefix,
            });
        }
        Ok(Location::Local(s.into()))
    }

    /// Whether one holds the other (or they are the same): syncing between
    /// them would copy the copy again on every run, or delete what it
    /// reads. Two remotes are taken to be two stores (their endpoints may
    /// still be one; that cannot be told from here).
    pub fn overlaps(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Local(a), Location::Local(b)) => {
                let (a, b) = (
                    ferry_core::placement::resolve(a),
                    ferry_core::placement::resolve(b),
                );
                a.starts_with(&b) || b.starts_with(&a)
            }
            (
                Location::S3 {
                    remote: r1,
                    bucket: b1,
                    prefix: p1,
                },
                Location::S3 {
                    remote: r2,
                    bucket: b2,
                    prefix: p2,
                },
            ) => {
                r1 == r2 && b1 == b2 && (p1.starts_with(p2.as_str()) || p2.starts_with(p1.as_str()))
            }
            _ => false,
        }
    }

    /// The remote settings of an S3 location (defaults for `s3://`).
    pub fn remote<'a>(&self, config: &'a Config) -> Option<&'a Remote> {
        match self {
            Location::S3 {
                remote: Some(r), ..
            } => config.remotes.get(r),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_locations() {
        let mut c = Config::default();
        c.remotes.insert("oss".into(), Remote::default());
        c.remotes.insert("obs".into(), Remote::default());
        let l = |s: &str| Location::parse(s, &c).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = |s: &str| d.path().join(s).display().to_string();
        assert!(l(&p("src")).overlaps(&l(&p("src/copy"))));
        assert!(l(&p("src/copy")).overlaps(&l(&p("src"))));
        assert!(l(&p("src")).overlaps(&l(&p("src"))));
        assert!(!l(&p("src")).overlaps(&l(&p("src2"))));
        assert!(l("oss:bkt/a/").overlaps(&l("oss:bkt/a/b")));
        assert!(l("oss:bkt").overlaps(&l("oss:bkt/a")));
        assert!(!l("oss:bkt/a").overlaps(&l("oss:bkt/ab")));
        assert!(!l("oss:bkt/a").overlaps(&l("obs:bkt/a")));
        assert!(!l("oss:bkt/a").overlaps(&l("oss:other/a")));
        assert!(!l("s3://bkt/a").overlaps(&l(&p("bkt/a"))));
    }

    #[test]
    fn locations() {
        let mut c = Config::default();
        c.remotes.insert("oss".into(), Remote::default());
        assert_eq!(
            Location::parse("s3://my-bucket/a/b", &c).unwrap(),
            Location::S3 {
                remote: None,
                bucket: "my-bucket".into(),
                prefix: "a/b/".into()
            }
        );
        assert_eq!(
            Location::parse("oss:dst-bucket", &c).unwrap(),
            Location::S3 {
                remote: Some("oss".into()),
                bucket: "dst-bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            Location::parse("/data/x", &c).unwrap(),
            Location::Local("/data/x".into())
        );
        assert!(
            Location::parse("cos:bucket", &c)
                .unwrap_err()
                .to_string()
                .contains("no remote named")
        );
        assert!(Location::parse("s3://B", &c).is_err());
    }
}
