//! Sealed export and import through the real binary: keys move from the file store under a
//! local KEK into PostgreSQL under AWS KMS (moto) while both replicas serve; every key works
//! after the move, the audit log shows each re-wrap, and no key is in the clear on the way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::bin::*;
use common::*;

const CANARY_ROTATED: &str = "sk-canary-ROTATED-0011223344556677";
const CANARY_REVOKED: &str = "sk-canary-REVOKED-8899aabbccddeeff";

fn aws_pg_config(upstream: &str, moto: &str, pg: &str) -> String {
    format!(
        r#"identity:
  - header: {{ name: x-tenant-id }}
  - bearer: {{}}
kms:
  aws: {{ key_id: alias/byokd, region: us-east-1, endpoint_url: "{moto}", timeout: 2s }}
store:
  postgres: {{ url: "{pg}" }}
audit: {{ file: audit.jsonl }}
providers:
  openai: {{ kind: openai, base_url: "{upstream}" }}
  anthropic: {{ kind: anthropic, base_url: "{upstream}" }}
defaults:
  default_provider: openai
  allowed_providers: [openai, anthropic]
"#
    )
}

async fn ask(base: &str, tenant: &str, route: &str) -> Got {
    let path = match route {
        "anthropic" => "/anthropic/v1/messages",
        _ => "/v1/chat/completions",
    };
    send(
        &client(),
        request(
            "POST",
            &format!("{base}{path}"),
            &[
                ("x-tenant-id", tenant),
                ("content-type", "application/json"),
            ],
            r#"{"model":"m","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await
}

fn cli(env: &Env, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    byokd_env(&env.config_path, args, stdin, AWS_ENV)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_move_from_a_local_kek_file_store_into_postgres_under_aws_kms_while_both_serve() {
    // One fake provider per replica, so A's background load never hides what B sent.
    let (up_a, up) = (fake_upstream().await, fake_upstream().await);
    let moto = Moto::start().await;
    let arn = moto.create_key().await;
    moto.alias("alias/byokd", &arn).await;
    let db = PgDb::create().await;

    // The source: the embedded default (file store, local KEK), with a rotated key, a
    // revoked one and a platform token.
    let src = Env::new(&config_yaml(&up_a.url(), "audit: { file: audit.jsonl }\n"));
    let add = |tenant: &str, provider: &str, secret: &str| {
        let out = ok(cli(
            &src,
            &["keys", "add", "--tenant", tenant, "--provider", provider],
            Some(secret),
        ));
        out.split_whitespace().next().unwrap().to_string()
    };
    add("acme", "openai", CANARY_OPENAI);
    add("beta", "anthropic", CANARY_ANTHROPIC);
    add("gamma", "openai", "sk-canary-FIRST-aabbccddeeff0011");
    ok(cli(
        &src,
        &[
            "keys",
            "rotate",
            "--tenant",
            "gamma",
            "--provider",
            "openai",
        ],
        Some(CANARY_ROTATED),
    ));
    let revoked = add("delta", "openai", CANARY_REVOKED);
    ok(cli(&src, &["keys", "revoke", &revoked], None));
    let token = ok(cli(&src, &["token", "new", "--tenant", "acme"], None))
        .trim()
        .to_string();

    let dst = Env::new(&aws_pg_config(&up.url(), &moto.url, &db.url));
    let a = serve_env(&src, "a", AWS_ENV).await;
    let b = serve_env(&dst, "b", AWS_ENV).await;
    assert_eq!(ask(&a.data, "acme", "openai").await.status, 200);
    assert_eq!(ask(&b.data, "acme", "openai").await.status, 401);

    // Replica A keeps serving through the whole move.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let load = tokio::spawn({
        let (stop, served, failed, base) =
            (stop.clone(), served.clone(), failed.clone(), a.data.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let n = if ask(&base, "acme", "openai").await.status == 200 {
                    &served
                } else {
                    &failed
                };
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let export = ok(cli(&src, &["keys", "export"], None));
    for secret in [
        CANARY_OPENAI,
        CANARY_ANTHROPIC,
        CANARY_ROTATED,
        CANARY_REVOKED,
        &token,
    ] {
        assert_no_secret(&export, secret, "the export");
    }
    // A header, five key versions (gamma has two), one token.
    assert_eq!(export.lines().count(), 7, "{export}");
    let src_kek = std::fs::read(src.dir.path().join(".byokd/kek-k1")).unwrap();
    assert!(!export.contains(&base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        &src_kek
    )));

    let src_path = src.config_path.to_str().unwrap();
    let out = ok(cli(
        &dst,
        &["keys", "import", "--from-config", src_path],
        Some(&export),
    ));
    assert!(
        out.contains("imported 5 key versions and 1 tokens (4 re-wrapped, 0 already there"),
        "{out}"
    );

    // Replica B serves every live key, decrypted through AWS KMS, and the token.
    eventually(
        "B serves the moved keys",
        Duration::from_secs(5),
        async || ask(&b.data, "acme", "openai").await.status == 200,
    )
    .await;
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}")
    );
    assert_eq!(ask(&b.data, "beta", "anthropic").await.status, 200);
    assert_eq!(up.last().headers["x-api-key"], CANARY_ANTHROPIC);
    assert_eq!(ask(&b.data, "gamma", "openai").await.status, 200);
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_ROTATED}")
    );
    let got = ask(&b.data, "delta", "openai").await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (403, "no_key"),
        "revoked stays revoked"
    );
    let got = send(
        &client(),
        request(
            "POST",
            &format!("{}/v1/chat/completions", b.data),
            &[("authorization", &format!("Bearer {token}"))],
            r#"{"model":"m","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "the platform token moved: {}", got.text());

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "A failed requests during the move"
    );

    // Each live data key: unwrapped by the local KEK, wrapped by the KMS key, both audited;
    // B then decrypted through KMS.
    let log = dst.audit_events();
    let events = |e: &str| log.iter().filter(|l| l["event"] == e).collect::<Vec<_>>();
    let unwraps = events("key_import_unwrap");
    let rewraps = events("key_import_rewrap");
    assert_eq!((unwraps.len(), rewraps.len()), (4, 4), "{log:?}");
    assert!(unwraps.iter().all(|l| l["kek_id"] == "k1"));
    assert!(
        rewraps
            .iter()
            .all(|l| l["from_kek"] == "k1" && l["kek_id"] == arn.as_str())
    );
    assert!(!rewraps.iter().any(|l| l["key_id"] == revoked.as_str()));
    assert_eq!(events("keys_import")[0]["rewrapped"], 4);
    assert!(
        events("keys_export").is_empty(),
        "the export is audited at its source"
    );
    assert_eq!(
        events("keys_export").len()
            + src
                .audit_events()
                .iter()
                .filter(|l| l["event"] == "keys_export")
                .count(),
        1
    );
    let pg = db.client().await;
    let rows = pg
        .query("SELECT kek_id, state FROM byokd_keys", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        let (kek, state): (String, String) = (r.get(0), r.get(1));
        assert_eq!(kek == arn, state != "revoked", "{kek} {state}");
    }
    for (l, secret) in [(b.logs(), "B's logs"), (a.logs(), "A's logs")] {
        for c in [CANARY_OPENAI, CANARY_ANTHROPIC, CANARY_ROTATED] {
            assert_no_secret(&l, c, secret);
        }
    }

    // Again: refused as a whole; with --skip-existing, nothing new.
    let again = cli(
        &dst,
        &["keys", "import", "--from-config", src_path],
        Some(&export),
    );
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("already in the target store"),
        "{err}"
    );
    let out = ok(cli(
        &dst,
        &[
            "keys",
            "import",
            "--from-config",
            src_path,
            "--skip-existing",
        ],
        Some(&export),
    ));
    assert!(
        out.contains("imported 0 key versions and 0 tokens (0 re-wrapped, 6 already"),
        "{out}"
    );

    // A backup of B restored where it was taken: no source config needed, nothing re-wrapped.
    let backup = ok(cli(&dst, &["keys", "export"], None));
    let db2 = PgDb::create().await;
    let restore = Env::new(&aws_pg_config(&up.url(), &moto.url, &db2.url));
    let out = ok(cli(&restore, &["keys", "import"], Some(&backup)));
    assert!(
        out.contains("imported 5 key versions and 1 tokens (0 re-wrapped"),
        "{out}"
    );

    // Under another local KEK, without the source config: refused, nothing written.
    let other = Env::new(&config_yaml(&up.url(), ""));
    let got = cli(&other, &["keys", "import"], Some(&export));
    let err = String::from_utf8_lossy(&got.stderr);
    assert!(
        !got.status.success() && err.contains("--from-config"),
        "{err}"
    );
    assert!(
        !other.store_path().exists()
            || std::fs::read_to_string(other.store_path())
                .unwrap()
                .contains("\"keys\": []")
    );
}
