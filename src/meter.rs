//! The meter step: the response body. It streams through frame by frame, and one body runs
//! the response's filters over each frame in a fixed order:
//!
//! 1. the source: the upstream body behind its idle timeout (`timeouts::IdleTimeout`), its
//!    first frame already read so a body that fails at once was answered 502;
//! 2. the pool lease: the key counts as in flight until the stream ends;
//! 3. the budget cut (`cut::CutFilter`): past the allowance, the stream ends at the next event
//!    boundary with an error event, and the upstream body is dropped (the request cancelled);
//! 4. the meter: the usage scanner sees every byte that goes out; the recorder fires exactly
//!    once, at the end of the stream, on an upstream error, or on drop (the client went away),
//!    so a cancelled stream is still metered for what was sent;
//! 5. the usage strip (`stream_usage::StripUsage`), when byokd asked for usage the app did not.
//!
//! One struct, no nested bodies: a frame is polled once and passes each filter in place.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

use crate::cut::CutFilter;
use crate::pool::Lease;
use crate::record::{Outcome, Recorder};
use crate::stream_usage::StripUsage;
use crate::usage::{Scanner, UsageScanner};

/// The scanner and the recorder: usage counted as bytes go out, recorded once.
struct Meter {
    scanner: Scanner,
    recorder: Option<Recorder>,
    bytes: u64,
}

impl Meter {
    fn on_data(&mut self, d: &Bytes) {
        self.bytes += d.len() as u64;
        self.scanner.feed_bytes(d);
    }

    fn end(&mut self, outcome: Outcome) {
        if let Some(r) = self.recorder.take() {
            let usage = self.scanner.finish();
            r.finish(usage, outcome, self.bytes);
        }
    }
}

/// The response body the app receives.
pub struct ResponseBody<B> {
    /// `None` once the stream ended or was cut: dropping it cancels the upstream request.
    source: Option<B>,
    /// Boxed: the response is moved several times on its way to the connection, and a
    /// kilobyte of filter state moved with it cost more than this one allocation.
    f: Box<Filters>,
}

/// The filters after the source, in order.
struct Filters {
    lease: Option<Lease>,
    cut: Option<CutFilter>,
    meter: Meter,
    strip: Option<StripUsage>,
    /// What goes out after the source ended: the cut's error event, the strip's held bytes.
    tail: Option<Bytes>,
}

impl<B> ResponseBody<B> {
    pub fn new(
        source: B,
        lease: Option<Lease>,
        cut: Option<CutFilter>,
        scanner: Scanner,
        recorder: Recorder,
        strip: Option<StripUsage>,
    ) -> Self {
        Self {
            source: Some(source),
            f: Box::new(Filters {
                lease,
                cut,
                meter: Meter {
                    scanner,
                    recorder: Some(recorder),
                    bytes: 0,
                },
                strip,
                tail: None,
            }),
        }
    }

    /// The source is done (ended, failed, or cut): release the lease, record, and keep what
    /// the strip held back for the last frame. `last` goes out before it.
    fn end(&mut self, outcome: Outcome, last: Option<Bytes>) {
        self.source = None;
        let f = &mut *self.f;
        f.lease = None;
        f.meter.end(outcome);
        let held = f.strip.as_mut().map(StripUsage::finish);
        f.tail = match (last, held) {
            (Some(a), Some(b)) if !b.is_empty() => {
                let mut both = BytesMut::with_capacity(a.len() + b.len());
                both.extend_from_slice(&a);
                both.extend_from_slice(&b);
                Some(both.freeze())
            }
            (Some(a), _) => Some(a),
            (None, b) => b.filter(|b| !b.is_empty()),
        };
    }

    /// A data frame as it leaves: through the strip when there is one.
    fn out(&mut self, d: Bytes) -> Bytes {
        match &mut self.f.strip {
            Some(s) => s.transform(&d),
            None => d,
        }
    }
}

impl<B> Drop for ResponseBody<B> {
    fn drop(&mut self) {
        self.f.meter.end(Outcome::ClientGone);
    }
}

impl<B> Body for ResponseBody<B>
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
        loop {
            let Some(source) = this.source.as_mut() else {
                return Poll::Ready(this.f.tail.take().map(|t| Ok(Frame::data(t))));
            };
            let frame = match Pin::new(&mut *source).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.end(Outcome::Complete, None);
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    this.end(Outcome::UpstreamError, None);
                    // What the strip held is dropped with the failed stream.
                    this.f.tail = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            let ended = source.is_end_stream();
            let data = match frame.into_data() {
                Ok(d) => d,
                Err(trailers) => {
                    if ended {
                        this.end(Outcome::Complete, None);
                    }
                    return Poll::Ready(Some(Ok(trailers)));
                }
            };
            let cut = this.f.cut.as_mut().and_then(|c| c.on_data(&data));
            this.f.meter.on_data(&data);
            let out = this.out(data);
            if let Some(event) = cut {
                this.f.meter.on_data(&event);
                let event = this.out(event);
                this.end(Outcome::Complete, Some(event).filter(|e| !e.is_empty()));
            } else if ended {
                this.end(Outcome::Complete, None);
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.f.tail.is_none()
            && self.f.strip.as_ref().is_none_or(StripUsage::holds_nothing)
            && self.source.as_ref().is_none_or(|s| s.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            // Filters that may change the length make it unknown.
            Some(s) if self.f.strip.is_none() && self.f.cut.is_none() => s.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, OnceLock};
    use std::time::Instant;

    use http_body_util::BodyExt;

    use super::*;
    use crate::cut::{CutPlan, CutState};
    use crate::metrics::{LabelCaps, Metrics};
    use crate::usage::{Capability, scanner_for};

    struct Frames(VecDeque<&'static str>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|s| Ok(Frame::data(Bytes::from(s)))))
        }
    }

    fn recorder(metrics: &Arc<Metrics>) -> Recorder {
        Recorder {
            metrics: metrics.clone(),
            tenant: Arc::from("acme"),
            end_user: None,
            provider: Arc::from("p"),
            provider_idx: 0,
            status: http::StatusCode::OK,
            started: Instant::now(),
            request_id: crate::vocab::RequestId::new(),
            key_source: crate::vocab::KeySource::Tenant,
            price: None,
            capability: Capability::Tokens,
            request_model: Arc::new(OnceLock::new()),
            characters: 0,
            compressed: false,
            admission: None,
            cut: None,
            header_usage: None,
        }
    }

    /// The filters in order: the cut ends the stream at a boundary with its event, the meter
    /// counts what went out (the usage in the last chunk before the cut), the strip removes
    /// what byokd added, and the recorder fires once.
    #[tokio::test]
    async fn filters_run_in_order_and_the_recorder_fires_once() {
        let metrics = Arc::new(
            Metrics::new(
                LabelCaps::default(),
                &["p"],
                Default::default(),
                crate::ledger::Ledger::in_memory(),
            )
            .unwrap(),
        );
        let state = Arc::new(CutState::default());
        let cut = CutFilter::new(CutPlan {
            allowance: 250,
            input_nanos: 0,
            output_nanos_per_token: 100,
            shape: crate::provider::ErrorShape::default(),
            state: state.clone(),
        });
        let source = Frames(VecDeque::from([
            "data: {\"model\":\"m\",\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n",
            "data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n",
            "data: {\"a\":3",
            "}\n\n",
            "data: {\"a\":4}\n\n",
        ]));
        let dialect = crate::provider::kind("openai").and_then(|k| k.usage());
        let body = ResponseBody::new(
            source,
            None,
            Some(cut),
            scanner_for(dialect, Some(b"text/event-stream")),
            recorder(&metrics),
            Some(StripUsage::new()),
        );
        let out = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with(
                "data: {\"model\":\"m\",\"choices\":[{\"delta\":{}}]}\n\ndata: {\"a\":3}\n\n"
            ),
            "the strip edited the chunk and dropped the usage-only one: {text}"
        );
        assert!(text.contains("budget_exceeded"), "{text}");
        assert!(!text.contains("\"a\":4"), "nothing after the cut: {text}");
        assert!(state.cut.load(Ordering::Relaxed));
        let rendered = String::from_utf8(metrics.render()).unwrap();
        let requests: Vec<&str> = rendered
            .lines()
            .filter(|l| l.starts_with("byokd_requests_total{"))
            .collect();
        assert_eq!(requests.len(), 1, "{rendered}");
        assert!(
            requests[0].ends_with(" 1"),
            "recorded once: {}",
            requests[0]
        );
        assert!(
            rendered.contains("type=\"output\"} 4"),
            "the meter saw the usage the strip removed: {rendered}"
        );
    }
}
