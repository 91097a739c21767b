//! The rewrite step: turn the app's request into the provider-native one, in place.
//!
//! The headers are edited in the map the request arrived with (no copy): hop-by-hop headers,
//! the app's own auth, byokd's own headers and `Host` are removed; the provider's auth is
//! injected. The URI is rebuilt from the provider's base URL, so the host never comes from
//! the request.

use http::header::{self, HeaderName, HeaderValue};
use std::sync::LazyLock;

use http::{HeaderMap, Version, request};

use crate::forward::ForwardError;
use crate::keys::Credential;
use crate::provider::Provider;
use crate::route::Route;

/// Hop-by-hop headers (RFC 9110 §7.6.1), which never cross a proxy.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// byokd's own request headers (identity, passthrough) that must not reach a provider, and
/// `Host`, which the forward step sets from the provider's URL.
static BYOKD_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-tenant-id"),
    HeaderName::from_static("x-user-api-key"),
    HeaderName::from_static("x-user-provider"),
    header::HOST,
];

/// Removes hop-by-hop headers, including those the `Connection` header names. Used in both
/// directions.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    static HOP: LazyLock<HeaderSet> = LazyLock::new(|| HeaderSet::new(&HOP_BY_HOP));
    strip_connection_named(headers);
    HOP.remove_from(headers);
}

/// Removes the headers the `Connection` headers name, all of them (a message may carry
/// several). Most name only `keep-alive` or `close` (an upstream's every response does), which
/// go anyway or are no header: such a message is done after one lookup, before anything is
/// split or collected.
fn strip_connection_named(headers: &mut HeaderMap) {
    let plain = |v: &HeaderValue| {
        let b = v.as_bytes();
        b.eq_ignore_ascii_case(b"keep-alive") || b.eq_ignore_ascii_case(b"close")
    };
    if headers.get_all(header::CONNECTION).iter().all(plain) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

/// Header names to remove, with a mask of their lengths. A message carries a handful of
/// headers and a set some twenty names: most present names are passed over on their length
/// alone, the rest compared with the few listed names of that length (hashing every listed
/// name to remove it once took a fifth of byokd's own instructions per request).
#[derive(Debug)]
pub struct HeaderSet {
    lens: u64,
    /// Sorted by length, so a name is compared only with the listed names of its length.
    names: Box<[(usize, HeaderName)]>,
}

impl HeaderSet {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a HeaderName>) -> Self {
        let mut v: Vec<(usize, HeaderName)> = names
            .into_iter()
            .map(|n| (n.as_str().len(), n.clone()))
            .collect();
        v.sort_by(|a, b| (a.0, a.1.as_str()).cmp(&(b.0, b.1.as_str())));
        v.dedup();
        Self {
            lens: v.iter().fold(0, |m, (len, _)| m | len_bit(*len)),
            names: v.into(),
        }
    }

    /// What a request loses before it goes upstream: hop-by-hop headers, `Host`, byokd's own,
    /// auth the app may have sent to byokd (SDK api keys, platform tokens) in any provider's
    /// header, and the configured identity headers.
    pub fn request(identity: &[HeaderName]) -> Self {
        Self::new(
            HOP_BY_HOP
                .iter()
                .chain(&BYOKD_HEADERS)
                .chain(crate::provider::auth_headers())
                .chain(identity),
        )
    }

    fn find(&self, k: &HeaderName) -> Option<&HeaderName> {
        let len = k.as_str().len();
        if self.lens & len_bit(len) == 0 {
            return None;
        }
        let from = self.names.partition_point(|(l, _)| *l < len);
        self.names[from..]
            .iter()
            .take_while(|(l, _)| *l == len)
            .map(|(_, m)| m)
            .find(|m| *m == k)
    }

    /// Removes every header of the set from `h`, in one pass over the names `h` holds.
    pub fn remove_from(&self, h: &mut HeaderMap) {
        self.remove_except(h, [None, None]);
    }

    /// [`Self::remove_from`], but for `kept`: names the caller sets again right after, which
    /// an insert then replaces in place (a removal costs a hash, a probe and a shift).
    pub fn remove_except(&self, h: &mut HeaderMap, kept: [Option<&HeaderName>; 2]) {
        // The matches are the set's own names, so they outlive the scan of `h`.
        let mut hits: [Option<&HeaderName>; 8] = [None; 8];
        let mut more: Vec<&HeaderName> = Vec::new();
        let mut n = 0;
        for k in h.keys() {
            if kept.contains(&Some(k)) {
                continue;
            }
            if let Some(m) = self.find(k) {
                match hits.get_mut(n) {
                    Some(slot) => *slot = Some(m),
                    None => more.push(m),
                }
                n += 1;
            }
        }
        for m in hits.into_iter().flatten().chain(more) {
            h.remove(m);
        }
    }
}

/// A name's length as one bit of a mask (63 for every longer name).
fn len_bit(len: usize) -> u64 {
    1 << len.min(63)
}

/// Removes `x-byokd-*` headers; used in both directions.
pub fn strip_own_headers(h: &mut HeaderMap) {
    if h.keys().any(|k| k.as_str().starts_with("x-byokd-")) {
        let own: Vec<HeaderName> = h
            .keys()
            .filter(|k| k.as_str().starts_with("x-byokd-"))
            .cloned()
            .collect();
        for n in own {
            h.remove(n);
        }
    }
}

/// Rewrites `parts` for `provider`; `strip` is [`HeaderSet::request`] of the configured
/// identity headers.
pub fn rewrite(
    parts: &mut request::Parts,
    provider: &Provider,
    route: &Route,
    credential: Option<&Credential>,
    strip: &HeaderSet,
) -> Result<(), ForwardError> {
    let path = route.upstream_path(parts.uri.path());
    let query = parts.uri.query();
    let uri = match query {
        Some(q) if has_key_param(q) => provider.upstream_uri(path, strip_key_param(q).as_deref()),
        _ => provider.upstream_uri(path, query),
    }
    .map_err(ForwardError::BadUpstreamRequest)?;
    // The app's `Host` is replaced by the provider's, made once, which saves the forward step
    // from making it per request (HTTP/2 drops it for `:authority`).
    let host = provider.host_for(&uri);
    parts.uri = uri;
    // The pooled client negotiates HTTP/2 itself (ALPN); the app's version is irrelevant.
    parts.version = Version::HTTP_11;

    // The auth header the provider's credential is about to set, and `Host`, are replaced
    // below rather than removed first; not for an authenticator that signs the request, which
    // must not see the app's `Host`.
    let auth = credential.and_then(|_| provider.auth().header());
    let kept_host = (auth.is_some() && host.is_some()).then_some(&header::HOST);
    let h = &mut parts.headers;
    strip_connection_named(h);
    strip.remove_except(h, [auth, kept_host]);
    strip_own_headers(h);
    // The usage scanner reads plain bytes; LLM responses are small next to their latency,
    // so identity encoding costs less than decompressing a copy.
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    for (name, value) in provider.kind.default_headers() {
        if !h.contains_key(name) {
            h.insert(name.clone(), value.clone());
        }
    }
    if let Some(c) = credential {
        provider
            .auth()
            .authorize(parts, &c.value)
            .map_err(|_| ForwardError::InvalidCredential)?;
    }
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    Ok(())
}

fn has_key_param(q: &str) -> bool {
    q.split('&').any(|p| p == "key" || p.starts_with("key="))
}

/// The query without `key=...` (an API key passed as a query parameter).
fn strip_key_param(q: &str) -> Option<String> {
    let kept: Vec<&str> = q
        .split('&')
        .filter(|p| !(*p == "key" || p.starts_with("key=")))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{AuthValue, KeySource};
    use crate::provider::builtins;
    use crate::route::Target;

    /// Rewrites a request that named provider `p` by its path `prefix`, with a tenant key.
    fn rewrite_named(parts: &mut request::Parts, p: &Provider, prefix: &str) {
        let r = Route {
            target: Target::Named(0),
            strip: prefix.len(),
            path: None,
        };
        rewrite(parts, p, &r, Some(&cred("")), &HeaderSet::request(&[])).unwrap();
    }

    fn cred(prefix: &str) -> Credential {
        Credential {
            value: AuthValue::new(prefix, b"sk-provider-key-123456"),
            record: None,
            source: KeySource::Tenant,
            decrypted: false,
        }
    }

    #[test]
    fn a_header_set_removes_its_names_and_keeps_others_of_the_same_length() {
        let long = HeaderName::from_static(
            "x-llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll",
        );
        let set = HeaderSet::new(&[
            HeaderName::from_static("x-tenant-id"),
            header::AUTHORIZATION,
            long.clone(),
        ]);
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-tenant-id", "acme"),
            ("x-tenant-ix", "same length, kept"),
            ("authorization", "Bearer app"),
            ("content-type", "application/json"),
            (
                "x-llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll",
                "long, removed",
            ),
            (
                "x-x-llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll",
                "longer, kept",
            ),
        ] {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        h.append(header::AUTHORIZATION, HeaderValue::from_static("second"));
        set.remove_from(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "content-type",
                "x-tenant-ix",
                "x-x-llllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllllll"
            ]
        );
    }

    #[test]
    fn gemini_rewrite_strips_key_param_and_client_auth() {
        let p = builtins()
            .into_iter()
            .find(|p| &*p.name == "gemini")
            .unwrap();
        let req = http::Request::builder()
            .uri("/gemini/v1beta/models/m:streamGenerateContent?alt=sse&key=AIzaCLIENT")
            .header("x-goog-api-key", "client")
            .header("host", "127.0.0.1:8787")
            .header("x-goog-api-key", "client-again")
            .header("host", "second.example")
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("x-byokd-debug", "1")
            .header("x-tenant-id", "acme")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        rewrite_named(&mut parts, &p, "/gemini");
        assert_eq!(
            parts.uri.to_string(),
            "https://generativelanguage.googleapis.com/v1beta/models/m:streamGenerateContent?alt=sse"
        );
        // Replaced in place, not added beside the app's: every value the app sent is gone.
        let keys: Vec<_> = parts.headers.get_all("x-goog-api-key").iter().collect();
        assert_eq!(keys, ["sk-provider-key-123456"]);
        assert!(parts.headers["x-goog-api-key"].is_sensitive());
        for gone in ["connection", "x-hop", "x-byokd-debug", "x-tenant-id"] {
            assert!(!parts.headers.contains_key(gone), "{gone}");
        }
        // The app's `Host` is replaced by the provider's.
        let hosts: Vec<_> = parts.headers.get_all("host").iter().collect();
        assert_eq!(hosts, ["generativelanguage.googleapis.com"]);
    }

    #[test]
    fn anthropic_gets_version_and_x_api_key() {
        let p = builtins()
            .into_iter()
            .find(|p| &*p.name == "anthropic")
            .unwrap();
        let req = http::Request::builder()
            .uri("/anthropic/v1/messages")
            .header("authorization", "Bearer platform-token")
            .header("x-api-key", "platform-token")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        rewrite_named(&mut parts, &p, "/anthropic");
        assert_eq!(parts.headers["x-api-key"], "sk-provider-key-123456");
        assert_eq!(parts.headers["anthropic-version"], "2023-06-01");
        assert!(!parts.headers.contains_key("authorization"));
    }

    /// More headers to drop than the scan's fixed slots, every kind of them, and the ones
    /// that stay.
    #[test]
    fn every_listed_header_goes_and_the_rest_stay() {
        let p = builtins()
            .into_iter()
            .find(|p| &*p.name == "openai")
            .unwrap();
        let gone = [
            "connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "proxy-authorization",
            "x-api-key",
            "x-goog-api-key",
            "api-key",
            "x-tenant-id",
            "x-user-api-key",
            "x-org-tenant",
            "x-byokd-debug",
            "x-named-by-connection",
        ];
        let mut b = http::Request::builder()
            .uri("/v1/chat/completions")
            .header("host", "127.0.0.1:8787");
        for g in gone {
            b = b.header(g, "x");
        }
        let req = b
            .header("connection", "x-named-by-connection")
            .header("authorization", "Bearer app")
            .header("content-type", "application/json")
            .header("openai-organization", "org-1")
            .header("x-request-id", "r1")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        let r = Route {
            target: Target::Default,
            strip: 0,
            path: None,
        };
        let tenant = [HeaderName::from_static("x-org-tenant")];
        rewrite(
            &mut parts,
            &p,
            &r,
            Some(&cred("Bearer ")),
            &HeaderSet::request(&tenant),
        )
        .unwrap();
        for g in gone {
            assert!(!parts.headers.contains_key(g), "{g} was forwarded");
        }
        assert_eq!(
            parts.headers["host"], "api.openai.com",
            "the provider's, not the app's"
        );
        assert_eq!(
            parts.headers["authorization"],
            "Bearer sk-provider-key-123456"
        );
        assert_eq!(parts.headers.get_all("authorization").iter().count(), 1);
        for kept in ["content-type", "openai-organization", "x-request-id"] {
            assert!(parts.headers.contains_key(kept), "{kept} was dropped");
        }
    }

    #[test]
    fn key_param_variants() {
        assert_eq!(strip_key_param("key=a&alt=sse").as_deref(), Some("alt=sse"));
        assert_eq!(strip_key_param("key=a"), None);
        assert!(!has_key_param("monkey=1&keys=2"));
    }
}
