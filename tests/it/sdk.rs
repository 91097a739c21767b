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

#[tokio::test]
async fn official_python_sdks_through_the_binary() {
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(&up.url(), ""));
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "anthropic", CANARY_ANTHROPIC).await;
    let (dp, ap) = (free_port(), free_port());
    let mut child = Command::new(BIN)
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
