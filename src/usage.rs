//! The meter step: an incremental usage scanner, and the body wrapper that feeds it.
//!
//! The response streams through untouched, frame by frame. The scanner never parses the whole
//! body: for SSE it looks at each event's data (one `data:` line, scanned in place, or several
//! joined with "\n" as SSE defines) and parses only events that carry usage (found with a
//! SIMD substring search); for JSON it keeps a bounded head (for `model`) and a bounded tail
//! (for the trailing `usage` object) and parses just that slice at the end.
//! Event data longer than [`MAX_LINE`] is not held: its first [`JSON_HEAD`] bytes and a
//! sliding tail of [`JSON_TAIL`] are, so usage at the end of a huge event is still found.
//! Memory per request is bounded by [`MAX_BUFFERED`].
//!
//! JSON may put whitespace between any two tokens (`{"usage": {"prompt_tokens": 9}}`, as
//! servers written in Python send it, or pretty-printed over several `data:` lines) and
//! members in any order. Every search for a member goes through `value_after_key` (the
//! key, then optional whitespace, a colon, optional whitespace) and everything read is read
//! by the JSON parser, so no byte pattern assumes a layout.

use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest SSE line kept across frames; longer lines (huge content deltas) are skipped.
pub const MAX_LINE: usize = 256 * 1024;
/// Bytes kept from the start of a JSON body to find `model`.
pub const JSON_HEAD: usize = 4096;
/// Bytes kept from the end of a JSON body to find `usage`.
pub const JSON_TAIL: usize = 64 * 1024;
/// Upper bound of [`Scanner::buffered`] (buffer capacities, growth slack included), whatever
/// the input: an SSE line buffer and an event's gathered data (each at most twice
/// [`MAX_LINE`] after amortised growth), Gemini's last usage (twice [`JSON_TAIL`]), the
/// over-long event's head and tail windows.
pub const MAX_BUFFERED: usize = 4 * MAX_LINE + 2 * JSON_HEAD + 6 * JSON_TAIL;

/// How a provider reports usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI and compatibles: chat completions and embeddings (`usage.prompt_tokens`,
    /// `completion_tokens`), the Responses API (`usage.input_tokens`, `output_tokens`), and
    /// Ollama's native API (`prompt_eval_count`, `eval_count` on the `"done": true` object).
    OpenAi,
    /// Anthropic messages: `input_tokens` excludes cache reads and writes.
    Anthropic,
    /// Gemini generateContent / streamGenerateContent: `usageMetadata`, model `modelVersion`.
    Gemini,
    /// Not metered (yet): passes through.
    None,
}

/// Largest count of one token type taken from a usage report (2^40, about 10^12).
pub const MAX_TOKENS: u64 = 1 << 40;

/// Token counts in DESIGN §3's disjoint types, plus the model the provider reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    pub output: u64,
    pub reasoning: u64,
    pub model: Option<String>,
    /// Whether any usage object was seen.
    pub found: bool,
    /// Images generated (image generation: the length of the response's `data` array).
    pub images: u64,
    /// Input characters (text-to-speech: the length of the request's `input`).
    pub characters: u64,
    /// Audio duration in milliseconds (transcription: `usage.seconds` or `duration`).
    pub audio_ms: u64,
}

/// What an endpoint is billed in, from its path. Decides which scanner reads the response and
/// whether a response without usage is worth counting as missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Chat, completions, Responses API, messages, generateContent, embeddings, Ollama's
    /// native API: tokens in the response.
    Tokens,
    /// `/images/generations`, `/images/edits`, `/images/variations`: images counted in the
    /// response's `data` array (plus tokens where the model reports them, as gpt-image-1 does).
    Images,
    /// `/audio/speech`: input characters from the request; the response is audio.
    Speech,
    /// `/audio/transcriptions`, `/audio/translations`: `usage` (tokens or seconds) when the
    /// response has it, else verbose_json's `duration`.
    Transcription,
    /// Anything else (model lists, files, batches): scanned, but no usage is expected.
    Other,
}

impl Capability {
    /// Classifies an upstream path (without query).
    pub fn of_path(path: &str) -> Self {
        const TOKENS: [&str; 9] = [
            "/chat/completions",
            "/completions",
            "/responses",
            "/embeddings",
            "/messages",
            ":generateContent",
            ":streamGenerateContent",
            "/api/chat",
            "/api/generate",
        ];
        if TOKENS.iter().any(|s| path.ends_with(s)) || path.ends_with("/api/embed") {
            Self::Tokens
        } else if path.ends_with("/images/generations")
            || path.ends_with("/images/edits")
            || path.ends_with("/images/variations")
        {
            Self::Images
        } else if path.ends_with("/audio/speech") {
            Self::Speech
        } else if path.ends_with("/audio/transcriptions") || path.ends_with("/audio/translations") {
            Self::Transcription
        } else {
            Self::Other
        }
    }

    /// Whether a successful response is expected to be metered.
    pub fn expects_usage(self) -> bool {
        !matches!(self, Self::Other)
    }
}

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    // OpenAI chat
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
    // Anthropic, and OpenAI's Responses API
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    input_tokens_details: Option<PromptDetails>,
    output_tokens_details: Option<CompletionDetails>,
    // Gemini usageMetadata
    #[serde(rename = "promptTokenCount")]
    prompt_token_count: Option<u64>,
    #[serde(rename = "candidatesTokenCount")]
    candidates_token_count: Option<u64>,
    #[serde(rename = "thoughtsTokenCount")]
    thoughts_token_count: Option<u64>,
    #[serde(rename = "cachedContentTokenCount")]
    cached_content_token_count: Option<u64>,
    // OpenAI transcription billed by duration: `{"type":"duration","seconds":9}`.
    seconds: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct PromptDetails {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct CompletionDetails {
    reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Applies a usage object. For OpenAI the object is complete; for Anthropic streams,
    /// later objects (message_delta) carry cumulative counts, so each field present
    /// replaces the earlier value and nothing is ever summed.
    fn apply(&mut self, dialect: Dialect, u: &RawUsage) {
        self.found = true;
        match dialect {
            Dialect::OpenAi => {
                // Chat completions name the totals prompt/completion; the Responses API names
                // them input/output. Both include the cached and reasoning parts.
                let (prompt, completion, pd, cd) =
                    if u.prompt_tokens.is_none() && u.input_tokens.is_some() {
                        (
                            u.input_tokens,
                            u.output_tokens,
                            &u.input_tokens_details,
                            &u.output_tokens_details,
                        )
                    } else {
                        (
                            u.prompt_tokens,
                            u.completion_tokens,
                            &u.prompt_tokens_details,
                            &u.completion_tokens_details,
                        )
                    };
                if let Some(sec) = u.seconds {
                    self.audio_ms = seconds_to_ms(sec);
                }
                let cached = pd.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
                let reasoning = cd.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0);
                let prompt = prompt.unwrap_or(0);
                let completion = completion.unwrap_or(0);
                self.input = prompt.saturating_sub(cached);
                self.cached_input = cached;
                self.output = completion.saturating_sub(reasoning);
                self.reasoning = reasoning;
            }
            Dialect::Anthropic => {
                if let Some(v) = u.input_tokens {
                    self.input = v;
                }
                if let Some(v) = u.cache_read_input_tokens {
                    self.cached_input = v;
                }
                if let Some(v) = u.cache_creation_input_tokens {
                    self.cache_write = v;
                }
                if let Some(v) = u.output_tokens {
                    self.output = v;
                }
            }
            Dialect::Gemini => {
                // Stream chunks carry running totals: the last one replaces the earlier ones.
                let cached = u.cached_content_token_count.unwrap_or(0);
                self.input = u.prompt_token_count.unwrap_or(0).saturating_sub(cached);
                self.cached_input = cached;
                self.output = u.candidates_token_count.unwrap_or(0);
                self.reasoning = u.thoughts_token_count.unwrap_or(0);
            }
            Dialect::None => {}
        }
        self.clamp_tokens();
    }

    /// Ollama's native API reports counts on the final object, outside any usage object.
    fn apply_ollama(&mut self, hay: &[u8]) {
        let prompt = number_after(hay, b"\"prompt_eval_count\"");
        let eval = number_after(hay, b"\"eval_count\"");
        if prompt.is_some() || eval.is_some() {
            self.found = true;
            self.input = prompt.unwrap_or(0);
            self.output = eval.unwrap_or(0);
            self.clamp_tokens();
        }
    }

    /// Token counts come from the upstream's text: a broken or hostile one can report
    /// `u64::MAX`. No response has [`MAX_TOKENS`] tokens, so capping there costs nothing and
    /// keeps every sum of counts (here, in metrics, in the ledger) far from overflowing.
    fn clamp_tokens(&mut self) {
        for n in [
            &mut self.input,
            &mut self.cached_input,
            &mut self.cache_write,
            &mut self.output,
            &mut self.reasoning,
        ] {
            *n = (*n).min(MAX_TOKENS);
        }
    }

    pub fn total(&self) -> u64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.cache_write)
            .saturating_add(self.output)
            .saturating_add(self.reasoning)
    }

    /// Whether anything billable was counted: tokens or another unit.
    pub fn metered(&self) -> bool {
        self.total() > 0 || self.images > 0 || self.characters > 0 || self.audio_ms > 0
    }
}

/// Seconds as reported (possibly fractional) to whole milliseconds; negative or absurd
/// values count as zero rather than wrapping.
fn seconds_to_ms(s: f64) -> u64 {
    if s.is_finite() && (0.0..1e12).contains(&s) {
        (s * 1000.0).round() as u64
    } else {
        0
    }
}

/// Incremental, synchronous and pure: fixtures can be fed in arbitrary chunks.
pub trait UsageScanner {
    fn feed(&mut self, chunk: &[u8]);
    fn finish(&mut self) -> Usage;
}

/// Picks the scanner for a response from its dialect and content type.
pub fn scanner_for(dialect: Dialect, content_type: Option<&[u8]>) -> Scanner {
    let ct = content_type.unwrap_or_default();
    if dialect == Dialect::None {
        Scanner::Off
    } else if memmem::find(ct, b"text/event-stream").is_some() {
        Scanner::Sse(SseScanner::new(dialect))
    } else if memmem::find(ct, b"ndjson").is_some() {
        Scanner::Sse(SseScanner::ndjson(dialect))
    } else if memmem::find(ct, b"json").is_some() {
        Scanner::Json(JsonScanner::new(dialect))
    } else {
        Scanner::Off
    }
}

/// Picks the scanner for a response of `capability`: speech responses are audio (their units
/// come from the request), image and transcription JSON bodies get their unit counters, and
/// image streams count their `image_generation.completed` events.
pub fn scanner_for_capability(
    dialect: Dialect,
    capability: Capability,
    content_type: Option<&[u8]>,
) -> Scanner {
    let json = content_type.is_some_and(|ct| {
        memmem::find(ct, b"json").is_some() && memmem::find(ct, b"ndjson").is_none()
    });
    let sse = content_type.is_some_and(|ct| memmem::find(ct, b"text/event-stream").is_some());
    match capability {
        Capability::Speech => Scanner::Off,
        Capability::Images if json && dialect != Dialect::None => {
            let mut s = JsonScanner::new(dialect);
            s.images = Some(DataCounter::default());
            Scanner::Json(s)
        }
        Capability::Images if sse && dialect != Dialect::None => {
            let mut s = SseScanner::new(dialect);
            s.images = true;
            Scanner::Sse(s)
        }
        Capability::Transcription if json && dialect != Dialect::None => {
            let mut s = JsonScanner::new(dialect);
            s.transcription = true;
            Scanner::Json(s)
        }
        _ => scanner_for(dialect, content_type),
    }
}

/// Enum dispatch: one concrete type in the body wrapper, no allocation, no vtable.
#[derive(Debug)]
pub enum Scanner {
    Sse(SseScanner),
    Json(JsonScanner),
    Off,
}

impl UsageScanner for Scanner {
    fn feed(&mut self, chunk: &[u8]) {
        match self {
            Self::Sse(s) => s.feed(chunk),
            Self::Json(s) => s.feed(chunk),
            Self::Off => {}
        }
    }

    fn finish(&mut self) -> Usage {
        match self {
            Self::Sse(s) => s.finish(),
            Self::Json(s) => s.finish(),
            Self::Off => Usage::default(),
        }
    }
}

impl Scanner {
    /// Bytes the scanner holds right now (buffer capacities): what the memory bound is about.
    pub fn buffered(&self) -> usize {
        match self {
            Self::Sse(s) => s.buffered(),
            Self::Json(s) => s.buffered(),
            Self::Off => 0,
        }
    }
}

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
    partial: Vec<u8>,
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
    images: bool,
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
fn is_done(data: &[u8]) -> bool {
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

/// JSON's insignificant whitespace (RFC 8259 §2): space, tab, line feed, carriage return.
pub(crate) fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The index of the first byte at or after `at` that is not JSON whitespace (`hay.len()` if
/// there is none).
pub(crate) fn skip_ws(hay: &[u8], mut at: usize) -> usize {
    while at < hay.len() && is_json_ws(hay[at]) {
        at += 1;
    }
    at
}

/// `key_end` is just past a string's closing quote. If the string is an object key (a colon
/// follows, whitespace allowed around it), the index of its value's first byte (possibly
/// `hay.len()` if the text ends there); if it is a value, `None`.
///
/// This one rule is what makes every search insensitive to layout. A `"` inside a JSON
/// string is always escaped, so a byte search for `"key"` never matches inside a string;
/// it matches a string value equal to `key`, which the colon test rejects.
pub(crate) fn value_after_key(hay: &[u8], key_end: usize) -> Option<usize> {
    let colon = skip_ws(hay, key_end);
    (hay.get(colon) == Some(&b':')).then(|| skip_ws(hay, colon + 1))
}

/// The value positions of every member named `key` (quotes included) in `hay`, in order.
pub(crate) fn member_values<'a>(hay: &'a [u8], key: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    memmem::find_iter(hay, key).filter_map(move |p| value_after_key(hay, p + key.len()))
}

/// Whether some member named `key` has one of the string values `values` (without quotes).
fn member_is(hay: &[u8], key: &[u8], values: &[&[u8]]) -> bool {
    member_values(hay, key).any(|v| {
        hay.get(v) == Some(&b'"')
            && values
                .iter()
                .any(|x| hay[v + 1..].starts_with(x) && hay.get(v + 1 + x.len()) == Some(&b'"'))
    })
}

/// The unsigned integer value of object key `key`, if present.
fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = usage_value_at(hay, key)?;
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Keeps the last [`JSON_TAIL`] bytes of a stream in `tail` (at most twice that, amortised:
/// compacted only when the buffer is twice the window).
fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= JSON_TAIL {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - JSON_TAIL..]);
        return;
    }
    tail.extend_from_slice(chunk);
    if tail.len() > 2 * JSON_TAIL {
        let cut = tail.len() - JSON_TAIL;
        tail.drain(..cut);
    }
}

/// The usage object that closes a JSON text, from its tail: the last occurrence of `key`
/// whose value parses as usage (earlier ones may be in content or cut by the window).
fn usage_in_tail(tail: &[u8], key: &[u8]) -> Option<RawUsage> {
    let mut end = tail.len();
    while let Some(p) = memmem::rfind(&tail[..end], key) {
        if let Some(at) = usage_value_at(&tail[p..], key) {
            let mut it =
                serde_json::Deserializer::from_slice(&tail[p + at..]).into_iter::<RawUsage>();
            if let Some(Ok(u)) = it.next() {
                return Some(u);
            }
        }
        end = p;
    }
    None
}

/// The number value (integer or decimal) of object key `key`, if present.
fn float_after(hay: &[u8], key: &[u8]) -> Option<f64> {
    let at = usage_value_at(hay, key)?;
    let len = hay[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        .count();
    std::str::from_utf8(&hay[at..at + len]).ok()?.parse().ok()
}

/// The string value of object key `key`, if present.
pub(crate) fn string_after(hay: &[u8], key: &[u8]) -> Option<String> {
    let at = usage_value_at(hay, key)?;
    serde_json::Deserializer::from_slice(&hay[at..])
        .into_iter::<String>()
        .next()?
        .ok()
        .filter(|s| !s.is_empty())
}

/// The value position of the first member named `key`, unless that value is `null`.
fn usage_value_at(hay: &[u8], key: &[u8]) -> Option<usize> {
    let v = member_values(hay, key).next()?;
    (v < hay.len() && !hay[v..].starts_with(b"null")).then_some(v)
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

/// Counts the elements of the top-level `data` array of a JSON body (image generation) in one
/// pass, without holding any of it: a byte state machine with a depth counter, no recursion,
/// so hostile nesting costs nothing. Strings (multi-megabyte `b64_json`) are skipped with a
/// SIMD search for the next quote or backslash.
#[derive(Debug, Default, Clone)]
pub struct DataCounter {
    depth: u64,
    in_string: bool,
    escaped: bool,
    /// The first bytes of the current depth-1 string (a key or a value), to spot `data`.
    key: [u8; 4],
    key_len: u8,
    /// The depth-1 string just closed was exactly `data`.
    key_is_data: bool,
    /// `"data":` was seen; a `[` now opens the array counted.
    after_data_colon: bool,
    /// Depth of the elements of the `data` array while inside it (0 = not inside).
    data_depth: u64,
    count: u64,
}

impl DataCounter {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    chunk = &chunk[1..];
                    continue;
                }
                let Some(i) = memchr::memchr2(b'"', b'\\', chunk) else {
                    self.key_bytes(chunk);
                    return;
                };
                self.key_bytes(&chunk[..i]);
                if chunk[i] == b'\\' {
                    self.escaped = true;
                } else {
                    self.in_string = false;
                    if self.depth == 1 {
                        self.key_is_data = self.key_len == 4 && self.key == *b"data";
                    }
                }
                chunk = &chunk[i + 1..];
                continue;
            }
            let b = chunk[0];
            chunk = &chunk[1..];
            match b {
                b'"' => {
                    self.value_starts();
                    self.in_string = true;
                    self.key_len = 0;
                    self.key_is_data = false;
                }
                b'{' | b'[' => {
                    self.value_starts();
                    let opens_data = b == b'[' && self.depth == 1 && self.after_data_colon;
                    self.depth = self.depth.saturating_add(1);
                    if opens_data {
                        self.data_depth = self.depth;
                    }
                    self.after_data_colon = false;
                }
                b'}' | b']' => {
                    if self.data_depth > 0 && self.depth == self.data_depth {
                        self.data_depth = 0;
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                b':' if self.depth == 1 => self.after_data_colon = self.key_is_data,
                b',' if self.depth == 1 => {
                    self.key_is_data = false;
                    self.after_data_colon = false;
                }
                _ => {}
            }
        }
    }

    /// A value begins at the current depth: inside `data`, that is one more element.
    fn value_starts(&mut self) {
        if self.data_depth > 0 && self.depth == self.data_depth {
            self.count += 1;
        }
    }

    fn key_bytes(&mut self, b: &[u8]) {
        if self.depth == 1 {
            for &c in b {
                if usize::from(self.key_len) < self.key.len() {
                    self.key[usize::from(self.key_len)] = c;
                }
                self.key_len = self.key_len.saturating_add(1);
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A JSON body: bounded head and tail, parsed once at the end.
#[derive(Debug)]
pub struct JsonScanner {
    dialect: Dialect,
    head: Vec<u8>,
    tail: Vec<u8>,
    /// Image generation: counts the `data` array's elements as the body passes.
    images: Option<DataCounter>,
    /// Transcription: without a `usage` object, verbose_json's `duration` (near the head).
    transcription: bool,
}

impl JsonScanner {
    pub fn new(dialect: Dialect) -> Self {
        Self {
            dialect,
            head: Vec::new(),
            tail: Vec::new(),
            images: None,
            transcription: false,
        }
    }

    /// Bytes held now (capacity), for the memory-bound tests.
    pub fn buffered(&self) -> usize {
        self.head.capacity() + self.tail.capacity()
    }
}

impl UsageScanner for JsonScanner {
    fn feed(&mut self, chunk: &[u8]) {
        if let Some(c) = &mut self.images {
            c.feed(chunk);
        }
        if self.head.len() < JSON_HEAD {
            let n = (JSON_HEAD - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
        }
        keep_tail(&mut self.tail, chunk);
    }

    fn finish(&mut self) -> Usage {
        let mut usage = Usage::default();
        let (usage_key, model_key): (&[u8], &[u8]) = match self.dialect {
            Dialect::Gemini => (b"\"usageMetadata\"", b"\"modelVersion\""),
            _ => (b"\"usage\"", b"\"model\""),
        };
        // `model` leads OpenAI and Anthropic bodies; Gemini puts `modelVersion` at the end.
        usage.model =
            string_after(&self.head, model_key).or_else(|| string_after(&self.tail, model_key));
        let tail = &self.tail;
        if let Some(u) = usage_in_tail(tail, usage_key) {
            usage.apply(self.dialect, &u);
        }
        if !usage.found && self.dialect == Dialect::OpenAi {
            usage.apply_ollama(tail);
        }
        if let Some(c) = &self.images {
            usage.images = c.count();
            usage.found |= usage.images > 0;
        }
        if self.transcription && usage.audio_ms == 0 && usage.total() == 0 {
            // verbose_json: `"duration":8.47` leads the body, before the text and segments.
            if let Some(sec) = float_after(&self.head, b"\"duration\"") {
                usage.audio_ms = seconds_to_ms(sec);
                usage.found = true;
            }
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(mut s: impl UsageScanner, body: &[u8], step: usize) -> Usage {
        for c in body.chunks(step.max(1)) {
            s.feed(c);
        }
        s.finish()
    }

    const OPENAI_SSE: &str = concat!(
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi \\\"usage\\\": 5\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":120,\"completion_tokens\":30,\"total_tokens\":150,\"prompt_tokens_details\":{\"cached_tokens\":100},\"completion_tokens_details\":{\"reasoning_tokens\":10}}}\n\n",
        "data: [DONE]\n\n"
    );

    const ANTHROPIC_SSE: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":300,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":42}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n"
    );

    #[test]
    fn openai_sse_any_split() {
        for step in [1, 2, 3, 7, 64, 4096] {
            let u = feed_split(
                SseScanner::new(Dialect::OpenAi),
                OPENAI_SSE.as_bytes(),
                step,
            );
            assert_eq!(
                (u.input, u.cached_input, u.output, u.reasoning),
                (20, 100, 20, 10),
                "step {step}"
            );
            assert_eq!(u.model.as_deref(), Some("gpt-4o-2024-08-06"));
            assert_eq!(u.total(), 150);
        }
    }

    #[test]
    fn anthropic_sse_takes_last_cumulative_output() {
        for step in [1, 5, 13, 4096] {
            let u = feed_split(
                SseScanner::new(Dialect::Anthropic),
                ANTHROPIC_SSE.as_bytes(),
                step,
            );
            assert_eq!(
                (u.input, u.cached_input, u.cache_write, u.output),
                (25, 300, 7, 42),
                "step {step}"
            );
            assert_eq!(u.model.as_deref(), Some("claude-sonnet-4-20250514"));
        }
    }

    #[test]
    fn json_bodies_both_dialects() {
        let oa = r#"{"id":"x","object":"chat.completion","model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"the word \"usage\": here"}}],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21},"system_fingerprint":"fp"}"#;
        for step in [1, 3, 50, 10_000] {
            let u = feed_split(JsonScanner::new(Dialect::OpenAi), oa.as_bytes(), step);
            assert_eq!(
                (u.input, u.output, u.model.as_deref()),
                (9, 12, Some("gpt-4o-mini"))
            );
        }
        let an = r#"{"id":"msg","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":4,"output_tokens":5}}"#;
        let u = feed_split(JsonScanner::new(Dialect::Anthropic), an.as_bytes(), 7);
        assert_eq!((u.input, u.cached_input, u.output), (10, 4, 5));
        assert_eq!(u.model.as_deref(), Some("claude-3-5-haiku-20241022"));
    }

    #[test]
    fn empty_model_of_azure_first_chunk_is_not_the_label() {
        let body = format!(
            "data: {{\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[]}}\n\n{OPENAI_SSE}"
        );
        let u = feed_split(SseScanner::new(Dialect::OpenAi), body.as_bytes(), 17);
        assert_eq!(u.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(u.total(), 150);
    }

    const GEMINI_SSE: &str = concat!(
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hel\"}],\"role\":\"model\"}}],\"usageMetadata\":{\"promptTokenCount\":50,\"candidatesTokenCount\":1,\"totalTokenCount\":51},\"modelVersion\":\"gemini-2.5-flash\"}\r\n\r\n",
        "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"lo\"}],\"role\":\"model\"},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":50,\"candidatesTokenCount\":12,\"thoughtsTokenCount\":30,\"cachedContentTokenCount\":20,\"totalTokenCount\":92},\"modelVersion\":\"gemini-2.5-flash\"}\r\n\r\n"
    );

    #[test]
    fn gemini_stream_and_json_take_the_last_totals() {
        for step in [1, 9, 4096] {
            let u = feed_split(
                SseScanner::new(Dialect::Gemini),
                GEMINI_SSE.as_bytes(),
                step,
            );
            assert_eq!(
                (u.input, u.cached_input, u.output, u.reasoning),
                (30, 20, 12, 30),
                "step {step}"
            );
            assert_eq!(u.model.as_deref(), Some("gemini-2.5-flash"));
        }
        let json = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4},"modelVersion":"gemini-2.0-flash","responseId":"x"}"#;
        let u = feed_split(JsonScanner::new(Dialect::Gemini), json.as_bytes(), 5);
        assert_eq!(
            (u.input, u.output, u.model.as_deref()),
            (3, 1, Some("gemini-2.0-flash"))
        );
    }

    #[test]
    fn openai_responses_api_json_and_stream() {
        let json = r#"{"id":"resp_1","object":"response","model":"o4-mini-2025-04-16","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":200,"input_tokens_details":{"cached_tokens":150},"output_tokens":90,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":290}}"#;
        let u = feed_split(JsonScanner::new(Dialect::OpenAi), json.as_bytes(), 11);
        assert_eq!(
            (u.input, u.cached_input, u.output, u.reasoning),
            (50, 150, 26, 64)
        );
        assert_eq!(u.model.as_deref(), Some("o4-mini-2025-04-16"));
        let sse = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"model\":\"o4-mini-2025-04-16\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"model\":\"o4-mini-2025-04-16\",\"usage\":{\"input_tokens\":200,\"input_tokens_details\":{\"cached_tokens\":150},\"output_tokens\":90,\"output_tokens_details\":{\"reasoning_tokens\":64},\"total_tokens\":290}}}\n\n"
        );
        for step in [1, 13, 4096] {
            let u = feed_split(SseScanner::new(Dialect::OpenAi), sse.as_bytes(), step);
            assert_eq!(
                (u.input, u.cached_input, u.output, u.reasoning),
                (50, 150, 26, 64),
                "step {step}"
            );
            assert_eq!(u.model.as_deref(), Some("o4-mini-2025-04-16"));
        }
    }

    #[test]
    fn ollama_native_ndjson_and_json() {
        let nd = concat!(
            "{\"model\":\"llama3.2\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n",
            "{\"model\":\"llama3.2\",\"created_at\":\"t\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done\":true,\"done_reason\":\"stop\",\"total_duration\":1,\"prompt_eval_count\":26,\"eval_count\":298}\n"
        );
        for step in [1, 7, 4096] {
            let mut s = scanner_for(Dialect::OpenAi, Some(b"application/x-ndjson"));
            for c in nd.as_bytes().chunks(step) {
                s.feed(c);
            }
            let u = s.finish();
            assert_eq!(
                (u.input, u.output, u.model.as_deref()),
                (26, 298, Some("llama3.2")),
                "step {step}"
            );
        }
        let json = r#"{"model":"llama3.2","message":{"role":"assistant","content":"Hi"},"done":true,"prompt_eval_count":26,"eval_count":298}"#;
        let u = feed_split(JsonScanner::new(Dialect::OpenAi), json.as_bytes(), 3);
        assert_eq!((u.input, u.output), (26, 298));
    }

    #[test]
    fn embeddings_count_prompt_tokens() {
        let json = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let u = feed_split(JsonScanner::new(Dialect::OpenAi), json.as_bytes(), 4);
        assert_eq!(
            (u.input, u.output, u.model.as_deref()),
            (8, 0, Some("text-embedding-3-small"))
        );
    }

    /// Found by fuzzing (fuzz/corpus/usage_scanner/json_huge_numbers): counts near
    /// `u64::MAX` overflowed `total()` (a panic in debug builds, a wrapped, too-small total in
    /// release).
    #[test]
    fn absurd_token_counts_are_capped_not_overflowed() {
        let json = r#"{"model":"m","usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615,"completion_tokens_details":{"reasoning_tokens":1}}}"#;
        let u = feed_split(JsonScanner::new(Dialect::OpenAi), json.as_bytes(), 7);
        assert_eq!(
            (u.input, u.output, u.reasoning),
            (MAX_TOKENS, MAX_TOKENS, 1)
        );
        assert_eq!(u.total(), 2 * MAX_TOKENS + 1);
        let ollama = br#"{"done":true,"prompt_eval_count":18446744073709551615,"eval_count":18446744073709551615}"#;
        let u = feed_split(
            SseScanner::ndjson(Dialect::OpenAi),
            &[&ollama[..], b"\n"].concat(),
            5,
        );
        assert_eq!((u.input, u.output), (MAX_TOKENS, MAX_TOKENS));
        let u = Usage {
            input: u64::MAX,
            output: 1,
            ..Usage::default()
        };
        assert_eq!(u.total(), u64::MAX);
        assert!(u.metered());
    }

    #[test]
    fn huge_lines_are_skipped_with_bounded_memory() {
        let mut s = SseScanner::new(Dialect::OpenAi);
        let big = vec![b'x'; 1024 * 1024];
        s.feed(b"data: {\"model\":\"m\",\"content\":\"");
        for _ in 0..4 {
            s.feed(&big);
            assert!(s.partial.capacity() <= 2 * MAX_LINE);
        }
        s.feed(b"\"}\n");
        s.feed(OPENAI_SSE.as_bytes());
        let u = s.finish();
        assert_eq!(u.total(), 150);
    }

    #[test]
    fn large_json_keeps_bounded_tail() {
        let mut s = JsonScanner::new(Dialect::OpenAi);
        s.feed(br#"{"model":"m","choices":[{"message":{"content":""#);
        let filler = vec![b'a'; 10_000];
        for _ in 0..100 {
            s.feed(&filler);
            assert!(s.tail.len() <= 2 * JSON_TAIL + filler.len());
        }
        s.feed(br#""}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#);
        let u = s.finish();
        assert_eq!((u.input, u.output), (1, 2));
    }

    #[test]
    fn data_counter_counts_top_level_data_elements_only() {
        let body = br#"{"created":1,"meta":{"data":[1,2,3,4]},"data":[{"revised_prompt":"a \"data\":[{},{}] \\","url":"u"},{"b64_json":"QUJD","nested":{"data":[{}]}},{"url":"v"}],"usage":{"input_tokens":5,"output_tokens":9}}"#;
        for step in [1, 2, 7, 1000] {
            let mut c = DataCounter::default();
            for ch in body.chunks(step) {
                c.feed(ch);
            }
            assert_eq!(c.count(), 3, "step {step}");
        }
        let mut s = scanner_for_capability(
            Dialect::OpenAi,
            Capability::Images,
            Some(b"application/json"),
        );
        s.feed(body);
        let u = s.finish();
        assert_eq!((u.images, u.input, u.output, u.found), (3, 5, 9, true));
        // A million levels of nesting: a counter, no recursion, nothing held.
        let mut c = DataCounter::default();
        c.feed(br#"{"data":["#);
        for _ in 0..1_000_000 {
            c.feed(b"[");
        }
        assert_eq!(c.count(), 1);
    }

    #[test]
    fn transcription_usage_seconds_tokens_or_verbose_duration() {
        let scan = |body: &[u8]| {
            let mut s = scanner_for_capability(
                Dialect::OpenAi,
                Capability::Transcription,
                Some(b"application/json"),
            );
            for c in body.chunks(5) {
                s.feed(c);
            }
            s.finish()
        };
        let u = scan(br#"{"text":"hi","usage":{"type":"duration","seconds":9}}"#);
        assert_eq!((u.audio_ms, u.found), (9000, true));
        let u = scan(br#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,"input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":45,"total_tokens":59}}"#);
        assert_eq!((u.input, u.output, u.audio_ms), (14, 45, 0));
        let u = scan(br#"{"task":"transcribe","language":"english","duration":8.47,"text":"the \"duration\": 99","segments":[]}"#);
        assert_eq!((u.audio_ms, u.found), (8470, true));
        let u = scan(br#"{"text":"no usage here"}"#);
        assert!(!u.found);
    }

    #[test]
    fn streamed_images_count_completed_events_even_past_the_line_limit() {
        let big = "A".repeat(600 * 1024);
        let body = format!(
            "event: image_generation.partial_image\ndata: {{\"type\":\"image_generation.partial_image\",\"b64_json\":\"{big}\",\"partial_image_index\":0}}\n\n\
             event: image_generation.completed\ndata: {{\"type\":\"image_generation.completed\",\"b64_json\":\"{big}\",\"usage\":{{\"total_tokens\":4170,\"input_tokens\":10,\"output_tokens\":4160}}}}\n\n\
             data: {{\"type\":\"image_generation.completed\",\"b64_json\":\"QUJD\",\"usage\":{{\"total_tokens\":4170,\"input_tokens\":10,\"output_tokens\":4160}}}}\n\n"
        );
        for step in [1000, 16 * 1024, 1 << 22] {
            let s = scanner_for_capability(
                Dialect::OpenAi,
                Capability::Images,
                Some(b"text/event-stream"),
            );
            let u = feed_split(s, body.as_bytes(), step);
            assert_eq!((u.images, u.input, u.output), (2, 10, 4160), "step {step}");
        }
    }

    #[test]
    fn member_search_allows_whitespace_and_rejects_values() {
        let hay = b"{\"a\" :\t\"usage\", \"usage\"\r\n:\n {\"x\": 1}, \"n\": null}";
        let at: Vec<usize> = member_values(hay, b"\"usage\"").collect();
        assert_eq!(at.len(), 1, "the string value is not a member");
        assert_eq!(hay[at[0]], b'{');
        assert_eq!(usage_value_at(hay, b"\"n\""), None, "null is no value");
        assert_eq!(value_after_key(b"\"k\"  ", 3), None);
        assert_eq!(value_after_key(b"\"k\" : ", 3), Some(6));
        assert!(member_is(b"{\"type\" : \"b\"}", b"\"type\"", &[b"a", b"b"]));
        assert!(!member_is(b"{\"type\": \"bb\"}", b"\"type\"", &[b"b"]));
        assert!(is_done(b"{\"done\"\t:\ttrue}") && !is_done(b"{\"done\": false}"));
    }

    /// The shapes an OpenAI-compatible server written in Python sends: spaced, keys in its
    /// own order, no `event:` lines, data pretty-printed over several `data:` lines.
    #[test]
    fn responses_stream_spaced_unnamed_reordered_and_multi_line() {
        let created = r#"{"response": {"usage": null, "model": "o3", "id": "r"}, "type": "response.created"}"#;
        let delta = r#"{"delta": "Hi \"usage\": {\"input_tokens\": 1}", "type": "response.output_text.delta"}"#;
        let done = r#"{"response": {"usage": {"output_tokens_details": {"reasoning_tokens": 64}, "output_tokens": 90, "input_tokens_details": {"cached_tokens": 150}, "input_tokens": 200}, "model": "o3-2025-04-16"}, "sequence_number": 3, "type": "response.completed"}"#;
        let one_line = format!("data: {created}\n\ndata: {delta}\n\ndata: {done}\n\n");
        let multi = |j: &str| {
            let mut out = String::new();
            for part in j.split(", ") {
                out.push_str("data: ");
                out.push_str(part);
                out.push_str(",\n");
            }
            // Each line ends with the comma that `split` took; the last one has none.
            format!("{}\n\n", out.trim_end_matches(",\n"))
        };
        let multi_line = format!("{}{}{}", multi(created), multi(delta), multi(done));
        assert!(multi_line.contains("\"type\": \"response.completed\"}\n\n"));
        for body in [one_line, multi_line] {
            for step in [1, 7, 4096] {
                let u = feed_split(SseScanner::new(Dialect::OpenAi), body.as_bytes(), step);
                assert_eq!(
                    (u.input, u.cached_input, u.output, u.reasoning),
                    (50, 150, 26, 64),
                    "step {step}: {body}"
                );
                assert_eq!(u.model.as_deref(), Some("o3-2025-04-16"));
            }
        }
    }

    #[test]
    fn streamed_images_in_any_layout_and_key_order() {
        let big = "A".repeat(600 * 1024);
        let body = format!(
            "event: image_generation.partial_image\ndata: {{\"b64_json\": \"{big}\", \"type\": \"image_generation.partial_image\"}}\n\n\
             event: image_generation.completed\ndata: {{\"b64_json\": \"{big}\", \"usage\": {{\"input_tokens\": 10, \"output_tokens\": 4160}}, \"type\": \"image_generation.completed\"}}\n\n\
             data: {{\"b64_json\": \"QUJD\",\ndata:  \"type\" : \"image_edit.completed\",\ndata: \"usage\": {{\"input_tokens\": 10, \"output_tokens\": 4160}}}}\n\n"
        );
        for step in [1000, 16 * 1024, 1 << 22] {
            let s = scanner_for_capability(
                Dialect::OpenAi,
                Capability::Images,
                Some(b"text/event-stream"),
            );
            let u = feed_split(s, body.as_bytes(), step);
            assert_eq!((u.images, u.input, u.output), (2, 10, 4160), "step {step}");
        }
    }

    #[test]
    fn ollama_ndjson_with_any_spacing() {
        let nd = concat!(
            "{\"model\":\"llama3.2\",\"done\":false}\n",
            "{ \"eval_count\" :\t298, \"prompt_eval_count\": 26, \"done\" :\ttrue , \"model\" : \"llama3.2\" }\r\n"
        );
        for step in [1, 5, 4096] {
            let u = feed_split(SseScanner::ndjson(Dialect::OpenAi), nd.as_bytes(), step);
            assert_eq!(
                (u.input, u.output, u.model.as_deref()),
                (26, 298, Some("llama3.2")),
                "step {step}"
            );
        }
    }

    #[test]
    fn capability_from_path() {
        use Capability::*;
        for (p, c) in [
            ("/v1/chat/completions", Tokens),
            ("/openai/deployments/d/chat/completions", Tokens),
            ("/v1/responses", Tokens),
            ("/v1beta/models/m:streamGenerateContent", Tokens),
            ("/api/chat", Tokens),
            ("/v1/images/generations", Images),
            ("/v1/images/edits", Images),
            ("/v1/audio/speech", Speech),
            ("/v1/audio/transcriptions", Transcription),
            ("/v1/audio/translations", Transcription),
            ("/v1/models", Other),
            ("/v1/files", Other),
        ] {
            assert_eq!(Capability::of_path(p), c, "{p}");
        }
    }
}
