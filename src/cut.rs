//! `budget.on_exhausted: cut`: a stream that crosses the tenant's budget mid-flight is ended
//! at the next event boundary with an error event in the provider's shape, and the upstream
//! request is dropped (cancelled), so the spend stops growing.
//!
//! Usage arrives only at the end of a stream, so while it runs the cost is estimated: one
//! output token per SSE `data:` event (chat streams carry about a token per event)
//! at the model's output price, plus the request's estimated input. A stream that is cut
//! never reports usage; that estimate is what gets billed for it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::provider::ErrorShape;

/// What the cut guard saw, shared with the recorder.
#[derive(Debug, Default)]
pub struct CutState {
    pub events: AtomicU64,
    pub input_tokens: u64,
    pub cut: AtomicBool,
}

/// The guard's settings for one stream.
#[derive(Debug, Clone)]
pub struct CutPlan {
    /// Nano-dollars this stream may cost: the budget left when it was admitted.
    pub allowance: u64,
    pub input_nanos: u64,
    pub output_nanos_per_token: u64,
    pub shape: ErrorShape,
    pub state: Arc<CutState>,
}

/// A body that passes frames through untouched, or ends the stream cleanly once its
/// estimated cost passes the allowance. Inactive (`plan: None`) it costs one branch a frame.
pub struct CutBody<B> {
    inner: Option<B>,
    plan: Option<CutPlan>,
    events: u64,
    crossed: bool,
    at_boundary: bool,
    pending: Option<Bytes>,
}

impl<B> CutBody<B> {
    pub fn new(inner: B, plan: Option<CutPlan>) -> Self {
        Self {
            inner: Some(inner),
            plan,
            events: 0,
            crossed: false,
            at_boundary: true,
            pending: None,
        }
    }
}

fn data_events(d: &[u8]) -> u64 {
    memchr::memmem::find_iter(d, b"\ndata:").count() as u64 + u64::from(d.starts_with(b"data:"))
}

fn error_event(shape: ErrorShape) -> Bytes {
    shape.stream_error(
        http::StatusCode::TOO_MANY_REQUESTS,
        "budget_exceeded",
        "byokd: this tenant's monthly budget was exhausted during the stream; it was ended",
    )
}

impl<B> Body for CutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(ev) = this.pending.take() {
            // Dropping the upstream body cancels the upstream request.
            this.inner = None;
            return Poll::Ready(Some(Ok(Frame::data(ev))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        let Some(plan) = &this.plan else {
            return polled;
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(d) = frame.data_ref()
        {
            this.events += data_events(d);
            plan.state.events.store(this.events, Ordering::Relaxed);
            if !d.is_empty() {
                this.at_boundary = d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n");
            }
            let cost = plan
                .input_nanos
                .saturating_add(this.events.saturating_mul(plan.output_nanos_per_token));
            if cost > plan.allowance {
                this.crossed = true;
            }
            if this.crossed && this.at_boundary {
                plan.state.cut.store(true, Ordering::Relaxed);
                tracing::warn!(
                    events = this.events,
                    "budget exhausted mid-stream; ending it"
                );
                this.pending = Some(error_event(plan.shape));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.plan, &self.inner) {
            (None, Some(b)) => b.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn cuts_at_an_event_boundary_with_a_provider_shaped_event() {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = [
            "data: {\"a\":1}\n\ndata: {\"a\":2}\n\n",
            "data: {\"a\":3",
            "}\n\n",
            "data: {\"a\":4}\n\n",
        ]
        .into_iter()
        .map(|s| Ok(Frame::data(Bytes::from(s))))
        .collect();
        let state = Arc::new(CutState::default());
        let body = CutBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            Some(CutPlan {
                allowance: 250,
                input_nanos: 0,
                output_nanos_per_token: 100,
                // A wire that names its stream events: the error event is named too.
                shape: ErrorShape::new(
                    |_, _, m| serde_json::json!({ "type": "error", "error": { "message": m } }),
                    Some("error"),
                ),
                state: state.clone(),
            }),
        );
        let out = body.collect().await.unwrap().to_bytes();
        let text = String::from_utf8(out.to_vec()).unwrap();
        // The third event crosses 250 mid-frame: it is completed, then the error, then the end.
        assert!(text.starts_with("data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: {\"a\":3}\n\n"));
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let json = last.strip_prefix("event: error\ndata: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["type"], "error", "{text}");
        assert!(v["error"]["message"].as_str().unwrap().contains("budget"));
        assert!(!text.contains("\"a\":4"), "{text}");
        assert!(state.cut.load(Ordering::Relaxed));
        assert_eq!(state.events.load(Ordering::Relaxed), 3);
    }
}
