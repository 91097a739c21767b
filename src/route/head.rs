//! The top level of a JSON request body read without parsing what lies below it. Several
//! steps read one or two top-level members of every chat body: routing by model (`model`,
//! `stream`), the streaming usage edit (`stream`, `stream_options`), the budget's estimate
//! (`model` and the output cap), the end user (`user`). SDKs send `messages` before `model`,
//! so serde parsed the whole conversation each time to find them: the budget's `Value` alone
//! took 132 µs for 32 KiB of short turns (`cargo bench --bench hot_path`). Here strings are
//! skipped with a SIMD search for their closing quote, and nested values by their depth alone.
//!
//! For a valid body this finds what serde finds (the differential tests below hold it to
//! that). It does not check what it skips, so a body that is not JSON deep inside may still
//! be read by its top level (routed by its `model`, estimated, edited); the provider then
//! refuses it, as it would have refused it on the default route. Anything unusual at the top
//! level (an escape in a key, bytes after the object; for [`top`], also an escape in `model`
//! or a duplicate of the members it reads) gives `None`, and serde reads the body as before.

use std::ops::Range;

use super::BodyHead;
use crate::provider::Member;
use crate::usage::bytes::{is_json_ws, skip_ws as ws};

/// The body's top level when it is the usual one; `None` leaves the body to serde.
pub fn scan(body: &[u8]) -> Option<BodyHead> {
    let top = top(body)?;
    Some(BodyHead {
        model: top.model.map(|(text, at)| (text.to_owned(), at)),
        streams: Some(top.streams),
    })
}

/// Where the members byokd reads sit in a usual body's top level.
#[derive(Debug, PartialEq, Eq)]
pub struct Top<'a> {
    /// Index of the opening `{`.
    pub open: usize,
    /// `model`, a string without escapes: its text, and its range with the quotes.
    pub model: Option<(&'a str, Range<usize>)>,
    /// Whether `stream` is `true`.
    pub streams: bool,
    /// The range of `stream_options`'s value, whatever it is.
    pub stream_options: Option<Range<usize>>,
}

/// The top level of a usual body: an object with at most one each of `model`, `stream` and
/// `stream_options`, no escape in a key or in `model`, nothing after it. `None` otherwise.
pub fn top(body: &[u8]) -> Option<Top<'_>> {
    let mut model: Option<(&str, Range<usize>)> = None;
    let mut streams = None;
    let mut stream_options = None;
    let open = each_member(body, |key, at, plain_string| {
        // A duplicate of any of these leaves the body to serde.
        let first = match key {
            b"model" => {
                if !plain_string {
                    return None;
                }
                let text = &body[at.start + 1..at.end - 1];
                if text.iter().any(|&b| b < 0x20) {
                    return None;
                }
                model
                    .replace((std::str::from_utf8(text).ok()?, at))
                    .is_none()
            }
            b"stream" => streams.replace(&body[at] == b"true").is_none(),
            b"stream_options" => stream_options.replace(at).is_none(),
            _ => true,
        };
        first.then_some(())
    })?;
    Some(Top {
        open,
        model,
        streams: streams.unwrap_or(false),
        stream_options,
    })
}

/// The top-level members of a usual body (an object whose keys are printable ASCII without
/// escapes, nothing after it), for the steps that read one or two of them: the budget's
/// estimate and the end user (routing and the usage edit use [`top`]). A handful of entries.
pub struct Members<'a> {
    body: &'a [u8],
    list: Vec<(&'a [u8], Range<usize>)>,
}

impl<'a> Members<'a> {
    /// The value of member `key`, as raw JSON; of duplicates, the last (as serde's `Value`
    /// keeps it).
    pub fn get(&self, key: &str) -> Option<&'a [u8]> {
        let body = self.body;
        self.list
            .iter()
            .rev()
            .find(|(k, _)| *k == key.as_bytes())
            .map(|(_, at)| &body[at.clone()])
    }

    /// How many members `key` has: a typed read refuses a duplicate where `get` takes the last.
    pub fn count(&self, key: &str) -> usize {
        self.list
            .iter()
            .filter(|(k, _)| *k == key.as_bytes())
            .count()
    }
}

/// The body's top-level members, or `None` for an unusual top level (then serde reads it).
pub fn members(body: &[u8]) -> Option<Members<'_>> {
    let mut list = Vec::new();
    each_member(body, |key, at, _| {
        list.push((key, at));
        Some(())
    })?;
    Some(Members { body, list })
}

/// `f` given the top-level members of `body` (none without a body), for a reader such as the
/// budget's estimate: scanned, or, for an unusual top level, from serde's parse of the whole
/// body. Each member asked for is parsed alone, so a conversation is never built into a
/// `Value`; a body that is not JSON deep inside may still name its `model` and cap, and the
/// provider refuses it.
pub fn with_members<R>(body: Option<&[u8]>, f: impl FnOnce(&Member<'_>) -> R) -> R {
    let Some(body) = body else {
        return f(&|_| None);
    };
    match members(body) {
        Some(m) => f(&|key| serde_json::from_slice(m.get(key)?).ok()),
        None => {
            let v = serde_json::from_slice::<serde_json::Value>(body).ok();
            f(&|key| v.as_ref()?.get(key).cloned())
        }
    }
}

/// Calls `f` with each top-level member's key, the range of its value and whether that value
/// is a string without escapes, and gives the index of the opening `{`; `None` when the top
/// level is not a usual object or `f` gave `None`.
fn each_member<'a>(
    body: &'a [u8],
    mut f: impl FnMut(&'a [u8], Range<usize>, bool) -> Option<()>,
) -> Option<usize> {
    let open = ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return None;
    }
    let mut i = ws(body, open + 1);
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
            // A plain string is ended by one search (no second pass for its escapes).
            let (end, plain_string) = match plain(body, i) {
                Some((_, end)) => (end, true),
                None => (skip_value(body, i)?, false),
            };
            f(key, i..end, plain_string)?;
            i = ws(body, end);
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
    (ws(body, i) == body.len()).then_some(open)
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

/// Calls `f` with every one-byte change (to a byte of `alphabet`), insertion and deletion of
/// `seed`: the differential tests of the scan's readers hold each to serde over these.
#[cfg(test)]
pub(crate) fn variants(seed: &[u8], alphabet: &[u8], mut f: impl FnMut(&[u8])) {
    for i in 0..=seed.len() {
        for &c in alphabet {
            if i < seed.len() {
                let mut b = seed.to_vec();
                b[i] = c;
                f(&b);
            }
            let mut b = seed.to_vec();
            b.insert(i, c);
            f(&b);
        }
        if i < seed.len() {
            let mut b = seed.to_vec();
            b.remove(i);
            f(&b);
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
            br#"{"stream_options":{},"stream_options":null}"#,
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
        let mut checked = 0;
        for seed in USUAL.iter().map(|s| s.as_bytes()) {
            variants(seed, b"{}[]\":,\\ \nmodelstrua0-.eE", |b| {
                holds(b);
                checked += 1;
            });
        }
        assert!(checked > 10_000);
    }

    /// A member looked up in the scan is the member serde's `Value` holds (the last of
    /// duplicates), for every JSON body among the variants of the usual ones.
    #[test]
    fn members_are_what_a_parse_holds() {
        let keys = [
            "model", "stream", "messages", "n", "tools", "user", "metadata",
        ];
        let mut compared = 0;
        for seed in USUAL.iter().map(|s| s.as_bytes()) {
            variants(seed, b"{}[]\":,\\ \nmodelstrua0", |b| {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(b) else {
                    return;
                };
                with_members(Some(b), |m| {
                    for k in keys {
                        assert_eq!(
                            m(k),
                            v.get(k).cloned(),
                            "{k} {}",
                            String::from_utf8_lossy(b)
                        );
                    }
                });
                compared += 1;
            });
        }
        assert!(compared > 1_000, "{compared}");
        let dup = br#"{"model":"a","messages":[{"model":"inner"}],"model":"b"}"#;
        let m = members(dup).unwrap();
        assert_eq!(m.get("model"), Some(&br#""b""#[..]));
        assert_eq!(m.count("model"), 2);
        assert_eq!(with_members(None, |m| m("model")), None);
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
