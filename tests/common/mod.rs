//! Test harness: an in-process fake provider that speaks the real wire formats (JSON and SSE,
//! paced) and records what it received, a byokd started in-process on port 0, and a client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod bin;
pub mod faults;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use byokd::config::Config;
use byokd::keys::PlainKey;
use byokd::keys::manage::{self, NewKey};

/// One request as the fake provider saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

/// State shared between the fake and the test.
#[derive(Debug, Default)]
pub struct FakeState {
    pub seen: Mutex<Vec<Seen>>,
    /// Streams whose body was dropped before the last event was sent.
    pub cancelled: Mutex<u32>,
    pub completed: Mutex<u32>,
    /// AWS access keys the fake knows (key id => secret): a SigV4-signed request under one
    /// of them is checked with botocore and refused 403 if its signature is wrong, as
    /// Bedrock does.
    pub aws_secrets: Mutex<std::collections::HashMap<String, String>>,
    /// Service accounts the token endpoint knows (email => PKCS#8 DER of its key): a grant
    /// whose JWT is not signed by that key, or is for another audience, is refused.
    pub google_keys: Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

impl FakeUpstream {
    /// Makes the token endpoint accept grants of this service account, signed by this key.
    pub fn know_google_key(&self, email: &str, pkcs8_der: &[u8]) {
        self.state
            .google_keys
            .lock()
            .unwrap()
            .insert(email.into(), pkcs8_der.to_vec());
    }

    /// Makes the fake check SigV4 signatures made with this access key.
    pub fn know_aws_key(&self, key_id: &str, secret: &str) {
        self.state
            .aws_secrets
            .lock()
            .unwrap()
            .insert(key_id.into(), secret.into());
    }
}

/// Google's check of a JWT-bearer grant: RS256 by the account's key (PKCS#1 v1.5 is
/// deterministic, so signing the same input with the key gives the same signature), for
/// this token endpoint, for an hour at most, with a scope. `None`: an unknown account.
fn jwt_grant_valid(state: &FakeState, body: &[u8], aud: &str) -> Option<bool> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(body).into_owned().collect();
    if form.get("grant_type")? != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return Some(false);
    }
    let jwt = form.get("assertion")?;
    let (signed, sig) = jwt.rsplit_once('.')?;
    let claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(signed.split('.').nth(1)?).ok()?).ok()?;
    let key = state
        .google_keys
        .lock()
        .unwrap()
        .get(claims["iss"].as_str()?)
        .cloned()?;
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&key).ok()?;
    let mut expect = vec![0; pair.public_modulus_len()];
    pair.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut expect,
    )
    .ok()?;
    let life = claims["exp"].as_u64()? as i64 - claims["iat"].as_u64()? as i64;
    Some(
        b64.encode(expect) == sig
            && claims["aud"] == aud
            && (1..=3600).contains(&life)
            && claims["scope"].as_str().is_some_and(|s| !s.is_empty()),
    )
}

/// Bedrock's check of a SigV4 signature, with an independent implementation (botocore):
/// `Some(false)` for a wrong one, `None` for a request not signed with a known key.
async fn sigv4_valid(
    state: &FakeState,
    parts: &http::request::Parts,
    body: &Bytes,
    base: &str,
) -> Option<bool> {
    use base64::Engine as _;
    let auth = parts.headers.get("authorization")?.to_str().ok()?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 Credential=")?;
    let (scope, rest) = rest.split_once(", SignedHeaders=")?;
    let (signed, signature) = rest.split_once(", Signature=")?;
    let parts_of_scope: Vec<&str> = scope.split('/').collect();
    let secret = state
        .aws_secrets
        .lock()
        .unwrap()
        .get(parts_of_scope[0])
        .cloned()?;
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let url = match parts.uri.query() {
        Some(q) => format!("{base}{}?{q}", parts.uri.path()),
        None => format!("{base}{}", parts.uri.path()),
    };
    let input = serde_json::json!({
        "method": parts.method.as_str(), "url": url, "headers": headers,
        "signed": signed.split(';').collect::<Vec<_>>(),
        "body_b64": base64::engine::general_purpose::STANDARD.encode(body),
        "access_key_id": parts_of_scope[0], "secret": secret,
        "session_token": parts.headers.get("x-amz-security-token").and_then(|v| v.to_str().ok()),
        "region": parts_of_scope[2], "service": parts_of_scope[3],
        "amz_date": parts.headers.get("x-amz-date")?.to_str().ok()?,
        "signature": signature,
    });
    let script = format!("{}/tests/sdk/sigv4_check.py", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 with botocore (.ci/deps)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    Some(String::from_utf8_lossy(&out.stdout).trim() == "ok")
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub state: Arc<FakeState>,
}

impl FakeUpstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen()
            .pop()
            .expect("the fake provider received no request")
    }
}

type FakeBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(status: u16, ct: &str, body: impl Into<Bytes>) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header("content-type", ct)
        .header("connection", "keep-alive")
        .header("keep-alive", "timeout=5")
        .header("x-fake-provider", "1")
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

/// Drop guard counting streams that ended early.
struct StreamGuard {
    state: Arc<FakeState>,
    done: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.done {
            *self.state.completed.lock().unwrap() += 1;
        } else {
            *self.state.cancelled.lock().unwrap() += 1;
        }
    }
}

fn sse(state: Arc<FakeState>, events: Vec<String>, pace: Duration) -> Response<FakeBody> {
    let stream = async_stream(state, events.into_iter().map(Bytes::from).collect(), pace);
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

/// Bedrock's binary event stream, one message per frame, `pace` apart.
fn amazon_stream(state: Arc<FakeState>, body: Vec<u8>, pace: Duration) -> Response<FakeBody> {
    let mut frames = Vec::new();
    let mut rest = &body[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        frames.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/vnd.amazon.eventstream")
        .body(StreamBody::new(async_stream(state, frames, pace)).boxed())
        .unwrap()
}

fn async_stream(
    state: Arc<FakeState>,
    events: Vec<Bytes>,
    pace: Duration,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        let mut guard = StreamGuard { state, done: false };
        let n = events.len();
        for (i, e) in events.into_iter().enumerate() {
            if tx.send(e).await.is_err() {
                return;
            }
            if i + 1 < n && !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        guard.done = true;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
}

pub const OPENAI_USAGE: (u64, u64, u64, u64) = (120, 100, 30, 10);

/// An OpenAI chat stream as OpenAI sends it (2025 shape: `service_tier`,
/// `system_fingerprint`, and `obfuscation` padding after `usage`): with `include_usage`, every
/// chunk carries `"usage":null` and a last usage-only chunk follows; without it, neither
/// appears. The padding is fixed per chunk here so streams can be compared byte for byte.
pub fn openai_events(n: usize, model: &str, include_usage: bool) -> Vec<String> {
    let null = if include_usage { ",\"usage\":null" } else { "" };
    let mut v = Vec::new();
    for i in 0..n {
        v.push(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}]{null},\"obfuscation\":\"pad{i}\"}}\n\n"
        ));
    }
    if include_usage {
        v.push(format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"{model}\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_1\",\"choices\":[],\"usage\":{{\"prompt_tokens\":120,\"completion_tokens\":30,\"total_tokens\":150,\"prompt_tokens_details\":{{\"cached_tokens\":100}},\"completion_tokens_details\":{{\"reasoning_tokens\":10}}}},\"obfuscation\":\"padu\"}}\n\n"
        ));
    }
    v.push("data: [DONE]\n\n".into());
    v
}

/// A Responses API stream (`/v1/responses`, `stream: true`): named events, usage only in
/// `response.completed` (`input_tokens` and `output_tokens` include the cached and reasoning
/// parts).
pub fn responses_events(model: &str) -> Vec<String> {
    vec![
        format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"sequence_number\":0,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"{model}\",\"output\":[],\"usage\":null}}}}\n\n"
        ),
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi \\\"usage\\\": {}\"}\n\n".to_string(),
        format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"{model}\",\"output\":[{{\"type\":\"message\",\"id\":\"msg_1\",\"status\":\"completed\",\"role\":\"assistant\",\"content\":[{{\"type\":\"output_text\",\"text\":\"Hi \\\"usage\\\": {{}}\",\"annotations\":[]}}]}}],\"usage\":{{\"input_tokens\":328,\"input_tokens_details\":{{\"cached_tokens\":256}},\"output_tokens\":180,\"output_tokens_details\":{{\"reasoning_tokens\":128}},\"total_tokens\":508}}}}}}\n\n"
        ),
    ]
}

fn responses_json(model: &str) -> String {
    format!(
        "{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"{model}\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"Hi\"}}]}}],\"usage\":{{\"input_tokens\":328,\"input_tokens_details\":{{\"cached_tokens\":256}},\"output_tokens\":180,\"output_tokens_details\":{{\"reasoning_tokens\":128}},\"total_tokens\":508}}}}"
    )
}

fn openai_json(model: &str) -> String {
    format!(
        "{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\",\"created\":1,\"model\":\"{model}\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"Hello from the fake\"}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":11,\"completion_tokens\":7,\"total_tokens\":18}}}}"
    )
}

fn anthropic_events(n: usize) -> Vec<String> {
    let mut v = vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":7,\"cache_read_input_tokens\":300,\"output_tokens\":1}}}\n\n".to_string(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".to_string(),
    ];
    for i in 0..n {
        v.push(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"tok{i} \"}}}}\n\n"
        ));
    }
    v.push(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".into(),
    );
    v.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":42}}\n\n".into());
    v.push("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into());
    v
}

const ANTHROPIC_JSON: &str = "{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-3-5-haiku-20241022\",\"content\":[{\"type\":\"text\",\"text\":\"Hello from the fake\"}],\"stop_reason\":\"end_turn\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":4,\"output_tokens\":5}}";

/// Gemini streams carry running totals in every chunk; the last one is what is billed.
fn gemini_events(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("data: {{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"tok{i}\"}}],\"role\":\"model\"}}}}],\"usageMetadata\":{{\"promptTokenCount\":40,\"candidatesTokenCount\":{},\"thoughtsTokenCount\":6,\"cachedContentTokenCount\":10,\"totalTokenCount\":{}}},\"modelVersion\":\"gemini-2.5-flash\"}}\r\n\r\n", i + 1, 47 + i))
        .collect()
}

fn header_num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.parse().ok()
}

async fn fake_handle(state: Arc<FakeState>, req: Request<Incoming>) -> Response<FakeBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
        version: parts.version,
    };
    state.seen.lock().unwrap().push(seen);
    let forge = parts.headers.contains_key("x-fake-forge");
    let encoding = parts.headers.get("x-fake-encoding").cloned();
    let mut resp = fake_respond(state, &parts, body).await;
    if forge {
        resp.headers_mut()
            .insert("x-byokd-error", "no_key".parse().unwrap());
    }
    // An upstream that compresses whatever it was asked (the bytes are not really compressed:
    // byokd must not look inside either way).
    if let Some(e) = encoding {
        resp.headers_mut().insert("content-encoding", e);
    }
    resp
}

async fn fake_respond(
    state: Arc<FakeState>,
    parts: &http::request::Parts,
    body: Bytes,
) -> Response<FakeBody> {
    let h = &parts.headers;
    if parts.uri.path().starts_with("/model/") {
        let base = format!(
            "http://{}",
            h.get("host").and_then(|v| v.to_str().ok()).unwrap_or("")
        );
        if sigv4_valid(&state, parts, &body, &base).await == Some(false) {
            let mut r = full(
                403,
                "application/json",
                r#"{"message":"The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."}"#,
            );
            r.headers_mut().insert(
                "x-amzn-errortype",
                "InvalidSignatureException".parse().unwrap(),
            );
            return r;
        }
    }
    if let Some(ms) = header_num(h, "x-fake-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    // Per-key behaviour, for failover tests (a client header would apply to every attempt):
    // a key containing `rate429` is rate-limited, one containing `fail503` hits an outage,
    // one containing `slow2s` answers after two seconds. A rate-limited key containing
    // `cool<N>ms` also sends `retry-after-ms: N`, as OpenAI does (it wins over `retry-after`).
    let auth: String = ["authorization", "x-api-key", "x-goog-api-key", "api-key"]
        .iter()
        .filter_map(|n| h.get(*n))
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    if auth.contains("slow2s") {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if auth.contains("rate429") {
        let mut r = full(
            429,
            "application/json",
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        );
        r.headers_mut().insert("retry-after", "2".parse().unwrap());
        if let Some(ms) = auth
            .split("cool")
            .nth(1)
            .and_then(|rest| rest.split_once("ms"))
            .and_then(|(n, _)| n.parse::<u64>().ok())
        {
            r.headers_mut()
                .insert("retry-after-ms", ms.to_string().parse().unwrap());
        }
        return r;
    }
    if auth.contains("fail503") {
        return full(
            503,
            "application/json",
            r#"{"error":{"message":"The server is overloaded","type":"server_error"}}"#,
        );
    }
    if let Some(status) = header_num(h, "x-fake-status") {
        return full(
            status as u16,
            "application/json",
            r#"{"error":{"message":"fake upstream error","type":"server_error"}}"#,
        );
    }
    let pace = Duration::from_millis(header_num(h, "x-fake-pace-ms").unwrap_or(0));
    let n = header_num(h, "x-fake-events").unwrap_or(3) as usize;
    let streaming = memchr::memmem::find(&body, b"\"stream\":true").is_some()
        || memchr::memmem::find(&body, b"\"stream\": true").is_some();
    // `x-fake-format: spaced|pretty`: the provider lays its JSON out as Python servers do.
    let style = h
        .get("x-fake-format")
        .and_then(|v| JsonStyle::parse(v.to_str().ok()?));
    let styled = |events: Vec<String>| match style {
        Some(s) => events
            .iter()
            .map(|e| String::from_utf8(restyle_stream(e.as_bytes(), s, false)).unwrap())
            .collect(),
        None => events,
    };
    let path = parts.uri.path();
    if path.ends_with("/responses") {
        let model = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["model"].as_str().map(str::to_string))
            .unwrap_or_else(|| "o4-mini".into());
        if streaming {
            sse(state, styled(responses_events(&model)), pace)
        } else {
            full(200, "application/json", responses_json(&model))
        }
    } else if path.ends_with("/chat/completions") {
        let model = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["model"].as_str().map(str::to_string))
            .unwrap_or_else(|| "gpt-4o-mini".into());
        if streaming {
            let include_usage = memchr::memmem::find(&body, b"\"include_usage\":true").is_some()
                || memchr::memmem::find(&body, b"\"include_usage\": true").is_some();
            sse(state, styled(openai_events(n, &model, include_usage)), pace)
        } else {
            full(200, "application/json", openai_json(&model))
        }
    } else if path.contains("/text-to-speech/") {
        // ElevenLabs: the answer is audio, with nothing to meter in it.
        full(
            200,
            "audio/mpeg",
            Bytes::from_static(b"ID3\x04\x00fake-mp3-frames"),
        )
    } else if path.ends_with("/invoke") {
        // Bedrock InvokeModel: the model's own answer (Anthropic's here); Bedrock's token
        // counts are in headers.
        let mut r = full(
            200,
            "application/json",
            r#"{"id":"msg_bdrk_1","type":"message","role":"assistant","model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi!"}],"stop_reason":"end_turn","usage":{"input_tokens":15,"output_tokens":6}}"#,
        );
        for (k, v) in [
            ("x-amzn-bedrock-input-token-count", "15"),
            ("x-amzn-bedrock-output-token-count", "6"),
        ] {
            r.headers_mut().insert(k, v.parse().unwrap());
        }
        r
    } else if path.ends_with("/converse-stream") {
        // Bedrock ConverseStream: binary event-stream frames, usage in the last (`metadata`),
        // one message at a time.
        amazon_stream(
            state,
            std::fs::read(format!(
                "{}/tests/fixtures/bedrock_converse_stream.eventstream",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap(),
            Duration::from_millis(5),
        )
    } else if path.ends_with("/converse") {
        // Bedrock Converse: usage in camelCase, cache reads apart; the answer names no model.
        full(
            200,
            "application/json",
            r#"{"output":{"message":{"role":"assistant","content":[{"text":"Hello from Bedrock"}]}},"stopReason":"end_turn","usage":{"inputTokens":12,"outputTokens":7,"totalTokens":24,"cacheReadInputTokens":5,"cacheWriteInputTokens":0},"metrics":{"latencyMs":321}}"#,
        )
    } else if path.ends_with("/v2/chat") {
        // Cohere v2: billed units beside the (larger) tokens; the answer names no model.
        full(
            200,
            "application/json",
            r#"{"id":"c1","finish_reason":"COMPLETE","message":{"role":"assistant","content":[{"type":"text","text":"hi"}]},"usage":{"billed_units":{"input_tokens":5,"output_tokens":12},"tokens":{"input_tokens":71,"output_tokens":12}}}"#,
        )
    } else if path.ends_with("/token") {
        // Google's OAuth token endpoint: a JWT-bearer grant answered with an access token.
        let aud = format!(
            "http://{}/token",
            h.get("host").and_then(|v| v.to_str().ok()).unwrap_or("")
        );
        if jwt_grant_valid(&state, &body, &aud) == Some(false) {
            return full(
                400,
                "application/json",
                r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
            );
        }
        full(
            200,
            "application/json",
            r#"{"access_token":"ya29.canary-VERTEX-access-token","expires_in":3599,"token_type":"Bearer"}"#,
        )
    } else if path.ends_with("/v1/messages")
        || path.contains(":rawPredict")
        || path.contains(":streamRawPredict")
    {
        // Anthropic, natively or on Vertex (rawPredict takes the Messages API body).
        if streaming || path.contains(":streamRawPredict") {
            sse(state, styled(anthropic_events(n)), pace)
        } else {
            full(200, "application/json", ANTHROPIC_JSON)
        }
    } else if path.contains(":streamGenerateContent") {
        sse(state, styled(gemini_events(n)), pace)
    } else if path.contains(":generateContent") {
        full(
            200,
            "application/json",
            r#"{"candidates":[{"content":{"parts":[{"text":"hi"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4},"modelVersion":"gemini-2.0-flash"}"#,
        )
    } else if path.ends_with("/images/generations") {
        // No `model` in an image response: the label comes from the request.
        full(
            200,
            "application/json",
            r#"{"created":1,"data":[{"revised_prompt":"a \"data\":[{},{}] cat","url":"https://img.example/1.png"},{"url":"https://img.example/2.png"},{"b64_json":"iVBORw0KGgo="}]}"#,
        )
    } else if path.ends_with("/audio/speech") {
        let mut r = full(
            200,
            "audio/mpeg",
            Bytes::from_static(b"ID3\x04\x00fake-mp3"),
        );
        r.headers_mut().remove("x-fake-provider");
        r
    } else if path.ends_with("/audio/transcriptions") {
        if memchr::memmem::find(&body, b"verbose_json").is_some() {
            full(
                200,
                "application/json",
                r#"{"task":"transcribe","language":"english","duration":8.47,"text":"hi there","segments":[{"id":0,"start":0.0,"end":8.47,"text":"hi there"}]}"#,
            )
        } else {
            full(
                200,
                "application/json",
                r#"{"text":"hi there","usage":{"type":"duration","seconds":9}}"#,
            )
        }
    } else if path.ends_with("/models") {
        // A key containing "rejected" is one the provider refuses (for `verify`).
        let rejected = ["authorization", "x-api-key", "x-goog-api-key", "api-key"]
            .iter()
            .filter_map(|n| h.get(*n))
            .any(|v| v.to_str().unwrap_or("").contains("rejected"));
        if rejected {
            full(
                401,
                "application/json",
                r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#,
            )
        } else {
            full(200, "application/json", r#"{"object":"list","data":[]}"#)
        }
    } else {
        full(
            404,
            "application/json",
            r#"{"error":{"message":"fake: no such path"}}"#,
        )
    }
}

/// Serves one connection of the fake provider (HTTP/1.1 or HTTP/2).
async fn serve_fake<IO>(io: IO, st: Arc<FakeState>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, Infallible>(fake_handle(st, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

/// Starts the fake provider on 127.0.0.1:0 (HTTP/1.1 and h2c).
pub async fn fake_upstream() -> FakeUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(FakeState::default());
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_fake(stream, st.clone()));
        }
    });
    FakeUpstream { addr, state }
}

/// The fake provider behind TLS (ALPN h2 and http/1.1) with the given certificate chain.
pub async fn fake_upstream_tls(cert_pem: &str, key_pem: &str) -> FakeUpstream {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(FakeState::default());
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, st) = (acceptor.clone(), st.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    serve_fake(tls, st).await;
                }
            });
        }
    });
    FakeUpstream { addr, state }
}

/// A config whose providers all point at the fake, on port 0, in a temp folder.
pub fn config_yaml(upstream: &str, extra: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
identity:
  - header: {{ name: x-tenant-id }}
  - bearer: {{}}
kms:
  local: {{ keks: {{ k1: .byokd/kek-k1 }}, active: k1 }}
store:
  file: {{ path: .byokd/keys.json }}
providers:
  openai: {{ kind: openai, base_url: "{upstream}" }}
  anthropic: {{ kind: anthropic, base_url: "{upstream}" }}
  gemini: {{ kind: gemini, base_url: "{upstream}" }}
  azure: {{ kind: azure, base_url: "{upstream}" }}
  mistral: {{ base_url: "{upstream}/mistral-api" }}
  ollama: {{ base_url: "{upstream}" }}
defaults:
  default_provider: openai
  allowed_providers: [openai, anthropic, gemini, azure, mistral, ollama]
{extra}"#
    )
}

/// A temp folder with a config file in it.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Env {
    pub fn new(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("byokd.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        Self { dir, config_path }
    }

    pub fn config(&self) -> Config {
        Config::load(&self.config_path).unwrap()
    }

    /// The events of the `audit: { file: audit.jsonl }` beside the config.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join(".byokd/keys.json")
    }

    /// Registers a key through the library, as `byokd keys add` does.
    pub async fn add_key(&self, tenant: &str, provider: &str, secret: &str) -> String {
        let cfg = self.config();
        let p = cfg.providers[cfg.provider_index(provider).unwrap()].clone();
        let kms = byokd::server::kms(&cfg).unwrap();
        let store = byokd::server::store(&cfg).await.unwrap();
        let audit = byokd::server::audit(&cfg);
        let rec = manage::add_key(
            store.as_ref(),
            kms.as_ref(),
            &audit,
            NewKey {
                tenant,
                provider: &p,
                secret: &PlainKey::new(secret.into()),
                label: None,
                expires_in: None,
            },
        )
        .await
        .unwrap();
        rec.id
    }

    pub async fn new_token(&self, tenant: &str) -> String {
        let cfg = self.config();
        let store = byokd::server::store(&cfg).await.unwrap();
        let audit = byokd::server::audit(&cfg);
        let (t, _) = manage::new_token(store.as_ref(), &audit, tenant)
            .await
            .unwrap();
        t.to_string()
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A response read to the end.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn code(&self) -> &str {
        self.headers
            .get("x-byokd-error")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

pub async fn send(c: &TestClient, req: Request<Full<Bytes>>) -> Got {
    let resp = c.request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// GET the admin `/metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    let got = send(
        &client(),
        request("GET", &format!("http://{admin}/metrics"), &[], ""),
    )
    .await;
    assert_eq!(got.status, 200);
    got.text()
}

/// The value of one sample line, e.g. `byokd_tokens_total{...}`, matched by all `parts`.
pub fn sample(metrics: &str, name: &str, parts: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| parts.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `f` every 20 ms until it holds or `within` passed: how long it took, `None` on
/// timeout. Tests wait for a condition this way, never for a fixed time.
pub async fn poll_until(within: Duration, mut f: impl AsyncFnMut() -> bool) -> Option<Duration> {
    let t = std::time::Instant::now();
    loop {
        if f().await {
            return Some(t.elapsed());
        }
        if t.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `f` until it holds; panics with "timed out after {within:?} waiting for {what}".
pub async fn eventually(what: &str, within: Duration, f: impl AsyncFnMut() -> bool) {
    if poll_until(within, f).await.is_none() {
        panic!("timed out after {within:?} waiting for {what}");
    }
}

/// The sum of every sample of the metric `name` (all label sets).
pub fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `/metrics` once `byokd_requests_total` counts at least `n` requests (e.g. as many as the
/// fake provider saw): a request is recorded as its response body ends on byokd's side, a
/// moment after the client has read the last byte.
pub async fn metrics_after(admin: SocketAddr, n: usize) -> String {
    let mut last = String::new();
    let done = poll_until(Duration::from_secs(5), async || {
        last = metrics(admin).await;
        total(&last, "byokd_requests_total") >= n as f64
    })
    .await;
    assert!(done.is_some(), "{n} requests never recorded:\n{last}");
    // The counter is the recorder's first write; scrape again for the rest of it.
    metrics(admin).await
}

/// What a key snapshot serves: (key id, version) of each active record, and the hashes of
/// the platform tokens, sorted.
type Served = (Vec<(String, u32)>, Vec<[u8; 32]>);

fn served(s: &byokd::keys::store::Snapshot) -> Served {
    let mut keys: Vec<(String, u32)> = s
        .tenants
        .values()
        .flat_map(|t| t.keys.iter())
        .map(|r| (r.id.to_string(), r.version))
        .collect();
    keys.sort();
    let mut tokens: Vec<[u8; 32]> = s.tokens.keys().copied().collect();
    tokens.sort();
    (keys, tokens)
}

/// Waits until the in-process server `r` serves the store file as it is on disk now: its
/// live reload has picked up the last write.
pub async fn store_reloaded(r: &byokd::server::Running, env: &Env) {
    let disk = byokd::keys::store::FileStore::new(env.store_path())
        .load()
        .unwrap();
    let want = served(&byokd::keys::store::Snapshot::build(disk.clone()));
    eventually(
        "the live reload of the store file",
        Duration::from_secs(5),
        async || served(&r.proxy.keyring.snapshot()) == want,
    )
    .await;
}

pub const CANARY_OPENAI: &str = "sk-canary-OPENAI-7d1f0c93b2a4e5f6";
pub const CANARY_ANTHROPIC: &str = "sk-ant-canary-ANTHROPIC-55aa11bb22cc";
pub const CANARY_GEMINI: &str = "AIzacanary-GEMINI-0123456789abcdefghij";

/// Fails if `secret`, a 17-character slice of it, or the start of its base64 shows in `text`:
/// a key can leak whole, cut, or encoded.
pub fn assert_no_secret(text: &str, secret: &str, what: &str) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    assert!(!text.contains(secret), "{secret} leaked into {what}");
    if secret.len() >= 20 {
        assert!(
            !text.contains(&secret[3..20]),
            "part of {secret} leaked into {what}"
        );
    }
    assert!(
        !text.contains(&b64[..16]),
        "base64 of {secret} leaked into {what}"
    );
}

/// How a provider lays out its JSON: the same tokens in the same order (except
/// [`JsonStyle::SortedSpaced`]), with the whitespace JSON allows between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonStyle {
    /// `{"a":1,"b":[1,2]}`, as OpenAI, Anthropic and Gemini send it.
    Compact,
    /// `{"a": 1, "b": [1, 2]}`: Python's `json.dumps` default, as OpenAI-compatible servers
    /// written in Python send it.
    Spaced,
    /// `json.dumps(indent=2)`: one member per line. In SSE, each line is its own `data:`
    /// line (the lines join with "\n"); NDJSON cannot hold it and gets [`JsonStyle::Spaced`].
    Pretty,
    /// Spaced, with every object's keys in sorted order: nothing may depend on key order.
    SortedSpaced,
}

impl JsonStyle {
    pub const ALL: [JsonStyle; 4] = [
        JsonStyle::Compact,
        JsonStyle::Spaced,
        JsonStyle::Pretty,
        JsonStyle::SortedSpaced,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "compact" => Self::Compact,
            "spaced" => Self::Spaced,
            "pretty" => Self::Pretty,
            "sorted" => Self::SortedSpaced,
            _ => return None,
        })
    }
}

/// `json` (one valid JSON text) laid out in `style`; string contents are kept byte for byte.
pub fn restyle_json(json: &[u8], style: JsonStyle) -> Vec<u8> {
    let sorted;
    let json = if style == JsonStyle::SortedSpaced {
        // serde_json's map without `preserve_order` is a BTreeMap: keys come out sorted.
        let v: serde_json::Value = serde_json::from_slice(json).unwrap();
        sorted = serde_json::to_vec(&v).unwrap();
        &sorted[..]
    } else {
        json
    };
    // The tokens without any whitespace between them.
    let mut tokens = Vec::with_capacity(json.len());
    let (mut in_str, mut esc) = (false, false);
    for &b in json {
        if in_str {
            tokens.push(b);
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if b == b'"' {
            in_str = true;
            tokens.push(b);
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            tokens.push(b);
        }
    }
    let pretty = style == JsonStyle::Pretty;
    let spaced = style != JsonStyle::Compact;
    let newline = |out: &mut Vec<u8>, depth: usize| {
        out.push(b'\n');
        out.extend(std::iter::repeat_n(b' ', 2 * depth));
    };
    let mut out = Vec::with_capacity(tokens.len() * 2);
    let mut depth = 0usize;
    let (mut in_str, mut esc) = (false, false);
    for (i, &b) in tokens.iter().enumerate() {
        if in_str {
            out.push(b);
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                out.push(b);
            }
            b'{' | b'[' => {
                out.push(b);
                depth += 1;
                if pretty && !matches!(tokens.get(i + 1), Some(b'}' | b']')) {
                    newline(&mut out, depth);
                }
            }
            b'}' | b']' => {
                depth -= 1;
                if pretty && !matches!(tokens[i - 1], b'{' | b'[') {
                    newline(&mut out, depth);
                }
                out.push(b);
            }
            b',' => {
                out.push(b);
                if pretty {
                    newline(&mut out, depth);
                } else if spaced {
                    out.push(b' ');
                }
            }
            b':' => {
                out.push(b);
                if spaced {
                    out.push(b' ');
                }
            }
            _ => out.push(b),
        }
    }
    out
}

/// An SSE body (or NDJSON, one JSON text per line) with every JSON payload laid out in
/// `style`. Lines that are not JSON (`event:`, `data: [DONE]`, blank) and line endings are
/// kept. A pretty SSE payload spreads over several `data:` lines, valid SSE.
pub fn restyle_stream(body: &[u8], style: JsonStyle, ndjson: bool) -> Vec<u8> {
    let is_json = |v: &[u8]| serde_json::from_slice::<serde::de::IgnoredAny>(v).is_ok();
    let mut out = Vec::with_capacity(body.len() * 2);
    for line in body.split_inclusive(|&b| b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        let eol = &line[content.len()..];
        if ndjson {
            if is_json(content) {
                let style = if style == JsonStyle::Pretty {
                    JsonStyle::Spaced
                } else {
                    style
                };
                out.extend_from_slice(&restyle_json(content, style));
            } else {
                out.extend_from_slice(content);
            }
            out.extend_from_slice(eol);
            continue;
        }
        let value = content
            .strip_prefix(b"data:")
            .map(|v| v.strip_prefix(b" ").unwrap_or(v));
        match value {
            Some(v) if is_json(v) => {
                let json = restyle_json(v, style);
                let sep: &[u8] = if eol.is_empty() { b"\n" } else { eol };
                for (i, l) in json.split(|&b| b == b'\n').enumerate() {
                    if i > 0 {
                        out.extend_from_slice(sep);
                    }
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(l);
                }
                out.extend_from_slice(eol);
            }
            _ => {
                out.extend_from_slice(content);
                out.extend_from_slice(eol);
            }
        }
    }
    out
}
