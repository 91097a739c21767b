//! Metering through the real server against the fake provider: units other than tokens
//! (images, speech characters, transcription seconds), the request-model fallback, streams
//! metered without the app's opt-in, the usage-missing counter, and identity encoding.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use common::*;

struct Harness {
    up: FakeUpstream,
    byokd: byokd::server::Running,
    _env: Env,
}

impl Harness {
    async fn new() -> Self {
        let up = fake_upstream().await;
        let pricing = format!(
            "pricing: {}/config/pricing.yaml\n",
            env!("CARGO_MANIFEST_DIR")
        );
        let env = Env::new(&config_yaml(&up.url(), &pricing));
        env.add_key("acme", "openai", CANARY_OPENAI).await;
        let byokd = byokd::server::start(env.config()).await.unwrap();
        Self {
            up,
            byokd,
            _env: env,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.byokd.data_addr, path)
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Got {
        let mut h = vec![("x-tenant-id", "acme")];
        h.extend_from_slice(headers);
        send(&client(), request("POST", &self.url(path), &h, body)).await
    }

    /// Metrics once every request the provider saw has been recorded.
    async fn metrics(&self) -> String {
        metrics_after(self.byokd.admin_addr, self.up.seen().len()).await
    }
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn images_are_counted_from_the_data_array_and_priced_per_image() {
    let h = Harness::new().await;
    let got = h
        .post(
            "/v1/images/generations",
            &[JSON],
            r#"{"model":"dall-e-3","prompt":"a cat","n":3}"#,
        )
        .await;
    assert_eq!(got.status, 200);
    let m = h.metrics().await;
    // The response names no model: the label is the request's.
    let units = &["tenant=\"acme\"", "model=\"dall-e-3\"", "unit=\"image\""];
    assert_eq!(
        sample(&m, "byokd_usage_units_total", units),
        Some(3.0),
        "{m}"
    );
    // 3 × $0.04.
    assert_eq!(
        sample(&m, "byokd_cost_usd_total", &["model=\"dall-e-3\""]),
        Some(0.12)
    );
    assert_eq!(sample(&m, "byokd_usage_missing_total", &[]), None);
}

#[tokio::test]
async fn speech_is_metered_in_input_characters_from_the_request() {
    let h = Harness::new().await;
    let body = r#"{"model":"tts-1","input":"Hello, w\u00f6rld ☃","voice":"alloy"}"#;
    let got = h.post("/v1/audio/speech", &[JSON], body).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["content-type"], "audio/mpeg");
    assert_eq!(
        h.up.last().body.as_ref(),
        body.as_bytes(),
        "read, never edited"
    );
    let m = h.metrics().await;
    let units = &["model=\"tts-1\"", "unit=\"character\""];
    assert_eq!(
        sample(&m, "byokd_usage_units_total", units),
        Some(14.0),
        "{m}"
    );
    // 14 characters at $15 per million.
    assert_eq!(
        sample(&m, "byokd_cost_usd_total", &["model=\"tts-1\""]),
        Some(0.00021)
    );
}

fn multipart(format: &str) -> (String, String) {
    let b = "XbOuNdArY";
    let body = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{b}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\n{format}\r\n--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: audio/mpeg\r\n\r\nID3fake-audio\r\n--{b}--\r\n"
    );
    (format!("multipart/form-data; boundary={b}"), body)
}

#[tokio::test]
async fn transcription_takes_usage_seconds_else_verbose_duration() {
    let h = Harness::new().await;
    let (ct, body) = multipart("json");
    let got = h
        .post("/v1/audio/transcriptions", &[("content-type", &ct)], &body)
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(h.up.last().body.as_ref(), body.as_bytes());
    let (ct, body) = multipart("verbose_json");
    h.post("/v1/audio/transcriptions", &[("content-type", &ct)], &body)
        .await;
    let m = h.metrics().await;
    // 9 s (usage) + 8.47 s (duration); the model from the multipart form.
    let units = &["model=\"whisper-1\"", "unit=\"audio_second\""];
    let secs = sample(&m, "byokd_usage_units_total", units).unwrap();
    assert!((secs - 17.47).abs() < 1e-9, "{secs}");
    // 17.47 s at $0.006 per minute = $0.001747.
    assert_eq!(
        sample(&m, "byokd_cost_usd_total", &["model=\"whisper-1\""]),
        Some(0.001747)
    );
}

#[tokio::test]
async fn stream_options_without_include_usage_still_metered_and_hidden() {
    let h = Harness::new().await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_obfuscation":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let got = h.post("/v1/chat/completions", &[JSON], body).await;
    assert_eq!(got.status, 200);
    // Byte for byte what upstream sends without include_usage (obfuscation included).
    assert_eq!(got.text(), openai_events(3, "gpt-4o-mini", false).concat());
    let sent = h.up.last().body;
    assert_eq!(
        std::str::from_utf8(&sent).unwrap(),
        body.replace(
            r#""stream_options":{"#,
            r#""stream_options":{"include_usage":true,"#
        )
    );
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &["model=\"gpt-4o-mini\"", "type=\"output\""]
        ),
        Some(20.0)
    );
}

#[tokio::test]
async fn upstream_gets_identity_and_a_compressed_answer_is_counted_missing() {
    let h = Harness::new().await;
    let got = h
        .post(
            "/v1/chat/completions",
            &[JSON, ("accept-encoding", "gzip, br, deflate")],
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(h.up.last().headers["accept-encoding"], "identity");
    let m = h.metrics().await;
    assert_eq!(sample(&m, "byokd_usage_missing_total", &[]), None);

    for enc in ["gzip", "br", "deflate"] {
        let got = h
            .post(
                "/v1/chat/completions",
                &[JSON, ("x-fake-encoding", enc)],
                r#"{"model":"gpt-4o-mini","messages":[]}"#,
            )
            .await;
        assert_eq!(got.status, 200);
        assert_eq!(got.headers["content-encoding"], enc, "passed through as is");
    }
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_usage_missing_total",
            &["provider=\"openai\"", "reason=\"compressed\""]
        ),
        Some(3.0),
        "{m}"
    );
}

#[tokio::test]
async fn a_response_without_usage_is_counted_missing_and_labelled_by_the_request_model() {
    let h = Harness::new().await;
    // A JSON answer without usage (as some OpenAI-compatible servers give).
    let (ct, body) = multipart("text");
    let got = h
        .post(
            "/v1/audio/transcriptions",
            &[("content-type", &ct), ("x-fake-status", "200")],
            &body,
        )
        .await;
    assert_eq!(got.status, 200);
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_usage_missing_total",
            &["provider=\"openai\"", "reason=\"not_found\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "byokd_requests_total",
            &["model=\"whisper-1\"", "code=\"200\""]
        ),
        Some(1.0)
    );
    // Endpoints that carry no usage (model lists, a GET of stored completions) are not counted.
    for path in ["/v1/models", "/v1/chat/completions"] {
        send(
            &client(),
            request(
                "GET",
                &h.url(path),
                &[("x-tenant-id", "acme"), ("x-fake-status", "200")],
                "",
            ),
        )
        .await;
    }
    let m = h.metrics().await;
    assert_eq!(
        sample(&m, "byokd_usage_missing_total", &["reason=\"not_found\""]),
        Some(1.0)
    );
}

#[tokio::test]
async fn ollama_openai_endpoint_streams_are_metered_by_default() {
    let h = Harness::new().await;
    let body = r#"{"model":"llama3.2","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let got = h.post("/ollama/v1/chat/completions", &[JSON], body).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), openai_events(3, "llama3.2", false).concat());
    let sent: serde_json::Value = serde_json::from_slice(&h.up.last().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let m = h.metrics().await;
    assert_eq!(
        sample(
            &m,
            "byokd_tokens_total",
            &[
                "provider=\"ollama\"",
                "model=\"llama3.2\"",
                "type=\"output\""
            ]
        ),
        Some(20.0),
        "{m}"
    );
}

/// OpenAI-compatible servers written in Python lay their JSON out as `{"a": 1, "b": 2}`; some
/// pretty-print it over several `data:` lines (valid SSE). The app that did not ask for usage
/// still gets exactly the stream it asked for (no usage-only chunk with `"choices": []`, no
/// `"usage": null`), and both a chat stream and a Responses API stream are metered.
#[tokio::test]
async fn spaced_and_pretty_provider_streams_are_stripped_and_metered() {
    for (style, name) in [(JsonStyle::Spaced, "spaced"), (JsonStyle::Pretty, "pretty")] {
        let h = Harness::new().await;
        let format = ("x-fake-format", name);
        let body =
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let got = h.post("/v1/chat/completions", &[JSON, format], body).await;
        assert_eq!(got.status, 200);
        let sent: serde_json::Value = serde_json::from_slice(&h.up.last().body).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true, "{name}");
        let want: String = openai_events(3, "gpt-4o-mini", false)
            .iter()
            .map(|e| String::from_utf8(restyle_stream(e.as_bytes(), style, false)).unwrap())
            .collect();
        let text = got.text();
        assert_eq!(text, want, "{name}: byte for byte the stream without usage");
        assert!(!text.contains("\"usage\"") && !text.contains("\"choices\": []"));

        let body = r#"{"model":"o4-mini","stream":true,"input":"hi"}"#;
        let got = h.post("/v1/responses", &[JSON, format], body).await;
        assert_eq!(got.status, 200);
        let want: String = responses_events("o4-mini")
            .iter()
            .map(|e| String::from_utf8(restyle_stream(e.as_bytes(), style, false)).unwrap())
            .collect();
        assert_eq!(
            got.text(),
            want,
            "{name}: a Responses stream passes untouched"
        );

        let m = h.metrics().await;
        let tokens = |model: &str, ty: &str| {
            sample(
                &m,
                "byokd_tokens_total",
                &[
                    "tenant=\"acme\"",
                    &format!("model=\"{model}\""),
                    &format!("type=\"{ty}\""),
                ],
            )
        };
        // Chat: 120 prompt (100 cached), 30 completion (10 reasoning).
        for (ty, n) in [
            ("input", 20.0),
            ("cached_input", 100.0),
            ("output", 20.0),
            ("reasoning", 10.0),
        ] {
            assert_eq!(tokens("gpt-4o-mini", ty), Some(n), "{name} chat {ty}: {m}");
        }
        // Responses: 328 input (256 cached), 180 output (128 reasoning).
        for (ty, n) in [
            ("input", 72.0),
            ("cached_input", 256.0),
            ("output", 52.0),
            ("reasoning", 128.0),
        ] {
            assert_eq!(tokens("o4-mini", ty), Some(n), "{name} responses {ty}: {m}");
        }
        assert_eq!(sample(&m, "byokd_usage_missing_total", &[]), None, "{m}");
    }
}
