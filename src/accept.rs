//! The listener step: accept TCP connections, optionally terminate TLS (mTLS with a client
//! CA), serve HTTP/1.1 and HTTP/2 (cleartext prior knowledge, or ALPN over TLS) with
//! hyper-util, and drain gracefully on shutdown. Each connection's peer (address, verified
//! client certificate) is read once and handed to every request on it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::tls::ClientCert;

/// The request broke a configured size limit.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("request headers exceed the configured limit")]
    HeadersTooLarge,
    #[error("request body exceeds the configured limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("the request body could not be read: the client closed or broke the upload")]
    ClientClosed,
    #[error("the request body stalled: nothing arrived within the body timeout")]
    BodyTimeout,
    #[error("byokd holds too many request bodies in memory right now; retry shortly")]
    Overloaded,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Set when the connection is TLS with a verified client certificate.
    pub client_cert: Option<ClientCert>,
}

impl Peer {
    /// A client on 127.0.0.1 reaching a `[::]` listener shows up as `::ffff:127.0.0.1`: still
    /// loopback.
    pub fn loopback(&self) -> bool {
        self.addr.ip().to_canonical().is_loopback()
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host` header; without one, or with
/// two, it must be refused with 400 (two proxies could otherwise disagree on its target).
/// HTTP/2 names the target in `:authority`, and HTTP/1.0 may omit it.
pub fn host_ok(version: http::Version, headers: &http::HeaderMap) -> bool {
    if version != http::Version::HTTP_11 {
        return true;
    }
    let mut hosts = headers.get_all(http::header::HOST).iter();
    hosts.next().is_some() && hosts.next().is_none()
}

/// The connection builder for the data listener, with the configured header limits. hyper's
/// own limits sit above ours so byokd, not hyper, answers an oversize request, in the
/// provider's error shape.
///
/// hyper's header-read timer is off: it boxes and arms a timer for every request head, even
/// one already in the buffer (about 1,100 instructions a request). The connection's own idle
/// timer bounds the wait for a head instead ([`ConnLimits::header_timeout`]).
pub fn data_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size((limits.max_header_bytes * 2).max(16 * 1024))
        .max_headers(limits.max_headers * 2 + 16);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX));
    b
}

/// The admin listener's builder: small requests only. Slow heads are bounded as on the data
/// listener, by the connection's idle timer.
pub fn admin_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(None);
    b.http2().timer(TokioTimer::new());
    b
}

/// How long a connection may sit with no request in flight before byokd closes it (HTTP/1.1:
/// closed; HTTP/2: GOAWAY). Per connection, so an idle client costs a socket for at most this.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub keepalive_timeout: Duration,
    /// How long a connection may wait for a request head with none in flight, when it has not
    /// shown itself to be HTTP/2: an HTTP/1 connection's next head (or a head trickling in),
    /// and any connection's first request. An HTTP/2 connection between requests is bound by
    /// `keepalive_timeout` alone.
    pub header_timeout: Duration,
    pub drain: Duration,
}

impl ConnLimits {
    /// How long `state`'s connection may go on with no request in flight.
    fn idle_bound(&self, state: &ConnState) -> Duration {
        if state.h2.load(Ordering::Relaxed) {
            self.keepalive_timeout
        } else {
            self.keepalive_timeout.min(self.header_timeout)
        }
    }
}

/// What one connection is doing: requests in flight, and when the last one ended.
#[derive(Debug)]
struct ConnState {
    born: tokio::time::Instant,
    active: AtomicU32,
    /// Milliseconds after `born` at which the last response ended (or the connection was
    /// ready for its first request).
    last_ms: AtomicU64,
    /// A request came over HTTP/2: no request head is awaited between requests.
    h2: std::sync::atomic::AtomicBool,
}

impl ConnState {
    fn idle_since(&self) -> tokio::time::Instant {
        self.born + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Notes now as the moment the connection last had nothing to do.
    fn mark_idle(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
}

/// Held by a response body: the connection counts as busy until the body ends or drops.
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(state: &Arc<ConnState>, version: http::Version) -> Self {
        state.active.fetch_add(1, Ordering::Relaxed);
        if version == http::Version::HTTP_2 && !state.h2.load(Ordering::Relaxed) {
            state.h2.store(true, Ordering::Relaxed);
        }
        Self(state.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.mark_idle();
        self.0.active.fetch_sub(1, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its connection marked busy while it streams.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        busy: Option<Busy>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.busy.take();
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

/// Serves `listener` until `shutdown` flips to true, then stops accepting, asks every open
/// connection to finish (HTTP/2: GOAWAY) and waits up to `limits.drain` for in-flight requests
/// and streams to end.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    limits: ConnLimits,
) where
    F: Fn(Request<Incoming>, Arc<Peer>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Connection tasks live here so the ones still open after the drain can be cut.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let state = Arc::new(ConnState {
                    born: tokio::time::Instant::now(),
                    active: AtomicU32::new(0),
                    last_ms: AtomicU64::new(0),
                    h2: std::sync::atomic::AtomicBool::new(false),
                });
                let svc = {
                    let state = state.clone();
                    move |peer: Arc<Peer>| service_fn(move |req| {
                        let busy = Busy::new(&state, req.version());
                        // `map`, not an `async` block: that would hold the handler's future
                        // twice over.
                        futures_util::FutureExt::map(h(req, peer.clone()), move |resp| {
                            Ok::<_, Infallible>(resp.map(|inner| Tracked { inner, busy: Some(busy) }))
                        })
                    })
                };
                let stop = shutdown.clone();
                match &tls {
                    None => {
                        let peer = Arc::new(Peer { addr, client_cert: None });
                        let conn = builder.serve_connection(TokioIo::new(stream), svc(peer)).into_owned();
                        conns.spawn(drive(conn, state, limits, stop));
                    }
                    Some((acceptor, handshake_timeout)) => {
                        // The handshake runs in the connection's task, so a slow or hostile
                        // client never holds up the accept loop. Connections still in their
                        // handshake at shutdown are simply dropped with the task set.
                        let (acceptor, timeout) = (acceptor.clone(), *handshake_timeout);
                        let builder = builder.clone();
                        conns.spawn(async move {
                            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::info!(peer = %addr, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let client_cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(crate::tls::client_cert);
                            let peer = Arc::new(Peer { addr, client_cert });
                            let conn = builder.serve_connection(TokioIo::new(tls), svc(peer)).into_owned();
                            drive(conn, state, limits, stop).await;
                        });
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let open = conns.len();
    let drained = tokio::time::timeout(limits.drain, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open,
            drain = ?limits.drain,
            "drain timeout reached; closing remaining connections"
        );
    }
    conns.shutdown().await;
}

/// Runs one connection to its end: asks it to finish when the server shuts down, or when it
/// has had no request in flight for its idle bound ([`ConnLimits::idle_bound`]). Asked while
/// a later request head is only partly in, hyper closes the connection without an answer, as
/// its own header-read timer did; a first head it waits for, so that connection is dropped
/// [`CLOSE_GRACE`] later.
///
/// The connection is polled on every wake-up of its task (about three a request); the stop
/// signal and the idle timer only when one of them woke it. They are polled with a waker that
/// notes the wake-up before passing it on: polling a watch receiver and a timer on each of the
/// connection's wake-ups, as a `select!` does, cost several hundred instructions a request.
async fn drive<C>(
    conn: C,
    state: Arc<ConnState>,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulConn,
{
    // Idle from now, not from the accept: a TLS handshake's time does not count against the
    // first request head (hyper's own timer started here too).
    state.mark_idle();
    let mut conn = std::pin::pin!(conn);
    let mut idle = std::pin::pin!(tokio::time::sleep(limits.idle_bound(&state)));
    let mut closing = *stop.borrow_and_update();
    if closing {
        conn.as_mut().shutdown_gracefully();
    }
    // Ends when the server shuts down; a dropped sender means the server is gone: finish too.
    let mut stopped = std::pin::pin!(async move {
        while !*stop.borrow_and_update() {
            if stop.changed().await.is_err() {
                return;
            }
        }
    });
    let side = Arc::new(SideWake::default());
    let side_waker = std::task::Waker::from(side.clone());
    // The idle bound passed with nothing in flight: the connection was asked to close (or was
    // already draining), and is dropped if it is still open a grace period later.
    let mut asked = false;
    let r = std::future::poll_fn(|cx| {
        side.task.register(cx.waker());
        loop {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            if !side.fired.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut side_cx = Context::from_waker(&side_waker);
            if !closing && stopped.as_mut().poll(&mut side_cx).is_ready() {
                closing = true;
                conn.as_mut().shutdown_gracefully();
                continue;
            }
            if idle.as_mut().poll(&mut side_cx).is_pending() {
                return Poll::Pending;
            }
            let quiet = state.active.load(Ordering::Acquire) == 0;
            let since = state.idle_since();
            let now = tokio::time::Instant::now();
            if asked && quiet && since + CLOSE_GRACE <= now {
                // Asked to close (or the server is draining) and still open, with nothing in
                // flight for a grace period: a first request head that never completed, which
                // hyper waits for before it closes. Nothing is lost by dropping it.
                return Poll::Ready(Ok(()));
            }
            let bound = limits.idle_bound(&state);
            // Every deadline set here is in the future: the next turn finds the timer pending.
            let at = if !quiet {
                now + bound
            } else if since + bound <= now {
                if !asked {
                    asked = true;
                    if !closing {
                        closing = true;
                        conn.as_mut().shutdown_gracefully();
                    }
                }
                now + CLOSE_GRACE
            } else {
                since + bound
            };
            idle.as_mut().reset(at);
            // Polled again so the timer registers its new deadline.
            side.fired.store(true, Ordering::Release);
        }
    })
    .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// How long a connection asked to close for being idle may take to close before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The waker the stop signal and the idle timer of one connection are polled with: it marks
/// that one of them fired, then wakes the connection's task. Starts marked, so the first poll
/// registers both.
struct SideWake {
    fired: std::sync::atomic::AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Default for SideWake {
    fn default() -> Self {
        Self {
            fired: std::sync::atomic::AtomicBool::new(true),
            task: futures_util::task::AtomicWaker::new(),
        }
    }
}

impl std::task::Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// hyper-util's connection futures, which can be asked to finish their in-flight requests
/// and close.
trait GracefulConn {
    fn shutdown_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulConn for auto::Connection<'static, I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The process-wide bound on request-body bytes held in memory (`limits.max_buffered_bytes`):
/// bodies byokd reads whole before forwarding take from it, so many slow or large uploads at
/// once cannot grow memory without limit.
#[derive(Debug)]
pub struct BufferBudget {
    used: AtomicUsize,
    max: usize,
}

/// The buffered bytes of one request, given back when it drops. It borrows the budget: no
/// shared reference count is touched per request.
#[derive(Debug)]
pub struct BufferPermit<'a> {
    budget: &'a BufferBudget,
    held: usize,
}

/// Taking more would pass `limits.max_buffered_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request bodies held in memory would pass limits.max_buffered_bytes")]
pub struct BufferFull;

impl BufferBudget {
    pub fn new(max: u64) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max: usize::try_from(max).unwrap_or(usize::MAX),
        }
    }

    pub fn permit(&self) -> BufferPermit<'_> {
        BufferPermit {
            budget: self,
            held: 0,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl BufferPermit<'_> {
    pub fn grow(&mut self, n: usize) -> Result<(), BufferFull> {
        let b = &self.budget;
        let mut cur = b.used.load(Ordering::Relaxed);
        loop {
            let next = cur
                .checked_add(n)
                .filter(|x| *x <= b.max)
                .ok_or(BufferFull)?;
            match b
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        self.held += n;
        Ok(())
    }
}

impl Drop for BufferPermit<'_> {
    fn drop(&mut self) {
        if self.held > 0 {
            self.budget.used.fetch_sub(self.held, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub header_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    /// Longest pause allowed while the client sends its request body (408 past it).
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY).
    pub keepalive_timeout: Duration,
    /// Request-body bytes byokd may hold in memory at once, across all connections.
    pub max_buffered_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_body_bytes: 32 * 1024 * 1024,
            header_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(300),
            drain_timeout: Duration::from_secs(25),
            body_timeout: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(75),
            max_buffered_bytes: 64 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_loopback_is_loopback() {
        let peer = |a: &str| Peer {
            addr: a.parse().unwrap(),
            client_cert: None,
        };
        assert!(peer("[::ffff:127.0.0.1]:5000").loopback());
        assert!(peer("[::1]:5000").loopback());
        assert!(peer("127.0.0.1:5000").loopback());
        assert!(!peer("[::ffff:10.0.0.1]:5000").loopback());
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        let mut h = http::HeaderMap::new();
        assert!(!host_ok(http::Version::HTTP_11, &h));
        assert!(host_ok(http::Version::HTTP_2, &h));
        assert!(host_ok(http::Version::HTTP_10, &h));
        h.append(http::header::HOST, "a".parse().unwrap());
        assert!(host_ok(http::Version::HTTP_11, &h));
        h.append(http::header::HOST, "b".parse().unwrap());
        assert!(!host_ok(http::Version::HTTP_11, &h));
    }

    #[test]
    fn buffer_budget_is_shared_and_given_back() {
        let b = BufferBudget::new(100);
        let mut p1 = b.permit();
        let mut p2 = b.permit();
        p1.grow(60).unwrap();
        assert!(p2.grow(50).is_err(), "60 + 50 passes the bound of 100");
        p2.grow(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(p1);
        assert_eq!(b.used(), 40);
        p2.grow(60).unwrap();
        drop(p2);
        assert_eq!(b.used(), 0);
    }
}
