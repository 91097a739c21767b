//! The live check of a key at registration (`--verify`, `"verify": true`): one cheap call
//! (list models) to the provider through its configured base URL. A key the provider
//! rejects is refused; a provider that cannot be reached is reported as such, not as a
//! bad key.

use http::{Method, Request, header};

use crate::forward::Upstream;
use crate::keys::AuthValue;
use crate::provider::{Provider, ProviderKind};
use crate::stream_usage::RequestBody;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the provider rejected the key (HTTP {0}); check that it is current and has access")]
    Rejected(u16),
    #[error("the key could not be checked: the provider answered HTTP {0}")]
    Inconclusive(u16),
    #[error("the key could not be checked: {0}")]
    Unreachable(String),
    #[error("{0} keys cannot be checked live")]
    Unsupported(String),
}

/// The path of the provider's list-models endpoint.
fn models_path(p: &Provider) -> Option<&'static str> {
    match p.kind {
        ProviderKind::OpenAi => Some("/v1/models"),
        ProviderKind::Anthropic => Some("/v1/models"),
        ProviderKind::Gemini => Some("/v1beta/models"),
        ProviderKind::Azure => Some("/openai/models"),
        ProviderKind::Ollama => None,
    }
}

pub async fn verify_key(
    upstream: &Upstream,
    p: &Provider,
    secret: &str,
) -> Result<(), VerifyError> {
    let path = models_path(p).ok_or_else(|| VerifyError::Unsupported(p.name.to_string()))?;
    let query = matches!(p.kind, ProviderKind::Azure).then_some("api-version=2024-10-21");
    let uri = p
        .upstream_uri(path, query)
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    let (name, prefix) = p.auth_header();
    let auth = AuthValue::new(prefix, secret.as_bytes())
        .header_value()
        .ok_or(VerifyError::Rejected(400))?;
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::ACCEPT, "application/json")
        .body(RequestBody::empty())
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    req.headers_mut().insert(name, auth);
    if matches!(p.kind, ProviderKind::Anthropic) {
        req.headers_mut().insert(
            "anthropic-version",
            http::HeaderValue::from_static("2023-06-01"),
        );
    }
    let resp = upstream
        .send(req)
        .await
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        // Gemini answers a bad key with 400 API_KEY_INVALID.
        s @ (400 | 401 | 403) => Err(VerifyError::Rejected(s)),
        s => Err(VerifyError::Inconclusive(s)),
    }
}
