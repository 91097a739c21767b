//! End users inside a tenant, through the real server: each held to its own rate and budget
//! while the others pass, named by header or (when allowed) by the body's `user`, stripped
//! before the provider, in the access log and the ledger but never in a metric; usage per end
//! user; one user's budget held across two replicas sharing Redis.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;

use common::bin::*;
use common::*;
use sha2::Digest;

const ADMIN_TOKEN: &str = "admin-secret-for-end-user-tests";
/// Reserves 25 input tokens plus 1,000 output tokens of gpt-4o-mini: 603,750 nano-dollars.
const CHAT_CAPPED: &str = r#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi there, byokd"}]}"#;

fn yaml(upstream: &str, extra: &str) -> String {
    let digest = hex::encode(sha2::Sha256::digest(ADMIN_TOKEN));
    config_yaml(
        upstream,
        &format!(
            "pricing: {}/config/pricing.yaml\n{extra}",
            env!("CARGO_MANIFEST_DIR")
        ),
    )
    .replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!("admin: {{ listen: 127.0.0.1:0, token_sha256: \"{digest}\" }}"),
    )
}

async fn chat(base: &str, tenant: &str, user: Option<&str>, body: &str) -> Got {
    let mut h = vec![
        ("x-tenant-id", tenant),
        ("content-type", "application/json"),
    ];
    if let Some(u) = user {
        h.push(("x-end-user-id", u));
    }
    send(
        &client(),
        request("POST", &format!("{base}/v1/chat/completions"), &h, body),
    )
    .await
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Got {
    send(&client(), request("GET", url, headers, "")).await
}

#[tokio::test]
async fn each_end_user_is_held_to_its_own_limit_and_metered_on_its_own() {
    let up = fake_upstream().await;
    let env = Env::new(&yaml(
        &up.url(),
        "end_user: { from_body: true }\ntenants:\n  acme:\n    limits: { requests_per_minute: 100, end_user: { requests_per_minute: 2 } }\n  strict: { require_end_user: true }\n",
    ));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("strict", "openai", CANARY_OPENAI).await;
    let s = serve(&env).await;
    let base = &s.data;

    // alice is held at two a minute; bob, and requests naming no end user, still pass.
    for _ in 0..2 {
        assert_eq!(
            chat(base, "acme", Some("alice"), CHAT_CAPPED).await.status,
            200
        );
    }
    let before = up.seen().len();
    let got = chat(base, "acme", Some("alice"), CHAT_CAPPED).await;
    assert_eq!((got.status.as_u16(), got.code()), (429, "rate_limited"));
    let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("end user `alice`"), "{msg}");
    assert!(got.headers.contains_key("retry-after"));
    assert_eq!(up.seen().len(), before, "refused before the provider");
    assert_eq!(
        chat(base, "acme", Some("bob"), CHAT_CAPPED).await.status,
        200
    );
    assert!(
        !up.last().headers.contains_key("x-end-user-id"),
        "the end-user header is stripped before the provider"
    );
    assert_eq!(chat(base, "acme", None, CHAT_CAPPED).await.status, 200);
    // From the body's `user` (OpenAI's field) when the header names none: carol, twice, is
    // held like alice.
    let carol = r#"{"model":"gpt-4o-mini","user":"carol","messages":[]}"#;
    assert_eq!(chat(base, "acme", None, carol).await.status, 200);
    assert_eq!(chat(base, "acme", None, carol).await.status, 200);
    assert_eq!(chat(base, "acme", None, carol).await.code(), "rate_limited");
    // The same on a provider's own OpenAI-wire route, whose body is otherwise streamed unread.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{base}/openai/v1/chat/completions"),
            &[
                ("x-tenant-id", "acme"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"gpt-4o-mini","safety_identifier":"erin","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let got = chat(
        base,
        "acme",
        None,
        r#"{"model":"gpt-4o-mini","user":"no spaces/slashes","messages":[]}"#,
    )
    .await;
    assert_eq!((got.status.as_u16(), got.code()), (400, "bad_request"));
    let got = chat(base, "acme", Some("bad id!"), CHAT_CAPPED).await;
    assert_eq!((got.status.as_u16(), got.code()), (400, "bad_request"));

    // A tenant that requires an end user refuses a request without one, naming the header.
    let got = chat(base, "strict", None, CHAT_CAPPED).await;
    assert_eq!((got.status.as_u16(), got.code()), (400, "bad_request"));
    assert!(got.text().contains("x-end-user-id"), "{}", got.text());
    assert_eq!(
        chat(base, "strict", Some("dave"), CHAT_CAPPED).await.status,
        200
    );

    // Usage of one end user, for the calling tenant.
    let usage = get(
        &format!("{base}/byokd/usage?end_user=alice"),
        &[("x-tenant-id", "acme")],
    )
    .await;
    assert_eq!(usage.status, 200, "{}", usage.text());
    let v = usage.json();
    assert_eq!(v["end_user"], "alice");
    assert_eq!(v["providers"]["openai"]["gpt-4o-mini"]["requests"], 2);
    assert_eq!(v["limits"]["rate"]["requests_per_minute"], 2);
    let got = get(
        &format!("{base}/byokd/usage?end_user=a%20b"),
        &[("x-tenant-id", "acme")],
    )
    .await;
    assert_eq!(got.code(), "bad_request");

    // Top spenders first, paged: alice and carol (2 each, by name), then bob and erin (1).
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let page = |q: &'static str| {
        let url = format!("http://{}/admin/tenants/acme/usage?{q}", s.admin);
        let bearer = bearer.clone();
        async move { get(&url, &[("authorization", &bearer)]).await.json() }
    };
    let v = page("by=end_user").await;
    let names: Vec<&str> = v["end_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["end_user"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "carol", "bob", "erin"], "{v}");
    assert_eq!(v["total"], 4);
    assert_eq!(v["end_users"][0]["requests"], 2);
    let v = page("by=end_user&limit=2").await;
    assert_eq!(v["end_users"].as_array().unwrap().len(), 2);
    assert_eq!(v["next_offset"], 2);
    let v = page("by=end_user&limit=2&offset=2").await;
    assert_eq!(v["end_users"][0]["end_user"], "bob");
    assert_eq!(v["end_users"][1]["end_user"], "erin");
    assert!(v["next_offset"].is_null());
    // The tenant's own totals still count every request once.
    let v = page("").await;
    assert_eq!(v["providers"]["openai"]["gpt-4o-mini"]["requests"], 7);

    // In the access log; never in a metric.
    let m = metrics(s.admin.parse().unwrap()).await;
    for u in ["alice", "bob", "carol", "erin"] {
        assert!(!m.contains(u), "{u} became a metric label");
    }
    let logs = s.logs();
    assert!(logs.contains("\"end_user\":\"alice\""), "{logs}");
    assert!(logs.contains("\"end_user\":\"carol\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_end_users_budget_holds_across_two_replicas_sharing_redis() {
    let up = fake_upstream().await;
    let prefix = format!("byokd-eu-{}-{:x}:", std::process::id(), rand_u64());
    // alice may reserve 6,100,000 nano-dollars: ten requests of 603,750, not eleven; the
    // tenant's own budget is far above that.
    let env = Env::new(&yaml(
        &up.url(),
        &format!(
            "shared_state: {{ redis: {{ url: \"redis://127.0.0.1:6379\", prefix: \"{prefix}\" }} }}\ntenants:\n  acme: {{ budget: {{ monthly_usd: 10, end_user_monthly_usd: 0.0061 }} }}\n"
        ),
    ));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let a = serve_env(&env, "a", &[]).await;
    let b = serve_env(&env, "b", &[]).await;

    let mut tasks = Vec::new();
    for i in 0..40 {
        let base = if i % 2 == 0 {
            a.data.clone()
        } else {
            b.data.clone()
        };
        tasks.push(tokio::spawn(async move {
            let h = [
                ("x-tenant-id", "acme"),
                ("x-end-user-id", "alice"),
                ("x-fake-delay-ms", "400"),
            ];
            send(
                &client(),
                request(
                    "POST",
                    &format!("{base}/v1/chat/completions"),
                    &h,
                    CHAT_CAPPED,
                ),
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
                let msg = got.json()["error"]["message"].as_str().unwrap().to_string();
                assert!(msg.contains("end user `alice`"), "{msg}");
            }
            s => panic!("unexpected {s}: {}", got.text()),
        }
    }
    assert_eq!(
        ok, 10,
        "exactly the ten reservations that fit alice's budget"
    );
    // bob has a budget of his own; the tenant's is far from spent.
    for s in [&a, &b] {
        assert_eq!(
            chat(&s.data, "acme", Some("bob"), CHAT_CAPPED).await.status,
            200
        );
    }
    let spend = Command::new("redis-cli")
        .args(["-p", "6379", "--scan", "--pattern"])
        .arg(format!("{prefix}{{acme}}:@alice:spend:*"))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&spend.stdout).trim().is_empty(),
        "alice's spend is kept in Redis beside the tenant's"
    );

    redis_forget(&prefix);
}
