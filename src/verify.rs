//! The live check of a key at registration (`--verify`, `"verify": true`): one cheap call
//! (list models) to the provider through its configured base URL. A key the provider
//! rejects is refused; a provider that cannot be reached is reported as such, not as a
//! bad key.

use http::{Method, Request, header};

use crate::forward::Upstream;
use crate::provider::Provider;
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

pub async fn verify_key(
    upstream: &Upstream,
    p: &Provider,
    secret: &str,
) -> Result<(), VerifyError> {
    let call = p
        .kind
        .verify_call(&p.name)
        .ok_or_else(|| VerifyError::Unsupported(p.name.to_string()))?;
    let uri = p
        .upstream_uri(call.path, call.query)
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::ACCEPT, "application/json")
        .body(RequestBody::empty())
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    let (mut parts, body) = req.into_parts();
    for (name, value) in p.kind.default_headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    let auth = p.auth();
    auth.authorize(&mut parts, &auth.credential(secret.as_bytes()))
        .map_err(|_| VerifyError::Rejected(400))?;
    let req = Request::from_parts(parts, body);
    let resp = upstream
        .send(req)
        .await
        .map_err(|e| VerifyError::Unreachable(e.to_string()))?;
    match resp.status().as_u16() {
        200..=299 => Ok(()),
        // Some APIs answer a bad key with 400 (API_KEY_INVALID).
        s @ (400 | 401 | 403) => Err(VerifyError::Rejected(s)),
        s => Err(VerifyError::Inconclusive(s)),
    }
}
