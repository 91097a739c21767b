//! Azure AI Foundry's model inference API: the models Azure hosts that are not OpenAI's
//! (DeepSeek, Llama, Mistral, Phi...) behind a resource's own host, `/models/chat/completions`
//! and `/models/embeddings` with an `api-version` query, the key in `api-key`, usage in the
//! OpenAI dialect. Its own wire: its paths are not OpenAI's, so failover never moves a request
//! between it and an OpenAI host.

use http::HeaderName;

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, openai};
use crate::usage::DialectRef;

/// The `azure_ai` kind.
#[derive(Debug)]
pub struct AzureAi;

static AUTH: HeaderAuth = HeaderAuth::new(HeaderName::from_static("api-key"), "");

impl Kind for AzureAi {
    fn name(&self) -> &'static str {
        "azure_ai"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &AUTH
    }

    // No verify call: the inference API has no model list a key alone can read (`/models/info`
    // needs a deployment), and a chat call would cost the tenant money.

    /// The resource's OpenAI v1 API, which serves every deployed model by `model` name with
    /// no `api-version`.
    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        Some(match ep {
            CompatEndpoint::Chat => "/openai/v1/chat/completions",
            CompatEndpoint::Embeddings => "/openai/v1/embeddings",
        })
    }

    fn usage(&self) -> DialectRef {
        Some(&openai::WIRE)
    }

    fn errors(&self) -> ErrorShape {
        openai::ERRORS
    }

    fn stream_usage(&self) -> bool {
        true
    }
}
