//! `GET /byokd/usage` and `GET /admin/tenants/{t}/usage`: this month's tokens and cost per
//! provider and model, persisted so they survive a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;
use sha2::{Digest, Sha256};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const ADMIN_TOKEN: &str = "admin-secret-for-tests";

fn env_with_admin(upstream: &str) -> Env {
    let pricing = format!(
        "pricing: {}/config/pricing.yaml\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let digest = hex::encode(Sha256::digest(ADMIN_TOKEN.as_bytes()));
    let yaml = config_yaml(upstream, &pricing).replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!("admin: {{ listen: 127.0.0.1:0, token_sha256: \"{digest}\" }}"),
    );
    Env::new(&yaml)
}

fn check_totals(v: &serde_json::Value) {
    assert_eq!(v["tenant"], "acme");
    assert_eq!(v["period"].as_str().unwrap().len(), 7, "YYYY-MM");
    let m = &v["providers"]["openai"]["gpt-4o-mini"];
    assert_eq!(m["requests"], 2);
    assert_eq!(m["tokens"]["input"], 20 + 11);
    assert_eq!(m["tokens"]["cached_input"], 100);
    assert_eq!(m["tokens"]["output"], 20 + 7);
    assert_eq!(m["tokens"]["reasoning"], 10);
    // 28,500 + 5,850 nano-dollars at gpt-4o-mini prices, as an exact decimal.
    assert_eq!(m["cost_usd"], "0.00003435");
    assert_eq!(v["cost_usd"], "0.00003435");
    assert_eq!(v["limits"]["default_provider"], "openai");
}

#[tokio::test]
async fn usage_api_for_the_tenant_and_the_admin_survives_restart() {
    let up = fake_upstream().await;
    let env = env_with_admin(&up.url());
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let c = client();
    let data = |p: &str| format!("http://{}{p}", b.data_addr);
    send(
        &c,
        request(
            "POST",
            &data("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT_STREAM,
        ),
    )
    .await;
    send(
        &c,
        request(
            "POST",
            &data("/v1/chat/completions"),
            &[("x-tenant-id", "acme")],
            CHAT,
        ),
    )
    .await;
    // The ledger is written as each response is recorded.
    metrics_after(b.admin_addr, up.seen().len()).await;

    let got = send(
        &c,
        request("GET", &data("/byokd/usage"), &[("x-tenant-id", "acme")], ""),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    check_totals(&got.json());
    let before = up.seen().len();
    let got = send(&c, request("GET", &data("/byokd/usage"), &[], "")).await;
    assert_eq!((got.status.as_u16(), got.code()), (401, "unknown_tenant"));
    assert_eq!(
        up.seen().len(),
        before,
        "the usage API never reaches a provider"
    );

    let admin = |p: &str| format!("http://{}{p}", b.admin_addr);
    let got = send(
        &c,
        request("GET", &admin("/admin/tenants/acme/usage"), &[], ""),
    )
    .await;
    assert_eq!(got.status, 401);
    let got = send(
        &c,
        request(
            "GET",
            &admin("/admin/tenants/acme/usage"),
            &[("authorization", "Bearer wrong")],
            "",
        ),
    )
    .await;
    assert_eq!(got.status, 401);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let got = send(
        &c,
        request(
            "GET",
            &admin("/admin/tenants/acme/usage"),
            &[("authorization", &bearer)],
            "",
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    check_totals(&got.json());

    // Restart: the totals come back from the ledger beside the key store.
    b.shutdown().await;
    assert!(env.dir.path().join(".byokd/usage.json").exists());
    let b = byokd::server::start(env.config()).await.unwrap();
    let got = send(
        &c,
        request(
            "GET",
            &format!("http://{}/byokd/usage", b.data_addr),
            &[("x-tenant-id", "acme")],
            "",
        ),
    )
    .await;
    check_totals(&got.json());
}

#[tokio::test]
async fn admin_api_is_off_without_a_token_hash() {
    let env = Env::new(&config_yaml("http://127.0.0.1:9", ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let got = send(
        &client(),
        request(
            "GET",
            &format!("http://{}/admin/tenants/acme/usage", b.admin_addr),
            &[("authorization", "Bearer anything")],
            "",
        ),
    )
    .await;
    assert_eq!(got.status, 404);
    assert!(got.text().contains("admin API disabled"));
}
