//! AWS KMS end to end, through the real binary against moto's KMS server: envelope records
//! under a KMS key, single-flight decryption, a moved record refused, the KMS frozen and
//! thawed mid-run (stale cache serves, cold misses fail fast, recovery by itself), rotation
//! with a stream in flight, master-key rotation with `keys rewrap` under load, revocation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::bin::*;
use common::*;

const CANARY_2: &str = "sk-canary-ROTATED-99aa88bb77cc66dd";
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn aws_config(upstream: &str, moto: &str) -> String {
    format!(
        r#"identity:
  - header: {{ name: x-tenant-id }}
kms:
  aws: {{ key_id: alias/byokd, region: us-east-1, endpoint_url: "{moto}", timeout: 1s }}
store:
  file: {{ path: .byokd/keys.json }}
key_cache: {{ ttl: 2s, stale_ttl: 1h }}
audit: {{ file: audit.jsonl }}
providers:
  openai: {{ kind: openai, base_url: "{upstream}" }}
"#
    )
}

async fn chat(base: &str, tenant: &str) -> Got {
    send(
        &client(),
        request(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[
                ("x-tenant-id", tenant),
                ("content-type", "application/json"),
            ],
            CHAT,
        ),
    )
    .await
}

fn decrypts(env: &Env, key_id: &str) -> usize {
    env.audit_events()
        .iter()
        .filter(|l| l["event"] == "key_decrypt" && l["key_id"] == key_id)
        .count()
}

/// Refreshes of a key past its TTL that the KMS did not answer (the stale entry then serves).
fn failed_refreshes(env: &Env, key_id: &str) -> usize {
    env.audit_events()
        .iter()
        .filter(|l| {
            l["event"] == "key_decrypt"
                && l["key_id"] == key_id
                && l["reason"] == "ttl_refresh"
                && l["ok"] == false
        })
        .count()
}

/// Whether `key_id` was decrypted through the KMS key `kek`.
fn decrypted_under(env: &Env, key_id: &str, kek: &str) -> bool {
    env.audit_events().iter().any(|l| {
        l["event"] == "key_decrypt"
            && l["key_id"] == key_id
            && l["kek_id"] == kek
            && l["ok"] == true
    })
}

fn store_json(env: &Env) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(env.store_path()).unwrap()).unwrap()
}

fn add(env: &Env, tenant: &str, secret: &str) -> String {
    let out = ok(byokd_env(
        &env.config_path,
        &["keys", "add", "--tenant", tenant, "--provider", "openai"],
        Some(secret),
        AWS_ENV,
    ));
    out.split_whitespace().next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_kms_envelopes_through_the_real_binary() {
    let moto = Moto::start().await;
    let key_a = moto.create_key().await;
    moto.alias("alias/byokd", &key_a).await;
    let up = fake_upstream().await;
    let env = Env::new(&aws_config(&up.url(), &moto.url));

    // Register: the record is wrapped by the KMS key the alias names, context-bound.
    let acme = add(&env, "acme", CANARY_OPENAI);
    let burst = add(&env, "burst", "sk-burst-0123456789abcdefghij");
    let cold = add(&env, "cold", "sk-cold-0123456789abcdefghijk");
    let store = store_json(&env);
    for r in store["keys"].as_array().unwrap() {
        assert_eq!(r["kek_id"], key_a.as_str(), "{r}");
    }
    let store_text = std::fs::read_to_string(env.store_path()).unwrap();
    assert!(!store_text.contains("canary"));

    // The wrapped data key is bound by KMS itself to {tenant, provider, key_id}: KMS refuses
    // it under any other context (not only byokd's AES-GCM binding).
    {
        use base64::Engine as _;
        let r = store["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == acme.as_str())
            .unwrap();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(r["wrapped_dek"].as_str().unwrap())
            .unwrap();
        let kms = moto.client().await;
        let decrypt = |tenant: &str| {
            kms.decrypt()
                .ciphertext_blob(aws_sdk_kms::primitives::Blob::new(blob.clone()))
                .encryption_context("tenant", tenant)
                .encryption_context("provider", "openai")
                .encryption_context("key_id", acme.as_str())
                .send()
        };
        let ok = decrypt("acme").await.unwrap();
        assert_eq!(ok.plaintext().unwrap().as_ref().len(), 32);
        let err = decrypt("thief").await.unwrap_err();
        assert_eq!(
            aws_sdk_kms::error::ProvideErrorMetadata::code(&err),
            Some("InvalidCiphertextException")
        );
    }

    let s = serve_env(&env, "serve", AWS_ENV).await;
    let got = chat(&s.data, "acme").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // Single flight: 100 concurrent cold requests, one Decrypt.
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let base = s.data.clone();
        tasks.push(tokio::spawn(
            async move { chat(&base, "burst").await.status },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        decrypts(&env, &burst),
        1,
        "one Decrypt for 100 cold requests"
    );
    let admin: std::net::SocketAddr = s.admin.parse().unwrap();
    let m = metrics(admin).await;
    assert_eq!(
        sample(&m, "byokd_key_decryptions_total", &["tenant=\"burst\""]),
        Some(1.0),
        "{m}"
    );
    // A warm key makes no KMS call at all (the first request warms it, if the burst outlasted
    // the TTL).
    assert_eq!(chat(&s.data, "acme").await.status, 200);
    let before = decrypts(&env, &acme);
    for _ in 0..20 {
        assert_eq!(chat(&s.data, "acme").await.status, 200);
    }
    assert_eq!(decrypts(&env, &acme), before);

    // A record copied to another tenant fails at KMS (encryption context) and is not served.
    let mut data = store_json(&env);
    let mut moved = data["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == acme.as_str())
        .unwrap()
        .clone();
    moved["tenant"] = "thief".into();
    data["keys"].as_array_mut().unwrap().push(moved);
    let tmp = env.store_path().with_extension("edit");
    std::fs::write(&tmp, serde_json::to_vec(&data).unwrap()).unwrap();
    std::fs::rename(&tmp, env.store_path()).unwrap();
    assert!(
        poll_until(Duration::from_secs(3), async || {
            chat(&s.data, "thief").await.code() == "key_unavailable"
        })
        .await
        .is_some(),
        "a moved record must not decrypt: {}",
        s.logs()
    );
    // Logs go through a background writer: give the line a moment to land.
    assert!(
        poll_until(Duration::from_secs(2), async || s
            .logs()
            .contains("failed to decrypt"))
        .await
        .is_some(),
        "{}",
        s.logs()
    );
    assert!(
        env.audit_events()
            .iter()
            .any(|l| l["event"] == "key_decrypt" && l["tenant"] == "thief" && l["ok"] == false)
    );
    data["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|r| r["tenant"] != "thief");
    std::fs::write(&tmp, serde_json::to_vec(&data).unwrap()).unwrap();
    std::fs::rename(&tmp, env.store_path()).unwrap();

    // Start the outage right after acme's key was (re)decrypted, so it is warm.
    let n0 = decrypts(&env, &acme);
    assert!(
        poll_until(Duration::from_secs(6), async || {
            chat(&s.data, "acme").await;
            decrypts(&env, &acme) > n0
        })
        .await
        .is_some()
    );

    // The KMS freezes (SIGSTOP: connections hang, like a slow or partitioned KMS).
    signal(&moto.child, "STOP");
    let t = Instant::now();
    let got = chat(&s.data, "cold").await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.code(), "key_unavailable");
    assert!(got.headers.contains_key("retry-after"));
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "a cold miss must fail fast, took {:?}",
        t.elapsed()
    );
    // Fails at once while cooling down, without waiting on the KMS again.
    let t = Instant::now();
    assert_eq!(chat(&s.data, "cold").await.code(), "key_unavailable");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Warm keys keep serving, also past their TTL (2s) inside the stale window: once past it,
    // a request tries to refresh the key through the frozen KMS (audited as failed) and is
    // still served from the stale entry.
    assert_eq!(chat(&s.data, "acme").await.status, 200);
    eventually(
        "a failed TTL refresh of acme's key",
        Duration::from_secs(10),
        async || {
            let got = chat(&s.data, "acme").await;
            assert_eq!(got.status, 200, "stale key must serve: {}", got.text());
            assert_eq!(
                up.last().headers["authorization"],
                format!("Bearer {CANARY_OPENAI}").as_str()
            );
            failed_refreshes(&env, &acme) > 0
        },
    )
    .await;
    // The KMS comes back: byokd recovers by itself.
    signal(&moto.child, "CONT");
    assert!(
        poll_until(Duration::from_secs(8), async || {
            chat(&s.data, "cold").await.status == 200
        })
        .await
        .is_some(),
        "no recovery after the KMS came back: {}",
        s.logs()
    );
    assert!(decrypts(&env, &cold) >= 1);

    // Rotation: a stream in flight finishes on the old version, new requests get the new one.
    let stream = {
        let base = s.data.clone();
        tokio::spawn(async move {
            send(
                &client(),
                request(
                    "POST",
                    &format!("{base}/v1/chat/completions"),
                    &[
                        ("x-tenant-id", "acme"),
                        ("x-fake-pace-ms", "150"),
                        ("x-fake-events", "8"),
                    ],
                    r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
                ),
            )
            .await
        })
    };
    // The stream is in flight once the provider has it (8 events 150 ms apart).
    eventually(
        "the stream to reach the provider",
        Duration::from_secs(5),
        async || {
            up.seen()
                .iter()
                .any(|r| r.headers.contains_key("x-fake-pace-ms"))
        },
    )
    .await;
    let out = ok(byokd_env(
        &env.config_path,
        &["keys", "rotate", "--tenant", "acme", "--provider", "openai"],
        Some(CANARY_2),
        AWS_ENV,
    ));
    assert!(out.contains("v2") && out.contains("v1 retired"), "{out}");
    assert!(
        poll_until(Duration::from_secs(2), async || {
            chat(&s.data, "acme").await.status == 200
                && up.last().headers["authorization"] == format!("Bearer {CANARY_2}").as_str()
        })
        .await
        .is_some(),
        "rotation did not take effect within 2s"
    );
    let streamed = stream.await.unwrap();
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.text().matches("chat.completion.chunk").count(), 8);

    // Master-key rotation: a new KMS key behind the alias, `keys rewrap` under load.
    let key_b = moto.create_key().await;
    moto.alias("alias/byokd", &key_b).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU32::new(0));
    let sent = Arc::new(AtomicU32::new(0));
    let mut load = Vec::new();
    for tenant in ["acme", "burst", "cold"] {
        let (stop, failures, sent, base) =
            (stop.clone(), failures.clone(), sent.clone(), s.data.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if chat(&base, tenant).await.status != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("the load to run", Duration::from_secs(5), async || {
        sent.load(Ordering::Relaxed) >= 6
    })
    .await;
    let out = ok(byokd_env(
        &env.config_path,
        &["keys", "rewrap"],
        None,
        AWS_ENV,
    ));
    assert!(out.contains("rewrapped 4"), "{out}");
    // Past the TTL every key in use is decrypted again, now under key B.
    eventually(
        "every key re-decrypted under the new KMS key",
        Duration::from_secs(10),
        async || {
            [&acme, &burst, &cold]
                .iter()
                .all(|id| decrypted_under(&env, id, &key_b))
                && sent.load(Ordering::Relaxed) > 20
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during rewrap"
    );
    assert!(sent.load(Ordering::Relaxed) > 20);
    for r in store_json(&env)["keys"].as_array().unwrap() {
        if r["state"] != "revoked" {
            assert_eq!(r["kek_id"], key_b.as_str(), "{r}");
        }
    }
    let rewraps = env
        .audit_events()
        .iter()
        .filter(|l| l["event"] == "key_rewrap")
        .count();
    assert_eq!(rewraps, 4);

    // Revocation stops use within 2 seconds.
    ok(byokd_env(
        &env.config_path,
        &["keys", "revoke", &acme],
        None,
        AWS_ENV,
    ));
    assert!(
        poll_until(Duration::from_secs(2), async || {
            chat(&s.data, "acme").await.code() == "no_key"
        })
        .await
        .is_some()
    );

    // The KMS process dies (connection refused, not a hang): a key past its TTL keeps
    // serving from the stale window, answered fast.
    let mut moto = moto;
    let _ = moto.child.kill();
    let _ = moto.child.wait();
    eventually(
        "a failed TTL refresh of burst's key",
        Duration::from_secs(10),
        async || {
            let t = Instant::now();
            let got = chat(&s.data, "burst").await;
            assert_eq!(
                got.status,
                200,
                "stale serving with the KMS gone: {}",
                got.text()
            );
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            failed_refreshes(&env, &burst) > 0
        },
    )
    .await;

    // No key material anywhere byokd writes.
    let m = metrics(admin).await;
    let audit = std::fs::read_to_string(env.dir.path().join("audit.jsonl")).unwrap();
    let store_text = std::fs::read_to_string(env.store_path()).unwrap();
    for (what, text) in [
        ("logs", s.logs()),
        ("metrics", m),
        ("audit", audit),
        ("store", store_text),
    ] {
        for canary in [CANARY_OPENAI, CANARY_2] {
            assert_no_secret(&text, canary, what);
        }
        assert!(!text.contains("canary"), "a canary leaked into {what}");
    }
}
