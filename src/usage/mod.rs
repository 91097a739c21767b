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

pub mod bytes;
#[cfg(feature = "bedrock")]
mod eventstream;
mod json;
pub mod lean;
mod sse;

pub use json::{DataCounter, JsonScanner, model_and_usage};
pub use lean::{Field, UsageObject};
pub use sse::SseScanner;

/// Longest SSE line kept across frames; longer lines (huge content deltas) are skipped.
pub const MAX_LINE: usize = 256 * 1024;
/// Bytes kept from the start of a JSON body to find `model`.
pub const JSON_HEAD: usize = 4096;
/// Bytes kept from the end of a JSON body to find `usage`.
pub const JSON_TAIL: usize = 64 * 1024;
/// Upper bound of [`Scanner::buffered`] (buffer capacities, growth slack included), whatever
/// the input: an SSE line buffer and an event's gathered data (each at most twice
/// [`MAX_LINE`] after amortised growth), a dialect's kept last usage (twice [`JSON_TAIL`]), the
/// over-long event's head and tail windows.
pub const MAX_BUFFERED: usize = 4 * MAX_LINE + 2 * JSON_HEAD + 6 * JSON_TAIL;

/// How a wire format reports usage: what the scanners ask of it at each event, at an
/// over-long event's head and tail, at the end of a stream and of a JSON body. Each provider
/// module implements the dialect of its wire format; the scanners here know only framing
/// (SSE, NDJSON, whole JSON) and memory bounds.
pub trait Dialect: std::fmt::Debug + Send + Sync {
    /// SSE `event:` names that may carry usage; an event named otherwise is skipped unread.
    fn usage_events(&self) -> &'static [&'static [u8]] {
        &[]
    }
    /// One event's whole data (SSE), or one NDJSON line.
    fn event(&self, s: &mut StreamState, data: &[u8]);
    /// An event whose data outgrew [`MAX_LINE`]: its first [`JSON_HEAD`] and last
    /// [`JSON_TAIL`] bytes.
    fn long_event(&self, _s: &mut StreamState, _head: &[u8], _tail: &[u8]) {}
    /// The stream ended: whatever the dialect kept for the end is read now.
    fn end(&self, _s: &mut StreamState) {}
    /// A whole JSON body, from its bounded head and tail.
    fn json(&self, u: &mut Usage, head: &[u8], tail: &[u8]);
}

/// What a dialect sees of a stream while it reads events.
#[derive(Debug)]
pub struct StreamState {
    pub usage: Usage,
    /// The current event was named by an `event:` line as carrying usage.
    pub named_usage: bool,
    /// An Images API stream: each completed-image event is one image.
    pub images: bool,
    /// Newline-delimited JSON rather than SSE.
    pub ndjson: bool,
    /// Events still worth parsing for `model` alone (first chunks carry it).
    model_tries: u8,
    /// A small tail a dialect keeps until the end of the stream (bounded by [`JSON_TAIL`]):
    /// the last of several running-total usage reports, parsed once.
    last: Vec<u8>,
}

impl StreamState {
    fn new(ndjson: bool) -> Self {
        Self {
            usage: Usage::default(),
            named_usage: false,
            images: false,
            ndjson,
            model_tries: 4,
            last: Vec::new(),
        }
    }

    /// Whether this event should be parsed for `model` alone; counts the try.
    pub fn want_model(&mut self) -> bool {
        let want = self.usage.model.is_none() && self.model_tries > 0;
        if want {
            self.model_tries -= 1;
        }
        want
    }

    /// Keeps `from` (at most [`JSON_TAIL`] bytes of it) for the end, replacing what was kept.
    pub fn keep_last(&mut self, from: &[u8]) {
        self.last.clear();
        self.last
            .extend_from_slice(&from[..from.len().min(JSON_TAIL)]);
    }

    /// What [`keep_last`](Self::keep_last) kept, taken.
    pub fn take_last(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.last)
    }

    /// One image counted.
    pub fn image(&mut self) {
        self.usage.images += 1;
        self.usage.found = true;
    }
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
    /// Chat, completions, Responses API, messages, generateContent, embeddings, and the
    /// native `/api/` chat, generate and embed paths: tokens in the response.
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
        const TOKENS: [&str; 17] = [
            "/chat/completions",
            "/completions",
            "/responses",
            "/embeddings",
            "/messages",
            ":generateContent",
            ":streamGenerateContent",
            "/api/chat",
            "/api/generate",
            // Cohere v2.
            "/v2/chat",
            "/v2/embed",
            // Bedrock.
            "/converse",
            "/converse-stream",
            "/invoke",
            "/invoke-with-response-stream",
            // Anthropic on Vertex.
            ":rawPredict",
            ":streamRawPredict",
        ];
        if TOKENS.iter().any(|s| path.ends_with(s)) || path.ends_with("/api/embed") {
            Self::Tokens
        } else if path.ends_with("/images/generations")
            || path.ends_with("/images/edits")
            || path.ends_with("/images/variations")
        {
            Self::Images
        } else if path.ends_with("/audio/speech") || path.contains("/text-to-speech/") {
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

impl Usage {
    /// Token counts come from the upstream's text: a broken or hostile one can report
    /// `u64::MAX`. No response has [`MAX_TOKENS`] tokens, so capping there costs nothing and
    /// keeps every sum of counts (here, in metrics, in the ledger) far from overflowing.
    pub fn clamp_tokens(&mut self) {
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
pub fn seconds_to_ms(s: f64) -> u64 {
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

/// Whether a content type names `what`. Content types are a few dozen bytes: a plain scan
/// costs less than building a SIMD searcher for each of the few checks per response.
pub fn content_type_has(ct: &[u8], what: &[u8]) -> bool {
    ct.windows(what.len()).any(|w| w.eq_ignore_ascii_case(what))
}

/// A provider's usage dialect; `None` for a provider byokd does not meter.
pub type DialectRef = Option<&'static dyn Dialect>;

/// Picks the scanner for a response from its dialect and content type.
pub fn scanner_for(dialect: DialectRef, content_type: Option<&[u8]>) -> Scanner {
    let ct = content_type.unwrap_or_default();
    let Some(dialect) = dialect else {
        return Scanner::Off;
    };
    // Nearly every response says exactly this: no scans of it for other types.
    if ct.eq_ignore_ascii_case(b"application/json") {
        return Scanner::Json(JsonScanner::new(dialect));
    }
    if content_type_has(ct, b"text/event-stream") {
        Scanner::Sse(SseScanner::new(dialect))
    } else if content_type_has(ct, b"ndjson") {
        Scanner::Sse(SseScanner::ndjson(dialect))
    } else if content_type_has(ct, b"json") {
        Scanner::Json(JsonScanner::new(dialect))
    } else if cfg!(feature = "bedrock") && content_type_has(ct, b"vnd.amazon.eventstream") {
        event_stream(dialect)
    } else {
        Scanner::Off
    }
}

#[cfg(feature = "bedrock")]
fn event_stream(dialect: &'static dyn Dialect) -> Scanner {
    Scanner::EventStream(eventstream::EventStreamScanner::new(dialect))
}

#[cfg(not(feature = "bedrock"))]
fn event_stream(_: &'static dyn Dialect) -> Scanner {
    Scanner::Off
}

/// Picks the scanner for a response of `capability`: speech responses are audio (their units
/// come from the request), image and transcription JSON bodies get their unit counters, and
/// image streams count their completed-image events.
pub fn scanner_for_capability(
    dialect: DialectRef,
    capability: Capability,
    content_type: Option<&[u8]>,
) -> Scanner {
    if !matches!(capability, Capability::Images | Capability::Transcription) {
        return match capability {
            Capability::Speech => Scanner::Off,
            _ => scanner_for(dialect, content_type),
        };
    }
    let json = content_type
        .is_some_and(|ct| content_type_has(ct, b"json") && !content_type_has(ct, b"ndjson"));
    let sse = content_type.is_some_and(|ct| content_type_has(ct, b"text/event-stream"));
    match (capability, dialect) {
        (Capability::Images, Some(d)) if json => {
            let mut s = JsonScanner::new(d);
            s.images = Some(DataCounter::default());
            Scanner::Json(s)
        }
        (Capability::Images, Some(d)) if sse => {
            let mut s = SseScanner::new(d);
            s.state.images = true;
            Scanner::Sse(s)
        }
        (Capability::Transcription, Some(d)) if json => {
            let mut s = JsonScanner::new(d);
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
    #[cfg(feature = "bedrock")]
    EventStream(eventstream::EventStreamScanner),
    Off,
}

impl UsageScanner for Scanner {
    fn feed(&mut self, chunk: &[u8]) {
        match self {
            Self::Sse(s) => s.feed(chunk),
            Self::Json(s) => s.feed(chunk),
            #[cfg(feature = "bedrock")]
            Self::EventStream(s) => s.feed(chunk),
            Self::Off => {}
        }
    }

    fn finish(&mut self) -> Usage {
        match self {
            Self::Sse(s) => s.finish(),
            Self::Json(s) => s.finish(),
            #[cfg(feature = "bedrock")]
            Self::EventStream(s) => s.finish(),
            Self::Off => Usage::default(),
        }
    }
}

impl Scanner {
    /// As [`UsageScanner::feed`], for a frame the scanner may hold instead of copying.
    pub fn feed_bytes(&mut self, chunk: &::bytes::Bytes) {
        match self {
            Self::Json(s) => s.feed_bytes(chunk),
            _ => self.feed(chunk),
        }
    }

    /// Bytes the scanner holds right now (buffer capacities): what the memory bound is about.
    pub fn buffered(&self) -> usize {
        match self {
            Self::Sse(s) => s.buffered(),
            Self::Json(s) => s.buffered(),
            #[cfg(feature = "bedrock")]
            Self::EventStream(s) => s.buffered(),
            Self::Off => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bytes::*;
    use super::*;

    fn d(kind: &str) -> &'static dyn Dialect {
        crate::provider::kind(kind).and_then(|k| k.usage()).unwrap()
    }

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
            let u = feed_split(SseScanner::new(d("openai")), OPENAI_SSE.as_bytes(), step);
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
                SseScanner::new(d("anthropic")),
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
            let u = feed_split(JsonScanner::new(d("openai")), oa.as_bytes(), step);
            assert_eq!(
                (u.input, u.output, u.model.as_deref()),
                (9, 12, Some("gpt-4o-mini"))
            );
        }
        let an = r#"{"id":"msg","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":4,"output_tokens":5}}"#;
        let u = feed_split(JsonScanner::new(d("anthropic")), an.as_bytes(), 7);
        assert_eq!((u.input, u.cached_input, u.output), (10, 4, 5));
        assert_eq!(u.model.as_deref(), Some("claude-3-5-haiku-20241022"));
    }

    /// A JSON body held as one frame, or fed as frames after a held first one, reads as the
    /// same body copied piece by piece, also past the head and tail bounds.
    #[test]
    fn json_frames_held_or_copied_read_alike() {
        let pad = "x".repeat(3 * JSON_TAIL);
        let long = format!(
            r#"{{"model":"gpt-4o-mini","choices":[{{"message":{{"content":"{pad}"}}}}],"usage":{{"prompt_tokens":9,"completion_tokens":12}}}}"#
        );
        for body in [
            long.as_str(),
            r#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        ] {
            let copied = feed_split(JsonScanner::new(d("openai")), body.as_bytes(), 7);
            let mut whole = JsonScanner::new(d("openai"));
            whole.feed_bytes(&::bytes::Bytes::copy_from_slice(body.as_bytes()));
            assert!(
                whole.buffered() >= body.len(),
                "the frame is held, not copied"
            );
            let whole = whole.finish();
            let mut mixed = JsonScanner::new(d("openai"));
            let (a, b) = body.split_at(body.len() / 3);
            mixed.feed_bytes(&::bytes::Bytes::copy_from_slice(a.as_bytes()));
            mixed.feed_bytes(&::bytes::Bytes::copy_from_slice(b.as_bytes()));
            let mixed = mixed.finish();
            for u in [&whole, &mixed] {
                assert_eq!(
                    (u.input, u.output, u.model.as_deref(), u.found),
                    (copied.input, copied.output, copied.model.as_deref(), true)
                );
            }
        }
    }

    #[test]
    fn empty_model_of_azure_first_chunk_is_not_the_label() {
        let body = format!(
            "data: {{\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[]}}\n\n{OPENAI_SSE}"
        );
        let u = feed_split(SseScanner::new(d("openai")), body.as_bytes(), 17);
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
            let u = feed_split(SseScanner::new(d("gemini")), GEMINI_SSE.as_bytes(), step);
            assert_eq!(
                (u.input, u.cached_input, u.output, u.reasoning),
                (30, 20, 12, 30),
                "step {step}"
            );
            assert_eq!(u.model.as_deref(), Some("gemini-2.5-flash"));
        }
        let json = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4},"modelVersion":"gemini-2.0-flash","responseId":"x"}"#;
        let u = feed_split(JsonScanner::new(d("gemini")), json.as_bytes(), 5);
        assert_eq!(
            (u.input, u.output, u.model.as_deref()),
            (3, 1, Some("gemini-2.0-flash"))
        );
    }

    /// Each dialect's lean reading (the usual object) and serde's (forced here by an escaped
    /// key, which the lean reader leaves to serde) count the same body the same.
    #[test]
    fn lean_and_serde_readings_agree_for_each_dialect() {
        let cases = [
            (
                "openai",
                r#"{"model":"gpt-4o","usage":{"PT":120,"completion_tokens":30,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":100},"completion_tokens_details":{"reasoning_tokens":10}}}"#,
                ("prompt_tokens", "prompt\\u005ftokens"),
                (20, 100, 0, 20, 10),
            ),
            (
                "openai",
                r#"{"model":"o4-mini","usage":{"input_tokens":200,"input_tokens_details":{"cached_tokens":150},"PT":90,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":290}}"#,
                ("output_tokens", "output\\u005ftokens"),
                (50, 150, 0, 26, 64),
            ),
            (
                "anthropic",
                r#"{"model":"claude-sonnet-4","usage":{"PT":25,"cache_creation_input_tokens":7,"cache_read_input_tokens":300,"output_tokens":42,"service_tier":"standard"}}"#,
                ("input_tokens", "input\\u005ftokens"),
                (25, 300, 7, 42, 0),
            ),
            (
                "gemini",
                r#"{"candidates":[],"usageMetadata":{"PT":90,"candidatesTokenCount":12,"thoughtsTokenCount":5,"cachedContentTokenCount":40,"promptTokensDetails":[{"modality":"TEXT","tokenCount":90}]},"modelVersion":"gemini-2.5-flash"}"#,
                ("promptTokenCount", "prompt\\u0054okenCount"),
                (50, 40, 0, 12, 5),
            ),
        ];
        for (kind, body, (plain, escaped), want) in cases {
            let read = |key: &str| {
                let body = body.replace("PT", key);
                let u = feed_split(JsonScanner::new(d(kind)), body.as_bytes(), 4096);
                (
                    (
                        u.input,
                        u.cached_input,
                        u.cache_write,
                        u.output,
                        u.reasoning,
                    ),
                    u.model,
                )
            };
            let (lean, serde) = (read(plain), read(escaped));
            assert_eq!(lean.0, want, "{kind}: {body}");
            assert_eq!(lean, serde, "{kind}: {body}");
            assert!(lean.1.is_some(), "{kind}");
        }
    }

    #[test]
    fn openai_responses_api_json_and_stream() {
        let json = r#"{"id":"resp_1","object":"response","model":"o4-mini-2025-04-16","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":200,"input_tokens_details":{"cached_tokens":150},"output_tokens":90,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":290}}"#;
        let u = feed_split(JsonScanner::new(d("openai")), json.as_bytes(), 11);
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
            let u = feed_split(SseScanner::new(d("openai")), sse.as_bytes(), step);
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
            let mut s = scanner_for(Some(d("openai")), Some(b"application/x-ndjson"));
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
        let u = feed_split(JsonScanner::new(d("openai")), json.as_bytes(), 3);
        assert_eq!((u.input, u.output), (26, 298));
    }

    #[test]
    fn embeddings_count_prompt_tokens() {
        let json = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let u = feed_split(JsonScanner::new(d("openai")), json.as_bytes(), 4);
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
        let u = feed_split(JsonScanner::new(d("openai")), json.as_bytes(), 7);
        assert_eq!(
            (u.input, u.output, u.reasoning),
            (MAX_TOKENS, MAX_TOKENS, 1)
        );
        assert_eq!(u.total(), 2 * MAX_TOKENS + 1);
        let ollama = br#"{"done":true,"prompt_eval_count":18446744073709551615,"eval_count":18446744073709551615}"#;
        let u = feed_split(
            SseScanner::ndjson(d("openai")),
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
        let mut s = SseScanner::new(d("openai"));
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
        let mut s = JsonScanner::new(d("openai"));
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
            Some(d("openai")),
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
                Some(d("openai")),
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
                Some(d("openai")),
                Capability::Images,
                Some(b"text/event-stream"),
            );
            let u = feed_split(s, body.as_bytes(), step);
            assert_eq!((u.images, u.input, u.output), (2, 10, 4160), "step {step}");
        }
    }

    #[test]
    fn content_types_match_case_insensitively() {
        assert!(content_type_has(
            b"text/event-stream; charset=utf-8",
            b"text/event-stream"
        ));
        assert!(content_type_has(b"Text/Event-Stream", b"text/event-stream"));
        assert!(content_type_has(b"application/x-ndjson", b"json"));
        assert!(!content_type_has(b"text/plain", b"json"));
        assert!(!content_type_has(b"js", b"json"), "shorter than the needle");
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
                let u = feed_split(SseScanner::new(d("openai")), body.as_bytes(), step);
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
                Some(d("openai")),
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
            let u = feed_split(SseScanner::ndjson(d("openai")), nd.as_bytes(), step);
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
