//! Bodies that must not wait forever: a request body that stalls (`limits.body_timeout`)
//! and a response body whose upstream goes silent (`limits.idle_timeout`) both end with an
//! [`IdleTimedOut`] error naming the side, which the steps map to 408 or 504.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

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

/// The first error of type `T` in `e`'s source chain.
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
