//! The forward step: one pooled hyper client shared by every request.
//!
//! rustls with the webpki roots (plus an optional extra CA bundle), HTTP/2 where the upstream
//! offers it by ALPN, connect / first-byte / idle timeouts. The request body streams straight
//! from the app's connection into the upstream one, under a size limit.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::LengthLimitError;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::accept::LimitError;
use crate::accept::Limits;
use crate::timeouts::{IdleTimeout, Side};

/// The forward step could not get a response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream could not be reached")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("upstream sent no response within {0:?}")]
    Timeout(std::time::Duration),
    #[error("upstream request could not be built")]
    BadUpstreamRequest(#[source] http::Error),
    #[error("the stored key cannot be sent as a header")]
    InvalidCredential,
    #[error("the upstream response failed before its first byte")]
    BodyFailed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One upstream call failed: the provider's side, or the app's body (too large, stalled).
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Limit(#[from] LimitError),
}

impl SendError {
    /// The upstream connection could not be made, so the request was never sent: the one
    /// transport failure after which trying elsewhere cannot bill twice. A reset after the
    /// request went out, or a timeout waiting for the answer, may already have cost money.
    pub fn never_sent(&self) -> bool {
        matches!(self, Self::Forward(ForwardError::Unreachable(e)) if e.is_connect())
    }

    /// The `kind` label of `byokd_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Forward(ForwardError::Timeout(_)) => "timeout",
            Self::Limit(LimitError::BodyTooLarge(_)) => "body_too_large",
            _ => "connect",
        }
    }
}

/// The request body as sent upstream: the app's body, streamed, capped in size (with at most
/// a small edited prefix, see `stream_usage`).
pub type UpstreamBody = crate::stream_usage::RequestBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read upstream CA bundle {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The shared upstream client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    max_body_bytes: u64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

/// The rustls client config: webpki roots plus the configured extra CA bundle.
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, ClientBuildError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let err = |message: String| ClientBuildError::CaFile {
            path: path.display().to_string(),
            message,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("no PEM certificates in the file".into()));
        }
        for c in certs {
            roots.add(c).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, limits: &Limits) -> Result<Self, ClientBuildError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self {
            client,
            first_byte_timeout: limits.first_byte_timeout,
            idle_timeout: limits.idle_timeout,
            max_body_bytes: limits.max_body_bytes,
        })
    }

    /// Sends the request; resolves when the response headers arrive.
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> Result<Response<IdleTimeout<Incoming>>, SendError> {
        match tokio::time::timeout(self.first_byte_timeout, self.client.request(req)).await {
            Err(_) => Err(ForwardError::Timeout(self.first_byte_timeout).into()),
            Ok(Err(e)) if body_too_large(&e) => {
                Err(LimitError::BodyTooLarge(self.max_body_bytes).into())
            }
            Ok(Err(e)) if crate::timeouts::client_stalled(&e) => {
                Err(LimitError::BodyTimeout.into())
            }
            Ok(Err(e)) => Err(ForwardError::Unreachable(e).into()),
            Ok(Ok(resp)) => {
                Ok(resp.map(|b| IdleTimeout::new(b, self.idle_timeout, Side::Upstream)))
            }
        }
    }
}

pub fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    crate::timeouts::caused_by::<LengthLimitError>(e).is_some()
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
}

/// The token endpoint call of a credential exchange (an OAuth grant), through the same
/// client and timeouts as upstream requests. The answer is read up to 64 KiB.
impl crate::provider::TokenHttp for Upstream {
    fn post_form<'a>(&'a self, url: &'a str, form: &'a str) -> crate::provider::TokenAnswer<'a> {
        Box::pin(async move {
            use http_body_util::BodyExt as _;
            let req = Request::post(url)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .header(http::header::CONTENT_LENGTH, form.len())
                .body(UpstreamBody::whole(bytes::Bytes::copy_from_slice(
                    form.as_bytes(),
                )))
                .map_err(|e| e.to_string())?;
            let resp = self.send(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_ca_bundle_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let err = tls_config(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = tls_config(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("no PEM certificates"), "{err}");
        assert!(tls_config(None).is_ok());
    }
}
