//! Providers: where a request goes, how a credential authenticates it, what its errors and
//! usage reports look like.
//!
//! A provider kind is one file here, implementing [`Kind`]; [`KINDS`] registers it. A
//! configured provider ([`Provider`]) is a kind plus a name and a base URL: many providers
//! share a kind (every OpenAI-compatible host is the `openai` kind at another URL, one line
//! in [`BUILTINS`]). The upstream host always comes from here, never from the request, so a
//! client cannot aim byokd at an arbitrary host. Nothing outside this folder names a
//! specific provider.

use std::fmt;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, StatusCode, Uri, request};

use crate::usage::DialectRef;
use crate::vocab::AuthValue;

mod anthropic;
mod azure;
mod azure_ai;
#[cfg(feature = "bedrock")]
mod bedrock;
mod cohere;
mod elevenlabs;
mod gemini;
mod ollama;
mod openai;
mod vertex;

/// Every kind, by its `kind` config value.
pub static KINDS: &[&dyn Kind] = &[
    &openai::OpenAi,
    &anthropic::Anthropic,
    &gemini::Gemini,
    &azure::Azure,
    &azure_ai::AzureAi,
    &ollama::Ollama,
    &cohere::Cohere,
    &elevenlabs::ElevenLabs,
    #[cfg(feature = "bedrock")]
    &bedrock::Bedrock,
    &vertex::Vertex,
];

/// Providers that exist without config: name, kind, base URL. An OpenAI-compatible host is
/// one line. Azure's two APIs have no public host, so their base URLs are empty and they are
/// dropped unless the config sets one.
pub const BUILTINS: &[(&str, &str, &str)] = &[
    ("openai", "openai", "https://api.openai.com"),
    ("anthropic", "anthropic", "https://api.anthropic.com"),
    (
        "gemini",
        "gemini",
        "https://generativelanguage.googleapis.com",
    ),
    ("azure", "azure", ""),
    ("azure_ai", "azure_ai", ""),
    ("mistral", "openai", "https://api.mistral.ai"),
    ("openrouter", "openai", "https://openrouter.ai/api"),
    ("groq", "openai", "https://api.groq.com/openai"),
    ("deepseek", "openai", "https://api.deepseek.com"),
    ("together", "openai", "https://api.together.xyz"),
    ("xai", "openai", "https://api.x.ai"),
    ("fireworks", "openai", "https://api.fireworks.ai/inference"),
    ("cerebras", "openai", "https://api.cerebras.ai"),
    ("perplexity", "openai", "https://api.perplexity.ai"),
    ("cohere", "cohere", "https://api.cohere.com"),
    ("elevenlabs", "elevenlabs", "https://api.elevenlabs.io"),
    ("ollama", "ollama", "http://127.0.0.1:11434"),
];

/// The provider `/v1` goes to when the config names no `default_provider`: the API most
/// apps' SDKs speak.
pub const DEFAULT_PROVIDER: &str = "openai";

/// The OpenAI-compatible endpoints a `/v1` request can be routed to by its `model`
/// (`provider/model` or a `models:` alias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompatEndpoint {
    Chat,
    Embeddings,
}

impl CompatEndpoint {
    /// The endpoint a `/v1` request path is, if it is one that routes by model.
    pub fn of_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::Chat),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }
}

/// The usage dialect and error shape of a request routed by model: it speaks the OpenAI wire
/// whichever provider answers it.
pub fn openai_wire() -> (DialectRef, ErrorShape) {
    (openai::OpenAi.usage(), openai::OpenAi.errors())
}

/// The kind registered as `name`.
pub fn kind(name: &str) -> Option<&'static dyn Kind> {
    KINDS.iter().copied().find(|k| k.name() == name)
}

/// The registered kind names, for messages: `openai, anthropic, ...`.
pub fn kind_names() -> String {
    KINDS
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every header some kind authenticates with: an app's copy of any of them is removed
/// before a request goes upstream, whichever provider it goes to.
pub fn auth_headers() -> &'static [HeaderName] {
    static ALL: LazyLock<Vec<HeaderName>> = LazyLock::new(|| {
        let mut v: Vec<HeaderName> = KINDS
            .iter()
            .filter_map(|k| k.auth().header().cloned())
            .chain(
                KINDS
                    .iter()
                    .flat_map(|k| k.client_signing_headers().iter().cloned()),
            )
            .collect();
        v.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        v.dedup();
        v
    });
    &ALL
}

/// Everything specific to a provider's API. Defaults fit the OpenAI wire.
pub trait Kind: fmt::Debug + Send + Sync {
    /// The `kind` value in config.
    fn name(&self) -> &'static str;

    /// The request and response format it speaks: failover moves a request only between
    /// providers of the same wire.
    fn wire(&self) -> &'static str {
        self.name()
    }

    /// How a credential authenticates a request.
    fn auth(&self) -> &'static dyn Authenticator;

    /// Whether a request without a tenant key is refused (`no_key`) or sent without auth.
    fn requires_key(&self) -> bool {
        true
    }

    /// The prefix keys of `provider` (a provider of this kind, by name) start with, when
    /// known: a registration-time check against pasting the wrong key.
    fn key_prefix(&self, _provider: &str) -> Option<&'static str> {
        None
    }

    /// The cheap authenticated call that checks a key of `provider` (a provider of this kind,
    /// by name) live at registration.
    fn verify_call(&self, _provider: &str) -> Option<VerifyCall> {
        None
    }

    /// The path, below the base URL, of `provider`'s OpenAI-compatible endpoint for `ep`
    /// (a request routed by model goes there with only its `model` rewritten); `None`: it
    /// has none.
    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        Some(match ep {
            CompatEndpoint::Chat => "/v1/chat/completions",
            CompatEndpoint::Embeddings => "/v1/embeddings",
        })
    }

    /// Headers the API requires, set on requests that lack them.
    fn default_headers(&self) -> &'static [(HeaderName, HeaderValue)] {
        &[]
    }

    /// How responses report usage; `None`: not metered.
    fn usage(&self) -> DialectRef;

    /// The shape of its error bodies and stream error events.
    fn errors(&self) -> ErrorShape;

    /// The usage dialect of a request to `path` (below the base URL), for APIs that serve
    /// several wires (Vertex: Gemini's and Anthropic's).
    fn usage_at(&self, _path: &str) -> DialectRef {
        self.usage()
    }

    /// The error shape of a request to `path`, as [`Kind::usage_at`].
    fn errors_at(&self, _path: &str) -> ErrorShape {
        self.errors()
    }

    /// Whether streaming chat requests may be given `stream_options.include_usage` (and
    /// are, unless the provider's config says `stream_usage: false`).
    fn stream_usage(&self) -> bool {
        false
    }

    /// The output-token cap of a JSON request body, for budget estimates, from its
    /// top-level members.
    fn max_output_tokens(&self, member: &Member<'_>) -> Option<u64> {
        ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| member(k)?.as_u64())
    }

    /// The model named in the request path, for APIs that put it there.
    fn path_model(&self, _path: &str) -> Option<String> {
        None
    }

    /// Usage an API reports in response headers rather than the body (Bedrock's `invoke`);
    /// used when the body reported none.
    fn header_usage(&self, _headers: &http::HeaderMap) -> Option<crate::usage::Usage> {
        None
    }

    /// The platform's own credential from the environment (the pod's IAM role), for
    /// `platform_credentials: environment`; `None`: the kind has no such source.
    fn environment_credential(&self) -> Option<EnvCredential> {
        None
    }

    /// Whether its requests are signed over their body (SigV4): the body is then read whole
    /// before it is sent, and its SHA-256 handed to the authenticator.
    fn signs_body(&self) -> bool {
        false
    }

    /// Headers of a client's own request signature, removed before byokd signs anew.
    fn client_signing_headers(&self) -> &'static [HeaderName] {
        &[]
    }

    /// A format check of its own for credentials that are not one key string (a JSON
    /// object); `None`: the generic check. The message never contains the key.
    fn key_format(&self, _key: &str) -> Option<Result<(), String>> {
        None
    }

    /// The masked form `keys list` shows, for credentials that are not one key string.
    fn mask(&self, _key: &str) -> Option<String> {
        None
    }

    /// The base URL when the config gives a region and no `base_url`; `None`: the kind
    /// takes no region.
    fn regional_base_url(&self, _region: &str) -> Option<String> {
        None
    }
}

/// A JSON request body's top-level member by key, parsed; `None` when it has none (or the body
/// is not JSON). Given by the step that read the body, which scans its top level rather than
/// parsing a whole conversation.
pub type Member<'a> = dyn Fn(&str) -> Option<serde_json::Value> + 'a;

/// A credential being fetched from the environment (cached by the kind until near expiry).
pub type EnvCredential =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<AuthValue, String>> + Send>>;

/// What a request-signing authenticator needs besides the head: the provider's region and
/// the body's SHA-256 (lowercase hex). Put in the request's extensions by the attempt loop.
#[derive(Debug, Clone)]
pub struct Signing {
    pub region: Arc<str>,
    pub payload_sha256: String,
}

/// How a credential authenticates a request: it sets a header, or (for request-signing
/// schemes) signs the request as a whole.
pub trait Authenticator: fmt::Debug + Send + Sync {
    /// The credential's ready-to-use form, built once per decryption and cached.
    fn credential(&self, key: &[u8]) -> AuthValue;

    /// Authenticates an upstream request.
    fn authorize(&self, req: &mut request::Parts, cred: &AuthValue) -> Result<(), BadCredential>;

    /// The header it authenticates with, if it is one header.
    fn header(&self) -> Option<&HeaderName>;

    /// For a credential exchanged for a short-lived token before use (OAuth): the token
    /// credential, cached or fetched through `http` from `token_uri` (the config's, or the
    /// kind's default). `project`: the config's, for accounts that name none.
    fn exchange<'a>(
        &'a self,
        _cred: &'a AuthValue,
        _http: &'a dyn TokenHttp,
        _token_uri: Option<&'a str>,
        _project: Option<&'a str>,
    ) -> Option<Exchange<'a>> {
        None
    }
}

/// A credential exchange in flight (see [`Authenticator::exchange`]).
pub type Exchange<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<AuthValue, String>> + Send + 'a>>;

/// The one HTTP call a credential exchange makes: a form POST, answered with the status and
/// a bounded body. The upstream client implements it.
pub trait TokenHttp: Send + Sync {
    fn post_form<'a>(&'a self, url: &'a str, form: &'a str) -> TokenAnswer<'a>;
}

/// A token endpoint's status and (bounded) body, in flight.
pub type TokenAnswer<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(u16, Bytes), String>> + Send + 'a>>;

/// The provider's region or location, for authenticators that use it (Vertex puts it in
/// the path). Put in the request's extensions by the attempt loop.
#[derive(Debug, Clone)]
pub struct Scope {
    pub region: Arc<str>,
}

/// A stored key that cannot be sent (not a valid header value).
#[derive(Debug, thiserror::Error)]
#[error("the stored credential cannot be sent as a header value")]
pub struct BadCredential;

/// A key sent in one header, after a fixed prefix (`Bearer `, or none).
#[derive(Debug)]
pub struct HeaderAuth {
    name: HeaderName,
    prefix: &'static str,
}

impl HeaderAuth {
    pub const fn new(name: HeaderName, prefix: &'static str) -> Self {
        Self { name, prefix }
    }
}

impl Authenticator for HeaderAuth {
    fn credential(&self, key: &[u8]) -> AuthValue {
        AuthValue::new(self.prefix, key)
    }

    fn authorize(&self, req: &mut request::Parts, cred: &AuthValue) -> Result<(), BadCredential> {
        let value = cred.header_value().ok_or(BadCredential)?;
        req.headers.insert(self.name.clone(), value);
        Ok(())
    }

    fn header(&self) -> Option<&HeaderName> {
        Some(&self.name)
    }
}

/// The live key check: a GET of `path` (list models, typically) under the base URL.
#[derive(Debug, Clone, Copy)]
pub struct VerifyCall {
    pub path: &'static str,
    pub query: Option<&'static str>,
}

/// How a provider's SDK expects an error: the body's JSON, and for streams, the `event:`
/// name of an error event if its wire names events.
#[derive(Clone, Copy)]
pub struct ErrorShape {
    body: fn(StatusCode, &str, &str) -> serde_json::Value,
    event: Option<&'static str>,
    /// A binary event stream's error message (Bedrock's), instead of an SSE event.
    frame: Option<fn(&str, &str) -> Bytes>,
}

impl ErrorShape {
    pub const fn new(
        body: fn(StatusCode, &str, &str) -> serde_json::Value,
        event: Option<&'static str>,
    ) -> Self {
        Self {
            body,
            event,
            frame: None,
        }
    }

    /// The stream error of an API whose streams are binary event streams: `frame(code,
    /// message)` is one whole message of that stream.
    pub const fn with_frame(mut self, frame: fn(&str, &str) -> Bytes) -> Self {
        self.frame = Some(frame);
        self
    }

    /// Whether its streams are binary event streams (framed by length, not by blank lines).
    pub fn framed(self) -> bool {
        self.frame.is_some()
    }

    /// A body the provider's own SDK parses, with byokd's stable `code` where the shape has
    /// room for one.
    pub fn error_body(self, status: StatusCode, code: &str, message: &str) -> Vec<u8> {
        serde_json::to_vec(&(self.body)(status, code, message)).unwrap_or_default()
    }

    /// The same error as one SSE event (or event-stream message), to end a stream with.
    pub fn stream_error(self, status: StatusCode, code: &str, message: &str) -> Bytes {
        if let Some(frame) = self.frame {
            return frame(code, message);
        }
        let body = self.error_body(status, code, message);
        let mut ev = Vec::with_capacity(body.len() + 32);
        if let Some(name) = self.event {
            ev.extend_from_slice(b"event: ");
            ev.extend_from_slice(name.as_bytes());
            ev.push(b'\n');
        }
        ev.extend_from_slice(b"data: ");
        ev.extend_from_slice(&body);
        ev.extend_from_slice(b"\n\n");
        Bytes::from(ev)
    }
}

/// Errors before a provider is known (unknown route, bad request) take the OpenAI shape:
/// the SDK most apps use.
impl Default for ErrorShape {
    fn default() -> Self {
        openai::ERRORS
    }
}

impl fmt::Debug for ErrorShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ErrorShape")
            .field("event", &self.event)
            .finish_non_exhaustive()
    }
}

/// Upstream URIs built lately on this thread. Most requests go to a few paths of a few
/// providers, and building a URI (an allocation, a check of every byte, the builder) costs
/// several times a lookup here; a clone shares the built one's bytes. Per thread, so the
/// shared bytes' counts stay in one core's cache. Keyed by what the URI is made of, so a
/// provider replaced by a reload finds only URIs equal to its own.
mod recent_uris {
    use std::cell::RefCell;

    use http::Uri;
    use http::uri::{Authority, Scheme};

    const SLOTS: usize = 8;

    struct Recent {
        uris: [Option<Uri>; SLOTS],
        next: usize,
    }

    thread_local! {
        static RECENT: RefCell<Recent> = const {
            RefCell::new(Recent { uris: [const { None }; SLOTS], next: 0 })
        };
    }

    /// The URI `scheme://authority{prefix}{path}`, if built lately.
    pub(super) fn find(
        scheme: &Scheme,
        authority: &Authority,
        prefix: &str,
        path: &str,
    ) -> Option<Uri> {
        RECENT.with_borrow(|r| {
            r.uris.iter().flatten().find_map(|u| {
                let p = u.path();
                let hit = u.query().is_none()
                    && p.len() == prefix.len() + path.len()
                    && p.starts_with(prefix)
                    && p.ends_with(path)
                    && u.authority()
                        .is_some_and(|a| a.as_str() == authority.as_str())
                    && u.scheme() == Some(scheme);
                hit.then(|| u.clone())
            })
        })
    }

    pub(super) fn keep(uri: &Uri) {
        RECENT.with_borrow_mut(|r| {
            let at = r.next;
            r.uris[at] = Some(uri.clone());
            r.next = (at + 1) % SLOTS;
        });
    }
}

/// One configured upstream.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: Arc<str>,
    pub kind: &'static dyn Kind,
    pub base_url: String,
    scheme: Scheme,
    authority: Authority,
    /// `authority` as a `Host` value, made once: every HTTP/1 request to this provider
    /// carries it.
    host: HeaderValue,
    /// Path of the base URL without a trailing slash ("" or "/api").
    prefix: String,
    /// Add `stream_options.include_usage` to streaming chat requests that lack it (and hide
    /// the result from the app), so streams are metered. Only kinds whose wire has it.
    pub stream_usage: bool,
    /// The cloud region, for kinds that sign requests for one (Bedrock).
    pub region: Option<Arc<str>>,
    /// `platform_credentials: environment`: the `_platform` fallback uses the environment's
    /// credential (the pod's IAM role) instead of a stored key.
    pub platform_from_environment: bool,
    /// The cloud project, for accounts that name none (Vertex).
    pub project: Option<Arc<str>>,
    /// Where credentials are exchanged for tokens, instead of the kind's default (Vertex).
    pub token_uri: Option<Box<str>>,
}

impl Provider {
    pub fn new(name: &str, kind: &'static dyn Kind, base_url: &str) -> Result<Self, String> {
        let mut p = Provider {
            name: Arc::from(name),
            kind,
            base_url: base_url.to_string(),
            scheme: Scheme::HTTPS,
            authority: Authority::from_static("invalid"),
            host: HeaderValue::from_static("invalid"),
            prefix: String::new(),
            stream_usage: kind.stream_usage(),
            region: None,
            platform_from_environment: false,
            project: None,
            token_uri: None,
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
                p.host = HeaderValue::from_str(a.as_str())
                    .map_err(|e| format!("`{base_url}`: its host is not a header value: {e}"))?;
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

    /// The `Host` header for a request whose URI is still this provider's (a signing step
    /// may have sent it elsewhere).
    pub fn host_for(&self, uri: &Uri) -> Option<HeaderValue> {
        uri.authority()
            .is_some_and(|a| a.as_str() == self.authority.as_str())
            .then(|| self.host.clone())
    }

    pub fn error_shape(&self) -> ErrorShape {
        self.kind.errors()
    }

    pub fn auth(&self) -> &'static dyn Authenticator {
        self.kind.auth()
    }

    /// Whether a request without a tenant key is refused (`no_key`) or sent without auth.
    pub fn requires_key(&self) -> bool {
        self.kind.requires_key()
    }

    pub fn dialect(&self) -> DialectRef {
        self.kind.usage()
    }

    /// See [`Kind::openai_compat`].
    pub fn openai_compat(&self, ep: CompatEndpoint) -> Option<&'static str> {
        self.kind.openai_compat(&self.name, ep)
    }

    /// The upstream URI for a request path (already stripped of the `/{provider}` prefix).
    pub fn upstream_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
        if query.is_some() {
            return self.build_uri(path, query);
        }
        if let Some(u) = recent_uris::find(&self.scheme, &self.authority, &self.prefix, path) {
            return Ok(u);
        }
        let uri = self.build_uri(path, None)?;
        recent_uris::keep(&uri);
        Ok(uri)
    }

    fn build_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, http::Error> {
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

    /// What a budget estimate needs from a request: the model (the JSON body's `model`, or
    /// the path for APIs that name it there) and the output-token cap. `member` gives the
    /// body's top-level members (none without a JSON body).
    pub fn model_and_output_cap(
        &self,
        member: &Member<'_>,
        path: &str,
    ) -> (Option<String>, Option<u64>) {
        let model = match member("model") {
            Some(serde_json::Value::String(m)) => Some(m),
            _ => self.kind.path_model(path),
        };
        (model, self.kind.max_output_tokens(member))
    }

    /// The masked form of a key of this provider.
    pub fn mask_key(&self, key: &str) -> String {
        self.kind.mask(key).unwrap_or_else(|| mask(key))
    }

    /// Registration-time format check; the message never contains the key.
    pub fn check_key_format(&self, key: &str) -> Result<(), String> {
        if let Some(r) = self.kind.key_format(key) {
            return r;
        }
        if key.len() < 8 || key.len() > 1024 {
            return Err("a provider key is 8 to 1024 characters long".into());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a provider key is printable ASCII without spaces".into());
        }
        match self.kind.key_prefix(&self.name) {
            Some(p) if !key.starts_with(p) => Err(format!(
                "keys for `{}` start with `{p}`; check that you pasted the right key",
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

/// The built-in providers. One with an empty base URL is kept out of the config unless the
/// config gives it one.
pub fn builtins() -> Vec<Provider> {
    BUILTINS
        .iter()
        .filter_map(|(name, k, url)| Provider::new(name, kind(k)?, url).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_keeps_path_and_query_under_the_base_prefix() {
        let p = Provider::new(
            "openrouter",
            kind("openai").unwrap(),
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
    fn upstream_uris_built_lately_are_reused_only_for_the_same_target() {
        let openai = kind("openai").unwrap();
        let a = Provider::new("a", openai, "https://a.example/api").unwrap();
        let a_http = Provider::new("a2", openai, "http://a.example/api").unwrap();
        let b = Provider::new("b", openai, "https://b.example").unwrap();
        let b_deeper = Provider::new("b2", openai, "https://b.example/v1").unwrap();
        // More paths than the cache holds, twice over: every answer is still its own.
        for round in 0..2 {
            for i in 0..12 {
                let path = format!("/v1/p{i}");
                for (p, want) in [
                    (&a, format!("https://a.example/api/v1/p{i}")),
                    (&a_http, format!("http://a.example/api/v1/p{i}")),
                    (&b, format!("https://b.example/v1/p{i}")),
                    (&b_deeper, format!("https://b.example/v1/v1/p{i}")),
                ] {
                    let u = p.upstream_uri(&path, None).unwrap();
                    assert_eq!(u.to_string(), want, "round {round}");
                }
            }
        }
        // The same path with a query is not the cached query-less one.
        let u = a.upstream_uri("/v1/p11", Some("x=1")).unwrap();
        assert_eq!(u.to_string(), "https://a.example/api/v1/p11?x=1");
        // A prefix and path that split differently but join the same are the same target.
        let split = Provider::new("c", openai, "https://b.example/v1/v1").unwrap();
        let u = split.upstream_uri("/p3", None).unwrap();
        assert_eq!(u.to_string(), "https://b.example/v1/v1/p3");
    }

    #[test]
    fn compatible_hosts_check_their_documented_key_shapes() {
        let by_name = |n: &str| builtins().into_iter().find(|p| &*p.name == n).unwrap();
        for (name, good, bad) in [
            ("xai", "xai-0123456789abcdef", "sk-0123456789abcdef"),
            ("perplexity", "pplx-0123456789abcdef", "sk-0123456789abcdef"),
            ("cerebras", "csk-0123456789abcdef", "sk-0123456789abcdef"),
            ("elevenlabs", "sk_0123456789abcdef", "xi-0123456789abcdef"),
        ] {
            let p = by_name(name);
            assert!(p.check_key_format(good).is_ok(), "{name}");
            let err = p.check_key_format(bad).unwrap_err();
            assert!(err.contains(name), "{name}: {err}");
        }
        // Fireworks documents no key shape: any printable key of a sane length passes.
        assert!(
            by_name("fireworks")
                .check_key_format("fw_abcdefghij")
                .is_ok()
        );
        assert!(
            by_name("fireworks")
                .check_key_format("0123456789abcdef")
                .is_ok()
        );
        // Perplexity has no cheap authenticated GET to verify a key with; the others list models.
        assert!(
            by_name("perplexity")
                .kind
                .verify_call("perplexity")
                .is_none()
        );
        for name in ["xai", "fireworks", "cerebras"] {
            let call = by_name(name).kind.verify_call(name).unwrap();
            assert_eq!(call.path, "/v1/models", "{name}");
        }
        assert!(BUILTINS.len() >= 14);
    }

    #[test]
    fn every_builtin_has_a_kind_and_a_url() {
        let built = builtins();
        for (name, k, _) in BUILTINS {
            assert!(kind(k).is_some(), "{name}: no kind `{k}`");
            assert!(built.iter().any(|p| &*p.name == *name), "{name}");
        }
        assert!(built.iter().any(|p| &*p.name == DEFAULT_PROVIDER));
        let mut names: Vec<&str> = KINDS.iter().map(|k| k.name()).collect();
        names.dedup();
        assert_eq!(names.len(), KINDS.len(), "kind names are unique");
        // Every kind's auth header is stripped from what the app sent.
        for k in KINDS {
            if let Some(h) = k.auth().header() {
                assert!(auth_headers().contains(h), "{}", k.name());
            }
        }
    }

    #[test]
    fn base_url_must_be_absolute_http() {
        assert!(Provider::new("x", kind("openai").unwrap(), "ftp://x").is_err());
        assert!(Provider::new("x", kind("openai").unwrap(), "/relative").is_err());
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
        let b: serde_json::Value =
            serde_json::from_slice(&kind("anthropic").unwrap().errors().error_body(
                StatusCode::UNAUTHORIZED,
                "unknown_tenant",
                "m",
            ))
            .unwrap();
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "authentication_error");
        let b: serde_json::Value = serde_json::from_slice(
            &kind("gemini")
                .unwrap()
                .errors()
                .error_body(StatusCode::FORBIDDEN, "no_key", "m"),
        )
        .unwrap();
        assert_eq!(b["error"]["status"], "PERMISSION_DENIED");
        assert_eq!(b["error"]["code"], 403);
        let b: serde_json::Value = serde_json::from_slice(&ErrorShape::default().error_body(
            StatusCode::NOT_FOUND,
            "unknown_route",
            "m",
        ))
        .unwrap();
        assert_eq!(b["error"]["code"], "unknown_route");
        assert_eq!(b["error"]["message"], "m");
    }

    /// Each kind's output cap, from the members it reads.
    #[test]
    fn output_caps_by_kind() {
        let body = serde_json::json!({
            "max_tokens": 7,
            "generationConfig": {"maxOutputTokens": 9},
            "inferenceConfig": {"maxTokens": 11},
        });
        let member = |k: &str| body.get(k).cloned();
        let cap = |name: &str| kind(name).unwrap().max_output_tokens(&member);
        assert_eq!(cap("openai"), Some(7));
        assert_eq!(cap("anthropic"), Some(7));
        assert_eq!(cap("gemini"), Some(9));
        assert_eq!(cap("vertex"), Some(9));
        assert_eq!(cap("bedrock"), Some(11));
        let only_max_tokens = |k: &str| (k == "max_tokens").then(|| serde_json::json!(5));
        assert_eq!(
            kind("vertex").unwrap().max_output_tokens(&only_max_tokens),
            Some(5)
        );
        let not_a_count = |k: &str| (k == "max_tokens").then(|| serde_json::json!("5"));
        assert_eq!(
            kind("openai").unwrap().max_output_tokens(&not_a_count),
            None
        );
    }
}
