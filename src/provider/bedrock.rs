//! Amazon Bedrock's runtime API (`/model/{id}/converse`, `converse-stream`, `invoke`,
//! `invoke-with-response-stream`). A tenant's credential is an AWS access key (the JSON object
//! `{"access_key_id", "secret_access_key", "session_token"?}`) with which byokd signs each
//! request anew with SigV4, after removing the client's own signature; or a Bedrock API key,
//! sent as a bearer token. Usage comes from the Converse answer's `usage`.

use std::sync::LazyLock;
use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http::{HeaderName, HeaderValue, StatusCode, request};
use memchr::memmem;
use serde::Deserialize;

use super::{
    AuthValue, Authenticator, BadCredential, CompatEndpoint, ErrorShape, Kind, Member, Signing,
    mask,
};
use crate::usage::bytes::usage_in_tail;
use crate::usage::{Dialect, DialectRef, StreamState, Usage, UsageObject};

/// The `bedrock` kind.
#[derive(Debug)]
pub struct Bedrock;

/// The signing name of the Bedrock runtime.
const SERVICE: &str = "bedrock";

static SIGNING_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static("x-amz-date"),
    HeaderName::from_static("x-amz-security-token"),
    HeaderName::from_static("x-amz-content-sha256"),
];

impl Kind for Bedrock {
    fn name(&self) -> &'static str {
        "bedrock"
    }

    fn auth(&self) -> &'static dyn Authenticator {
        &SIGV4
    }

    /// Bedrock's OpenAI-compatible endpoint serves only some models; `/v1` by model is
    /// refused with the native route named.
    fn openai_compat(&self, _provider: &str, _ep: CompatEndpoint) -> Option<&'static str> {
        None
    }

    fn usage(&self) -> DialectRef {
        Some(&DIALECT)
    }

    fn errors(&self) -> ErrorShape {
        ERRORS
    }

    /// Converse's `inferenceConfig.maxTokens`.
    fn max_output_tokens(&self, member: &Member<'_>) -> Option<u64> {
        member("inferenceConfig")?.get("maxTokens")?.as_u64()
    }

    /// `/model/{id}/...`, the id percent-decoded (an ARN is sent encoded).
    fn path_model(&self, path: &str) -> Option<String> {
        let id = path.strip_prefix("/model/")?.split('/').next()?;
        let decoded: String = form_urlencoded::parse(format!("m={id}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())?;
        (!decoded.is_empty()).then_some(decoded)
    }

    fn signs_body(&self) -> bool {
        true
    }

    /// `invoke` answers in the model's own format; Bedrock counts its tokens in headers.
    fn header_usage(&self, headers: &http::HeaderMap) -> Option<Usage> {
        let n = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let input = n("x-amzn-bedrock-input-token-count");
        let output = n("x-amzn-bedrock-output-token-count");
        if input.is_none() && output.is_none() {
            return None;
        }
        let mut u = Usage {
            found: true,
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            cached_input: n("x-amzn-bedrock-cache-read-input-token-count").unwrap_or(0),
            cache_write: n("x-amzn-bedrock-cache-write-input-token-count").unwrap_or(0),
            ..Usage::default()
        };
        u.clamp_tokens();
        Some(u)
    }

    fn client_signing_headers(&self) -> &'static [HeaderName] {
        &SIGNING_HEADERS
    }

    fn key_format(&self, key: &str) -> Option<Result<(), String>> {
        if !key.starts_with('{') {
            return None;
        }
        Some(match serde_json::from_str::<AwsKey>(key) {
            Ok(k) if valid_key_id(k.access_key_id) && !k.secret_access_key.is_empty() => Ok(()),
            Ok(_) => Err("access_key_id is 16 to 128 letters and digits, and secret_access_key is required".into()),
            Err(_) => Err(
                r#"a Bedrock credential is an API key, or {"access_key_id": "...", "secret_access_key": "...", "session_token": "..."} (session_token optional)"#
                    .into(),
            ),
        })
    }

    /// An access key shows its key id's ends, as AWS's console does; never the secret.
    fn mask(&self, key: &str) -> Option<String> {
        let k: AwsKey = serde_json::from_str(key).ok()?;
        Some(mask(k.access_key_id))
    }

    fn regional_base_url(&self, region: &str) -> Option<String> {
        Some(format!("https://bedrock-runtime.{region}.amazonaws.com"))
    }

    fn environment_credential(&self) -> Option<super::EnvCredential> {
        Some(Box::pin(environment::credential()))
    }
}

/// The platform's own AWS credential from the standard chain (environment variables, the
/// web identity token IRSA mounts, the container or instance role): no stored secret.
mod environment {
    use std::time::{Duration, SystemTime};

    use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
    use tokio::sync::{Mutex, OnceCell};
    use zeroize::Zeroizing;

    use super::AuthValue;

    /// Refreshed this long before the credential expires; one with no expiry (environment
    /// variables) is read again after this long.
    const MARGIN: Duration = Duration::from_secs(300);

    static CHAIN: OnceCell<Option<SharedCredentialsProvider>> = OnceCell::const_new();
    /// One fetch at a time: concurrent requests wait for it instead of each asking STS.
    static CACHED: Mutex<Option<(AuthValue, SystemTime)>> = Mutex::const_new(None);

    pub(super) async fn credential() -> Result<AuthValue, String> {
        let mut cached = CACHED.lock().await;
        if let Some((v, until)) = &*cached
            && SystemTime::now() < *until
        {
            return Ok(v.clone());
        }
        let chain = CHAIN
            .get_or_init(|| async {
                aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .load()
                    .await
                    .credentials_provider()
            })
            .await
            .as_ref()
            .ok_or("no AWS credential chain in this environment")?;
        let c = chain
            .provide_credentials()
            .await
            .map_err(|e| format!("AWS credential chain: {e}"))?;
        // The same JSON a tenant registers, so one signer serves both; written into one
        // zeroizing buffer large enough never to move (a session token is about 1 KiB).
        #[derive(serde::Serialize)]
        struct Key<'a> {
            access_key_id: &'a str,
            secret_access_key: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            session_token: Option<&'a str>,
        }
        let mut json = Zeroizing::new(Vec::with_capacity(8192));
        serde_json::to_writer(
            &mut *json,
            &Key {
                access_key_id: c.access_key_id(),
                secret_access_key: c.secret_access_key(),
                session_token: c.session_token(),
            },
        )
        .map_err(|e| format!("AWS credential: {e}"))?;
        let value = AuthValue::new("", &json);
        let until = c
            .expiry()
            .and_then(|e| e.checked_sub(MARGIN))
            .unwrap_or_else(|| SystemTime::now() + MARGIN);
        *cached = Some((value.clone(), until));
        Ok(value)
    }
}

fn valid_key_id(id: &str) -> bool {
    (16..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A stored AWS access key, borrowed from the decrypted key's own (zeroizing) buffer, so
/// parsing makes no copy of the secret. A JSON escape inside a value is refused at
/// registration: it would need one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AwsKey<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    #[serde(default)]
    session_token: Option<&'a str>,
}

static SIGV4: SigV4 = SigV4;

/// SigV4 with the tenant's access key, or a Bedrock API key as a bearer token.
#[derive(Debug)]
struct SigV4;

impl Authenticator for SigV4 {
    /// An API key becomes its `Bearer` header value once per decryption, as a header key
    /// does; an access key stays the JSON it signs with.
    fn credential(&self, key: &[u8]) -> AuthValue {
        if key.first() == Some(&b'{') {
            AuthValue::new("", key)
        } else {
            AuthValue::new("Bearer ", key)
        }
    }

    fn authorize(&self, req: &mut request::Parts, cred: &AuthValue) -> Result<(), BadCredential> {
        let raw = cred.expose();
        if raw.first() != Some(&b'{') {
            let h = cred.header_value().ok_or(BadCredential)?;
            req.headers.insert(http::header::AUTHORIZATION, h);
            return Ok(());
        }
        // Parsed per request rather than cached: the parsed strings would be a second copy
        // of the secret to keep and wipe, for a parse of some 150 bytes.
        let key: AwsKey = serde_json::from_slice(raw).map_err(|_| BadCredential)?;
        let signing = req
            .extensions
            .get::<Signing>()
            .ok_or(BadCredential)?
            .clone();
        req.headers.insert(
            HeaderName::from_static("x-amz-content-sha256"),
            HeaderValue::from_str(&signing.payload_sha256).map_err(|_| BadCredential)?,
        );
        let identity = aws_credential_types::Credentials::new(
            key.access_key_id,
            key.secret_access_key,
            key.session_token.map(str::to_string),
            None,
            "byokd",
        )
        .into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&signing.region)
            .name(SERVICE)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|_| BadCredential)?
            .into();
        let uri = req.uri.to_string();
        // Host is not in the head yet (the client sets it from the URI): sign it as it will go.
        let host = req.uri.authority().map(|a| a.as_str().to_string());
        let mut headers: Vec<(&str, &str)> = Vec::with_capacity(req.headers.len() + 1);
        if let Some(h) = &host {
            headers.push(("host", h));
        }
        for (k, v) in &req.headers {
            headers.push((k.as_str(), v.to_str().map_err(|_| BadCredential)?));
        }
        let signable = SignableRequest::new(
            req.method.as_str(),
            &uri,
            headers.into_iter(),
            SignableBody::Precomputed(signing.payload_sha256.clone()),
        )
        .map_err(|_| BadCredential)?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|_| BadCredential)?
            .into_parts();
        let (new_headers, _) = instructions.into_parts();
        for h in new_headers {
            let name = HeaderName::from_bytes(h.name().as_bytes()).map_err(|_| BadCredential)?;
            let mut value = HeaderValue::from_str(h.value()).map_err(|_| BadCredential)?;
            value.set_sensitive(h.sensitive());
            req.headers.insert(name, value);
        }
        Ok(())
    }

    /// Not one header: `authorization` (signature or bearer) is already stripped as the
    /// OpenAI kind's, and the `x-amz-*` ones as [`Kind::client_signing_headers`].
    fn header(&self) -> Option<&HeaderName> {
        None
    }
}

const ERRORS: ErrorShape = ErrorShape::new(error_body, None).with_frame(exception_frame);

/// An event-stream exception message, as Bedrock ends a stream that fails: the SDK raises it
/// as an error of that type (`throttlingException`: the tenant's budget is a quota).
fn exception_frame(code: &str, message: &str) -> bytes::Bytes {
    use aws_smithy_types::event_stream::{Header, HeaderValue as Hv, Message};
    let payload = serde_json::json!({ "message": message, "code": code }).to_string();
    let msg = Message::new(payload.into_bytes())
        .add_header(Header::new(":message-type", Hv::String("exception".into())))
        .add_header(Header::new(
            ":exception-type",
            Hv::String("throttlingException".into()),
        ))
        .add_header(Header::new(
            ":content-type",
            Hv::String("application/json".into()),
        ));
    let mut out = Vec::with_capacity(256);
    match aws_smithy_eventstream::frame::write_message_to(&msg, &mut out) {
        Ok(()) => out.into(),
        Err(_) => bytes::Bytes::new(),
    }
}

/// The AWS JSON error body the SDKs read: `message`, with the error type beside it.
fn error_body(_status: StatusCode, code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "message": message, "__type": code })
}

static DIALECT: Converse = Converse;

#[derive(Debug)]
struct Converse;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConverseUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_write_input_tokens: Option<u64>,
}

impl UsageObject for ConverseUsage {}

fn apply(usage: &mut Usage, c: &ConverseUsage) {
    // A `usage` in a model's own format (an `invoke` answer) is not Converse's: its tokens
    // are in the response headers instead.
    if c.input_tokens.is_none() && c.output_tokens.is_none() {
        return;
    }
    usage.found = true;
    usage.input = c.input_tokens.unwrap_or(0);
    usage.output = c.output_tokens.unwrap_or(0);
    usage.cached_input = c.cache_read_input_tokens.unwrap_or(0);
    usage.cache_write = c.cache_write_input_tokens.unwrap_or(0);
    usage.clamp_tokens();
}

const USAGE_KEY: &[u8] = b"\"usage\"";
const METRICS_KEY: &[u8] = b"\"amazon-bedrock-invocationMetrics\"";

static KEY: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(USAGE_KEY));

/// What Bedrock adds to the last chunk of an `invoke-with-response-stream`, whatever the
/// model's own format.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvocationMetrics {
    input_token_count: Option<u64>,
    output_token_count: Option<u64>,
    cache_read_input_token_count: Option<u64>,
    cache_write_input_token_count: Option<u64>,
}

impl UsageObject for InvocationMetrics {}

/// A `chunk` event's payload: the model's own event, base64 in `bytes`.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    bytes: &'a str,
}

impl Dialect for Converse {
    /// Event-stream messages: Converse's `metadata` (usage) and invoke's `chunk` (the
    /// model's events, the last with Bedrock's invocation metrics).
    fn usage_events(&self) -> &'static [&'static [u8]] {
        &[b"metadata", b"chunk"]
    }

    fn event(&self, s: &mut StreamState, data: &[u8]) {
        if let Ok(c) = serde_json::from_slice::<Chunk<'_>>(data) {
            use base64::Engine as _;
            let Ok(inner) = base64::engine::general_purpose::STANDARD.decode(c.bytes) else {
                return;
            };
            if memmem::find(&inner, METRICS_KEY).is_some()
                && let Some(m) = usage_in_tail::<InvocationMetrics>(&inner, METRICS_KEY)
            {
                apply(
                    &mut s.usage,
                    &ConverseUsage {
                        input_tokens: m.input_token_count,
                        output_tokens: m.output_token_count,
                        cache_read_input_tokens: m.cache_read_input_token_count,
                        cache_write_input_tokens: m.cache_write_input_token_count,
                    },
                );
            }
            return;
        }
        if KEY.find(data).is_some()
            && let Some(c) = usage_in_tail::<ConverseUsage>(data, USAGE_KEY)
        {
            apply(&mut s.usage, &c);
        }
    }

    /// The answer names no model: the meter takes it from the path.
    fn json(&self, u: &mut Usage, _head: &[u8], tail: &[u8]) {
        if let Some(c) = usage_in_tail::<ConverseUsage>(tail, USAGE_KEY) {
            apply(u, &c);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_access_key_or_an_api_key_is_accepted_and_masked_by_its_key_id() {
        let json = r#"{"access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}"#;
        assert_eq!(Bedrock.key_format(json), Some(Ok(())));
        assert_eq!(Bedrock.mask(json).as_deref(), Some("AKI...MPLE"));
        assert!(
            Bedrock
                .key_format("ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl")
                .is_none()
        );
        for bad in [
            r#"{"access_key_id": "short", "secret_access_key": "x"}"#,
            r#"{"access_key_id": "AKIAIOSFODNN7EXAMPLE"}"#,
            r#"{"access_key_id": "AKIAIOSFODNN7EXAMPLE", "secret_access_key": "s", "extra": 1}"#,
        ] {
            let e = Bedrock.key_format(bad).unwrap().unwrap_err();
            assert!(!e.contains("wJal") && !e.contains("EXAMPLE"), "{e}");
        }
    }

    #[test]
    fn the_model_comes_from_the_path_decoded() {
        assert_eq!(
            Bedrock
                .path_model("/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse")
                .as_deref(),
            Some("anthropic.claude-3-5-haiku-20241022-v1:0")
        );
        assert_eq!(
            Bedrock
                .path_model(
                    "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fx/invoke"
                )
                .as_deref(),
            Some("arn:aws:bedrock:us-east-1:1:inference-profile/x")
        );
        assert_eq!(Bedrock.path_model("/other"), None);
    }
}
