//! Whole JSON bodies: a bounded head (for `model`) and tail (for `usage`), and the counter of
//! a body's top-level `data` elements (images).

use ::bytes::Bytes;

use super::bytes::*;
use super::*;

/// The model (from the head, else the tail) and the usage object closing a whole JSON body,
/// for dialects whose bodies name them `model_key` and `usage_key`.
pub fn model_and_usage<T: super::UsageObject>(
    head: &[u8],
    tail: &[u8],
    model_key: &[u8],
    usage_key: &[u8],
) -> (Option<String>, Option<T>) {
    let model = string_after(head, model_key).or_else(|| string_after(tail, model_key));
    (model, usage_in_tail(tail, usage_key))
}

/// Counts the elements of the top-level `data` array of a JSON body (image generation) in one
/// pass, without holding any of it: a byte state machine with a depth counter, no recursion,
/// so hostile nesting costs nothing. Strings (multi-megabyte `b64_json`) are skipped with a
/// SIMD search for the next quote or backslash.
#[derive(Debug, Default, Clone)]
pub struct DataCounter {
    depth: u64,
    in_string: bool,
    escaped: bool,
    /// The first bytes of the current depth-1 string (a key or a value), to spot `data`.
    key: [u8; 4],
    key_len: u8,
    /// The depth-1 string just closed was exactly `data`.
    key_is_data: bool,
    /// `"data":` was seen; a `[` now opens the array counted.
    after_data_colon: bool,
    /// Depth of the elements of the `data` array while inside it (0 = not inside).
    data_depth: u64,
    count: u64,
}

impl DataCounter {
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                    chunk = &chunk[1..];
                    continue;
                }
                let Some(i) = memchr::memchr2(b'"', b'\\', chunk) else {
                    self.key_bytes(chunk);
                    return;
                };
                self.key_bytes(&chunk[..i]);
                if chunk[i] == b'\\' {
                    self.escaped = true;
                } else {
                    self.in_string = false;
                    if self.depth == 1 {
                        self.key_is_data = self.key_len == 4 && self.key == *b"data";
                    }
                }
                chunk = &chunk[i + 1..];
                continue;
            }
            let b = chunk[0];
            chunk = &chunk[1..];
            match b {
                b'"' => {
                    self.value_starts();
                    self.in_string = true;
                    self.key_len = 0;
                    self.key_is_data = false;
                }
                b'{' | b'[' => {
                    self.value_starts();
                    let opens_data = b == b'[' && self.depth == 1 && self.after_data_colon;
                    self.depth = self.depth.saturating_add(1);
                    if opens_data {
                        self.data_depth = self.depth;
                    }
                    self.after_data_colon = false;
                }
                b'}' | b']' => {
                    if self.data_depth > 0 && self.depth == self.data_depth {
                        self.data_depth = 0;
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                b':' if self.depth == 1 => self.after_data_colon = self.key_is_data,
                b',' if self.depth == 1 => {
                    self.key_is_data = false;
                    self.after_data_colon = false;
                }
                _ => {}
            }
        }
    }

    /// A value begins at the current depth: inside `data`, that is one more element.
    fn value_starts(&mut self) {
        if self.data_depth > 0 && self.depth == self.data_depth {
            self.count += 1;
        }
    }

    fn key_bytes(&mut self, b: &[u8]) {
        if self.depth == 1 {
            for &c in b {
                if usize::from(self.key_len) < self.key.len() {
                    self.key[usize::from(self.key_len)] = c;
                }
                self.key_len = self.key_len.saturating_add(1);
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A JSON body: bounded head and tail, parsed once at the end.
#[derive(Debug)]
pub struct JsonScanner {
    dialect: &'static dyn Dialect,
    /// The body while it has come as one frame, held rather than copied: most JSON answers
    /// are one frame. Copied into `head` and `tail` when a second one comes.
    first: Option<Bytes>,
    head: Vec<u8>,
    pub(super) tail: Vec<u8>,
    /// Image generation: counts the `data` array's elements as the body passes.
    pub(super) images: Option<DataCounter>,
    /// Transcription: without a `usage` object, verbose_json's `duration` (near the head).
    pub(super) transcription: bool,
}

impl JsonScanner {
    pub fn new(dialect: &'static dyn Dialect) -> Self {
        Self {
            dialect,
            first: None,
            head: Vec::new(),
            tail: Vec::new(),
            images: None,
            transcription: false,
        }
    }

    /// Bytes held now (capacity), for the memory-bound tests.
    pub fn buffered(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.head.capacity() + self.tail.capacity()
    }

    /// As [`UsageScanner::feed`], holding a first frame instead of copying it.
    pub fn feed_bytes(&mut self, chunk: &Bytes) {
        if let Some(c) = &mut self.images {
            c.feed(chunk);
        }
        if self.first.is_none() && self.head.is_empty() {
            self.first = Some(chunk.clone());
            return;
        }
        if let Some(f) = self.first.take() {
            self.hold(&f);
        }
        self.hold(chunk);
    }

    fn hold(&mut self, chunk: &[u8]) {
        if self.head.len() < JSON_HEAD {
            let n = (JSON_HEAD - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..n]);
        }
        keep_tail(&mut self.tail, chunk);
    }
}

impl UsageScanner for JsonScanner {
    fn feed(&mut self, chunk: &[u8]) {
        if let Some(c) = &mut self.images {
            c.feed(chunk);
        }
        if let Some(f) = self.first.take() {
            self.hold(&f);
        }
        self.hold(chunk);
    }

    fn finish(&mut self) -> Usage {
        match self.first.take() {
            // One frame: its head and tail are slices of it, what `hold` would have copied.
            Some(f) => {
                let tail = &f[f.len().saturating_sub(JSON_TAIL)..];
                self.finish_with(&f[..f.len().min(JSON_HEAD)], tail)
            }
            None => self.finish_with(&self.head, &self.tail),
        }
    }
}

impl JsonScanner {
    fn finish_with(&self, head: &[u8], tail: &[u8]) -> Usage {
        let mut usage = Usage::default();
        self.dialect.json(&mut usage, head, tail);
        if let Some(c) = &self.images {
            usage.images = c.count();
            usage.found |= usage.images > 0;
        }
        if self.transcription && usage.audio_ms == 0 && usage.total() == 0 {
            // verbose_json: `"duration":8.47` leads the body, before the text and segments.
            if let Some(sec) = float_after(head, b"\"duration\"") {
                usage.audio_ms = seconds_to_ms(sec);
                usage.found = true;
            }
        }
        usage
    }
}
