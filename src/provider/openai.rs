//! OpenAI, and the wire format every OpenAI-compatible API speaks: a bearer key, chat
//! completions / Responses API / embeddings / images / audio, `{"error":{...}}` bodies, and
//! usage in a `usage` member (streams report it when asked with `stream_options`).

use std::sync::LazyLock;

use http::StatusCode;
use memchr::memmem;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, VerifyCall};
use crate::usage::bytes::{member_is, usage_in_tail, usage_value_at, value_after_key};
use crate::usage::{
    Dialect, DialectRef, Field, StreamState, Usage, UsageObject, model_and_usage, seconds_to_ms,
};

/// The `openai` kind.
#[derive(Debug)]
pub struct OpenAi;

pub(super) static BEARER: HeaderAuth = HeaderAuth::new(http::header::AUTHORIZATION, "Bearer ");

impl Kind for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &BEARER
    }

    fn key_prefix(&self, provider: &str) -> Option<&'static str> {
        // The hosts whose keys have a documented shape; the other compatibles issue anything.
        match provider {
            "openai" => Some("sk-"),
            "xai" => Some("xai-"),
            "perplexity" => Some("pplx-"),
            "cerebras" => Some("csk-"),
            _ => None,
        }
    }

    fn verify_call(&self, provider: &str) -> Option<VerifyCall> {
        // Perplexity's API has no model list or other cheap authenticated GET.
        (provider != "perplexity").then_some(VerifyCall {
            path: "/v1/models",
            query: None,
        })
    }

    fn openai_compat(&self, provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        match (provider, ep) {
            // Perplexity serves chat at the root and has no embeddings.
            ("perplexity", CompatEndpoint::Chat) => Some("/chat/completions"),
            ("perplexity", CompatEndpoint::Embeddings) => None,
            (_, CompatEndpoint::Chat) => Some("/v1/chat/completions"),
            (_, CompatEndpoint::Embeddings) => Some("/v1/embeddings"),
        }
    }

    fn usage(&self) -> DialectRef {
        Some(&WIRE)
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }

    fn stream_usage(&self) -> bool {
        true
    }
}

/// `{"error":{"message","type","param","code"}}`, as the OpenAI SDKs parse it.
pub(super) const ERRORS: ErrorShape = ErrorShape::new(error_body, None);

fn error_body(status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    })
}

/// The OpenAI wire's usage dialect (also read from compatibles, Azure and Ollama).
pub(super) static WIRE: Wire = Wire;

#[derive(Debug)]
pub(super) struct Wire;

/// A `usage` object: chat completions name the totals prompt/completion, the Responses API
/// input/output; both include the cached and reasoning parts, except that some compatible
/// hosts (xAI) leave reasoning out of `completion_tokens`: their `total_tokens` says so.
#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<PromptDetails>,
    completion_tokens_details: Option<CompletionDetails>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<PromptDetails>,
    output_tokens_details: Option<CompletionDetails>,
    total_tokens: Option<u64>,
    /// Transcription billed by duration: `{"type":"duration","seconds":9}`.
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

/// Every field of [`RawUsage`], for the lean reading of the usual object.
const LEAN: [Field; 10] = [
    Field::top(b"prompt_tokens"),
    Field::top(b"completion_tokens"),
    Field::top(b"input_tokens"),
    Field::top(b"output_tokens"),
    Field::top(b"total_tokens"),
    Field::top(b"seconds"),
    Field::nested(b"prompt_tokens_details", b"cached_tokens"),
    Field::nested(b"input_tokens_details", b"cached_tokens"),
    Field::nested(b"completion_tokens_details", b"reasoning_tokens"),
    Field::nested(b"output_tokens_details", b"reasoning_tokens"),
];

impl UsageObject for RawUsage {
    fn lean(obj: &[u8]) -> Option<Self> {
        let [pt, ct, it, ot, total, seconds, ptd, itd, ctd, otd] =
            crate::usage::lean::counts(obj, &LEAN)?;
        let prompt = |c: Option<u64>| {
            c.map(|v| PromptDetails {
                cached_tokens: Some(v),
            })
        };
        let completion = |r: Option<u64>| {
            r.map(|v| CompletionDetails {
                reasoning_tokens: Some(v),
            })
        };
        Some(Self {
            prompt_tokens: pt,
            completion_tokens: ct,
            prompt_tokens_details: prompt(ptd),
            completion_tokens_details: completion(ctd),
            input_tokens: it,
            output_tokens: ot,
            input_tokens_details: prompt(itd),
            output_tokens_details: completion(otd),
            total_tokens: total,
            // An integer number of seconds, as serde turns one into an `f64`.
            seconds: seconds.map(|s| s as f64),
        })
    }
}

/// The object is complete: it replaces what was counted.
fn apply(usage: &mut Usage, u: &RawUsage) {
    usage.found = true;
    let (prompt, completion, pd, cd) = if u.prompt_tokens.is_none() && u.input_tokens.is_some() {
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
        usage.audio_ms = seconds_to_ms(sec);
    }
    let cached = pd.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
    let reasoning = cd.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0);
    let prompt = prompt.unwrap_or(0);
    let completion = completion.unwrap_or(0);
    usage.input = prompt.saturating_sub(cached);
    usage.cached_input = cached;
    // OpenAI counts reasoning inside `completion_tokens` (total = prompt + completion); xAI
    // reports it beside them (total = prompt + completion + reasoning).
    let beside = reasoning > 0
        && u.total_tokens
            == prompt
                .checked_add(completion)
                .and_then(|t| t.checked_add(reasoning));
    usage.output = if beside {
        completion
    } else {
        completion.saturating_sub(reasoning)
    };
    usage.reasoning = reasoning;
    usage.clamp_tokens();
}

/// Named events that carry usage: the Responses API's final events, and completed images.
const USAGE_EVENTS: &[&[u8]] = &[
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

static USAGE_KEY_REV: LazyLock<memmem::FinderRev<'static>> =
    LazyLock::new(|| memmem::FinderRev::new(b"\"usage\""));

/// Whether a chat chunk carries a non-null `usage`. With include_usage every content chunk
/// has `"usage":null` near its end (before `obfuscation` in 2025-shaped streams), so the
/// search runs from the end: one short reverse scan per chunk. The last `"usage"` is the
/// top-level member (it follows `choices`); if it is not a member at all (a string value),
/// fall back to a forward search.
fn chunk_has_usage(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    // Compact streams without obfuscation (compatibles, older servers): the member closes
    // the chunk.
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

impl Dialect for Wire {
    fn usage_events(&self) -> &'static [&'static [u8]] {
        USAGE_EVENTS
    }

    /// A chat chunk (top-level `usage`), a Responses API event (usage in `response` when its
    /// `type` is final), an image event. Parsed only when it is named as carrying usage, when
    /// its last `usage` member is not null, or while `model` is unknown; the JSON parser
    /// makes layout and key order irrelevant.
    fn event(&self, s: &mut StreamState, data: &[u8]) {
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
        if s.ndjson {
            super::ollama::native_line(&mut s.usage, data);
            return;
        }
        if s.images && is_image_done(data) {
            s.image();
        }
        let want_model = s.want_model();
        if !(want_model || s.named_usage || chunk_has_usage(data)) {
            return;
        }
        let Ok(e) = serde_json::from_slice::<Event>(data) else {
            return;
        };
        let usage = &mut s.usage;
        if let Some(r) = e
            .response
            .and_then(|r| serde_json::from_str::<Resp>(r.get()).ok())
        {
            let model = r.model.filter(|m| !m.is_empty());
            if e.kind.is_some_and(|k| RESPONSES_FINAL.contains(&k.get())) {
                if model.is_some() {
                    usage.model = model;
                }
                if let Some(u) = r.usage {
                    apply(usage, &u);
                }
            } else if usage.model.is_none() {
                usage.model = model;
            }
        }
        // Some first chunks (content-filter results) have `"model":""`.
        if usage.model.is_none() {
            usage.model = e.model.filter(|m| !m.is_empty());
        }
        if let Some(u) = e.usage {
            apply(usage, &u);
        }
    }

    fn long_event(&self, s: &mut StreamState, head: &[u8], tail: &[u8]) {
        if s.ndjson {
            super::ollama::native_long_line(&mut s.usage, head, tail);
            return;
        }
        // Images arrive whole in one event, base64: nearly always over-long.
        if s.images && (is_image_done(head) || is_image_done(tail)) {
            s.image();
        }
        // Responses API: `response.usage` closes the `response` object, so it is in the tail
        // however long `output` was; `model` precedes `output`.
        if let Some(u) = usage_in_tail::<RawUsage>(tail, b"\"usage\"") {
            if s.usage.model.is_none() {
                s.usage.model = crate::usage::bytes::string_after(head, b"\"model\"");
            }
            apply(&mut s.usage, &u);
        }
    }

    fn json(&self, u: &mut Usage, head: &[u8], tail: &[u8]) {
        let (model, raw) = model_and_usage::<RawUsage>(head, tail, b"\"model\"", b"\"usage\"");
        u.model = model;
        if let Some(raw) = raw {
            apply(u, &raw);
        } else {
            super::ollama::native_body(u, tail);
        }
    }
}
