//! Streaming usage without the client's help (OpenAI wire format).
//!
//! An OpenAI-style stream reports usage only when the request sets
//! `stream_options.include_usage`. When the app did not, byokd adds it (the rewrite half: one
//! insertion right after the body's opening `{`), then hides what that changes in the response
//! (the meter half): the `"usage":null` field of every chunk and the extra usage-only chunk.
//! The app receives byte for byte the stream it asked for; the meter saw the usage.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;

use crate::usage::MAX_LINE;

/// Largest request body byokd reads to decide; larger ones stream through unedited.
pub const MAX_INSPECTED_BODY: usize = 1024 * 1024;

const INSERT: &[u8] = br#""stream_options":{"include_usage":true},"#;

/// The request body sent upstream: bytes already read (and possibly edited), then the rest of
/// the app's body, still streaming. The size limit applies to the whole.
pub struct RequestBody {
    prefix: Option<Bytes>,
    rest: Option<http_body_util::Limited<Incoming>>,
}

impl RequestBody {
    pub fn streaming(rest: http_body_util::Limited<Incoming>) -> Self {
        Self {
            prefix: None,
            rest: Some(rest),
        }
    }

    /// No body (byokd's own calls, such as the key check's list-models).
    pub fn empty() -> Self {
        Self {
            prefix: None,
            rest: None,
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
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
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
struct StreamFlags {
    stream: Option<bool>,
    stream_options: Option<serde_json::Value>,
}

/// The edited body when `body` is a streaming request without usage opt-in, else `None`.
pub fn add_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let flags: StreamFlags = serde_json::from_slice(body).ok()?;
    // An app that set stream_options chose them; byokd leaves its choice alone.
    if flags.stream != Some(true) || flags.stream_options.is_some() {
        return None;
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() + INSERT.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(INSERT);
    out.extend_from_slice(&body[open + 1..]);
    Some(out)
}

/// Reads up to [`MAX_INSPECTED_BODY`] of `body`; if it is a streaming chat request without
/// usage opt-in, returns the edited body and `true`. Otherwise the bytes read are replayed
/// unchanged ahead of the rest.
pub async fn inspect(
    mut body: http_body_util::Limited<Incoming>,
) -> Result<(RequestBody, bool), Box<dyn std::error::Error + Send + Sync>> {
    let mut buf = BytesMut::new();
    loop {
        if buf.len() > MAX_INSPECTED_BODY {
            return Ok((
                RequestBody {
                    prefix: Some(buf.freeze()),
                    rest: Some(body),
                },
                false,
            ));
        }
        match body.frame().await {
            None => break,
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    let (bytes, edited) = match add_include_usage(&buf) {
        Some(edited) => (Bytes::from(edited), true),
        None => (buf.freeze(), false),
    };
    Ok((
        RequestBody {
            prefix: Some(bytes),
            rest: None,
        },
        edited,
    ))
}

/// Removes what byokd's `include_usage` added from an OpenAI SSE stream: the trailing
/// `,"usage":null` of each chunk and the usage-only chunk (with its blank line). Inactive, it
/// passes frames through untouched.
pub struct StripUsage<B> {
    inner: B,
    active: bool,
    partial: BytesMut,
    /// The usage chunk was dropped; its terminating blank line goes too.
    dropping: bool,
    done: bool,
}

impl<B> StripUsage<B> {
    pub fn new(inner: B, active: bool) -> Self {
        Self {
            inner,
            active,
            partial: BytesMut::new(),
            dropping: false,
            done: false,
        }
    }

    /// Appends the transformed form of one complete line (with its `\n`) to `out`.
    fn line(&mut self, line: &[u8], out: &mut BytesMut) {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if self.dropping {
            self.dropping = false;
            if body.is_empty() {
                return;
            }
        }
        if let Some(data) = body.strip_prefix(b"data:") {
            if is_usage_chunk(data) {
                self.dropping = true;
                return;
            }
            if let Some(head) = body.strip_suffix(b",\"usage\":null}") {
                out.extend_from_slice(head);
                out.extend_from_slice(b"}");
                out.extend_from_slice(&line[body.len()..]);
                return;
            }
        }
        out.extend_from_slice(line);
    }

    fn transform(&mut self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(data.len() + self.partial.len());
        let mut rest = data;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            let (line, tail) = rest.split_at(i + 1);
            if self.partial.is_empty() {
                self.line(line, &mut out);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.line(&whole, &mut out);
            }
            rest = tail;
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE {
            // Not a chunk byokd must edit (those are small): pass it on as it is.
            out.extend_from_slice(&self.partial);
            self.partial.clear();
        }
        out.freeze()
    }
}

/// The usage-only chunk: no choices, a non-null usage.
fn is_usage_chunk(data: &[u8]) -> bool {
    memchr::memmem::find(data, b"\"choices\":[]").is_some()
        && memchr::memmem::find(data, b"\"usage\":{").is_some()
}

impl<B> Body for StripUsage<B>
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
        if !this.active {
            return Pin::new(&mut this.inner).poll_frame(cx);
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.transform(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) => {
                    this.done = true;
                    if !this.partial.is_empty() {
                        let rest = std::mem::take(&mut this.partial).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
                other => return other,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.partial.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.active {
            SizeHint::new()
        } else {
            self.inner.size_hint()
        }
    }
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
        assert!(
            add_include_usage(br#"{"stream":true,"stream_options":{"include_usage":false}}"#)
                .is_none()
        );
        assert!(add_include_usage(b"not json").is_none());
        let spaced = b"  \n{ \"stream\": true }";
        let e = add_include_usage(spaced).unwrap();
        assert!(serde_json::from_slice::<serde_json::Value>(&e).is_ok());
    }

    fn strip_all(input: &[u8], step: usize) -> Vec<u8> {
        let mut s = StripUsage::new(http_body_util::Empty::<Bytes>::new(), true);
        let mut out = Vec::new();
        for c in input.chunks(step) {
            out.extend_from_slice(&s.transform(c));
        }
        out.extend_from_slice(&s.partial);
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
}
