//! The forward step: the request goes out on a pooled upstream connection.
//!
//! rustls with the webpki roots (plus an optional extra CA bundle), HTTP/2 where the upstream
//! offers it by ALPN, connect / first-byte / idle timeouts. The request body streams straight
//! from the app's connection into the upstream one, under a size limit.
//!
//! Connections are pooled per worker thread (`hyper::client::conn`, one pool per thread and
//! upstream host), not in one shared pool: a request takes an idle connection from its
//! thread's pool under that pool's own lock, which nothing else takes but the 5-second sweep,
//! and gives an HTTP/1 connection back to the same pool when its response body has ended.
//! hyper-util's legacy client kept one pool behind one lock for every thread and spawned a
//! task per request to return the connection; a minimal proxy on it cost 1.2–1.4× the same
//! proxy on per-connection senders (docs/performance.md).
//!
//! The usual request is handed to a ready pooled connection as it is made (`answer`): the
//! future every request carries then holds hyper's answer slot, not the request, the pool
//! keys and the retry loop, which are boxed for the rare request that needs them.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::Either;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body_util::LengthLimitError;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tower_service::Service as _;

mod answer;
mod pool;

use answer::{Answer, Target, Tried, TrySend};
pub use pool::Pooled;
use pool::{Checkin, Conn, Pools};

use crate::accept::LimitError;
use crate::accept::Limits;
use crate::timeouts::{IdleTimeout, Side};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The forward step could not get a response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No connection could be made (DNS, TCP, TLS): the request was never sent.
    #[error("upstream could not be reached")]
    Connect(#[source] BoxError),
    #[error("upstream connection failed")]
    Unreachable(#[source] hyper::Error),
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
        matches!(self, Self::Forward(ForwardError::Connect(_)))
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

/// The upstream response body as the pipeline reads it.
pub type ResponseBody = IdleTimeout<Pooled>;

#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    #[error("cannot read upstream CA bundle {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("TLS setup failed: {0}")]
    Tls(#[from] rustls::Error),
}

/// The upstream client: a connector and the per-thread pools.
#[derive(Clone)]
pub struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    pools: Arc<Pools>,
    pool_idle: Duration,
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
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg.ca_file.as_deref())?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Ok(Self {
            connector,
            pools: Arc::new(Pools::new()),
            pool_idle: cfg.pool_idle_timeout,
            first_byte_timeout: limits.first_byte_timeout,
            idle_timeout: limits.idle_timeout,
            max_body_bytes: limits.max_body_bytes,
        })
    }

    /// Sends the request; resolves when the response headers arrive. A combinator, not an
    /// `async fn`: every request's future holds this one, and an `async` wrapper would hold
    /// the inner future twice over (rustc keeps the awaited value and its temporary apart).
    pub fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, SendError>> + '_ {
        use futures_util::FutureExt as _;
        tokio::time::timeout(self.first_byte_timeout, self.request(req)).map(|r| match r {
            Err(_) => Err(ForwardError::Timeout(self.first_byte_timeout).into()),
            Ok(Err(ForwardError::Unreachable(e))) if body_too_large(&e) => {
                Err(LimitError::BodyTooLarge(self.max_body_bytes).into())
            }
            Ok(Err(ForwardError::Unreachable(e))) if crate::timeouts::client_stalled(&e) => {
                Err(LimitError::BodyTimeout.into())
            }
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok((resp, back))) => Ok(resp.map(|b| {
                IdleTimeout::new(Pooled::new(b, back), self.idle_timeout, Side::Upstream)
            })),
        })
    }

    /// Closes idle connections older than `upstream.pool_idle_timeout`, in every thread's
    /// pool. Run by the server's 5-second sweep; a request also skips an expired one.
    pub fn sweep(&self) {
        self.pools.sweep(self.pool_idle, Instant::now());
    }

    /// Sends the request; resolves when the response headers arrive. The usual request goes
    /// out here, before any future exists: a ready connection from this thread's pool takes
    /// it at once, and what is awaited is hyper's answer slot. Everything else (no ready
    /// pooled connection, a new one, a pooled one the upstream had closed) is a boxed future:
    /// rare, and several times the size of the request that every request's future would
    /// otherwise carry and move.
    fn request(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Answer<'_, impl Future<Output = Result<Response<Incoming>, TrySend>> + Send + use<>> {
        let mut t = match Target::of(&mut req, self.pools.mine()) {
            Ok(t) => t,
            Err(e) => return Answer::failed(e),
        };
        match self.checkout(t.slot, &t.scheme, &t.authority) {
            Some(Conn::H1(mut sender)) if sender.is_ready() => {
                if let Err(e) = t.h1_form(&mut req) {
                    return Answer::failed(e);
                }
                let answer = Either::Left(sender.try_send_request(req));
                Answer::Pooled {
                    answer,
                    back: Some(t.checkin(&self.pools, sender)),
                    target: Some(t),
                    up: self,
                }
            }
            Some(Conn::H2(mut sender)) => {
                if let Err(e) = t.h2_form(&mut req) {
                    return Answer::failed(e);
                }
                Answer::Pooled {
                    answer: Either::Right(sender.try_send_request(req)),
                    back: None,
                    target: Some(t),
                    up: self,
                }
            }
            conn => Answer::Slow {
                fut: Box::pin(self.request_slow(req, t, conn)),
            },
        }
    }

    /// [`Self::request`] when no ready pooled connection took it: `conn` (a pooled HTTP/1
    /// connection not ready yet) first, then the next pooled one, then a new one.
    async fn request_slow(
        &self,
        mut req: Request<UpstreamBody>,
        mut t: Target,
        mut conn: Option<Conn>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), ForwardError> {
        loop {
            let (conn, pooled) = match conn.take() {
                Some(c) => (c, true),
                None => match self.checkout(t.slot, &t.scheme, &t.authority) {
                    Some(c) => (c, true),
                    // Boxed: a new connection is rare, and its future (TLS, HTTP/2 handshake)
                    // is several KiB.
                    None => (
                        Box::pin(self.connect(t.slot, &t.scheme, &t.authority)).await?,
                        false,
                    ),
                },
            };
            let tried = match conn {
                Conn::H1(mut sender) => {
                    t.h1_form(&mut req)?;
                    // A connection given back as its response ended may not have taken in
                    // the end yet.
                    if sender.ready().await.is_err() {
                        Tried::Unsent(req)
                    } else {
                        match sender.try_send_request(req).await {
                            Ok(resp) => Tried::Answered(resp, Some(t.checkin(&self.pools, sender))),
                            Err(e) => Tried::from(e),
                        }
                    }
                }
                Conn::H2(mut sender) => {
                    t.h2_form(&mut req)?;
                    match sender.try_send_request(req).await {
                        Ok(resp) => Tried::Answered(resp, None),
                        Err(e) => {
                            let tried = Tried::from(e);
                            if matches!(tried, Tried::Unsent(_)) {
                                self.forget_h2(t.slot, &t.scheme, &t.authority);
                            }
                            tried
                        }
                    }
                }
            };
            match tried {
                Tried::Answered(resp, back) => return Ok((resp, back)),
                Tried::Failed(e) => return Err(ForwardError::Unreachable(e)),
                // A pooled connection the upstream had closed: try the next, or a new one.
                Tried::Unsent(r) if pooled => {
                    t.taken_back(&r);
                    req = r;
                }
                Tried::Unsent(_) => {
                    return Err(ForwardError::Connect(
                        "the new upstream connection closed before the request was sent".into(),
                    ));
                }
            }
        }
    }

    /// An open connection from this thread's pool, if it has one.
    fn checkout(&self, slot: usize, scheme: &Scheme, authority: &Authority) -> Option<Conn> {
        let mut pool = self.pools.lock(slot);
        let host = pool.host(scheme, authority);
        if let Some(h2) = &host.h2 {
            if !h2.is_closed() {
                return Some(Conn::H2(h2.clone()));
            }
            host.h2 = None;
        }
        let now = Instant::now();
        while let Some((sender, since)) = host.idle.pop_back() {
            if !sender.is_closed() && now.duration_since(since) < self.pool_idle {
                return Some(Conn::H1(sender));
            }
        }
        None
    }

    /// Drops this thread's HTTP/2 connection to the host once it has closed (a request it
    /// refused unsent is the sign). Every clone of a sender sees the close, so a newer, open
    /// connection stored meanwhile stays.
    fn forget_h2(&self, slot: usize, scheme: &Scheme, authority: &Authority) {
        let mut pool = self.pools.lock(slot);
        let host = pool.host(scheme, authority);
        if host.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
            host.h2 = None;
        }
    }

    /// A new connection: TCP (and TLS, HTTP/2 if the upstream offers it by ALPN), its task
    /// spawned on this runtime. An HTTP/2 one is shared through this thread's pool at once.
    async fn connect(
        &self,
        slot: usize,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Conn, ForwardError> {
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(ForwardError::BadUpstreamRequest)?;
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ForwardError::Connect)?;
        let io = connector
            .call(target)
            .await
            .map_err(ForwardError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| ForwardError::Connect(e.into()))?;
            drive(conn);
            let mut pool = self.pools.lock(slot);
            pool.host(scheme, authority).h2 = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ForwardError::Connect(e.into()))?;
        drive(conn);
        Ok(Conn::H1(sender))
    }
}

/// Runs an upstream connection's task on this runtime to its end.
fn drive<C>(conn: C)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
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

    /// Every request's future holds the send future; the request itself goes to hyper before
    /// it is awaited (it was 1,584 bytes when it carried the request, the pool keys and the
    /// retry loop).
    #[tokio::test]
    async fn the_send_future_does_not_carry_the_request() {
        let up = Upstream::new(
            &UpstreamConfig {
                ca_file: None,
                connect_timeout: Duration::from_secs(1),
                pool_idle_timeout: Duration::from_secs(1),
            },
            &Limits::default(),
        )
        .unwrap();
        let req = Request::builder()
            .uri("http://127.0.0.1:9/v1/chat/completions")
            .body(crate::stream_usage::RequestBody::empty())
            .unwrap();
        let request_size = std::mem::size_of_val(&req);
        let send = up.send(req);
        assert!(
            std::mem::size_of_val(&send) < 1024 && request_size < 1024,
            "send future {} bytes",
            std::mem::size_of_val(&send)
        );
        drop(send);
    }

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
