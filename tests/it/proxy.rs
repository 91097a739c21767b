//! The data plane end to end, in-process: routes, rewrite, identity, errors, streaming,
//! metering, against the fake provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;

struct Harness {
    env: Env,
    up: FakeUpstream,
    byokd: byokd::server::Running,
}

impl Harness {
    async fn new(extra: &str) -> Self {
        let up = fake_upstream().await;
        let env = Env::new(&config_yaml(&up.url(), extra));
        env.add_key("acme", "openai", CANARY_OPENAI).await;
        env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
        env.add_key("acme", "gemini", CANARY_GEMINI).await;
        env.add_key("acme", "azure", "azurekey0123456789abcdef0123456789")
            .await;
        env.add_key("acme", "mistral", "mistral-key-0123456789")
            .await;
        let byokd = byokd::server::start(env.config()).await.unwrap();
        Self { env, up, byokd }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.byokd.data_addr, path)
    }
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const MESSAGES: &str = r#"{"model":"claude-3-5-haiku-20241022","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
const MESSAGES_STREAM: &str = r#"{"model":"claude-sonnet-4-20250514","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn openai_default_route_injects_key_and_strips_client_auth() {
    let h = Harness::new("").await;
    let got = send(
        &client(),
        request(
            "POST",
            &h.url("/v1/chat/completions?trace=1"),
            &[
                ("x-tenant-id", "acme"),
                ("authorization", "Bearer app-secret"),
                ("x-api-key", "app-secret"),
                ("x-byokd-debug", "1"),
                ("content-type", "application/json"),
                ("openai-organization", "org-1"),
            ],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.json()["choices"][0]["message"]["content"],
        "Hello from the fake"
    );
    let seen = h.up.last();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/v1/chat/completions")
    );
    assert_eq!(seen.query.as_deref(), Some("trace=1"));
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );
    assert_eq!(seen.headers["host"], h.up.addr.to_string().as_str());
    assert_eq!(seen.headers["openai-organization"], "org-1");
    for gone in ["x-api-key", "x-tenant-id", "x-byokd-debug"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the provider"
        );
    }
    assert_eq!(
        seen.body.as_ref(),
        CHAT.as_bytes(),
        "request body must pass unchanged"
    );
}

#[tokio::test]
async fn each_provider_gets_its_own_auth_path_and_query() {
    let h = Harness::new("").await;
    let c = client();
    let tenant = ("x-tenant-id", "acme");

    let got = send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[tenant, ("authorization", "Bearer x"), ("x-api-key", "x")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = h.up.last();
    assert_eq!(s.path, "/v1/messages");
    assert_eq!(s.headers["x-api-key"], CANARY_ANTHROPIC);
    assert_eq!(s.headers["anthropic-version"], "2023-06-01");
    assert!(!s.headers.contains_key("authorization"));

    // An SDK-sent anthropic-version is kept.
    send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[tenant, ("anthropic-version", "2024-01-01")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!(h.up.last().headers["anthropic-version"], "2024-01-01");

    let got = send(&c, request("POST", &h.url("/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIzaAPPKEY"), &[tenant, ("x-goog-api-key", "AIzaAPPKEY")], "{}")).await;
    assert_eq!(got.status, 200);
    let s = h.up.last();
    assert_eq!(
        s.path,
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    );
    assert_eq!(s.query.as_deref(), Some("alt=sse"));
    assert_eq!(s.headers["x-goog-api-key"], CANARY_GEMINI);

    let got = send(
        &c,
        request(
            "POST",
            &h.url("/azure/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"),
            &[tenant, ("api-key", "app")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    let s = h.up.last();
    assert_eq!(s.path, "/openai/deployments/gpt4o/chat/completions");
    assert_eq!(s.query.as_deref(), Some("api-version=2024-10-21"));
    assert_eq!(s.headers["api-key"], "azurekey0123456789abcdef0123456789");

    // An OpenAI-compatible built-in with a base path.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/mistral/v1/chat/completions"),
            &[tenant],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    let s = h.up.last();
    assert_eq!(s.path, "/mistral-api/v1/chat/completions");
    assert_eq!(s.headers["authorization"], "Bearer mistral-key-0123456789");

    // Ollama needs no key: forwarded without auth.
    send(
        &c,
        request(
            "POST",
            &h.url("/ollama/v1/chat/completions"),
            &[tenant, ("authorization", "Bearer app")],
            CHAT,
        ),
    )
    .await;
    assert!(!h.up.last().headers.contains_key("authorization"));
}

#[tokio::test]
async fn platform_token_identifies_the_tenant_and_never_goes_upstream() {
    let h = Harness::new("").await;
    let token = h.env.new_token("acme").await;
    store_reloaded(&h.byokd, &h.env).await;
    let c = client();
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("authorization", &format!("Bearer {token}"))],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = h.up.last();
    assert_eq!(
        s.headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );
    assert!(!format!("{:?}", s.headers).contains(&token));
    // The Anthropic SDK 1.x puts it in x-api-key.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-api-key", &token)],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    // Token says acme, header says another tenant: refused, never resolved silently.
    h.env
        .add_key("other", "openai", "sk-other-0123456789abcdef")
        .await;
    store_reloaded(&h.byokd, &h.env).await;
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-tenant-id", "other"),
            ],
            CHAT,
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (401, "identity_conflict")
    );
    // A wrong token is no identity.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("authorization", "Bearer byokd_wrong")],
            CHAT,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
}

#[tokio::test]
async fn errors_have_status_header_and_provider_shape() {
    let h = Harness::new("tenants:\n  limited: { allowed_providers: [openai] }\n").await;
    h.env
        .add_key("limited", "openai", "sk-limited-0123456789abcdef")
        .await;
    h.env
        .add_key("nokeys", "openai", "sk-nokeys-0123456789abcdef")
        .await;
    store_reloaded(&h.byokd, &h.env).await;
    let c = client();

    // No identity, OpenAI shape.
    let got = send(
        &c,
        request("POST", &h.url("/v1/chat/completions"), &[], CHAT),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
    let j = got.json();
    assert_eq!(j["error"]["code"], "unknown_tenant");
    assert_eq!(j["error"]["type"], "authentication_error");
    assert!(
        j["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request id")
    );

    // Unknown tenant via header; invalid tenant syntax.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "ghost")],
            CHAT,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "bad tenant!")],
            CHAT,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));

    // Anthropic shape.
    let got = send(
        &c,
        request("POST", &h.url("/anthropic/v1/messages"), &[], MESSAGES),
    )
    .await;
    assert_eq!(got.status, 401);
    let j = got.json();
    assert_eq!(j["type"], "error");
    assert_eq!(j["error"]["type"], "authentication_error");

    // provider_not_allowed, Gemini shape.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/gemini/v1beta/models/m:generateContent"),
            &[("x-tenant-id", "limited")],
            "{}",
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (403, "provider_not_allowed")
    );
    assert_eq!(got.json()["error"]["status"], "PERMISSION_DENIED");
    assert_eq!(got.json()["error"]["code"], 403);

    // no_key: the tenant exists but has no anthropic key.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "nokeys")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (403, "no_key"));
    assert_eq!(got.json()["error"]["type"], "permission_error");

    // unknown_route.
    for path in ["/nope/v1/chat", "/byokd/anything", "/"] {
        let got = send(
            &c,
            request("GET", &h.url(path), &[("x-tenant-id", "acme")], ""),
        )
        .await;
        assert_eq!(
            (got.status.as_u16(), got.code()),
            (404, "unknown_route"),
            "{path}"
        );
    }

    // None of these reached the provider.
    assert!(
        h.up.seen().is_empty(),
        "a rejected request reached the provider"
    );

    let m = metrics(h.byokd.admin_addr).await;
    // A tenant that never had a successful request takes no label slot: `__other__`.
    assert!(
        sample(
            &m,
            "byokd_rejections_total",
            &["reason=\"no_key\"", "tenant=\"__other__\""]
        )
        .unwrap()
            >= 1.0
    );
    assert!(!m.contains("tenant=\"nokeys\""), "{m}");
    assert!(sample(&m, "byokd_requests_total", &["code=\"401\""]).unwrap() >= 1.0);
}

#[tokio::test]
async fn size_limits_are_enforced_in_provider_shape() {
    let h =
        Harness::new("limits: { max_body_bytes: 1000, max_header_bytes: 2048, max_headers: 20 }\n")
            .await;
    let c = client();
    let big = "x".repeat(5000);
    // Declared length over the limit: refused before the provider.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "acme")],
            &big,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (413, "body_too_large"));
    assert_eq!(got.json()["error"]["type"], "request_too_large");
    // Chunked (no content-length): cut while streaming.
    let stream = futures_util::stream::iter((0..10).map(|_| {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(vec![
            b'a';
            500
        ])))
    }));
    let req = http::Request::builder()
        .method("POST")
        .uri(h.url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .body(http_body_util::StreamBody::new(stream))
        .unwrap();
    let chunked: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let resp = chunked.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["x-byokd-error"], "body_too_large");

    let long = "v".repeat(3000);
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme"), ("x-long", &long)],
            CHAT,
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (431, "headers_too_large")
    );
    let many: Vec<(String, String)> = (0..30)
        .map(|i| (format!("x-h{i}"), "1".to_string()))
        .collect();
    let mut headers: Vec<(&str, &str)> =
        many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    headers.push(("x-tenant-id", "acme"));
    let got = send(
        &c,
        request("POST", &h.url("/v1/chat/completions"), &headers, CHAT),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (431, "headers_too_large")
    );
    assert_eq!(got.json()["error"]["code"], "headers_too_large");
}

#[tokio::test]
async fn upstream_unreachable_and_timeout() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let up = fake_upstream().await;
    let yaml = config_yaml(&up.url(), "limits: { first_byte_timeout: 300ms }\n").replace(
        &format!("openai: {{ kind: openai, base_url: \"{}\" }}", up.url()),
        &format!("openai: {{ kind: openai, base_url: \"http://{dead}\" }}"),
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let c = client();
    let got = send(
        &c,
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", b.data_addr),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (502, "upstream_unreachable")
    );
    assert_eq!(got.json()["error"]["type"], "api_error");
    let got = send(
        &c,
        request(
            "POST",
            &format!("http://{}/anthropic/v1/messages", b.data_addr),
            &[("x-tenant-id", "acme"), ("x-fake-delay-ms", "2000")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (504, "upstream_timeout"));
    assert_eq!(got.json()["type"], "error");
    // Upstream HTTP errors pass through unchanged, without the byokd header.
    let got = send(
        &c,
        request(
            "POST",
            &format!("http://{}/anthropic/v1/messages", b.data_addr),
            &[("x-tenant-id", "acme"), ("x-fake-status", "529")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!(got.status.as_u16(), 529);
    assert_eq!(got.code(), "");
    assert_eq!(got.json()["error"]["message"], "fake upstream error");
    let m = metrics(b.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"connect\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"anthropic\"", "kind=\"timeout\""]
        ),
        Some(1.0)
    );
}

/// Reads a streaming response, returning each frame's arrival time since `t0`.
async fn frame_times(
    resp: http::Response<hyper::body::Incoming>,
    t0: Instant,
) -> (Vec<Duration>, String) {
    let mut body = resp.into_body();
    let mut times = Vec::new();
    let mut text = String::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            times.push(t0.elapsed());
            text.push_str(&String::from_utf8_lossy(&d));
        }
    }
    (times, text)
}

#[tokio::test]
async fn sse_streams_at_the_providers_pace_and_is_metered() {
    let pricing = format!(
        "pricing: {}/config/pricing.yaml\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let h = Harness::new(&pricing).await;
    let c = client();
    let t0 = Instant::now();
    let resp = c
        .request(request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[
                ("x-tenant-id", "acme"),
                ("x-fake-pace-ms", "200"),
                ("x-fake-events", "4"),
            ],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (times, text) = frame_times(resp, t0).await;
    // 4 content events + usage + [DONE], 200 ms apart: frames arrive spread out, not at once.
    assert!(
        times.len() >= 5,
        "expected separate frames, got {}",
        times.len()
    );
    let first = times[0];
    let last = *times.last().unwrap();
    assert!(
        first < Duration::from_millis(400),
        "first event late: {first:?}"
    );
    assert!(
        last - first >= Duration::from_millis(800),
        "events bunched: {times:?}"
    );
    assert!(text.contains("tok0") && text.ends_with("data: [DONE]\n\n"));

    // Anthropic stream too.
    let resp = c
        .request(request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "acme"), ("x-fake-events", "2")],
            MESSAGES_STREAM,
        ))
        .await
        .unwrap();
    let (_, text) = frame_times(resp, Instant::now()).await;
    assert!(text.contains("message_stop"));

    // Gemini: stream (last running total counts) and JSON.
    let resp = c
        .request(request(
            "POST",
            &h.url("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"),
            &[("x-tenant-id", "acme"), ("x-fake-events", "3")],
            "{}",
        ))
        .await
        .unwrap();
    frame_times(resp, Instant::now()).await;
    send(
        &c,
        request(
            "POST",
            &h.url("/gemini/v1beta/models/gemini-2.0-flash:generateContent"),
            &[("x-tenant-id", "acme")],
            "{}",
        ),
    )
    .await;

    // Non-streaming bodies of both.
    send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            r#"{"model":"gpt-4.1","messages":[]}"#,
        ),
    )
    .await;
    send(
        &c,
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "acme")],
            MESSAGES,
        ),
    )
    .await;

    let m = metrics_after(h.byokd.admin_addr, h.up.seen().len()).await;
    let tok = |model: &str, ty: &str| {
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "tenant=\"acme\"",
                &format!("model=\"{model}\""),
                &format!("type=\"{ty}\""),
            ],
        )
    };
    // OpenAI stream: prompt 120 (100 cached), completion 30 (10 reasoning).
    assert_eq!(tok("gpt-4o-mini", "input"), Some(20.0));
    assert_eq!(tok("gpt-4o-mini", "cached_input"), Some(100.0));
    assert_eq!(tok("gpt-4o-mini", "output"), Some(20.0));
    assert_eq!(tok("gpt-4o-mini", "reasoning"), Some(10.0));
    // Anthropic stream: cumulative output taken once (42), cache counts separate.
    assert_eq!(tok("claude-sonnet-4-20250514", "input"), Some(25.0));
    assert_eq!(tok("claude-sonnet-4-20250514", "cached_input"), Some(300.0));
    assert_eq!(tok("claude-sonnet-4-20250514", "cache_write"), Some(7.0));
    assert_eq!(tok("claude-sonnet-4-20250514", "output"), Some(42.0));
    // Gemini stream: prompt 40 (10 cached), candidates 3 (last chunk), thoughts 6.
    assert_eq!(tok("gemini-2.5-flash", "input"), Some(30.0));
    assert_eq!(tok("gemini-2.5-flash", "cached_input"), Some(10.0));
    assert_eq!(tok("gemini-2.5-flash", "output"), Some(3.0));
    assert_eq!(tok("gemini-2.5-flash", "reasoning"), Some(6.0));
    assert_eq!(tok("gemini-2.0-flash", "input"), Some(3.0));
    assert_eq!(tok("gemini-2.0-flash", "output"), Some(1.0));
    // JSON bodies.
    assert_eq!(tok("gpt-4.1", "input"), Some(11.0));
    assert_eq!(tok("gpt-4.1", "output"), Some(7.0));
    assert_eq!(tok("claude-3-5-haiku-20241022", "input"), Some(10.0));
    assert_eq!(tok("claude-3-5-haiku-20241022", "cached_input"), Some(4.0));
    assert_eq!(tok("claude-3-5-haiku-20241022", "output"), Some(5.0));
    assert_eq!(
        sample(
            &m,
            "byokd_requests_total",
            &[
                "tenant=\"acme\"",
                "provider=\"openai\"",
                "model=\"gpt-4o-mini\"",
                "code=\"200\""
            ]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &m,
            "byokd_request_duration_seconds_count",
            &["provider=\"openai\""]
        )
        .unwrap()
            >= 2.0
    );
    assert!(sample(&m, "byokd_key_cache_hits_total", &[]).unwrap() >= 1.0);
    assert!(
        sample(
            &m,
            "byokd_key_decryptions_total",
            &["tenant=\"acme\"", "provider=\"openai\""]
        )
        .unwrap()
            >= 1.0
    );
    // The OpenTelemetry GenAI names carry the same counts (input includes cache reads).
    let genai = |ty: &str| {
        sample(
            &m,
            "gen_ai_client_token_usage_sum",
            &[
                "gen_ai_provider_name=\"openai\"",
                "gen_ai_request_model=\"gpt-4o-mini\"",
                &format!("gen_ai_token_type=\"{ty}\""),
            ],
        )
    };
    assert_eq!((genai("input"), genai("output")), (Some(120.0), Some(30.0)));
    assert!(
        sample(
            &m,
            "gen_ai_client_operation_duration_seconds_count",
            &["gen_ai_provider_name=\"anthropic\""]
        )
        .unwrap()
            >= 1.0
    );
    // Cost, exact: gpt-4o-mini 20×0.15 + 100×0.075 + (20+10)×0.60 USD per million tokens;
    // claude-sonnet-4 25×3 + 300×0.30 + 7×3.75 + 42×15.
    let cost = |model: &str| {
        sample(
            &m,
            "byokd_cost_usd_total",
            &[
                "tenant=\"acme\"",
                &format!("model=\"{model}\""),
                "key_source=\"tenant\"",
            ],
        )
        .unwrap()
    };
    assert!(
        (cost("gpt-4o-mini") - 0.0000285).abs() < 1e-12,
        "{}",
        cost("gpt-4o-mini")
    );
    assert!((cost("claude-sonnet-4-20250514") - 0.00082125).abs() < 1e-12);
    send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            r#"{"model":"mystery-1","messages":[]}"#,
        ),
    )
    .await;
    let m2 = metrics_after(h.byokd.admin_addr, h.up.seen().len()).await;
    assert_eq!(
        sample(
            &m2,
            "byokd_unpriced_requests_total",
            &["model=\"mystery-1\""]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m2, "byokd_cost_usd_total", &["model=\"mystery-1\""]),
        None
    );

    // Upstream hop-by-hop response headers are not passed on.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    assert!(!got.headers.contains_key("keep-alive"));
    assert_eq!(got.headers["x-fake-provider"], "1");
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let h = Harness::new("").await;
    let c = client();
    let resp = c
        .request(request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[
                ("x-tenant-id", "acme"),
                ("x-fake-pace-ms", "100"),
                ("x-fake-events", "100"),
            ],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    drop(c);
    let t = Instant::now();
    while *h.up.state.cancelled.lock().unwrap() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "upstream stream was not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*h.up.state.completed.lock().unwrap(), 0);
    // Metered as a request even though the client left.
    let m = metrics_after(h.byokd.admin_addr, 1).await;
    assert_eq!(
        sample(
            &m,
            "byokd_requests_total",
            &["tenant=\"acme\"", "code=\"200\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn request_body_streams_to_the_provider() {
    let h = Harness::new("").await;
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    let body = http_body_util::StreamBody::new(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|x| (x, rx)) },
    )));
    let req = http::Request::builder()
        .method("POST")
        .uri(h.url("/v1/chat/completions"))
        .header("x-tenant-id", "acme")
        .body(body)
        .unwrap();
    let c: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let pending = tokio::spawn(async move { c.request(req).await.map(|r| r.status()) });
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        br#"{"model":"gpt-4o-mini","#,
    ))))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
        br#""messages":[]}"#,
    ))))
    .await
    .unwrap();
    drop(tx);
    assert_eq!(pending.await.unwrap().unwrap(), 200);
    assert_eq!(
        h.up.last().body.as_ref(),
        br#"{"model":"gpt-4o-mini","messages":[]}"#
    );
}

#[tokio::test]
async fn http2_cleartext_clients_are_served() {
    let h = Harness::new("").await;
    let got = send(
        &h2c_client(),
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        h.up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );
}

#[tokio::test]
async fn revocation_and_new_keys_apply_live() {
    let h = Harness::new("").await;
    let c = client();
    let id = h
        .env
        .add_key("beta", "openai", "sk-beta-first-0123456789")
        .await;
    let t = Instant::now();
    loop {
        let got = send(
            &c,
            request(
                "POST",
                &h.url("/v1/chat/completions"),
                &[("x-tenant-id", "beta")],
                CHAT,
            ),
        )
        .await;
        if got.status == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "new key not live after 2 s: {}",
            got.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        h.up.last().headers["authorization"],
        "Bearer sk-beta-first-0123456789"
    );
    let cfg = h.env.config();
    let store = byokd::server::store(&cfg).await.unwrap();
    byokd::keys::manage::revoke_key(store.as_ref(), &byokd::server::audit(&cfg), &id)
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let got = send(
            &c,
            request(
                "POST",
                &h.url("/v1/chat/completions"),
                &[("x-tenant-id", "beta")],
                CHAT,
            ),
        )
        .await;
        if got.status == 403 {
            assert_eq!(got.code(), "no_key");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "revoked key still served after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A corrupt store at run time keeps the last good state.
    std::fs::write(h.env.store_path(), b"{ not json").unwrap();
    let reload_failed = async || {
        let m = metrics(h.byokd.admin_addr).await;
        sample(&m, "byokd_config_reloads_total", &["result=\"error\""]).unwrap_or(0.0) >= 1.0
    };
    eventually(
        "the reload of the corrupt store",
        Duration::from_secs(5),
        reload_failed,
    )
    .await;
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    let m = metrics(h.byokd.admin_addr).await;
    assert!(sample(&m, "byokd_config_reloads_total", &["result=\"error\""]).unwrap() >= 1.0);
}

/// byokd with the built-in `provider` pointed at the fake, allowed for acme, with `key`; the
/// `Env` holds the store and KEK for as long as the server runs.
async fn with_builtin(
    up: &FakeUpstream,
    provider: &str,
    key: &str,
) -> (Env, byokd::server::Running) {
    let env = Env::new(
        &config_yaml(&up.url(), "")
            .replace(
                "providers:\n",
                &format!(
                    "providers:\n  {provider}: {{ base_url: \"{}\" }}\n",
                    up.url()
                ),
            )
            .replace(
                "allowed_providers: [openai,",
                &format!("allowed_providers: [{provider}, openai,"),
            ),
    );
    env.add_key("acme", provider, key).await;
    let byokd = byokd::server::start(env.config()).await.unwrap();
    (env, byokd)
}

#[tokio::test]
async fn cohere_v2_chat_is_metered_from_billed_units_with_the_requests_model() {
    let up = fake_upstream().await;
    let (_env, byokd) = with_builtin(&up, "cohere", "cohere-canary-0123456789abcdef").await;
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/cohere/v2/chat", byokd.data_addr),
            &[
                ("x-tenant-id", "acme"),
                ("authorization", "Bearer app-side"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"command-a-03-2025","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = up.last();
    assert_eq!(s.path, "/v2/chat");
    assert_eq!(
        s.headers["authorization"],
        "Bearer cohere-canary-0123456789abcdef"
    );
    let m = metrics_after(byokd.admin_addr, 1).await;
    let labels = ["provider=\"cohere\"", "model=\"command-a-03-2025\""];
    let tokens = |ty: &str| {
        let t = format!("type=\"{ty}\"");
        sample(&m, "byokd_tokens_total", &[labels[0], labels[1], &t])
    };
    assert_eq!(
        (tokens("input"), tokens("output")),
        (Some(5.0), Some(12.0)),
        "{m}"
    );
}

#[tokio::test]
async fn azure_ai_inference_takes_its_key_in_api_key_natively_and_by_model() {
    let up = fake_upstream().await;
    let key = "azureai-canary-0123456789abcdef0123";
    let (_env, byokd) = with_builtin(&up, "azure_ai", key).await;
    let call = |path: &str, model: &str| {
        request(
            "POST",
            &format!("http://{}{path}", byokd.data_addr),
            &[
                ("x-tenant-id", "acme"),
                ("api-key", "app-side-key"),
                ("content-type", "application/json"),
            ],
            &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        )
    };
    let got = send(
        &client(),
        call(
            "/azure_ai/models/chat/completions?api-version=2024-05-01-preview",
            "DeepSeek-R1",
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = up.last();
    assert_eq!(s.path, "/models/chat/completions");
    assert_eq!(s.query.as_deref(), Some("api-version=2024-05-01-preview"));
    assert_eq!(s.headers["api-key"], key, "the app's api-key is replaced");
    assert!(!s.headers.contains_key("authorization"));

    // An OpenAI SDK reaches it by model name, through the resource's OpenAI v1 API.
    let got = send(
        &client(),
        call("/v1/chat/completions", "azure_ai/DeepSeek-R1"),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = up.last();
    assert_eq!(s.path, "/openai/v1/chat/completions");
    assert!(String::from_utf8_lossy(&s.body).contains(r#""model":"DeepSeek-R1""#));
    let m = metrics_after(byokd.admin_addr, 2).await;
    let input = sample(
        &m,
        "byokd_tokens_total",
        &["provider=\"azure_ai\"", "type=\"input\""],
    );
    assert!(input.is_some_and(|n| n > 0.0), "{m}");
}

#[tokio::test]
async fn elevenlabs_speech_is_metered_in_characters_of_its_text() {
    let up = fake_upstream().await;
    let (_env, byokd) = with_builtin(&up, "elevenlabs", "sk_canary0123456789abcdef").await;
    let got = send(
        &client(),
        request(
            "POST",
            &format!(
                "http://{}/elevenlabs/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream",
                byokd.data_addr
            ),
            &[
                ("x-tenant-id", "acme"),
                ("xi-api-key", "app-side-placeholder"),
                ("content-type", "application/json"),
            ],
            r#"{"text":"Hello world ☃","model_id":"eleven_multilingual_v2"}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.body.starts_with(b"ID3"), "the audio passes through");
    let s = up.last();
    assert_eq!(s.path, "/v1/text-to-speech/JBFqnCBsd6RMkjVDRZzb/stream");
    assert_eq!(s.headers["xi-api-key"], "sk_canary0123456789abcdef");
    let m = metrics_after(byokd.admin_addr, 1).await;
    assert_eq!(
        sample(
            &m,
            "byokd_usage_units_total",
            &["provider=\"elevenlabs\"", "unit=\"character\""]
        ),
        Some(13.0),
        "{m}"
    );
}

#[tokio::test]
async fn open_tenants_exist_on_the_platform_key_only_when_configured() {
    for open in [false, true] {
        let extra = format!(
            "{}defaults:\n  default_provider: openai\n  allowed_providers: [openai]\n  fallback: [platform]\n",
            if open {
                "tenants_from_identity: open\n"
            } else {
                ""
            }
        );
        let up = fake_upstream().await;
        let yaml = config_yaml(&up.url(), "").replace(
            "defaults:\n  default_provider: openai\n  allowed_providers: [openai, anthropic, gemini, azure, mistral, ollama]\n",
            &extra,
        );
        let env = Env::new(&yaml);
        env.add_key("_platform", "openai", "sk-platform-0123456789abcdef")
            .await;
        let byokd = byokd::server::start(env.config()).await.unwrap();
        let post = |tenant: &'static str| {
            request(
                "POST",
                &format!("http://{}/v1/chat/completions", byokd.data_addr),
                &[("x-tenant-id", tenant)],
                CHAT,
            )
        };
        let got = send(&client(), post("newco")).await;
        if open {
            assert_eq!(got.status, 200, "{}", got.text());
            assert_eq!(
                up.last().headers["authorization"],
                "Bearer sk-platform-0123456789abcdef"
            );
        } else {
            assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
            assert!(up.seen().is_empty());
        }
        // Open or not, the reserved platform tenant and malformed ids are never tenants.
        for bad in ["_platform", "bad id"] {
            let got = send(&client(), post(bad)).await;
            assert_eq!(got.status, 401, "{bad}: {}", got.text());
        }
    }
}

#[tokio::test]
async fn platform_fallback_uses_the_platform_key() {
    let h = Harness::new(&format!(
        "pricing: {}/config/pricing.yaml\ntenants:\n  small: {{ fallback: [platform] }}\n  strict: {{ fallback: [] }}\n",
        env!("CARGO_MANIFEST_DIR")
    ))
    .await;
    h.env
        .add_key("_platform", "anthropic", "sk-ant-platform-0123456789")
        .await;
    store_reloaded(&h.byokd, &h.env).await;
    let got = send(
        &client(),
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "small")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        h.up.last().headers["x-api-key"],
        "sk-ant-platform-0123456789"
    );
    // Billed to the tenant, paid by the platform: key_source says so.
    let m = metrics(h.byokd.admin_addr).await;
    assert!(
        m.lines().any(|l| l.starts_with("byokd_cost_usd_total")
            && l.contains("tenant=\"small\"")
            && l.contains("key_source=\"platform\"")),
        "{m}"
    );
    // A tenant whose fallback is empty gets no_key, and nothing is sent.
    let before = h.up.seen().len();
    let got = send(
        &client(),
        request(
            "POST",
            &h.url("/anthropic/v1/messages"),
            &[("x-tenant-id", "strict")],
            MESSAGES,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (403, "no_key"));
    assert_eq!(h.up.seen().len(), before);
}

#[tokio::test]
async fn one_store_change_is_one_reload_not_a_loop() {
    let h = Harness::new("").await;
    h.env
        .add_key("gamma", "openai", "sk-gamma-0123456789abcdef")
        .await;
    let reloads = async || {
        let m = metrics(h.byokd.admin_addr).await;
        sample(&m, "byokd_config_reloads_total", &["result=\"ok\""]).unwrap_or(0.0)
    };
    eventually("the reload", Duration::from_secs(5), async || {
        reloads().await >= 1.0
    })
    .await;
    // A negative check: a feedback loop (reload -> read -> event -> reload) turns every
    // ~50 ms (the coalescing delay), so 400 ms more would show it several times over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let reloads = reloads().await;
    assert!(
        (1.0..=2.0).contains(&reloads),
        "one write caused {reloads} reloads"
    );
}

#[tokio::test]
async fn hostile_requests_are_refused_before_the_provider() {
    let h = Harness::new("tenants:\n  strict: { fallback: [] }\n").await;
    h.env
        .add_key("_platform", "openai", "sk-platform-0123456789abcdef")
        .await;
    h.env.add_key("strict", "anthropic", CANARY_ANTHROPIC).await;
    store_reloaded(&h.byokd, &h.env).await;
    let c = client();
    // Nobody can name the reserved platform tenant to borrow its key.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "_platform")],
            CHAT,
        ),
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
    // Paths that would leave the provider's base path once normalised upstream.
    for path in [
        "/mistral/../v1/chat/completions",
        "/mistral/v1/%2e%2e/x",
        "/mistral/v1%2fx",
        "/openai//v1/models",
    ] {
        let got = send(
            &c,
            request("POST", &h.url(path), &[("x-tenant-id", "acme")], CHAT),
        )
        .await;
        assert_eq!(
            (got.status.as_u16(), got.code()),
            (404, "unknown_route"),
            "{path}"
        );
    }
    // TRACE would echo the injected key back.
    let got = send(
        &c,
        request(
            "TRACE",
            &h.url("/v1/models"),
            &[("x-tenant-id", "acme")],
            "",
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (405, "method_not_allowed")
    );
    assert!(
        h.up.seen().is_empty(),
        "a refused request reached the provider"
    );
    // An upstream cannot forge byokd's verdict header.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme"), ("x-fake-forge", "1")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.code(),
        "",
        "x-byokd-error from the upstream passed through"
    );
}

#[tokio::test]
async fn a_vanished_store_file_keeps_the_last_good_state() {
    let h = Harness::new("").await;
    std::fs::rename(h.env.store_path(), h.env.dir.path().join("moved.json")).unwrap();
    // The watcher sees the file go and its reload fails: the last good state stays.
    eventually("the failed reload", Duration::from_secs(5), async || {
        let m = metrics(h.byokd.admin_addr).await;
        sample(&m, "byokd_config_reloads_total", &["result=\"error\""]).unwrap_or(0.0) >= 1.0
    })
    .await;
    let got = send(
        &client(),
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
}

#[tokio::test]
async fn streams_are_metered_without_the_apps_opt_in_and_look_untouched() {
    let h = Harness::new("").await;
    let c = client();
    let tenant = ("x-tenant-id", "acme");

    // The app did not ask for usage: byokd asks, meters, and hides it.
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[tenant, ("x-fake-events", "5")],
            CHAT_STREAM,
        ),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.text(),
        openai_events(5, "gpt-4o-mini", false).concat(),
        "the app must see the stream it asked for"
    );
    assert!(!got.headers.contains_key("content-length"));
    let sent: serde_json::Value = serde_json::from_slice(&h.up.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        sent["messages"][0]["content"], "hi",
        "the rest of the body is unchanged"
    );
    assert_eq!(
        h.up.last().headers["content-length"],
        h.up.last().body.len().to_string().as_str()
    );

    // The app asked itself: the request and the stream pass unchanged.
    let own = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let got = send(
        &c,
        request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[tenant, ("x-fake-events", "2")],
            own,
        ),
    )
    .await;
    assert_eq!(got.text(), openai_events(2, "gpt-4o-mini", true).concat());
    assert_eq!(h.up.last().body.as_ref(), own.as_bytes());

    // Non-streaming requests are never edited.
    send(
        &c,
        request("POST", &h.url("/v1/chat/completions"), &[tenant], CHAT),
    )
    .await;
    assert_eq!(h.up.last().body.as_ref(), CHAT.as_bytes());

    let m = metrics_after(h.byokd.admin_addr, h.up.seen().len()).await;
    // Two streams metered (120 prompt incl. 100 cached each): one byokd asked for, one the app did.
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "tenant=\"acme\"",
                "provider=\"openai\"",
                "model=\"gpt-4o-mini\"",
                "type=\"cached_input\""
            ]
        ),
        Some(200.0)
    );
}

#[tokio::test]
async fn stream_usage_can_be_turned_off_per_provider() {
    let up = fake_upstream().await;
    let yaml = config_yaml(&up.url(), "").replace(
        "mistral: { base_url: ",
        "mistral: { stream_usage: false, base_url: ",
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "mistral", "mistral-key-0123456789")
        .await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/mistral/v1/chat/completions", b.data_addr),
            &[("x-tenant-id", "acme"), ("x-fake-events", "2")],
            CHAT_STREAM,
        ),
    )
    .await;
    assert_eq!(got.text(), openai_events(2, "gpt-4o-mini", false).concat());
    assert_eq!(
        up.last().body.as_ref(),
        CHAT_STREAM.as_bytes(),
        "stream_usage: false must not edit the body"
    );
}
