//! The route step: which provider a path goes to, and which path the provider sees.
//!
//! `/v1/...` goes to the tenant's default provider with the path unchanged; `/{provider}/...`
//! goes to the named provider with the rest of the path; `/byokd/...` is byokd's own.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::provider::Provider;

pub mod head;

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
    #[error(
        "`{0}` has no OpenAI-compatible endpoint for this request; call its native API under /{0}/..."
    )]
    NoCompatEndpoint(String),
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
    /// Routed by model: the provider's OpenAI-compatible endpoint, sent instead of the path.
    pub path: Option<&'static str>,
}

impl Route {
    /// The path sent upstream, below the provider's base URL; starts with `/`.
    pub fn upstream_path<'a>(&self, request_path: &'a str) -> &'a str {
        if let Some(p) = self.path {
            return p;
        }
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
            path: None,
        }),
        "byokd" if tail == "/usage" => Ok(Route {
            target: Target::Usage,
            strip: 0,
            path: None,
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
                path: None,
            })
        }
    }
}

/// How an alias orders its candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// As listed.
    Order,
    /// Lowest price per token first (input plus output, from the price table); unpriced last.
    Cheapest,
    /// Lowest moving average of time to first byte first; one never measured goes first, so
    /// every candidate gets measured.
    Fastest,
}

/// One (provider, model) an alias may go to.
#[derive(Debug)]
pub struct TierCandidate {
    pub provider: usize,
    pub model: Box<str>,
    /// Moving average of time to first byte, in µs; 0: not measured yet.
    ttfb_us: AtomicU64,
}

impl TierCandidate {
    pub fn new(provider: usize, model: &str) -> Self {
        Self {
            provider,
            model: model.into(),
            ttfb_us: AtomicU64::new(0),
        }
    }

    /// The moving average of time to first byte, once measured.
    pub fn ttfb_us(&self) -> Option<u64> {
        Some(self.ttfb_us.load(Ordering::Relaxed)).filter(|&v| v > 0)
    }

    /// Adds one time to first byte to the moving average (weight 1/8: a few slow answers
    /// move it, one does not).
    pub fn observe(&self, us: u64) {
        let us = us.max(1);
        let _ = self
            .ttfb_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 { us } else { old - old / 8 + us / 8 })
            });
    }
}

/// A `models:` alias: one `provider/model`, or candidates and the rule ordering them.
#[derive(Debug)]
pub struct ModelRoute {
    pub candidates: Box<[TierCandidate]>,
    pub rule: Rule,
}

impl ModelRoute {
    /// Candidate indexes in the rule's order; `price` is a candidate's price per token.
    pub fn ordered(&self, price: impl Fn(&TierCandidate) -> Option<u64>) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.candidates.len()).collect();
        match self.rule {
            Rule::Order => {}
            Rule::Cheapest => {
                order.sort_by_key(|&i| price(&self.candidates[i]).unwrap_or(u64::MAX));
            }
            Rule::Fastest => order.sort_by_key(|&i| self.candidates[i].ttfb_us().unwrap_or(0)),
        }
        order
    }
}

/// Where a `/v1` request's `model` sends it.
#[derive(Debug)]
pub enum ByModel<'a> {
    /// `provider/model` naming a configured provider (the rest is its model name).
    Provider(usize, &'a str),
    /// A `models:` alias.
    Alias(&'a Arc<ModelRoute>),
}

/// Where a `/v1` request's `model` sends it: a `models:` alias, or `provider/model` naming a
/// configured provider. `None`: the tenant's default provider, model unchanged (an
/// OpenRouter-style `vendor/model` whose vendor is not a configured provider stays as it is).
pub fn by_model<'a>(
    providers: &[Arc<Provider>],
    aliases: &'a HashMap<Box<str>, Arc<ModelRoute>>,
    model: &'a str,
) -> Option<ByModel<'a>> {
    if let Some(r) = aliases.get(model) {
        return Some(ByModel::Alias(r));
    }
    let (prefix, rest) = model.split_once('/')?;
    if rest.is_empty() {
        return None;
    }
    let idx = providers.iter().position(|p| &*p.name == prefix)?;
    Some(ByModel::Provider(idx, rest))
}

/// The top-level `model` of a JSON request body: its text, and the byte range of its JSON
/// string in the body (quotes included). `None` for a body that is not a JSON object with
/// one string `model`.
pub fn body_model(body: &[u8]) -> Option<(String, Range<usize>)> {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
    }
    let head: Head<'_> = serde_json::from_slice(body).ok()?;
    model_at(body, head.model?)
}

/// What one parse of a JSON request body's top level tells byokd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyHead {
    /// As [`body_model`] reads it.
    pub model: Option<(String, Range<usize>)>,
    /// Whether `stream` is `true`; `None` when that is not known (the body did not parse as
    /// an object with at most one of each of `model` and `stream`).
    pub streams: Option<bool>,
}

/// The body's `model` and whether it asks for a stream, in one pass: a chat that does not
/// stream needs no second parse to decide whether usage must be asked for. The usual body's
/// top level is scanned ([`head::scan`]); serde reads any other.
pub fn body_head(body: &[u8]) -> BodyHead {
    head::scan(body).unwrap_or_else(|| parsed_head(body))
}

fn parsed_head(body: &[u8]) -> BodyHead {
    #[derive(Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
        #[serde(borrow)]
        stream: Option<&'a RawValue>,
    }
    match serde_json::from_slice::<Head<'_>>(body) {
        Ok(h) => BodyHead {
            model: h.model.and_then(|raw| model_at(body, raw)),
            streams: Some(h.stream.is_some_and(|s| s.get() == "true")),
        },
        // A duplicate `stream` must not stop routing by model: that reads `model` alone.
        Err(_) => BodyHead {
            model: body_model(body),
            streams: None,
        },
    }
}

fn model_at(body: &[u8], raw: &RawValue) -> Option<(String, Range<usize>)> {
    let raw = raw.get();
    // The usual name has no escape: the parser already checked the string, so its text is
    // the bytes between the quotes, with no second parse.
    let plain = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .filter(|r| !r.bytes().any(|b| b == b'\\' || b == b'"' || b < 0x20));
    let model = match plain {
        Some(m) => m.to_owned(),
        None => serde_json::from_str(raw).ok()?,
    };
    // The raw value borrows from `body`: its offset is where it starts.
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    Some((model, start..start + raw.len()))
}

/// `body` with the JSON string at `at` replaced by `model`: every other byte is the app's.
pub fn with_model(body: &[u8], at: Range<usize>, model: &str) -> Bytes {
    let quoted = serde_json::Value::from(model).to_string();
    let mut out = Vec::with_capacity(body.len() + quoted.len());
    out.extend_from_slice(&body[..at.start]);
    out.extend_from_slice(quoted.as_bytes());
    out.extend_from_slice(&body[at.end..]);
    Bytes::from(out)
}

/// A path that could leave the provider's base path once the upstream normalises it:
/// `.` or `..` segments, also with path parameters (`..;x`, which servlet-style upstreams
/// read as `..`), empty segments, or encoded dots, slashes and backslashes.
fn escapes(path: &str) -> bool {
    let b = path.as_bytes();
    // `//` found from the slashes, not with `memmem::find`, which builds a searcher on every
    // call: more work than the search over a path's few slashes.
    let double_slash = || memchr::memchr_iter(b'/', b).any(|i| b.get(i + 1) == Some(&b'/'));
    // One SIMD scan for the rare bytes; typical paths have none and stop here.
    if memchr::memchr3(b'.', b'%', b'\\', b).is_none() {
        return double_slash();
    }
    if b.contains(&b'\\') || double_slash() {
        return true;
    }
    let dots = |seg: &str| {
        let name = seg.split_once(';').map_or(seg, |(name, _)| name);
        name == "." || name == ".."
    };
    if path.split('/').any(dots) {
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
    fn model_prefix_or_alias_picks_the_provider() {
        let cfg = crate::config::Config::from_yaml(
            "models:\n  fast: gemini/gemini-2.5-flash\n  team/best: anthropic/claude-opus-4-1\n",
            std::path::Path::new("/x/byokd.yaml"),
        )
        .unwrap();
        let idx = |n: &str| cfg.providers.iter().position(|p| &*p.name == n).unwrap();
        let pick = |m: &str| match by_model(&cfg.providers, &cfg.models, m)? {
            ByModel::Provider(i, m) => Some((i, m.to_string())),
            ByModel::Alias(r) => {
                Some((r.candidates[0].provider, r.candidates[0].model.to_string()))
            }
        };
        assert_eq!(
            pick("anthropic/claude-sonnet-4-5"),
            Some((idx("anthropic"), "claude-sonnet-4-5".into()))
        );
        assert_eq!(
            pick("fast"),
            Some((idx("gemini"), "gemini-2.5-flash".into()))
        );
        // An alias is matched whole first, even with a `/` in it.
        assert_eq!(
            pick("team/best"),
            Some((idx("anthropic"), "claude-opus-4-1".into()))
        );
        // Only the first segment names a provider: the rest may hold more slashes.
        assert_eq!(
            pick("openrouter/meta-llama/llama-3.3-70b"),
            Some((idx("openrouter"), "meta-llama/llama-3.3-70b".into()))
        );
        for unchanged in [
            "gpt-4o",
            "meta-llama/llama-3.3-70b",
            "anthropic/",
            "/x",
            "ft:gpt-4o:acme",
        ] {
            assert_eq!(pick(unchanged), None, "{unchanged}");
        }
    }

    #[test]
    fn tiers_order_their_candidates_by_their_rule() {
        let cfg = crate::config::Config::from_yaml(
            "models:\n  t: { candidates: [openai/a, anthropic/b, gemini/c], rule: fastest }\n  c: { candidates: [openai/a, anthropic/b, gemini/c], rule: cheapest }\n  o: { candidates: [gemini/c, openai/a] }\n",
            std::path::Path::new("/x/byokd.yaml"),
        )
        .unwrap();
        let alias = |n: &'static str| match by_model(&cfg.providers, &cfg.models, n) {
            Some(ByModel::Alias(r)) => r.clone(),
            other => panic!("{other:?}"),
        };
        let price = |c: &TierCandidate| match &*c.model {
            "a" => Some(30),
            "b" => None,
            _ => Some(10),
        };
        assert_eq!(alias("o").ordered(price), [0, 1]);
        assert_eq!(alias("c").ordered(price), [2, 0, 1], "unpriced last");
        let t = alias("t");
        // Unmeasured first, so each gets measured; then the fastest average.
        t.candidates[0].observe(900);
        t.candidates[2].observe(300);
        assert_eq!(t.ordered(price), [1, 2, 0]);
        t.candidates[1].observe(2_000);
        assert_eq!(t.ordered(price), [2, 0, 1]);
        // One slow answer moves the average by an eighth.
        t.candidates[2].observe(8_300);
        assert_eq!(t.candidates[2].ttfb_us(), Some(300 - 300 / 8 + 8_300 / 8));
        for bad in [
            "models: { x: { candidates: [] } }\n",
            "models: { x: { candidates: [openai/a], rule: random } }\n",
            "models: { x: { candidates: [nowhere/a] } }\n",
        ] {
            assert!(
                crate::config::Config::from_yaml(bad, std::path::Path::new("/x/b.yaml")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_the_top_level_model_is_read_and_rewritten() {
        let body = br#"{ "messages": [{"role":"user","content":"say \"model\": \"x\""}],
  "model" : "anthropic\/claude-sonnet-4-5", "metadata": {"model": "inner"} }"#;
        let (model, at) = body_model(body).unwrap();
        assert_eq!(model, "anthropic/claude-sonnet-4-5");
        let out = with_model(body, at.clone(), "claude-sonnet-4-5");
        let expect = [
            &body[..at.start],
            &b"\"claude-sonnet-4-5\""[..],
            &body[at.end..],
        ]
        .concat();
        assert_eq!(&out[..], &expect[..], "every other byte is the app's");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "claude-sonnet-4-5");
        assert_eq!(v["metadata"]["model"], "inner");
        // A name that needs escaping is written as valid JSON.
        let out = with_model(body, at, "we\"ird");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "we\"ird");
        for not_routable in [
            &br#"{"model": 3}"#[..],
            br#"[1]"#,
            br#"{"messages":[]}"#,
            b"not json",
        ] {
            assert!(body_model(not_routable).is_none());
        }
    }

    #[test]
    fn a_model_with_or_without_escapes_reads_the_same() {
        for body in [
            &br#"{"model":"acme/model-1","stream":true}"#[..],
            br#"{"model":"\u0061cme\/model-1","stream":true}"#,
        ] {
            let (model, at) = body_head(body).model.unwrap();
            assert_eq!(model, "acme/model-1");
            assert_eq!(body[at.start], b'"');
            assert_eq!(body[at.end - 1], b'"');
            assert_eq!(&body[at.end..at.end + 1], b",");
        }
    }

    #[test]
    fn one_parse_finds_the_model_and_whether_the_body_streams() {
        let head = body_head(br#"{"model" : "m", "stream" : true, "messages":[]}"#);
        assert_eq!(head.model.map(|m| m.0), Some("m".to_string()));
        assert_eq!(head.streams, Some(true));
        for not_streaming in [
            &br#"{"model":"m"}"#[..],
            br#"{"model":"m","stream":false}"#,
            br#"{"model":"m","stream":"true"}"#,
            br#"{"stream":null}"#,
        ] {
            assert_eq!(body_head(not_streaming).streams, Some(false));
            assert!(crate::stream_usage::add_include_usage(not_streaming).is_none());
        }
        // Duplicate keys or no JSON: not known, and the model is still read where it can be.
        let dup = body_head(br#"{"model":"p/m","stream":true,"stream":true}"#);
        assert_eq!(dup.streams, None);
        assert_eq!(dup.model.map(|m| m.0), Some("p/m".to_string()));
        assert_eq!(body_head(b"not json").streams, None);
    }

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
            "/v1/chat//completions",
            "/openai/v1.0//x",
            "/openai/v1/x//",
            "/openai/v1/%5Cx",
            "/v1/../../x",
            "/openai/v1/..;/admin",
            "/openai/.;x/v1",
        ] {
            assert!(route(&cfg.providers, bad).is_err(), "{bad}");
        }
        // Dots inside a segment are fine (model names, versions), so is a `;` after a name.
        assert!(route(&cfg.providers, "/openai/v1/files/a..b;c").is_ok());
        assert!(route(&cfg.providers, "/openai/v1/models/").is_ok());
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
