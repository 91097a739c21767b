//! Streaming usage without the client's help (OpenAI wire format).
//!
//! An OpenAI-style stream reports usage only when the request sets
//! `stream_options.include_usage`. When the app did not, byokd adds it (the rewrite half: one
//! insertion right after the body's opening `{`), then hides what that changes in the response
//! (the meter half): the `"usage":null` field of every chunk and the extra usage-only chunk,
//! in whatever layout the provider gives its JSON (compact, spaced, pretty-printed over
//! several `data:` lines). The app receives byte for byte the stream it asked for (for a
//! compact stream, exactly what the provider sends without `include_usage`); the meter saw the
//! usage.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::usage::MAX_LINE;
use crate::usage::bytes::{member_values, skip_ws, string_after};

/// Largest request body byokd reads to decide; larger ones stream through unedited.
pub const MAX_INSPECTED_BODY: usize = 1024 * 1024;

const INSERT: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// The request body sent upstream: bytes already read (and possibly edited), then the rest of
/// the app's body, still streaming. The size limit applies to the whole. An optional tap
/// looks at the first [`MODEL_HEAD`] bytes as they pass, for the request's `model`.
pub struct RequestBody {
    prefix: Option<Bytes>,
    /// Boxed, as `tap`: most bodies are read whole, and the request is moved a dozen times
    /// on its way into hyper's connection, so the rare parts are kept out of its size.
    rest: Option<Box<http_body_util::Limited<crate::timeouts::ClientBody>>>,
    tap: Option<Box<ModelTap>>,
}

/// Bytes of a request body looked at for its `model`: SDKs put it first (JSON) or among the
/// first form fields (multipart, before the file), so a small head suffices.
pub const MODEL_HEAD: usize = 4096;

/// Longest request `model` kept as a metric label; a longer one is not a model name.
pub const MAX_MODEL_LABEL: usize = 256;

/// How the request body is encoded, for the model tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Multipart,
}

impl BodyKind {
    pub fn of(content_type: Option<&[u8]>) -> Option<Self> {
        let ct = content_type?;
        if ct.starts_with(b"multipart/form-data") {
            Some(Self::Multipart)
        } else if crate::usage::content_type_has(ct, b"json") {
            Some(Self::Json)
        } else {
            None
        }
    }
}

/// Copies at most [`MODEL_HEAD`] bytes of the body as it streams and resolves the `model`
/// once: when the head is full, when the body ends, or when it is dropped.
struct ModelTap {
    head: Vec<u8>,
    kind: BodyKind,
    out: Arc<OnceLock<Box<str>>>,
}

impl ModelTap {
    fn feed(&mut self, data: &[u8]) -> bool {
        let n = (MODEL_HEAD - self.head.len()).min(data.len());
        self.head.extend_from_slice(&data[..n]);
        self.head.len() >= MODEL_HEAD
    }

    fn resolve(self) {
        resolve_model(&self.head, self.kind, &self.out);
    }
}

fn resolve_model(head: &[u8], kind: BodyKind, out: &OnceLock<Box<str>>) {
    let model = match kind {
        BodyKind::Json => string_after(head, b"\"model\""),
        BodyKind::Multipart => multipart_field(head, b"model"),
    };
    if let Some(m) = model.and_then(model_label) {
        let _ = out.set(m);
    }
}

/// A request's `model` as the meter's label: a name of at most [`MAX_MODEL_LABEL`] bytes.
pub fn model_label(model: String) -> Option<Box<str>> {
    (!model.is_empty() && model.len() <= MAX_MODEL_LABEL).then(|| model.into_boxed_str())
}

/// The value of the form field `name` in the head of a multipart body, if it is there whole.
fn multipart_field(head: &[u8], name: &[u8]) -> Option<String> {
    let key = [b"name=\"".as_slice(), name, b"\""].concat();
    let at = memchr::memmem::find(head, &key)? + key.len();
    let start = at + memchr::memmem::find(&head[at..], b"\r\n\r\n")? + 4;
    let len = memchr::memmem::find(&head[start..], b"\r\n")?;
    let v = std::str::from_utf8(&head[start..start + len]).ok()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

impl RequestBody {
    pub fn streaming(rest: http_body_util::Limited<crate::timeouts::ClientBody>) -> Self {
        Self {
            prefix: None,
            rest: Some(Box::new(rest)),
            tap: None,
        }
    }

    /// A body read whole (and possibly edited).
    pub fn whole(b: Bytes) -> Self {
        Self {
            prefix: Some(b),
            rest: None,
            tap: None,
        }
    }

    /// Looks for the request's `model` in the body's head as it is sent; the answer lands
    /// in `out` (for the meter, when the response names no model).
    pub fn tap_model(&mut self, kind: BodyKind, out: Arc<OnceLock<Box<str>>>) {
        if out.get().is_some() {
            return;
        }
        // A body held whole is looked at where it lies, not copied as it passes.
        if let Some(whole) = self.whole_bytes() {
            resolve_model(&whole[..whole.len().min(MODEL_HEAD)], kind, &out);
            return;
        }
        self.tap = Some(Box::new(ModelTap {
            head: Vec::new(),
            kind,
            out,
        }));
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(t) = self.tap.take() {
            t.resolve();
        }
    }
}

impl RequestBody {
    /// No body (byokd's own calls, such as the key check's list-models).
    /// The body's bytes when it is known whole (nothing left to stream).
    pub fn whole_bytes(&self) -> Option<&[u8]> {
        match (&self.prefix, &self.rest) {
            (_, Some(_)) => None,
            (Some(b), None) => Some(b),
            (None, None) => Some(&[]),
        }
    }

    pub fn empty() -> Self {
        Self {
            prefix: None,
            rest: None,
            tap: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let res = if let Some(p) = this.prefix.take() {
            Poll::Ready(Some(Ok(Frame::data(p))))
        } else {
            match &mut this.rest {
                Some(rest) => Pin::new(&mut **rest).poll_frame(cx),
                None => Poll::Ready(None),
            }
        };
        if let Some(tap) = &mut this.tap {
            let done = match &res {
                Poll::Ready(Some(Ok(f))) => f.data_ref().is_some_and(|d| tap.feed(d)),
                Poll::Ready(_) => true,
                Poll::Pending => false,
            };
            // The client stops polling once the body says it ended: resolve now, not at drop.
            if (done || this.is_end_stream())
                && let Some(t) = this.tap.take()
            {
                t.resolve();
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let p = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        match &self.rest {
            None => SizeHint::with_exact(p),
            Some(r) => {
                let h = r.size_hint();
                let mut out = SizeHint::new();
                out.set_lower(h.lower() + p);
                if let Some(u) = h.upper() {
                    out.set_upper(u + p);
                }
                out
            }
        }
    }
}

#[derive(Deserialize)]
struct StreamFlags<'a> {
    stream: Option<bool>,
    /// Present, even as `null`: an `Option<&RawValue>` would read `null` as absent, and an
    /// insertion would then send a duplicate key whose meaning depends on the provider's
    /// parser.
    #[serde(default, borrow)]
    stream_options: Present<'a>,
}

#[derive(Default)]
struct Present<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Present<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(d).map(|raw| Self(Some(raw)))
    }
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow)]
    include_usage: Option<&'a RawValue>,
}

/// Offset of `part` (a slice borrowed from `whole`) in `whole`.
fn offset_in(whole: &[u8], part: &str) -> Option<usize> {
    let at = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (at + part.len() <= whole.len()).then_some(at)
}

/// `body` with `insert` placed at `at`, or with `body[at..at + cut]` replaced by it.
fn splice(body: &[u8], at: usize, cut: usize, insert: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + insert.len());
    out.extend_from_slice(&body[..at]);
    out.extend_from_slice(insert);
    out.extend_from_slice(&body[at + cut..]);
    out
}

/// The edited body when `body` is a streaming request that does not get usage, else `None`.
/// The edit is minimal: one insertion (or `false` → `true`), the rest byte for byte.
///
/// - no `stream_options`: `"stream_options":{"include_usage":true},` after the opening `{`;
/// - `stream_options` without `include_usage` (e.g. `{"include_obfuscation":false}`):
///   `"include_usage":true` first inside it;
/// - `"include_usage":false`: flipped to `true`. An app cannot opt out of being metered, and
///   loses nothing: byokd strips the usage again, so it sees the stream it asked for.
///
/// A chat on a provider's own route comes here whether it streams or not (that is in its
/// body; on `/v1` the routing scan has said so already), so the usual body's top level is
/// scanned ([`crate::route::head::top`]) rather than the whole conversation parsed; serde
/// reads any other. As for routing by model, a body that is not JSON deep inside may get the
/// edit; the provider refuses it either way.
pub fn add_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let Some(top) = crate::route::head::top(body) else {
        return parsed_include_usage(body);
    };
    if !top.streams {
        return None;
    }
    match top.stream_options {
        None => Some(splice(body, top.open + 1, 0, INSERT)),
        Some(at) => with_options(body, std::str::from_utf8(&body[at]).ok()?),
    }
}

/// [`add_include_usage`] by serde's parse of the whole body.
fn parsed_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let flags: StreamFlags = serde_json::from_slice(body).ok()?;
    if flags.stream != Some(true) {
        return None;
    }
    let Some(raw) = flags.stream_options.0 else {
        // serde also reads a struct from an array: only an object takes the insertion.
        let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body[open] != b'{' {
            return None;
        }
        return Some(splice(body, open + 1, 0, INSERT));
    };
    with_options(body, raw.get())
}

/// The edit when the body has `stream_options`: `text`, its value, a slice of `body`.
fn with_options(body: &[u8], text: &str) -> Option<Vec<u8>> {
    if !text.starts_with('{') {
        return None;
    }
    let obj = offset_in(body, text)?;
    let opts: StreamOptions = serde_json::from_str(text).ok()?;
    match opts.include_usage {
        Some(v) if v.get() == "true" => None,
        Some(v) if v.get() == "false" => Some(splice(body, offset_in(body, v.get())?, 5, b"true")),
        Some(_) => None,
        // `null`, which serde reads as absent: left alone, as a value byokd does not know.
        None if memchr::memmem::find(text.as_bytes(), b"\"include_usage\"").is_some() => None,
        None => {
            let empty = text[1..].trim_start().starts_with('}');
            let insert: &[u8] = if empty {
                br#""include_usage":true"#
            } else {
                br#""include_usage":true,"#
            };
            Some(splice(body, obj + 1, 0, insert))
        }
    }
}

/// What [`read_bounded`] found.
pub enum Peeked {
    /// The whole body, at most [`MAX_INSPECTED_BODY`] bytes.
    Whole(Bytes),
    /// A larger body: the bytes read, replayed ahead of the rest, still streaming.
    Partial(Box<RequestBody>),
}

/// Reads `body` whole if it is at most [`MAX_INSPECTED_BODY`] bytes; a larger body is never
/// buffered: what was read goes first, the rest streams behind it. Every byte held counts
/// against `permit` (the process-wide bound on buffered request bodies).
pub async fn read_bounded(
    mut body: http_body_util::Limited<crate::timeouts::ClientBody>,
    permit: &mut crate::accept::BufferPermit<'_>,
) -> Result<Peeked, Box<dyn std::error::Error + Send + Sync>> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() > MAX_INSPECTED_BODY {
            return Ok(Peeked::Partial(Box::new(RequestBody {
                prefix: Some(buf.freeze()),
                rest: Some(Box::new(body)),
                tap: None,
            })));
        }
        match body.frame().await {
            None => break,
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    permit.grow(data.len())?;
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    Ok(Peeked::Whole(buf.freeze()))
}

/// Text-to-speech: the number of characters (Unicode scalar values, as providers count them)
/// of the request's text (`input`, or ElevenLabs' `text`), the one field of a speech request
/// worth reading.
pub fn speech_characters(body: &[u8]) -> u64 {
    /// OpenAI names the text `input`, ElevenLabs `text`.
    #[derive(Deserialize)]
    struct Speech<'a> {
        #[serde(borrow)]
        input: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        text: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Speech>(body)
        .ok()
        .and_then(|s| s.input.or(s.text))
        .map_or(0, |i| i.chars().count() as u64)
}

/// Removes what byokd's `include_usage` added from an OpenAI SSE stream: the `"usage":null`
/// member of each chunk (with its comma) and the usage-only chunk (the whole event). A filter
/// of the response body, present only when byokd added `include_usage`.
///
/// It works on whole events (up to the blank line that ends each), whatever the JSON's layout:
/// compact, spaced (`, "usage": null`), or pretty-printed over several `data:` lines. An SSE
/// client dispatches an event only at its blank line, so holding an event's lines until then
/// delays nothing it could see. Events whole in one frame are edited in place; only an event
/// split across frames is gathered first.
#[derive(Debug, Default)]
pub struct StripUsage {
    /// The current event, while it is incomplete across frames (at most [`MAX_LINE`]).
    pending: BytesMut,
    /// What the current line held at the end of the last frame: whether a blank line (the
    /// event's end) may still be in the making.
    line: LineSoFar,
    /// The current event outgrew [`MAX_LINE`]: not a chunk byokd must edit (those are small),
    /// so its bytes pass on as they come until it ends.
    passing: bool,
    /// The data of an event on several `data:` lines, joined as SSE joins them.
    joined: Vec<u8>,
}

/// The current line's bytes so far, as far as spotting a blank line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LineSoFar {
    #[default]
    Empty,
    /// A lone `\r`: `\n` next makes it a blank `\r\n` line.
    Cr,
    Text,
}

impl LineSoFar {
    /// The state once `bytes` (no `\n` among them) are added to the line.
    fn then(self, bytes: &[u8]) -> Self {
        match (self, bytes) {
            (_, []) => self,
            (Self::Empty, [b'\r']) => Self::Cr,
            _ => Self::Text,
        }
    }

    /// The state after `buf`, which has no event end in it, following `self`.
    fn after(self, buf: &[u8]) -> Self {
        match memchr::memrchr(b'\n', buf) {
            Some(i) => Self::Empty.then(&buf[i + 1..]),
            None => self.then(buf),
        }
    }
}

/// Where the event that `buf` continues ends (just past its blank line), if it ends in `buf`;
/// `line` is what the current line held before `buf`.
fn event_end(buf: &[u8], mut line: LineSoFar) -> Option<usize> {
    let mut start = 0;
    for i in memchr::memchr_iter(b'\n', buf) {
        if line.then(&buf[start..i]) != LineSoFar::Text {
            return Some(i + 1);
        }
        line = LineSoFar::Empty;
        start = i + 1;
    }
    None
}

impl StripUsage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether it holds nothing back (no part of an event awaits its end).
    pub fn holds_nothing(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends one whole event (with the blank line that ends it), edited, to `out`: nothing
    /// if it is the usage-only chunk, else without its `"usage":null` member.
    fn event(&mut self, raw: &[u8], out: &mut BytesMut) {
        if raw.len() > MAX_LINE {
            // Too long to be one byokd edits, whether it came in one frame or many.
            out.extend_from_slice(raw);
            return;
        }
        let mut lines = 0;
        let mut first: &[u8] = &[];
        let mut start = 0;
        while start < raw.len() {
            let end = memchr::memchr(b'\n', &raw[start..]).map_or(raw.len(), |i| start + i);
            let line = &raw[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(v) = line.strip_prefix(b"data:") {
                let v = v.strip_prefix(b" ").unwrap_or(v);
                match lines {
                    0 => first = v,
                    1 => {
                        self.joined.clear();
                        self.joined.extend_from_slice(first);
                        self.joined.push(b'\n');
                        self.joined.extend_from_slice(v);
                    }
                    _ => {
                        self.joined.push(b'\n');
                        self.joined.extend_from_slice(v);
                    }
                }
                lines += 1;
            }
            start = end + 1;
        }
        let data = if lines > 1 { &self.joined[..] } else { first };
        if lines > 0 && is_usage_chunk(data) {
            return;
        }
        match null_usage_field(raw) {
            Some((at, len)) => {
                out.extend_from_slice(&raw[..at]);
                out.extend_from_slice(&raw[at + len..]);
            }
            None => out.extend_from_slice(raw),
        }
    }

    /// One data frame in, what goes out now (possibly nothing: an event is incomplete).
    pub fn transform(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(data.len() + self.pending.len());
        let mut rest = data;
        // The event begun in an earlier frame.
        if self.passing || !self.pending.is_empty() {
            let Some(end) = event_end(rest, self.line) else {
                self.line = self.line.after(rest);
                if self.passing {
                    out.extend_from_slice(rest);
                } else {
                    self.pending.extend_from_slice(rest);
                    self.pass_if_long(&mut out);
                }
                return out.freeze();
            };
            if self.passing {
                out.extend_from_slice(&rest[..end]);
                self.passing = false;
            } else {
                self.pending.extend_from_slice(&rest[..end]);
                let event = std::mem::take(&mut self.pending);
                self.event(&event, &mut out);
                self.pending = event;
                self.pending.clear();
            }
            rest = &rest[end..];
        }
        // Events whole in this frame, edited in place.
        while let Some(end) = event_end(rest, LineSoFar::Empty) {
            self.event(&rest[..end], &mut out);
            rest = &rest[end..];
        }
        self.line = LineSoFar::Empty.after(rest);
        self.pending.extend_from_slice(rest);
        self.pass_if_long(&mut out);
        out.freeze()
    }

    fn pass_if_long(&mut self, out: &mut BytesMut) {
        if self.pending.len() > MAX_LINE {
            out.extend_from_slice(&self.pending);
            self.pending.clear();
            self.passing = true;
        }
    }

    /// The end of the stream: an event it cut short (no blank line) is edited all the same.
    pub fn finish(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        if !self.pending.is_empty() {
            let event = std::mem::take(&mut self.pending);
            self.event(&event, &mut out);
        }
        out.freeze()
    }
}

/// In a raw SSE event, the index of the first byte at or after `i` that is not whitespace
/// between two JSON tokens of its data: JSON whitespace, or a line break into the next
/// `data:` line (SSE joins data lines with "\n").
fn raw_skip_ws(raw: &[u8], mut i: usize) -> usize {
    loop {
        match raw.get(i) {
            Some(b' ' | b'\t' | b'\r') => i += 1,
            Some(b'\n') if raw[i + 1..].starts_with(b"data:") => i += 6,
            _ => return i,
        }
    }
}

/// The same backwards: the index just past the token that precedes `i`.
fn raw_skip_ws_back(raw: &[u8], mut i: usize) -> usize {
    loop {
        match i.checked_sub(1).map(|j| raw[j]) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => i -= 1,
            Some(b':') if raw[..i].ends_with(b"\ndata:") => i -= 5,
            _ => return i,
        }
    }
}

/// Where the `"usage":null` member that `include_usage` added sits in a raw event, with the
/// comma that separates it: `(start, len)`. Not necessarily last: OpenAI now puts
/// `"obfuscation":"..."` after it, and other fields (`service_tier`, `system_fingerprint`)
/// may move. A `"` inside a JSON string is always escaped, so a `"usage"` that follows `,` or
/// `{` and whose `null` is followed by `,` or `}` (whitespace allowed between them all) is a
/// member, never text; the last such member is the top-level one (it follows `choices`).
///
/// - after another member: from the comma before it to the end of `null` (`,"usage":null`,
///   `, "usage": null`, or across lines in pretty-printed data);
/// - first member: from the key to the next member (`"usage":null,`, `"usage": null, `);
/// - only member: the member alone, leaving `{}`.
fn null_usage_field(raw: &[u8]) -> Option<(usize, usize)> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = raw.len();
    while let Some(p) = memchr::memmem::rfind(&raw[..end], KEY) {
        end = p;
        let colon = raw_skip_ws(raw, p + KEY.len());
        if raw.get(colon) != Some(&b':') {
            continue;
        }
        let v = raw_skip_ws(raw, colon + 1);
        if !raw[v..].starts_with(b"null") {
            continue;
        }
        let null_end = v + 4;
        let next = raw_skip_ws(raw, null_end);
        let before = raw_skip_ws_back(raw, p);
        match (before.checked_sub(1).map(|i| raw[i]), raw.get(next)) {
            (Some(b','), Some(b',' | b'}')) => return Some((before - 1, null_end + 1 - before)),
            (Some(b'{'), Some(b',')) => return Some((p, raw_skip_ws(raw, next + 1) - p)),
            (Some(b'{'), Some(b'}')) => return Some((p, null_end - p)),
            _ => {}
        }
    }
    None
}

/// The usage-only chunk: an empty `choices` array and a `usage` object.
fn is_usage_chunk(data: &[u8]) -> bool {
    let empty_choices = member_values(data, b"\"choices\"")
        .any(|v| data.get(v) == Some(&b'[') && data.get(skip_ws(data, v + 1)) == Some(&b']'));
    empty_choices && member_values(data, b"\"usage\"").any(|v| data.get(v) == Some(&b'{'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_only_for_streams_without_options() {
        let b = br#"{"model":"gpt-4o","messages":[],"stream":true}"#;
        let e = add_include_usage(b).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "gpt-4o");
        assert!(add_include_usage(br#"{"model":"m","messages":[]}"#).is_none());
        // The app asked itself: nothing to add, nothing to strip.
        assert!(
            add_include_usage(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        assert!(add_include_usage(b"not json").is_none());
        // serde reads a struct from an array too; an array is not edited.
        assert!(add_include_usage(b"[true]").is_none());
        let spaced = b"  \n{ \"stream\": true }";
        let e = add_include_usage(spaced).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&e).is_ok());
    }

    #[test]
    fn stream_options_without_include_usage_get_it_with_a_minimal_edit() {
        let cases: [(&[u8], &[u8]); 5] = [
            (
                br#"{"stream":true,"stream_options":{"include_obfuscation":false},"model":"m"}"#,
                br#"{"stream":true,"stream_options":{"include_usage":true,"include_obfuscation":false},"model":"m"}"#,
            ),
            (
                br#"{"stream":true,"stream_options":{ },"model":"m"}"#,
                br#"{"stream":true,"stream_options":{"include_usage":true },"model":"m"}"#,
            ),
            (
                br#"{"stream":true,"stream_options":{"include_usage":false}}"#,
                br#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                br#"{"messages":[{"content":"\"stream_options\": {}"}],"stream_options": {"include_usage" : false, "x":1},"stream":true}"#,
                br#"{"messages":[{"content":"\"stream_options\": {}"}],"stream_options": {"include_usage" : true, "x":1},"stream":true}"#,
            ),
            (
                "{\"stream\":true,\"messages\":[{\"content\":\"h\\u00e9 ☃\"}]}".as_bytes(),
                "{\"stream_options\":{\"include_usage\":true},\"stream\":true,\"messages\":[{\"content\":\"h\\u00e9 ☃\"}]}".as_bytes(),
            ),
        ];
        for (input, want) in cases {
            let got = add_include_usage(input)
                .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(input)));
            assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        }
        // Explicit null or a non-object: left alone rather than guessed at.
        assert!(add_include_usage(br#"{"stream":true,"stream_options":null}"#).is_none());
        assert!(add_include_usage(br#"{"stream":true,"stream_options":[]}"#).is_none());
        assert!(
            add_include_usage(br#"{"stream":true,"stream_options":{"include_usage":null}}"#)
                .is_none()
        );
    }

    #[test]
    fn speech_characters_count_unicode_scalars_of_input() {
        assert_eq!(
            speech_characters(
                r#"{"model":"tts-1","input":"h\u00e9llo ☃","voice":"alloy"}"#.as_bytes()
            ),
            7
        );
        assert_eq!(speech_characters(b"{}"), 0);
        assert_eq!(speech_characters(b"not json"), 0);
    }

    #[test]
    fn multipart_model_field() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\n\r\n\xff\xfb";
        assert_eq!(
            multipart_field(body, b"model").as_deref(),
            Some("whisper-1")
        );
        assert_eq!(multipart_field(body, b"language"), None);
    }

    fn strip_all(input: &[u8], step: usize) -> Vec<u8> {
        let mut s = StripUsage::new();
        let mut out = Vec::new();
        for c in input.chunks(step) {
            out.extend_from_slice(&s.transform(c));
        }
        out.extend_from_slice(&s.finish());
        out
    }

    #[test]
    fn strips_exactly_what_include_usage_added() {
        let with = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\n",
            "data: [DONE]\n\n"
        );
        let without = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n"
        );
        for step in [1, 2, 5, 17, 4096] {
            assert_eq!(
                String::from_utf8(strip_all(with.as_bytes(), step)).unwrap(),
                without,
                "step {step}"
            );
        }
    }

    /// Recorded shape of a 2025 OpenAI stream: `service_tier`, `system_fingerprint`, and an
    /// `obfuscation` field after `"usage":null`. With include_usage and without it, from the
    /// same request; the obfuscation padding is the same here so the two can be compared.
    #[test]
    fn strips_usage_before_obfuscation_byte_for_byte() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let with = std::fs::read(dir.join("openai_chat_stream_obfuscation.sse")).unwrap();
        let without =
            std::fs::read(dir.join("openai_chat_stream_obfuscation_no_usage.sse")).unwrap();
        assert!(
            memchr::memmem::find(&with, b"\"usage\":null,\"obfuscation\"").is_some(),
            "the fixture has the shape that broke the suffix match"
        );
        for step in [1, 3, 7, 64, 100_000] {
            assert_eq!(
                String::from_utf8(strip_all(&with, step)).unwrap(),
                String::from_utf8(without.clone()).unwrap(),
                "step {step}"
            );
        }
    }

    #[test]
    fn null_usage_member_anywhere_but_inside_strings() {
        let f = |s: &str| {
            null_usage_field(s.as_bytes()).map(|(a, n)| {
                let b = s.as_bytes();
                String::from_utf8([&b[..a], &b[a + n..]].concat()).unwrap()
            })
        };
        assert_eq!(
            f(r#"{"a":1,"usage":null,"obfuscation":"x"}"#).as_deref(),
            Some(r#"{"a":1,"obfuscation":"x"}"#)
        );
        assert_eq!(f(r#"{"usage":null,"a":1}"#).as_deref(), Some(r#"{"a":1}"#));
        // Text that mentions it is escaped, so it is never a member.
        assert_eq!(f(r#"{"c":"\",\"usage\":null}"}"#), None);
        assert_eq!(f(r#"{"a":1,"usage":nullx}"#), None);
        // Spaced, as servers written in Python send it: the member goes with its comma and
        // the whitespace between them, and nothing else.
        for (with, without) in [
            (
                r#"data: {"a": 1, "usage": null, "obfuscation": "x"}"#,
                r#"data: {"a": 1, "obfuscation": "x"}"#,
            ),
            (r#"data: {"a": 1, "usage": null}"#, r#"data: {"a": 1}"#),
            (
                "data: {\"a\":\t1 ,\t\"usage\" :\tnull\t}",
                "data: {\"a\":\t1 \t}",
            ),
            (r#"data: {"usage": null, "a": 1}"#, r#"data: {"a": 1}"#),
            (r#"data: { "usage" : null }"#, r#"data: {  }"#),
            // Pretty-printed over several `data:` lines (SSE joins them with "\n").
            (
                "data: {\ndata:   \"a\": [],\ndata:   \"usage\": null,\ndata:   \"b\": 2\ndata: }\n\n",
                "data: {\ndata:   \"a\": [],\ndata:   \"b\": 2\ndata: }\n\n",
            ),
            (
                "data: {\r\ndata:   \"a\": [],\r\ndata:   \"usage\": null\r\ndata: }\r\n\r\n",
                "data: {\r\ndata:   \"a\": []\r\ndata: }\r\n\r\n",
            ),
            (
                "data: {\ndata:   \"usage\": null,\ndata:   \"a\": 1\ndata: }\n\n",
                "data: {\ndata:   \"a\": 1\ndata: }\n\n",
            ),
        ] {
            assert_eq!(f(with).as_deref(), Some(without), "{with}");
        }
        assert_eq!(f(r#"{"a": "usage", "b": null}"#), None);
        assert_eq!(f(r#"{"a": ["usage", null]}"#), None);
        assert_eq!(f(r#"{"a": 1, "usage": {"x": null}}"#), None);
    }

    #[test]
    fn usage_only_chunk_in_any_layout() {
        for chunk in [
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1}}"#,
            r#"{"id": "c", "choices": [], "usage": {"prompt_tokens": 1}}"#,
            "{\n  \"usage\": {\n    \"prompt_tokens\": 1\n  },\n  \"choices\": [\n  ]\n}",
            "{\"choices\" :\t[ ] , \"usage\"\r\n: {}}",
        ] {
            assert!(is_usage_chunk(chunk.as_bytes()), "{chunk}");
        }
        for chunk in [
            r#"{"id": "c", "choices": [{"index": 0}], "usage": null}"#,
            r#"{"id": "c", "choices": [], "usage": null, "prompt_filter_results": []}"#,
            r#"{"id": "c", "choices": [{"delta": {"content": "\"choices\": [], \"usage\": {"}}]}"#,
        ] {
            assert!(!is_usage_chunk(chunk.as_bytes()), "{chunk}");
        }
    }

    /// An event on several `data:` lines, split anywhere: the usage-only one goes whole, the
    /// others lose their `"usage": null` member and stay valid JSON.
    #[test]
    fn strips_multi_line_events_in_any_split() {
        let with = concat!(
            ": keep-alive comment\n\n",
            "data: {\n",
            "data:   \"id\": \"c\",\n",
            "data:   \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hi\"}}],\n",
            "data:   \"usage\": null\n",
            "data: }\n\n",
            "data: {\n",
            "data:   \"id\": \"c\",\n",
            "data:   \"choices\": [],\n",
            "data:   \"usage\": {\"prompt_tokens\": 1, \"completion_tokens\": 2}\n",
            "data: }\n\n",
            "data: [DONE]\n\n"
        );
        let without = concat!(
            ": keep-alive comment\n\n",
            "data: {\n",
            "data:   \"id\": \"c\",\n",
            "data:   \"choices\": [{\"index\": 0, \"delta\": {\"content\": \"Hi\"}}]\n",
            "data: }\n\n",
            "data: [DONE]\n\n"
        );
        for step in [1, 2, 3, 5, 17, 64, 4096] {
            assert_eq!(
                String::from_utf8(strip_all(with.as_bytes(), step)).unwrap(),
                without,
                "step {step}"
            );
        }
        // A stream cut before the usage chunk's blank line: still dropped.
        let cut = &with[..with.find("data: [DONE]").unwrap() - 1];
        assert!(
            !String::from_utf8(strip_all(cut.as_bytes(), 7))
                .unwrap()
                .contains("usage")
        );
    }

    #[test]
    fn an_event_too_long_to_edit_passes_untouched_and_the_next_is_edited() {
        let big = "x".repeat(MAX_LINE + 10);
        let with = format!(
            "data: {{\"choices\": [{{\"delta\": {{\"content\": \"{big}\"}}}}], \"usage\": null}}\n\ndata: {{\"choices\": [{{}}], \"usage\": null}}\n\n"
        );
        let want = format!(
            "data: {{\"choices\": [{{\"delta\": {{\"content\": \"{big}\"}}}}], \"usage\": null}}\n\ndata: {{\"choices\": [{{}}]}}\n\n"
        );
        for step in [1000, 100_000, 1 << 20] {
            assert!(
                strip_all(with.as_bytes(), step) == want.as_bytes(),
                "step {step}"
            );
        }
    }

    /// Bodies the scan reads, and the serde path as the reference: the same edit for every
    /// JSON body among their one-byte changes, insertions and deletions.
    #[test]
    fn the_scan_edits_as_the_parse_does() {
        let seeds: [&[u8]; 8] = [
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
            br#"{"stream":true,"stream_options":{"include_obfuscation":false},"model":"m"}"#,
            br#"{ "stream" : true , "stream_options" : { "include_usage" : false } }"#,
            br#"{"stream":true,"stream_options":null,"n":1}"#,
            br#"{"stream":true,"tools":[{"stream_options":{}}],"x":"\"stream_options\""}"#,
            "{\n \"stream\": false,\n \"stream_options\": {},\n \"m\": \"\u{e9}\"\n}".as_bytes(),
            br#"{"stream":null,"stream_options":{}}"#,
            br#"{"stream":1}"#,
        ];
        let mut compared = 0;
        for seed in seeds {
            assert!(crate::route::head::top(seed).is_some());
            crate::route::head::variants(seed, b"{}[]\":,\\ \ntrufalsenl_0", |b| {
                if serde_json::from_slice::<serde_json::Value>(b).is_err() {
                    return;
                }
                let want = parsed_include_usage(b);
                assert_eq!(add_include_usage(b), want, "{}", String::from_utf8_lossy(b));
                if let Some(e) = want {
                    let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
                    assert_eq!(v["stream_options"]["include_usage"], true);
                }
                compared += 1;
            });
        }
        assert!(compared > 1_000, "{compared}");
    }

    /// Only the top level's `stream_options` counts: a tool schema or a message that names
    /// it no longer keeps a stream from being metered.
    #[test]
    fn a_nested_stream_options_is_not_the_request_s() {
        let b = br#"{"tools":[{"parameters":{"stream_options":{"type":"object"}}}],"stream":true}"#;
        let e = add_include_usage(b).unwrap();
        assert_eq!(
            &e[..41],
            &br#"{"stream_options":{"include_usage":true},"#[..]
        );
        assert_eq!(&e[41..], &b[1..]);
        assert_eq!(parsed_include_usage(b).as_deref(), Some(&e[..]));
    }

    #[test]
    fn include_usage_added_to_spaced_and_pretty_requests() {
        for body in [
            "{\"model\": \"m\", \"stream\": true}",
            "{\n  \"model\": \"m\",\n  \"stream\": true,\n  \"stream_options\": {\n    \"include_obfuscation\": false\n  }\n}",
            "{\"stream\": true, \"stream_options\": {\"include_usage\": false}}",
        ] {
            let e = add_include_usage(body.as_bytes()).unwrap_or_else(|| panic!("{body}"));
            let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{body}");
        }
    }
}
