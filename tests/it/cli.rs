//! The real `byokd` binary: CLI key management, live reload while serving, graceful SIGTERM
//! drain, and the canary-key leak check over every output byokd produces.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use common::bin::*;
use common::*;
use http_body_util::BodyExt;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn keys_cli_live_reload_drain_and_no_canary_anywhere() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    let cfg = env.config_path.clone();

    // keys add: the secret comes from stdin; the KEK is created 0600 with a warning.
    let add = byokd(
        &cfg,
        &[
            "keys",
            "add",
            "--tenant",
            "acme",
            "--provider",
            "openai",
            "--label",
            "prod",
        ],
        Some(&format!("{CANARY_OPENAI}\n")),
    );
    let add_out = String::from_utf8_lossy(&add.stdout).to_string();
    let add_err = String::from_utf8_lossy(&add.stderr).to_string();
    assert!(add.status.success(), "{add_err}");
    assert!(
        add_out.starts_with("key_") && add_out.contains("sk-...e5f6"),
        "{add_out}"
    );
    assert!(
        add_err.contains("development"),
        "first run must warn about the local KEK: {add_err}"
    );
    use std::os::unix::fs::PermissionsExt;
    let kek = env.dir.path().join(".byokd/kek-k1");
    assert_eq!(
        std::fs::metadata(&kek).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_id = add_out.split_whitespace().next().unwrap().to_string();
    let add2 = byokd(
        &cfg,
        &["keys", "add", "--tenant", "acme", "--provider", "anthropic"],
        Some(CANARY_ANTHROPIC),
    );
    assert!(add2.status.success());

    // Bad input: empty stdin, wrong format; neither echoes the secret.
    let empty = byokd(
        &cfg,
        &["keys", "add", "--tenant", "acme", "--provider", "openai"],
        None,
    );
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("stdin"));
    let wrong = byokd(
        &cfg,
        &["keys", "add", "--tenant", "acme", "--provider", "anthropic"],
        Some(CANARY_OPENAI),
    );
    assert!(!wrong.status.success());
    assert!(!String::from_utf8_lossy(&wrong.stderr).contains(CANARY_OPENAI));

    let served = serve(&env).await;
    let c = client();
    let chat = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let mut req = request(
            "POST",
            &format!("{}/v1/chat/completions", served.data),
            &[],
            body,
        );
        for (k, v) in headers {
            req.headers_mut().insert(k, v.parse().unwrap());
        }
        req
    };
    let got = send(&c, chat(vec![("x-tenant-id", "acme".into())], CHAT)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        up.last().headers["authorization"],
        format!("Bearer {CANARY_OPENAI}").as_str()
    );
    let mut bodies = vec![got.text()];
    for (h, v) in [("x-tenant-id", "ghost"), ("x-tenant-id", "acme")] {
        let got = send(
            &c,
            request(
                "POST",
                &format!("{}/gemini/v1beta/models/m:generateContent", served.data),
                &[(h, v), ("x-api-key", CANARY_OPENAI)],
                "{}",
            ),
        )
        .await;
        assert!(got.status.is_client_error());
        bodies.push(got.text());
    }

    // A platform token issued while serving works within 2 s.
    let tok = byokd(&cfg, &["token", "new", "--tenant", "acme"], None);
    assert!(tok.status.success());
    let token = String::from_utf8_lossy(&tok.stdout).trim().to_string();
    assert!(token.starts_with("byokd_"));
    let t = Instant::now();
    while send(
        &c,
        chat(vec![("authorization", format!("Bearer {token}"))], CHAT),
    )
    .await
    .status
        != 200
    {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "token not live after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // keys list: masked only, human and JSON.
    for args in [
        &["keys", "list"][..],
        &["keys", "list", "--tenant", "acme", "--json"][..],
    ] {
        let out = byokd(&cfg, args, None);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            text.contains(&key_id) && text.contains("sk-...e5f6"),
            "{text}"
        );
        bodies.push(text);
    }

    // Revoke while serving: refused within 2 s.
    let rev = byokd(&cfg, &["keys", "revoke", &key_id], None);
    assert!(rev.status.success());
    let t = Instant::now();
    loop {
        let got = send(&c, chat(vec![("x-tenant-id", "acme".into())], CHAT)).await;
        if got.status == 403 {
            assert_eq!(got.code(), "no_key");
            bodies.push(got.text());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "revoked key still served after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM during a stream: the stream finishes, new connections are refused, exit 0.
    let resp = c
        .request(request(
            "POST",
            &format!("{}/anthropic/v1/messages", served.data),
            &[
                ("x-tenant-id", "acme"),
                ("x-fake-pace-ms", "150"),
                ("x-fake-events", "8"),
            ],
            r#"{"model":"claude-3-5-haiku-20241022","stream":true,"max_tokens":5,"messages":[]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics_text = metrics(served.admin.parse().unwrap()).await;
    let mut served = served;
    sigterm(&served.child);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("tok7") && text.contains("message_stop"),
        "stream cut by shutdown: {text}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = served.child.wait().unwrap();
        (s, served)
    })
    .await
    .unwrap();
    let (status, served) = status;
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        served.logs()
    );
    assert!(
        client()
            .request(request(
                "GET",
                &format!("{}/v1/models", served.data),
                &[],
                ""
            ))
            .await
            .is_err(),
        "still accepting after SIGTERM"
    );

    // The canary (and the platform token) appear nowhere byokd writes.
    let logs = served.logs();
    assert!(
        logs.contains("byokd::access"),
        "expected access log lines: {logs}"
    );
    assert!(logs.contains("key_decrypt"), "expected audit lines");
    let store = std::fs::read_to_string(env.store_path()).unwrap();
    let outputs = [
        ("serve stdout/stderr", logs),
        ("/metrics", metrics_text),
        ("store file", store),
        (
            "cli outputs and error bodies",
            bodies.join("\n") + &add_out + &add_err,
        ),
    ];
    use base64::Engine as _;
    for canary in [CANARY_OPENAI, CANARY_ANTHROPIC] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(canary);
        for (what, text) in &outputs {
            assert!(!text.contains(canary), "canary key leaked into {what}");
            assert!(
                !text.contains(&canary[3..20]),
                "part of the canary leaked into {what}"
            );
            assert!(
                !text.contains(&b64[..16]),
                "base64 of the canary leaked into {what}"
            );
        }
    }
    for (what, text) in &outputs {
        assert!(!text.contains(&token), "platform token leaked into {what}");
    }
}

#[tokio::test]
async fn corrupt_store_is_a_clear_error_at_start() {
    let env = Env::new(&config_yaml("http://127.0.0.1:9", ""));
    std::fs::create_dir_all(env.dir.path().join(".byokd")).unwrap();
    std::fs::write(env.store_path(), b"{\"keys\": [ oops").unwrap();
    let out = byokd(
        &env.config_path,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys.json") && err.contains("not valid"),
        "{err}"
    );
    let list = byokd(&env.config_path, &["keys", "list"], None);
    assert!(!list.status.success());
}

/// A world-readable KEK, a world-writable store or ledger: `keys list`, `keys add` and `serve`
/// all refuse them with one line naming the file, its mode and the fix, and change nothing.
#[test]
fn key_files_with_loose_permissions_are_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(&config_yaml("http://127.0.0.1:9", ""));
    let cfg = env.config_path.clone();
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let mode_of = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let add = ["keys", "add", "--tenant", "acme", "--provider", "openai"];
    // The first key creates the KEK and the store, both owner-only.
    ok(byokd(&cfg, &add, Some(CANARY_OPENAI)));
    let kek = env.dir.path().join(".byokd/kek-k1");
    let store = env.store_path();
    assert_eq!((mode_of(&kek), mode_of(&store)), (0o600, 0o600));

    let limit = Duration::from_secs(20);
    let commands: [(&[&str], Option<&str>); 3] = [
        (&["keys", "list"], None),
        (&add, Some(CANARY_ANTHROPIC)),
        (
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            None,
        ),
    ];
    let refused = |file: &std::path::Path, mode: &str, also: &[&str]| {
        let before = std::fs::read(&store).unwrap();
        for (args, stdin) in commands {
            let out = byokd_exits_within(&cfg, args, stdin, limit);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{args:?} used {mode} {file:?}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{args:?} printed a result");
            // One line: the file, its mode, the fix.
            let line = stderr
                .lines()
                .find(|l| l.starts_with("byokd: error:"))
                .unwrap_or_else(|| panic!("{args:?}: no error line in {stderr}"));
            let path = file.display().to_string();
            for part in [path.as_str(), mode, "chmod 600"].iter().chain(also) {
                assert!(line.contains(part), "{args:?}: {part:?} missing in: {line}");
            }
            assert!(!stderr.contains(CANARY_ANTHROPIC), "{stderr}");
        }
        assert_eq!(std::fs::read(&store).unwrap(), before, "store changed");
    };

    chmod(&kek, 0o644);
    refused(
        &kek,
        "mode 0644",
        &["KEK file", "readable by others", "defaultMode: 0400"],
    );
    assert_eq!(mode_of(&kek), 0o644, "refused, not silently repaired");
    chmod(&kek, 0o600);

    chmod(&store, 0o666);
    refused(
        &store,
        "mode 0666",
        &["key store", "writable by group and others"],
    );
    assert_eq!(mode_of(&store), 0o666, "refused, not silently repaired");
    chmod(&store, 0o600);

    // The usage ledger beside the store is refused by `serve` too.
    let ledger = env.dir.path().join(".byokd/usage.json");
    std::fs::write(&ledger, "{}").unwrap();
    chmod(&ledger, 0o622);
    let out = byokd_exits_within(&cfg, commands[2].0, None, limit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("usage ledger")
            && stderr.contains(&ledger.display().to_string())
            && stderr.contains("mode 0622")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );

    // With the KEK and store owner-only again, the key added at the start is all there is.
    let list = ok(byokd(&cfg, &["keys", "list"], None));
    assert!(
        list.contains("sk-...e5f6") && !list.contains("anthropic"),
        "{list}"
    );
}

#[tokio::test]
async fn config_check_and_kek_generate() {
    let env = Env::new(&config_yaml("http://127.0.0.1:9", ""));
    let ok = byokd(&env.config_path, &["config", "check"], None);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(
        &env.config_path,
        "listen: 127.0.0.1:1\nlimits: { idle_timout: 5s }\n",
    )
    .unwrap();
    let bad = byokd(&env.config_path, &["config", "check"], None);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("idle_timout") && err.contains("line 2"),
        "{err}"
    );
    let out = env.dir.path().join("kek-k2");
    let env2 = Env::new(&config_yaml("http://127.0.0.1:9", ""));
    let gen_ = byokd(
        &env2.config_path,
        &["kek", "generate", "--out", out.to_str().unwrap()],
        None,
    );
    assert!(
        gen_.status.success(),
        "{}",
        String::from_utf8_lossy(&gen_.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap().len(), 32);
    let again = byokd(
        &env2.config_path,
        &["kek", "generate", "--out", out.to_str().unwrap()],
        None,
    );
    assert!(!again.status.success(), "must refuse to overwrite a KEK");
}

#[tokio::test]
async fn keys_add_and_rotate_verify_the_key_live_first() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    let cfg = env.config_path.clone();
    let add = |secret: &'static str| {
        let cfg = cfg.clone();
        move || {
            byokd(
                &cfg,
                &[
                    "keys",
                    "add",
                    "--tenant",
                    "acme",
                    "--provider",
                    "openai",
                    "--verify",
                ],
                Some(secret),
            )
        }
    };
    // The provider refuses this key: nothing is stored, the message says why.
    let out = tokio::task::spawn_blocking(add("sk-rejected-0123456789abcdef"))
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("provider rejected the key (HTTP 401)"),
        "{err}"
    );
    assert!(!err.contains("0123456789abcdef"), "{err}");
    let seen = up.last();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", "/v1/models")
    );
    let list = ok(byokd(&cfg, &["keys", "list", "--json"], None));
    assert_eq!(list.trim(), "[]");
    // A key the provider accepts is stored; rotation checks the new one too.
    let out = tokio::task::spawn_blocking(add("sk-good-0123456789abcdefghij"))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotate = |secret: &'static str| {
        let cfg = cfg.clone();
        move || {
            byokd(
                &cfg,
                &[
                    "keys",
                    "rotate",
                    "--tenant",
                    "acme",
                    "--provider",
                    "openai",
                    "--verify",
                ],
                Some(secret),
            )
        }
    };
    let out = tokio::task::spawn_blocking(rotate("sk-rejected-rotation-012345"))
        .await
        .unwrap();
    assert!(!out.status.success());
    let out = tokio::task::spawn_blocking(rotate("sk-good-rotation-0123456789"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("v2 (v1 retired)"),
        "{text}"
    );
    // A second key makes a pool: rotation must name which key.
    let out = tokio::task::spawn_blocking(add("sk-good-second-0123456789ab"))
        .await
        .unwrap();
    let second = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let out = tokio::task::spawn_blocking(rotate("sk-good-rotation-22222222222"))
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ambiguous rotation went through");
    assert!(err.contains("--key-id") && err.contains(&second), "{err}");
    let out = byokd(
        &cfg,
        &[
            "keys",
            "rotate",
            "--tenant",
            "acme",
            "--provider",
            "openai",
            "--key-id",
            &second,
        ],
        Some("sk-good-rotation-33333333333"),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with(&second) && text.contains("v2 (v1 retired)"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
