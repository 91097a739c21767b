//! Azure OpenAI: the OpenAI wire under a resource's own host (no public default), the key
//! in `api-key`, deployments in the path and an `api-version` query.

use http::HeaderName;

use super::{Authenticator, ErrorShape, HeaderAuth, Kind, VerifyCall, openai};
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
