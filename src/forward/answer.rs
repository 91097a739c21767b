//! One upstream request on its way out: where it goes, and the future of its answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;

use super::pool::{Checkin, Pools};
use super::{ForwardError, Upstream, UpstreamBody};

/// How one try on one connection ended.
pub(super) enum Tried {
    Answered(Response<Incoming>, Option<Checkin>),
    /// The connection was gone before the request went out: the request comes back.
    Unsent(Request<UpstreamBody>),
    Failed(hyper::Error),
}

pub(super) type TrySend = hyper::client::conn::TrySendError<Request<UpstreamBody>>;

impl From<TrySend> for Tried {
    fn from(mut e: TrySend) -> Self {
        match e.take_message() {
            Some(r) => Self::Unsent(r),
            None => Self::Failed(e.into_error()),
        }
    }
}

/// Where one request goes: its pool and host, and its path (taken out of the URI, which each
/// connection's protocol writes in its own form).
pub(super) struct Target {
    pub(super) slot: usize,
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    path: PathAndQuery,
}

impl Target {
    pub(super) fn of(req: &mut Request<UpstreamBody>, slot: usize) -> Result<Self, ForwardError> {
        // Taken apart, not cloned: cloning a path made from a `String` allocates.
        let uri = std::mem::take(req.uri_mut()).into_parts();
        let (Some(scheme), Some(authority)) = (uri.scheme, uri.authority) else {
            // The rewrite step always builds an absolute URI from the provider's base URL.
            return Err(ForwardError::Connect(
                "the upstream URI has no scheme or host".into(),
            ));
        };
        Ok(Self {
            slot,
            scheme,
            authority,
            path: uri
                .path_and_query
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        })
    }

    /// HTTP/1 sends the origin form and names the host in `Host`.
    pub(super) fn h1_form(&mut self, req: &mut Request<UpstreamBody>) -> Result<(), ForwardError> {
        let p = std::mem::replace(&mut self.path, PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(p);
        if !req.headers().contains_key(http::header::HOST) {
            let host = http::HeaderValue::from_str(self.authority.as_str())
                .map_err(|e| ForwardError::BadUpstreamRequest(e.into()))?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        Ok(())
    }

    /// HTTP/2 sends the absolute form and no `Host`.
    pub(super) fn h2_form(&self, req: &mut Request<UpstreamBody>) -> Result<(), ForwardError> {
        req.headers_mut().remove(http::header::HOST);
        *req.uri_mut() = absolute(&self.scheme, &self.authority, &self.path)?;
        Ok(())
    }

    /// A request a connection gave back unsent: its path, for the next connection's form.
    pub(super) fn taken_back(&mut self, req: &Request<UpstreamBody>) {
        if let Some(p) = req.uri().path_and_query() {
            self.path = p.clone();
        }
    }

    pub(super) fn checkin(
        &self,
        pools: &Arc<Pools>,
        sender: http1::SendRequest<UpstreamBody>,
    ) -> Checkin {
        Checkin {
            pools: pools.clone(),
            slot: self.slot,
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            sender,
        }
    }
}

pin_project_lite::pin_project! {
    /// One upstream request's answer: see [`Upstream::request`].
    #[project = AnswerProj]
    pub(super) enum Answer<'a, F> {
        /// Taken by a ready pooled connection.
        Pooled {
            #[pin]
            answer: F,
            back: Option<Checkin>,
            target: Option<Target>,
            up: &'a Upstream,
        },
        Slow {
            fut: Pin<Box<dyn Future<Output = AnswerResult> + Send + 'a>>,
        },
    }
}

pub(super) type AnswerResult = Result<(Response<Incoming>, Option<Checkin>), ForwardError>;

impl<F> Answer<'_, F> {
    pub(super) fn failed(e: ForwardError) -> Self {
        Self::Slow {
            fut: Box::pin(std::future::ready(Err(e))),
        }
    }
}

impl<F> Future for Answer<'_, F>
where
    F: Future<Output = Result<Response<Incoming>, TrySend>>,
{
    type Output = AnswerResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<AnswerResult> {
        let (req, target, up) = match self.as_mut().project() {
            AnswerProj::Slow { fut } => return fut.as_mut().poll(cx),
            AnswerProj::Pooled {
                answer,
                back,
                target,
                up,
            } => match std::task::ready!(answer.poll(cx)) {
                Ok(resp) => return Poll::Ready(Ok((resp, back.take()))),
                Err(mut e) => {
                    let (Some(req), Some(mut t)) = (e.take_message(), target.take()) else {
                        return Poll::Ready(Err(ForwardError::Unreachable(e.into_error())));
                    };
                    // An HTTP/2 connection that refused a request unsent has closed.
                    if back.is_none() {
                        up.forget_h2(t.slot, &t.scheme, &t.authority);
                    }
                    t.taken_back(&req);
                    (req, t, *up)
                }
            },
        };
        // The pooled connection had closed: the next one, or a new one.
        self.set(Answer::Slow {
            fut: Box::pin(up.request_slow(req, target, None)),
        });
        self.poll(cx)
    }
}

pub(super) fn absolute(
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
