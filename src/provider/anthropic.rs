//! Anthropic's Messages API: the key in `x-api-key`, a required `anthropic-version`,
//! `{"type":"error","error":{...}}` bodies and named stream events, usage split into
//! uncached input, cache reads and cache writes.

use http::{HeaderName, HeaderValue, StatusCode};
use memchr::memmem;
use serde::Deserialize;

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, VerifyCall};
use crate::usage::model_and_usage;
use crate::usage::{Dialect, DialectRef, Field, StreamState, Usage, UsageObject};

/// The `anthropic` kind.
#[derive(Debug)]
pub struct Anthropic;

static AUTH: HeaderAuth = HeaderAuth::new(HeaderName::from_static("x-api-key"), "");

static HEADERS: [(HeaderName, HeaderValue); 1] = [(
    HeaderName::from_static("anthropic-version"),
    HeaderValue::from_static("2023-06-01"),
)];

impl Kind for Anthropic {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &AUTH
    }

    fn key_prefix(&self, _provider: &str) -> Option<&'static str> {
        Some("sk-ant-")
    }

    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        Some(VerifyCall {
            path: "/v1/models",
            query: None,
        })
    }

    /// Anthropic's OpenAI SDK compatibility layer covers chat only.
    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        (ep == CompatEndpoint::Chat).then_some("/v1/chat/completions")
    }

    fn default_headers(&self) -> &'static [(HeaderName, HeaderValue)] {
        &HEADERS
    }

    fn usage(&self) -> DialectRef {
        Some(&DIALECT)
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }
}

/// Its SDKs read the error event of a stream only when the event is named `error`.
const ERRORS: ErrorShape = ErrorShape::new(error_body, Some("error"));

fn error_body(status: StatusCode, _code: &str, message: &str) -> serde_json::Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    serde_json::json!({ "type": "error", "error": { "type": kind, "message": message } })
}

static DIALECT: Messages = Messages;

#[derive(Debug)]
struct Messages;

#[derive(Debug, Default, Deserialize)]
struct RawUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

const LEAN: [Field; 4] = [
    Field::top(b"input_tokens"),
    Field::top(b"output_tokens"),
    Field::top(b"cache_creation_input_tokens"),
    Field::top(b"cache_read_input_tokens"),
];

impl UsageObject for RawUsage {
    fn lean(obj: &[u8]) -> Option<Self> {
        let [input, output, write, read] = crate::usage::lean::counts(obj, &LEAN)?;
        Some(Self {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: write,
            cache_read_input_tokens: read,
        })
    }
}

/// `input_tokens` excludes cache reads and writes. In streams, later objects
/// (`message_delta`) carry cumulative counts: each field present replaces the earlier value
/// and nothing is ever summed.
fn apply(usage: &mut Usage, u: &RawUsage) {
    usage.found = true;
    if let Some(v) = u.input_tokens {
        usage.input = v;
    }
    if let Some(v) = u.cache_read_input_tokens {
        usage.cached_input = v;
    }
    if let Some(v) = u.cache_creation_input_tokens {
        usage.cache_write = v;
    }
    if let Some(v) = u.output_tokens {
        usage.output = v;
    }
    usage.clamp_tokens();
}

impl Dialect for Messages {
    fn usage_events(&self) -> &'static [&'static [u8]] {
        &[b"message_start", b"message_delta"]
    }

    fn event(&self, s: &mut StreamState, data: &[u8]) {
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
            if let Ok(start) = serde_json::from_slice::<Start>(data) {
                if start.message.model.is_some() {
                    s.usage.model = start.message.model;
                }
                if let Some(u) = start.message.usage {
                    apply(&mut s.usage, &u);
                }
            }
        } else if memmem::find(data, b"\"message_delta\"").is_some() {
            #[derive(Deserialize)]
            struct Delta {
                usage: Option<RawUsage>,
            }
            if let Ok(Delta { usage: Some(u) }) = serde_json::from_slice::<Delta>(data) {
                apply(&mut s.usage, &u);
            }
        }
    }

    fn json(&self, u: &mut Usage, head: &[u8], tail: &[u8]) {
        let (model, raw) = model_and_usage::<RawUsage>(head, tail, b"\"model\"", b"\"usage\"");
        u.model = model;
        if let Some(raw) = raw {
            apply(u, &raw);
        }
    }
}
