//! The route step: which provider a path goes to, and which path the provider sees.
//!
//! `/v1/...` goes to the tenant's default provider with the path unchanged; `/{provider}/...`
//! goes to the named provider with the rest of the path; `/byokd/...` is byokd's own.

use std::sync::Arc;

use crate::provider::Provider;

/// The route step could not map the path to a provider.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("no route for this path; use /v1/..., /{{provider}}/... or /byokd/...")]
    UnknownRoute,
    #[error("provider `{0}` is not configured")]
    UnknownProvider(String),
    #[error("method {0} is not proxied")]
    MethodNotAllowed(http::Method),
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    BadHost,
}

/// Where a request goes before the tenant is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The tenant's `default_provider` (OpenAI wire format by convention).
    Default,
    /// A provider by index into the configured providers.
    Named(usize),
    /// `GET /byokd/usage`: the calling tenant's usage this month, answered by byokd itself.
    Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub target: Target,
    /// Bytes of the request path that name the provider (`/anthropic`); the rest goes upstream.
    pub strip: usize,
}

impl Route {
    /// The path sent upstream, below the provider's base URL; starts with `/`.
    pub fn upstream_path<'a>(&self, request_path: &'a str) -> &'a str {
        match request_path.get(self.strip..) {
            Some(p) if !p.is_empty() => p,
            _ => "/",
        }
    }
}

/// Methods a provider API uses. TRACE would echo the injected key back; CONNECT and
/// extension methods have no place in a provider API.
pub fn check_method(m: &http::Method) -> Result<(), RouteError> {
    use http::Method;
    match *m {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS => Ok(()),
        _ => Err(RouteError::MethodNotAllowed(m.clone())),
    }
}

pub fn route(providers: &[Arc<Provider>], path: &str) -> Result<Route, RouteError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(RouteError::UnknownRoute);
    };
    if escapes(rest) {
        return Err(RouteError::UnknownRoute);
    }
    let (first, tail) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    match first {
        "v1" => Ok(Route {
            target: Target::Default,
            strip: 0,
        }),
        "byokd" if tail == "/usage" => Ok(Route {
            target: Target::Usage,
            strip: 0,
        }),
        "byokd" | "" => Err(RouteError::UnknownRoute),
        name => {
            let idx = providers
                .iter()
                .position(|p| &*p.name == name)
                .ok_or_else(|| RouteError::UnknownProvider(name.chars().take(64).collect()))?;
            Ok(Route {
                target: Target::Named(idx),
                strip: path.len() - tail.len(),
            })
        }
    }
}

/// A path that could leave the provider's base path once the upstream normalises it:
/// `.` or `..` segments, empty segments, or encoded dots, slashes and backslashes.
fn escapes(path: &str) -> bool {
    let b = path.as_bytes();
    // One SIMD scan for the rare bytes; typical paths have none and stop here.
    if memchr::memchr3(b'.', b'%', b'\\', b).is_none() {
        return memchr::memmem::find(b, b"//").is_some();
    }
    if b.contains(&b'\\') || memchr::memmem::find(b, b"//").is_some() {
        return true;
    }
    if path.split('/').any(|seg| seg == "." || seg == "..") {
        return true;
    }
    memchr::memchr_iter(b'%', b).any(|i| {
        matches!(
            (b.get(i + 1), b.get(i + 2).map(u8::to_ascii_lowercase)),
            (Some(b'2'), Some(b'e' | b'f')) | (Some(b'5'), Some(b'c'))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let cfg =
            crate::config::Config::from_yaml("{}", std::path::Path::new("/x/byokd.yaml")).unwrap();
        let p = "/v1/chat/completions";
        let r = route(&cfg.providers, p).unwrap();
        assert_eq!((r.target, r.upstream_path(p)), (Target::Default, p));
        let p = "/anthropic/v1/messages";
        let r = route(&cfg.providers, p).unwrap();
        assert_eq!(
            r.target,
            Target::Named(cfg.provider_index("anthropic").unwrap())
        );
        assert_eq!(r.upstream_path(p), "/v1/messages");
        let p = "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent";
        assert_eq!(
            route(&cfg.providers, p).unwrap().upstream_path(p),
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
        );
        assert_eq!(
            route(&cfg.providers, "/openai")
                .unwrap()
                .upstream_path("/openai"),
            "/"
        );
        assert!(route(&cfg.providers, "/nope/v1/x").is_err());
        for bad in [
            "/groq/../v1/chat/completions",
            "/openrouter/./x",
            "/openai/v1/%2e%2e/admin",
            "/openai/v1%2Fx",
            "/openai//v1",
            "/openai/v1/%5Cx",
            "/v1/../../x",
        ] {
            assert!(route(&cfg.providers, bad).is_err(), "{bad}");
        }
        // Dots inside a segment are fine (model names, versions).
        assert!(
            route(
                &cfg.providers,
                "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
            )
            .is_ok()
        );
        assert_eq!(
            route(&cfg.providers, "/byokd/usage").unwrap().target,
            Target::Usage
        );
        assert!(route(&cfg.providers, "/byokd/other").is_err());
        assert!(route(&cfg.providers, "/").is_err());
    }
}
