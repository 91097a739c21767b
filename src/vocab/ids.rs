//! Who and which: the tenant id rules, and the id that follows one request through logs.

use std::fmt;

/// Tenant ids starting with `_` are byokd's own (`_platform`): no request, token or config
/// override may claim one.
pub fn reserved_tenant_id(t: &str) -> bool {
    t.starts_with('_')
}

/// Checks tenant id syntax: `[A-Za-z0-9_.:-]{1,128}`.
pub fn valid_tenant_id(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// A short random id per request, for logs and error messages; formatted only when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(u64);

impl RequestId {
    /// Thread-local xorshift seeded from the OS: unique enough for correlation, no shared
    /// counter cache line between cores.
    pub fn new() -> Self {
        thread_local! {
            static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
                let mut b = [0u8; 8];
                let _ = getrandom::fill(&mut b);
                u64::from_le_bytes(b) | 1
            });
        }
        STATE.with(|s| {
            let mut x = s.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            RequestId(x)
        })
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Who pays for a request: label `key_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Tenant,
    Platform,
    /// The end user's own key, sent with the request (`passthrough`).
    User,
    None,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Platform => "platform",
            Self::User => "user",
            Self::None => "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_rules() {
        assert!(valid_tenant_id("acme-1.eu:prod_2"));
        assert!(!valid_tenant_id(""));
        assert!(!valid_tenant_id("a/b"));
        assert!(!valid_tenant_id(&"a".repeat(129)));
        assert!(reserved_tenant_id("_platform"));
        assert!(!reserved_tenant_id("acme"));
    }

    #[test]
    fn request_ids_differ_and_print_as_16_hex_digits() {
        let (a, b) = (RequestId::new(), RequestId::new());
        assert_ne!(a, b);
        assert_eq!(a.to_string().len(), 16);
    }
}
