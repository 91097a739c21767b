//! The meter step: the response body streams through untouched, frame by frame; the usage
//! scanner sees each data frame, and the recorder fires exactly once at its end.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::record::{Outcome, Recorder};
use crate::usage::{Scanner, UsageScanner};

/// Wraps the upstream response body: frames pass through unchanged; the scanner sees each
/// data frame; the recorder fires exactly once, at end of stream, on error, or on drop
/// (client went away), so a cancelled stream is still metered for what was sent.
pub struct MeteredBody<B> {
    inner: B,
    scanner: Scanner,
    recorder: Option<Recorder>,
    bytes: u64,
}

impl<B> MeteredBody<B> {
    pub fn new(inner: B, scanner: Scanner, recorder: Recorder) -> Self {
        Self {
            inner,
            scanner,
            recorder: Some(recorder),
            bytes: 0,
        }
    }

    fn complete(&mut self, outcome: Outcome) {
        if let Some(r) = self.recorder.take() {
            let usage = self.scanner.finish();
            r.finish(usage, outcome, self.bytes);
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.complete(Outcome::ClientGone);
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    this.scanner.feed(data);
                }
                if this.inner.is_end_stream() {
                    this.complete(Outcome::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.complete(Outcome::UpstreamError),
            Poll::Ready(None) => this.complete(Outcome::Complete),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
