//! byokd's metrics as Prometheus sees them: `promtool check metrics` accepts the exposition,
//! and a real Prometheus (Debian's `prometheus`, started here on 127.0.0.1) scrapes byokd and
//! answers PromQL for a tenant's tokens and cost. `.ci/run` installs the package.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CHAT_STREAM: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn need(tool: &str) {
    assert!(
        Command::new(tool).arg("--version").output().is_ok(),
        "`{tool}` is required (Debian package `prometheus`; .ci/run installs it)"
    );
}

/// Kills the child when the test ends, however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The JSON answer of an instant query (`None`: Prometheus did not answer yet).
async fn api(prom: &str, q: &str) -> Option<serde_json::Value> {
    let url = format!("http://{prom}/api/v1/query?query={}", urlencode(q));
    use http_body_util::BodyExt;
    // Prometheus may not listen yet: a refused connection is "no answer yet", not a failure.
    let resp = tokio::time::timeout(
        Duration::from_secs(2),
        client().request(request("GET", &url, &[], "")),
    )
    .await
    .ok()?
    .ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    serde_json::from_slice(&body).ok()
}

async fn query(prom: &str, q: &str) -> Option<f64> {
    let v = api(prom, q).await?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn promtool_accepts_the_metrics_and_prometheus_answers_promql() {
    need("promtool");
    need("prometheus");
    let up = fake_upstream().await;
    // acme has a budget (for the dashboard's budget panel), and a provider nobody listens for
    // gives an upstream error (for its upstream-errors panel).
    let extra = format!(
        "pricing: {}/config/pricing.yaml\ntenants:\n  acme: {{ budget: {{ monthly_usd: 100 }} }}\n",
        env!("CARGO_MANIFEST_DIR")
    );
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = config_yaml(&up.url(), &extra)
        .replace(
            "providers:\n",
            &format!("providers:\n  dead: {{ kind: openai, base_url: \"http://{dead}\" }}\n"),
        )
        .replace(
            "allowed_providers: [openai,",
            "allowed_providers: [dead, openai,",
        );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    env.add_key("acme", "dead", "sk-dead-0123456789abcdef")
        .await;
    let b = byokd::server::start(env.config()).await.unwrap();
    let c = client();
    for _ in 0..3 {
        let got = send(
            &c,
            request(
                "POST",
                &format!("http://{}/v1/chat/completions", b.data_addr),
                &[("x-tenant-id", "acme")],
                CHAT_STREAM,
            ),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    send(
        &c,
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", b.data_addr),
            &[],
            CHAT_STREAM,
        ),
    )
    .await;
    // Units other than tokens and a missing-usage count, so promtool lints those series too.
    send(
        &c,
        request(
            "POST",
            &format!("http://{}/v1/images/generations", b.data_addr),
            &[
                ("x-tenant-id", "acme"),
                ("content-type", "application/json"),
            ],
            r#"{"model":"dall-e-3","prompt":"a cat"}"#,
        ),
    )
    .await;
    send(
        &c,
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", b.data_addr),
            &[("x-tenant-id", "acme"), ("x-fake-encoding", "gzip")],
            CHAT_STREAM,
        ),
    )
    .await;
    let got = send(
        &c,
        request(
            "POST",
            &format!("http://{}/dead/v1/chat/completions", b.data_addr),
            &[("x-tenant-id", "acme")],
            CHAT_STREAM,
        ),
    )
    .await;
    assert_eq!(got.status, 502, "{}", got.text());
    // promtool lints the exposition format and naming.
    let text = metrics_after(b.admin_addr, up.seen().len()).await;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    for series in ["byokd_usage_units_total{", "byokd_usage_missing_total{"] {
        assert!(text.contains(series), "{series} not exposed:\n{text}");
    }
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the admin listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{port}");
    let cfg = env.dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nscrape_configs:\n  - job_name: byokd\n    static_configs: [ {{ targets: [\"{}\"] }} ]\n",
            b.admin_addr
        ),
    )
    .unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                env.dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let (tokens, cost) = loop {
        let tokens = query(&prom, r#"sum(byokd_tokens_total{tenant="acme"})"#).await;
        let cost = query(
            &prom,
            r#"sum(byokd_cost_usd_total{tenant="acme",model="gpt-4o-mini"})"#,
        )
        .await;
        if let (Some(t), Some(c)) = (tokens, cost) {
            break (t, c);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "Prometheus never answered for tenant acme"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // Three streams of 150 tokens each; 3 × 28,500 nano-dollars at gpt-4o-mini prices (the
    // compressed stream is not scanned, the image request costs per image, not per token).
    assert_eq!(tokens, 450.0);
    assert!((cost - 0.0000855).abs() < 1e-12, "{cost}");
    let images = query(
        &prom,
        r#"sum(byokd_usage_units_total{tenant="acme",unit="image"})"#,
    )
    .await;
    assert_eq!(images, Some(3.0));
    let rejected = query(
        &prom,
        r#"sum(byokd_rejections_total{reason="unknown_tenant"})"#,
    )
    .await;
    assert_eq!(rejected, Some(1.0));

    // Every query of the shipped Grafana dashboard returns data from this Prometheus, with the
    // dashboard's variables as Grafana fills them (all tenants; a rate window of a minute).
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/deploy/grafana/byokd.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let q = expr
                .replace("$tenant", ".*")
                .replace("$__rate_interval", "1m");
            let t = Instant::now();
            loop {
                match query_len(&prom, &q).await {
                    Some(n) if n > 0 => break,
                    got => assert!(
                        t.elapsed() < Duration::from_secs(30),
                        "dashboard panel {:?}: `{q}` returned {got:?}",
                        panel["title"]
                    ),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// How many series an instant query returns (`None`: no answer, or an error).
async fn query_len(prom: &str, q: &str) -> Option<usize> {
    let v = api(prom, q).await?;
    (v["status"] == "success").then(|| v["data"]["result"].as_array().map_or(0, Vec::len))
}

/// The shipped Prometheus kit: `promtool` accepts the scrape config and the alert rules, the
/// rules' unit tests pass (each alert fires on what should fire it and not on the rest), and
/// every byokd metric a rule reads is one byokd exports.
#[test]
fn shipped_alert_rules_and_scrape_config_pass_promtool() {
    need("promtool");
    let dir = format!("{}/deploy/prometheus", env!("CARGO_MANIFEST_DIR"));
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["check", "rules", "byokd.rules.yml"],
        &["test", "rules", "byokd.rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = std::fs::read_to_string(format!("{dir}/byokd.rules.yml")).unwrap();
    let src = ["src/metrics/mod.rs", "src/metrics/family.rs"]
        .map(|f| std::fs::read_to_string(format!("{}/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap())
        .concat();
    let names: std::collections::BTreeSet<&str> = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("byokd_"))
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for n in names {
        assert!(
            src.contains(&format!("\"{n}\"")),
            "the rules read `{n}`, which byokd does not export"
        );
    }
}
