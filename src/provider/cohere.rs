//! Cohere's v2 API (`/v2/chat`, `/v2/embed`, `/v2/rerank`): a bearer key, `{"message":...}`
//! error bodies, and usage as `billed_units`, what the tenant is charged for (the `tokens`
//! beside it also count the system prompt Cohere adds and does not bill).

use std::sync::LazyLock;

use http::StatusCode;
use memchr::memmem;
use serde::Deserialize;

use super::{Authenticator, CompatEndpoint, ErrorShape, Kind, VerifyCall, openai};
use crate::usage::bytes::usage_in_tail;
use crate::usage::{Dialect, DialectRef, StreamState, Usage, UsageObject};

/// The `cohere` kind.
#[derive(Debug)]
pub struct Cohere;

impl Kind for Cohere {
    fn name(&self) -> &'static str {
        "cohere"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &openai::BEARER
    }

    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        Some(VerifyCall {
            path: "/v1/models",
            query: None,
        })
    }

    /// Cohere's Compatibility API speaks the OpenAI wire under `/compatibility/v1`.
    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        Some(match ep {
            CompatEndpoint::Chat => "/compatibility/v1/chat/completions",
            CompatEndpoint::Embeddings => "/compatibility/v1/embeddings",
        })
    }

    fn usage(&self) -> DialectRef {
        Some(&DIALECT)
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }
}

const ERRORS: ErrorShape = ErrorShape::new(error_body, None);

/// Cohere's error body is a bare message; byokd's stable code rides beside it.
fn error_body(_status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "message": message, "code": code })
}

static DIALECT: V2 = V2;

#[derive(Debug)]
struct V2;

/// `billed_units` of a chat answer (`usage`), a stream's `message-end` (`delta.usage`) or an
/// embed answer (`meta`); rerank bills `search_units`, not tokens.
#[derive(Debug, Default, Deserialize)]
struct Billed {
    input_tokens: Option<f64>,
    output_tokens: Option<f64>,
}

// Counts that may be floats: serde reads them.
impl UsageObject for Billed {}

/// Cohere reports units as JSON numbers that may carry a fraction (`5.0`).
fn apply(usage: &mut Usage, b: &Billed) {
    let n = |v: Option<f64>| {
        v.filter(|v| v.is_finite() && *v >= 0.0)
            .map_or(0, |v| v as u64)
    };
    usage.found = true;
    usage.input = n(b.input_tokens);
    usage.output = n(b.output_tokens);
    usage.clamp_tokens();
}

const BILLED_KEY: &[u8] = b"\"billed_units\"";

static KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(BILLED_KEY));

impl Dialect for V2 {
    fn usage_events(&self) -> &'static [&'static [u8]] {
        &[b"message-end"]
    }

    fn event(&self, s: &mut StreamState, data: &[u8]) {
        if KEY.find(data).is_some()
            && let Some(b) = usage_in_tail::<Billed>(data, BILLED_KEY)
        {
            apply(&mut s.usage, &b);
        }
    }

    fn long_event(&self, s: &mut StreamState, _head: &[u8], tail: &[u8]) {
        if let Some(b) = usage_in_tail::<Billed>(tail, BILLED_KEY) {
            apply(&mut s.usage, &b);
        }
    }

    /// The answer names no model: the meter takes it from the request.
    fn json(&self, u: &mut Usage, _head: &[u8], tail: &[u8]) {
        if let Some(b) = usage_in_tail::<Billed>(tail, BILLED_KEY) {
            apply(u, &b);
        }
    }
}
