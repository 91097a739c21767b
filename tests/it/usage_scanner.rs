//! The usage scanner against recorded-format provider bodies (`tests/fixtures/`): any split
//! into frames, and any layout of the JSON (compact, spaced as Python servers send it,
//! pretty-printed over multi-line SSE `data:`, keys reordered, CRLF), gives exactly the
//! provider-reported usage; the usage stripper removes exactly what `include_usage` added;
//! hostile input never panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use byokd::stream_usage::StripUsage;
use byokd::usage::{
    Capability, Dialect, MAX_BUFFERED, Scanner, Usage, UsageScanner, scanner_for,
    scanner_for_capability,
};
use common::{JsonStyle, restyle_json, restyle_stream};
use proptest::prelude::*;

/// The usage dialect of a provider kind.
fn dialect(kind: &str) -> &'static dyn Dialect {
    byokd::provider::kind(kind).and_then(|k| k.usage()).unwrap()
}

struct Case {
    file: &'static str,
    /// The provider kind whose dialect reads the fixture.
    kind: &'static str,
    content_type: &'static str,
    /// input, cached_input, cache_write, output, reasoning
    tokens: (u64, u64, u64, u64, u64),
    model: &'static str,
}

const CASES: &[Case] = &[
    Case {
        file: "openai_chat_stream.sse",
        kind: "openai",
        content_type: "text/event-stream; charset=utf-8",
        tokens: (93, 1024, 0, 14, 32),
        model: "o4-mini-2025-04-16",
    },
    Case {
        file: "openai_chat.json",
        kind: "openai",
        content_type: "application/json",
        tokens: (19, 0, 0, 10, 0),
        model: "gpt-4o-2024-08-06",
    },
    Case {
        file: "openai_responses.json",
        kind: "openai",
        content_type: "application/json",
        tokens: (72, 256, 0, 52, 128),
        model: "o3-2025-04-16",
    },
    Case {
        file: "openai_responses_stream.sse",
        kind: "openai",
        content_type: "text/event-stream",
        tokens: (72, 256, 0, 52, 128),
        model: "o3-2025-04-16",
    },
    Case {
        file: "openai_embeddings.json",
        kind: "openai",
        content_type: "application/json",
        tokens: (8, 0, 0, 0, 0),
        model: "text-embedding-3-small",
    },
    Case {
        file: "anthropic_messages_stream.sse",
        kind: "anthropic",
        content_type: "text/event-stream",
        tokens: (12, 4096, 2048, 89, 0),
        model: "claude-sonnet-4-5-20250929",
    },
    Case {
        file: "anthropic_messages.json",
        kind: "anthropic",
        content_type: "application/json",
        tokens: (21, 1500, 0, 7, 0),
        model: "claude-3-5-haiku-20241022",
    },
    Case {
        file: "gemini_stream.sse",
        kind: "gemini",
        content_type: "text/event-stream",
        tokens: (128, 512, 0, 17, 120),
        model: "gemini-2.5-pro",
    },
    Case {
        file: "gemini.json",
        kind: "gemini",
        content_type: "application/json; charset=UTF-8",
        tokens: (8, 0, 0, 2, 25),
        model: "gemini-2.5-flash",
    },
    Case {
        file: "openai_chat_stream_obfuscation.sse",
        kind: "openai",
        content_type: "text/event-stream; charset=utf-8",
        tokens: (19, 0, 0, 10, 0),
        model: "gpt-4o-mini-2024-07-18",
    },
    // xAI counts reasoning beside completion_tokens (total = 14 + 10 + 286), not inside it.
    Case {
        file: "xai_chat.json",
        kind: "openai",
        content_type: "application/json",
        tokens: (8, 6, 0, 10, 286),
        model: "grok-3-mini",
    },
    Case {
        file: "cerebras_chat.json",
        kind: "openai",
        content_type: "application/json",
        tokens: (41, 0, 0, 13, 0),
        model: "llama-3.3-70b",
    },
    // Perplexity repeats the running usage in every chunk (CRLF-framed): the last one counts.
    Case {
        file: "perplexity_chat_stream.sse",
        kind: "openai",
        content_type: "text/event-stream",
        tokens: (7, 0, 0, 52, 0),
        model: "sonar",
    },
    Case {
        file: "fireworks_chat_stream.sse",
        kind: "openai",
        content_type: "text/event-stream",
        tokens: (19, 0, 0, 31, 0),
        model: "accounts/fireworks/models/llama-v3p1-8b-instruct",
    },
    // Azure AI inference: the OpenAI dialect with content-filter fields around it, and a
    // first stream chunk with no model and no choices.
    Case {
        file: "azure_ai_chat.json",
        kind: "azure_ai",
        content_type: "application/json",
        tokens: (9, 0, 0, 23, 0),
        model: "DeepSeek-R1",
    },
    Case {
        file: "azure_ai_chat_stream.sse",
        kind: "azure_ai",
        content_type: "text/event-stream",
        tokens: (11, 0, 0, 2, 0),
        model: "Phi-4",
    },
    // Bedrock Converse: camelCase usage with cache reads apart (and their older `...Count`
    // twins, ignored); the answer names no model (the path does).
    Case {
        file: "bedrock_converse.json",
        kind: "bedrock",
        content_type: "application/json",
        tokens: (14, 1024, 0, 19, 0),
        model: "",
    },
    // Cohere v2 bills `billed_units` (not the larger `tokens`, which include its system
    // prompt) and names no model in the answer.
    Case {
        file: "cohere_chat.json",
        kind: "cohere",
        content_type: "application/json",
        tokens: (5, 0, 0, 418, 0),
        model: "",
    },
    Case {
        file: "cohere_chat_stream.sse",
        kind: "cohere",
        content_type: "text/event-stream",
        tokens: (3, 0, 0, 9, 0),
        model: "",
    },
    Case {
        file: "cohere_embed.json",
        kind: "cohere",
        content_type: "application/json",
        tokens: (1, 0, 0, 0, 0),
        model: "",
    },
    Case {
        file: "ollama_chat.ndjson",
        kind: "openai",
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

/// `body` cut at `cuts` (taken modulo its length): the frames as hyper might deliver them.
fn frames<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    let mut out = Vec::with_capacity(cuts.len() + 1);
    for c in cuts {
        out.push(&body[at..c]);
        at = c;
    }
    out.push(&body[at..]);
    out
}

fn scan(case: &Case, body: &[u8], cuts: &[usize]) -> Usage {
    let mut s: Scanner = scanner_for(Some(dialect(case.kind)), Some(case.content_type.as_bytes()));
    for f in frames(body, cuts) {
        s.feed(f);
    }
    s.finish()
}

/// A fixture laid out in `style`, with CRLF line ends if `crlf` (in JSON whitespace too; a
/// fixture recorded with CRLF, as Gemini sends it, keeps them either way).
fn styled(file: &str, content_type: &str, style: JsonStyle, crlf: bool) -> Vec<u8> {
    let body = fixture(file);
    let body = if content_type.contains("event-stream") {
        restyle_stream(&body, style, false)
    } else if content_type.contains("ndjson") {
        restyle_stream(&body, style, true)
    } else {
        restyle_json(&body, style)
    };
    if crlf {
        let mut out = Vec::with_capacity(body.len() * 2);
        for (i, &b) in body.iter().enumerate() {
            if b == b'\n' && (i == 0 || body[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(b);
        }
        out
    } else {
        body
    }
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
    assert_eq!(
        u.model.as_deref().unwrap_or(""),
        case.model,
        "{}",
        case.file
    );
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

/// The restyled fixtures really have the layout the tests claim, so a scanner that matches
/// compact byte patterns cannot pass them by luck.
#[test]
fn restyled_fixtures_have_the_layout_claimed() {
    let sse = "text/event-stream";
    let compact = styled(
        "openai_chat.json",
        "application/json",
        JsonStyle::Compact,
        false,
    );
    let compact = String::from_utf8(compact).unwrap();
    assert!(compact.contains(r#"{"id":"chatcmpl-B9","object":"chat.completion","#));
    assert!(compact.contains(r#""content":"The word \"usage\": appears here, and"#));
    let spaced = styled("openai_chat_stream.sse", sse, JsonStyle::Spaced, false);
    let spaced = String::from_utf8(spaced).unwrap();
    assert!(spaced.contains(r#""choices": [], "usage": {"prompt_tokens": 1117, "#));
    assert!(spaced.contains(r#"}], "usage": null}"#));
    let pretty = styled("openai_responses_stream.sse", sse, JsonStyle::Pretty, false);
    let pretty = String::from_utf8(pretty).unwrap();
    assert!(pretty.contains("event: response.completed\ndata: {\ndata:   \"type\": \"response.completed\",\ndata:   \"sequence_number\": 3,\n"));
    let sorted = styled(
        "openai_responses_stream.sse",
        sse,
        JsonStyle::SortedSpaced,
        false,
    );
    let sorted = String::from_utf8(sorted).unwrap();
    assert!(sorted.contains(r#""sequence_number": 3, "type": "response.completed"}"#));
    let nd = styled(
        "ollama_chat.ndjson",
        "application/x-ndjson",
        JsonStyle::Compact,
        true,
    );
    assert!(
        String::from_utf8(nd)
            .unwrap()
            .contains("\"done\":true,\"total_duration\"")
    );
}

#[test]
fn every_fixture_in_every_layout_whole_and_byte_by_byte() {
    for case in CASES {
        for style in JsonStyle::ALL {
            for crlf in [false, true] {
                let body = styled(case.file, case.content_type, style, crlf);
                let what = format!("{} {style:?} crlf={crlf}", case.file);
                let u = scan(case, &body, &[]);
                assert!(u.found, "{what}: no usage found");
                let every_byte: Vec<usize> = (0..body.len()).collect();
                for u in [u, scan(case, &body, &every_byte)] {
                    assert_eq!(
                        (
                            u.input,
                            u.cached_input,
                            u.cache_write,
                            u.output,
                            u.reasoning
                        ),
                        case.tokens,
                        "{what}"
                    );
                    assert_eq!(u.model.as_deref().unwrap_or(""), case.model, "{what}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_split_gives_the_reported_usage(idx in 0..CASES.len(), cuts in prop::collection::vec(any::<usize>(), 0..40)) {
        let case = &CASES[idx];
        check(case, &scan(case, &fixture(case.file), &cuts));
    }

    /// Every fixture in every layout (compact, spaced, pretty over multi-line `data:`, keys
    /// sorted; LF or CRLF), in any split: the same usage and model.
    #[test]
    fn any_layout_any_split_gives_the_reported_usage(idx in 0..CASES.len(), style in 0..JsonStyle::ALL.len(), crlf in any::<bool>(), cuts in prop::collection::vec(any::<usize>(), 0..40)) {
        let case = &CASES[idx];
        let body = styled(case.file, case.content_type, JsonStyle::ALL[style], crlf);
        let u = scan(case, &body, &cuts);
        prop_assert_eq!(
            (u.input, u.cached_input, u.cache_write, u.output, u.reasoning),
            case.tokens,
            "{} {:?} crlf={}", case.file, JsonStyle::ALL[style], crlf
        );
        prop_assert_eq!(u.model.as_deref().unwrap_or(""), case.model);
    }

    /// The usage stripper on a stream in any layout and split: the client gets exactly the
    /// stream the provider sends without `include_usage`, in the same layout.
    #[test]
    fn strip_removes_exactly_what_include_usage_added_in_any_layout(idx in 0..STRIP_CASES.len(), style in 0..JsonStyle::ALL.len(), crlf in any::<bool>(), cuts in prop::collection::vec(any::<usize>(), 0..40)) {
        check_strip(STRIP_CASES[idx], JsonStyle::ALL[style], crlf, &cuts);
    }

    /// The stripper on token soup (SSE fields, JSON punctuation, whitespace, `"usage"`,
    /// `null`) in any split never panics, and a stream without `"usage"` passes unchanged.
    #[test]
    fn strip_survives_token_soup(tokens in prop::collection::vec(0..14usize, 0..200), cuts in prop::collection::vec(any::<usize>(), 0..20)) {
        const T: [&[u8]; 14] = [b"data:", b" ", b"\n", b"\r", b"\"usage\"", b":", b"null", b",", b"{", b"}", b"\"choices\"", b"[]", b"\t", b"x"];
        let body: Vec<u8> = tokens.iter().flat_map(|&t| T[t].iter().copied()).collect();
        let out = strip(&body, &cuts);
        if memchr::memmem::find(&body, b"\"usage\"").is_none() {
            prop_assert_eq!(out, body);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(dialect in 0..3u8, ct in 0..3u8, body in prop::collection::vec(any::<u8>(), 0..4096), cuts in prop::collection::vec(any::<usize>(), 0..20)) {
        let d = ["openai", "anthropic", "gemini"][dialect as usize];
        let ct = ["text/event-stream", "application/json", "application/x-ndjson"][ct as usize];
        let case = Case { file: "", kind: d, content_type: ct, tokens: (0, 0, 0, 0, 0), model: "" };
        let _ = scan(&case, &body, &cuts);
    }
}

/// Streams with `include_usage` and the same streams without it.
const STRIP_CASES: [(&str, &str); 2] = [
    ("openai_chat_stream.sse", "openai_chat_stream_no_usage.sse"),
    (
        "openai_chat_stream_obfuscation.sse",
        "openai_chat_stream_obfuscation_no_usage.sse",
    ),
];

/// `body` through [`StripUsage`], in the frames given.
fn strip(body: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut s = StripUsage::new();
    let mut out = Vec::new();
    for f in frames(body, cuts) {
        out.extend_from_slice(&s.transform(f));
    }
    out.extend_from_slice(&s.finish());
    out
}

/// The JSON of each event of an SSE body, its `data:` lines joined as SSE joins them.
fn event_data(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8(body.to_vec())
        .unwrap()
        .replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|event| {
            let lines: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|v| v.strip_prefix(' ').unwrap_or(v))
                .collect();
            (!lines.is_empty()).then(|| lines.join("\n"))
        })
        .collect()
}

fn check_strip((with, without): (&str, &str), style: JsonStyle, crlf: bool, cuts: &[usize]) {
    let sse = "text/event-stream";
    let what = format!("{with} {style:?} crlf={crlf}");
    let input = styled(with, sse, style, crlf);
    let got = strip(&input, cuts);
    let want = styled(without, sse, style, crlf);
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want),
        "{what}"
    );
    // Each event is still valid JSON, with a choice to read and no trace of usage.
    for data in event_data(&got) {
        if data == "[DONE]" {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&data)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {data}"));
        assert!(v.get("usage").is_none(), "{what}: {data}");
        assert!(v["choices"][0].is_object(), "{what}: {data}");
    }
}

#[test]
fn strip_in_every_layout_whole_and_byte_by_byte() {
    for case in STRIP_CASES {
        for style in JsonStyle::ALL {
            for crlf in [false, true] {
                check_strip(case, style, crlf, &[]);
                let n = styled(case.0, "text/event-stream", style, crlf).len();
                check_strip(case, style, crlf, &(0..n).collect::<Vec<_>>());
            }
        }
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
        let mut s = scanner_for(Some(dialect("openai")), Some(ct));
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
        for d in [dialect("openai"), dialect("gemini"), dialect("anthropic")] {
            let mut s = scanner_for(Some(d), Some(ct));
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
    for d in [dialect("openai"), dialect("anthropic"), dialect("gemini")] {
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
                let mut s = scanner_for_capability(Some(d), cap, Some(ct));
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
    let mut s = scanner_for(Some(dialect("anthropic")), Some(b"text/event-stream"));
    feed_bounded(&mut s, b"data: \xff\xfe\xfd\n\n");
    feed_bounded(&mut s, &fixture("anthropic_messages_stream.sse"));
    feed_bounded(&mut s, b"\xc3\x28\n");
    check(&CASES[5], &s.finish());
    let mut s = scanner_for(Some(dialect("openai")), Some(b"text/event-stream"));
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
    let mut s = scanner_for(Some(dialect("openai")), Some(b"text/event-stream"));
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

/// Bedrock's binary event streams: not JSON text, so not restyled; any framing instead, and a
/// frame failing its CRC.
const EVENT_STREAMS: &[Case] = &[
    Case {
        file: "bedrock_converse_stream.eventstream",
        kind: "bedrock",
        content_type: "application/vnd.amazon.eventstream",
        tokens: (12, 5, 0, 7, 0),
        model: "",
    },
    // invoke-with-response-stream: the model's own events, base64 in `chunk`s; Bedrock's
    // invocation metrics in the last.
    Case {
        file: "bedrock_invoke_stream.eventstream",
        kind: "bedrock",
        content_type: "application/vnd.amazon.eventstream",
        tokens: (15, 0, 0, 6, 0),
        model: "",
    },
];

#[test]
fn bedrock_event_streams_in_any_framing_and_with_a_bad_crc() {
    for case in EVENT_STREAMS {
        let body = fixture(case.file);
        check(case, &scan(case, &body, &[]));
        let every: Vec<usize> = (1..body.len()).collect();
        check(case, &scan(case, &body, &every));
        for cut in 0..body.len() {
            check(case, &scan(case, &body, &[cut, cut * 7 / 3]));
        }
        // The last frame carries the usage: one flipped bit in it fails its CRC.
        let mut bad = body.clone();
        let at = body.len() - 10;
        bad[at] ^= 1;
        assert!(!scan(case, &bad, &[]).found, "{}", case.file);
        // A length no frame has (over the bound) stops the scan without buffering.
        let mut huge = body.clone();
        huge.splice(0..0, [0x7f, 0, 0, 0]);
        assert!(!scan(case, &huge, &[]).found);
    }
}
