//! Azure OpenAI: the OpenAI wire under a resource's own host (no public default), the key
//! in `api-key`, deployments in the path and an `api-version` query.

use http::HeaderName;

use super::{Authenticator, CompatEndpoint, ErrorShape, HeaderAuth, Kind, VerifyCall, openai};
use crate::usage::DialectRef;

/// The `azure` kind.
#[derive(Debug)]
pub struct Azure;

static AUTH: HeaderAuth = HeaderAuth::new(HeaderName::from_static("api-key"), "");

impl Kind for Azure {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &AUTH
    }

    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        Some(VerifyCall {
            path: "/openai/models",
            query: Some("api-version=2024-10-21"),
        })
    }

    /// The v1 API of Azure OpenAI: the deployment is named by `model`, no `api-version`.
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
