//! Google Vertex AI: Gemini (`publishers/google`) and Anthropic's models
//! (`publishers/anthropic`, `rawPredict` / `streamRawPredict`) under a location's own host.
//! A tenant's credential is its service-account JSON, as Google issues it. byokd exchanges it
//! for an OAuth access token: a JWT signed with the account's RSA key, sent as a JWT-bearer
//! grant to the token endpoint. The token is cached per account until 5 minutes before it
//! expires, fetched by one request while the others wait, and never logged. The request goes
//! to the account's own project, in the configured location.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use dashmap::DashMap;
use http::{HeaderName, request};
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{
    AuthValue, Authenticator, BadCredential, CompatEndpoint, ErrorShape, Exchange, Kind, Member,
    Scope, TokenHttp, mask,
};
use crate::usage::DialectRef;

/// The `vertex` kind.
#[derive(Debug)]
pub struct Vertex;

/// Google's token endpoint, the JWT's audience. A service account's own `token_uri` is not
/// followed: a tenant-supplied URL would make byokd post signed assertions anywhere.
pub const TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Fetched again this long before the token expires.
const MARGIN: Duration = Duration::from_secs(300);

fn anthropic(path: &str) -> bool {
    path.contains("/publishers/anthropic/")
}

impl Kind for Vertex {
    fn name(&self) -> &'static str {
        "vertex"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &OAUTH
    }

    /// Vertex's OpenAI-compatible endpoint; the project and location placeholders are set
    /// per request like any Vertex path (the model is `publisher/model`:
    /// `vertex/google/gemini-2.5-flash`).
    fn openai_compat(&self, _provider: &str, ep: CompatEndpoint) -> Option<&'static str> {
        Some(match ep {
            CompatEndpoint::Chat => "/v1/projects/-/locations/-/endpoints/openapi/chat/completions",
            CompatEndpoint::Embeddings => "/v1/projects/-/locations/-/endpoints/openapi/embeddings",
        })
    }

    fn usage(&self) -> DialectRef {
        super::gemini::Gemini.usage()
    }

    fn errors(&self) -> ErrorShape {
        super::gemini::Gemini.errors()
    }

    fn usage_at(&self, path: &str) -> DialectRef {
        if anthropic(path) {
            super::anthropic::Anthropic.usage()
        } else {
            self.usage()
        }
    }

    fn errors_at(&self, path: &str) -> ErrorShape {
        if anthropic(path) {
            super::anthropic::Anthropic.errors()
        } else {
            self.errors()
        }
    }

    fn max_output_tokens(&self, member: &Member<'_>) -> Option<u64> {
        super::gemini::Gemini
            .max_output_tokens(member)
            .or_else(|| member("max_tokens")?.as_u64())
    }

    /// `.../models/{model}:generateContent`.
    fn path_model(&self, path: &str) -> Option<String> {
        let m = path.split("/models/").nth(1)?.split(':').next()?;
        (!m.is_empty()).then(|| m.to_string())
    }

    fn key_format(&self, key: &str) -> Option<Result<(), String>> {
        Some(match serde_json::from_str::<ServiceAccount<'_>>(key) {
            Ok(sa) if sa.kind == "service_account" && sa.signing_key().is_some() => Ok(()),
            Ok(_) => Err(
                "a Vertex credential is a service-account JSON with `type: service_account` and a PKCS#8 `private_key`"
                    .into(),
            ),
            Err(_) => Err("a Vertex credential is the service-account JSON file Google issues".into()),
        })
    }

    /// The account's email, never the key.
    fn mask(&self, key: &str) -> Option<String> {
        let sa: ServiceAccount<'_> = serde_json::from_str(key).ok()?;
        Some(mask(sa.client_email))
    }

    /// `location: global` has no location in its host.
    fn regional_base_url(&self, location: &str) -> Option<String> {
        Some(if location == "global" {
            "https://aiplatform.googleapis.com".into()
        } else {
            format!("https://{location}-aiplatform.googleapis.com")
        })
    }
}

/// The fields of a service-account JSON byokd reads, borrowed from the decrypted buffer.
#[derive(Deserialize)]
struct ServiceAccount<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    project_id: Option<&'a str>,
    #[serde(default)]
    private_key_id: Option<&'a str>,
    /// PEM, with its newlines escaped in JSON: decoded into a zeroizing buffer.
    private_key: String,
    client_email: &'a str,
}

impl Drop for ServiceAccount<'_> {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl ServiceAccount<'_> {
    fn signing_key(&self) -> Option<aws_lc_rs::signature::RsaKeyPair> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(self.private_key.as_bytes()).ok()?;
        aws_lc_rs::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).ok()
    }

    /// The JWT-bearer assertion for `aud`, signed RS256.
    fn assertion(&self, aud: &str) -> Option<Zeroizing<String>> {
        let key = self.signing_key()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": self.private_key_id});
        let claims = serde_json::json!({
            "iss": self.client_email, "scope": SCOPE, "aud": aud,
            "iat": now, "exp": now + 3600,
        });
        let mut jwt = format!(
            "{}.{}",
            B64URL.encode(header.to_string()),
            B64URL.encode(claims.to_string())
        );
        let mut sig = vec![0u8; key.public_modulus_len()];
        key.sign(
            &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            jwt.as_bytes(),
            &mut sig,
        )
        .ok()?;
        jwt.push('.');
        jwt.push_str(&B64URL.encode(sig));
        Some(Zeroizing::new(jwt))
    }
}

static OAUTH: OAuth = OAuth;

/// A service account exchanged for an access token; the token goes in `Authorization`.
#[derive(Debug)]
struct OAuth;

/// Tokens per service account (email and key id): the token credential and when to fetch
/// again. The lock per account is held across a fetch: one fetch, the others wait.
type Tokens = DashMap<Box<str>, Arc<tokio::sync::Mutex<Option<(AuthValue, Instant)>>>>;
static TOKENS: LazyLock<Tokens> = LazyLock::new(DashMap::new);

/// Borrowed from the (bounded) answer: the token is copied once, into the credential.
#[derive(Deserialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    expires_in: u64,
}

impl Authenticator for OAuth {
    fn credential(&self, key: &[u8]) -> AuthValue {
        AuthValue::new("", key)
    }

    /// The exchanged credential is `PROJECT\nBearer TOKEN`: the project the request goes to,
    /// and the header value.
    fn exchange<'a>(
        &'a self,
        cred: &'a AuthValue,
        http: &'a dyn TokenHttp,
        token_uri: Option<&'a str>,
        project: Option<&'a str>,
    ) -> Option<Exchange<'a>> {
        Some(Box::pin(async move {
            let sa: ServiceAccount<'_> = serde_json::from_slice(cred.expose())
                .map_err(|_| "the stored credential is not a service-account JSON".to_string())?;
            let id = format!("{}\n{}", sa.client_email, sa.private_key_id.unwrap_or(""));
            let slot = TOKENS.entry(id.into_boxed_str()).or_default().clone();
            let mut slot = slot.lock().await;
            if let Some((v, until)) = &*slot
                && Instant::now() < *until
            {
                return Ok(v.clone());
            }
            let uri = token_uri.unwrap_or(TOKEN_URI);
            let assertion = sa
                .assertion(uri)
                .ok_or("the service account's private key cannot sign (not RSA PKCS#8)")?;
            let form = Zeroizing::new(
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer")
                    .append_pair("assertion", &assertion)
                    .finish(),
            );
            let (status, body) = http.post_form(uri, &form).await?;
            if status != 200 {
                // The token endpoint's error names the problem (a disabled or deleted key)
                // and holds no secret.
                let why = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                return Err(format!("token endpoint answered {status}: {why}"));
            }
            let t: TokenAnswer<'_> = serde_json::from_slice(&body)
                .map_err(|_| "the token endpoint's answer has no access_token".to_string())?;
            let project = sa.project_id.or(project).unwrap_or("");
            let mut v =
                Zeroizing::new(Vec::with_capacity(project.len() + t.access_token.len() + 8));
            v.extend_from_slice(project.as_bytes());
            v.extend_from_slice(b"\nBearer ");
            v.extend_from_slice(t.access_token.as_bytes());
            let value = AuthValue::new("", &v);
            let life = Duration::from_secs(t.expires_in).saturating_sub(MARGIN);
            *slot = Some((value.clone(), Instant::now() + life));
            Ok(value)
        }))
    }

    fn authorize(&self, req: &mut request::Parts, cred: &AuthValue) -> Result<(), BadCredential> {
        let raw = cred.expose();
        let nl = memchr::memchr(b'\n', raw).ok_or(BadCredential)?;
        let project = &raw[..nl];
        let h = cred.header_value_from(nl + 1).ok_or(BadCredential)?;
        req.headers.insert(http::header::AUTHORIZATION, h);
        // The account's own project, in the configured location, whatever the app's SDK put
        // in the path (it need not know either).
        let project = std::str::from_utf8(project).map_err(|_| BadCredential)?;
        let location = req.extensions.get::<Scope>().map(|s| s.region.clone());
        if let Some(path) = in_project(req.uri.path(), project, location.as_deref()) {
            let pq = match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            let mut parts = req.uri.clone().into_parts();
            parts.path_and_query = Some(pq.parse().map_err(|_| BadCredential)?);
            req.uri = http::Uri::from_parts(parts).map_err(|_| BadCredential)?;
        }
        Ok(())
    }

    fn header(&self) -> Option<&HeaderName> {
        None
    }
}

/// `path` with its `projects/P/locations/L` segments set to `project` and `location`;
/// `None` when it has none or they already match.
fn in_project(path: &str, project: &str, location: Option<&str>) -> Option<String> {
    let mut segs: Vec<&str> = path.split('/').collect();
    let p = segs.iter().position(|s| *s == "projects")?;
    let mut changed = false;
    if !project.is_empty() && segs.get(p + 1).is_some_and(|s| *s != project) {
        segs[p + 1] = project;
        changed = true;
    }
    if let Some(l) = location
        && segs.get(p + 2) == Some(&"locations")
        && segs.get(p + 3).is_some_and(|s| *s != l)
    {
        segs[p + 3] = l;
        changed = true;
    }
    changed.then(|| segs.join("/"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_path_goes_to_the_accounts_project_and_the_configured_location() {
        let p = "/v1beta1/projects/app-side/locations/us-east5/publishers/anthropic/models/claude:rawPredict";
        assert_eq!(
            in_project(p, "tenant-proj", Some("europe-west1")).unwrap(),
            "/v1beta1/projects/tenant-proj/locations/europe-west1/publishers/anthropic/models/claude:rawPredict"
        );
        assert_eq!(in_project("/v1/models", "x", None), None);
        assert_eq!(
            in_project("/v1/projects/x/locations/l/m", "x", Some("l")),
            None
        );
    }

    #[test]
    fn the_model_comes_from_the_path_and_the_dialect_from_the_publisher() {
        let g =
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-flash:generateContent";
        assert_eq!(Vertex.path_model(g).as_deref(), Some("gemini-2.5-flash"));
        let a = "/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict";
        assert_eq!(
            Vertex.path_model(a).as_deref(),
            Some("claude-sonnet-4-5@20250929")
        );
        assert!(std::ptr::addr_eq(
            Vertex.usage_at(a).unwrap(),
            super::super::anthropic::Anthropic.usage().unwrap()
        ));
    }
}
