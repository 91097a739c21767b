//! ElevenLabs: the key in `xi-api-key`, `{"detail":{status,message}}` errors, and
//! text-to-speech billed by the characters of the request's `text` (the answer is audio, so
//! nothing in it is scanned; see `stream_usage::speech_characters`).

use http::{HeaderName, StatusCode};

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, VerifyCall};
use crate::usage::DialectRef;

/// The `elevenlabs` kind.
#[derive(Debug)]
pub struct ElevenLabs;

static AUTH: HeaderAuth = HeaderAuth::new(HeaderName::from_static("xi-api-key"), "");

impl Kind for ElevenLabs {
    fn name(&self) -> &'static str {
        "elevenlabs"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &AUTH
    }

    fn key_prefix(&self, _provider: &str) -> Option<&'static str> {
        Some("sk_")
    }

    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        Some(VerifyCall {
            path: "/v1/user",
            query: None,
        })
    }

    /// A voice API: nothing an OpenAI chat or embeddings request could be routed to.
    fn openai_compat(&self, _provider: &str, _ep: CompatEndpoint) -> Option<&'static str> {
        None
    }

    /// Speech is metered from the request; the audio answer carries no usage.
    fn usage(&self) -> DialectRef {
        None
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }
}

const ERRORS: ErrorShape = ErrorShape::new(error_body, None);

/// ElevenLabs' error body: a `detail` object with a status word and the message.
fn error_body(_status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "detail": { "status": code, "message": message } })
}
