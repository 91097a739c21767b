//! Defects found under hostile input, each proven through the real server: stalled request
//! bodies, buffered-body memory, idle keep-alive connections, HTTP/2 early answers, IPv4-mapped
//! loopback peers, and an upstream that fails before its first byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Harness {
    env: Env,
    up: FakeUpstream,
    byokd: byokd::server::Running,
}

impl Harness {
    async fn new(extra: &str) -> Self {
        Self::with_yaml(|up| config_yaml(up, extra)).await
    }

    async fn with_yaml(yaml: impl FnOnce(&str) -> String) -> Self {
        let up = fake_upstream().await;
        let env = Env::new(&yaml(&up.url()));
        env.add_key("acme", "openai", CANARY_OPENAI).await;
        let byokd = byokd::server::start(env.config()).await.unwrap();
        Self { env, up, byokd }
    }

    fn port(&self) -> u16 {
        self.byokd.data_addr.port()
    }
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

/// Sends a request head and `sent` bytes of a body that claims `declared` bytes, then stalls.
async fn stalled_upload(port: u16, path: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: byokd\r\nx-tenant-id: acme\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut body = br#"{"model":"gpt-4o-mini","input":""#.to_vec();
    body.resize(sent, b'a');
    s.write_all(&body).await.unwrap();
    s
}

/// Reads until the peer closes or `limit` passes; returns what arrived.
async fn read_all(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_stalled_request_body_is_answered_408() {
    let h = Harness::new("limits: { body_timeout: 1s }").await;
    // A chat body is read whole (usage insertion); an embeddings body streams upstream.
    for path in ["/v1/chat/completions", "/v1/embeddings"] {
        let started = Instant::now();
        let mut s = stalled_upload(h.port(), path, 10_000, 500).await;
        let got = read_all(&mut s, Duration::from_secs(10)).await;
        assert!(got.starts_with("HTTP/1.1 408"), "{path}: {got:?}");
        assert!(
            got.contains("x-byokd-error: request_timeout"),
            "{path}: {got}"
        );
        assert!(
            got.contains("\"code\":\"request_timeout\""),
            "{path}: {got}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path}: answered after {:?}",
            started.elapsed()
        );
    }
    let m = metrics(h.byokd.admin_addr).await;
    // The first is counted under __other__: acme had no successful request yet.
    let timeouts: f64 = m
        .lines()
        .filter(|l| l.starts_with("byokd_rejections_total{reason=\"request_timeout\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(timeouts, 2.0, "{m}");
}

#[tokio::test]
async fn buffered_request_bodies_are_bounded_across_connections() {
    // The smallest bound allowed: one inspected body (1 MiB) and 64 KiB.
    let h = Harness::new("limits: { max_buffered_bytes: 1114112, body_timeout: 30s }").await;
    let _stalled = stalled_upload(h.port(), "/v1/chat/completions", 1_000_000, 900_000).await;
    // Let byokd read what was sent.
    let url = format!("http://{}/v1/chat/completions", h.byokd.data_addr);
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "b".repeat(300_000)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = send(
            &client(),
            request(
                "POST",
                &url,
                &[
                    ("x-tenant-id", "acme"),
                    ("content-type", "application/json"),
                ],
                &big,
            ),
        )
        .await;
        if got.status != 200 || Instant::now() > deadline {
            break got;
        }
        // The stalled upload may not be fully read yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(got.status, 503, "{}", got.text());
    assert_eq!(got.code(), "overloaded");
    assert_eq!(got.headers["retry-after"], "1");
    // A small body still fits beside the stalled one.
    let got = send(
        &client(),
        request(
            "POST",
            &url,
            &[
                ("x-tenant-id", "acme"),
                ("content-type", "application/json"),
            ],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    drop(_stalled);
    // Once the stalled connection is gone, its bytes are given back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = send(
            &client(),
            request(
                "POST",
                &url,
                &[
                    ("x-tenant-id", "acme"),
                    ("content-type", "application/json"),
                ],
                &big,
            ),
        )
        .await;
        if got.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the buffer was never given back: {}",
            got.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/2 (prior knowledge) connection to byokd's data listener, its task spawned.
async fn h2_connect(
    h: &Harness,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let tcp = TcpStream::connect(h.byokd.data_addr).await.unwrap();
    let (send_req, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (send_req, tokio::spawn(conn))
}

/// `GET /byokd/usage` for acme over `send_req`, read to its end: the status.
async fn h2_usage(
    h: &Harness,
    send_req: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
) -> http::StatusCode {
    let req = http::Request::get(format!("http://{}/byokd/usage", h.byokd.data_addr))
        .header("x-tenant-id", "acme")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let resp = send_req.send_request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

/// `GET /byokd/usage` over HTTP/1.1, then silence: what came back before the server closed
/// the connection (or 8 s passed), and how long after the request that was.
async fn h1_usage_then_silence(h: &Harness) -> (String, Duration) {
    let mut s = TcpStream::connect(h.byokd.data_addr).await.unwrap();
    s.write_all(b"GET /byokd/usage HTTP/1.1\r\nhost: byokd\r\nx-tenant-id: acme\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_all(&mut s, Duration::from_secs(8)).await;
    (got, started.elapsed())
}

/// A head sent a few bytes at a time (slow-loris) holds its connection for at most
/// `header_timeout`, and so does an HTTP/1.1 connection waiting for its next head, whatever
/// `keepalive_timeout` says.
#[tokio::test]
async fn a_trickling_or_awaited_request_head_is_cut_after_header_timeout() {
    let h = Harness::new("limits: { header_timeout: 1s, keepalive_timeout: 60s }").await;
    let mut s = TcpStream::connect(h.byokd.data_addr).await.unwrap();
    let started = Instant::now();
    let trickle = async {
        for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: byokd\r\nx-tenant-id: acme\r\n" {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // 70 bytes at 100 ms: seven seconds of head, cut after about one.
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let got = read_all(&mut s, Duration::from_secs(8)).await;
    let closed_after = started.elapsed();
    assert!(got.is_empty(), "{got}");
    assert!(
        closed_after < Duration::from_secs(4),
        "the trickling head held its connection for {closed_after:?}"
    );

    // One whole request, then silence: closed after header_timeout, not keepalive_timeout.
    let (got, closed_after) = h1_usage_then_silence(&h).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        closed_after < Duration::from_secs(4),
        "the idle HTTP/1.1 connection stayed open {closed_after:?}"
    );

    // HTTP/2 awaits no head between requests: its idle connection is kept for keepalive_timeout.
    let (mut send_req, conn) = h2_connect(&h).await;
    for round in 0..2 {
        assert_eq!(h2_usage(&h, &mut send_req).await, 200, "round {round}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert!(!conn.is_finished());
}

/// A drain does not wait on a connection whose first request head never completes (hyper's
/// graceful close waits for that head); nor does the connection's task spin once its idle
/// bound has passed during the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_with_a_request_head_still_coming_in() {
    let h = Harness::new("limits: { header_timeout: 1s, drain_timeout: 20s }").await;
    let mut s = TcpStream::connect(h.byokd.data_addr).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: byokd\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), h.byokd.shutdown())
        .await
        .expect("the drain never ended");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain took {:?}",
        started.elapsed()
    );
    assert_eq!(read_all(&mut s, Duration::from_secs(2)).await, "");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let h = Harness::new("limits: { keepalive_timeout: 1s }").await;
    // HTTP/1.1: one request, then silence; the server closes the connection.
    let (got, closed_after) = h1_usage_then_silence(&h).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        closed_after < Duration::from_secs(4),
        "HTTP/1.1 connection still open after {closed_after:?}"
    );

    // HTTP/2: the connection ends (GOAWAY) once idle, not while a request is in flight.
    let (mut send_req, conn) = h2_connect(&h).await;
    assert_eq!(h2_usage(&h, &mut send_req).await, 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(8), conn)
        .await
        .expect("the idle HTTP/2 connection was never closed")
        .unwrap()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_streaming_response_keeps_its_connection_past_the_keep_alive_timeout() {
    let h = Harness::new("limits: { keepalive_timeout: 1s }").await;
    // 30 events at 100 ms: three seconds of stream on a one-second keep-alive.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/v1/chat/completions", h.byokd.data_addr),
            &[
                ("x-tenant-id", "acme"),
                ("content-type", "application/json"),
                ("x-fake-events", "30"),
                ("x-fake-pace-ms", "100"),
            ],
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(got.text().contains("data: [DONE]"), "{}", got.text());
    let _ = &h.up;
}

/// A body that arrives in pieces, so byokd answers before the client finished sending.
fn slow_body() -> (tokio::sync::mpsc::Sender<Bytes>, SlowBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    (tx, SlowBody(rx))
}

struct SlowBody(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for SlowBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn http2_early_answers_arrive_whole_with_a_hyper_client() {
    let h = Harness::new("").await;
    for _ in 0..10 {
        let tcp = TcpStream::connect(h.byokd.data_addr).await.unwrap();
        let (mut send_req, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let (tx, body) = slow_body();
        // No tenant: byokd answers 401 without needing the body.
        let req = http::Request::post(format!("http://{}/v1/chat/completions", h.byokd.data_addr))
            .header("content-type", "application/json")
            .body(body)
            .unwrap();
        let sender = tokio::spawn(async move {
            for _ in 0..3 {
                tx.send(Bytes::from_static(b"{\"model\":\"gpt-4o-mini\"}      "))
                    .await
                    .map_err(|_| "the server stopped reading the body")?;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Ok::<_, &str>(())
        });
        let resp = send_req.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["x-byokd-error"], "unknown_tenant");
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the stream was reset");
        assert!(
            String::from_utf8_lossy(&body.to_bytes()).contains("unknown_tenant"),
            "error body lost"
        );
        sender.await.unwrap().unwrap();
    }
}

fn curl(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "-", "-w", "\n%{http_code} %{http_version}"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_early_answers_arrive_whole_with_curl_over_h2c_and_tls() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let up = fake_upstream().await;
    let env = Env::new(&format!(
        "{}tls: {{ cert: tls.crt, key: tls.key }}\n",
        config_yaml(&up.url(), "")
    ));
    std::fs::write(env.dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(
        env.dir.path().join("tls.key"),
        cert.signing_key.serialize_pem(),
    )
    .unwrap();
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let tls = byokd::server::start(env.config()).await.unwrap();
    let plain = Harness::new("").await;

    let body = "x".repeat(200_000);
    let body_file = env.dir.path().join("body.json");
    std::fs::write(&body_file, &body).unwrap();
    let data = format!("@{}", body_file.display());
    let targets = [
        (
            "h2c",
            format!("http://{}/v1/chat/completions", plain.byokd.data_addr),
            "--http2-prior-knowledge",
        ),
        (
            "tls",
            format!(
                "https://localhost:{}/v1/chat/completions",
                tls.data_addr.port()
            ),
            "--http2",
        ),
    ];
    for (name, url, flag) in &targets {
        for i in 0..30 {
            // Two tenants at once: byokd answers identity_conflict before reading the body.
            let (rc, out) = tokio::task::block_in_place(|| {
                curl(&[
                    flag,
                    "-k",
                    "-X",
                    "POST",
                    "-H",
                    "x-tenant-id: acme",
                    "-H",
                    "x-tenant-id: other",
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    &data,
                    url,
                ])
            });
            assert_eq!(rc, 0, "{name} try {i}: curl failed: {out}");
            assert!(out.ends_with("401 2"), "{name} try {i}: {out}");
            assert!(out.contains("identity_conflict"), "{name} try {i}: {out}");
        }
    }
    tls.shutdown().await;
}

#[tokio::test]
async fn a_mapped_ipv4_loopback_peer_is_trusted_as_loopback() {
    let h = Harness::with_yaml(|up| {
        config_yaml(up, "").replace("listen: 127.0.0.1:0\n", "listen: \"[::]:0\"\n")
    })
    .await;
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://127.0.0.1:{}/v1/chat/completions", h.port()),
            &[
                ("x-tenant-id", "acme"),
                ("content-type", "application/json"),
            ],
            CHAT,
        ),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let _ = &h.env;
}

/// An upstream that sends a response head and closes before any of the body it announced.
async fn broken_upstream() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_upstream_failing_before_its_first_byte_is_answered_502() {
    let up = broken_upstream().await;
    let h = Harness::with_yaml(|_| config_yaml(&up, "")).await;
    for body in [CHAT, r#"{"model":"gpt-4o-mini","input":"x"}"#] {
        let path = if body == CHAT {
            "/v1/chat/completions"
        } else {
            "/v1/embeddings"
        };
        let got = send(
            &client(),
            request(
                "POST",
                &format!("http://{}{path}", h.byokd.data_addr),
                &[
                    ("x-tenant-id", "acme"),
                    ("content-type", "application/json"),
                ],
                body,
            ),
        )
        .await;
        assert_eq!(got.status, 502, "{path}: {}", got.text());
        assert_eq!(got.code(), "upstream_unreachable");
    }
}

/// Sends raw bytes and returns the status line.
async fn raw_status(addr: std::net::SocketAddr, req: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req.as_bytes()).await.unwrap();
    let got = read_all(&mut s, Duration::from_secs(5)).await;
    got.lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn http11_requests_need_exactly_one_host_on_both_listeners() {
    let h = Harness::new("").await;
    for addr in [h.byokd.data_addr, h.byokd.admin_addr] {
        for head in [
            "GET /byokd/usage HTTP/1.1\r\nx-tenant-id: acme\r\nconnection: close\r\n\r\n",
            "GET /byokd/usage HTTP/1.1\r\nhost: a\r\nhost: b\r\nx-tenant-id: acme\r\nconnection: close\r\n\r\n",
        ] {
            let status = raw_status(addr, head).await;
            assert!(
                status.starts_with("HTTP/1.1 400"),
                "{addr} {head:?}: {status}"
            );
        }
        let ok = raw_status(
            addr,
            "GET /healthz HTTP/1.1\r\nhost: a\r\nx-tenant-id: acme\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(!ok.starts_with("HTTP/1.1 400"), "{addr}: {ok}");
    }
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_on_both_listeners() {
    let admin_token = "admin-token-for-the-hardening-test";
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(admin_token.as_bytes()))
    };
    let up = fake_upstream().await;
    let yaml = config_yaml(&up.url(), "").replace(
        "admin: { listen: 127.0.0.1:0 }",
        &format!("admin: {{ listen: 127.0.0.1:0, token_sha256: \"{digest}\" }}"),
    );
    let env = Env::new(&yaml);
    env.add_key("acme", "openai", CANARY_OPENAI).await;
    let token = env.new_token("acme").await;
    let r = byokd::server::start(env.config()).await.unwrap();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let got = send(
            &client(),
            request(
                "POST",
                &format!("http://{}/v1/chat/completions", r.data_addr),
                &[
                    ("authorization", &format!("{scheme} {token}")),
                    ("content-type", "application/json"),
                ],
                CHAT,
            ),
        )
        .await;
        assert_eq!(got.status, 200, "{scheme}: {}", got.text());
        let got = send(
            &client(),
            request(
                "GET",
                &format!("http://{}/admin/keys", r.admin_addr),
                &[("authorization", &format!("{scheme} {admin_token}"))],
                "",
            ),
        )
        .await;
        assert_eq!(got.status, 200, "admin, {scheme}: {}", got.text());
    }
    // An admin body over 64 KiB is too large, not malformed.
    let got = send(
        &client(),
        request(
            "POST",
            &format!("http://{}/admin/keys", r.admin_addr),
            &[
                ("authorization", &format!("Bearer {admin_token}")),
                ("content-type", "application/json"),
            ],
            &format!("{{\"tenant\":\"{}\"}}", "t".repeat(70_000)),
        ),
    )
    .await;
    assert_eq!(got.status, 413, "{}", got.text());
    r.shutdown().await;
}
