//! `budget.on_exhausted: cut`: a stream that crosses the tenant's budget mid-flight is ended
//! at the next event boundary with an error event in the provider's shape, and the upstream
//! request is dropped (cancelled), so the spend stops growing.
//!
//! Usage arrives only at the end of a stream, so while it runs the cost is estimated: one
//! output token per SSE `data:` event (chat streams carry about a token per event)
//! at the model's output price, plus the request's estimated input. A stream that is cut
//! never reports usage; that estimate is what gets billed for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;

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

/// The cut filter of a response body: counts the stream's events and, once its estimated
/// cost passes the allowance, says to end the stream at the next event boundary with an
/// error event in the provider's shape.
#[derive(Debug)]
pub struct CutFilter {
    plan: CutPlan,
    events: u64,
    crossed: bool,
    at_boundary: bool,
    /// A binary event stream (a wire whose error shape is framed): messages framed by their
    /// length, counted as events.
    framing: Option<Framing>,
}

/// Where a length-framed stream is: the bytes of the current message's length read so far,
/// then how many of its bytes are still to come.
#[derive(Debug, Default)]
struct Framing {
    prelude: Vec<u8>,
    left: usize,
}

impl Framing {
    /// Messages completed in `d`; after it, whether the stream is between messages.
    fn feed(&mut self, mut d: &[u8]) -> (u64, bool) {
        let mut done = 0;
        while !d.is_empty() {
            if self.left == 0 {
                let take = (4 - self.prelude.len()).min(d.len());
                self.prelude.extend_from_slice(&d[..take]);
                d = &d[take..];
                if let Ok(b) = <[u8; 4]>::try_from(self.prelude.as_slice()) {
                    // A message is at least its 16 bytes of framing; 4 are read.
                    self.left = (u32::from_be_bytes(b) as usize).max(16) - 4;
                    self.prelude.clear();
                }
            } else {
                let take = self.left.min(d.len());
                self.left -= take;
                d = &d[take..];
                if self.left == 0 {
                    done += 1;
                }
            }
        }
        (done, self.left == 0 && self.prelude.is_empty())
    }
}

impl CutFilter {
    pub fn new(plan: CutPlan) -> Self {
        let framing = plan.shape.framed().then(Framing::default);
        Self {
            plan,
            events: 0,
            crossed: false,
            at_boundary: true,
            framing,
        }
    }

    /// Sees one data frame; `Some(error event)` when the stream must end after it (the
    /// caller sends the event and drops the upstream body, which cancels the request).
    pub fn on_data(&mut self, d: &[u8]) -> Option<Bytes> {
        if let Some(f) = &mut self.framing {
            let (done, between) = f.feed(d);
            self.events += done;
            self.at_boundary = between;
            return self.after();
        }
        self.events += data_events(d);
        if !d.is_empty() {
            self.at_boundary = d.ends_with(b"\n\n") || d.ends_with(b"\r\n\r\n");
        }
        self.after()
    }

    /// After a frame: whether the estimate crossed the allowance, and the stream is at a
    /// boundary to end it at.
    fn after(&mut self) -> Option<Bytes> {
        let plan = &self.plan;
        plan.state.events.store(self.events, Ordering::Relaxed);
        let cost = plan
            .input_nanos
            .saturating_add(self.events.saturating_mul(plan.output_nanos_per_token));
        if cost > plan.allowance {
            self.crossed = true;
        }
        if !(self.crossed && self.at_boundary) {
            return None;
        }
        plan.state.cut.store(true, Ordering::Relaxed);
        tracing::warn!(
            events = self.events,
            "budget exhausted mid-stream; ending it"
        );
        Some(error_event(plan.shape))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_framed_messages_are_counted_across_any_split() {
        // Three messages of 16, 20 and 18 bytes (their length first, big-endian).
        let mut stream = Vec::new();
        for n in [16u32, 20, 18] {
            stream.extend_from_slice(&n.to_be_bytes());
            stream.extend(std::iter::repeat_n(0xAB, n as usize - 4));
        }
        for cut in 0..=stream.len() {
            let mut f = Framing::default();
            let (a, between_a) = f.feed(&stream[..cut]);
            let (b, between_b) = f.feed(&stream[cut..]);
            assert_eq!(a + b, 3, "split at {cut}");
            assert!(between_b);
            assert_eq!(between_a, [0, 16, 36, 54].contains(&cut), "split at {cut}");
        }
    }

    #[test]
    fn cuts_at_an_event_boundary_with_a_provider_shaped_event() {
        let state = Arc::new(CutState::default());
        let mut cut = CutFilter::new(CutPlan {
            allowance: 250,
            input_nanos: 0,
            output_nanos_per_token: 100,
            // A wire that names its stream events: the error event is named too.
            shape: ErrorShape::new(
                |_, _, m| serde_json::json!({ "type": "error", "error": { "message": m } }),
                Some("error"),
            ),
            state: state.clone(),
        });
        // The third event crosses 250 mid-frame: the cut waits for its end.
        assert!(
            cut.on_data(b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\n")
                .is_none()
        );
        assert!(cut.on_data(b"data: {\"a\":3").is_none());
        assert!(!state.cut.load(Ordering::Relaxed));
        let ev = cut.on_data(b"}\n\n").expect("cut at the boundary");
        let text = String::from_utf8(ev.to_vec()).unwrap();
        let json = text
            .strip_prefix("event: error\ndata: ")
            .and_then(|t| t.strip_suffix("\n\n"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["type"], "error", "{text}");
        assert!(v["error"]["message"].as_str().unwrap().contains("budget"));
        assert!(state.cut.load(Ordering::Relaxed));
        assert_eq!(state.events.load(Ordering::Relaxed), 3);
    }
}
