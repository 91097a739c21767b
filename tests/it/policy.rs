//! Rate limits and budgets through the real server: requests, tokens and concurrency per
//! tenant and per (tenant, provider); budgets that hold under 50 concurrent requests, survive
//! a restart and show in the usage API and metrics; the same rules global across two
//! replicas sharing Redis; Redis stopped and restarted mid-run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bin::*;
use common::*;

/// A chat request with an output cap: its reservation is 25 input tokens (100 bytes) plus
/// 1,000 output tokens of gpt-4o-mini, 603,750 nano-dollars.
const CHAT_CAPPED: &str = r#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi there, byokd"}]}"#;

fn pricing() -> String {
    format!(
        "pricing: {}/config/pricing.yaml\n",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn chat_to(addr: &str, tenant: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> Got {
    let mut h = vec![
        ("x-tenant-id", tenant),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    send(
        &client(),
        request("POST", &format!("{addr}{path}"), &h, body),
    )
    .await
}

async fn chat(r: &byokd::server::Running, tenant: &str, extra: &[(&str, &str)]) -> Got {
    chat_to(
        &format!("http://{}", r.data_addr),
        tenant,
        "/v1/chat/completions",
        CHAT_CAPPED,
        extra,
    )
    .await
}

#[tokio::test]
async fn request_token_and_concurrency_limits_per_tenant_and_provider() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(
        &up.url(),
        "tenants:\n  acme:\n    limits:\n      requests_per_minute: 5\n      providers:\n        anthropic: { requests_per_minute: 1 }\n  slow: { limits: { concurrent: 2 } }\n  hungry: { limits: { tokens_per_minute: 20 } }\n  duo: { limits: { providers: { anthropic: { requests_per_minute: 1 } } } }\n",
    ));
    for t in ["acme", "slow", "hungry", "duo"] {
        env.add_key(t, "openai", CANARY_OPENAI).await;
    }
    env.add_key("duo", "anthropic", CANARY_ANTHROPIC).await;
    let r = byokd::server::start(env.config()).await.unwrap();

    // Requests per minute: 5 pass, the 6th is refused before the provider.
    for i in 0..5 {
        assert_eq!(chat(&r, "acme", &[]).await.status, 200, "request {i}");
    }
    let before = up.seen().len();
    let got = chat(&r, "acme", &[]).await;
    assert_eq!((got.status.as_u16(), got.code()), (429, "rate_limited"));
    let wait: u64 = got.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=12).contains(&wait),
        "retry-after {wait}: one request refills in 12 s"
    );
    assert_eq!(got.json()["error"]["code"], "rate_limited");
    assert_eq!(up.seen().len(), before);

    // Per (tenant, provider): `duo` may call anthropic once a minute, openai freely.
    let base = format!("http://{}", r.data_addr);
    let anthropic = async || {
        chat_to(
            &base,
            "duo",
            "/anthropic/v1/messages",
            r#"{"model":"claude-3-5-haiku-20241022","max_tokens":5,"messages":[]}"#,
            &[],
        )
        .await
    };
    assert_eq!(anthropic().await.status, 200);
    assert_eq!(anthropic().await.code(), "rate_limited");
    for _ in 0..3 {
        assert_eq!(chat(&r, "duo", &[]).await.status, 200);
    }

    // Concurrency: two streams in flight, the third waits its turn.
    let slow = |r: &byokd::server::Running| {
        let addr = format!("http://{}", r.data_addr);
        async move {
            chat_to(
                &addr,
                "slow",
                "/v1/chat/completions",
                r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
                &[("x-fake-pace-ms", "300"), ("x-fake-events", "3")],
            )
            .await
        }
    };
    let a = tokio::spawn(slow(&r));
    let b = tokio::spawn(slow(&r));
    // Both hold their slot once the provider has them (each then streams for 600 ms).
    eventually(
        "both slow streams at the provider",
        Duration::from_secs(5),
        async || paced(&up, "300") == 2,
    )
    .await;
    let got = chat(&r, "slow", &[]).await;
    assert_eq!((got.status.as_u16(), got.code()), (429, "rate_limited"));
    assert_eq!(a.await.unwrap().status, 200);
    assert_eq!(b.await.unwrap().status, 200);
    assert_eq!(chat(&r, "slow", &[]).await.status, 200, "slots come back");

    // Tokens per minute: debited with the metered usage (18 tokens) when the response ends.
    assert_eq!(chat(&r, "hungry", &[]).await.status, 200);
    assert_eq!(chat(&r, "hungry", &[]).await.status, 200);
    let got = chat(&r, "hungry", &[]).await;
    assert_eq!((got.status.as_u16(), got.code()), (429, "rate_limited"));
    let m = metrics(r.admin_addr).await;
    assert!(
        sample(
            &m,
            "byokd_rejections_total",
            &["tenant=\"duo\"", "reason=\"rate_limited\""]
        ) == Some(1.0)
            && sample(
                &m,
                "byokd_rejections_total",
                &["tenant=\"acme\"", "reason=\"rate_limited\""]
            ) == Some(1.0),
        "{m}"
    );
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_cannot_overspend_a_budget_that_fits_ten() {
    let up = fake_upstream().await;
    // 6,100,000 nano-dollars: room for 10 reservations of 603,750, not 11.
    let extra = format!(
        "{}tenants:\n  acme: {{ budget: {{ monthly_usd: 0.0061, alert_at: 0.5 }} }}\n  small: {{ budget: {{ monthly_usd: 0.0007 }} }}\n",
        pricing()
    );
    let env = Env::new(&config_yaml(&up.url(), &extra));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("small", "openai", CANARY_OPENAI).await;
    let r = byokd::server::start(env.config()).await.unwrap();
    let addr = format!("http://{}", r.data_addr);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            chat_to(
                &addr,
                "acme",
                "/v1/chat/completions",
                CHAT_CAPPED,
                &[("x-fake-delay-ms", "400")],
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let got = t.await.unwrap();
        match got.status.as_u16() {
            200 => ok += 1,
            429 => {
                assert_eq!(got.code(), "budget_exceeded");
                assert_eq!(got.headers["x-should-retry"], "false");
            }
            s => panic!("unexpected {s}: {}", got.text()),
        }
    }
    assert_eq!(ok, 10, "exactly the ten reservations that fit");
    assert_eq!(
        up.seen().len(),
        10,
        "refused requests never reach the provider"
    );

    // Sequentially, each reservation is settled to its real cost (5,850): `small` (700,000)
    // fits a request while spend + 603,750 stays within it, so exactly 17 pass.
    let mut n = 0;
    while chat(&r, "small", &[]).await.status == 200 {
        n += 1;
        assert!(n <= 17, "overspent");
    }
    assert_eq!(n, 17);
    let usage = send(
        &client(),
        request(
            "GET",
            &format!("{addr}/byokd/usage"),
            &[("x-tenant-id", "acme")],
            "",
        ),
    )
    .await
    .json();
    let b = &usage["limits"]["budget"];
    assert_eq!(b["monthly_usd"], "0.0061");
    let spent: f64 = b["spent_usd"].as_str().unwrap().parse().unwrap();
    assert!(spent <= 0.0061, "{usage}");
    assert!(b["resets_at"].as_str().unwrap().ends_with("-01T00:00:00Z"));
    let m = metrics(r.admin_addr).await;
    assert_eq!(
        sample(&m, "byokd_budget_limit_usd", &["tenant=\"acme\""]),
        Some(0.0061)
    );
    assert!(sample(&m, "byokd_budget_spent_usd", &["tenant=\"acme\""]).is_some());
    r.shutdown().await;

    // Spend survives a restart: the exhausted budget stays exhausted.
    let r = byokd::server::start(env.config()).await.unwrap();
    let got = chat(&r, "small", &[]).await;
    assert_eq!(got.code(), "budget_exceeded", "{}", got.text());
    r.shutdown().await;
}

fn redis_yaml(upstream: &str, url: &str, prefix: &str, tenants: &str) -> String {
    config_yaml(
        upstream,
        &format!(
            "{}shared_state: {{ redis: {{ url: \"{url}\", prefix: \"{prefix}\" }} }}\ntenants:\n{tenants}",
            pricing()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_rate_limits_and_budget_through_redis() {
    let up = fake_upstream().await;
    let prefix = format!("byokd-test-{}-{:x}:", std::process::id(), rand_u64());
    let yaml = redis_yaml(
        &up.url(),
        "redis://127.0.0.1:6379",
        &prefix,
        "  acme: { limits: { requests_per_minute: 6 } }\n  beta: { budget: { monthly_usd: 0.0025 } }\n  conc: { limits: { concurrent: 2 } }\n  tok: { limits: { tokens_per_minute: 20 } }\n  both: { limits: { requests_per_minute: 100, providers: { openai: { concurrent: 5 } } }, budget: { monthly_usd: 1 } }\n",
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("beta", "openai", "sk-beta-0123456789abcdefghij")
        .await;
    for t in ["conc", "tok", "both"] {
        env.add_key(t, "openai", CANARY_OPENAI).await;
    }
    let a = serve_env(&env, "a", &[]).await;
    let b = serve_env(&env, "b", &[]).await;

    // Six requests a minute, for both replicas together.
    let mut ok = 0;
    for i in 0..10 {
        let s = if i % 2 == 0 { &a } else { &b };
        let got = chat_to(&s.data, "acme", "/v1/chat/completions", CHAT_CAPPED, &[]).await;
        match got.status.as_u16() {
            200 => ok += 1,
            429 => assert_eq!(got.code(), "rate_limited"),
            st => panic!("{st}: {}", got.text()),
        }
    }
    assert_eq!(ok, 6, "the limit holds across replicas");

    // A budget of 2,500,000 nano-dollars fits four reservations of 603,750: 20 concurrent
    // requests spread over both replicas, four get through.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let base = if i % 2 == 0 {
            a.data.clone()
        } else {
            b.data.clone()
        };
        tasks.push(tokio::spawn(async move {
            chat_to(
                &base,
                "beta",
                "/v1/chat/completions",
                CHAT_CAPPED,
                &[("x-fake-delay-ms", "400")],
            )
            .await
            .status
            .as_u16()
        }));
    }
    let mut passed = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            passed += 1;
        }
    }
    assert_eq!(passed, 4, "the budget holds across replicas");

    // Two in flight at once across both replicas; the slots come back when they end.
    let slow = |base: String| async move {
        chat_to(
            &base,
            "conc",
            "/v1/chat/completions",
            CHAT_CAPPED,
            &[("x-fake-delay-ms", "500")],
        )
        .await
        .status
        .as_u16()
    };
    let runs: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(slow(if i % 2 == 0 {
                a.data.clone()
            } else {
                b.data.clone()
            }))
        })
        .collect();
    let mut codes = Vec::new();
    for r in runs {
        codes.push(r.await.unwrap());
    }
    codes.sort();
    assert_eq!(
        codes,
        [200, 200, 429, 429],
        "two concurrent for both replicas together"
    );
    assert_eq!(
        slow(b.data.clone()).await,
        200,
        "slots released through Redis"
    );

    // Tokens per minute, debited in Redis with each response's 18 metered tokens.
    assert_eq!(
        chat_to(&a.data, "tok", "/v1/chat/completions", CHAT_CAPPED, &[])
            .await
            .status,
        200
    );
    assert_eq!(
        chat_to(&b.data, "tok", "/v1/chat/completions", CHAT_CAPPED, &[])
            .await
            .status,
        200
    );
    let mut refused = false;
    for _ in 0..20 {
        let got = chat_to(&a.data, "tok", "/v1/chat/completions", CHAT_CAPPED, &[]).await;
        if got.code() == "rate_limited" {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "the token debit must reach Redis from both replicas"
    );

    // Limits on two scopes and a budget in one request: the finish script's full form.
    for s in [&a, &b] {
        assert_eq!(
            chat_to(&s.data, "both", "/v1/chat/completions", CHAT_CAPPED, &[])
                .await
                .status,
            200
        );
    }
    let key = format!(
        "{prefix}{{both}}:spend:{}",
        byokd::vocab::clock::month_of(byokd::vocab::unix_now())
    );
    assert!(
        eventually_sync(|| {
            let out = Command::new("redis-cli")
                .args(["-p", "6379", "GET", &key])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == "11700"
        }),
        "spend of `both` in Redis"
    );

    // The spend settled in Redis: 4 × 5,850.
    let out = Command::new("redis-cli")
        .args(["-p", "6379", "GET"])
        .arg(format!(
            "{prefix}{{beta}}:spend:{}",
            byokd::vocab::clock::month_of(byokd::vocab::unix_now())
        ))
        .output()
        .unwrap();
    let spend = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        eventually_sync(|| {
            let out = Command::new("redis-cli")
                .args(["-p", "6379", "GET"])
                .arg(format!(
                    "{prefix}{{beta}}:spend:{}",
                    byokd::vocab::clock::month_of(byokd::vocab::unix_now())
                ))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == "23400"
        }),
        "spend in Redis: {spend}"
    );
    redis_forget(&prefix);
}

fn eventually_sync(mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A throwaway redis-server on a free port, stopped on drop.
/// Requests the fake provider saw with `x-fake-pace-ms: pace`.
fn paced(up: &FakeUpstream, pace: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.headers.get("x-fake-pace-ms").is_some_and(|v| v == pace))
        .count()
}

/// `redis-cli -p port args...`, its answer trimmed.
fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("redis-cli is needed for this test");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct OwnRedis {
    child: Child,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for this test");
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnRedis { child }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_and_restarted_mid_run() {
    let up = fake_upstream().await;
    let port = free_port();
    let redis = OwnRedis::start(port);
    let yaml = redis_yaml(
        &up.url(),
        &format!("redis://127.0.0.1:{port}"),
        "t:",
        "  acme: { limits: { requests_per_minute: 600 }, budget: { monthly_usd: 100 } }\n  open: { limits: { requests_per_minute: 600 }, budget: { monthly_usd: 100, on_shared_state_error: fail_open } }\n  few: { limits: { requests_per_minute: 2 } }\n  strict: { limits: { requests_per_minute: 600, on_shared_state_error: fail_closed } }\n",
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("open", "openai", "sk-open-0123456789abcdefghij")
        .await;
    env.add_key("few", "openai", CANARY_OPENAI).await;
    env.add_key("strict", "openai", CANARY_OPENAI).await;
    let r = byokd::server::start(env.config()).await.unwrap();
    // Connected: both tenants are served.
    let t = Instant::now();
    while chat(&r, "acme", &[]).await.status != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never connected to Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&r, "open", &[]).await.status, 200);
    assert_eq!(
        sample(&metrics(r.admin_addr).await, "byokd_shared_state_up", &[]),
        Some(1.0)
    );

    // Redis goes away: rate limits fail open (local accounting), budgets fail closed unless
    // the tenant's says fail_open.
    redis.stop();
    let got = chat(&r, "acme", &[]).await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (503, "shared_state_unavailable"),
        "{}",
        got.text()
    );
    assert!(got.headers.contains_key("retry-after"));
    for _ in 0..3 {
        assert_eq!(chat(&r, "open", &[]).await.status, 200);
    }
    // Local accounting meanwhile: `few` still gets only two a minute.
    assert_eq!(chat(&r, "few", &[]).await.status, 200);
    assert_eq!(chat(&r, "few", &[]).await.status, 200);
    assert_eq!(chat(&r, "few", &[]).await.code(), "rate_limited");
    // A limit that says fail_closed refuses instead.
    assert_eq!(
        chat(&r, "strict", &[]).await.code(),
        "shared_state_unavailable"
    );
    assert_eq!(
        sample(&metrics(r.admin_addr).await, "byokd_shared_state_up", &[]),
        Some(0.0)
    );

    // Redis comes back (empty: it keeps nothing on disk): byokd reconnects by itself, seeds
    // the spend from its ledger and adds what it spent locally meanwhile.
    let _redis = OwnRedis::start(port);
    let t = Instant::now();
    while chat(&r, "acme", &[]).await.status != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no recovery after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(&metrics(r.admin_addr).await, "byokd_shared_state_up", &[]),
        Some(1.0)
    );
    assert_eq!(chat(&r, "open", &[]).await.status, 200);
    // open: 1 + 3 + 1 requests of 5,850 nano-dollars, all in Redis now.
    let key = format!(
        "t:{{open}}:spend:{}",
        byokd::vocab::clock::month_of(byokd::vocab::unix_now())
    );
    assert!(
        eventually_sync(|| {
            let out = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "GET", &key])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == "29250"
        }),
        "spend not reconciled"
    );
    r.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_crosses_the_budget_is_cut_cleanly_when_asked() {
    let up = fake_upstream().await;
    // 20,000 nano-dollars; the stream's input (~24 tokens at 150) plus 600 per event crosses
    // it at the 29th event of 50.
    let extra = format!(
        "{}tenants:\n  streamy: {{ budget: {{ monthly_usd: 0.00002, on_exhausted: cut }} }}\n  steady: {{ budget: {{ monthly_usd: 0.00002 }} }}\n",
        pricing()
    );
    let env = Env::new(&config_yaml(&up.url(), &extra));
    env.add_key("streamy", "openai", CANARY_OPENAI).await;
    env.add_key("steady", "openai", CANARY_OPENAI).await;
    let r = byokd::server::start(env.config()).await.unwrap();
    let base = format!("http://{}", r.data_addr);
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#;
    let stream = |tenant: &'static str| {
        let base = base.clone();
        async move {
            chat_to(
                &base,
                tenant,
                "/v1/chat/completions",
                body,
                &[("x-fake-events", "50"), ("x-fake-pace-ms", "5")],
            )
            .await
        }
    };
    let got = stream("streamy").await;
    assert_eq!(got.status, 200);
    let text = got.text();
    let chunks = text.matches("chat.completion.chunk").count();
    assert!(
        (25..=32).contains(&chunks),
        "cut near the budget, got {chunks} chunks: {text}"
    );
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let err: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(
        err["error"]["code"], "budget_exceeded",
        "an OpenAI-shaped error event: {last}"
    );
    assert!(!text.contains("[DONE]"));
    // The upstream stream was cancelled, not read to the end.
    let t = Instant::now();
    while *up.state.cancelled.lock().unwrap() == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "upstream not cancelled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Billed from the running estimate; the next request is refused.
    let got = chat(&r, "streamy", &[]).await;
    assert_eq!(got.code(), "budget_exceeded");
    let usage = send(
        &client(),
        request(
            "GET",
            &format!("{base}/byokd/usage"),
            &[("x-tenant-id", "streamy")],
            "",
        ),
    )
    .await
    .json();
    let spent: f64 = usage["limits"]["budget"]["spent_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (0.00002..0.0000215).contains(&spent),
        "overspend at most one event: {spent}"
    );

    // Without `cut`, the same stream runs to its end.
    let got = stream("steady").await;
    assert_eq!(got.text().matches("chat.completion.chunk").count(), 50);
    assert!(got.text().contains("[DONE]"));
    r.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_blip_does_not_hold_a_concurrency_slot_for_its_ttl() {
    let up = fake_upstream().await;
    let port = free_port();
    let redis = OwnRedis::start(port);
    let yaml = redis_yaml(
        &up.url(),
        &format!("redis://127.0.0.1:{port}"),
        "b:",
        "  one: { limits: { concurrent: 1 } }\n",
    );
    let env = Env::new(&yaml);
    env.add_key("one", "openai", CANARY_OPENAI).await;
    let r = byokd::server::start(env.config()).await.unwrap();
    let t = Instant::now();
    while chat(&r, "one", &[]).await.status != 200 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "never connected to Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The release of that request's slot runs right after its response: let it land.
    eventually(
        "the first request's slot released",
        Duration::from_secs(5),
        async || redis_cli(port, &["ZCARD", "b:{one}:conc"]) == "0",
    )
    .await;
    // A stream holds the one slot; Redis freezes while it runs, so its end cannot release it.
    let base = format!("http://{}", r.data_addr);
    let stream = tokio::spawn(async move {
        chat_to(
            &base,
            "one",
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
            &[("x-fake-pace-ms", "200"), ("x-fake-events", "6")],
        )
        .await
    });
    eventually(
        "the stream at the provider",
        Duration::from_secs(5),
        async || paced(&up, "200") == 1,
    )
    .await;
    let pid = redis.child.id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert_eq!(stream.await.unwrap().status, 200);
    // The release at the stream's end times out against the frozen Redis, which marks the
    // shared state down.
    eventually(
        "the release to fail against the frozen Redis",
        Duration::from_secs(5),
        async || {
            let m = metrics(r.admin_addr).await;
            sample(&m, "byokd_shared_state_up", &[]) == Some(0.0)
        },
    )
    .await;
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    // Once Redis answers, the release is retried: the slot is free in seconds, not 15 minutes.
    let t = Instant::now();
    loop {
        let got = chat(&r, "one", &[]).await;
        if got.status == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "slot still held after Redis returned: {}",
            got.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r.shutdown().await;
    drop(redis);
}
