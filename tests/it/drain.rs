//! Graceful drain at scale, through the real binary: 200 streams open at SIGTERM (HTTP/1.1,
//! HTTP/2 through hyper, and one HTTP/2 connection read frame by frame) all finish through
//! `data: [DONE]` and are metered in the usage ledger; HTTP/2 connections get GOAWAY and refuse
//! new streams while their open ones complete; new TCP connections are refused; the admin
//! listener keeps answering (`/readyz` 503) during the drain; the process exits 0 within
//! `limits.drain_timeout`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::bin::sigterm;
use crate::common::*;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const TENANTS: usize = 10;
const H1_STREAMS: usize = 100;
const H2_CONNS: usize = 3;
const H2_STREAMS_PER_CONN: usize = 33;
/// 100 + 3 × 33 + the one read frame by frame.
const STREAMS: usize = H1_STREAMS + H2_CONNS * H2_STREAMS_PER_CONN + 1;
/// 30 events 100 ms apart: each stream lasts about three seconds.
const EVENTS: &str = "30";
const PACE_MS: &str = "100";
const DRAIN: Duration = Duration::from_secs(10);
const BODY: &str =
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn tenant(i: usize) -> String {
    format!("drain-{}", i % TENANTS)
}

fn chat_request(authority: &str, tenant: &str) -> http::Request<Full<Bytes>> {
    http::Request::post(format!("http://{authority}/v1/chat/completions"))
        .header("x-tenant-id", tenant)
        .header("content-type", "application/json")
        .header("x-fake-events", EVENTS)
        .header("x-fake-pace-ms", PACE_MS)
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

/// Counts streams that have their first body bytes, and wakes the test at each one.
#[derive(Default)]
struct FirstBytes {
    n: AtomicUsize,
    notify: Notify,
}

impl FirstBytes {
    fn arrived(&self) {
        self.n.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_one();
    }

    async fn wait_for(&self, want: usize, limit: Duration) {
        let t = Instant::now();
        while self.n.load(Ordering::SeqCst) < want {
            let left = limit.checked_sub(t.elapsed()).unwrap_or_else(|| {
                panic!(
                    "only {} of {want} streams had their first bytes after {limit:?}",
                    self.n.load(Ordering::SeqCst)
                )
            });
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), self.notify.notified())
                    .await;
        }
    }
}

/// Reads one streaming response: its status must be 200; reports the first body bytes, then
/// returns the whole body.
async fn read_stream(resp: http::Response<Incoming>, first: &FirstBytes) -> Result<String, String> {
    if resp.status() != 200 {
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        return Err(format!("status != 200: {body:?}"));
    }
    let mut body = resp.into_body();
    let mut out = Vec::new();
    let mut reported = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body error after {} bytes: {e}", out.len()))?;
        if let Some(d) = frame.data_ref() {
            out.extend_from_slice(d);
            if !reported && !d.is_empty() {
                reported = true;
                first.arrived();
            }
        }
    }
    String::from_utf8(out).map_err(|e| e.to_string())
}

fn check_body(what: &str, body: &str) {
    assert!(
        body.contains("tok29 ") && body.ends_with("data: [DONE]\n\n"),
        "{what}: stream cut by the drain: {body:?}"
    );
    // The app did not ask for usage: byokd asked for it and must still hide it at shutdown.
    assert!(!body.contains("\"usage\""), "{what}: usage leaked: {body}");
}

/// An HTTP/2 connection driven frame by frame, to see the GOAWAY frame itself and what the
/// server sends after it.
struct RawH2 {
    tcp: TcpStream,
    buf: Vec<u8>,
}

struct RawOutcome {
    /// Body bytes of stream 1 received before / after the first GOAWAY.
    before_goaway: Vec<u8>,
    after_goaway: Vec<u8>,
    /// (last stream id, error code) of each GOAWAY, in order.
    goaways: Vec<(u32, u32)>,
    /// The stream ended with END_STREAM.
    ended: bool,
    /// The server closed the connection after the stream ended.
    closed: bool,
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(ty);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK "literal header field without indexing, new name", no Huffman coding.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    for s in [name, value] {
        assert!(s.len() < 127, "one-byte HPACK lengths only");
        out.push(u8::try_from(s.len()).unwrap());
        out.extend_from_slice(s.as_bytes());
    }
}

impl RawH2 {
    /// Connects, and opens stream 1 with a streaming chat request.
    async fn open(authority: &str, tenant: &str) -> RawH2 {
        let mut tcp = TcpStream::connect(authority).await.unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(0x4, 0, 0, &[]));
        let mut block = Vec::new();
        for (n, v) in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/v1/chat/completions"),
            (":authority", authority),
            ("content-type", "application/json"),
            ("x-tenant-id", tenant),
            ("x-fake-events", EVENTS),
            ("x-fake-pace-ms", PACE_MS),
        ] {
            hpack_literal(&mut block, n, v);
        }
        out.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
        out.extend(frame(0x0, 0x1, 1, BODY.as_bytes())); // DATA, END_STREAM
        tcp.write_all(&out).await.unwrap();
        RawH2 {
            tcp,
            buf: Vec::new(),
        }
    }

    /// The next frame: (type, flags, stream, payload); `None` when the server closed.
    async fn next(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = usize::from(self.buf[0]) << 16
                    | usize::from(self.buf[1]) << 8
                    | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let (ty, flags) = (self.buf[3], self.buf[4]);
                    let stream =
                        u32::from_be_bytes(self.buf[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Some((ty, flags, stream, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads the connection to its end, acking SETTINGS and PING (hyper's graceful shutdown
    /// waits for a PING ack before its final GOAWAY). Reports the first body bytes of stream 1.
    async fn run(mut self, first: &FirstBytes) -> RawOutcome {
        let mut o = RawOutcome {
            before_goaway: Vec::new(),
            after_goaway: Vec::new(),
            goaways: Vec::new(),
            ended: false,
            closed: false,
        };
        let mut status_ok = false;
        while let Some((ty, flags, stream, payload)) = self.next().await {
            match ty {
                // DATA
                0x0 if stream == 1 => {
                    assert!(status_ok, "DATA before a 200 HEADERS");
                    if o.before_goaway.is_empty() && o.after_goaway.is_empty() {
                        first.arrived();
                    }
                    assert_eq!(flags & 0x8, 0, "padded DATA");
                    let data = &payload[..];
                    if o.goaways.is_empty() {
                        o.before_goaway.extend_from_slice(data);
                    } else {
                        o.after_goaway.extend_from_slice(data);
                    }
                    if flags & 0x1 != 0 {
                        o.ended = true;
                    }
                    // Keep both windows open whatever the body's size.
                    if !data.is_empty() {
                        let inc = u32::try_from(payload.len()).unwrap().to_be_bytes();
                        let mut w = frame(0x8, 0, 0, &inc);
                        w.extend(frame(0x8, 0, 1, &inc));
                        let _ = self.tcp.write_all(&w).await;
                    }
                }
                // HEADERS: byokd's HPACK encodes `:status: 200` as static index 8.
                0x1 if stream == 1 => {
                    assert_eq!(payload.first(), Some(&0x88), "not a 200: {payload:?}");
                    status_ok = true;
                    if flags & 0x1 != 0 {
                        o.ended = true;
                    }
                }
                // RST_STREAM
                0x3 => panic!("stream {stream} reset: {payload:?}"),
                // SETTINGS without ACK
                0x4 if flags & 0x1 == 0 => {
                    let _ = self.tcp.write_all(&frame(0x4, 0x1, 0, &[])).await;
                }
                // PING without ACK
                0x6 if flags & 0x1 == 0 => {
                    let _ = self.tcp.write_all(&frame(0x6, 0x1, 0, &payload)).await;
                }
                // GOAWAY
                0x7 => {
                    let last = u32::from_be_bytes(payload[0..4].try_into().unwrap()) & 0x7fff_ffff;
                    let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                    o.goaways.push((last, code));
                }
                _ => {}
            }
        }
        o.closed = true;
        o
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_open_at_sigterm_all_finish_and_are_metered() {
    let test_started = Instant::now();
    let up = fake_upstream().await;
    let env = Env::new(&config_yaml(
        &up.url(),
        &format!("limits: {{ drain_timeout: {}s }}\n", DRAIN.as_secs()),
    ));
    for i in 0..TENANTS {
        env.add_key(
            &tenant(i),
            "openai",
            &format!("sk-drain-{i}-0123456789abcdefghij"),
        )
        .await;
    }
    let served = crate::common::bin::serve_env(&env, "serve", &[("BYOKD_LOG", "info")]).await;
    let authority = served.data.trim_start_matches("http://").to_string();
    let first = Arc::new(FirstBytes::default());

    // 100 HTTP/1.1 streams, one connection each (hyper's pool opens one per request in flight).
    let h1 = client();
    let mut h1_tasks = Vec::new();
    for i in 0..H1_STREAMS {
        let (c, first, req) = (
            h1.clone(),
            first.clone(),
            chat_request(&authority, &tenant(i)),
        );
        h1_tasks.push(tokio::spawn(async move {
            let resp = c.request(req).await.map_err(|e| e.to_string())?;
            read_stream(resp, &first).await
        }));
    }

    // 99 HTTP/2 streams over three h2c connections; each connection's `conn` future is kept to
    // see how it ends.
    let mut h2_conns = Vec::new();
    let mut h2_senders = Vec::new();
    let mut h2_tasks: Vec<Vec<_>> = Vec::new();
    for k in 0..H2_CONNS {
        let tcp = TcpStream::connect(&authority).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        h2_conns.push(tokio::spawn(conn));
        let mut tasks = Vec::new();
        for j in 0..H2_STREAMS_PER_CONN {
            let mut s = sender.clone();
            let (first, req) = (
                first.clone(),
                chat_request(
                    &authority,
                    &tenant(H1_STREAMS + k * H2_STREAMS_PER_CONN + j),
                ),
            );
            tasks.push(tokio::spawn(async move {
                s.ready().await.map_err(|e| e.to_string())?;
                let resp = s.send_request(req).await.map_err(|e| e.to_string())?;
                read_stream(resp, &first).await
            }));
        }
        h2_senders.push(sender);
        h2_tasks.push(tasks);
    }

    // One more HTTP/2 stream, read frame by frame.
    let raw = RawH2::open(&authority, &tenant(0)).await;
    let raw_task = {
        let first = first.clone();
        tokio::spawn(async move { raw.run(&first).await })
    };

    first.wait_for(STREAMS, Duration::from_secs(10)).await;
    let opened_in = test_started.elapsed();
    assert_eq!(
        *up.state.completed.lock().unwrap(),
        0,
        "a stream ended before SIGTERM: make the streams longer"
    );

    // SIGTERM with every stream open.
    let term_at = Instant::now();
    sigterm(&served.child);

    // New TCP connections are refused within a second, while the streams still run.
    let refused_after = loop {
        match TcpStream::connect(&authority).await {
            // A SYN that reached the backlog as the listener closed is reset, not refused:
            // either way the connection is not served.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break term_at.elapsed();
            }
            Err(e) => panic!("connect failed with {e}, not a refusal"),
            Ok(_) => {
                assert!(
                    term_at.elapsed() < Duration::from_secs(1),
                    "still accepting connections 1 s after SIGTERM"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Every HTTP/2 connection got GOAWAY: once it arrived, hyper's client ends its `conn`
    // future (cleanly: a NO_ERROR GOAWAY) and refuses new streams on it, while the streams
    // already open keep going. A probe sent before the GOAWAY arrived is served like any
    // request in flight (it is not metered), so probe until one is refused.
    let mut h2_conns = h2_conns.into_iter();
    for (k, sender) in h2_senders.iter_mut().enumerate() {
        let t = Instant::now();
        let err = loop {
            let probe = http::Request::get(format!("http://{authority}/byokd/usage"))
                .header("x-tenant-id", tenant(0))
                .body(Full::new(Bytes::new()))
                .unwrap();
            match tokio::time::timeout(Duration::from_secs(2), sender.send_request(probe)).await {
                Ok(Err(e)) => break e,
                Ok(Ok(_)) | Err(_) => {
                    assert!(
                        t.elapsed() < Duration::from_secs(2),
                        "HTTP/2 connection {k} still takes new streams 2 s after SIGTERM"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let conn = h2_conns.next().unwrap();
        tokio::time::timeout(Duration::from_secs(2), conn)
            .await
            .unwrap_or_else(|_| panic!("connection {k} refused a stream ({err}) but goes on"))
            .unwrap()
            .unwrap_or_else(|e| panic!("HTTP/2 connection {k} ended with an error: {e}"));
        assert!(
            h2_tasks[k].iter().all(|t| !t.is_finished()),
            "connection {k}: streams ended before the GOAWAY was seen"
        );
    }

    // The admin listener keeps serving during the drain: not ready, metrics still there.
    let admin: std::net::SocketAddr = served.admin.parse().unwrap();
    let readyz = tokio::time::timeout(
        Duration::from_secs(2),
        client().request(request("GET", &format!("http://{admin}/readyz"), &[], "")),
    )
    .await
    .expect("/readyz timed out during the drain")
    .expect("the admin listener stopped before the drain ended");
    assert_eq!(readyz.status(), 503);
    let scrape = tokio::time::timeout(Duration::from_secs(2), metrics(admin))
        .await
        .expect("/metrics timed out during the drain");
    assert!(scrape.contains("# TYPE byokd_"), "{scrape}");
    let drain_checks_done = term_at.elapsed();

    // Every stream finishes through `data: [DONE]`.
    let limit = DRAIN + Duration::from_secs(2);
    let mut h1_ok = 0;
    for (i, t) in h1_tasks.into_iter().enumerate() {
        let body = tokio::time::timeout(limit, t)
            .await
            .unwrap_or_else(|_| panic!("HTTP/1.1 stream {i} still open after {limit:?}"))
            .unwrap()
            .unwrap_or_else(|e| panic!("HTTP/1.1 stream {i}: {e}"));
        check_body(&format!("HTTP/1.1 stream {i}"), &body);
        h1_ok += 1;
    }
    let mut h2_ok = 0;
    for (k, tasks) in h2_tasks.into_iter().enumerate() {
        for (j, t) in tasks.into_iter().enumerate() {
            let body = tokio::time::timeout(limit, t)
                .await
                .unwrap_or_else(|_| panic!("HTTP/2 stream {k}/{j} still open after {limit:?}"))
                .unwrap()
                .unwrap_or_else(|e| panic!("HTTP/2 stream {k}/{j}: {e}"));
            check_body(&format!("HTTP/2 stream {k}/{j}"), &body);
            h2_ok += 1;
        }
    }
    let streams_done = term_at.elapsed();

    // The frame-level connection saw GOAWAY (NO_ERROR) while its stream ran, then the rest of
    // the stream, then the close.
    let raw = tokio::time::timeout(limit, raw_task)
        .await
        .expect("the raw HTTP/2 connection was never closed")
        .unwrap();
    assert!(
        !raw.goaways.is_empty(),
        "no GOAWAY frame on the HTTP/2 connection"
    );
    assert!(
        raw.goaways.iter().all(|&(_, code)| code == 0),
        "GOAWAY with an error code: {:?}",
        raw.goaways
    );
    assert!(
        raw.goaways.last().is_some_and(|&(last, _)| last >= 1),
        "the final GOAWAY must keep stream 1: {:?}",
        raw.goaways
    );
    assert!(raw.ended && raw.closed);
    assert!(
        !raw.after_goaway.is_empty(),
        "nothing of the stream arrived after the GOAWAY"
    );
    let mut raw_body = raw.before_goaway.clone();
    raw_body.extend_from_slice(&raw.after_goaway);
    check_body(
        "frame-level HTTP/2 stream",
        &String::from_utf8(raw_body).unwrap(),
    );

    // The process exits 0 within the drain timeout.
    let mut served = served;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < limit,
            "byokd still running {:?} after SIGTERM: {}",
            term_at.elapsed(),
            served.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = term_at.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        served.logs()
    );
    assert!(
        exited_after < DRAIN,
        "exit {exited_after:?} after SIGTERM, drain_timeout {DRAIN:?}"
    );
    let logs = served.logs();
    assert!(
        !logs.contains("drain timeout reached"),
        "the drain hit its timeout: {logs}"
    );

    // Nothing was cut upstream either.
    assert_eq!(*up.state.completed.lock().unwrap(), STREAMS as u32);
    assert_eq!(*up.state.cancelled.lock().unwrap(), 0);

    // Every stream is in the usage ledger written at shutdown: requests and the tokens of the
    // fake's usage chunk (prompt 120 of which 100 cached, completion 30 of which 10 reasoning).
    let ledger: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.dir.path().join(".byokd/usage.json")).expect("no usage ledger"),
    )
    .unwrap();
    let mut metered = 0u64;
    for i in 0..TENANTS {
        let t = tenant(i);
        let models = ledger["tenants"][&t]["providers"]["openai"]
            .as_object()
            .unwrap_or_else(|| panic!("{t} missing from the ledger: {ledger}"));
        let sum = |field: &str| {
            models
                .values()
                .map(|m| m[field].as_u64().unwrap())
                .sum::<u64>()
        };
        let want = (0..STREAMS - 1).filter(|s| s % TENANTS == i).count() as u64 + u64::from(i == 0); // the frame-level stream
        assert_eq!(sum("requests"), want, "{t}: {ledger}");
        assert_eq!(sum("input"), 20 * want, "{t}");
        assert_eq!(sum("cached_input"), 100 * want, "{t}");
        assert_eq!(sum("output"), 20 * want, "{t}");
        assert_eq!(sum("reasoning"), 10 * want, "{t}");
        metered += sum("requests");
    }
    assert_eq!(metered, STREAMS as u64);
    assert_eq!(h1_ok + h2_ok + 1, STREAMS);
    eprintln!(
        "drain: {STREAMS} streams open after {opened_in:?}; after SIGTERM: new connections \
         refused at {refused_after:?}, GOAWAY and admin checks done at {drain_checks_done:?}, \
         streams done at {streams_done:?}, exit 0 at {exited_after:?}; test {:?}",
        test_started.elapsed()
    );
}
