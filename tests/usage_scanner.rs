//! The usage scanner against recorded-format provider bodies (`tests/fixtures/`): any split
//! into frames gives exactly the provider-reported usage; hostile input never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use byokd::usage::{
    Capability, Dialect, MAX_BUFFERED, Scanner, Usage, UsageScanner, scanner_for,
    scanner_for_capability,
};
use proptest::prelude::*;

struct Case {
    file: &'static str,
    dialect: Dialect,
    content_type: &'static str,
    /// input, cached_input, cache_write, output, reasoning
    tokens: (u64, u64, u64, u64, u64),
    model: &'static str,
}

const CASES: &[Case] = &[
    Case {
        file: "openai_chat_stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream; charset=utf-8",
        tokens: (93, 1024, 0, 14, 32),
        model: "o4-mini-2025-04-16",
    },
    Case {
        file: "openai_chat.json",
        dialect: Dialect::OpenAi,
        content_type: "application/json",
        tokens: (19, 0, 0, 10, 0),
        model: "gpt-4o-2024-08-06",
    },
    Case {
        file: "openai_responses.json",
        dialect: Dialect::OpenAi,
        content_type: "application/json",
        tokens: (72, 256, 0, 52, 128),
        model: "o3-2025-04-16",
    },
    Case {
        file: "openai_responses_stream.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream",
        tokens: (72, 256, 0, 52, 128),
        model: "o3-2025-04-16",
    },
    Case {
        file: "openai_embeddings.json",
        dialect: Dialect::OpenAi,
        content_type: "application/json",
        tokens: (8, 0, 0, 0, 0),
        model: "text-embedding-3-small",
    },
    Case {
        file: "anthropic_messages_stream.sse",
        dialect: Dialect::Anthropic,
        content_type: "text/event-stream",
        tokens: (12, 4096, 2048, 89, 0),
        model: "claude-sonnet-4-5-20250929",
    },
    Case {
        file: "anthropic_messages.json",
        dialect: Dialect::Anthropic,
        content_type: "application/json",
        tokens: (21, 1500, 0, 7, 0),
        model: "claude-3-5-haiku-20241022",
    },
    Case {
        file: "gemini_stream.sse",
        dialect: Dialect::Gemini,
        content_type: "text/event-stream",
        tokens: (128, 512, 0, 17, 120),
        model: "gemini-2.5-pro",
    },
    Case {
        file: "gemini.json",
        dialect: Dialect::Gemini,
        content_type: "application/json; charset=UTF-8",
        tokens: (8, 0, 0, 2, 25),
        model: "gemini-2.5-flash",
    },
    Case {
        file: "openai_chat_stream_obfuscation.sse",
        dialect: Dialect::OpenAi,
        content_type: "text/event-stream; charset=utf-8",
        tokens: (19, 0, 0, 10, 0),
        model: "gpt-4o-mini-2024-07-18",
    },
    Case {
        file: "ollama_chat.ndjson",
        dialect: Dialect::OpenAi,
        content_type: "application/x-ndjson",
        tokens: (26, 0, 0, 282, 0),
        model: "llama3.2",
    },
];

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn scan(case: &Case, body: &[u8], cuts: &[usize]) -> Usage {
    let mut s: Scanner = scanner_for(case.dialect, Some(case.content_type.as_bytes()));
    let mut at = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    for c in cuts {
        s.feed(&body[at..c]);
        at = c;
    }
    s.feed(&body[at..]);
    s.finish()
}

fn check(case: &Case, u: &Usage) {
    assert!(u.found, "{}: no usage found", case.file);
    assert_eq!(
        (
            u.input,
            u.cached_input,
            u.cache_write,
            u.output,
            u.reasoning
        ),
        case.tokens,
        "{}",
        case.file
    );
    assert_eq!(u.model.as_deref(), Some(case.model), "{}", case.file);
}

#[test]
fn every_fixture_whole_and_byte_by_byte() {
    for case in CASES {
        let body = fixture(case.file);
        check(case, &scan(case, &body, &[]));
        let every_byte: Vec<usize> = (0..body.len()).collect();
        check(case, &scan(case, &body, &every_byte));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_split_gives_the_reported_usage(idx in 0..CASES.len(), cuts in prop::collection::vec(any::<usize>(), 0..40)) {
        let case = &CASES[idx];
        check(case, &scan(case, &fixture(case.file), &cuts));
    }

    #[test]
    fn arbitrary_bytes_never_panic(dialect in 0..3u8, ct in 0..3u8, body in prop::collection::vec(any::<u8>(), 0..4096), cuts in prop::collection::vec(any::<usize>(), 0..20)) {
        let d = [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini][dialect as usize];
        let ct = ["text/event-stream", "application/json", "application/x-ndjson"][ct as usize];
        let case = Case { file: "", dialect: d, content_type: ct, tokens: (0, 0, 0, 0, 0), model: "" };
        let _ = scan(&case, &body, &cuts);
    }
}

/// Feeds `chunk` and asserts the scanner still holds no more than its bound.
fn feed_bounded(s: &mut Scanner, chunk: &[u8]) {
    s.feed(chunk);
    assert!(
        s.buffered() <= MAX_BUFFERED,
        "holds {} bytes, bound {MAX_BUFFERED}",
        s.buffered()
    );
}

#[test]
fn hostile_bodies_are_survived_within_the_bound() {
    // A 100 MB SSE line, then a real stream: the line is not held, the usage still found.
    for (ct, prefix) in [
        (&b"text/event-stream"[..], &b"data: {\"x\":\""[..]),
        (
            b"text/event-stream",
            b"event: response.completed\ndata: {\"x\":\"",
        ),
        (b"application/x-ndjson", b"{\"x\":\""),
    ] {
        let mut s = scanner_for(Dialect::OpenAi, Some(ct));
        feed_bounded(&mut s, prefix);
        let block = vec![b'a'; 1 << 20];
        for _ in 0..100 {
            feed_bounded(&mut s, &block);
        }
        feed_bounded(&mut s, b"\"}\n\n");
        if ct == b"text/event-stream" {
            feed_bounded(&mut s, &fixture("openai_chat_stream.sse"));
            check(&CASES[0], &s.finish());
        }
    }
    // The same 100 MB as one frame, and as a JSON body.
    let huge = vec![b'b'; 100 << 20];
    for ct in [&b"text/event-stream"[..], b"application/json"] {
        for d in [Dialect::OpenAi, Dialect::Gemini, Dialect::Anthropic] {
            let mut s = scanner_for(d, Some(ct));
            feed_bounded(&mut s, b"data: ");
            feed_bounded(&mut s, &huge);
            let _ = s.finish();
        }
    }
    drop(huge);

    // JSON nested a million levels deep, with a "usage" key inside: no stack overflow, and
    // nothing held past the bound.
    let mut deep = Vec::with_capacity(3_000_100);
    deep.extend(std::iter::repeat_n(b'[', 1_000_000));
    deep.extend_from_slice(b"{\"usage\":");
    deep.extend(std::iter::repeat_n(b'[', 1_000_000));
    deep.extend(std::iter::repeat_n(b']', 1_000_000));
    for d in [Dialect::OpenAi, Dialect::Anthropic, Dialect::Gemini] {
        for ct in [
            &b"application/json"[..],
            b"text/event-stream",
            b"application/x-ndjson",
        ] {
            for cap in [
                Capability::Tokens,
                Capability::Images,
                Capability::Transcription,
            ] {
                let mut s = scanner_for_capability(d, cap, Some(ct));
                for c in deep.chunks(64 * 1024) {
                    feed_bounded(&mut s, c);
                }
                let sse_line: Vec<u8> = [b"data: ".as_slice(), &deep[..200_000], b"\n"].concat();
                feed_bounded(&mut s, &sse_line);
                let u = s.finish();
                assert!(!u.found || u.total() == 0);
            }
        }
    }

    // Invalid UTF-8 around a valid usage event.
    let mut s = scanner_for(Dialect::Anthropic, Some(b"text/event-stream"));
    feed_bounded(&mut s, b"data: \xff\xfe\xfd\n\n");
    feed_bounded(&mut s, &fixture("anthropic_messages_stream.sse"));
    feed_bounded(&mut s, b"\xc3\x28\n");
    check(&CASES[5], &s.finish());
    let mut s = scanner_for(Dialect::OpenAi, Some(b"text/event-stream"));
    let junk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 131 % 256) as u8).collect();
    feed_bounded(&mut s, &junk);
    feed_bounded(&mut s, b"\n\n");
    feed_bounded(&mut s, &fixture("openai_chat_stream.sse"));
    check(&CASES[0], &s.finish());
}

/// A Responses API stream whose `response.completed` event is `size` bytes long (the whole
/// output repeated in it, as OpenAI sends it); `lead` bytes of instructions come before
/// `model` in the response object.
fn long_responses_stream(size: usize, lead: usize) -> Vec<u8> {
    let text = "x".repeat(size);
    let instructions = "i".repeat(lead);
    let mut v = Vec::new();
    v.extend_from_slice(b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"usage\":null}}\n\n");
    v.extend_from_slice(b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"");
    v.extend_from_slice(text.as_bytes());
    v.extend_from_slice(b"\"}\n\n");
    v.extend_from_slice(format!("event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"instructions\":\"{instructions}\",\"model\":\"o3-2025-04-16\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text} \\\"usage\\\":{{\\\"input_tokens\\\":1}}\"}}]}}],\"usage\":{{\"input_tokens\":328,\"input_tokens_details\":{{\"cached_tokens\":256}},\"output_tokens\":180,\"output_tokens_details\":{{\"reasoning_tokens\":128}},\"total_tokens\":508}},\"user\":null,\"metadata\":{{\"k\":\"v\"}}}}}}\n\n").as_bytes());
    v
}

fn scan_responses(body: &[u8], cuts: &[usize]) -> Usage {
    let mut s = scanner_for(Dialect::OpenAi, Some(b"text/event-stream"));
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    for c in cuts {
        feed_bounded(&mut s, &body[at..c]);
        at = c;
    }
    feed_bounded(&mut s, &body[at..]);
    s.finish()
}

#[test]
fn responses_completed_past_the_line_limit_is_still_metered() {
    let body = long_responses_stream(1 << 20, 100);
    assert!(body.len() > 2 << 20);
    let u = scan_responses(&body, &[]);
    assert!(u.found);
    assert_eq!(
        (u.input, u.cached_input, u.output, u.reasoning),
        (72, 256, 52, 128)
    );
    assert_eq!(u.model.as_deref(), Some("o3-2025-04-16"));
    // `model` past the 4 KiB head is not looked for: the request's model labels it instead.
    let u = scan_responses(&long_responses_stream(1 << 20, 8192), &[1000, 2_000_000]);
    assert_eq!((u.input, u.output), (72, 52));
    assert_eq!(u.model, None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn long_responses_event_any_split(cuts in prop::collection::vec(any::<usize>(), 0..200)) {
        let body = long_responses_stream(1 << 20, 10);
        let u = scan_responses(&body, &cuts);
        prop_assert_eq!((u.input, u.cached_input, u.output, u.reasoning), (72, 256, 52, 128));
        prop_assert_eq!(u.model.as_deref(), Some("o3-2025-04-16"));
    }
}
