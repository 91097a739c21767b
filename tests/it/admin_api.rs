//! The admin API on the admin listener (in-process server, file store): token checks and
//! their audit, key registration with validation and a live check, listing without secrets,
//! rotation, expiry and its metric, revocation, platform tokens; the audit sink failing
//! closed or open; local-KEK rotation with `rewrap` while requests flow.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use sha2::Digest;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn yaml(upstream: &str, extra: &str) -> String {
    config_yaml(upstream, extra).replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!(
            "admin: {{ listen: 127.0.0.1:0, token_sha256: \"{}\" }}",
            hex::encode(sha2::Sha256::digest(ADMIN_TOKEN))
        ),
    )
}

/// Every admin response of this test binary, for the leak check.
static SEEN: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

async fn call(
    r: &byokd::server::Running,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Got {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("content-type", "application/json")];
    if !token.is_empty() {
        headers.push(("authorization", &auth));
    }
    let got = send(
        &client(),
        request(
            method,
            &format!("http://{}{path}", r.admin_addr),
            &headers,
            body,
        ),
    )
    .await;
    SEEN.lock().unwrap().push_str(&got.text());
    got
}

async fn admin(r: &byokd::server::Running, method: &str, path: &str, body: &str) -> Got {
    call(r, method, path, ADMIN_TOKEN, body).await
}

async fn chat(r: &byokd::server::Running, headers: &[(&str, &str)]) -> Got {
    send(
        &client(),
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", r.data_addr),
            headers,
            CHAT,
        ),
    )
    .await
}

#[tokio::test]
async fn admin_api_manages_keys_and_tokens_and_never_returns_a_secret() {
    let up = fake_upstream().await;
    let env = Env::new(&yaml(&up.url(), "audit: { file: audit.jsonl }\n"));
    let r = byokd::server::start(env.config()).await.unwrap();
    let mut seen = String::new();

    // The token is required, checked, and every refusal is audited.
    assert_eq!(call(&r, "GET", "/admin/keys", "", "").await.status, 401);
    assert_eq!(
        call(&r, "GET", "/admin/keys", "wrong", "").await.status,
        401
    );
    let denied = env
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "admin_denied")
        .count();
    assert_eq!(denied, 2);

    // Validation, with messages that say what to fix.
    for (body, status, needle) in [
        (
            r#"{"tenant":"a b","provider":"openai","secret":"sk-0123456789abcdefghij"}"#,
            400,
            "tenant id",
        ),
        (
            r#"{"tenant":"_platform2","provider":"openai","secret":"sk-0123456789abcdefghij"}"#,
            400,
            "reserved",
        ),
        (
            r#"{"tenant":"acme","provider":"nope","secret":"sk-0123456789abcdefghij"}"#,
            400,
            "configured: ",
        ),
        (
            r#"{"tenant":"acme","provider":"openai","secret":"pk-0123456789abcdefghij"}"#,
            400,
            "start with `sk-`",
        ),
        (
            r#"{"tenant":"acme","provider":"anthropic","secret":"sk-0123456789abcdefghij"}"#,
            400,
            "sk-ant-",
        ),
        (
            r#"{"tenant":"acme","provider":"openai","secret":"sk-0123456789abcdefghij","expires_in":"soon"}"#,
            400,
            "duration",
        ),
        (
            r#"{"tenant":"acme","provider":"openai","secret":"sk-0123456789abcdefghij","colour":1}"#,
            400,
            "colour",
        ),
        (r#"{"tenant":"acme","provider":"openai"}"#, 400, "secret"),
        ("not json", 400, "invalid JSON"),
    ] {
        let got = admin(&r, "POST", "/admin/keys", body).await;
        assert_eq!(got.status, status, "{body}: {}", got.text());
        assert!(got.text().contains(needle), "{body}: {}", got.text());
        assert_eq!(got.json()["error"]["code"], "invalid_request");
        seen.push_str(&got.text());
    }
    // A value in the wrong place is not echoed back.
    let got = admin(
        &r,
        "POST",
        "/admin/keys",
        &format!(r#"{{"tenant":"acme","provider":"openai","secret":7,"label":"{CANARY_OPENAI}"}}"#),
    )
    .await;
    assert_eq!(got.status, 400);
    seen.push_str(&got.text());

    // `verify`: one list-models call with the key; a rejected key is refused, not stored.
    let got = admin(
        &r,
        "POST",
        "/admin/keys",
        r#"{"tenant":"acme","provider":"openai","secret":"sk-rejected-0123456789abcdef","verify":true}"#,
    )
    .await;
    assert_eq!(got.status, 422, "{}", got.text());
    assert_eq!(got.json()["error"]["code"], "key_rejected");
    let probe = up.last();
    assert_eq!(
        (probe.method.as_str(), probe.path.as_str()),
        ("GET", "/v1/models")
    );
    assert_eq!(
        probe.headers["authorization"],
        "Bearer sk-rejected-0123456789abcdef"
    );

    // Register, verified.
    let body = format!(
        r#"{{"tenant":"acme","provider":"openai","secret":"{CANARY_OPENAI}","label":"prod","verify":true}}"#
    );
    let got = admin(&r, "POST", "/admin/keys", &body).await;
    assert_eq!(got.status, 201, "{}", got.text());
    seen.push_str(&got.text());
    let id = got.json()["id"].as_str().unwrap().to_string();
    assert_eq!(got.json()["masked"], "sk-...e5f6");
    assert_eq!(got.json()["version"], 1);
    // Served at once (read-your-writes), with the key injected.
    let got = chat(&r, &[("x-tenant-id", "acme")]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // List: masked, no ciphertext, no wrapped key.
    let got = admin(&r, "GET", "/admin/keys?tenant=acme", "").await;
    assert_eq!(got.status, 200);
    seen.push_str(&got.text());
    let keys = got.json()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["label"], "prod");
    for field in ["ciphertext", "wrapped_dek", "nonce"] {
        assert!(!got.text().contains(field), "{field} listed");
    }

    // Rotate: version 2 serves new requests at once; version 1 is retired.
    let got = admin(
        &r,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        r#"{"secret":"sk-rotated-0123456789abcdefgh"}"#,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["version"], 2);
    assert_eq!(chat(&r, &[("x-tenant-id", "acme")]).await.status, 200);
    assert_eq!(
        up.last().headers["authorization"],
        "Bearer sk-rotated-0123456789abcdefgh"
    );
    let states: Vec<String> = admin(&r, "GET", "/admin/keys?tenant=acme", "").await.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| format!("v{} {}", k["version"], k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, ["v1 retired", "v2 active"]);
    assert_eq!(
        admin(
            &r,
            "POST",
            "/admin/keys/key_nope/rotate",
            r#"{"secret":"sk-0123456789abcdefghij"}"#
        )
        .await
        .status,
        404
    );

    // Expiry: near-expiry keys show in a metric; an expired key is `no_key`.
    let got = admin(
        &r,
        "POST",
        "/admin/keys",
        r#"{"tenant":"brief","provider":"openai","secret":"sk-brief-0123456789abcdefgh","expires_in":"2s"}"#,
    )
    .await;
    assert_eq!(got.status, 201, "{}", got.text());
    assert!(got.json()["expires_at"].as_i64().is_some());
    let m = metrics(r.admin_addr).await;
    assert_eq!(
        sample(&m, "byokd_keys_expiring_soon", &["tenant=\"brief\""]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(chat(&r, &[("x-tenant-id", "brief")]).await.status, 200);
    // Expiry is in whole unix seconds: within 2 s the key is refused, and only ever served or
    // refused as expired on the way.
    eventually("the key to expire", Duration::from_secs(5), async || {
        let got = chat(&r, &[("x-tenant-id", "brief")]).await;
        if got.status == 200 {
            return false;
        }
        assert_eq!(got.code(), "no_key", "{}", got.text());
        true
    })
    .await;

    // Platform tokens: issued once, usable as the SDK's api_key, revoked live.
    let got = admin(&r, "POST", "/admin/tokens", r#"{"tenant":"acme"}"#).await;
    assert_eq!(got.status, 201, "{}", got.text());
    let token = got.json()["token"].as_str().unwrap().to_string();
    let token_id = got.json()["id"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");
    assert_eq!(chat(&r, &[("authorization", &bearer)]).await.status, 200);
    assert_ne!(
        up.last().headers["authorization"],
        bearer.as_str(),
        "the platform token must not go upstream"
    );
    let got = admin(&r, "DELETE", &format!("/admin/tokens/{token_id}"), "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        chat(&r, &[("authorization", &bearer)]).await.code(),
        "unknown_tenant"
    );

    // Revoke.
    let got = admin(&r, "DELETE", &format!("/admin/keys/{id}"), "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["revoked_versions"], 2);
    assert_eq!(chat(&r, &[("x-tenant-id", "acme")]).await.code(), "no_key");
    assert_eq!(
        admin(&r, "DELETE", "/admin/keys/key_nope", "").await.status,
        404
    );

    // The audit trail has every change and every call, and no key material.
    let events = env.audit_events();
    for e in [
        "key_register",
        "key_rotate",
        "key_revoke",
        "token_issue",
        "token_revoke",
        "key_decrypt",
        "admin_call",
        "admin_denied",
    ] {
        assert!(
            events.iter().any(|x| x["event"] == e),
            "no {e} in {events:#?}"
        );
    }
    let audit = std::fs::read_to_string(env.dir.path().join("audit.jsonl")).unwrap();
    let m = metrics(r.admin_addr).await;
    let seen = seen + &SEEN.lock().unwrap();
    for (what, text) in [("responses", &seen), ("audit", &audit), ("metrics", &m)] {
        for secret in [
            CANARY_OPENAI,
            "sk-rotated-0123456789abcdefgh",
            "sk-brief-0123456789abcdefgh",
        ] {
            assert_no_secret(text, secret, what);
        }
    }
    r.shutdown().await;
}

#[tokio::test]
async fn a_failing_audit_sink_fails_closed_by_default_and_open_when_configured() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    // /dev/full takes the open but fails every write: a full audit disk.
    for (extra, status) in [
        ("audit: { file: /dev/full }\n", 503),
        ("audit: { file: /dev/full, on_error: fail_closed }\n", 503),
        ("audit: { file: /dev/full, on_error: fail_open }\n", 200),
    ] {
        std::fs::write(&env.config_path, config_yaml(&up.url(), extra)).unwrap();
        let r = byokd::server::start(env.config()).await.unwrap();
        let got = chat(&r, &[("x-tenant-id", "acme")]).await;
        assert_eq!(got.status, status, "{extra}: {}", got.text());
        if status == 503 {
            assert_eq!(got.code(), "key_unavailable");
            assert!(!got.text().contains("canary"));
        }
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_kek_rotation_rewraps_one_record_at_a_time_while_serving() {
    let up = fake_upstream().await;
    let base = config_yaml(&up.url(), "key_cache: { ttl: 300ms }\n");
    let env = Env::new(&base);
    let tenants = ["t1", "t2", "t3", "t4", "t5"];
    for t in tenants {
        env.add_key(t, "openai", &format!("sk-{t}-0123456789abcdefghij"))
            .await;
    }
    // Step 1 of the runbook: a new KEK, active for new records; the old one still readable.
    let k2 = env.dir.path().join(".byokd/kek-k2");
    byokd::keys::kms::create_kek_file(&k2).unwrap();
    let rotated = base.replace(
        "local: { keks: { k1: .byokd/kek-k1 }, active: k1 }",
        "local: { keks: { k1: .byokd/kek-k1, k2: .byokd/kek-k2 }, active: k2 }",
    );
    std::fs::write(&env.config_path, &rotated).unwrap();
    let cfg = env.config();
    let r = byokd::server::start(cfg.clone()).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let addr = r.data_addr;
    let mut load = Vec::new();
    for t in tenants {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = send(
                    &client(),
                    request(
                        "POST",
                        &format!("http://{addr}/v1/chat/completions"),
                        &[("x-tenant-id", t)],
                        CHAT,
                    ),
                )
                .await;
                if got.status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("the load to run", Duration::from_secs(5), async || {
        ok.load(Ordering::Relaxed) >= 10
    })
    .await;
    // Step 2: rewrap, as `byokd keys rewrap` does, while the load runs.
    let store = byokd::server::store(&cfg).await.unwrap();
    let kms = byokd::server::kms(&cfg).unwrap();
    let audit = byokd::server::audit(&cfg);
    let done = byokd::keys::manage::rewrap(store.as_ref(), kms.as_ref(), &audit)
        .await
        .unwrap();
    assert_eq!((done.rewrapped, done.failed), (5, 0));
    // Past the cache TTL, every key is decrypted again, now through k2: each tenant's
    // decryption count moves twice after the rewrap (once could be a decryption that began
    // before it).
    let decryptions = |m: &str, t: &str| {
        sample(
            m,
            "byokd_key_decryptions_total",
            &[&format!("tenant=\"{t}\"")],
        )
        .unwrap_or(0.0)
    };
    let m = metrics(r.admin_addr).await;
    let after_rewrap: Vec<f64> = tenants.iter().map(|t| decryptions(&m, t)).collect();
    eventually(
        "every key decrypted again after the rewrap",
        Duration::from_secs(10),
        async || {
            let m = metrics(r.admin_addr).await;
            tenants
                .iter()
                .zip(&after_rewrap)
                .all(|(t, n)| decryptions(&m, t) >= n + 2.0)
                && ok.load(Ordering::Relaxed) > 50
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 50);
    let data = store.load().await.unwrap();
    assert!(data.keys.iter().all(|k| k.kek_id == "k2"));
    // A second run finds nothing to do.
    let again = byokd::keys::manage::rewrap(store.as_ref(), kms.as_ref(), &audit)
        .await
        .unwrap();
    assert_eq!((again.rewrapped, again.current), (0, 5));
    // Step 3: k1 can go; everything still decrypts with k2 alone.
    r.shutdown().await;
    let k2_only = base.replace(
        "local: { keks: { k1: .byokd/kek-k1 }, active: k1 }",
        "local: { keks: { k2: .byokd/kek-k2 }, active: k2 }",
    );
    std::fs::write(&env.config_path, &k2_only).unwrap();
    let r = byokd::server::start(env.config()).await.unwrap();
    for t in tenants {
        let got = chat(&r, &[("x-tenant-id", t)]).await;
        assert_eq!(got.status, 200, "{t}: {}", got.text());
    }
    r.shutdown().await;
}
