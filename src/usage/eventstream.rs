//! The AWS binary event stream (`application/vnd.amazon.eventstream`, Bedrock's streams): the
//! usage scanner that reads each message's payload.
//!
//! A message is a length-prefixed frame: total length, headers length, prelude CRC, headers,
//! payload, message CRC. Frames are cut out of the response as their bytes arrive and parsed
//! (both CRCs checked) by `aws-smithy-eventstream`; each event message whose `:event-type`
//! the dialect names is handed to it as an SSE event's data would be. The bytes still go to
//! the app untouched: the scanner reads a copy of what it needs.

use aws_smithy_eventstream::frame::read_message_from;
use aws_smithy_types::event_stream::HeaderValue;

use super::*;

/// A frame larger than this is not held to be parsed: usage rides in small frames (a
/// `metadata` event, the last `chunk`), and holding a large content frame would be a copy of
/// it for nothing. The stream then counts as missing usage.
const MAX_FRAME: usize = 256 * 1024;

#[derive(Debug)]
pub struct EventStreamScanner {
    dialect: &'static dyn Dialect,
    /// Bytes of the frame being received (at most [`MAX_FRAME`]).
    pending: Vec<u8>,
    /// A frame was malformed, failed its CRC or was too large: the stream is not read
    /// further (its framing is lost).
    broken: bool,
    state: StreamState,
}

impl EventStreamScanner {
    pub fn new(dialect: &'static dyn Dialect) -> Self {
        Self {
            dialect,
            pending: Vec::new(),
            broken: false,
            state: StreamState::new(false),
        }
    }

    pub fn buffered(&self) -> usize {
        self.pending.capacity()
    }

    fn frame_len(&self) -> Option<usize> {
        let b: [u8; 4] = self.pending.get(..4)?.try_into().ok()?;
        Some(u32::from_be_bytes(b) as usize)
    }

    fn message(&mut self, frame: &[u8]) {
        let Ok(msg) = read_message_from(frame) else {
            self.broken = true;
            return;
        };
        let header = |name: &str| {
            msg.headers()
                .iter()
                .find(|h| h.name().as_str() == name)
                .and_then(|h| match h.value() {
                    HeaderValue::String(s) => Some(s.as_str()),
                    _ => None,
                })
        };
        if header(":message-type") != Some("event") {
            return;
        }
        let wanted = self.dialect.usage_events();
        let named = header(":event-type").map(str::as_bytes);
        if wanted.is_empty() || named.is_some_and(|n| wanted.contains(&n)) {
            self.dialect.event(&mut self.state, msg.payload());
        }
    }
}

impl UsageScanner for EventStreamScanner {
    fn feed(&mut self, mut chunk: &[u8]) {
        while !self.broken && !chunk.is_empty() {
            // Take what completes the prelude, then what completes the frame.
            let want = match self.frame_len() {
                None => 4 - self.pending.len(),
                Some(n) if !(16..=MAX_FRAME).contains(&n) => {
                    self.broken = true;
                    break;
                }
                Some(n) => n - self.pending.len(),
            };
            let take = want.min(chunk.len());
            self.pending.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.frame_len() == Some(self.pending.len()) {
                let frame = std::mem::take(&mut self.pending);
                self.message(&frame);
                self.pending = frame;
                self.pending.clear();
            }
        }
        if self.broken {
            self.pending = Vec::new();
        }
    }

    fn finish(&mut self) -> Usage {
        self.dialect.end(&mut self.state);
        std::mem::take(&mut self.state.usage)
    }
}
