//! The response body byokd hands back, per response: a chat completion as one JSON frame, and
//! a 200-event chat stream (one event a frame) with the usage strip on, each polled to its end
//! and recorded (scanner, recorder, metrics) as the data listener does; and the access-log
//! line, through `tracing`'s formatter and written directly.
//!
//! Run: `cargo bench --bench response_body`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body::{Body, Frame};

use byokd::keys::KeySource;
use byokd::meter::ResponseBody;
use byokd::metrics::{LabelCaps, Metrics};
use byokd::record::Recorder;
use byokd::stream_usage::StripUsage;
use byokd::timeouts::{IdleTimeout, Side};
use byokd::usage::{Capability, scanner_for_capability};
use byokd::vocab::RequestId;

/// A body whose frames are all ready: what the bench measures is byokd's work on them.
struct Frames(VecDeque<Bytes>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

fn recorder(metrics: &Arc<Metrics>) -> Recorder {
    Recorder {
        metrics: metrics.clone(),
        tenant: Arc::from("tenant-1"),
        end_user: None,
        provider: Arc::from("openai"),
        provider_idx: 0,
        status: http::StatusCode::OK,
        started: Instant::now(),
        request_id: RequestId::new(),
        key_source: KeySource::Tenant,
        price: None,
        capability: Capability::Tokens,
        request_model: Arc::new(OnceLock::new()),
        characters: 0,
        compressed: false,
        admission: None,
        cut: None,
        header_usage: None,
    }
}

/// One response through the body, polled to its end; returns the bytes sent.
fn run(metrics: &Arc<Metrics>, frames: &[Bytes], content_type: &[u8], strip: bool) -> usize {
    let dialect = byokd::provider::kind("openai").and_then(|k| k.usage());
    let scanner = scanner_for_capability(dialect, Capability::Tokens, Some(content_type));
    let source = IdleTimeout::new(
        Frames(frames.iter().cloned().collect()),
        Duration::from_secs(30),
        Side::Upstream,
    );
    let mut body = ResponseBody::new(
        source,
        None,
        None,
        scanner,
        recorder(metrics),
        strip.then(StripUsage::new),
    );
    let mut cx = Context::from_waker(Waker::noop());
    let mut sent = 0;
    while let Poll::Ready(Some(Ok(f))) = Pin::new(&mut body).poll_frame(&mut cx) {
        sent += f.data_ref().map_or(0, |d| d.len());
    }
    sent
}

fn stream_frames() -> Vec<Bytes> {
    let mut v: Vec<Bytes> = (0..200)
        .map(|i| {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok{i} \"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
            ))
        })
        .collect();
    v.push(Bytes::from_static(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":200,\"total_tokens\":211}}\n\n"));
    v.push(Bytes::from_static(b"data: [DONE]\n\n"));
    v
}

fn bench(c: &mut Criterion) {
    let metrics = Arc::new(
        Metrics::new(
            LabelCaps::default(),
            &["openai"],
            Default::default(),
            byokd::ledger::Ledger::in_memory(),
        )
        .unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let json = vec![Bytes::from_static(
        br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#,
    )];
    let stream = stream_frames();
    c.bench_function("response_body/json_one_frame", |b| {
        b.iter(|| black_box(run(&metrics, &json, b"application/json", false)))
    });
    c.bench_function("response_body/sse_202_frames_strip", |b| {
        b.iter(|| black_box(run(&metrics, &stream, b"text/event-stream", true)))
    });
}

/// The access-log line: through `tracing`'s JSON formatter (what every line cost before),
/// and formatted straight into a reused buffer (what `serve` does now). Both write nowhere.
fn access_line(c: &mut Criterion) {
    use byokd::access_log::{Line, format_line, via_tracing};
    let line = Line {
        request_id: RequestId::new(),
        tenant: "tenant-1",
        end_user: None,
        provider: "openai",
        status: 200,
        model: "gpt-4o-mini-2024-07-18",
        input_tokens: 11,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: 7,
        reasoning_tokens: 0,
        usage_found: true,
        key_source: "tenant",
        cost_usd: Some(0.000_005_85),
        bytes: 211,
        outcome: "complete",
        duration_ms: 1.234,
    };
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_target(true)
        .with_writer(std::io::sink)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        c.bench_function("access_log/tracing_json_formatter", |b| {
            b.iter(|| via_tracing(black_box(&line)))
        });
    });
    let mut buf = Vec::with_capacity(32 * 1024);
    c.bench_function("access_log/direct_into_reused_buffer", |b| {
        b.iter(|| {
            if buf.len() > 16 * 1024 {
                buf.clear();
            }
            format_line(&mut buf, black_box(&line), time::OffsetDateTime::now_utc());
        })
    });
}

criterion_group!(benches, bench, access_line);
criterion_main!(benches);
