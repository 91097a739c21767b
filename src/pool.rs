//! Key pools: in-flight counts and 429 cooldowns per key id, so a tenant's several keys for
//! one provider share the load (least in-flight first) and a rate-limited key rests.
//!
//! Lock-free on the hot path: one sharded `DashMap` lookup per key considered, then atomics.
//! A request holds a [`Lease`] on the key it used until its response body ends or is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::vocab::FastDashMap;

/// Cooldown after a 429 that names no `retry-after`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
/// Longest cooldown a provider's `retry-after` can impose: a bogus or hostile value (days)
/// must not take a key out of service until a restart.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(300);

/// Load of one key id.
#[derive(Debug, Default)]
pub struct KeyLoad {
    inflight: AtomicU32,
    /// Requests ever started on the key: breaks ties between idle keys, so sequential
    /// requests alternate (spreading per-key rate limits) instead of all hitting the first.
    started: AtomicU64,
    /// Milliseconds since the pools' epoch until which the key rests (0 = never cooled).
    cool_until_ms: AtomicU64,
}

impl KeyLoad {
    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }
}

/// In-flight counts and cooldowns of every pooled key, by key id.
#[derive(Debug)]
pub struct KeyPools {
    keys: FastDashMap<Box<str>, Arc<KeyLoad>>,
    epoch: Instant,
}

impl Default for KeyPools {
    fn default() -> Self {
        Self {
            keys: FastDashMap::default(),
            epoch: Instant::now(),
        }
    }
}

impl KeyPools {
    /// The load entry of `key_id`, created on first use.
    pub fn load(&self, key_id: &str) -> Arc<KeyLoad> {
        if let Some(l) = self.keys.get(key_id) {
            return l.clone();
        }
        self.keys.entry(key_id.into()).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Milliseconds the key still rests, 0 when usable.
    pub fn cooling_ms(&self, load: &KeyLoad) -> u64 {
        load.cool_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(self.now_ms())
    }

    /// Rests `key_id` for `d` (capped at [`MAX_COOLDOWN`]); a later, longer 429 extends it.
    pub fn cool_down(&self, key_id: &str, d: Duration) {
        let until = self.now_ms() + d.min(MAX_COOLDOWN).as_millis() as u64;
        self.load(key_id)
            .cool_until_ms
            .fetch_max(until, Ordering::Relaxed);
    }

    /// Sort key for choosing: fewest in flight, then fewest ever started.
    pub fn rank(load: &KeyLoad) -> (u32, u64) {
        (
            load.inflight.load(Ordering::Relaxed),
            load.started.load(Ordering::Relaxed),
        )
    }

    /// Counts a request on the key until the lease drops.
    pub fn lease(load: Arc<KeyLoad>) -> Lease {
        load.inflight.fetch_add(1, Ordering::Relaxed);
        load.started.fetch_add(1, Ordering::Relaxed);
        Lease(load)
    }

    /// Forgets keys no longer in the store and idle, so the map tracks the store's size.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.keys
            .retain(|id, l| keep(id) || l.inflight.load(Ordering::Relaxed) > 0);
    }
}

/// One request counted on a key; dropping it ends the count.
#[derive(Debug)]
pub struct Lease(Arc<KeyLoad>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a provider asks to be left alone, from a 429's headers: `retry-after-ms`
/// (OpenAI), else `retry-after` in seconds or as an HTTP-date; [`DEFAULT_COOLDOWN`] when
/// absent or unreadable. Capped at [`MAX_COOLDOWN`].
pub fn retry_after(h: &http::HeaderMap) -> Duration {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let d = if let Some(ms) = text("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Some(Duration::from_secs_f64(ms.clamp(0.0, 1e9) / 1000.0))
    } else {
        text("retry-after").and_then(|v| match v.parse::<f64>() {
            Ok(s) => Some(Duration::from_secs_f64(s.clamp(0.0, 1e9))),
            Err(_) => httpdate::parse_http_date(v)
                .ok()
                .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default()),
        })
    };
    d.unwrap_or(DEFAULT_COOLDOWN).min(MAX_COOLDOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Duration::from_secs(2)
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "2"),
                ("retry-after-ms", "1500")
            ])),
            Duration::from_millis(1500)
        );
        assert_eq!(retry_after(&headers(&[])), DEFAULT_COOLDOWN);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "soon")])),
            DEFAULT_COOLDOWN
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "86400")])),
            MAX_COOLDOWN
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
        let d = retry_after(&headers(&[("retry-after", &later)]));
        assert!(
            d > Duration::from_secs(17) && d <= Duration::from_secs(20),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(20));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)])),
            Duration::ZERO
        );
    }

    #[test]
    fn leases_count_and_cooldowns_extend() {
        let p = KeyPools::default();
        let a = p.load("a");
        let l1 = KeyPools::lease(a.clone());
        let l2 = KeyPools::lease(p.load("a"));
        assert_eq!(KeyPools::rank(&a), (2, 2));
        drop(l1);
        drop(l2);
        assert_eq!(KeyPools::rank(&a), (0, 2));
        p.cool_down("a", Duration::from_secs(5));
        p.cool_down("a", Duration::from_secs(1));
        assert!(p.cooling_ms(&a) > 4000);
        p.cool_down("a", Duration::from_secs(86_400));
        assert!(p.cooling_ms(&a) <= MAX_COOLDOWN.as_millis() as u64);
        p.retain(|_| false);
        assert!(p.keys.is_empty());
    }
}
