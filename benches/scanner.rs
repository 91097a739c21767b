//! Usage-scanner throughput on a large SSE stream and a large JSON body, fed in 16 KiB frames
//! as hyper delivers them. Target: at least 1 GiB/s on SSE chunk traffic.
//!
//! Run: `cargo bench --bench scanner`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use byokd::usage::{Dialect, UsageScanner, scanner_for};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn openai_sse(events: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..events {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30}}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

fn anthropic_sse(events: usize) -> Vec<u8> {
    let mut out = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
    );
    for i in 0..events {
        out.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"token{i} \"}}}}\n\n"
        ));
    }
    out.push_str("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":99}}\n\n");
    out.into_bytes()
}

fn big_json(bytes: usize) -> Vec<u8> {
    let text = "lorem ipsum ".repeat(bytes / 12);
    format!("{{\"id\":\"x\",\"object\":\"chat.completion\",\"model\":\"gpt-4o\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\"}}}}],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2}}}}").into_bytes()
}

fn bench(c: &mut Criterion) {
    let cases = [
        (
            "sse/openai_chat_20k_events",
            Dialect::OpenAi,
            &b"text/event-stream"[..],
            openai_sse(20_000),
        ),
        (
            "sse/anthropic_20k_events",
            Dialect::Anthropic,
            b"text/event-stream",
            anthropic_sse(20_000),
        ),
        (
            "json/openai_8MiB",
            Dialect::OpenAi,
            b"application/json",
            big_json(8 << 20),
        ),
    ];
    let mut g = c.benchmark_group("scanner");
    for (name, dialect, ct, body) in &cases {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut s = scanner_for(*dialect, Some(ct));
                for frame in body.chunks(16 * 1024) {
                    s.feed(black_box(frame));
                }
                let u = s.finish();
                assert!(u.found);
                u
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
