//! Key pools and failover through the real in-process server: least in-flight choice, 429
//! cooldowns, failover chains to another provider and to the platform key, and what is never
//! retried (a stream already started, a body over the inspection bound).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

const KEY_A: &str = "sk-poolA-0000000000000000";
const KEY_B: &str = "sk-poolB-1111111111111111";
/// Rate-limited, with `retry-after-ms: 600` (and `retry-after: 2`, which it overrides).
const KEY_429: &str = "sk-rate429-cool600ms-2222222222";
const KEY_503: &str = "sk-fail503-3333333333333333";
const ROUTER_KEY: &str = "or-router-4444444444444444";
const PLATFORM_KEY: &str = "sk-platform-5555555555555555";

/// byokd with `openai` on one fake (or a dead port) and `openrouter` (OpenAI wire format) on
/// a second fake, so the test sees which upstream answered.
struct Harness {
    up: FakeUpstream,
    router: FakeUpstream,
    byokd: byokd::server::Running,
    _env: Env,
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

impl Harness {
    /// `openai_url`/`router_url` override where the providers point; `keys` are
    /// (tenant, provider, secret), added before start in this order.
    async fn new(
        openai_url: Option<&str>,
        router_url: Option<&str>,
        extra: &str,
        keys: &[(&str, &str, &str)],
    ) -> Self {
        let up = fake_upstream().await;
        let router = fake_upstream().await;
        let mut yaml = config_yaml(&up.url(), extra)
            .replace(
                "providers:\n",
                &format!(
                    "providers:\n  openrouter: {{ kind: openai, base_url: \"{}\" }}\n",
                    router_url.map_or_else(|| router.url(), str::to_string)
                ),
            )
            .replace(
                "allowed_providers: [openai,",
                "allowed_providers: [openai, openrouter,",
            );
        if let Some(u) = openai_url {
            yaml = yaml.replace(
                &format!("openai: {{ kind: openai, base_url: \"{}\" }}", up.url()),
                &format!("openai: {{ kind: openai, base_url: \"{u}\" }}"),
            );
        }
        let env = Env::new(&yaml);
        for (t, p, k) in keys {
            env.add_key(t, p, k).await;
        }
        let byokd = byokd::server::start(env.config()).await.unwrap();
        Self {
            up,
            router,
            byokd,
            _env: env,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.byokd.data_addr, path)
    }

    async fn chat(&self, body: &str) -> Got {
        send(
            &client(),
            request(
                "POST",
                &self.url("/v1/chat/completions"),
                &[
                    ("x-tenant-id", "acme"),
                    ("content-type", "application/json"),
                ],
                body,
            ),
        )
        .await
    }

    async fn metrics(&self) -> String {
        metrics(self.byokd.admin_addr).await
    }
}

fn attempts(g: &Got) -> &str {
    g.headers
        .get("x-byokd-attempts")
        .map_or("", |v| v.to_str().unwrap())
}

fn auth(s: &Seen) -> String {
    s.headers["authorization"].to_str().unwrap().to_string()
}

/// Polls `/metrics` until `name{parts}` reads `want` (the recorder fires at end of stream).
async fn wait_sample(h: &Harness, name: &str, parts: &[&str], want: f64) -> String {
    for _ in 0..50 {
        let m = h.metrics().await;
        if sample(&m, name, parts) == Some(want) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = h.metrics().await;
    panic!("{name}{parts:?} != {want}:\n{m}");
}

#[tokio::test]
async fn two_keys_share_the_load_by_least_in_flight() {
    let h = Harness::new(
        None,
        None,
        "",
        &[("acme", "openai", KEY_A), ("acme", "openai", KEY_B)],
    )
    .await;
    let c = client();
    // A slow stream holds its key for its whole length...
    let slow = c
        .request(request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[
                ("x-tenant-id", "acme"),
                ("x-fake-pace-ms", "150"),
                ("x-fake-events", "5"),
            ],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    assert_eq!(slow.headers()["x-byokd-attempts"], "1");
    let first = auth(&h.up.last());
    // ...so the next request goes to the other key.
    let got = h.chat(CHAT).await;
    assert_eq!((got.status.as_u16(), attempts(&got)), (200, "1"));
    let second = auth(&h.up.last());
    assert_ne!(first, second, "the busy key was chosen again");
    let mut both = [first.clone(), second.clone()];
    both.sort();
    assert_eq!(both, [format!("Bearer {KEY_A}"), format!("Bearer {KEY_B}")]);
    // The stream ends: its key is free again. Both keys idle and used once, so two sequential
    // requests take one each (a key still counted busy would take neither).
    let body = slow.into_body().collect().await.unwrap().to_bytes();
    assert!(body.ends_with(b"data: [DONE]\n\n"));
    // The lease drops as the body ends on byokd's side, a moment after the client read it.
    let keyring = &h.byokd.proxy.keyring;
    eventually(
        "the stream's key to be idle",
        Duration::from_secs(2),
        async || {
            keyring.snapshot().tenants["acme"]
                .keys
                .iter()
                .all(|r| keyring.pools().load(&r.id).inflight() == 0)
        },
    )
    .await;
    h.chat(CHAT).await;
    let third = auth(&h.up.last());
    h.chat(CHAT).await;
    let fourth = auth(&h.up.last());
    assert_ne!(third, fourth, "idle keys alternate");
    // A single request never goes to two keys when the first answers.
    assert_eq!(h.up.seen().len(), 4);
}

#[tokio::test]
async fn a_rate_limited_key_cools_down_and_the_other_key_answers() {
    let h = Harness::new(
        None,
        None,
        "",
        &[("acme", "openai", KEY_429), ("acme", "openai", KEY_B)],
    )
    .await;
    // Whichever key the first request takes, within two requests the 429 key is tried once,
    // and that request is answered by the other key in the same call.
    let mut retried = None;
    for _ in 0..2 {
        let got = h.chat(CHAT).await;
        assert_eq!(got.status, 200, "{}", got.text());
        if attempts(&got) == "2" {
            retried = Some(got);
            break;
        }
        assert_eq!(attempts(&got), "1");
    }
    let got = retried.expect("the rate-limited key was never tried");
    assert_eq!(
        got.json()["choices"][0]["message"]["content"],
        "Hello from the fake"
    );
    let seen = h.up.seen();
    let n = seen.len();
    assert_eq!(auth(&seen[n - 2]), format!("Bearer {KEY_429}"));
    assert_eq!(auth(&seen[n - 1]), format!("Bearer {KEY_B}"));
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"status_429\""]
        ),
        Some(1.0)
    );
    // While it rests (600 ms), requests skip it.
    for _ in 0..3 {
        let got = h.chat(CHAT).await;
        assert_eq!((got.status.as_u16(), attempts(&got)), (200, "1"));
        assert_eq!(auth(&h.up.last()), format!("Bearer {KEY_B}"));
    }
    assert_eq!(h.up.seen().len(), n + 3);
    // Once the cooldown is over it is tried again (and, still limited, cooled again); until
    // then every request goes to the other key at once.
    eventually(
        "the rate-limited key to be tried again",
        Duration::from_secs(5),
        async || {
            let got = h.chat(CHAT).await;
            assert_eq!(got.status, 200, "{}", got.text());
            if attempts(&got) == "1" {
                assert_eq!(auth(&h.up.last()), format!("Bearer {KEY_B}"));
                return false;
            }
            assert_eq!(attempts(&got), "2");
            let seen = h.up.seen();
            assert_eq!(auth(&seen[seen.len() - 2]), format!("Bearer {KEY_429}"));
            true
        },
    )
    .await;
}

#[tokio::test]
async fn a_503_fails_over_to_the_chain_provider() {
    let h = Harness::new(
        None,
        None,
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_503),
            ("acme", "openrouter", ROUTER_KEY),
        ],
    )
    .await;
    // A stream the app did not ask usage for: the retry is edited for the second provider
    // too, and its usage still stripped.
    let got = h.chat(CHAT_STREAM).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(attempts(&got), "2");
    assert!(!got.text().contains("usage"), "{}", got.text());
    assert_eq!(h.up.seen().len(), 1);
    assert_eq!(auth(&h.up.last()), format!("Bearer {KEY_503}"));
    let r = h.router.last();
    assert_eq!(auth(&r), format!("Bearer {ROUTER_KEY}"));
    assert_eq!(r.path, "/v1/chat/completions");
    assert!(
        std::str::from_utf8(&r.body)
            .unwrap()
            .contains("\"include_usage\":true")
    );
    let m = wait_sample(
        &h,
        "byokd_requests_total",
        &["tenant=\"acme\"", "provider=\"openrouter\"", "code=\"200\""],
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"status_5xx\""]
        ),
        Some(1.0)
    );
    // Metered as the provider that answered; nothing recorded for the failed attempt.
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &["provider=\"openrouter\"", "type=\"output\""]
        ),
        Some(20.0)
    );
    assert!(
        !m.lines()
            .any(|l| l.starts_with("byokd_requests_total") && l.contains("provider=\"openai\"")),
        "{m}"
    );
}

#[tokio::test]
async fn a_connect_error_fails_over_and_skips_the_dead_providers_other_keys() {
    let dead = format!("http://{}", dead_addr());
    let h = Harness::new(
        Some(&dead),
        None,
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_A),
            ("acme", "openai", KEY_B),
            ("acme", "openrouter", ROUTER_KEY),
        ],
    )
    .await;
    let got = h.chat(CHAT).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // One connect attempt: the second openai key would reach the same dead host.
    assert_eq!(attempts(&got), "2");
    assert_eq!(auth(&h.router.last()), format!("Bearer {ROUTER_KEY}"));
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"connect\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn platform_in_the_chain_uses_the_platform_key() {
    let h = Harness::new(
        None,
        None,
        "tenants:\n  acme: { failover: { openai: [platform] } }\n",
        &[
            ("acme", "openai", KEY_503),
            ("_platform", "openai", PLATFORM_KEY),
        ],
    )
    .await;
    let got = h.chat(CHAT).await;
    assert_eq!((got.status.as_u16(), attempts(&got)), (200, "2"));
    let seen = h.up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(auth(&seen[0]), format!("Bearer {KEY_503}"));
    assert_eq!(auth(&seen[1]), format!("Bearer {PLATFORM_KEY}"));
    assert!(h.router.seen().is_empty());
}

#[tokio::test]
async fn after_the_last_attempt_the_upstream_error_passes_through() {
    let h = Harness::new(
        None,
        None,
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_503),
            ("acme", "openrouter", "or-rate429-66666666"),
        ],
    )
    .await;
    let got = h.chat(CHAT).await;
    assert_eq!(got.status, 429);
    assert_eq!(attempts(&got), "2");
    assert_eq!(got.code(), "", "an upstream error is not byokd's");
    assert_eq!(got.headers["retry-after"], "2");
    assert_eq!(got.json()["error"]["code"], "rate_limit_exceeded");
    let m = h.metrics().await;
    for (p, kind) in [("openai", "status_5xx"), ("openrouter", "status_429")] {
        assert_eq!(
            sample(
                &m,
                "byokd_upstream_errors_total",
                &[&format!("provider=\"{p}\""), &format!("kind=\"{kind}\"")]
            ),
            Some(1.0),
            "{m}"
        );
    }

    // A connect error as the last attempt is byokd's own upstream_unreachable.
    let dead = format!("http://{}", dead_addr());
    let h = Harness::new(
        None,
        Some(&dead),
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_503),
            ("acme", "openrouter", ROUTER_KEY),
        ],
    )
    .await;
    let got = h.chat(CHAT).await;
    assert_eq!(
        (got.status.as_u16(), got.code(), attempts(&got)),
        (502, "upstream_unreachable", "2")
    );
}

/// An upstream that answers 200, sends one SSE event, and drops the connection.
async fn broken_stream_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // Read the whole request first, so closing does not reset the connection.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let n = s.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let event = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                let _ = s
                    .write_all(format!("{head}{:x}\r\n{event}\r\n", event.len()).as_bytes())
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_stream_that_started_is_never_retried() {
    let broken = format!("http://{}", broken_stream_upstream().await);
    let h = Harness::new(
        Some(&broken),
        None,
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_A),
            ("acme", "openrouter", ROUTER_KEY),
        ],
    )
    .await;
    let resp = client()
        .request(request(
            "POST",
            &h.url("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT_STREAM,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-byokd-attempts"], "1");
    let body = resp.into_body().collect().await;
    assert!(
        body.is_err(),
        "the cut stream reaches the app as a cut stream"
    );
    // A negative check: a retry would have started as the stream broke, before the client
    // saw the error; a short window catches a late one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(h.router.seen().is_empty(), "a started stream was retried");
}

#[tokio::test]
async fn a_body_over_the_inspection_bound_gets_one_attempt() {
    let h = Harness::new(
        None,
        None,
        "tenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[
            ("acme", "openai", KEY_503),
            ("acme", "openrouter", ROUTER_KEY),
        ],
    )
    .await;
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(1536 * 1024)
    );
    let got = h.chat(&big).await;
    assert_eq!((got.status.as_u16(), attempts(&got)), (503, "1"));
    assert_eq!(got.json()["error"]["message"], "The server is overloaded");
    assert_eq!(h.up.last().body.len(), big.len(), "sent whole, streamed");
    assert!(h.router.seen().is_empty());
    // Within the bound, the same request fails over.
    let got = h.chat(CHAT).await;
    assert_eq!((got.status.as_u16(), attempts(&got)), (200, "2"));
}

#[tokio::test]
async fn a_timeout_before_the_headers_is_not_retried() {
    // The request went out: the provider may be generating (and billing) it, so trying the
    // next provider could bill twice. Only a connect error, 429 or 5xx fails over.
    let h = Harness::new(
        None,
        None,
        "limits: { first_byte_timeout: 300ms }\ntenants:\n  acme: { failover: { openai: [openrouter] } }\n",
        &[("acme", "openai", "sk-slow2s-7777777777777777"), ("acme", "openrouter", ROUTER_KEY)],
    )
    .await;
    let got = h.chat(CHAT).await;
    assert_eq!(
        (got.status.as_u16(), got.code(), attempts(&got)),
        (504, "upstream_timeout", "1")
    );
    assert!(
        h.router.seen().is_empty(),
        "nothing sent to the chain provider"
    );
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_upstream_errors_total",
            &["provider=\"openai\"", "kind=\"timeout\""]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_5xx_on_one_pooled_key_is_retried_on_the_next_key_without_a_chain() {
    let h = Harness::new(
        None,
        None,
        "",
        &[("acme", "openai", KEY_503), ("acme", "openai", KEY_B)],
    )
    .await;
    // Two requests: at least one starts on the failing key and is answered by the other.
    let mut answers = Vec::new();
    for _ in 0..2 {
        let got = h.chat(CHAT).await;
        assert_eq!(got.status, 200, "{}", got.text());
        answers.push(attempts(&got).to_string());
    }
    assert!(answers.contains(&"2".to_string()), "{answers:?}");
    assert!(
        h.up.seen()
            .iter()
            .all(|s| [format!("Bearer {KEY_503}"), format!("Bearer {KEY_B}")].contains(&auth(s)))
    );
    assert!(h.router.seen().is_empty());
}
