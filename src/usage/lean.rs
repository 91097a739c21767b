//! The usual usage object read without serde: members whose values are unsigned integers,
//! or objects of them one level down. serde's derive spends about 1,800 instructions on a
//! three-member object (a scratch copy of each key, a string match over every field name, a
//! stream deserializer around it), about a twentieth of byokd's own work per request.
//!
//! This reader accepts less than JSON: anything it is not sure of (an escape, a non-ASCII
//! byte, a float or `null` where a count is wanted, a duplicate member, deep nesting, the
//! object cut short) makes it return `None`, and the caller parses with serde as before.
//! So whenever it answers, it answers what serde would have; the differential tests below
//! hold it to that.

use super::bytes::is_json_ws;

/// A member a dialect counts: its key (without quotes) and, for a member of a nested object,
/// the key of that object in the usage object.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub parent: Option<&'static [u8]>,
    pub key: &'static [u8],
}

impl Field {
    pub const fn top(key: &'static [u8]) -> Self {
        Self { parent: None, key }
    }

    pub const fn nested(parent: &'static [u8], key: &'static [u8]) -> Self {
        Self {
            parent: Some(parent),
            key,
        }
    }

    /// Length and first byte first: most keys differ there, without a call to `memcmp`.
    fn is(&self, parent: Option<&[u8]>, key: &[u8]) -> bool {
        self.key.len() == key.len()
            && self.key.first() == key.first()
            && self.key == key
            && self.parent == parent
    }
}

/// Nesting skipped inside a member nobody counts (`promptTokensDetails: [{...}]` is two).
const MAX_SKIP_DEPTH: u8 = 8;

/// A usage object as a dialect reads it: serde's derive for any form, and [`counts`] first
/// where the dialect gives a `lean` reading of the usual one.
pub trait UsageObject: serde::de::DeserializeOwned {
    /// The object `obj` starts with, read by [`counts`]; `None` to parse it with serde.
    fn lean(_obj: &[u8]) -> Option<Self> {
        None
    }
}

/// The counts of `fields` in the JSON object `obj` starts with (whatever follows it is left
/// alone, as serde's stream deserializer does), or `None` for the caller to use serde.
/// `fields` must name every field of the serde type it stands for (and through `parent`,
/// each nested one), so that a duplicate or a value of the wrong type is caught here as
/// serde would catch it. At most 32 fields.
pub fn counts<const N: usize>(obj: &[u8], fields: &[Field; N]) -> Option<[Option<u64>; N]> {
    const { assert!(N <= 32) };
    let mut r = Reader {
        hay: obj,
        at: 0,
        seen: 0,
        parents_seen: 0,
    };
    let mut out = [None; N];
    r.object(None, fields, &mut out)?;
    Some(out)
}

struct Reader<'a> {
    hay: &'a [u8],
    at: usize,
    /// Fields already read: serde's derive rejects a duplicate, so this reader gives up on one.
    seen: u32,
    /// Nested objects already read, by the index of their first field.
    parents_seen: u32,
}

impl<'a> Reader<'a> {
    /// The next byte that is not whitespace, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.hay.get(self.at) {
            if !is_json_ws(b) {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.peek()? == want).then(|| self.at += 1)
    }

    fn object<const N: usize>(
        &mut self,
        parent: Option<&[u8]>,
        fields: &[Field; N],
        out: &mut [Option<u64>; N],
    ) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            self.peek()?;
            if let Some(i) = fields.iter().position(|f| f.is(parent, key)) {
                if self.seen & (1 << i) != 0 {
                    return None;
                }
                self.seen |= 1 << i;
                out[i] = Some(self.count()?);
            } else if let Some(i) = parent
                .is_none()
                .then(|| fields.iter().position(|f| f.parent == Some(key)))
                .flatten()
            {
                if self.parents_seen & (1 << i) != 0 {
                    return None;
                }
                self.parents_seen |= 1 << i;
                self.object(Some(key), fields, out)?;
            } else {
                self.skip(MAX_SKIP_DEPTH)?;
            }
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string of printable ASCII without escapes (a key or a value), its quotes consumed.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let rest = &self.hay[self.at..];
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        let s = &rest[..end];
        if rest[end] != b'"' || !s.iter().all(|&b| (0x20..0x80).contains(&b)) {
            return None;
        }
        self.at += end + 1;
        Some(s)
    }

    /// An unsigned integer as serde reads one into a `u64`: digits, no leading zero, no
    /// fraction or exponent (serde would call those floats and refuse them).
    fn count(&mut self) -> Option<u64> {
        // One pass: the digits are read as they are found (an overflow is serde's refusal too).
        let start = self.at;
        let mut n = 0u64;
        while let Some(&d) = self.hay.get(self.at).filter(|d| d.is_ascii_digit()) {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        let len = self.at - start;
        let leading_zero = len > 1 && self.hay[start] == b'0';
        let float = matches!(self.hay.get(self.at), Some(b'.' | b'e' | b'E'));
        (len > 0 && !leading_zero && !float).then_some(n)
    }

    /// One run of digits, without a leading zero unless it is the only digit.
    fn digits(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        let len = self.hay[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if len == 0 || (len > 1 && self.hay[start] == b'0') {
            return None;
        }
        self.at += len;
        Some(&self.hay[start..start + len])
    }

    /// Any value nobody counts, checked as strictly as serde checks what it ignores.
    fn skip(&mut self, depth: u8) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' if depth == 0 => None,
            b'{' => {
                self.at += 1;
                if self.peek()? == b'}' {
                    self.at += 1;
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.eat(b':')?;
                    self.skip(depth - 1)?;
                    match self.peek()? {
                        b',' => self.at += 1,
                        b'}' => break,
                        _ => return None,
                    }
                }
                self.at += 1;
                Some(())
            }
            b'[' => {
                self.at += 1;
                if self.peek()? == b']' {
                    self.at += 1;
                    return Some(());
                }
                loop {
                    self.skip(depth - 1)?;
                    match self.peek()? {
                        b',' => self.at += 1,
                        b']' => break,
                        _ => return None,
                    }
                }
                self.at += 1;
                Some(())
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.hay[self.at..]
            .starts_with(word)
            .then(|| self.at += word.len())
    }

    /// A JSON number (RFC 8259 §6): `-`? int (`.` digits)? ([eE] [+-]? digits)?.
    fn number(&mut self) -> Option<()> {
        if self.hay.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        self.digits()?;
        if self.hay.get(self.at) == Some(&b'.') {
            self.at += 1;
            self.any_digits()?;
        }
        if matches!(self.hay.get(self.at), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.hay.get(self.at), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.any_digits()?;
        }
        Some(())
    }

    /// One or more digits, leading zeros allowed (a fraction or an exponent).
    fn any_digits(&mut self) -> Option<()> {
        let len = self.hay[self.at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        (len > 0).then(|| self.at += len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: [Field; 4] = [
        Field::top(b"prompt_tokens"),
        Field::top(b"completion_tokens"),
        Field::nested(b"prompt_tokens_details", b"cached_tokens"),
        Field::nested(b"completion_tokens_details", b"reasoning_tokens"),
    ];

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Raw {
        prompt_tokens: Option<u64>,
        completion_tokens: Option<u64>,
        prompt_tokens_details: Option<Prompt>,
        completion_tokens_details: Option<Completion>,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Prompt {
        cached_tokens: Option<u64>,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Completion {
        reasoning_tokens: Option<u64>,
    }

    /// What serde reads, flattened to the four counts (a nested object without its count
    /// reads as no count, as the dialects use it).
    fn serde(obj: &[u8]) -> Option<[Option<u64>; 4]> {
        let r = serde_json::Deserializer::from_slice(obj)
            .into_iter::<Raw>()
            .next()?
            .ok()?;
        Some([
            r.prompt_tokens,
            r.completion_tokens,
            r.prompt_tokens_details.and_then(|d| d.cached_tokens),
            r.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        ])
    }

    /// Whenever the lean reader answers, serde answers the same.
    fn agrees(obj: &[u8]) -> bool {
        match counts(obj, &FIELDS) {
            Some(lean) => serde(obj) == Some(lean),
            None => true,
        }
    }

    #[test]
    fn reads_the_usual_objects_as_serde_does() {
        let usual: &[&[u8]] = &[
            br#"{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}"#,
            br#"{ "prompt_tokens" : 11 ,
                 "completion_tokens":7 }"#,
            br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":4,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}"#,
            br#"{"prompt_tokens":0,"service_tier":"default","x":[1,-2.5e3,{"a":[true,false,null]}],"completion_tokens":18446744073709551615}"#,
            br#"{}"#,
            br#"{"prompt_tokens":5}}],"more":"after"}"#,
        ];
        for obj in usual {
            let lean = counts(obj, &FIELDS);
            assert!(lean.is_some(), "{}", String::from_utf8_lossy(obj));
            assert_eq!(lean, serde(obj), "{}", String::from_utf8_lossy(obj));
        }
        assert_eq!(
            counts(usual[2], &FIELDS),
            Some([Some(19), Some(10), Some(3), Some(4)])
        );
    }

    #[test]
    fn leaves_to_serde_what_it_is_not_sure_of() {
        let unsure: &[&[u8]] = &[
            br#"{"prompt_tokens":1.0}"#,
            br#"{"prompt_tokens":1e2}"#,
            br#"{"prompt_tokens":-0}"#,
            br#"{"prompt_tokens":null}"#,
            br#"{"prompt_tokens":012}"#,
            br#"{"prompt_tokens":18446744073709551616}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt_tokens_details":{},"prompt_tokens_details":{}}"#,
            br#"{"prompt_tokens_details":null}"#,
            br#"{"prompt\u005ftokens":3}"#,
            br#"{"note":"caf\u00e9"}"#,
            "{\"note\":\"café\"}".as_bytes(),
            br#"{"a":[[[[[[[[[1]]]]]]]]]}"#,
            br#"{"prompt_tokens":1"#,
            br#"{"prompt_tokens":1,}"#,
            br#"{"x":01}"#,
            br#"{"x":1.}"#,
            br#"{"x":-}"#,
            br#"{"x":tru}"#,
            b"{\"x\":\"a\tb\"}",
        ];
        for obj in unsure {
            assert_eq!(
                counts(obj, &FIELDS),
                None,
                "{}",
                String::from_utf8_lossy(obj)
            );
        }
    }

    /// Every one-byte change, deletion and insertion of a set of usage objects: the lean
    /// reader answers only where serde answers the same.
    #[test]
    fn never_answers_otherwise_than_serde() {
        let seeds: &[&[u8]] = &[
            br#"{"prompt_tokens":19,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":4},"t":[1,"s",-2.5E-3,{}]}"#,
            br#"{ "prompt_tokens" : 0 , "x" : { "y" : [ null , true ] } }"#,
        ];
        let alphabet = b"{}[]\":,.-+eE0159 \tnulltruefalsxp_\\";
        let mut checked = 0;
        for seed in seeds {
            for i in 0..=seed.len() {
                for &b in alphabet {
                    let mut changed = seed.to_vec();
                    if i < seed.len() {
                        changed[i] = b;
                        assert!(agrees(&changed), "{}", String::from_utf8_lossy(&changed));
                    }
                    let mut inserted = seed.to_vec();
                    inserted.insert(i, b);
                    assert!(agrees(&inserted), "{}", String::from_utf8_lossy(&inserted));
                    checked += 2;
                }
                if i < seed.len() {
                    let mut removed = seed.to_vec();
                    removed.remove(i);
                    assert!(agrees(&removed), "{}", String::from_utf8_lossy(&removed));
                }
            }
        }
        assert!(checked > 10_000);
    }
}
