//! Reaching the API server: a kubeconfig (`--kubeconfig`, `KUBECONFIG`,
//! `~/.kube/config`: its current context's server, CA, and a token, a
//! client certificate or an exec credential plugin) or, inside a pod, the
//! service account.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{Error, Result};

pub struct Kube {
    server: String,
    token: TokenSource,
    http: reqwest::Client,
    /// The context's namespace (`default` if none).
    pub namespace: String,
}

/// Shows where, never the credentials.
impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube")
            .field("server", &self.server)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct KubeConfig {
    clusters: Vec<Named<Cluster>>,
    users: Vec<Named<User>>,
    contexts: Vec<Named<Context>>,
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority_data: Option<String>,
    certificate_authority: Option<PathBuf>,
    insecure_skip_tls_verify: bool,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key_data: Option<String>,
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    exec: Option<Exec>,
}

/// A credential plugin (`aws eks get-token`, `kubelogin`, cloud CLIs): its
/// `ExecCredential` answer gives a token or a client certificate. A token
/// is fetched again before its `expirationTimestamp` and after a 401 (an
/// EKS token lasts 15 minutes; a cutover can last longer).
#[derive(Deserialize, Default, Clone)]
#[serde(default, rename_all = "camelCase")]
struct Exec {
    api_version: String,
    command: String,
    args: Vec<String>,
    env: Option<Vec<ExecEnv>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct ExecEnv {
    name: String,
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ExecStatus {
    token: Option<String>,
    client_certificate_data: Option<String>,
    client_key_data: Option<String>,
    expiration_timestamp: Option<String>,
}

/// What a plugin answered: a token (with its expiry, when it gave one) or
/// a PEM identity.
struct ExecAnswer {
    token: Option<String>,
    expires: Option<SystemTime>,
    identity: Option<Vec<u8>>,
}

/// Runs the plugin. Its stderr is passed through (plugins prompt or
/// explain there); its stdout is the credential and is never logged.
fn run_exec(e: &Exec, base: &Path) -> Result<ExecAnswer> {
    if e.command.is_empty() {
        return Err(cfg("exec plugin without a command"));
    }
    let api = if e.api_version.is_empty() {
        "client.authentication.k8s.io/v1"
    } else {
        e.api_version.as_str()
    };
    // A relative command with a slash is relative to the kubeconfig.
    let cmd = if e.command.contains('/') && !Path::new(&e.command).is_absolute() {
        base.join(&e.command).display().to_string()
    } else {
        e.command.clone()
    };
    let mut c = std::process::Command::new(&cmd);
    c.args(&e.args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .env(
            "KUBERNETES_EXEC_INFO",
            format!(
                r#"{{"apiVersion":"{api}","kind":"ExecCredential","spec":{{"interactive":false}}}}"#
            ),
        );
    for v in e.env.iter().flatten() {
        c.env(&v.name, &v.value);
    }
    let out = c
        .output()
        .map_err(|err| cfg(format!("exec plugin {cmd}: {err}")))?;
    if !out.status.success() {
        return Err(cfg(format!("exec plugin {cmd} failed ({})", out.status)));
    }
    #[derive(Deserialize)]
    struct Answer {
        status: ExecStatus,
    }
    let a: Answer = serde_json::from_slice(&out.stdout).map_err(|err| {
        cfg(format!(
            "exec plugin {cmd}: its output is not an ExecCredential: {err}"
        ))
    })?;
    let identity = match (a.status.client_certificate_data, a.status.client_key_data) {
        (Some(c), Some(k)) => Some(format!("{c}\n{k}").into_bytes()),
        _ => None,
    };
    if a.status.token.is_none() && identity.is_none() {
        return Err(cfg(format!(
            "exec plugin {cmd} gave neither a token nor a client certificate"
        )));
    }
    // RFC 3339 in UTC, as plugins write it; one we cannot read leaves the
    // token to be refreshed on a 401 only.
    let expires = a
        .status
        .expiration_timestamp
        .as_deref()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    Ok(ExecAnswer {
        token: a.status.token,
        expires,
        identity,
    })
}

/// A token is fetched again this long before it expires, so that a
/// request never leaves with one that lapses on the way.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// A token file is read again after this long: the kubelet rotates a pod's
/// projected service-account token in place (client-go re-reads it too).
const TOKEN_FILE_TTL: Duration = Duration::from_secs(60);

/// Where the bearer token comes from. Only a literal token is fixed; the
/// others are refreshed as they age and once after a 401.
enum TokenSource {
    None,
    Fixed(String),
    File {
        path: PathBuf,
        cached: Mutex<(String, Instant)>,
    },
    Exec {
        exec: Exec,
        base: PathBuf,
        /// Names the kubeconfig and user in errors.
        label: String,
        cached: Mutex<(String, Option<SystemTime>)>,
    },
}

fn read_token(p: &Path) -> Result<String> {
    Ok(String::from_utf8_lossy(&read(p)?).trim().to_string())
}

impl TokenSource {
    fn file(path: PathBuf) -> Result<Self> {
        let t = read_token(&path)?;
        Ok(Self::File {
            path,
            cached: Mutex::new((t, Instant::now())),
        })
    }

    /// The token to send; `stale` after a 401 forces a new one.
    async fn get(&self, stale: bool) -> Result<Option<String>> {
        match self {
            Self::None => Ok(None),
            Self::Fixed(t) => Ok(Some(t.clone())),
            Self::File { path, cached } => {
                {
                    let c = cached.lock().unwrap_or_else(|p| p.into_inner());
                    if !stale && c.1.elapsed() < TOKEN_FILE_TTL {
                        return Ok(Some(c.0.clone()));
                    }
                }
                let t = read_token(path)?;
                *cached.lock().unwrap_or_else(|p| p.into_inner()) = (t.clone(), Instant::now());
                Ok(Some(t))
            }
            Self::Exec {
                exec,
                base,
                label,
                cached,
            } => {
                {
                    let c = cached.lock().unwrap_or_else(|p| p.into_inner());
                    let fresh =
                        c.1.is_none_or(|exp| SystemTime::now() + EXPIRY_MARGIN < exp);
                    if !stale && fresh {
                        return Ok(Some(c.0.clone()));
                    }
                }
                let (e, b) = (exec.clone(), base.clone());
                let a = tokio::task::spawn_blocking(move || run_exec(&e, &b))
                    .await
                    .map_err(|e| cfg(format!("{label}: exec plugin: {e}")))?
                    .map_err(|e| cfg(format!("{label}: {e}")))?;
                let t = a.token.ok_or_else(|| {
                    cfg(format!("{label}: the exec plugin no longer gives a token"))
                })?;
                *cached.lock().unwrap_or_else(|p| p.into_inner()) = (t.clone(), a.expires);
                Ok(Some(t))
            }
        }
    }

    /// The token held now, without renewing it.
    #[cfg(test)]
    fn held(&self) -> Option<String> {
        match self {
            Self::None => None,
            Self::Fixed(t) => Some(t.clone()),
            Self::File { cached, .. } => Some(cached.lock().unwrap().0.clone()),
            Self::Exec { cached, .. } => Some(cached.lock().unwrap().0.clone()),
        }
    }

    /// Whether asking again can give another token.
    fn renewable(&self) -> bool {
        matches!(self, Self::File { .. } | Self::Exec { .. })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Context {
    cluster: String,
    user: String,
    namespace: Option<String>,
}

const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn cfg(e: impl std::fmt::Display) -> Error {
    Error::Config(e.to_string())
}

fn read(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| cfg(format!("{}: {e}", p.display())))
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| cfg(format!("{what}: not base64: {e}")))
}

impl Kube {
    /// The kubeconfig at `path`, else `KUBECONFIG`, else `~/.kube/config`,
    /// else the pod's service account.
    pub fn new(path: Option<&Path>) -> Result<Self> {
        if let Some(p) = path {
            return Self::from_kubeconfig(p);
        }
        if let Some(p) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
            // The first file of a list.
            let first = std::env::split_paths(&p).next().unwrap_or_default();
            return Self::from_kubeconfig(&first);
        }
        if let Some(home) = std::env::var_os("HOME") {
            let p = Path::new(&home).join(".kube/config");
            if p.exists() {
                return Self::from_kubeconfig(&p);
            }
        }
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
            return Self::in_cluster();
        }
        Err(cfg(
            "no kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config) and not inside a pod",
        ))
    }

    pub fn from_kubeconfig(path: &Path) -> Result<Self> {
        let text = read(path)?;
        let kc: KubeConfig = serde_yaml_ng::from_slice(&text)
            .map_err(|e| cfg(format!("{}: {e}", path.display())))?;
        let ctx = kc
            .contexts
            .iter()
            .find(|c| c.name == kc.current_context)
            .ok_or_else(|| {
                cfg(format!(
                    "{}: no context {:?} (current-context)",
                    path.display(),
                    kc.current_context
                ))
            })?;
        let cluster = kc
            .clusters
            .iter()
            .find(|c| c.name == ctx.value.cluster)
            .ok_or_else(|| {
                cfg(format!(
                    "{}: no cluster {:?}",
                    path.display(),
                    ctx.value.cluster
                ))
            })?;
        let user = kc.users.iter().find(|u| u.name == ctx.value.user);
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let c = &cluster.value;
        let ca = match (&c.certificate_authority_data, &c.certificate_authority) {
            (Some(d), _) => Some(b64("certificate-authority-data", d)?),
            (None, Some(p)) => Some(read(&rel(p))?),
            _ => None,
        };
        let mut token = TokenSource::None;
        let mut identity = None;
        if let Some(u) = user.map(|u| &u.value) {
            token = match (&u.token, &u.token_file) {
                (Some(t), _) => TokenSource::Fixed(t.clone()),
                (None, Some(p)) => TokenSource::file(rel(p))?,
                _ => TokenSource::None,
            };
            let cert = match (&u.client_certificate_data, &u.client_certificate) {
                (Some(d), _) => Some(b64("client-certificate-data", d)?),
                (None, Some(p)) => Some(read(&rel(p))?),
                _ => None,
            };
            let key = match (&u.client_key_data, &u.client_key) {
                (Some(d), _) => Some(b64("client-key-data", d)?),
                (None, Some(p)) => Some(read(&rel(p))?),
                _ => None,
            };
            if let (Some(mut cert), Some(key)) = (cert, key) {
                cert.push(b'\n');
                cert.extend_from_slice(&key);
                identity = Some(cert);
            }
            if let (TokenSource::None, None, Some(e)) = (&token, &identity, &u.exec) {
                let label = format!("{}: user {:?}", path.display(), ctx.value.user);
                let a = run_exec(e, base).map_err(|err| cfg(format!("{label}: {err}")))?;
                // A client certificate from a plugin is used for the whole
                // command (the HTTP client holds it); tokens are renewed.
                identity = a.identity;
                if let Some(t) = a.token {
                    token = TokenSource::Exec {
                        exec: e.clone(),
                        base: base.to_path_buf(),
                        label,
                        cached: Mutex::new((t, a.expires)),
                    };
                }
            }
        }
        Self::build(
            &c.server,
            ca,
            identity,
            token,
            c.insecure_skip_tls_verify,
            ctx.value.namespace.clone(),
        )
    }

    pub fn in_cluster() -> Result<Self> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(cfg)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let sa = Path::new(SERVICE_ACCOUNT);
        let token = TokenSource::file(sa.join("token"))?;
        let ca = read(&sa.join("ca.crt"))?;
        let ns = std::fs::read_to_string(sa.join("namespace")).ok();
        Self::build(
            &format!("https://{host}:{port}"),
            Some(ca),
            None,
            token,
            false,
            ns.map(|n| n.trim().to_string()),
        )
    }

    fn build(
        server: &str,
        ca: Option<Vec<u8>>,
        identity: Option<Vec<u8>>,
        token: TokenSource,
        insecure: bool,
        namespace: Option<String>,
    ) -> Result<Self> {
        if server.is_empty() {
            return Err(cfg("the cluster has no server address"));
        }
        let mut b = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .danger_accept_invalid_certs(insecure);
        if let Some(ca) = ca {
            b = b.add_root_certificate(
                reqwest::Certificate::from_pem(&ca).map_err(|e| cfg(format!("CA: {e}")))?,
            );
        }
        if let Some(id) = identity {
            b = b.identity(
                reqwest::Identity::from_pem(&id)
                    .map_err(|e| cfg(format!("client certificate: {e}")))?,
            );
        }
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            token,
            http: b.build().map_err(|e| cfg(format!("HTTP client: {e}")))?,
            namespace: namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".into()),
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// GETs `path` (`/api/v1/...`) as JSON. A 404 is `Ok(None)`.
    pub async fn get_opt<T: DeserializeOwned>(&self, path: &str) -> Result<Option<T>> {
        self.call(reqwest::Method::GET, path, None, "").await
    }

    /// POSTs `body` to `path` (creates an object) and returns what the
    /// server made of it.
    pub async fn create<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T> {
        self.call(reqwest::Method::POST, path, Some(body), "application/json")
            .await?
            .ok_or_else(|| Error::NotFound(format!("{}: {path}: not found", self.server)))
    }

    /// DELETEs the object at `path`; one that is already gone is fine.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.call::<serde_json::Value>(reqwest::Method::DELETE, path, None, "")
            .await
            .map(drop)
    }

    /// Changes fields of the object at `path` (a JSON merge patch).
    pub async fn merge_patch(&self, path: &str, patch: &serde_json::Value) -> Result<()> {
        self.call::<serde_json::Value>(
            reqwest::Method::PATCH,
            path,
            Some(patch),
            "application/merge-patch+json",
        )
        .await?
        .ok_or_else(|| Error::NotFound(format!("{}: {path}: not found", self.server)))
        .map(drop)
    }

    /// One request with a JSON answer. A 404 is `Ok(None)`; any other
    /// failure names the server, the path and the API's own message.
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        content_type: &str,
    ) -> Result<Option<T>> {
        let api = |message: String| Error::Api {
            server: self.server.clone(),
            path: path.to_string(),
            message,
        };
        // A 401 with a token that can be renewed: once more with a new one.
        let mut stale = false;
        let resp = loop {
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.server));
            if let Some(t) = self.token.get(stale).await? {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(b.to_string());
            }
            let resp = req.send().await.map_err(|e| api(e.to_string()))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED
                && !stale
                && self.token.renewable()
            {
                stale = true;
                continue;
            }
            break resp;
        };
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| api(e.to_string()))?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            // A Status object's message says it best.
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(api(format!("{status}: {msg}")));
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| api(format!("unexpected answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_gives_server_namespace_and_credentials() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config");
        std::fs::write(
            &p,
            "apiVersion: v1\nkind: Config\ncurrent-context: target\n\
             clusters:\n- name: c1\n  cluster:\n    server: http://127.0.0.1:6443/\n\
             contexts:\n- name: target\n  context:\n    cluster: c1\n    user: u1\n    namespace: shop\n\
             users:\n- name: u1\n  user:\n    tokenFile: token\n",
        )
        .unwrap();
        std::fs::write(d.path().join("token"), "abc\n").unwrap();
        let k = Kube::from_kubeconfig(&p).unwrap();
        assert_eq!(k.server(), "http://127.0.0.1:6443");
        assert_eq!(k.namespace, "shop");
        assert_eq!(k.token.held().as_deref(), Some("abc"));

        // A missing context, bad base64, an exec plugin that is not installed:
        // one clear error.
        std::fs::write(&p, "current-context: nope\n").unwrap();
        assert!(
            Kube::from_kubeconfig(&p)
                .unwrap_err()
                .to_string()
                .contains("no context")
        );
        std::fs::write(
            &p,
            "current-context: t\nclusters:\n- name: c\n  cluster:\n    server: https://x\n    certificate-authority-data: '%%%'\n\
             contexts:\n- name: t\n  context:\n    cluster: c\n    user: u\n",
        )
        .unwrap();
        assert!(
            Kube::from_kubeconfig(&p)
                .unwrap_err()
                .to_string()
                .contains("base64")
        );
        std::fs::write(
            &p,
            "current-context: t\nclusters:\n- name: c\n  cluster:\n    server: https://x\n\
             contexts:\n- name: t\n  context:\n    cluster: c\n    user: u\n\
             users:\n- name: u\n  user:\n    exec:\n      command: aws\n",
        )
        .unwrap();
        assert!(
            Kube::from_kubeconfig(&p)
                .unwrap_err()
                .to_string()
                .contains("exec plugin")
        );
    }

    /// An exec plugin (a script here, `aws eks get-token` in life) gives the
    /// token; its env entries and the exec info reach it; a failing or
    /// mute plugin is one clear error.
    #[test]
    fn an_exec_plugin_gives_the_token() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let plugin = d.path().join("get-token");
        std::fs::write(
            &plugin,
            "#!/bin/sh\ncase \"$KUBERNETES_EXEC_INFO\" in *ExecCredential*) ;; *) exit 3;; esac\n\
             [ \"$1\" = --cluster ] || exit 4\n\
             printf '{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\
             \"status\":{\"token\":\"%s-%s\"}}' \"$2\" \"$REGION\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = d.path().join("config");
        let config = |command: &str| {
            [
                "current-context: t",
                "clusters:",
                "- name: c",
                "  cluster:",
                "    server: https://x",
                "contexts:",
                "- name: t",
                "  context:",
                "    cluster: c",
                "    user: u",
                "users:",
                "- name: u",
                "  user:",
                "    exec:",
                "      apiVersion: client.authentication.k8s.io/v1",
                &format!("      command: {command}"),
                "      args: [--cluster, prod]",
                "      env:",
                "      - name: REGION",
                "        value: cn-hangzhou",
            ]
            .join("\n")
        };
        // Relative to the kubeconfig's directory, as kubectl does.
        std::fs::write(&p, config("./get-token")).unwrap();
        let k = Kube::from_kubeconfig(&p).unwrap();
        assert_eq!(k.token.held().as_deref(), Some("prod-cn-hangzhou"));

        std::fs::write(&plugin, "#!/bin/sh\nexit 1\n").unwrap();
        let e = Kube::from_kubeconfig(&p).unwrap_err().to_string();
        assert!(e.contains("exec plugin") && e.contains("failed"), "{e}");
        std::fs::write(&plugin, "#!/bin/sh\necho '{\"status\":{}}'\n").unwrap();
        let e = Kube::from_kubeconfig(&p).unwrap_err().to_string();
        assert!(e.contains("neither a token"), "{e}");
    }

    /// An HTTP server on loopback that answers 200 `{}` to a bearer token
    /// `accept` approves and 401 to any other; it records the tokens sent.
    fn token_server(
        accept: impl Fn(&str) -> bool + Send + 'static,
    ) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut token = String::new();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                        break;
                    }
                    let h = h.trim_end();
                    if h.to_ascii_lowercase().starts_with("authorization: bearer ") {
                        token = h["authorization: bearer ".len()..].to_string();
                    }
                }
                let status = if accept(&token) {
                    "200 OK"
                } else {
                    "401 Unauthorized"
                };
                log.lock().unwrap().push(token);
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
                );
            }
        });
        (url, seen)
    }

    /// A kubeconfig whose user gets `tok-N` (N counts the runs) from an exec
    /// plugin, expiring at `expires`.
    fn exec_config(dir: &Path, server: &str, expires: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let plugin = dir.join("get-token");
        std::fs::write(
            &plugin,
            format!(
                "#!/bin/sh\nn=$(( $(cat {runs} 2>/dev/null || echo 0) + 1 ))\necho $n > {runs}\n\
                 printf '{{\"status\":{{\"token\":\"tok-%s\",\"expirationTimestamp\":\"{expires}\"}}}}' $n\n",
                runs = dir.join("runs").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        user_config(dir, server, "    exec:\n      command: ./get-token")
    }

    /// A kubeconfig in `dir` for `server` whose user is `user` (YAML lines
    /// under `user:`, indented four spaces).
    fn user_config(dir: &Path, server: &str, user: &str) -> PathBuf {
        let p = dir.join("config");
        std::fs::write(
            &p,
            format!(
                "current-context: t\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
                 contexts:\n- name: t\n  context:\n    cluster: c\n    user: u\n\
                 users:\n- name: u\n  user:\n{user}\n"
            ),
        )
        .unwrap();
        p
    }

    fn runs(dir: &Path) -> u32 {
        std::fs::read_to_string(dir.join("runs"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// An exec token is used until shortly before it expires, then fetched
    /// again: a command that outlives an EKS token keeps working.
    #[tokio::test]
    async fn an_exec_token_is_renewed_as_it_expires() {
        /// Two requests with a plugin whose tokens expire at `expires`:
        /// the tokens the server saw and how often the plugin ran.
        async fn two_requests(expires: &str) -> (Vec<String>, u32) {
            let (url, seen) = token_server(|t| t.starts_with("tok-"));
            let d = tempfile::tempdir().unwrap();
            let k = Kube::from_kubeconfig(&exec_config(d.path(), &url, expires)).unwrap();
            for _ in 0..2 {
                k.get_opt::<serde_json::Value>("/api")
                    .await
                    .unwrap()
                    .unwrap();
            }
            let seen = seen.lock().unwrap().clone();
            (seen, runs(d.path()))
        }
        let (seen, runs) = two_requests("2999-01-01T00:00:00Z").await;
        assert_eq!(seen, ["tok-1", "tok-1"]);
        assert_eq!(runs, 1, "a valid token is not fetched again");
        let (seen, runs) = two_requests("2000-01-01T00:00:00Z").await;
        assert_eq!(seen, ["tok-2", "tok-3"]);
        assert_eq!(runs, 3);
    }

    /// A 401 renews a renewable token once and sends the request again; a
    /// second 401 is the error. A fixed token is not retried.
    #[tokio::test]
    async fn a_401_renews_the_token_once() {
        let (url, seen) = token_server(|t| t == "tok-2");
        let d = tempfile::tempdir().unwrap();
        let k =
            Kube::from_kubeconfig(&exec_config(d.path(), &url, "2999-01-01T00:00:00Z")).unwrap();
        k.get_opt::<serde_json::Value>("/api")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["tok-1", "tok-2"]);
        let e = k.get_opt::<serde_json::Value>("/api").await.unwrap();
        assert!(e.is_some(), "tok-2 is kept");

        let (url, seen) = token_server(|_| false);
        let d = tempfile::tempdir().unwrap();
        let k =
            Kube::from_kubeconfig(&exec_config(d.path(), &url, "2999-01-01T00:00:00Z")).unwrap();
        let e = k
            .get_opt::<serde_json::Value>("/api")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("401"), "{e}");
        assert_eq!(*seen.lock().unwrap(), ["tok-1", "tok-2"]);

        // A token file rotated in place (a projected service-account
        // token) is read again after a 401.
        let (url, seen) = token_server(|t| t == "new");
        let d = tempfile::tempdir().unwrap();
        let p = user_config(d.path(), &url, "    tokenFile: token");
        std::fs::write(d.path().join("token"), "old\n").unwrap();
        let k = Kube::from_kubeconfig(&p).unwrap();
        std::fs::write(d.path().join("token"), "new\n").unwrap();
        k.get_opt::<serde_json::Value>("/api")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["old", "new"]);

        let (url, seen) = token_server(|_| false);
        let p = user_config(d.path(), &url, "    token: fixed");
        let k = Kube::from_kubeconfig(&p).unwrap();
        assert!(k.get_opt::<serde_json::Value>("/api").await.is_err());
        assert_eq!(*seen.lock().unwrap(), ["fixed"]);
    }
}
