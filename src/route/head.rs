//! The top level of a JSON request body (`model`, `stream`) read without parsing what lies
//! below it. Routing by model reads every `/v1` chat body, and SDKs send `messages` before
//! `model`, so serde parsed the whole conversation to find one string: 26 µs for 32 KiB of
//! short turns (`cargo bench --bench hot_path -- route/body_head`). Here strings are skipped
//! with a SIMD search for their closing quote, and nested values by their depth alone.
//!
//! For a valid body this finds what serde finds (the differential tests below hold it to
//! that). It does not check what it skips, so a body that is not JSON deep inside may still
//! be routed by its `model`; the provider then refuses it, as it would have refused it on
//! the default route. Anything unusual at the top level (an escape in a key or in `model`,
//! a duplicate `model` or `stream`, a `model` that is not a string, bytes after the object)
//! gives `None`, and serde reads the body as before.

use std::ops::Range;

use super::BodyHead;
use crate::usage::bytes::{is_json_ws, skip_ws as ws};

/// The body's top level when it is the usual one; `None` leaves the body to serde.
pub fn scan(body: &[u8]) -> Option<BodyHead> {
    let mut i = ws(body, 0);
    if body.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(body, i + 1);
    let mut model: Option<(String, Range<usize>)> = None;
    let mut seen_model = false;
    let mut streams = None;
    if body.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let (key, end) = plain(body, i)?;
            if !key.iter().all(|&b| (0x20..0x80).contains(&b)) {
                return None;
            }
            i = ws(body, end);
            if body.get(i) != Some(&b':') {
                return None;
            }
            i = ws(body, i + 1);
            match key {
                b"model" => {
                    if seen_model {
                        return None;
                    }
                    seen_model = true;
                    let (text, end) = plain(body, i)?;
                    if text.iter().any(|&b| b < 0x20) {
                        return None;
                    }
                    let text = std::str::from_utf8(text).ok()?;
                    model = Some((text.to_owned(), i..end));
                    i = end;
                }
                b"stream" => {
                    if streams.is_some() {
                        return None;
                    }
                    let end = skip_value(body, i)?;
                    streams = Some(&body[i..end] == b"true");
                    i = end;
                }
                _ => i = skip_value(body, i)?,
            }
            i = ws(body, i);
            match body.get(i) {
                Some(b',') => i = ws(body, i + 1),
                Some(b'}') => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (ws(body, i) == body.len()).then_some(BodyHead {
        model,
        streams: Some(streams.unwrap_or(false)),
    })
}

/// The string at `b[i]` when it has no escape: its bytes between the quotes, and the index
/// just past its closing quote.
fn plain(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let len = memchr::memchr2(b'"', b'\\', &b[i + 1..])?;
    (b[i + 1 + len] == b'"').then(|| (&b[i + 1..i + 1 + len], i + len + 2))
}

/// Just past the string at `b[i]` (its opening quote), escapes stepped over.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// Just past the value at `b[i]`: a string, an object or array by its depth (no recursion,
/// so hostile nesting costs nothing), or a scalar up to the next delimiter.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                i += b
                    .get(i..)?
                    .iter()
                    .position(|&c| matches!(c, b'"' | b'{' | b'[' | b'}' | b']'))?;
                match b[i] {
                    b'"' => {
                        i = skip_string(b, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    _ => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                }
                i += 1;
            }
        }
        b',' | b'}' | b']' | b':' => None,
        _ => {
            let n = b[i..]
                .iter()
                .position(|&c| matches!(c, b',' | b'}' | b']') || is_json_ws(c))
                .unwrap_or(b.len() - i);
            Some(i + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(b: &[u8]) -> bool {
        serde_json::from_slice::<serde_json::Value>(b).is_ok()
    }

    /// Where the body is JSON, the scan answers what serde's parse answers; where it is not,
    /// whatever it answers points at a string of the body.
    fn holds(body: &[u8]) {
        let Some(h) = scan(body) else { return };
        if valid(body) {
            assert_eq!(
                h,
                super::super::parsed_head(body),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        if let Some((_, at)) = h.model {
            assert_eq!(body[at.start], b'"');
            assert_eq!(body[at.end - 1], b'"');
        }
    }

    const USUAL: &[&str] = &[
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#,
        r#"{"messages":[{"role":"user","content":"say \"model\": \"x\" {[ ]}"}],"model":"acme/m-1","stream":true}"#,
        r#"{ "model" : "m" , "stream" : false , "n" : -1.5e+3, "tools": [[], {}, [{"a": [1, true, null]}]] }"#,
        "{\n  \"stream\": true,\n  \"metadata\": {\"model\": \"inner\"},\n  \"model\": \"caf\u{e9}\"\n}\n",
        r#"{"messages":[{"content":"ends with a backslash \\"}],"model":"m"}"#,
        r#"{"model":"m","stream":null,"user":"\u00e9"}"#,
        r#"{}"#,
        r#"{"stream":true}"#,
    ];

    #[test]
    fn the_usual_bodies_read_as_serde_reads_them() {
        for body in USUAL {
            let h = scan(body.as_bytes());
            assert!(h.is_some(), "{body}");
            assert_eq!(
                h.unwrap(),
                super::super::parsed_head(body.as_bytes()),
                "{body}"
            );
        }
        let h = scan(USUAL[1].as_bytes()).unwrap();
        assert_eq!(h.model.map(|m| m.0).as_deref(), Some("acme/m-1"));
        assert_eq!(h.streams, Some(true));
    }

    #[test]
    fn leaves_the_unusual_top_level_to_serde() {
        for body in [
            &br#"{"model":"a\/b"}"#[..],
            br#"{"mod\u0065l":"a/b"}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"stream":true,"stream":false}"#,
            br#"{"model":3}"#,
            br#"{"model":null}"#,
            br#"{"model":"a"} x"#,
            br#"[{"model":"a"}]"#,
            br#"{"model":"a""#,
            br#"{"model":"a",}"#,
            "{\"model\":\"a\tb\"}".as_bytes(),
            b"not json",
            b"",
        ] {
            assert_eq!(scan(body), None, "{}", String::from_utf8_lossy(body));
        }
    }

    /// Every one-byte change, insertion and deletion of the usual bodies.
    #[test]
    fn never_reads_a_json_body_otherwise_than_serde() {
        let alphabet = b"{}[]\":,\\ \nmodelstrua0-.eE";
        let mut checked = 0;
        for seed in USUAL.iter().map(|s| s.as_bytes()) {
            for i in 0..=seed.len() {
                for &c in alphabet {
                    if i < seed.len() {
                        let mut b = seed.to_vec();
                        b[i] = c;
                        holds(&b);
                    }
                    let mut b = seed.to_vec();
                    b.insert(i, c);
                    holds(&b);
                    checked += 1;
                }
                if i < seed.len() {
                    let mut b = seed.to_vec();
                    b.remove(i);
                    holds(&b);
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn hostile_nesting_and_unterminated_strings_end_quietly() {
        let deep = [vec![b'['; 100_000], vec![b']'; 100_000]].concat();
        let body = [&b"{\"model\":\"m\",\"x\":"[..], &deep, b"}"].concat();
        assert_eq!(
            scan(&body).and_then(|h| h.model).map(|m| m.0).as_deref(),
            Some("m")
        );
        assert_eq!(scan(br#"{"model":"m","x":["abc\"]}"#), None);
        assert_eq!(scan(br#"{"model":"m","x":[[[}"#), None);
    }
}
