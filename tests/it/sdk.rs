//! The official `openai` and `anthropic` Python SDKs against the real `byokd` binary and the
//! fake provider. Needs `pip install -r tests/requirements.txt` (`.ci/test` does it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_byokd");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn python_sdk(script: &str, base: &str) -> std::process::Output {
    let path = format!("{}/tests/sdk/{script}", env!("CARGO_MANIFEST_DIR"));
    Command::new("python3")
        .args([path.as_str(), base, "acme"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .output()
        .expect("python3 is required for the SDK tests")
}

/// The real binary serving `env`'s config on free ports: (child, data port, admin port).
async fn serve_binary(env: &Env) -> (std::process::Child, u16, u16) {
    let (dp, ap) = (free_port(), free_port());
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&env.config_path)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{dp}"),
            "--admin-listen",
            &format!("127.0.0.1:{ap}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", dp)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "byokd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, dp, ap)
}

#[tokio::test]
async fn official_python_sdks_through_the_binary() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    env.add_key("acme", "gemini", CANARY_GEMINI).await;
    let (mut child, dp, ap) = serve_binary(&env).await;
    let base = format!("http://127.0.0.1:{dp}");

    // (script, auth header, injected value, provider calls the script makes: its byokd-error
    // call must not be one of them)
    for (script, header, key, calls) in [
        (
            "openai_sdk.py",
            "authorization",
            format!("Bearer {CANARY_OPENAI}"),
            3,
        ),
        (
            "anthropic_sdk.py",
            "x-api-key",
            CANARY_ANTHROPIC.to_string(),
            2,
        ),
        // The OpenAI SDK reaching Anthropic by model name (`anthropic/...`).
        (
            "openai_sdk_by_model.py",
            "x-api-key",
            CANARY_ANTHROPIC.to_string(),
            2,
        ),
        // And Gemini, on its OpenAI-compatible endpoint.
        (
            "openai_sdk_by_model_gemini.py",
            "x-goog-api-key",
            CANARY_GEMINI.to_string(),
            2,
        ),
    ] {
        let before = up.seen().len();
        let out = tokio::task::spawn_blocking({
            let base = base.clone();
            move || python_sdk(script, &base)
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = up.seen();
        assert_eq!(
            seen.len() - before,
            calls,
            "{script}: the error call must not reach the provider"
        );
        for s in &seen[before..] {
            assert_eq!(s.headers[header], key.as_str(), "{script}");
            assert!(
                !format!("{:?}", s.headers).contains("app-side-placeholder"),
                "{script}: SDK api key leaked upstream"
            );
        }
    }

    let m = metrics(format!("127.0.0.1:{ap}").parse().unwrap()).await;
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &["tenant=\"acme\"", "model=\"gpt-4o-mini\"", "type=\"input\""]
        ),
        Some(11.0 + 20.0 + 20.0)
    );
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "tenant=\"acme\"",
                "model=\"claude-sonnet-4-20250514\"",
                "type=\"output\""
            ]
        ),
        Some(42.0)
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}

/// Every client example in `examples/` runs against the real binary and the fake provider,
/// once naming the tenant by header and once by platform token, and each provider got the
/// tenant's key.
#[tokio::test]
async fn the_client_examples_run_by_header_and_by_platform_token() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    env.add_key("acme", "gemini", CANARY_GEMINI).await;
    let token = env.new_token("acme").await;
    let (mut child, dp, _) = serve_binary(&env).await;
    let root = env!("CARGO_MANIFEST_DIR");
    let examples: [(&str, &str, &str, &str); 6] = [
        ("python3", "openai_quickstart.py", "authorization", "openai"),
        (
            "python3",
            "anthropic_quickstart.py",
            "x-api-key",
            "anthropic",
        ),
        ("python3", "google_genai.py", "x-goog-api-key", "gemini"),
        ("python3", "langchain_chat.py", "authorization", "openai"),
        ("node", "openai_node.mjs", "authorization", "openai"),
        ("bash", "curl.sh", "authorization", "openai"),
    ];
    for (runner, script, header, provider) in examples {
        for by_token in [false, true] {
            let before = up.seen().len();
            let mut cmd = Command::new(runner);
            cmd.arg(format!("{root}/examples/{script}"))
                .env("BYOKD_URL", format!("http://127.0.0.1:{dp}"))
                .env_remove("OPENAI_API_KEY")
                .env_remove("ANTHROPIC_API_KEY")
                .env_remove("GEMINI_API_KEY")
                .env_remove("GOOGLE_API_KEY");
            if by_token {
                cmd.env("BYOKD_TOKEN", &token);
            } else {
                cmd.env("BYOKD_TENANT", "acme").env_remove("BYOKD_TOKEN");
            }
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{runner} is required for {script}: {e}"));
            assert!(
                out.status.success(),
                "{script} (by token: {by_token}) failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let seen = up.seen();
            assert!(
                seen.len() > before,
                "{script}: nothing reached the provider"
            );
            let key = match provider {
                "openai" => format!("Bearer {CANARY_OPENAI}"),
                "anthropic" => CANARY_ANTHROPIC.to_string(),
                _ => CANARY_GEMINI.to_string(),
            };
            // The script's first call goes to its provider with the tenant's key; the
            // platform token and the SDK's placeholder never leave byokd.
            assert_eq!(seen[before].headers[header], key.as_str(), "{script}");
            for s in &seen[before..] {
                let all = format!("{:?}", s.headers);
                assert!(
                    !all.contains(&token) && !all.contains("unused"),
                    "{script}: {all}"
                );
            }
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
}
