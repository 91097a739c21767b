//! Faults on byokd's links, injected by a TCP proxy in front of each peer
//! (`common::faults::FaultProxy`): an upstream that is slow, throttled, reset or half-open
//! mid-stream; a KMS that hangs or refuses; PostgreSQL and Redis connections reset
//! mid-operation. Each test checks that nothing is lost: the stream arrives whole and metered
//! or ends visibly, no concurrency slot or budget reservation stays held, no revoked key is
//! served once the link is back, and no usage goes missing from the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bin::*;
use common::faults::{Dir, FaultProxy, Mode};
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A streamed chat with an output cap: its budget reservation is about 604,000 nano-dollars
/// of gpt-4o-mini, so a budget of 1,000,000 fits one in flight and not two.
const STREAM: &str = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str = r#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi there, byokd"}]}"#;
/// What a streamed chat's usage costs (120 prompt tokens of which 100 cached, 30 completion
/// tokens of which 10 reasoning), and what a [`CHAT`] answer costs (11 in, 7 out).
const STREAM_COST: u64 = 20 * 150 + 100 * 75 + 30 * 600;
const CHAT_COST: u64 = 11 * 150 + 7 * 600;

fn pricing() -> String {
    format!(
        "pricing: {}/config/pricing.yaml\n",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn post(base: &str, tenant: &str, path: &str, body: &str, extra: &[(&str, &str)]) -> Got {
    let mut h = vec![
        ("x-tenant-id", tenant),
        ("content-type", "application/json"),
    ];
    h.extend_from_slice(extra);
    let req = request("POST", &format!("{base}{path}"), &h, body);
    tokio::time::timeout(Duration::from_secs(20), send(&client(), req))
        .await
        .expect("a request to byokd took over 20 s")
}

async fn chat(base: &str, tenant: &str) -> Got {
    post(base, tenant, "/v1/chat/completions", CHAT, &[]).await
}

// ---------- a response read frame by frame ----------

/// How reading a streamed body stopped.
#[derive(Debug, PartialEq)]
enum End {
    /// The condition asked for holds.
    Matched,
    /// The body ended cleanly.
    Complete,
    /// The body ended with an error (the connection was cut).
    Failed(String),
    TimedOut,
}

/// A response whose body is read frame by frame, each frame with its arrival time.
struct Streamed {
    status: StatusCode,
    body: hyper::body::Incoming,
    t0: Instant,
    frames: Vec<(Duration, Bytes)>,
}

impl Streamed {
    async fn open(
        base: &str,
        tenant: &str,
        path: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut h = vec![
            ("x-tenant-id", tenant),
            ("content-type", "application/json"),
        ];
        h.extend_from_slice(extra);
        let t0 = Instant::now();
        let req = request("POST", &format!("{base}{path}"), &h, body);
        let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
            .await
            .expect("no response headers within 10 s")
            .unwrap();
        let (parts, body) = resp.into_parts();
        Streamed {
            status: parts.status,
            body,
            t0,
            frames: Vec::new(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        self.frames.iter().flat_map(|(_, b)| b.to_vec()).collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Reads until `until(all bytes so far)` holds, the body ends, or `within` passed.
    async fn read_until(&mut self, within: Duration, until: impl Fn(&str) -> bool) -> End {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if until(&self.text()) {
                return End::Matched;
            }
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return End::TimedOut,
                Ok(None) => return End::Complete,
                Ok(Some(Err(e))) => return End::Failed(e.to_string()),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data()
                        && !d.is_empty()
                    {
                        self.frames.push((self.t0.elapsed(), d));
                    }
                }
            }
        }
    }

    async fn read_to_end(&mut self, within: Duration) -> End {
        self.read_until(within, |_| false).await
    }
}

fn chunks(text: &str) -> usize {
    text.matches("chat.completion.chunk").count()
}

/// An upstream-side harness: the fake provider behind a fault proxy, byokd in-process with
/// every provider pointing at the proxy.
struct Upstream {
    up: FakeUpstream,
    px: FaultProxy,
    _env: Env,
    byokd: byokd::server::Running,
    base: String,
}

impl Upstream {
    async fn start(extra: &str, tenants: &[&str]) -> Upstream {
        let up = fake_upstream().await;
        let px = FaultProxy::start(up.addr).await;
        let env = Env::new(&config_yaml(&px.url(), &format!("{}{extra}", pricing())));
        for t in tenants {
            env.add_key(t, "openai", CANARY_OPENAI).await;
            env.add_key(t, "anthropic", CANARY_ANTHROPIC).await;
        }
        let byokd = byokd::server::start(env.config()).await.unwrap();
        let base = format!("http://{}", byokd.data_addr);
        Upstream {
            up,
            px,
            _env: env,
            byokd,
            base,
        }
    }

    async fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        sample(&metrics(self.byokd.admin_addr).await, name, parts).unwrap_or(0.0)
    }
}

// ---------- the proxy itself ----------

/// An echo server: what each mode does is seen from the client side.
async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .map_err(|_| std::io::Error::other("no echo within 5 s"))??;
    Ok(got)
}

#[tokio::test]
async fn the_fault_proxy_does_what_each_mode_says() {
    const T: Duration = Duration::from_secs(5);
    let p = FaultProxy::start(echo().await).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");

    // Latency: 100 ms per chunk, there and back.
    p.set(Mode::Latency(Duration::from_millis(100)));
    let t = Instant::now();
    assert_eq!(roundtrip(&mut s, b"slow").await.unwrap(), b"slow");
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    // Bandwidth: 2,000 bytes at 10,000 B/s take 0.2 s, in 50 ms slices (the way back
    // overlaps: the echo returns each slice as it comes).
    p.set(Mode::Bandwidth(10_000));
    let t = Instant::now();
    let big = vec![7u8; 2_000];
    assert_eq!(roundtrip(&mut s, &big).await.unwrap(), big);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );

    // Half-open: the reply is held, not lost, and arrives once the mode passes again.
    p.set(Mode::HalfOpen(Dir::Down));
    s.write_all(b"held").await.unwrap();
    let mut got = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut got)).await;
    assert!(r.is_err(), "a half-open link delivered data");
    p.set(Mode::Pass);
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"held");

    // Blackhole: a new connection is accepted, and nothing ever comes back.
    p.set(Mode::Blackhole);
    let mut b = TcpStream::connect(p.addr).await.unwrap();
    b.write_all(b"anyone?").await.unwrap();
    let mut one = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), b.read(&mut one)).await;
    assert!(r.is_err(), "a blackhole answered");

    // Reset: every open connection sees RST, the blackholed one included.
    p.reset();
    for c in [&mut s, &mut b] {
        let r = tokio::time::timeout(T, c.read(&mut one)).await.unwrap();
        let e = r.expect_err("a reset connection read data or EOF");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }

    // Refuse: nothing listens; after Pass the same port answers again.
    p.set(Mode::Refuse);
    let t = Instant::now();
    loop {
        // Until the accept loop has closed the listener, a connection may still be
        // accepted, or reset when it lands in the closing listener's backlog.
        match TcpStream::connect(p.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            r => assert!(t.elapsed() < T, "still accepting: {r:?}"),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.set(Mode::Pass);
    let t = Instant::now();
    let mut s = loop {
        if let Ok(s) = TcpStream::connect(p.addr).await {
            break s;
        }
        assert!(t.elapsed() < T, "not listening again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(roundtrip(&mut s, b"back").await.unwrap(), b"back");
    assert!(p.stats.reset.load(Ordering::Relaxed) >= 2);
}

// ---------- upstream ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_or_throttled_upstream_stream_arrives_whole_unbuffered_and_metered() {
    let h = Upstream::start("", &["acme"]).await;
    // What the app gets: the stream without the usage byokd asked for, byte for byte.
    let expected = |n: usize| openai_events(n, "gpt-4o-mini", false).concat();
    let tokens = async |ty: &str| {
        h.metric(
            "byokd_tokens_total",
            &[
                "tenant=\"acme\"",
                "model=\"gpt-4o-mini\"",
                &format!("type=\"{ty}\""),
            ],
        )
        .await
    };

    // 100 ms added to every chunk on the link, events 60 ms apart: each event still reaches
    // the app as it comes, not gathered up by byokd.
    h.px.set(Mode::Latency(Duration::from_millis(100)));
    let pace = Duration::from_millis(60);
    let n = 8;
    let t = Instant::now();
    let mut s = Streamed::open(
        &h.base,
        "acme",
        "/v1/chat/completions",
        STREAM,
        &[("x-fake-pace-ms", "60"), ("x-fake-events", "8")],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.read_to_end(Duration::from_secs(15)).await, End::Complete);
    let took = t.elapsed();
    assert_eq!(s.text(), expected(n), "the stream changed on a slow link");
    let first = s.frames.first().unwrap().0;
    let last = s.frames.last().unwrap().0;
    assert!(
        last - first >= pace * (n as u32 - 2),
        "events arrived together ({first:?}..{last:?}): byokd buffered the stream"
    );
    assert!(
        s.frames.len() >= n / 2,
        "{} frames for {n} events: byokd merged them",
        s.frames.len()
    );
    assert_eq!(tokens("input").await, 20.0);
    eprintln!(
        "latency: {n} events in {took:?}, {} frames, first at {first:?}, last at {last:?}",
        s.frames.len()
    );

    // 2,000 bytes a second: every event is split at arbitrary bytes on the way in; the app
    // still gets exactly the stream, and the usage chunk byokd added is found and removed.
    let bps = 2_000;
    h.px.set(Mode::Bandwidth(bps));
    let down0 = h.px.stats.bytes_down.load(Ordering::Relaxed);
    let t = Instant::now();
    let mut s = Streamed::open(
        &h.base,
        "acme",
        "/v1/chat/completions",
        STREAM,
        &[("x-fake-events", "6")],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.read_to_end(Duration::from_secs(20)).await, End::Complete);
    let took = t.elapsed();
    let carried = h.px.stats.bytes_down.load(Ordering::Relaxed) - down0;
    assert_eq!(
        s.text(),
        expected(6),
        "the stream changed on a throttled link"
    );
    assert!(
        took.as_secs_f64() >= 0.8 * carried as f64 / bps as f64,
        "{carried} bytes in {took:?}: the limit did not hold"
    );
    // Metered twice now: 20 + 20 uncached input, 100 + 100 cached, 20 + 20 output, 10 + 10
    // reasoning.
    for (ty, n) in [
        ("input", 40.0),
        ("cached_input", 200.0),
        ("output", 40.0),
        ("reasoning", 20.0),
    ] {
        assert_eq!(tokens(ty).await, n, "byokd_tokens_total type {ty}");
    }
    eprintln!(
        "bandwidth: {carried} bytes at {bps} B/s in {took:?}, {} frames",
        s.frames.len()
    );
    h.byokd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_reset_mid_stream_ends_the_stream_and_releases_slot_and_reservation() {
    // One request at a time, and a budget that fits one reservation: a slot or a reservation
    // left behind by the cut stream would refuse the next request.
    let h = Upstream::start(
        "tenants:\n  one: { limits: { concurrent: 1 }, budget: { monthly_usd: 0.001 } }\n",
        &["one"],
    )
    .await;
    for (path, body, marker) in [
        ("/v1/chat/completions", STREAM, "chat.completion.chunk"),
        (
            "/anthropic/v1/messages",
            r#"{"model":"claude-3-5-haiku-20241022","max_tokens":20,"stream":true,"messages":[]}"#,
            "content_block_delta",
        ),
    ] {
        let t = Instant::now();
        let mut s = Streamed::open(
            &h.base,
            "one",
            path,
            body,
            &[("x-fake-pace-ms", "100"), ("x-fake-events", "30")],
        )
        .await;
        assert_eq!(s.status, 200);
        let got = s
            .read_until(Duration::from_secs(10), |t| t.matches(marker).count() >= 3)
            .await;
        assert_eq!(got, End::Matched);
        // Both sides of the link get RST, byokd's and the provider's.
        h.px.reset();
        let reset_at = t.elapsed();
        let end = s.read_to_end(Duration::from_secs(5)).await;
        assert!(
            matches!(end, End::Failed(_)),
            "the app must see the cut stream end as an error, got {end:?}: {}",
            s.text()
        );
        assert!(
            s.text().matches(marker).count() < 30,
            "the whole stream passed: {}",
            s.text()
        );
        // The slot and the reservation came back: the next request passes at once.
        let got = chat(&h.base, "one").await;
        assert_eq!(got.status, 200, "after a cut {path}: {}", got.text());
        eprintln!(
            "reset {path}: cut at {reset_at:?}, stream ended {:?} later, next request passed",
            t.elapsed() - reset_at
        );
    }
    // The provider saw both streams dropped, not finished.
    assert!(
        poll_until(Duration::from_secs(3), async || {
            *h.up.state.cancelled.lock().unwrap() >= 2
        })
        .await
        .is_some()
    );
    // Metered as README says: an OpenAI stream carries usage only at its end, so the cut one
    // counts as usage missing; an Anthropic stream is counted for what it sent
    // (`message_start`'s input and cache counts).
    assert_eq!(
        h.metric(
            "byokd_usage_missing_total",
            &["provider=\"openai\"", "reason=\"not_found\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        h.metric(
            "byokd_tokens_total",
            &[
                "tenant=\"one\"",
                "provider=\"anthropic\"",
                "type=\"cached_input\""
            ]
        )
        .await,
        300.0
    );
    assert_eq!(
        h.metric(
            "byokd_requests_total",
            &["tenant=\"one\"", "provider=\"openai\"", "code=\"200\""]
        )
        .await,
        3.0,
        "the cut stream and the two chats"
    );
    h.byokd.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_stops_sending_mid_stream_is_ended_by_the_idle_timeout() {
    let h = Upstream::start(
        "limits: { idle_timeout: 1s }\ntenants:\n  one: { limits: { concurrent: 1 }, budget: { monthly_usd: 0.001 } }\n",
        &["one"],
    )
    .await;
    let mut s = Streamed::open(
        &h.base,
        "one",
        "/v1/chat/completions",
        STREAM,
        &[("x-fake-pace-ms", "100"), ("x-fake-events", "30")],
    )
    .await;
    assert_eq!(s.status, 200);
    let got = s
        .read_until(Duration::from_secs(10), |t| chunks(t) >= 3)
        .await;
    assert_eq!(got, End::Matched);
    // The provider's bytes stop reaching byokd; nothing is closed or reset.
    h.px.set(Mode::HalfOpen(Dir::Down));
    let t = Instant::now();
    let end = s.read_to_end(Duration::from_secs(10)).await;
    let took = t.elapsed();
    assert!(
        matches!(end, End::Failed(_)),
        "a stalled stream must be cut, got {end:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "limits.idle_timeout is 1s, the stream ended after {took:?}"
    );
    assert!(chunks(&s.text()) < 30);
    h.px.set(Mode::Pass);
    let got = chat(&h.base, "one").await;
    assert_eq!(
        got.status,
        200,
        "slot or reservation held after the idle cut: {}",
        got.text()
    );
    eprintln!("half-open upstream: stream ended {took:?} after the link stalled");
    h.byokd.shutdown().await;
}

// ---------- KMS ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kms_that_hangs_or_refuses_fails_cold_keys_fast_and_recovers() {
    let moto = Moto::start().await;
    let key = moto.create_key().await;
    moto.alias("alias/byokd", &key).await;
    let moto_addr: SocketAddr = moto.url.trim_start_matches("http://").parse().unwrap();
    let px = FaultProxy::start(moto_addr).await;
    let up = fake_upstream().await;
    let env = Env::new(&format!(
        r#"identity:
  - header: {{ name: x-tenant-id }}
kms:
  aws: {{ key_id: alias/byokd, region: us-east-1, endpoint_url: "{}", timeout: 1s }}
store:
  file: {{ path: .byokd/keys.json }}
key_cache: {{ ttl: 1h }}
audit: {{ file: audit.jsonl }}
providers:
  openai: {{ kind: openai, base_url: "{}" }}
"#,
        px.url(),
        up.url()
    ));
    for t in ["warm", "cold", "cold2"] {
        ok(byokd_env(
            &env.config_path,
            &["keys", "add", "--tenant", t, "--provider", "openai"],
            Some(&format!("sk-{t}-0123456789abcdefghijklmn")),
            AWS_ENV,
        ));
    }
    let s = serve_env(&env, "serve", AWS_ENV).await;
    assert_eq!(chat(&s.data, "warm").await.status, 200);

    // The KMS hangs: connections are accepted and never answered.
    px.set(Mode::Blackhole);
    let t = Instant::now();
    let got = chat(&s.data, "cold").await;
    let took = t.elapsed();
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (503, "key_unavailable"),
        "{}",
        got.text()
    );
    assert!(got.headers.contains_key("retry-after"));
    // kms.aws.timeout is 1 s for the call and its retry together.
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(2500),
        "a cold key with a hanging KMS answered after {took:?}"
    );
    let t = Instant::now();
    assert_eq!(chat(&s.data, "warm").await.status, 200);
    let warm_took = t.elapsed();
    assert!(
        warm_took < Duration::from_millis(500),
        "a cached key waited on the KMS: {warm_took:?}"
    );
    px.set(Mode::Pass);
    let recovered = poll_until(Duration::from_secs(10), async || {
        chat(&s.data, "cold").await.status == 200
    })
    .await;
    assert!(
        recovered.is_some(),
        "no recovery after the KMS answered again: {}",
        s.logs()
    );

    // The KMS refuses connections (and the open ones are reset): fast 503, same recovery.
    px.set(Mode::Refuse);
    px.reset();
    let t = Instant::now();
    let got = chat(&s.data, "cold2").await;
    let refused_took = t.elapsed();
    assert_eq!(got.code(), "key_unavailable", "{}", got.text());
    assert!(
        refused_took < Duration::from_millis(2500),
        "{refused_took:?}"
    );
    assert_eq!(chat(&s.data, "warm").await.status, 200);
    assert_eq!(chat(&s.data, "cold").await.status, 200);
    px.set(Mode::Pass);
    let recovered2 = poll_until(Duration::from_secs(10), async || {
        chat(&s.data, "cold2").await.status == 200
    })
    .await;
    assert!(recovered2.is_some(), "{}", s.logs());
    eprintln!(
        "kms: hang answered in {took:?} (warm key {warm_took:?}), recovered {recovered:?} after; \
         refusal answered in {refused_took:?}, recovered {recovered2:?} after"
    );
}

// ---------- PostgreSQL ----------

fn pg_yaml(upstream: &str, url: &str) -> String {
    format!(
        r#"identity:
  - header: {{ name: x-tenant-id }}
kms:
  local: {{ keks: {{ k1: kek-k1 }}, active: k1 }}
store:
  postgres: {{ url: "{url}" }}
audit: {{ file: audit.jsonl }}
providers:
  openai: {{ kind: openai, base_url: "{upstream}" }}
"#
    )
}

async fn reloads_ok(s: &Served) -> f64 {
    let admin: SocketAddr = s.admin.parse().unwrap();
    sample(
        &metrics(admin).await,
        "byokd_config_reloads_total",
        &["result=\"ok\""],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reset_mid_operation_serves_no_revoked_key_and_loses_no_usage() {
    let db = PgDb::create().await;
    let px = FaultProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let up = fake_upstream().await;
    // Management goes straight to the database, the serving replica through the proxy.
    let direct = Env::new(&pg_yaml(&up.url(), &db.url));
    let add = |tenant: &str, secret: &str| {
        let out = ok(byokd(
            &direct.config_path,
            &["keys", "add", "--tenant", tenant, "--provider", "openai"],
            Some(secret),
        ));
        out.split_whitespace().next().unwrap().to_string()
    };
    let acme = add("acme", CANARY_OPENAI);
    add("beta", "sk-beta-0123456789abcdefghij");
    let proxied = Env::new(&pg_yaml(
        &up.url(),
        &format!("postgres://postgres@{}/{}", px.addr, db.name),
    ));
    std::fs::copy(
        direct.dir.path().join("kek-k1"),
        proxied.dir.path().join("kek-k1"),
    )
    .unwrap();
    let s = serve_env(&proxied, "serve", &[]).await;
    let mut beta_ok = 0u64;
    assert_eq!(chat(&s.data, "acme").await.status, 200);
    for _ in 0..3 {
        assert_eq!(chat(&s.data, "beta").await.status, 200);
        beta_ok += 1;
    }

    // Blips: every connection byokd holds to PostgreSQL (the LISTEN connection and the
    // store's) is reset, byokd reconnects and reloads, and it happens again. Requests keep
    // being served from memory meanwhile, and their usage waits to be written.
    let t = Instant::now();
    for round in 0..5 {
        let before = reloads_ok(&s).await;
        px.reset();
        assert_eq!(chat(&s.data, "beta").await.status, 200);
        beta_ok += 1;
        let back = poll_until(Duration::from_secs(15), async || {
            reloads_ok(&s).await > before
        })
        .await;
        assert!(back.is_some(), "round {round}: no reload: {}", s.logs());
    }
    let blips = t.elapsed();

    // The link is cut and stays cut while another connection revokes acme's key.
    let cut = Instant::now();
    px.set(Mode::Refuse);
    px.reset();
    ok(byokd(&direct.config_path, &["keys", "revoke", &acme], None));
    // Still the last good state: documented, the replica cannot know yet.
    assert_eq!(chat(&s.data, "acme").await.status, 200);
    for _ in 0..2 {
        assert_eq!(chat(&s.data, "beta").await.status, 200);
        beta_ok += 1;
    }
    // The link comes back: the revocation lands within seconds, and then never serves again.
    let cut_for = cut.elapsed();
    px.set(Mode::Pass);
    let revoked = poll_until(Duration::from_secs(15), async || {
        chat(&s.data, "acme").await.code() == "no_key"
    })
    .await;
    assert!(
        revoked.is_some(),
        "revoked key still served 15 s after the link returned: {}",
        s.logs()
    );
    for _ in 0..3 {
        assert_eq!(chat(&s.data, "acme").await.code(), "no_key");
    }

    // No usage lost: every request of beta reaches byokd_usage (written every 5 s).
    let c = db.client().await;
    let mut in_db = 0;
    let written = poll_until(Duration::from_secs(15), async || {
        let r = c
            .query_one(
                "SELECT COALESCE(SUM(requests), 0)::bigint FROM byokd_usage WHERE tenant = 'beta'",
                &[],
            )
            .await
            .unwrap();
        in_db = r.get::<_, i64>(0) as u64;
        in_db >= beta_ok
    })
    .await;
    assert!(
        written.is_some(),
        "usage lost: {in_db} of {beta_ok} requests in PostgreSQL: {}",
        s.logs()
    );
    // A commit whose answer was cut may count twice (README); never less.
    assert!(in_db <= 2 * beta_ok, "{in_db} for {beta_ok}");
    eprintln!(
        "postgres: 5 blips in {blips:?}; cut for {cut_for:?}; revocation seen {revoked:?} after the link returned; \
         usage {in_db}/{beta_ok} in the database {written:?} later"
    );
    // Reconnecting backs off while the link stays cut (250 ms, doubling), so the first try
    // after it returns comes at most about as long after as the cut lasted; earlier blips,
    // each followed by a good reconnect, must not add to that.
    assert!(
        revoked.unwrap() < cut_for + Duration::from_secs(1),
        "after {blips:?} of blips and a cut of {cut_for:?}, the revocation took {revoked:?} \
         after the link returned: the listener's reconnect backoff was not reset"
    );
}

// ---------- Redis ----------

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", "6379"])
        .args(args)
        .output()
        .expect("redis-cli is needed for this test");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Entries in the sorted sets whose keys match `pattern` (slots or reservations held).
fn held(pattern: &str) -> u64 {
    redis_cli(&["--scan", "--pattern", pattern])
        .lines()
        .map(|k| redis_cli(&["ZCARD", k]).parse::<u64>().unwrap_or(0))
        .sum()
}

/// Deletes the test's keys from the machine's Redis, also when the test fails.
struct RedisPrefix(String);

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        for k in redis_cli(&["--scan", "--pattern", &format!("{}*", self.0)]).lines() {
            redis_cli(&["DEL", k]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_reset_mid_operation_leaks_no_slot_and_no_reservation() {
    let prefix = RedisPrefix(format!(
        "byokd-faults-{}-{:x}:",
        std::process::id(),
        rand_u64()
    ));
    let p = &prefix.0;
    let up = fake_upstream().await;
    let px = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await;
    // `one`: a slot and a budget (budgets fail closed by default); `open`: a slot only
    // (limits fail open by default).
    let env = Env::new(&config_yaml(
        &up.url(),
        &format!(
            "{}shared_state: {{ redis: {{ url: \"redis://{}\", prefix: \"{p}\", timeout: 300ms }} }}\ntenants:\n  one: {{ limits: {{ concurrent: 1 }}, budget: {{ monthly_usd: 1 }} }}\n  open: {{ limits: {{ concurrent: 1 }} }}\n",
            pricing(),
            px.addr
        ),
    ));
    env.add_key("one", "openai", CANARY_OPENAI).await;
    env.add_key("open", "openai", CANARY_OPENAI).await;
    let r = byokd::server::start(env.config()).await.unwrap();
    let base = format!("http://{}", r.data_addr);
    let mut spent = 0u64;
    let connected = poll_until(Duration::from_secs(5), async || {
        chat(&base, "one").await.status == 200
    })
    .await;
    assert!(connected.is_some(), "never connected to Redis");
    spent += CHAT_COST;
    let one_conc = format!("{p}{{one}}:conc");
    let one_res = format!("{p}{{one}}:res:*");
    let open_conc = format!("{p}{{open}}:conc");
    let nothing_held = async || {
        poll_until(Duration::from_secs(5), async || {
            held(&one_conc) + held(&one_res) + held(&open_conc) == 0
        })
        .await
        .is_some()
    };
    assert!(nothing_held().await);

    // 1. Redis is reset and refused while a stream holds `one`'s slot and reservation: the
    //    stream runs on; during the outage the budget fails closed and the limit-only tenant
    //    is served; when Redis returns, the stream's release is retried and lands.
    let mut s = Streamed::open(
        &base,
        "one",
        "/v1/chat/completions",
        STREAM,
        &[("x-fake-pace-ms", "100"), ("x-fake-events", "6")],
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(
        s.read_until(Duration::from_secs(5), |t| chunks(t) >= 1)
            .await,
        End::Matched
    );
    assert_eq!(held(&one_conc), 1, "the stream's slot is in Redis");
    px.set(Mode::Refuse);
    px.reset();
    let got = chat(&base, "one").await;
    assert_eq!(
        (got.status.as_u16(), got.code()),
        (503, "shared_state_unavailable"),
        "{}",
        got.text()
    );
    assert!(got.headers.contains_key("retry-after"));
    assert_eq!(chat(&base, "open").await.status, 200, "limits fail open");
    assert_eq!(s.read_to_end(Duration::from_secs(10)).await, End::Complete);
    assert!(s.text().ends_with("data: [DONE]\n\n"));
    spent += STREAM_COST;
    px.set(Mode::Pass);
    let back = poll_until(Duration::from_secs(10), async || {
        chat(&base, "one").await.status == 200
    })
    .await;
    assert!(
        back.is_some(),
        "no request of `one` passed after Redis returned"
    );
    spent += CHAT_COST;
    assert!(
        nothing_held().await,
        "after a reset mid-stream: slots {} {}, reservations {}",
        held(&one_conc),
        held(&open_conc),
        held(&one_res)
    );

    // 2. Redis runs byokd's scripts but its answers are lost (half-open, then reset): the
    //    admit script took a slot and the reserve script a reservation that byokd never
    //    heard of. The request is refused, and once Redis answers again neither is held.
    px.set(Mode::HalfOpen(Dir::Down));
    let (up0, down0) = (
        px.stats.bytes_up.load(Ordering::Relaxed),
        px.stats.bytes_down.load(Ordering::Relaxed),
    );
    let t = Instant::now();
    let got = chat(&base, "one").await;
    let refused_in = t.elapsed();
    assert_eq!(got.code(), "shared_state_unavailable", "{}", got.text());
    // The scripts reached Redis, and ran; not one byte of their answers came back. (Whether
    // the slot and the reservation can still be seen now depends on how fast byokd's give-
    // backs, which also reach Redis, ran: nothing to assert on.)
    assert!(px.stats.bytes_up.load(Ordering::Relaxed) > up0);
    assert_eq!(px.stats.bytes_down.load(Ordering::Relaxed), down0);
    px.reset();
    px.set(Mode::Pass);
    let back2 = poll_until(Duration::from_secs(10), async || {
        chat(&base, "one").await.status == 200
    })
    .await;
    assert!(
        back2.is_some(),
        "no request of `one` passed after Redis returned"
    );
    spent += CHAT_COST;
    let released = nothing_held().await;
    // No usage lost, none counted twice: the spend key holds what byokd metered.
    let spend_key = redis_cli(&["--scan", "--pattern", &format!("{p}{{one}}:spend:*")]);
    let in_redis = poll_until(Duration::from_secs(5), async || {
        redis_cli(&["GET", &spend_key]).parse::<u64>().ok() == Some(spent)
    })
    .await;
    eprintln!(
        "redis: recovered {back:?} after a reset mid-stream; lost answers refused in \
         {refused_in:?}, recovered {back2:?} after"
    );
    assert!(
        in_redis.is_some(),
        "spend in Redis {} != metered {spent}",
        redis_cli(&["GET", &spend_key])
    );
    assert!(
        released,
        "after lost answers: slots {}, reservations {} still held",
        held(&one_conc),
        held(&one_res)
    );
    r.shutdown().await;
}

/// The upstream pool: requests in a row share one connection; a pooled connection the
/// network reset while it sat idle is noticed and a new one made, with no request failed
/// or counted as an upstream error; a connection idle past `upstream.pool_idle_timeout` is
/// not used again.
#[tokio::test]
async fn upstream_connections_are_pooled_and_dead_or_stale_ones_replaced() {
    let u = Upstream::start("upstream: { pool_idle_timeout: 1s }\n", &["acme"]).await;
    let accepted = || u.px.stats.accepted.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(chat(&u.base, "acme").await.status, StatusCode::OK);
    }
    // One per worker thread at most (this test's runtime has one); without a pool, 20.
    assert!(
        accepted() <= 2,
        "20 requests opened {} connections",
        accepted()
    );

    let before = accepted();
    u.px.reset();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..5 {
        assert_eq!(chat(&u.base, "acme").await.status, StatusCode::OK);
    }
    assert!(accepted() > before, "the reset connection was not replaced");
    assert_eq!(u.metric("byokd_upstream_errors_total", &[]).await, 0.0);

    let before = accepted();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(chat(&u.base, "acme").await.status, StatusCode::OK);
    assert_eq!(
        accepted(),
        before + 1,
        "a connection idle past pool_idle_timeout was used again"
    );
    assert_eq!(
        u.up.seen().len(),
        26,
        "every request reached the provider once"
    );
}
