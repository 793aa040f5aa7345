//! Reaching the coordinator: endpoint, TLS, token, message limits, retries.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::proto::coordinator_client::CoordinatorClient;
use crate::{Error, Result};

/// Largest gRPC message either side accepts: a batch of ids, a pack list,
/// a tree. Larger calls fail with a clear error instead of exhausting memory.
pub const MAX_MESSAGE: usize = 64 << 20;

/// Bytes of trees sent or answered in one message: well under the limit,
/// whatever the overhead of framing each.
pub const TREES_BUDGET: usize = 16 << 20;

/// How a client reaches the coordinator.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// Sent as `authorization: Bearer ...` on every call. Never logged.
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust for https, besides the system's.
    pub tls_ca: Option<PathBuf>,
}

/// Adds the token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// A client that connects on first use and reconnects after failures (the
/// coordinator may restart under it).
pub fn connect(opts: &ConnectOptions) -> Result<Client> {
    let bad = |m: String| Error::Invalid(format!("coordinator {}: {m}", opts.url));
    if !(opts.url.starts_with("http://") || opts.url.starts_with("https://")) {
        return Err(bad("the URL must start with http:// or https://".into()));
    }
    let mut ep = Endpoint::from_shared(opts.url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if opts.url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &opts.tls_ca {
            let pem = std::fs::read(ca).map_err(|e| Error::Io {
                what: format!("reading CA certificate {}", ca.display()),
                source: e,
            })?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    let bearer = match &opts.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| bad("the token must be printable ASCII".into()))?,
        ),
        None => None,
    };
    Ok(
        CoordinatorClient::with_interceptor(ep.connect_lazy(), Bearer(bearer))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
    )
}

/// Reads a token file: its first line, which must not be empty.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::Io {
        what: format!("reading token file {}", path.display()),
        source: e,
    })?;
    let t = s.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        return Err(Error::Invalid(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(t)
}

/// Calls `f` until it succeeds, fails with a final error, or `patience`
/// has passed; waits between tries grow from 100 ms to 5 s, with jitter.
pub async fn with_retry<T, F, Fut>(
    url: &str,
    call: &'static str,
    patience: Duration,
    mut f: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let start = std::time::Instant::now();
    let mut wait = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if crate::retryable(&s) && start.elapsed() < patience => {
                tracing::debug!(
                    call,
                    "coordinator call failed, retrying: {}",
                    crate::status_line(&s)
                );
                tokio::time::sleep(jitter(wait)).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(s) => {
                return Err(Error::Rpc {
                    url: url.to_string(),
                    call,
                    message: crate::status_line(&s),
                });
            }
        }
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so that many agents
/// reconnecting after a coordinator restart do not do it in step.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    ferry_core::keys::fill_random(&mut b);
    let f = 0.5 + f64::from(u16::from_le_bytes(b)) / 65536.0;
    d.mul_f64(f)
}
