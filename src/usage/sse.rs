//! Server-sent events (and NDJSON): the usage scanner that reads each event's data.

use super::bytes::*;
use super::*;

/// Server-sent events: scans each event's data (its `data:` lines joined with "\n", as SSE
/// defines it), or each line of newline-delimited JSON.
///
/// An event whose data is one line followed at once by the blank line that ends it (nearly
/// every event of every provider) is scanned in place, straight from the frame: nothing is
/// copied. Data spread over several `data:` lines (pretty-printed JSON), or over frames, is
/// gathered in a bounded buffer first.
#[derive(Debug)]
pub struct SseScanner {
    dialect: &'static dyn Dialect,
    /// The current line, while it is incomplete across frames (at most [`MAX_LINE`]).
    pub(super) partial: Vec<u8>,
    /// The current line grew past [`MAX_LINE`]: it is not held whole any more; its bytes go
    /// to the event's data as they come, if `long_line` says they are worth it.
    skipping: bool,
    /// The over-long line is data that may carry usage (a `data:` line of an event not known
    /// to be content, or an NDJSON line).
    long_line: bool,
    /// The current event's data gathered so far, when it could not be scanned in place (at
    /// most [`MAX_LINE`]).
    data: Vec<u8>,
    /// The current event has data (in `data`, or in the windows below).
    has_data: bool,
    /// The current event's data outgrew [`MAX_LINE`]. It may still carry usage at its end (a
    /// Responses API `response.completed` with a long output, a generateContent chunk with a long
    /// text): its first [`JSON_HEAD`] bytes (for `model`) and a sliding tail of [`JSON_TAIL`]
    /// bytes (for `usage`) are kept.
    long: bool,
    long_head: Vec<u8>,
    long_tail: Vec<u8>,
    /// What the current event's `event:` line said about it; reset at the blank line.
    event: EventKind,
    /// What the dialect reads and writes: the usage so far, and what it keeps.
    pub(super) state: StreamState,
}

/// What an SSE `event:` line tells the scanner before it sees the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// No `event:` line: look at the data.
    Unnamed,
    /// A named event that may carry usage (`message_start`, `response.completed`, ...).
    Usage,
    /// A named event that never carries usage (content deltas): skip its data unread.
    Skip,
}

/// Whether a blank line (`\n` or `\r\n`) starts at `at`: the line before it ends its event.
fn blank_line_at(chunk: &[u8], at: usize) -> bool {
    match chunk.get(at) {
        Some(b'\n') => true,
        Some(b'\r') => chunk.get(at + 1) == Some(&b'\n'),
        _ => false,
    }
}

impl SseScanner {
    pub fn new(dialect: &'static dyn Dialect) -> Self {
        Self::with(dialect, false)
    }

    /// Newline-delimited JSON: every line is an event.
    pub fn ndjson(dialect: &'static dyn Dialect) -> Self {
        Self::with(dialect, true)
    }

    fn with(dialect: &'static dyn Dialect, ndjson: bool) -> Self {
        Self {
            dialect,
            partial: Vec::new(),
            skipping: false,
            long_line: false,
            data: Vec::new(),
            has_data: false,
            long: false,
            long_head: Vec::new(),
            long_tail: Vec::new(),
            event: EventKind::Unnamed,
            state: StreamState::new(ndjson),
        }
    }

    /// Bytes held now (capacity), for the memory-bound tests.
    pub fn buffered(&self) -> usize {
        self.partial.capacity()
            + self.data.capacity()
            + self.state.last.capacity()
            + self.long_head.capacity()
            + self.long_tail.capacity()
    }

    /// One complete line, without its `\n`. `next_blank`: the next line is known to be
    /// blank, so a `data:` line that starts an event is all of its data.
    fn line(&mut self, line: &[u8], next_blank: bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.state.ndjson {
            self.event_data(line);
        } else if let Some(v) = line.strip_prefix(b"data:") {
            if self.event == EventKind::Skip {
                return;
            }
            let v = v.strip_prefix(b" ").unwrap_or(v);
            if !self.has_data && next_blank {
                self.event_data(v);
            } else {
                self.data_line();
                self.data_push(v);
            }
        } else if let Some(name) = line.strip_prefix(b"event:") {
            let name = name.trim_ascii();
            self.event = if self.dialect.usage_events().contains(&name) {
                EventKind::Usage
            } else {
                EventKind::Skip
            };
        } else if line.is_empty() {
            self.end_event();
        }
    }

    /// A `data:` line begins: lines of one event join with "\n".
    fn data_line(&mut self) {
        if self.has_data {
            self.data_push(b"\n");
        }
        self.has_data = true;
    }

    /// Appends to the current event's data; past [`MAX_LINE`], only its head and tail stay.
    fn data_push(&mut self, b: &[u8]) {
        if !self.long && self.data.len() + b.len() > MAX_LINE {
            self.long = true;
            self.long_head.clear();
            self.long_tail.clear();
            let data = std::mem::take(&mut self.data);
            self.window_push(&data);
            self.data = data;
            self.data.clear();
        }
        if self.long {
            self.window_push(b);
        } else {
            self.data.extend_from_slice(b);
        }
    }

    fn window_push(&mut self, d: &[u8]) {
        if self.long_head.len() < JSON_HEAD {
            let n = (JSON_HEAD - self.long_head.len()).min(d.len());
            self.long_head.extend_from_slice(&d[..n]);
        }
        keep_tail(&mut self.long_tail, d);
    }

    /// The blank line: the event's data, if gathered, is scanned now.
    #[inline]
    fn end_event(&mut self) {
        if self.has_data {
            self.gathered_event();
        }
        self.event = EventKind::Unnamed;
    }

    /// Scans the data gathered for the current event, and forgets it.
    fn gathered_event(&mut self) {
        if self.long {
            self.long_event();
        } else {
            let data = std::mem::take(&mut self.data);
            self.event_data(&data);
            self.data = data;
        }
        self.data.clear();
        self.has_data = false;
        self.long = false;
    }

    /// A line outgrew [`MAX_LINE`]; `a` then `b` are its bytes so far. Whether they are worth
    /// keeping is decided now, from its start and the event it belongs to.
    fn long_begin(&mut self, a: &[u8], b: &[u8]) {
        self.skipping = true;
        self.long_line = false;
        let mut skip = 0;
        if !self.state.ndjson {
            let mut start = [0u8; 6];
            let mut n = 0;
            for (s, &c) in start.iter_mut().zip(a.iter().chain(b)) {
                *s = c;
                n += 1;
            }
            if !start[..n].starts_with(b"data:") || self.event == EventKind::Skip {
                return;
            }
            skip = if n == 6 && start[5] == b' ' { 6 } else { 5 };
        }
        self.long_line = true;
        self.data_line();
        let in_a = skip.min(a.len());
        self.data_push(&a[in_a..]);
        self.data_push(&b[(skip - in_a).min(b.len())..]);
    }

    fn long_piece(&mut self, d: &[u8]) {
        if self.long_line {
            self.data_push(d);
        }
    }

    /// The over-long line ended. An NDJSON line is a whole event; an SSE event ends at its
    /// blank line.
    fn long_end(&mut self) {
        self.skipping = false;
        if std::mem::take(&mut self.long_line) && self.state.ndjson {
            self.end_event();
        }
    }

    /// An event whose data outgrew [`MAX_LINE`]: usage from its tail, `model` from its head.
    fn long_event(&mut self) {
        let head = std::mem::take(&mut self.long_head);
        let tail = std::mem::take(&mut self.long_tail);
        self.dialect.long_event(&mut self.state, &head, &tail);
        // Keep the allocations (bounded) for the next long event.
        self.long_head = head;
        self.long_head.clear();
        self.long_tail = tail;
        self.long_tail.clear();
    }

    /// The whole data of one event (or one NDJSON line).
    fn event_data(&mut self, data: &[u8]) {
        self.state.named_usage = self.event == EventKind::Usage;
        self.dialect.event(&mut self.state, data);
    }
}

impl UsageScanner for SseScanner {
    fn feed(&mut self, mut chunk: &[u8]) {
        if !self.partial.is_empty() || self.skipping {
            match memchr::memchr(b'\n', chunk) {
                None => {
                    if self.skipping {
                        self.long_piece(chunk);
                    } else if self.partial.len() + chunk.len() > MAX_LINE {
                        let partial = std::mem::take(&mut self.partial);
                        self.long_begin(&partial, chunk);
                        self.partial = partial;
                        self.partial.clear();
                    } else {
                        self.partial.extend_from_slice(chunk);
                    }
                    return;
                }
                Some(i) => {
                    if self.skipping {
                        self.long_piece(&chunk[..i]);
                        self.long_end();
                    } else if self.partial.len() + i <= MAX_LINE {
                        self.partial.extend_from_slice(&chunk[..i]);
                        let line = std::mem::take(&mut self.partial);
                        self.line(&line, blank_line_at(chunk, i + 1));
                        self.partial = line;
                    } else {
                        let partial = std::mem::take(&mut self.partial);
                        self.long_begin(&partial, &chunk[..i]);
                        self.partial = partial;
                        self.long_end();
                    }
                    self.partial.clear();
                    chunk = &chunk[i + 1..];
                }
            }
        }
        let mut start = 0;
        for i in memchr::memchr_iter(b'\n', chunk) {
            self.line(&chunk[start..i], blank_line_at(chunk, i + 1));
            start = i + 1;
        }
        let rest = &chunk[start..];
        if rest.len() > MAX_LINE {
            self.long_begin(&[], rest);
        } else {
            self.partial.extend_from_slice(rest);
        }
    }

    fn finish(&mut self) -> Usage {
        if self.skipping {
            self.long_end();
        } else if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, true);
        }
        // An event the stream ended without a blank line still counts.
        self.end_event();
        self.dialect.end(&mut self.state);
        std::mem::take(&mut self.state.usage)
    }
}
