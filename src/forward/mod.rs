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

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::LengthLimitError;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connection as _, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tower_service::Service as _;

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

/// An HTTP/1 connection is idle in at most this many copies per thread and host; past it, a
/// returned connection is closed.
const MAX_IDLE_PER_HOST: usize = 256;

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

/// The pools, one per worker thread (threads past their number share one). A connection
/// goes back to the pool it came from: the runtime moves tasks between threads, and a
/// connection given back where its response happened to end would leave one thread's pool
/// empty, opening new connections, while another's grew.
struct Pools(Box<[Mutex<Pool>]>);

impl Pools {
    fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
        Self((0..n * 2).map(|_| Mutex::default()).collect())
    }

    /// The index of this thread's pool.
    fn mine(&self) -> usize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        SLOT.with(|s| *s) % self.0.len()
    }

    fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Pool> {
        self.0[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One thread's connections, by host. A linear search: a deployment talks to a handful of
/// hosts, and comparing a few authorities costs less than hashing one.
#[derive(Default)]
struct Pool {
    hosts: Vec<Host>,
}

struct Host {
    scheme: Scheme,
    authority: Authority,
    /// An HTTP/2 connection carries every request to its host from this thread at once.
    h2: Option<http2::SendRequest<UpstreamBody>>,
    /// Idle HTTP/1 connections, oldest first; the newest is taken first.
    idle: VecDeque<(http1::SendRequest<UpstreamBody>, Instant)>,
}

/// Authorities compare without case; the same provider's URI gives the same bytes every time,
/// so those are compared first (a plain `memcmp`).
fn same_authority(a: &Authority, b: &Authority) -> bool {
    a.as_str() == b.as_str() || a == b
}

impl Pool {
    fn host(&mut self, scheme: &Scheme, authority: &Authority) -> &mut Host {
        let i = match self
            .hosts
            .iter()
            .position(|h| same_authority(&h.authority, authority) && h.scheme == *scheme)
        {
            Some(i) => i,
            None => {
                self.hosts.push(Host {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    h2: None,
                    idle: VecDeque::new(),
                });
                self.hosts.len() - 1
            }
        };
        &mut self.hosts[i]
    }

    fn sweep(&mut self, idle: Duration, now: Instant) {
        for h in &mut self.hosts {
            if h.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
                h.h2 = None;
            }
            h.idle
                .retain(|(s, since)| !s.is_closed() && now.duration_since(*since) < idle);
        }
        self.hosts.retain(|h| h.h2.is_some() || !h.idle.is_empty());
    }
}

enum Conn {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// Where a finished HTTP/1 connection goes back to.
struct Checkin {
    pools: Arc<Pools>,
    slot: usize,
    scheme: Scheme,
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
}

impl Checkin {
    /// Into the pool it was taken from.
    fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut pool = self.pools.lock(self.slot);
        let host = pool.host(&self.scheme, &self.authority);
        if host.idle.len() >= MAX_IDLE_PER_HOST {
            host.idle.pop_front();
        }
        host.idle.push_back((self.sender, Instant::now()));
    }
}

/// An upstream response body that gives its HTTP/1 connection back to the pool once read to
/// its end. Dropped before that, the connection closes with it: a half-read response cannot
/// be reused.
pub struct Pooled {
    inner: Incoming,
    back: Option<Checkin>,
}

impl Pooled {
    fn new(inner: Incoming, back: Option<Checkin>) -> Self {
        let mut body = Self { inner, back };
        if body.inner.is_end_stream() {
            // Nothing will be polled: the connection is free already.
            if let Some(c) = body.back.take() {
                c.give_back();
            }
        }
        body
    }
}

impl Body for Pooled {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        // hyper stops polling a body that says it has ended, so the last frame may be the
        // last call.
        match &r {
            Poll::Ready(None) => {
                if let Some(c) = this.back.take() {
                    c.give_back();
                }
            }
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                if let Some(c) = this.back.take() {
                    c.give_back();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.back.take();
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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

/// How one try on one connection ended.
enum Tried {
    Answered(Response<Incoming>, Option<Checkin>),
    /// The connection was gone before the request went out: the request comes back.
    Unsent(Request<UpstreamBody>),
    Failed(hyper::Error),
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
        let now = Instant::now();
        for i in 0..self.pools.0.len() {
            self.pools.lock(i).sweep(self.pool_idle, now);
        }
    }

    async fn request(
        &self,
        mut req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), ForwardError> {
        // Taken apart, not cloned: cloning a path made from a `String` allocates.
        let uri = std::mem::take(req.uri_mut()).into_parts();
        let (Some(scheme), Some(authority)) = (uri.scheme, uri.authority) else {
            // The rewrite step always builds an absolute URI from the provider's base URL.
            return Err(ForwardError::Connect(
                "the upstream URI has no scheme or host".into(),
            ));
        };
        // Taken and given back here even if the task moves to another thread meanwhile.
        let slot = self.pools.mine();
        let mut path = uri
            .path_and_query
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        loop {
            let (conn, pooled) = match self.checkout(slot, &scheme, &authority) {
                Some(c) => (c, true),
                // Boxed: a new connection is rare, and its future (TLS, HTTP/2 handshake) is
                // several KiB that every request's future would otherwise carry and move.
                None => (
                    Box::pin(self.connect(slot, &scheme, &authority)).await?,
                    false,
                ),
            };
            let tried = match conn {
                Conn::H1(sender) => {
                    // HTTP/1 sends the origin form and names the host in `Host`.
                    let p = std::mem::replace(&mut path, PathAndQuery::from_static("/"));
                    *req.uri_mut() = Uri::from(p);
                    if !req.headers().contains_key(http::header::HOST) {
                        let host = http::HeaderValue::from_str(authority.as_str())
                            .map_err(|e| ForwardError::BadUpstreamRequest(e.into()))?;
                        req.headers_mut().insert(http::header::HOST, host);
                    }
                    self.try_h1(slot, sender, req, &scheme, &authority).await
                }
                Conn::H2(mut sender) => {
                    req.headers_mut().remove(http::header::HOST);
                    *req.uri_mut() = absolute(&scheme, &authority, &path)?;
                    match sender.try_send_request(req).await {
                        Ok(resp) => Tried::Answered(resp, None),
                        Err(mut e) => match e.take_message() {
                            Some(r) => {
                                self.forget_h2(slot, &scheme, &authority);
                                Tried::Unsent(r)
                            }
                            None => Tried::Failed(e.into_error()),
                        },
                    }
                }
            };
            match tried {
                Tried::Answered(resp, back) => return Ok((resp, back)),
                Tried::Failed(e) => return Err(ForwardError::Unreachable(e)),
                // A pooled connection the upstream had closed: try the next, or a new one.
                Tried::Unsent(r) if pooled => {
                    if let Some(p) = r.uri().path_and_query() {
                        path = p.clone();
                    }
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

    async fn try_h1(
        &self,
        slot: usize,
        mut sender: http1::SendRequest<UpstreamBody>,
        req: Request<UpstreamBody>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Tried {
        // A connection given back as its response ended may not have taken in the end yet.
        if sender.ready().await.is_err() {
            return Tried::Unsent(req);
        }
        match sender.try_send_request(req).await {
            Ok(resp) => Tried::Answered(
                resp,
                Some(Checkin {
                    pools: self.pools.clone(),
                    slot,
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    sender,
                }),
            ),
            Err(mut e) => match e.take_message() {
                Some(r) => Tried::Unsent(r),
                None => Tried::Failed(e.into_error()),
            },
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

fn absolute(
    scheme: &Scheme,
    authority: &Authority,
    path: &PathAndQuery,
) -> Result<Uri, ForwardError> {
    Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path.clone())
        .build()
        .map_err(ForwardError::BadUpstreamRequest)
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
