//! One SDK for every provider: a `/v1` chat or embeddings request whose `model` is
//! `provider/model` or a `models:` alias goes to that provider's OpenAI-compatible endpoint
//! with its key, only `model` rewritten, metered in the OpenAI dialect under that provider.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

struct Harness {
    up: FakeUpstream,
    byokd: byokd::server::Running,
    _env: Env,
}

impl Harness {
    async fn new() -> Self {
        let up = fake_upstream().await;
        let env = Env::new(&config_yaml(
            &up.url(),
            "models:\n  fast: gemini/gemini-2.5-flash\n",
        ));
        env.add_key("acme", "openai", CANARY_OPENAI).await;
        env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
        env.add_key("acme", "gemini", CANARY_GEMINI).await;
        let byokd = byokd::server::start(env.config()).await.unwrap();
        Self {
            up,
            byokd,
            _env: env,
        }
    }

    async fn post(&self, path: &str, body: &str) -> Got {
        send(
            &client(),
            request(
                "POST",
                &format!("http://{}{path}", self.byokd.data_addr),
                &[
                    ("x-tenant-id", "acme"),
                    ("authorization", "Bearer app-side-placeholder"),
                    ("content-type", "application/json"),
                ],
                body,
            ),
        )
        .await
    }
}

#[tokio::test]
async fn a_provider_prefix_or_an_alias_reaches_that_provider_through_v1() {
    let h = Harness::new().await;

    // anthropic/...: Anthropic's OpenAI-compatible chat, its own key, only `model` rewritten.
    let body = r#"{"messages":[{"role":"user","content":"hi"}], "model": "anthropic/claude-sonnet-4-5", "max_tokens": 16}"#;
    let got = h.post("/v1/chat/completions", body).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["model"], "claude-sonnet-4-5");
    let s = h.up.last();
    assert_eq!(s.path, "/v1/chat/completions");
    assert_eq!(s.headers["x-api-key"], CANARY_ANTHROPIC);
    assert!(
        !s.headers.contains_key("authorization"),
        "the app's auth is stripped"
    );
    assert_eq!(
        &s.body[..],
        br#"{"messages":[{"role":"user","content":"hi"}], "model": "claude-sonnet-4-5", "max_tokens": 16}"#,
        "every byte but the model name is the app's"
    );

    // An alias: Gemini's OpenAI-compatible path.
    let got = h
        .post(
            "/v1/chat/completions",
            r#"{"model":"fast","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let s = h.up.last();
    assert_eq!(s.path, "/v1beta/openai/chat/completions");
    assert_eq!(s.headers["x-goog-api-key"], CANARY_GEMINI);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&s.body).unwrap()["model"],
        "gemini-2.5-flash"
    );

    // A stream routed by model asks for usage like an OpenAI one, and hides it from the app.
    let got = h
        .post(
            "/v1/chat/completions",
            r#"{"model":"anthropic/claude-sonnet-4-5","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let sent: serde_json::Value = serde_json::from_slice(&h.up.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert!(!got.text().contains("\"usage\""), "{}", got.text());

    // Unprefixed, or a vendor that is no configured provider: the default provider, unchanged.
    for model in ["gpt-4o-mini", "meta-llama/llama-3.3-70b"] {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        let got = h.post("/v1/chat/completions", &body).await;
        assert_eq!(got.status, 200, "{}", got.text());
        let s = h.up.last();
        assert_eq!(
            s.headers["authorization"],
            format!("Bearer {CANARY_OPENAI}")
        );
        assert_eq!(&s.body[..], body.as_bytes());
    }

    // No OpenAI-compatible embeddings at Anthropic: a 400 in OpenAI's shape naming the native
    // route, and nothing sent upstream.
    let before = h.up.seen().len();
    let got = h
        .post(
            "/v1/embeddings",
            r#"{"model":"anthropic/claude-sonnet-4-5","input":"hi"}"#,
        )
        .await;
    assert_eq!(got.status, 400, "{}", got.text());
    let err = got.json();
    assert_eq!(err["error"]["code"], "bad_request", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/anthropic/"),
        "{err}"
    );
    assert_eq!(h.up.seen().len(), before);

    // Metered in the OpenAI dialect, under the provider that answered.
    let m = metrics_after(h.byokd.admin_addr, 6).await;
    for (provider, model, input) in [
        (
            "anthropic",
            "claude-sonnet-4-5",
            11.0 + OPENAI_USAGE.0 as f64,
        ),
        ("gemini", "gemini-2.5-flash", 11.0),
    ] {
        let p = format!("provider=\"{provider}\"");
        let mo = format!("model=\"{model}\"");
        let got = sample(&m, "byokd_tokens_total", &[&p, &mo, "type=\"input\""]).unwrap_or(0.0)
            + sample(
                &m,
                "byokd_tokens_total",
                &[&p, &mo, "type=\"cached_input\""],
            )
            .unwrap_or(0.0);
        assert_eq!(got, input, "{provider}: {m}");
    }
    // No `pricing:` in this config: the compiled-in prices cost the default provider's calls
    // (gpt-4o-mini: 11 input tokens at $0.15 and 7 output at $0.60 per million).
    assert_eq!(
        sample(
            &m,
            "byokd_cost_usd_total",
            &["provider=\"openai\"", "model=\"gpt-4o-mini\""]
        ),
        Some((11.0 * 0.15 + 7.0 * 0.60) / 1e6)
    );
}

#[tokio::test]
async fn a_tenant_not_allowed_the_provider_named_by_model_is_refused() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), "").replace(
        "allowed_providers: [openai, anthropic, gemini, azure, mistral, ollama]",
        "allowed_providers: [openai]",
    ));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    let byokd = byokd::server::start(env.config()).await.unwrap();
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", byokd.data_addr),
            &[("x-tenant-id", "acme")],
            r#"{"model":"anthropic/claude-sonnet-4-5","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(up.seen().is_empty());
}

async fn ask(up: &byokd::server::Running, tenant: &str, model: &str) -> Got {
    send(
        &client(),
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", up.data_addr),
            &[
                ("x-tenant-id", tenant),
                ("content-type", "application/json"),
            ],
            &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        ),
    )
    .await
}

fn sent_model(up: &FakeUpstream) -> String {
    let v: serde_json::Value = serde_json::from_slice(&up.last().body).unwrap();
    v["model"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_tiered_alias_picks_by_its_rule_among_the_tenants_candidates_and_fails_over() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(
        &up.url(),
        "models:\n  cheap: { candidates: [openai/gpt-4o, anthropic/claude-3-5-haiku, gemini/gemini-2.0-flash], rule: cheapest }\n  listed: { candidates: [anthropic/claude-3-5-haiku, openai/gpt-4o] }\n  quick: { candidates: [anthropic/claude-3-5-haiku, openai/gpt-4o], rule: fastest }\n",
    ));
    // acme has no gemini key: gemini-2.0-flash, the cheapest, is not a candidate for it.
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    // beta's anthropic key fails (503): the request moves to the next candidate.
    env.add_key("beta", "openai", CANARY_OPENAI).await;
    env.add_key("beta", "anthropic", "sk-ant-fail503-0123456789abcdef")
        .await;
    // gamma's anthropic key answers after two seconds.
    env.add_key("gamma", "openai", CANARY_OPENAI).await;
    env.add_key("gamma", "anthropic", "sk-ant-slow2s-0123456789abcdef")
        .await;
    let byokd = byokd::server::start(env.config()).await.unwrap();

    // cheapest: claude-3-5-haiku ($4.80 per million in + out) before gpt-4o ($12.50).
    let got = ask(&byokd, "acme", "cheap").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.headers["x-byokd-model"], "anthropic/claude-3-5-haiku");
    assert_eq!(up.last().headers["x-api-key"], CANARY_ANTHROPIC);
    assert_eq!(up.last().path, "/v1/chat/completions");
    assert_eq!(sent_model(&up), "claude-3-5-haiku");

    // order: as listed.
    let got = ask(&byokd, "acme", "listed").await;
    assert_eq!(got.headers["x-byokd-model"], "anthropic/claude-3-5-haiku");

    // Failover moves to the next candidate, with that candidate's model and key.
    let got = ask(&byokd, "beta", "cheap").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.headers["x-byokd-model"], "openai/gpt-4o");
    assert_eq!(got.headers["x-byokd-attempts"], "2");
    assert_eq!(sent_model(&up), "gpt-4o");
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // fastest: each candidate is measured once (unmeasured first, in order), then the
    // faster one is chosen.
    let mut chosen = Vec::new();
    for _ in 0..3 {
        let got = ask(&byokd, "gamma", "quick").await;
        assert_eq!(got.status, 200);
        chosen.push(got.headers["x-byokd-model"].to_str().unwrap().to_string());
    }
    assert_eq!(
        chosen,
        [
            "anthropic/claude-3-5-haiku",
            "openai/gpt-4o",
            "openai/gpt-4o"
        ]
    );

    let m = metrics_after(byokd.admin_addr, 6).await;
    let choice = |alias: &str, c: &str| {
        sample(
            &m,
            "byokd_model_choice_total",
            &[&format!("alias=\"{alias}\""), &format!("choice=\"{c}\"")],
        )
    };
    assert_eq!(
        choice("cheap", "anthropic/claude-3-5-haiku"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(choice("cheap", "openai/gpt-4o"), Some(1.0));
    assert_eq!(choice("quick", "openai/gpt-4o"), Some(2.0));
    // Metered under the provider that answered.
    assert!(
        sample(
            &m,
            "byokd_requests_total",
            &["tenant=\"beta\"", "provider=\"openai\""]
        )
        .is_some(),
        "{m}"
    );
}
