//! JSON byte helpers shared by the scanners: find a member by key whatever the whitespace,
//! read the value after it, keep a bounded tail.

use std::sync::LazyLock;

use memchr::memmem;

use super::*;

/// JSON's insignificant whitespace (RFC 8259 §2): space, tab, line feed, carriage return.
pub fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// The index of the first byte at or after `at` that is not JSON whitespace (`hay.len()` if
/// there is none).
pub fn skip_ws(hay: &[u8], mut at: usize) -> usize {
    while at < hay.len() && is_json_ws(hay[at]) {
        at += 1;
    }
    at
}

/// `key_end` is just past a string's closing quote. If the string is an object key (a colon
/// follows, whitespace allowed around it), the index of its value's first byte (possibly
/// `hay.len()` if the text ends there); if it is a value, `None`.
///
/// This one rule is what makes every search insensitive to layout. A `"` inside a JSON
/// string is always escaped, so a byte search for `"key"` never matches inside a string;
/// it matches a string value equal to `key`, which the colon test rejects.
pub fn value_after_key(hay: &[u8], key_end: usize) -> Option<usize> {
    let colon = skip_ws(hay, key_end);
    (hay.get(colon) == Some(&b':')).then(|| skip_ws(hay, colon + 1))
}

/// The value positions of every member named `key` (quotes included) in `hay`, in order.
pub fn member_values<'a>(hay: &'a [u8], key: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    let finder = Search::new(key);
    let mut from = 0;
    std::iter::from_fn(move || {
        while let Some(p) = hay.get(from..).and_then(|rest| finder.get().find(rest)) {
            let p = from + p;
            from = p + 1;
            if let Some(v) = value_after_key(hay, p + key.len()) {
                return Some(v);
            }
        }
        None
    })
}

/// The keys every response is searched for, with their searchers built once: building one
/// costs more than searching a small body with it.
const HOT_KEYS: [&[u8]; 2] = [b"\"usage\"", b"\"model\""];

fn hot_finders() -> &'static [memmem::Finder<'static>; 2] {
    static F: LazyLock<[memmem::Finder<'static>; 2]> =
        LazyLock::new(|| HOT_KEYS.map(memmem::Finder::new));
    &F
}

/// A forward searcher for `key`: a shared one for a hot key, else its own.
// Lives on the stack of one search, never moved around: boxing `Own` would only add an
// allocation to every search for another key.
#[allow(clippy::large_enum_variant)]
enum Search<'a> {
    Hot(&'static memmem::Finder<'static>),
    Own(memmem::Finder<'a>),
}

impl<'a> Search<'a> {
    fn new(key: &'a [u8]) -> Self {
        match HOT_KEYS.iter().position(|k| *k == key) {
            Some(i) => Self::Hot(&hot_finders()[i]),
            None => Self::Own(memmem::Finder::new(key)),
        }
    }

    fn get(&self) -> &memmem::Finder<'a> {
        match self {
            Self::Hot(f) => f,
            Self::Own(f) => f,
        }
    }
}

/// The last occurrence of `key` (a quoted name) in `hay`: a reverse SIMD scan for the
/// name's first letter, each hit checked in place. The object searched for closes the body,
/// so the first hit is nearly always the one; a two-way reverse searcher (memchr's `rfind`)
/// spent about 450 instructions on a small body. At worst (a tail full of that letter) each
/// byte is checked against the key once.
fn rfind(hay: &[u8], key: &[u8]) -> Option<usize> {
    let &letter = key.get(1)?;
    memchr::memrchr_iter(letter, hay)
        .filter_map(|i| i.checked_sub(1))
        .find(|&i| hay[i..].starts_with(key))
}

/// Whether some member named `key` has one of the string values `values` (without quotes).
pub fn member_is(hay: &[u8], key: &[u8], values: &[&[u8]]) -> bool {
    member_values(hay, key).any(|v| {
        hay.get(v) == Some(&b'"')
            && values
                .iter()
                .any(|x| hay[v + 1..].starts_with(x) && hay.get(v + 1 + x.len()) == Some(&b'"'))
    })
}

/// The unsigned integer value of object key `key`, if present.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = usage_value_at(hay, key)?;
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Keeps the last [`JSON_TAIL`] bytes of a stream in `tail` (at most twice that, amortised:
/// compacted only when the buffer is twice the window).
pub fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    if chunk.len() >= JSON_TAIL {
        tail.clear();
        tail.extend_from_slice(&chunk[chunk.len() - JSON_TAIL..]);
        return;
    }
    tail.extend_from_slice(chunk);
    if tail.len() > 2 * JSON_TAIL {
        let cut = tail.len() - JSON_TAIL;
        tail.drain(..cut);
    }
}

/// The usage object that closes a JSON text, from its tail: the last occurrence of `key`
/// whose value parses as usage (earlier ones may be in content or cut by the window).
pub fn usage_in_tail<T: super::UsageObject>(tail: &[u8], key: &[u8]) -> Option<T> {
    let mut end = tail.len();
    while let Some(p) = rfind(&tail[..end], key) {
        if let Some(at) = usage_value_at(&tail[p..], key) {
            let obj = &tail[p + at..];
            if let Some(u) = T::lean(obj) {
                return Some(u);
            }
            let mut it = serde_json::Deserializer::from_slice(obj).into_iter::<T>();
            if let Some(Ok(u)) = it.next() {
                return Some(u);
            }
        }
        end = p;
    }
    None
}

/// The number value (integer or decimal) of object key `key`, if present.
pub fn float_after(hay: &[u8], key: &[u8]) -> Option<f64> {
    let at = usage_value_at(hay, key)?;
    let len = hay[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
        .count();
    std::str::from_utf8(&hay[at..at + len]).ok()?.parse().ok()
}

/// The string value of object key `key`, if present.
pub fn string_after(hay: &[u8], key: &[u8]) -> Option<String> {
    let at = usage_value_at(hay, key)?;
    if let Some(s) = plain_string(&hay[at..]) {
        return (!s.is_empty()).then(|| s.to_owned());
    }
    serde_json::Deserializer::from_slice(&hay[at..])
        .into_iter::<String>()
        .next()?
        .ok()
        .filter(|s| !s.is_empty())
}

/// The JSON string `v` starts with when it has no escape and no control character: what
/// serde would read, without its scratch copy. `None` leaves the rest to serde.
fn plain_string(v: &[u8]) -> Option<&str> {
    let rest = v.strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    let s = &rest[..end];
    if rest[end] != b'"' || s.iter().any(|&b| b < 0x20) {
        return None;
    }
    std::str::from_utf8(s).ok()
}

/// The value position of the first member named `key`, unless that value is `null`.
pub fn usage_value_at(hay: &[u8], key: &[u8]) -> Option<usize> {
    let v = member_values(hay, key).next()?;
    (v < hay.len() && !hay[v..].starts_with(b"null")).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The letter scan finds what a two-way reverse search finds, wherever the key and its
    /// letter occur.
    #[test]
    fn rfind_finds_the_last_occurrence() {
        let key = b"\"usage\"";
        let hays: &[&[u8]] = &[
            br#"{"usage":{"prompt_tokens":1}}"#,
            br#"{"usage":1,"x":"uuu","usage":{"u":"u"},"uu":"usag"}"#,
            br#"usage"usage""usage""#,
            br#""usage"#,
            br#"u"usage"u"#,
            b"",
            b"\"",
            br#"no key here, only u and "u" and "usag""#,
        ];
        for hay in hays {
            assert_eq!(
                rfind(hay, key),
                memmem::rfind(hay, key),
                "{}",
                String::from_utf8_lossy(hay)
            );
        }
        let long = [&b"uuuu\"usage\""[..], &[b'u'; 70_000]].concat();
        assert_eq!(rfind(&long, key), Some(4));
    }
}
