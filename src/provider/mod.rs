//! Providers: where a request goes, how the provider's auth is injected, what its errors look like.
//!
//! A provider is config (name, kind, base URL); its kind decides the wire format: auth header,
//! error body shape and usage dialect. The upstream host always comes from here, never from
//! the request, so a client cannot aim byokd at an arbitrary host.

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, StatusCode, Uri};

use crate::usage::Dialect;

/// The wire formats byokd speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI and every OpenAI-compatible API (Mistral, OpenRouter, Groq, DeepSeek, Together).
    OpenAi,
    Anthropic,
    Gemini,
    Azure,
    /// OpenAI-compatible and native API; no auth unless the tenant registered a key.
    Ollama,
}

impl ProviderKind {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "openai" => Self::OpenAi,
            "anthropic" => Self::Anthropic,
            "gemini" => Self::Gemini,
            "azure" => Self::Azure,
            "ollama" => Self::Ollama,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Azure => "azure",
            Self::Ollama => "ollama",
        }
    }
}

/// The JSON shape of an error body, per provider family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    OpenAi,
    Anthropic,
    Gemini,
}

impl ErrorShape {
    /// A body the provider's own SDK parses: OpenAI `{"error":{message,type,code}}`,
    /// Anthropic `{"type":"error","error":{type,message}}`, Gemini `{"error":{code,message,status}}`.
    pub fn error_body(self, status: StatusCode, code: &str, message: &str) -> Vec<u8> {
        let v = match self {
            Self::OpenAi => serde_json::json!({
                "error": { "message": message, "type": openai_type(status), "param": null, "code": code }
            }),
            Self::Anthropic => serde_json::json!({
                "type": "error",
                "error": { "type": anthropic_type(status), "message": message }
            }),
            Self::Gemini => serde_json::json!({
                "error": { "code": status.as_u16(), "message": message, "status": google_status(status) }
            }),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

fn openai_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

fn anthropic_type(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

fn google_status(s: StatusCode) -> &'static str {
    match s.as_u16() {
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "INVALID_ARGUMENT",
    }
}

/// One configured upstream.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: Arc<str>,
    pub kind: ProviderKind,
    pub base_url: String,
    scheme: Scheme,
    authority: Authority,
    /// Path of the base URL without a trailing slash ("" or "/api").
    prefix: String,
    /// Add `stream_options.include_usage` to streaming chat requests that lack it (and hide
    /// the result from the app), so streams are metered. OpenAI-wire kinds only.
    pub stream_usage: bool,
}

impl Provider {
    pub fn new(name: &str, kind: ProviderKind, base_url: &str) -> Result<Self, String> {
        let mut p = Provider {
            name: Arc::from(name),
            kind,
            base_url: base_url.to_string(),
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("invalid"),
            prefix: String::new(),
            // Ollama's OpenAI endpoint honours stream_options.include_usage since v0.5.2
            // (December 2024); older servers ignore the field, so asking costs nothing there.
            stream_usage: matches!(
                kind,
                ProviderKind::OpenAi | ProviderKind::Azure | ProviderKind::Ollama
            ),
        };
        if base_url.is_empty() {
            return Ok(p);
        }
        let uri: Uri = base_url
            .parse()
            .map_err(|e| format!("`{base_url}` is not a URL: {e}"))?;
        match (uri.scheme(), uri.authority()) {
            (Some(s), Some(a)) if *s == Scheme::HTTP || *s == Scheme::HTTPS => {
                p.scheme = s.clone();
                p.authority = a.clone();
            }
            _ => {
                return Err(format!(
                    "`{base_url}` must be an absolute http:// or https:// URL"
                ));
            }
        }
        if uri.query().is_some() {
            return Err(format!("`{base_url}` must not carry a query"));
        }
        p.prefix = uri.path().trim_end_matches('/').to_string();
        Ok(p)
    }

    pub fn error_shape(&self) -> ErrorShape {
        match self.kind {
            ProviderKind::Anthropic => ErrorShape::Anthropic,
            ProviderKind::Gemini => ErrorShape::Gemini,
            ProviderKind::OpenAi | ProviderKind::Azure | ProviderKind::Ollama => ErrorShape::OpenAi,
        }
    }

    /// The header carrying the provider key, and the prefix before the key in its value.
    pub fn auth_header(&self) -> (HeaderName, &'static str) {
        match self.kind {
            ProviderKind::OpenAi | ProviderKind::Ollama => (http::header::AUTHORIZATION, "Bearer "),
            ProviderKind::Anthropic => (HeaderName::from_static("x-api-key"), ""),
            ProviderKind::Gemini => (HeaderName::from_static("x-goog-api-key"), ""),
            ProviderKind::Azure => (HeaderName::from_static("api-key"), ""),
        }
    }

    /// Whether a request without a tenant key is refused (`no_key`) or sent without auth.
    pub fn requires_key(&self) -> bool {
        !matches!(self.kind, ProviderKind::Ollama)
    }

    pub fn dialect(&self) -> Dialect {
        match self.kind {
            ProviderKind::OpenAi | ProviderKind::Azure | ProviderKind::Ollama => Dialect::OpenAi,
            ProviderKind::Anthropic => Dialect::Anthropic,
            ProviderKind::Gemini => Dialect::Gemini,
        }
    }

    /// The upstream URI for a request path (already stripped of the `/{provider}` prefix).
    pub fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(
            self.prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.prefix);
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        let pq = PathAndQuery::try_from(pq)?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }

    /// Registration-time format check; the message never contains the key.
    pub fn check_key_format(&self, key: &str) -> Result<(), String> {
        if key.len() < 8 || key.len() > 1024 {
            return Err("a provider key is 8 to 1024 characters long".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a provider key is printable ASCII without spaces".into());
        }
        let expected = match (self.kind, &*self.name) {
            (ProviderKind::OpenAi, "openai") => Some("sk-"),
            (ProviderKind::Anthropic, _) => Some("sk-ant-"),
            (ProviderKind::Gemini, _) => Some("AIza"),
            _ => None,
        };
        match expected {
            Some(p) if !key.starts_with(p) => Err(format!(
                "a {} key starts with `{p}`; check that you pasted the right key",
                self.name
            )),
            _ => Ok(()),
        }
    }
}

/// The masked form shown by `keys list`: first 3 and last 4 characters, never more than 7.
pub fn mask(key: &str) -> String {
    if key.len() < 16 || !key.is_ascii() {
        return "...".into();
    }
    format!("{}...{}", &key[..3], &key[key.len() - 4..])
}

/// Providers that exist without config. Azure has no public host, so it has an empty
/// base URL and is dropped unless the config sets one.
pub fn builtins() -> Vec<Provider> {
    let table = [
        ("openai", ProviderKind::OpenAi, "https://api.openai.com"),
        (
            "anthropic",
            ProviderKind::Anthropic,
            "https://api.anthropic.com",
        ),
        (
            "gemini",
            ProviderKind::Gemini,
            "https://generativelanguage.googleapis.com",
        ),
        ("azure", ProviderKind::Azure, ""),
        ("mistral", ProviderKind::OpenAi, "https://api.mistral.ai"),
        (
            "openrouter",
            ProviderKind::OpenAi,
            "https://openrouter.ai/api",
        ),
        ("groq", ProviderKind::OpenAi, "https://api.groq.com/openai"),
        ("deepseek", ProviderKind::OpenAi, "https://api.deepseek.com"),
        ("together", ProviderKind::OpenAi, "https://api.together.xyz"),
        ("ollama", ProviderKind::Ollama, "http://127.0.0.1:11434"),
    ];
    table
        .iter()
        .filter_map(|(n, k, u)| Provider::new(n, *k, u).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_keeps_path_and_query_under_the_base_prefix() {
        let p = Provider::new(
            "openrouter",
            ProviderKind::OpenAi,
            "https://openrouter.ai/api/",
        )
        .unwrap();
        let u = p.upstream_uri("/v1/chat/completions", Some("a=b")).unwrap();
        assert_eq!(
            u.to_string(),
            "https://openrouter.ai/api/v1/chat/completions?a=b"
        );
    }

    #[test]
    fn base_url_must_be_absolute_http() {
        assert!(Provider::new("x", ProviderKind::OpenAi, "ftp://x").is_err());
        assert!(Provider::new("x", ProviderKind::OpenAi, "/relative").is_err());
    }

    #[test]
    fn key_format_and_mask() {
        let builtins = builtins();
        let openai = builtins.iter().find(|p| &*p.name == "openai").unwrap();
        assert!(openai.check_key_format("sk-abcdefghijklmnop").is_ok());
        let err = openai.check_key_format("AIzaabcdefghijklmnop").unwrap_err();
        assert!(!err.contains("AIzaabcdefghijklmnop"));
        assert!(openai.check_key_format("sk-abc def ghij").is_err());
        assert_eq!(mask("sk-proj-abcdefghijklmnopwxyz"), "sk-...wxyz");
        assert_eq!(mask("short"), "...");
    }

    #[test]
    fn error_bodies_have_each_providers_shape() {
        let b: serde_json::Value = serde_json::from_slice(&ErrorShape::Anthropic.error_body(
            StatusCode::UNAUTHORIZED,
            "unknown_tenant",
            "m",
        ))
        .unwrap();
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "authentication_error");
        let b: serde_json::Value = serde_json::from_slice(&ErrorShape::Gemini.error_body(
            StatusCode::FORBIDDEN,
            "no_key",
            "m",
        ))
        .unwrap();
        assert_eq!(b["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(b["error"]["code"], 403);
        let b: serde_json::Value = serde_json::from_slice(&ErrorShape::OpenAi.error_body(
            StatusCode::NOT_FOUND,
            "unknown_route",
            "m",
        ))
        .unwrap();
        assert_eq!(b["error"]["code"], "unknown_route");
        assert_eq!(b["error"]["message"], "m");
    }
}
