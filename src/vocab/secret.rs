//! Types that hold key material: hidden from `Debug`, never serializable, zeroized on drop.

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

/// A provider key as typed by a user (stdin, admin API). Zeroized on drop.
pub struct PlainKey(Zeroizing<String>);

impl PlainKey {
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }

    /// The key text; callers use it only to seal or to format-check it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainKey(<redacted>)")
    }
}

/// The ready-to-send auth header value (`Bearer sk-...` or the bare key).
///
/// Kept as `Bytes` whose owner is a zeroizing buffer: every request clones a reference,
/// not the key, and when the last request and the cache entry drop it the bytes are wiped.
#[derive(Clone)]
pub struct AuthValue(Bytes);

impl AuthValue {
    /// Builds `prefix + key` in one zeroizing buffer.
    pub fn new(prefix: &str, key: &[u8]) -> Self {
        let mut buf = Zeroizing::new(Vec::with_capacity(prefix.len() + key.len()));
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(key);
        Self(Bytes::from_owner(ZeroOnDrop(buf)))
    }

    /// The one place key material leaves this type: a header value marked sensitive, so
    /// HTTP/2 HPACK never indexes it and `Debug` of the header map hides it.
    pub fn header_value(&self) -> Option<HeaderValue> {
        self.header_value_from(0)
    }

    /// The value past its first `at` bytes as a header value, for a credential that carries
    /// more than its header (Vertex's project before its token). Shares the buffer.
    pub fn header_value_from(&self, at: usize) -> Option<HeaderValue> {
        let mut v = HeaderValue::from_maybe_shared(self.0.slice(at.min(self.0.len())..)).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}

impl AuthValue {
    /// The key itself, for a signing scheme that derives each request's signature from it
    /// (SigV4). It must never reach a log, an error or a header as it is.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AuthValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthValue(<redacted>)")
    }
}

struct ZeroOnDrop(Zeroizing<Vec<u8>>);

impl AsRef<[u8]> for ZeroOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let canary = "sk-canary-0123456789abcdef";
        let p = PlainKey::new(canary.into());
        let a = AuthValue::new("Bearer ", canary.as_bytes());
        let dbg = format!("{p:?} {a:?} {:?}", a.header_value().unwrap());
        assert!(!dbg.contains("canary"), "{dbg}");
        assert_eq!(
            a.header_value().unwrap().as_bytes(),
            format!("Bearer {canary}").as_bytes()
        );
    }
}
