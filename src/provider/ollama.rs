//! Ollama: its OpenAI-compatible API under `/v1` and its native API (`/api/chat`,
//! `/api/generate`, `/api/embed`, newline-delimited JSON streams). A local server needs no
//! key: requests go without auth unless the tenant registered one.

use super::{Authenticator, ErrorShape, Kind, openai};
use crate::usage::bytes::{member_values, number_after, string_after};
use crate::usage::{DialectRef, Usage};

/// The `ollama` kind.
#[derive(Debug)]
pub struct Ollama;

impl Kind for Ollama {
    fn name(&self) -> &'static str {
        "ollama"
    }

    /// Its `/v1` API is the OpenAI wire: failover may move between the two.
    fn wire(&self) -> &'static str {
        "openai"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &openai::BEARER
    }

    fn requires_key(&self) -> bool {
        false
    }

    /// The OpenAI wire's dialect reads the native API's objects too (they arrive as NDJSON
    /// or as a JSON body without `usage`).
    fn usage(&self) -> DialectRef {
        Some(&openai::WIRE)
    }

    fn errors(&self) -> ErrorShape {
        openai::ERRORS
    }

    /// Honoured since v0.5.2 (December 2024); older servers ignore the field, so asking
    /// costs nothing there.
    fn stream_usage(&self) -> bool {
        true
    }
}

/// Whether a native object is the final one (`"done": true`), which carries the counts.
fn is_done(data: &[u8]) -> bool {
    member_values(data, b"\"done\"").any(|v| data[v..].starts_with(b"true"))
}

/// The native API reports counts on the final object, outside any usage object.
fn counts(usage: &mut Usage, hay: &[u8]) {
    let prompt = number_after(hay, b"\"prompt_eval_count\"");
    let eval = number_after(hay, b"\"eval_count\"");
    if prompt.is_some() || eval.is_some() {
        usage.found = true;
        usage.input = prompt.unwrap_or(0);
        usage.output = eval.unwrap_or(0);
        usage.clamp_tokens();
    }
}

/// One line of a native stream.
pub(super) fn native_line(usage: &mut Usage, line: &[u8]) {
    if is_done(line) {
        if let Some(m) = string_after(line, b"\"model\"") {
            usage.model = Some(m);
        }
        counts(usage, line);
    }
}

/// A native stream line too long to hold: `model` leads it, the counts close it.
pub(super) fn native_long_line(usage: &mut Usage, head: &[u8], tail: &[u8]) {
    if is_done(tail) {
        if let Some(m) = string_after(head, b"\"model\"") {
            usage.model = Some(m);
        }
        counts(usage, tail);
    }
}

/// A whole native JSON body (no `usage` object).
pub(super) fn native_body(usage: &mut Usage, tail: &[u8]) {
    counts(usage, tail);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_member_whatever_the_spacing() {
        assert!(is_done(b"{\"done\"\t:\ttrue}") && !is_done(b"{\"done\": false}"));
        assert!(!is_done(b"{\"x\": \"done\", \"y\": true}"));
    }
}
