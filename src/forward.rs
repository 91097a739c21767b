//! The forward step: one pooled hyper client shared by every request.
//!
//! rustls with the webpki roots (plus an optional extra CA bundle), HTTP/2 where the upstream
//! offers it by ALPN, connect / first-byte / idle timeouts. The request body streams straight
//! from the app's connection into the upstream one, under a size limit.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::LengthLimitError;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::time::Sleep;

use crate::accept::LimitError;
use crate::accept::Limits;

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
            Ok(Err(e)) if client_stalled(&e) => Err(LimitError::BodyTimeout.into()),
            Ok(Err(e)) => Err(ForwardError::Unreachable(e).into()),
            Ok(Ok(resp)) => {
                Ok(resp.map(|b| IdleTimeout::new(b, self.idle_timeout, Side::Upstream)))
            }
        }
    }
}

pub fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<LengthLimitError>(e).is_some()
}

/// Which side of the proxy went silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The app, while sending its request body.
    Client,
    /// The provider, while sending its response body.
    Upstream,
}

/// A body sent nothing for longer than its idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} sent nothing for {idle:?}")]
pub struct IdleTimedOut {
    pub idle: Duration,
    pub side: Side,
}

/// The app's request body as byokd reads it: stalls longer than `limits.body_timeout` fail.
pub type ClientBody = IdleTimeout<Incoming>;

/// Ends a body that sends nothing for `idle` (a hung stream or a stalled upload), so neither
/// side nor the connection waits forever. The timer is armed only when the body actually has
/// to wait: a body whose frames are already buffered costs no timer operation.
pub struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    side: Side,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame was delivered since the timer was last armed: the next wait starts afresh.
    fresh: bool,
    /// The first frame, read ahead by [`IdleTimeout::prime`] and delivered first.
    first: Option<Frame<Bytes>>,
}

impl<B> IdleTimeout<B> {
    pub fn new(inner: B, idle: Duration, side: Side) -> Self {
        Self {
            inner,
            idle,
            side,
            sleep: None,
            fresh: true,
            first: None,
        }
    }
}

impl<B> IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Waits for the body's first frame (kept and delivered first) or its end, so a body that
    /// fails before sending anything is known before the response head goes out.
    pub async fn prime(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.first.is_some() || self.inner.is_end_stream() {
            return Ok(());
        }
        match std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await {
            Some(Ok(f)) => {
                self.first = Some(f);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(f) = this.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.fresh = true;
                Poll::Ready(r.map(|x| x.map_err(Into::into)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.idle;
                let sleep = match &mut this.sleep {
                    Some(s) => {
                        if this.fresh {
                            s.as_mut().reset(deadline);
                        }
                        s
                    }
                    None => this
                        .sleep
                        .insert(Box::pin(tokio::time::sleep_until(deadline))),
                };
                this.fresh = false;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(IdleTimedOut {
                        idle: this.idle,
                        side: this.side,
                    })))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let h = self.inner.size_hint();
        let Some(n) = self
            .first
            .as_ref()
            .and_then(|f| f.data_ref())
            .map(|d| d.len() as u64)
        else {
            return h;
        };
        let mut out = SizeHint::new();
        out.set_lower(h.lower() + n);
        if let Some(u) = h.upper() {
            out.set_upper(u + n);
        }
        out
    }
}

/// Whether `e`'s source chain holds an error of type `T`.
pub fn caused_by<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// The app's request body stalled past `limits.body_timeout`.
pub fn client_stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    caused_by::<IdleTimedOut>(e).is_some_and(|t| t.side == Side::Client)
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
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
