//! Server-sent events (and NDJSON): the usage scanner that reads each event's data.

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

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
    dialect: Dialect,
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
    /// Responses API `response.completed` with a long output, a Gemini chunk with a long
    /// text): its first [`JSON_HEAD`] bytes (for `model`) and a sliding tail of [`JSON_TAIL`]
    /// bytes (for `usage`) are kept.
    long: bool,
    long_head: Vec<u8>,
    long_tail: Vec<u8>,
    /// Events still worth parsing for `model` alone (first chunks carry it).
    model_tries: u8,
    /// Newline-delimited JSON (Ollama's native streams): every line is an event.
    ndjson: bool,
    /// What the current event's `event:` line said about it; reset at the blank line.
    event: EventKind,
    /// Gemini: the tail (from `"usageMetadata"` on, at most [`JSON_TAIL`]) of the last chunk
    /// that had it. Every chunk carries running totals, so only the last is parsed, once, at
    /// the end.
    gemini_last: Vec<u8>,
    /// An Images API stream: each `image_generation.completed` (or `image_edit.completed`)
    /// event is one image.
    pub(super) images: bool,
    usage: Usage,
}

/// What an SSE `event:` line tells the scanner before it sees the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventKind {
    /// No `event:` line (OpenAI chat, Gemini): look at the data.
    Unnamed,
    /// A named event that may carry usage (`message_start`, `response.completed`, ...).
    Usage,
    /// A named event that never carries usage (content deltas): skip its data unread.
    Skip,
}

/// Named events that carry usage, across dialects.
const USAGE_EVENTS: [&[u8]; 7] = [
    b"message_start",
    b"message_delta",
    b"response.completed",
    b"response.incomplete",
    b"response.failed",
    b"image_generation.completed",
    b"image_edit.completed",
];

/// The `type` of the Responses API events that carry the final usage, as JSON text.
const RESPONSES_FINAL: [&str; 3] = [
    "\"response.completed\"",
    "\"response.incomplete\"",
    "\"response.failed\"",
];

/// A streamed image generation's final event for one image (`stream: true` on the Images
/// API): one image, and the usage of gpt-image models. Its `type` may sit anywhere in the
/// object; base64 has no quotes, so the search skips megabytes of image quickly.
fn is_image_done(data: &[u8]) -> bool {
    member_is(
        data,
        b"\"type\"",
        &[b"image_generation.completed", b"image_edit.completed"],
    )
}

/// Whether an Ollama object is the final one (`"done": true`), which carries the counts.
pub(super) fn is_done(data: &[u8]) -> bool {
    member_values(data, b"\"done\"").any(|v| data[v..].starts_with(b"true"))
}

static USAGE_KEY_REV: std::sync::LazyLock<memmem::FinderRev<'static>> =
    std::sync::LazyLock::new(|| memmem::FinderRev::new(b"\"usage\""));

/// Whether an OpenAI chat chunk carries a non-null `usage`. With include_usage every content
/// chunk has `"usage":null` near its end (before `obfuscation` in 2025-shaped streams), so
/// the search runs from the end: one short reverse scan per chunk. The last `"usage"` is the
/// top-level member (it follows `choices`); if it is not a member at all (a string value),
/// fall back to a forward search.
fn chunk_has_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    // Compact streams without obfuscation (Azure, compatibles, older): the member closes the
    // chunk.
    if data.ends_with(b"\"usage\":null}") {
        return false;
    }
    let Some(p) = USAGE_KEY_REV.rfind(data) else {
        return false;
    };
    match value_after_key(data, p + KEY.len()) {
        Some(v) => v < data.len() && !data[v..].starts_with(b"null"),
        None => usage_value_at(data, KEY).is_some(),
    }
}

static GEMINI_KEY: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\"usageMetadata\""));

/// Whether a blank line (`\n` or `\r\n`) starts at `at`: the line before it ends its event.
fn blank_line_at(chunk: &[u8], at: usize) -> bool {
    match chunk.get(at) {
        Some(b'\n') => true,
        Some(b'\r') => chunk.get(at + 1) == Some(&b'\n'),
        _ => false,
    }
}

impl SseScanner {
    pub fn new(dialect: Dialect) -> Self {
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
            model_tries: 4,
            ndjson: false,
            event: EventKind::Unnamed,
            gemini_last: Vec::new(),
            images: false,
            usage: Usage::default(),
        }
    }

    pub fn ndjson(dialect: Dialect) -> Self {
        Self {
            ndjson: true,
            ..Self::new(dialect)
        }
    }

    /// Bytes held now (capacity), for the memory-bound tests.
    pub fn buffered(&self) -> usize {
        self.partial.capacity()
            + self.data.capacity()
            + self.gemini_last.capacity()
            + self.long_head.capacity()
            + self.long_tail.capacity()
    }

    /// One complete line, without its `\n`. `next_blank`: the next line is known to be
    /// blank, so a `data:` line that starts an event is all of its data.
    fn line(&mut self, line: &[u8], next_blank: bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.ndjson {
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
            self.event = if USAGE_EVENTS.contains(&name) {
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
        if self.dialect == Dialect::None {
            return;
        }
        let mut skip = 0;
        if !self.ndjson {
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
        if std::mem::take(&mut self.long_line) && self.ndjson {
            self.end_event();
        }
    }

    /// An event whose data outgrew [`MAX_LINE`]: usage from its tail, `model` from its head.
    fn long_event(&mut self) {
        let head = std::mem::take(&mut self.long_head);
        let tail = std::mem::take(&mut self.long_tail);
        match self.dialect {
            Dialect::OpenAi if self.ndjson => {
                if is_done(&tail) {
                    if let Some(m) = string_after(&head, b"\"model\"") {
                        self.usage.model = Some(m);
                    }
                    self.usage.apply_ollama(&tail);
                }
            }
            Dialect::OpenAi => {
                // Images arrive whole in one event, base64: nearly always over-long.
                if self.images && (is_image_done(&head) || is_image_done(&tail)) {
                    self.usage.images += 1;
                    self.usage.found = true;
                }
                // Responses API: `response.usage` closes the `response` object, so it is in
                // the tail however long `output` was; `model` precedes `output`.
                if let Some(u) = usage_in_tail(&tail, b"\"usage\"") {
                    if self.usage.model.is_none() {
                        self.usage.model = string_after(&head, b"\"model\"");
                    }
                    self.usage.apply(self.dialect, &u);
                }
            }
            Dialect::Gemini => {
                if let Some(p) = memmem::rfind(&tail, b"\"usageMetadata\"") {
                    self.gemini_keep(&tail[p..]);
                }
            }
            Dialect::Anthropic | Dialect::None => {}
        }
        // Keep the allocations (bounded) for the next long event.
        self.long_head = head;
        self.long_head.clear();
        self.long_tail = tail;
        self.long_tail.clear();
    }

    /// Keeps Gemini's last usage, from its `usageMetadata` key on (the object is small: a
    /// [`JSON_TAIL`] window holds it whatever follows).
    fn gemini_keep(&mut self, from_key: &[u8]) {
        self.gemini_last.clear();
        self.gemini_last
            .extend_from_slice(&from_key[..from_key.len().min(JSON_TAIL)]);
    }

    /// The whole data of one event (or one NDJSON line).
    fn event_data(&mut self, data: &[u8]) {
        match self.dialect {
            Dialect::OpenAi if self.ndjson => {
                if is_done(data) {
                    if let Some(m) = string_after(data, b"\"model\"") {
                        self.usage.model = Some(m);
                    }
                    self.usage.apply_ollama(data);
                }
            }
            Dialect::OpenAi => self.openai_event(data),
            Dialect::Gemini => {
                if let Some(p) = GEMINI_KEY.find(data) {
                    if self.usage.model.is_none() {
                        self.usage.model = string_after(data, b"\"modelVersion\"");
                    }
                    self.gemini_keep(&data[p..]);
                }
            }
            Dialect::Anthropic => {
                if memmem::find(data, b"\"message_start\"").is_some() {
                    #[derive(Deserialize)]
                    struct Start {
                        message: Msg,
                    }
                    #[derive(Deserialize)]
                    struct Msg {
                        model: Option<String>,
                        usage: Option<RawUsage>,
                    }
                    if let Ok(s) = serde_json::from_slice::<Start>(data) {
                        if s.message.model.is_some() {
                            self.usage.model = s.message.model;
                        }
                        if let Some(u) = s.message.usage {
                            self.usage.apply(self.dialect, &u);
                        }
                    }
                } else if memmem::find(data, b"\"message_delta\"").is_some() {
                    #[derive(Deserialize)]
                    struct Delta {
                        usage: Option<RawUsage>,
                    }
                    if let Ok(Delta { usage: Some(u) }) = serde_json::from_slice::<Delta>(data) {
                        self.usage.apply(self.dialect, &u);
                    }
                }
            }
            Dialect::None => {}
        }
    }

    /// One OpenAI event: a chat chunk (top-level `usage`), a Responses API event (usage in
    /// `response` when its `type` is final), an image event. Parsed only when it is named as
    /// carrying usage, when its last `usage` member is not null, or while `model` is unknown;
    /// the JSON parser makes layout and key order irrelevant.
    fn openai_event(&mut self, data: &[u8]) {
        #[derive(Deserialize)]
        struct Event<'a> {
            model: Option<String>,
            usage: Option<RawUsage>,
            /// Kept raw: only compared, and never a reason to reject the event.
            #[serde(rename = "type", borrow)]
            kind: Option<&'a RawValue>,
            #[serde(borrow)]
            response: Option<&'a RawValue>,
        }
        #[derive(Deserialize)]
        struct Resp {
            model: Option<String>,
            usage: Option<RawUsage>,
        }
        if self.images && is_image_done(data) {
            self.usage.images += 1;
            self.usage.found = true;
        }
        let want_model = self.usage.model.is_none() && self.model_tries > 0;
        if want_model {
            self.model_tries -= 1;
        }
        if !(want_model || self.event == EventKind::Usage || chunk_has_usage(data)) {
            return;
        }
        let Ok(e) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        if let Some(r) = e
            .response
            .and_then(|r| serde_json::from_str::<Resp>(r.get()).ok())
        {
            let model = r.model.filter(|m| !m.is_empty());
            if e.kind.is_some_and(|k| RESPONSES_FINAL.contains(&k.get())) {
                if model.is_some() {
                    self.usage.model = model;
                }
                if let Some(u) = r.usage {
                    self.usage.apply(self.dialect, &u);
                }
            } else if self.usage.model.is_none() {
                self.usage.model = model;
            }
        }
        // Azure's first chunk (prompt_filter_results) has `"model":""`.
        if self.usage.model.is_none() {
            self.usage.model = e.model.filter(|m| !m.is_empty());
        }
        if let Some(u) = e.usage {
            self.usage.apply(self.dialect, &u);
        }
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
        if !self.gemini_last.is_empty() {
            let last = std::mem::take(&mut self.gemini_last);
            if let Some(at) = usage_value_at(&last, b"\"usageMetadata\"")
                && let Some(Ok(u)) = serde_json::Deserializer::from_slice(&last[at..])
                    .into_iter::<RawUsage>()
                    .next()
            {
                self.usage.apply(self.dialect, &u);
            }
            if let Some(m) = string_after(&last, b"\"modelVersion\"") {
                self.usage.model = Some(m);
            }
        }
        std::mem::take(&mut self.usage)
    }
}
