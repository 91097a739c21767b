//! The usage scanner against recorded-format provider bodies (`tests/fixtures/`): any split
//! into frames gives exactly the provider-reported usage; hostile input never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use byokd::usage::{Dialect, Scanner, Usage, UsageScanner, scanner_for};
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

#[test]
fn hostile_bodies_are_survived() {
    // A 100 MB SSE line, then a real stream: the line is skipped, the usage still found.
    let mut s = scanner_for(Dialect::OpenAi, Some(b"text/event-stream"));
    s.feed(b"data: {\"x\":\"");
    let block = vec![b'a'; 1 << 20];
    for _ in 0..100 {
        s.feed(&block);
    }
    s.feed(b"\"}\n\n");
    s.feed(&fixture("openai_chat_stream.sse"));
    check(&CASES[0], &s.finish());

    // JSON nested a million levels deep, with a "usage" key inside: no stack overflow.
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
            let mut s = scanner_for(d, Some(ct));
            for c in deep.chunks(64 * 1024) {
                s.feed(c);
            }
            let sse_line: Vec<u8> = [b"data: ".as_slice(), &deep[..200_000], b"\n"].concat();
            s.feed(&sse_line);
            let u = s.finish();
            assert!(!u.found || u.total() == 0);
        }
    }

    // Invalid UTF-8 around a valid usage event.
    let mut s = scanner_for(Dialect::Anthropic, Some(b"text/event-stream"));
    s.feed(b"data: \xff\xfe\xfd\n\n");
    s.feed(&fixture("anthropic_messages_stream.sse"));
    s.feed(b"\xc3\x28\n");
    check(&CASES[5], &s.finish());
}
