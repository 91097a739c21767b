//! Google's Gemini API (generateContent): the key in `x-goog-api-key`, the model in the
//! path, `{"error":{code,message,status}}` bodies, and `usageMetadata` with running totals
//! in every stream chunk.

use std::sync::LazyLock;

use http::{HeaderName, StatusCode};
use memchr::memmem;
use serde::Deserialize;

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, Member, VerifyCall};
use crate::usage::bytes::{string_after, usage_value_at};
use crate::usage::model_and_usage;
use crate::usage::{Dialect, DialectRef, Field, StreamState, Usage, UsageObject};

/// The `gemini` kind.
#[derive(Debug)]
pub struct Gemini;

static AUTH: HeaderAuth = HeaderAuth::new(HeaderName::from_static("x-goog-api-key"), "");

impl Kind for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &AUTH
    }

    fn key_prefix(&self, _provider: &str) -> Option<&'static str> {
        Some("AIza")
    }

    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        Some(VerifyCall {
            path: "/v1beta/models",
            query: None,
        })
    }

    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        Some(match ep {
            CompatEndpoint::Chat => "/v1beta/openai/chat/completions",
            CompatEndpoint::Embeddings => "/v1beta/openai/embeddings",
        })
    }

    fn usage(&self) -> DialectRef {
        Some(&DIALECT)
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }

    fn max_output_tokens(&self, member: &Member<'_>) -> Option<u64> {
        member("generationConfig")?.get("maxOutputTokens")?.as_u64()
    }

    /// `/v1beta/models/gemini-2.0-flash:generateContent`: the body has no `model`.
    fn path_model(&self, path: &str) -> Option<String> {
        let rest = &path[path.find("/models/")? + "/models/".len()..];
        let m = rest.split([':', '/']).next()?;
        (!m.is_empty()).then(|| m.to_string())
    }
}

const ERRORS: ErrorShape = ErrorShape::new(error_body, None);

/// Google's API error: the HTTP code, and the canonical status name.
fn error_body(status: StatusCode, _code: &str, message: &str) -> serde_json::Value {
    let name = match status.as_u16() {
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "INVALID_ARGUMENT",
    };
    serde_json::json!({
        "error": { "code": status.as_u16(), "message": message, "status": name }
    })
}

static DIALECT: GenerateContent = GenerateContent;

#[derive(Debug)]
struct GenerateContent;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawUsage {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

const LEAN: [Field; 4] = [
    Field::top(b"promptTokenCount"),
    Field::top(b"candidatesTokenCount"),
    Field::top(b"thoughtsTokenCount"),
    Field::top(b"cachedContentTokenCount"),
];

impl UsageObject for RawUsage {
    fn lean(obj: &[u8]) -> Option<Self> {
        let [prompt, candidates, thoughts, cached] = crate::usage::lean::counts(obj, &LEAN)?;
        Some(Self {
            prompt_token_count: prompt,
            candidates_token_count: candidates,
            thoughts_token_count: thoughts,
            cached_content_token_count: cached,
        })
    }
}

/// Stream chunks carry running totals: the last one replaces the earlier ones.
fn apply(usage: &mut Usage, u: &RawUsage) {
    usage.found = true;
    let cached = u.cached_content_token_count.unwrap_or(0);
    usage.input = u.prompt_token_count.unwrap_or(0).saturating_sub(cached);
    usage.cached_input = cached;
    usage.output = u.candidates_token_count.unwrap_or(0);
    usage.reasoning = u.thoughts_token_count.unwrap_or(0);
    usage.clamp_tokens();
}

const USAGE_KEY: &[u8] = b"\"usageMetadata\"";
const MODEL_KEY: &[u8] = b"\"modelVersion\"";

static KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(USAGE_KEY));

impl Dialect for GenerateContent {
    /// Only the last chunk's usage counts: each chunk's is kept (from its key on, a small
    /// object) and the last is parsed once, at the end.
    fn event(&self, s: &mut StreamState, data: &[u8]) {
        if let Some(p) = KEY.find(data) {
            if s.usage.model.is_none() {
                s.usage.model = string_after(data, MODEL_KEY);
            }
            s.keep_last(&data[p..]);
        }
    }

    fn long_event(&self, s: &mut StreamState, _head: &[u8], tail: &[u8]) {
        if let Some(p) = memmem::rfind(tail, USAGE_KEY) {
            s.keep_last(&tail[p..]);
        }
    }

    fn end(&self, s: &mut StreamState) {
        let last = s.take_last();
        if last.is_empty() {
            return;
        }
        if let Some(at) = usage_value_at(&last, USAGE_KEY)
            && let Some(Ok(u)) = serde_json::Deserializer::from_slice(&last[at..])
                .into_iter::<RawUsage>()
                .next()
        {
            apply(&mut s.usage, &u);
        }
        if let Some(m) = string_after(&last, MODEL_KEY) {
            s.usage.model = Some(m);
        }
    }

    /// `model` leads other bodies; here `modelVersion` comes at the end.
    fn json(&self, u: &mut Usage, head: &[u8], tail: &[u8]) {
        let (model, raw) = model_and_usage::<RawUsage>(head, tail, MODEL_KEY, USAGE_KEY);
        u.model = model;
        if let Some(raw) = raw {
            apply(u, &raw);
        }
    }
}
