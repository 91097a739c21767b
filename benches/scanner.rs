//! Usage-scanner throughput on a large SSE stream and a large JSON body, fed in 16 KiB frames
//! as hyper delivers them. Target: at least 1 GiB/s on SSE chunk traffic.
//!
//! Run: `cargo bench --bench scanner`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use byokd::usage::{Capability, DialectRef, UsageScanner, scanner_for_capability};

fn dialect(kind: &str) -> DialectRef {
    byokd::provider::kind(kind).and_then(|k| k.usage())
}
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

/// The 2025 shape: `service_tier`, and `obfuscation` padding after `"usage":null`.
fn openai_sse_obfuscated(events: usize) -> Vec<u8> {
    let mut out = String::new();
    for i in 0..events {
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token{i} \"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"{}\"}}\n\n",
            &"Zq3xY7pKw0"[..(i % 10) + 1]
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-B9\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":20,\"total_tokens\":30},\"obfuscation\":\"x\"}\n\ndata: [DONE]\n\n");
    out.into_bytes()
}

/// An image generation answer: base64 images in `data`, counted as the body passes.
fn images_json(bytes: usize) -> Vec<u8> {
    let b64 = "iVBORw0KGgoAAAANSUhEUgAA".repeat(bytes / 4 / 24);
    format!("{{\"created\":1,\"data\":[{{\"b64_json\":\"{b64}\"}},{{\"b64_json\":\"{b64}\"}},{{\"b64_json\":\"{b64}\"}},{{\"b64_json\":\"{b64}\"}}],\"usage\":{{\"input_tokens\":10,\"output_tokens\":4160}}}}").into_bytes()
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
            dialect("openai"),
            &b"text/event-stream"[..],
            Capability::Tokens,
            openai_sse(20_000),
        ),
        (
            "sse/openai_chat_obfuscation_20k_events",
            dialect("openai"),
            b"text/event-stream",
            Capability::Tokens,
            openai_sse_obfuscated(20_000),
        ),
        (
            "sse/anthropic_20k_events",
            dialect("anthropic"),
            b"text/event-stream",
            Capability::Tokens,
            anthropic_sse(20_000),
        ),
        (
            "json/openai_8MiB",
            dialect("openai"),
            b"application/json",
            Capability::Tokens,
            big_json(8 << 20),
        ),
        (
            "json/images_b64_8MiB",
            dialect("openai"),
            b"application/json",
            Capability::Images,
            images_json(8 << 20),
        ),
    ];
    let mut g = c.benchmark_group("scanner");
    for (name, dialect, ct, cap, body) in &cases {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut s = scanner_for_capability(*dialect, *cap, Some(ct));
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
