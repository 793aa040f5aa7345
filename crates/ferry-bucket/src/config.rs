//! Named remotes: each bucket endpoint with its own region, credentials and
//! addressing style, so that the two sides of a migration (two clouds) can
//! differ. Read from `--config FILE` or `$XDG_CONFIG_HOME/ferry/config.toml`:
//!
//! ```toml
//! [remotes.oss]
//! endpoint = "https://oss-cn-hangzhou.aliyuncs.com"
//! region = "cn-hangzhou"
//! access_key_id_env = "OSS_ACCESS_KEY_ID"        # names of variables holding them,
//! secret_access_key_env = "OSS_ACCESS_KEY_SECRET"
//! # credentials_file = "/run/secrets/oss"       # or a file: id on line 1, secret on line 2
//! virtual_hosted = true
//! ```
//!
//! Secrets are never written in the file itself unless the user chooses to
//! (`access_key_id` / `secret_access_key`), and never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Remote {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key_env: Option<String>,
    pub session_token_env: Option<String>,
    pub credentials_file: Option<PathBuf>,
    #[serde(default)]
    pub virtual_hosted: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub remotes: BTreeMap<String, Remote>,
}

/// `$XDG_CONFIG_HOME/ferry/config.toml`, else `~/.config/ferry/config.toml`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("ferry/config.toml"))
}

impl Config {
    /// Reads `path`; a missing default file is an empty config.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, required) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match default_path() {
                Some(p) => (p, false),
                None => return Ok(Config::default()),
            },
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(e) => {
                return Err(Error::Config(format!("{}: {e}", path.display())));
            }
        };
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(1);
            Error::Config(format!(
                "{} line {line}: {}",
                path.display(),
                e.message().replace('\n', " ")
            ))
        })
    }
}

/// Static credentials resolved from a remote's settings, if it names any.
pub struct Credentials {
    pub id: String,
    pub secret: String,
    pub token: Option<String>,
}

impl Remote {
    pub fn credentials(&self, name: &str) -> Result<Option<Credentials>> {
        let env = |var: &String| {
            std::env::var(var)
                .map_err(|_| Error::Config(format!("remote {name}: variable {var} is not set")))
        };
        if let Some(f) = &self.credentials_file {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::Config(format!(
                    "remote {name}: credentials file {}: {e}",
                    f.display()
                ))
            })?;
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let (Some(id), Some(secret)) = (lines.next(), lines.next()) else {
                return Err(Error::Config(format!(
                    "remote {name}: credentials file {} needs the key id on line 1 and the secret on line 2",
                    f.display()
                )));
            };
            return Ok(Some(Credentials {
                id: id.into(),
                secret: secret.into(),
                token: lines.next().map(String::from),
            }));
        }
        let id = match (&self.access_key_id, &self.access_key_id_env) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(var)) => Some(env(var)?),
            _ => None,
        };
        let secret = match (&self.secret_access_key, &self.secret_access_key_env) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(var)) => Some(env(var)?),
            _ => None,
        };
        match (id, secret) {
            (Some(id), Some(secret)) => Ok(Some(Credentials {
                id,
                secret,
                token: self.session_token_env.as_ref().map(env).transpose()?,
            })),
            (None, None) => Ok(None),
            _ => Err(Error::Config(format!(
                "remote {name}: give both the access key id and the secret"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_parse_and_resolve_credentials_from_variables_or_files() {
        let d = tempfile::tempdir().unwrap();
        let creds = d.path().join("creds");
        std::fs::write(&creds, "AKID\nSECRET\n").unwrap();
        let cfg = d.path().join("c.toml");
        std::fs::write(
            &cfg,
            format!(
                "[remotes.a]\nendpoint = \"http://127.0.0.1:1\"\ncredentials_file = \"{}\"\n\
                 [remotes.b]\nregion = \"r\"\naccess_key_id_env = \"FERRY_TEST_UNSET_ID\"\nsecret_access_key_env = \"FERRY_TEST_UNSET_SK\"\n",
                creds.display()
            ),
        )
        .unwrap();
        let c = Config::load(Some(&cfg)).unwrap();
        let a = c.remotes["a"].credentials("a").unwrap().unwrap();
        assert_eq!((a.id.as_str(), a.secret.as_str()), ("AKID", "SECRET"));
        let e = c.remotes["b"].credentials("b").err().unwrap().to_string();
        assert!(e.contains("FERRY_TEST_UNSET_ID"), "{e}");

        std::fs::write(&cfg, "[remotes.a]\nendpoit = \"x\"\n").unwrap();
        let e = Config::load(Some(&cfg)).err().unwrap().to_string();
        assert!(e.contains("endpoit"), "{e}");
        assert!(Config::load(Some(&d.path().join("missing.toml"))).is_err());
    }
}
