//! Vertex AI through the real binary: the tenant's service account is exchanged for an OAuth
//! token (a JWT signed with its RSA key, checked here by signing it again), cached and minted
//! once for concurrent requests; google-genai (Vertex mode) and AnthropicVertex reach Gemini
//! and Claude in the tenant's project, metered as Gemini and Anthropic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use common::bin::*;
use common::*;

const EMAIL: &str = "byokd-test@tenant-proj.iam.gserviceaccount.com";
const TOKEN: &str = "ya29.canary-VERTEX-access-token";

fn token_requests(up: &FakeUpstream) -> Vec<Seen> {
    up.seen()
        .into_iter()
        .filter(|s| s.path == "/token")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vertex_sdks_reach_the_tenants_project_with_a_minted_token() {
    let up = fake_upstream().await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let pem = key.serialize_pem();
    // The token endpoint checks each grant against the account's key, as Google's does.
    up.know_google_key(EMAIL, &key.serialize_der());
    // Another key claiming the same account: its grants are refused.
    let forged = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .unwrap()
        .serialize_pem();
    let sa = serde_json::json!({
        "type": "service_account", "project_id": "tenant-proj", "private_key_id": "kid-1",
        "private_key": pem, "client_email": EMAIL, "client_id": "1",
        "token_uri": "https://evil.example/token",
    })
    .to_string();
    let yaml = config_yaml(&up.url(), "")
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  vertex: {{ kind: vertex, location: europe-west1, base_url: \"{u}\", token_uri: \"{u}/token\" }}\n",
                u = up.url()
            ),
        )
        .replace("allowed_providers: [openai,", "allowed_providers: [vertex, openai,");
    let env = Env::new(&yaml);
    let out = ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "acme", "--provider", "vertex"],
        Some(&sa),
    ));
    assert!(out.contains("byo....com"), "masked by its email: {out}");
    let bad = byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "acme", "--provider", "vertex"],
        Some(r#"{"type": "authorized_user", "client_email": "x", "private_key": "y"}"#),
    );
    assert!(!bad.status.success());
    let forged_sa = serde_json::json!({
        "type": "service_account", "project_id": "tenant-proj", "private_key_id": "kid-9",
        "private_key": forged, "client_email": EMAIL,
    })
    .to_string();
    ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "forger", "--provider", "vertex"],
        Some(&forged_sa),
    ));
    let s = serve(&env).await;

    // A grant signed by a key Google does not know for the account: refused, and byokd
    // answers 503 key_unavailable without sending the request.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{}/vertex/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-flash:generateContent", s.data),
            &[("x-tenant-id", "forger")],
            r#"{"contents":[]}"#,
        ),
    )
    .await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (503, "key_unavailable"),
        "{}",
        got.text()
    );
    assert!(
        up.seen()
            .iter()
            .all(|r| !r.path.contains(":generateContent"))
    );

    // Ten requests at once: one token is minted, the others wait for it.
    let path = "/vertex/v1beta1/projects/app-side/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent";
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let url = format!("{}{path}", s.data);
        tasks.push(tokio::spawn(async move {
            send(
                &client(),
                request(
                    "POST",
                    &url,
                    &[
                        ("x-tenant-id", "acme"),
                        ("authorization", "Bearer app-side"),
                    ],
                    r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#,
                ),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // The forger's refused grant, then one token for ten concurrent requests.
    let minted = token_requests(&up);
    assert_eq!(minted.len(), 2, "one token for ten concurrent requests");
    let minted = &minted[1..];

    // The grant: a JWT for this account, for the configured token endpoint (not the one the
    // account names), signed RS256 with its key (PKCS#1 v1.5 is deterministic: signing the
    // same input again gives the same signature).
    let form: Vec<(String, String)> = form_urlencoded::parse(&minted[0].body)
        .into_owned()
        .collect();
    assert_eq!(
        form[0],
        (
            "grant_type".into(),
            "urn:ietf:params:oauth:grant-type:jwt-bearer".into()
        )
    );
    let jwt = &form[1].1;
    let (signed, sig) = jwt.rsplit_once('.').unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&B64URL.decode(signed.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(claims["iss"], EMAIL);
    assert_eq!(claims["aud"], format!("{}/token", up.url()));
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/cloud-platform"
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&key.serialize_der()).unwrap();
    let mut again = vec![0; pair.public_modulus_len()];
    pair.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut again,
    )
    .unwrap();
    assert_eq!(sig, B64URL.encode(&again));

    // The official SDKs: Gemini and Claude on Vertex, the app's project and location
    // replaced by the account's project and the configured location.
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/sdk/vertex_clients.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([s.data.as_str(), "acme"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["gemini"]["total"], 4, "{got}");
    assert!(got["anthropic"]["input"].as_u64().unwrap() > 0, "{got}");
    let seen = up.seen();
    let calls: Vec<&Seen> = seen.iter().filter(|s| s.path != "/token").collect();
    let claude = calls.last().unwrap();
    assert_eq!(
        claude.path,
        "/v1/projects/tenant-proj/locations/europe-west1/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict"
    );
    let gemini = calls[calls.len() - 2];
    assert!(
        gemini.path.starts_with("/v1beta1/projects/tenant-proj/locations/europe-west1/publishers/google/models/gemini-2.5-flash:generateContent"),
        "{}",
        gemini.path
    );
    for c in &calls {
        assert_eq!(
            c.headers["authorization"],
            format!("Bearer {TOKEN}").as_str()
        );
    }
    assert_eq!(token_requests(&up).len(), 2, "the token is cached");

    // An OpenAI SDK by model name: Vertex's OpenAI endpoint in the tenant's project.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{}/v1/chat/completions", s.data),
            &[("x-tenant-id", "acme"), ("content-type", "application/json")],
            r#"{"model":"vertex/google/gemini-2.5-flash","messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let seen = up.last();
    assert_eq!(
        seen.path,
        "/v1/projects/tenant-proj/locations/europe-west1/endpoints/openapi/chat/completions"
    );
    assert!(String::from_utf8_lossy(&seen.body).contains(r#""model":"google/gemini-2.5-flash""#));
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {TOKEN}").as_str()
    );

    // Metered as Gemini and as Anthropic, under the provider `vertex`.
    let m = metrics_after(s.admin.parse().unwrap(), 13).await;
    let input = |model: &str| {
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "provider=\"vertex\"",
                &format!("model=\"{model}\""),
                "type=\"input\"",
            ],
        )
    };
    assert_eq!(input("gemini-2.0-flash"), Some(3.0 * 11.0), "{m}");
    assert!(
        input("claude-3-5-haiku-20241022").is_some_and(|n| n > 0.0),
        "{m}"
    );
    // Priced from the compiled-in Vertex prices (Claude's `model@version` matches its model).
    assert!(
        sample(&m, "byokd_cost_usd_total", &["provider=\"vertex\""]).is_some_and(|c| c > 0.0),
        "{m}"
    );
    let logs = s.logs();
    for secret in [TOKEN, &pem[40..80], jwt.as_str()] {
        assert_no_secret(&logs, secret, "byokd's logs");
        assert_no_secret(&m, secret, "the metrics");
    }
}
