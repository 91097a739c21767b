//! Amazon Bedrock through the real binary, with boto3's bedrock-runtime client holding dummy
//! credentials: byokd strips the client's signature, signs anew with the tenant's AWS key
//! (the fake checks it with botocore, as Bedrock would, and refuses a wrong one; the test
//! also signs the received request again with aws-sigv4), or sends a Bedrock API key as a
//! bearer token; Converse usage is metered under the model the path names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::Command;
use std::time::SystemTime;

use common::bin::*;
use common::*;
use sha2::Digest;

const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYcanarySECRET";
const SESSION: &str = "FwoGZXIvYXdzEcanarySESSIONtoken0123456789";
const API_KEY: &str = "ABSKcanaryBedrockApiKey0123456789abcdef";
const MODEL: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";

fn converse(base: &str, tenant: &str) -> serde_json::Value {
    boto3(&[base, tenant])
}

fn boto3(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(format!(
            "{}/tests/sdk/bedrock_converse.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .output()
        .expect("python3 with boto3 (.ci/deps) is required");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The SigV4 signature of the request the fake received, computed again from its signed
/// headers, its body and the tenant's key, at the time it names.
fn signature_of(seen: &Seen, base: &str) -> String {
    signature_with(seen, base, (AKID, SECRET, SESSION))
}

fn signature_with(seen: &Seen, base: &str, (akid, secret, session): (&str, &str, &str)) -> String {
    let auth = seen.headers["authorization"].to_str().unwrap();
    let signed = auth
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap();
    let headers: Vec<(&str, &str)> = signed
        .split(';')
        .map(|n| (n, seen.headers[n].to_str().unwrap()))
        .collect();
    let format =
        time::format_description::parse_borrowed::<2>("[year][month][day]T[hour][minute][second]Z")
            .unwrap();
    let at = time::PrimitiveDateTime::parse(seen.headers["x-amz-date"].to_str().unwrap(), &format)
        .unwrap()
        .assume_utc();
    let identity =
        aws_credential_types::Credentials::new(akid, secret, Some(session.into()), None, "t")
            .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("bedrock")
        .time(SystemTime::from(at))
        .settings(aws_sigv4::http_request::SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let uri = match &seen.query {
        Some(q) => format!("{base}{}?{q}", seen.path),
        None => format!("{base}{}", seen.path),
    };
    let signable = aws_sigv4::http_request::SignableRequest::new(
        &seen.method,
        &uri,
        headers.into_iter(),
        aws_sigv4::http_request::SignableBody::Bytes(&seen.body),
    )
    .unwrap();
    let (_, signature) = aws_sigv4::http_request::sign(signable, &params)
        .unwrap()
        .into_parts();
    signature
}

fn bedrock_yaml(up: &FakeUpstream, provider_extra: &str, extra: &str) -> String {
    config_yaml(&up.url(), extra)
        .replace(
            "providers:\n",
            &format!(
                "providers:\n  bedrock: {{ kind: bedrock, region: us-east-1, base_url: \"{}\"{provider_extra} }}\n",
                up.url()
            ),
        )
        .replace(
            "allowed_providers: [openai,",
            "allowed_providers: [bedrock, openai,",
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_reaches_bedrock_through_byokd_signed_with_the_tenants_key() {
    let up = fake_upstream().await;
    // The fake checks signatures under these keys with botocore, as Bedrock would.
    up.know_aws_key(AKID, SECRET);
    up.know_aws_key("AKIAWRONGSECRETTENANT", "the-secret-aws-knows-0123456789");
    let env = Env::new(&bedrock_yaml(&up, "", ""));
    let access_key = format!(
        r#"{{"access_key_id": "{AKID}", "secret_access_key": "{SECRET}", "session_token": "{SESSION}"}}"#
    );
    let out = ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "acme", "--provider", "bedrock"],
        Some(&access_key),
    ));
    assert!(out.contains("AKI...MPLE"), "masked by its key id: {out}");
    ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "beta", "--provider", "bedrock"],
        Some(API_KEY),
    ));
    let bad = byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "acme", "--provider", "bedrock"],
        Some(r#"{"access_key_id": "AKIAIOSFODNN7EXAMPLE"}"#),
    );
    assert!(!bad.status.success());
    ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "wrong", "--provider", "bedrock"],
        Some(
            r#"{"access_key_id": "AKIAWRONGSECRETTENANT", "secret_access_key": "not-the-secret-aws-knows"}"#,
        ),
    ));
    let s = serve(&env).await;

    // A tenant whose secret is wrong: the fake (botocore) refuses the signature, as Bedrock
    // does, and its answer passes through.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{}/bedrock/model/{MODEL}/converse", s.data),
            &[
                ("x-tenant-id", "wrong"),
                ("content-type", "application/json"),
            ],
            r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("signature we calculated"),
        "{}",
        got.text()
    );

    // An access key: the request is signed anew, for the tenant's key, over what was sent.
    let got = converse(&s.data, "acme");
    assert_eq!(got["text"], "Hello from Bedrock");
    assert_eq!(got["usage"]["inputTokens"], 12);
    let seen = up.last();
    assert!(
        seen.path
            .starts_with("/model/anthropic.claude-3-5-haiku-20241022-v1")
    );
    assert!(seen.path.ends_with("/converse"), "{}", seen.path);
    let auth = seen.headers["authorization"].to_str().unwrap();
    assert!(
        auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={AKID}/")),
        "{auth}"
    );
    assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");
    assert_eq!(seen.headers["x-amz-security-token"], SESSION);
    assert_eq!(
        seen.headers["x-amz-content-sha256"],
        hex::encode(sha2::Sha256::digest(&seen.body)).as_str()
    );
    assert!(!seen.headers.contains_key("x-tenant-id"));
    let signature = auth.rsplit("Signature=").next().unwrap();
    assert_eq!(signature, signature_of(&seen, &up.url()));

    // A Bedrock API key: a bearer token, and none of the client's signing headers.
    let got = converse(&s.data, "beta");
    assert_eq!(got["text"], "Hello from Bedrock");
    let seen = up.last();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {API_KEY}").as_str()
    );
    for h in ["x-amz-date", "x-amz-content-sha256", "x-amz-security-token"] {
        assert!(!seen.headers.contains_key(h), "{h} from the client");
    }

    // ConverseStream: the event stream passes through whole (the SDK checks every frame's
    // CRC) and is metered from its `metadata` event.
    let got = boto3(&[&s.data, "acme", "stream"]);
    assert_eq!(got["text"], "Hello from Bedrock");
    assert_eq!(got["usage"]["outputTokens"], 7);
    let seen = up.last();
    assert!(seen.path.ends_with("/converse-stream"), "{}", seen.path);
    assert_eq!(
        seen.headers["authorization"]
            .to_str()
            .unwrap()
            .rsplit("Signature=")
            .next()
            .unwrap(),
        signature_of(&seen, &up.url())
    );

    // InvokeModel: the model's own answer, Bedrock's token counts in headers.
    let got = boto3(&[&s.data, "acme", "invoke"]);
    assert_eq!(got["text"], "Hi!");
    assert!(up.last().path.ends_with("/invoke"));

    // Metered from Converse's usage (twice), and invoke's headers, under the model the path
    // names.
    let m = metrics_after(s.admin.parse().unwrap(), 4).await;
    let tokens = |ty: &str| {
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "tenant=\"acme\"",
                "provider=\"bedrock\"",
                &format!("model=\"{MODEL}\""),
                &format!("type=\"{ty}\""),
            ],
        )
    };
    assert_eq!(
        (tokens("input"), tokens("cached_input"), tokens("output")),
        (Some(24.0 + 15.0), Some(10.0), Some(14.0 + 6.0)),
        "{m}"
    );
    // Priced from the compiled-in Bedrock prices: 12 × $0.80 + 5 × $0.08 + 7 × $4.00 per
    // million tokens, twice, and 15 × $0.80 + 6 × $4.00.
    let cost = sample(
        &m,
        "byokd_cost_usd_total",
        &["tenant=\"acme\"", "provider=\"bedrock\""],
    )
    .unwrap();
    assert!((cost - 0.000_112).abs() < 1e-12, "{cost}");
    let logs = s.logs();
    for secret in [SECRET, SESSION, API_KEY] {
        assert_no_secret(&logs, secret, "byokd's logs");
        assert_no_secret(&m, secret, "the metrics");
    }
}

/// The platform's own Bedrock access from the pod's environment (here: the AWS variables the
/// standard chain reads first; IRSA's web identity token is the next link), for tenants
/// without a key of their own: no stored secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_fallback_signs_with_the_environments_credential() {
    const ENV_AKID: &str = "AKIAENVIRONMENTPLATFORM";
    const ENV_SECRET: &str = "canaryEnvironmentSecret0123456789abcdef";
    const ENV_SESSION: &str = "canaryEnvironmentSession0123456789";
    let up = fake_upstream().await;
    up.know_aws_key(ENV_AKID, ENV_SECRET);
    let env = Env::new(&bedrock_yaml(
        &up,
        ", platform_credentials: environment",
        "tenants:\n  gamma: { fallback: [platform] }\n  delta: {}\n",
    ));
    let s = serve_env(
        &env,
        "serve",
        &[
            ("AWS_ACCESS_KEY_ID", ENV_AKID),
            ("AWS_SECRET_ACCESS_KEY", ENV_SECRET),
            ("AWS_SESSION_TOKEN", ENV_SESSION),
            ("AWS_REGION", "us-east-1"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    )
    .await;
    for _ in 0..2 {
        let got = converse(&s.data, "gamma");
        assert_eq!(got["text"], "Hello from Bedrock");
    }
    let seen = up.last();
    let auth = seen.headers["authorization"].to_str().unwrap();
    assert!(auth.contains(&format!("Credential={ENV_AKID}/")), "{auth}");
    assert_eq!(seen.headers["x-amz-security-token"], ENV_SESSION);
    assert_eq!(
        auth.rsplit("Signature=").next().unwrap(),
        signature_with(&seen, &up.url(), (ENV_AKID, ENV_SECRET, ENV_SESSION))
    );
    // A tenant not allowed the platform fallback still has no key.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{}/bedrock/model/{MODEL}/converse", s.data),
            &[
                ("x-tenant-id", "delta"),
                ("content-type", "application/json"),
            ],
            r#"{"messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(got.code(), "no_key", "{}", got.text());
    let m = metrics_after(s.admin.parse().unwrap(), 2).await;
    assert_eq!(
        sample(
            &m,
            "byokd_requests_total",
            &["tenant=\"gamma\"", "code=\"200\""]
        ),
        Some(2.0),
        "{m}"
    );
    for secret in [ENV_SECRET, ENV_SESSION] {
        assert_no_secret(&s.logs(), secret, "byokd's logs");
    }
}

/// `on_exhausted: cut` on a Bedrock stream: ended between two event-stream messages with an
/// exception message that boto3 raises, and billed at the running estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bedrock_stream_past_its_budget_ends_with_an_exception_the_sdk_raises() {
    let up = fake_upstream().await;
    up.know_aws_key(AKID, SECRET);
    // Output at $1,000 per million tokens and free input: the budget ($0.0025) admits a
    // request capped at 2 output tokens ($0.002) and is crossed at the third message.
    let env = Env::new(&bedrock_yaml(
        &up,
        "",
        "pricing: prices.yaml\ntenants:\n  acme: { budget: { monthly_usd: 0.0025, on_exhausted: cut } }\n",
    ));
    std::fs::write(
        env.dir.path().join("prices.yaml"),
        "bedrock:\n  anthropic.claude-3-5-haiku: { input: 0, output: 1000 }\n",
    )
    .unwrap();
    let access_key = format!(
        r#"{{"access_key_id": "{AKID}", "secret_access_key": "{SECRET}", "session_token": "{SESSION}"}}"#
    );
    ok(byokd(
        &env.config_path,
        &["keys", "add", "--tenant", "acme", "--provider", "bedrock"],
        Some(&access_key),
    ));
    let s = serve(&env).await;
    let got = boto3(&[&s.data, "acme", "stream-cut"]);
    assert_eq!(got["error"], "throttlingException", "{got}");
    assert!(got["message"].as_str().unwrap().contains("budget"), "{got}");
    // The messages before the cut reached the app; the rest never did.
    assert_eq!(got["text"], "Hello from Bedrock", "{got}");
    let m = metrics_after(s.admin.parse().unwrap(), 1).await;
    let out = sample(
        &m,
        "byokd_tokens_total",
        &["tenant=\"acme\"", "provider=\"bedrock\"", "type=\"output\""],
    );
    assert_eq!(out, Some(3.0), "billed at the running estimate: {m}");
}
