//! The shared PostgreSQL store with two real `byokd` replicas on the local server: a key or
//! token added, rotated or revoked through one replica's admin API takes effect on the other
//! within 2 seconds (LISTEN/NOTIFY); with its database link cut, a replica keeps serving its
//! cached keys, refuses management calls cleanly, and catches up by itself when the link
//! returns. Rows hold ciphertext only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::bin::*;
use common::*;
use sha2::Digest;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";
const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn pg_config(upstream: &str, url: &str) -> String {
    format!(
        r#"admin: {{ token_sha256: "{}" }}
identity:
  - header: {{ name: x-tenant-id }}
  - bearer: {{}}
kms:
  local: {{ keks: {{ k1: kek-k1 }}, active: k1 }}
store:
  postgres: {{ url: "{url}" }}
audit: {{ file: audit.jsonl }}
providers:
  openai: {{ kind: openai, base_url: "{upstream}" }}
"#,
        hex::encode(sha2::Sha256::digest(ADMIN_TOKEN))
    )
}

/// A TCP forwarder to PostgreSQL that the test can cut and restore, to take the database
/// away from one replica without stopping the machine's server.
struct Link {
    port: u16,
    accept: Mutex<Option<JoinHandle<()>>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Link {
    async fn new() -> Link {
        let l = Link {
            port: free_port(),
            accept: Mutex::new(None),
            conns: Arc::default(),
        };
        l.restore().await;
        l
    }

    async fn restore(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let conns = self.conns.clone();
        *self.accept.lock().unwrap() = Some(tokio::spawn(async move {
            while let Ok((mut a, _)) = listener.accept().await {
                conns.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut b) = TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                }));
            }
        }));
    }

    fn cut(&self) {
        if let Some(h) = self.accept.lock().unwrap().take() {
            h.abort();
        }
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn chat(base: &str, tenant: &str) -> Got {
    send(
        &client(),
        request(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[("x-tenant-id", tenant)],
            CHAT,
        ),
    )
    .await
}

async fn admin(s: &Served, method: &str, path: &str, body: &str) -> Got {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    send(
        &client(),
        request(
            method,
            &format!("http://{}{path}", s.admin),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            body,
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_postgres_store() {
    let db = PgDb::create().await;
    let link = Link::new().await;
    let up = fake_upstream().await;
    let env_a = Env::new(&pg_config(&up.url(), &db.url));
    // Replica B shares the database (through a link the test can cut) and the KEK file.
    let via_link = format!("postgres://postgres@127.0.0.1:{}/{}", link.port, db.name);
    let env_b = Env::new(&pg_config(&up.url(), &via_link));
    let a = serve_env(&env_a, "a", &[]).await;
    std::fs::copy(
        env_a.dir.path().join("kek-k1"),
        env_b.dir.path().join("kek-k1"),
    )
    .unwrap();
    let b = serve_env(&env_b, "b", &[]).await;

    // Add through A's admin API; B serves it within 2 seconds.
    let body = format!(
        r#"{{"tenant":"acme","provider":"openai","secret":"{CANARY_OPENAI}","label":"prod"}}"#
    );
    let got = admin(&a, "POST", "/admin/keys", &body).await;
    assert_eq!(got.status, 201, "{}", got.text());
    let id = got.json()["id"].as_str().unwrap().to_string();
    assert_eq!(got.json()["masked"], "sk-...e5f6");
    let took = poll_until(Duration::from_secs(2), async || {
        chat(&b.data, "acme").await.status == 200
    })
    .await;
    assert!(took.is_some(), "B never saw the key: {}", b.logs());
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );

    // A token issued on B works on A.
    let got = admin(&b, "POST", "/admin/tokens", r#"{"tenant":"acme"}"#).await;
    assert_eq!(got.status, 201, "{}", got.text());
    let token = got.json()["token"].as_str().unwrap().to_string();
    let bearer = format!("Bearer {token}");
    assert!(
        poll_until(Duration::from_secs(2), async || {
            send(
                &client(),
                request(
                    "POST",
                    &format!("{}/v1/chat/completions", a.data),
                    &[("authorization", &bearer)],
                    CHAT,
                ),
            )
            .await
            .status
                == 200
        })
        .await
        .is_some()
    );

    // Revoke on A: B stops using the key within 2 seconds.
    let got = admin(&a, "DELETE", &format!("/admin/keys/{id}"), "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let took = poll_until(Duration::from_secs(2), async || {
        chat(&b.data, "acme").await.code() == "no_key"
    })
    .await;
    assert!(took.is_some(), "revoke did not reach B: {}", b.logs());

    // The database link of B goes down.
    let body = r#"{"tenant":"beta","provider":"openai","secret":"sk-beta-0123456789abcdefghij"}"#;
    assert_eq!(admin(&a, "POST", "/admin/keys", body).await.status, 201);
    assert!(
        poll_until(Duration::from_secs(2), async || {
            chat(&b.data, "beta").await.status == 200
        })
        .await
        .is_some()
    );
    link.cut();
    eventually(
        "B to see its link cut",
        Duration::from_secs(5),
        async || {
            let logs = b.logs();
            logs.contains("store listener connection lost")
                || logs.contains("PostgreSQL unavailable")
        },
    )
    .await;
    // Cached keys keep serving.
    for _ in 0..5 {
        assert_eq!(chat(&b.data, "beta").await.status, 200);
    }
    // A management call on B fails cleanly, nothing half-written.
    let body = r#"{"tenant":"gamma","provider":"openai","secret":"sk-gamma-0123456789abcdefghi"}"#;
    let got = admin(&b, "POST", "/admin/keys", body).await;
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.json()["error"]["code"], "unavailable");
    // Meanwhile A registers a key; B catches up once its link returns.
    let body = r#"{"tenant":"late","provider":"openai","secret":"sk-late-0123456789abcdefghijk"}"#;
    assert_eq!(admin(&a, "POST", "/admin/keys", body).await.status, 201);
    // A tenant exists once it has a key: B does not know `late` yet.
    assert_eq!(chat(&b.data, "late").await.code(), "unknown_tenant");
    link.restore().await;
    assert!(
        poll_until(Duration::from_secs(10), async || {
            chat(&b.data, "late").await.status == 200
        })
        .await
        .is_some(),
        "B did not catch up after the link returned: {}",
        b.logs()
    );
    assert!(b.logs().contains("PostgreSQL unavailable"), "{}", b.logs());

    // Rotation through the admin API, seen by the other replica.
    let late_id = admin(&a, "GET", "/admin/keys?tenant=late", "").await.json()["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = admin(
        &b,
        "POST",
        &format!("/admin/keys/{late_id}/rotate"),
        r#"{"secret":"sk-late-ROTATED-0123456789abcd"}"#,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json()["version"], 2);
    assert!(
        poll_until(Duration::from_secs(2), async || {
            chat(&a.data, "late").await.status == 200
                && up.last().headers["authorization"] == "Bearer sk-late-ROTATED-0123456789abcd"
        })
        .await
        .is_some()
    );

    // The rows: the same records as the file store, ciphertext only.
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT id, version, tenant, state, kek_id, masked, \
             (wrapped_dek || nonce || ciphertext) FROM byokd_keys ORDER BY tenant, version",
            &[],
        )
        .await
        .unwrap();
    let dump: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {} {}",
                r.get::<_, String>(0),
                r.get::<_, i32>(1),
                r.get::<_, String>(2),
                r.get::<_, String>(3),
                r.get::<_, String>(4),
                r.get::<_, String>(5),
                r.get::<_, String>(6)
            )
        })
        .collect();
    assert_eq!(rows.len(), 4, "{dump:#?}");
    assert!(
        dump.iter()
            .any(|d| d.contains(" late ") && d.contains(" retired "))
    );
    let all = dump.join("\n");
    for secret in [CANARY_OPENAI, "sk-late-ROTATED-0123456789abcd"] {
        assert_no_secret(&all, secret, "the PostgreSQL rows");
    }
    assert!(!all.contains("canary"));
    for s in [&a, &b] {
        assert!(!s.logs().contains("canary"), "{}", s.logs());
    }
    drop(c);
}

fn usage_requests(got: &Got) -> u64 {
    got.json()["providers"]["openai"]["gpt-4o-mini"]["requests"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_usage_ledger_is_shared_by_replicas_and_survives_restarts() {
    let db = PgDb::create().await;
    let up = fake_upstream().await;
    let env_a = Env::new(&pg_config(&up.url(), &db.url));
    let env_b = Env::new(&pg_config(&up.url(), &db.url));
    let a = serve_env(&env_a, "a", &[]).await;
    std::fs::copy(
        env_a.dir.path().join("kek-k1"),
        env_b.dir.path().join("kek-k1"),
    )
    .unwrap();
    let b = serve_env(&env_b, "b", &[]).await;
    let body = r#"{"tenant":"acme","provider":"openai","secret":"sk-acme-0123456789abcdefghij"}"#;
    assert_eq!(admin(&a, "POST", "/admin/keys", body).await.status, 201);
    assert!(
        poll_until(Duration::from_secs(2), async || {
            chat(&b.data, "acme").await.status == 200
        })
        .await
        .is_some()
    );
    // Three of them by end user alice: her usage is in the shared ledger too.
    for _ in 0..3 {
        let got = send(
            &client(),
            request(
                "POST",
                &format!("{}/v1/chat/completions", a.data),
                &[("x-tenant-id", "acme"), ("x-end-user-id", "alice")],
                CHAT,
            ),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    for _ in 0..1 {
        assert_eq!(chat(&b.data, "acme").await.status, 200);
    }
    // 5 requests in all (one was B's first); each replica's usage API sees all of them.
    for s in [&a, &b] {
        let took = poll_until(Duration::from_secs(15), async || {
            usage_requests(&admin(s, "GET", "/admin/tenants/acme/usage", "").await) == 5
        })
        .await;
        assert!(
            took.is_some(),
            "{}",
            admin(s, "GET", "/admin/tenants/acme/usage", "")
                .await
                .text()
        );
    }
    // The tenant's own view, through the data plane.
    let mine = send(
        &client(),
        request(
            "GET",
            &format!("{}/byokd/usage", b.data),
            &[("x-tenant-id", "acme")],
            "",
        ),
    )
    .await;
    assert_eq!(usage_requests(&mine), 5, "{}", mine.text());
    let alice = |s: &'static str| {
        move |got: Got| {
            let v = got.json();
            assert_eq!(v["end_users"][0]["end_user"], "alice", "{s}: {v}");
            assert_eq!(v["end_users"][0]["requests"], 3, "{s}: {v}");
            assert_eq!(v["total"], 1, "{s}: {v}");
        }
    };
    alice("B, through PostgreSQL")(
        admin(&b, "GET", "/admin/tenants/acme/usage?by=end_user", "").await,
    );

    // One more on A, then both stop (SIGTERM flushes); a fresh replica still has all 6.
    assert_eq!(chat(&a.data, "acme").await.status, 200);
    for s in [a, b] {
        let mut s = s;
        sigterm(&s.child);
        let st = tokio::task::spawn_blocking(move || s.child.wait().unwrap())
            .await
            .unwrap();
        assert!(st.success());
    }
    let c = serve_env(&env_a, "c", &[]).await;
    let got = admin(&c, "GET", "/admin/tenants/acme/usage", "").await;
    assert_eq!(usage_requests(&got), 6, "{}", got.text());
    alice("after a restart")(admin(&c, "GET", "/admin/tenants/acme/usage?by=end_user", "").await);
}

/// After the first sync, a replica reads back only the usage rows changed since its last
/// reload, and still ends with every replica's totals: its own writes, another replica's,
/// and a write by an older byokd that does not know `changed_at` (the trigger stamps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_reload_reads_only_the_rows_changed_since_the_last() {
    use byokd::keys::pg::{PgStore, Reload};
    use byokd::ledger::Ledger;
    let db = PgDb::create().await;
    let (a, b) = (
        PgStore::open(&db.url).await.unwrap(),
        PgStore::open(&db.url).await.unwrap(),
    );
    let (la, lb) = (Ledger::shared(), Ledger::shared());
    let now = byokd::vocab::unix_now();
    let usage = |input| byokd::usage::Usage {
        input,
        output: 1,
        found: true,
        ..Default::default()
    };
    for i in 0..50 {
        la.record(
            &format!("t{i}"),
            "openai",
            "gpt-4o-mini",
            &usage(10),
            Some(7),
            now,
        );
    }
    let first = a.sync_usage(&la).await.unwrap();
    assert_eq!(
        first,
        Reload {
            rows: 50,
            full: true
        }
    );
    assert_eq!(
        b.sync_usage(&lb).await.unwrap(),
        Reload {
            rows: 50,
            full: true
        }
    );
    // Those rows last changed an hour ago (past the reload's overlap window), as a month's
    // idle tenants have; the trigger is held off for this one update.
    let pg = db.client().await;
    pg.batch_execute(
        "ALTER TABLE byokd_usage DISABLE TRIGGER byokd_usage_touch; \
         UPDATE byokd_usage SET changed_at = now() - interval '1 hour'; \
         ALTER TABLE byokd_usage ENABLE TRIGGER byokd_usage_touch;",
    )
    .await
    .unwrap();

    // Two tenants change, one through each replica, and one more through a replica of an
    // older byokd (its upsert sets no `changed_at`).
    la.record("t3", "openai", "gpt-4o-mini", &usage(5), Some(7), now);
    lb.record("t4", "openai", "gpt-4o", &usage(8), Some(9), now);
    let period = byokd::vocab::clock::month_of(now);
    pg.execute(
        "INSERT INTO byokd_usage (tenant, period, provider, model, requests, input) \
             VALUES ('t5', $1, 'openai', 'gpt-4o-mini', 1, 100) \
             ON CONFLICT (tenant, period, provider, model) DO UPDATE SET \
             requests = byokd_usage.requests + EXCLUDED.requests, \
             input = byokd_usage.input + EXCLUDED.input",
        &[&period],
    )
    .await
    .unwrap();
    // A writes t3 and reads t3 and t5; B writes t4 and reads all three; A again, all three.
    let partial = |rows| Reload { rows, full: false };
    assert_eq!(a.sync_usage(&la).await.unwrap(), partial(2));
    assert_eq!(b.sync_usage(&lb).await.unwrap(), partial(3));
    assert_eq!(a.sync_usage(&la).await.unwrap(), partial(3));
    let totals = |l: &Ledger, t: &str, model: &str| {
        l.month(t, now).providers["openai"]
            .get(model)
            .cloned()
            .unwrap_or_default()
    };
    for l in [&la, &lb] {
        assert_eq!(totals(l, "t3", "gpt-4o-mini").input, 15);
        assert_eq!(totals(l, "t3", "gpt-4o-mini").requests, 2);
        assert_eq!(totals(l, "t4", "gpt-4o").input, 8);
        assert_eq!(totals(l, "t4", "gpt-4o-mini").input, 10);
        assert_eq!(totals(l, "t5", "gpt-4o-mini").input, 110);
        assert_eq!(totals(l, "t49", "gpt-4o-mini").requests, 1);
    }
}
