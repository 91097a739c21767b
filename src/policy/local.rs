//! The policy state of this process: token buckets and concurrency counters per scope
//! (a tenant, or a tenant on one provider), budget reservations per tenant. Sharded maps and
//! a lock per scope, never a global one.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::vocab::FastDashMap;

use super::{LimitSpec, Refusal};

/// A bucket refilled at `cap` per minute, holding at most `cap`. Tokens may go negative
/// (a tokens-per-minute bucket is debited after the fact).
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) level: f64,
    pub(super) at: Instant,
}

impl Bucket {
    pub(super) fn new(cap: f64) -> Self {
        Self {
            level: cap,
            at: Instant::now(),
        }
    }

    pub(super) fn refill(&mut self, cap: f64) -> f64 {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.level = (self.level + dt * cap / 60.0).min(cap);
        self.level
    }
}

/// Seconds until a bucket at `level` reaches 1 (at least 1, for `retry-after`).
pub(super) fn wait_secs(level: f64, cap: f64) -> u64 {
    (((1.0 - level) * 60.0 / cap).ceil() as u64).max(1)
}

#[derive(Debug, Default)]
pub(super) struct Scope {
    inflight: AtomicU32,
    rpm: Mutex<Option<Bucket>>,
    tpm: Mutex<Option<Bucket>>,
}

#[derive(Debug, Default)]
pub(super) struct Local {
    scopes: FastDashMap<Box<str>, Arc<Scope>>,
    /// Budget reservations in flight, per tenant, in nano-dollars.
    pub(super) reserved: FastDashMap<Box<str>, Arc<AtomicU64>>,
    /// Spend settled locally while Redis was away, added to Redis when it returns.
    pub(super) unsynced_spend: FastDashMap<(Box<str>, String), u64>,
}

impl Local {
    pub(super) fn scope(&self, key: &str) -> Arc<Scope> {
        if let Some(s) = self.scopes.get(key) {
            return s.clone();
        }
        self.scopes.entry(key.into()).or_default().clone()
    }

    /// Takes a slot and a request from every scope, or nothing: a refusal by a later scope
    /// gives back what the earlier ones took. Each take is atomic on its own (a CAS-style
    /// add-then-check for concurrency, the scope's lock for a bucket).
    pub(super) fn admit(&self, scopes: &[(Arc<Scope>, &LimitSpec)]) -> Result<(), Refusal> {
        let mut taken = 0;
        let mut refusal = None;
        for (s, l) in scopes {
            if let Some(c) = l.concurrent
                && s.inflight.fetch_add(1, Ordering::AcqRel) >= c
            {
                s.inflight.fetch_sub(1, Ordering::AcqRel);
                refusal = Some(Refusal::Rate(1));
                break;
            }
            if let Some(cap) = l.requests_per_minute {
                let cap = f64::from(cap);
                let mut g = s.rpm.lock().unwrap_or_else(|p| p.into_inner());
                let b = g.get_or_insert_with(|| Bucket::new(cap));
                let level = b.refill(cap);
                if level < 1.0 {
                    drop(g);
                    if l.concurrent.is_some() {
                        s.inflight.fetch_sub(1, Ordering::AcqRel);
                    }
                    refusal = Some(Refusal::Rate(wait_secs(level, cap)));
                    break;
                }
                b.level -= 1.0;
            }
            if let Some(cap) = l.tokens_per_minute {
                let cap = cap as f64;
                let mut g = s.tpm.lock().unwrap_or_else(|p| p.into_inner());
                let level = g.get_or_insert_with(|| Bucket::new(cap)).refill(cap);
                if level <= 0.0 {
                    drop(g);
                    self.untake(s, l);
                    refusal = Some(Refusal::Rate(wait_secs(level, cap)));
                    break;
                }
            }
            taken += 1;
        }
        match refusal {
            None => Ok(()),
            Some(Refusal::Rate(first)) => {
                for (s, l) in &scopes[..taken] {
                    self.untake(s, l);
                }
                // The client must wait for the slowest scope, not the first that refused.
                Err(Refusal::Rate(first.max(self.longest_wait(scopes))))
            }
            Some(r) => {
                for (s, l) in &scopes[..taken] {
                    self.untake(s, l);
                }
                Err(r)
            }
        }
    }

    /// Seconds until every scope would admit a request (at least 1 where one is full).
    fn longest_wait(&self, scopes: &[(Arc<Scope>, &LimitSpec)]) -> u64 {
        let mut wait = 0;
        for (s, l) in scopes {
            if l.concurrent
                .is_some_and(|c| s.inflight.load(Ordering::Acquire) >= c)
            {
                wait = wait.max(1);
            }
            if let Some(cap) = l.requests_per_minute {
                let cap = f64::from(cap);
                let mut g = s.rpm.lock().unwrap_or_else(|p| p.into_inner());
                let level = g.get_or_insert_with(|| Bucket::new(cap)).refill(cap);
                if level < 1.0 {
                    wait = wait.max(wait_secs(level, cap));
                }
            }
            if let Some(cap) = l.tokens_per_minute {
                let cap = cap as f64;
                let mut g = s.tpm.lock().unwrap_or_else(|p| p.into_inner());
                let level = g.get_or_insert_with(|| Bucket::new(cap)).refill(cap);
                if level <= 0.0 {
                    wait = wait.max(wait_secs(level, cap));
                }
            }
        }
        wait
    }

    /// Gives back one scope's slot and request.
    fn untake(&self, s: &Scope, l: &LimitSpec) {
        if l.concurrent.is_some() {
            s.inflight.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(cap) = l.requests_per_minute {
            let mut g = s.rpm.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = g.as_mut() {
                b.level = (b.level + 1.0).min(f64::from(cap));
            }
        }
    }

    pub(super) fn release(&self, scopes: &[(Arc<Scope>, Arc<LimitSpec>)], tokens: u64) {
        for (s, l) in scopes {
            if l.concurrent.is_some() {
                s.inflight.fetch_sub(1, Ordering::AcqRel);
            }
            if let Some(cap) = l.tokens_per_minute
                && tokens > 0
            {
                let cap = cap as f64;
                let mut g = s.tpm.lock().unwrap_or_else(|p| p.into_inner());
                let b = g.get_or_insert_with(|| Bucket::new(cap));
                b.refill(cap);
                b.level -= tokens as f64;
            }
        }
    }

    /// Drops the state of scopes and reservations nobody holds and that would start afresh
    /// anyway: no request in flight, buckets idle for a minute (refilled to their cap), no
    /// reservation. End users come and go by the million; their state must not stay.
    pub(super) fn sweep(&self) {
        let idle = |b: &Mutex<Option<Bucket>>| {
            b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                // Not in debt at its last touch, and a minute of refill since: full.
                .is_none_or(|b| b.level >= 0.0 && b.at.elapsed().as_secs() >= 60)
        };
        self.scopes.retain(|_, s| {
            Arc::strong_count(s) > 1
                || s.inflight.load(Ordering::Acquire) > 0
                || !idle(&s.rpm)
                || !idle(&s.tpm)
        });
        self.reserved
            .retain(|_, r| Arc::strong_count(r) > 1 || r.load(Ordering::Acquire) > 0);
    }

    pub(super) fn reserved(&self, tenant: &str) -> Arc<AtomicU64> {
        if let Some(r) = self.reserved.get(tenant) {
            return r.clone();
        }
        self.reserved.entry(tenant.into()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_sweep_forgets_only_idle_state() {
        let local = Local::default();
        let spec = LimitSpec {
            requests_per_minute: Some(10),
            tokens_per_minute: None,
            concurrent: Some(1),
            on_shared_state_error: super::super::FailMode::Open,
        };
        let held = local.scope("acme/@alice");
        local.admit(&[(held.clone(), &spec)]).unwrap();
        let idle = local.scope("acme/@bob");
        local.admit(&[(idle.clone(), &spec)]).unwrap();
        local.release(&[(idle.clone(), Arc::new(spec.clone()))], 0);
        drop(idle);
        local.reserved("acme/carol").fetch_add(5, Ordering::AcqRel);
        local.reserved("acme/dave");
        local.sweep();
        // bob's bucket was used a moment ago: kept until it has refilled.
        assert_eq!(local.scopes.len(), 2);
        if let Some(s) = local.scopes.get("acme/@bob") {
            let mut g = s.rpm.lock().unwrap();
            g.as_mut().unwrap().at -= Duration::from_secs(61);
        }
        local.sweep();
        assert!(local.scopes.contains_key("acme/@alice"), "in flight");
        assert!(!local.scopes.contains_key("acme/@bob"), "idle and refilled");
        assert!(local.reserved.contains_key("acme/carol"));
        assert!(!local.reserved.contains_key("acme/dave"));
    }

    #[test]
    fn buckets_refill_per_minute_and_say_when() {
        let mut b = Bucket::new(60.0);
        b.level = 0.0;
        assert_eq!(wait_secs(b.level, 60.0), 1);
        assert_eq!(wait_secs(-119.0, 60.0), 120);
        b.at -= Duration::from_secs(2);
        let l = b.refill(60.0);
        assert!((1.9..2.1).contains(&l), "{l}");
    }
}
