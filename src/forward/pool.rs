//! The upstream connections, pooled per worker thread: a request takes an idle one from its
//! thread's pool under that pool's own lock, and an HTTP/1 connection goes back to the same
//! pool when its response body has ended.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};

use super::UpstreamBody;

/// An HTTP/1 connection is idle in at most this many copies per thread and host; past it, a
/// returned connection is closed.
const MAX_IDLE_PER_HOST: usize = 256;

/// The pools, one per worker thread (threads past their number share one). A connection
/// goes back to the pool it came from: the runtime moves tasks between threads, and a
/// connection given back where its response happened to end would leave one thread's pool
/// empty, opening new connections, while another's grew.
pub(super) struct Pools(Box<[Mutex<Pool>]>);

impl Pools {
    pub(super) fn new() -> Self {
        let n = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
        Self((0..n * 2).map(|_| Mutex::default()).collect())
    }

    /// The index of this thread's pool.
    pub(super) fn mine(&self) -> usize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        SLOT.with(|s| *s) % self.0.len()
    }

    /// Closes idle connections older than `idle` in every thread's pool.
    pub(super) fn sweep(&self, idle: Duration, now: Instant) {
        for p in &self.0 {
            p.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .sweep(idle, now);
        }
    }

    pub(super) fn lock(&self, i: usize) -> std::sync::MutexGuard<'_, Pool> {
        self.0[i].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One thread's connections, by host. A linear search: a deployment talks to a handful of
/// hosts, and comparing a few authorities costs less than hashing one.
#[derive(Default)]
pub(super) struct Pool {
    hosts: Vec<Host>,
}

pub(super) struct Host {
    scheme: Scheme,
    authority: Authority,
    /// An HTTP/2 connection carries every request to its host from this thread at once.
    pub(super) h2: Option<http2::SendRequest<UpstreamBody>>,
    /// Idle HTTP/1 connections, oldest first; the newest is taken first.
    pub(super) idle: VecDeque<(http1::SendRequest<UpstreamBody>, Instant)>,
}

/// Authorities compare without case; the same provider's URI gives the same bytes every time,
/// so those are compared first (a plain `memcmp`).
fn same_authority(a: &Authority, b: &Authority) -> bool {
    a.as_str() == b.as_str() || a == b
}

impl Pool {
    pub(super) fn host(&mut self, scheme: &Scheme, authority: &Authority) -> &mut Host {
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

    pub(super) fn sweep(&mut self, idle: Duration, now: Instant) {
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

pub(super) enum Conn {
    H1(http1::SendRequest<UpstreamBody>),
    H2(http2::SendRequest<UpstreamBody>),
}

/// Where a finished HTTP/1 connection goes back to.
pub(super) struct Checkin {
    pub(super) pools: Arc<Pools>,
    pub(super) slot: usize,
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    pub(super) sender: http1::SendRequest<UpstreamBody>,
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
    pub(super) fn new(inner: Incoming, back: Option<Checkin>) -> Self {
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
