//! Label values and the series they resolve to. `tenant` and `model` values are capped
//! (first come, first served) and, once a (tenant, provider, model) has a slot, its series
//! are resolved once and kept beside it: a finished request then costs one map lookup, not a
//! label hash and a `MetricVec` read lock per series.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::vocab::FastDashMap;
use prometheus::Histogram;

use super::OTHER;
use super::family::Counter;

/// Label values admitted so far, capped; first come, first served.
#[derive(Debug)]
pub(super) struct LabelCap {
    seen: FastDashMap<Box<str>, ()>,
    /// Counted apart from the map: `DashMap::len` would lock every shard.
    admitted: AtomicUsize,
    max: usize,
}

impl LabelCap {
    pub(super) fn new(max: usize) -> Self {
        Self {
            seen: FastDashMap::default(),
            admitted: AtomicUsize::new(0),
            max,
        }
    }

    /// `v` if it has a slot, taking one while there is room; else [`OTHER`].
    pub(super) fn get<'a>(&self, v: &'a str) -> &'a str {
        if self.seen.contains_key(v) {
            return v;
        }
        // Racing first sightings may admit a few past the cap; the bound stays small and fixed.
        if self.admitted.load(Ordering::Relaxed) >= self.max {
            return OTHER;
        }
        if self.seen.insert(v.into(), ()).is_none() {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        v
    }

    /// `v` if it already has a slot, else [`OTHER`]: never takes one.
    pub(super) fn peek<'a>(&self, v: &'a str) -> &'a str {
        if self.seen.contains_key(v) { v } else { OTHER }
    }
}

/// The series of one (tenant, provider, model) that holds label slots, resolved on first use
/// and kept: series a request never touched (a token type, a payer) still do not appear in
/// the scrape.
#[derive(Debug)]
pub(super) struct Series {
    provider: usize,
    model: Box<str>,
    /// The `model` label of the series without a tenant (capped across tenants).
    pub any_model: Box<str>,
    /// `byokd_requests_total` with code 200.
    pub ok: OnceLock<Counter>,
    /// `byokd_tokens_total`, by [`TOKEN_TYPES`] index.
    pub tokens: [OnceLock<Counter>; 5],
    /// `byokd_cost_usd_total`, by [`crate::vocab::KeySource`] index.
    pub cost: [OnceLock<Counter>; 4],
    pub duration: OnceLock<Histogram>,
    /// `gen_ai_client_token_usage` for input, then output.
    pub gen_ai_tokens: [OnceLock<Histogram>; 2],
}

/// The `type` values of `byokd_tokens_total`, in [`Series::tokens`] order.
pub(super) const TOKEN_TYPES: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
];

/// Applies `f` to the handle cached in `slot` (made on first use), or, for labels without a
/// slot, to a freshly looked-up one.
pub(super) fn with<M>(slot: Option<&OnceLock<M>>, make: impl FnOnce() -> M, f: impl FnOnce(&M)) {
    match slot {
        Some(s) => f(s.get_or_init(make)),
        None => f(&make()),
    }
}

/// The `tenant` label and, per tenant, its `(provider, model)` labels. Slots go only to
/// tenants with a successful response (or a key in the store), so tenants that never paid
/// cannot crowd out those that do, and each tenant's invented model names spend only its own
/// `max_models` slots.
#[derive(Debug)]
pub(super) struct TenantLabels {
    seen: FastDashMap<Box<str>, Vec<Arc<Series>>>,
    admitted: AtomicUsize,
    max_tenants: usize,
    max_models: usize,
}

impl TenantLabels {
    pub(super) fn new(max_tenants: usize, max_models: usize) -> Self {
        Self {
            seen: FastDashMap::default(),
            admitted: AtomicUsize::new(0),
            max_tenants,
            max_models,
        }
    }

    pub(super) fn peek<'a>(&self, t: &'a str) -> &'a str {
        if self.seen.contains_key(t) { t } else { OTHER }
    }

    /// Takes a slot for a tenant the store vouches for (it has a key).
    pub(super) fn admit<'a>(&self, t: &'a str) -> &'a str {
        if self.seen.contains_key(t) {
            return t;
        }
        if self.admitted.load(Ordering::Relaxed) >= self.max_tenants {
            return OTHER;
        }
        if self.seen.insert(t.into(), Vec::new()).is_none() {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        t
    }

    /// The (tenant, model) labels of a finished request, and their series when both have a
    /// slot. Only a successful request takes slots; `models` caps the tenant-less model label.
    pub(super) fn labels<'a>(
        &self,
        t: &'a str,
        provider: usize,
        model: &'a str,
        success: bool,
        models: &LabelCap,
    ) -> (&'a str, &'a str, Option<Arc<Series>>) {
        let find = |list: &[Arc<Series>]| {
            list.iter()
                .find(|s| s.provider == provider && *s.model == *model)
                .cloned()
        };
        if let Some(list) = self.seen.get(t) {
            if model.is_empty() {
                return (t, model, None);
            }
            if let Some(s) = find(&list) {
                return (t, model, Some(s));
            }
            if !success || list.len() >= self.max_models {
                return (t, OTHER, None);
            }
        } else if !success || self.admitted.load(Ordering::Relaxed) >= self.max_tenants {
            return (OTHER, if model.is_empty() { model } else { OTHER }, None);
        }
        let mut fresh = false;
        let mut list = self.seen.entry(t.into()).or_insert_with(|| {
            fresh = true;
            Vec::new()
        });
        if fresh {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        if model.is_empty() {
            return (t, model, None);
        }
        if let Some(s) = find(&list) {
            return (t, model, Some(s));
        }
        if list.len() >= self.max_models {
            return (t, OTHER, None);
        }
        let s = Arc::new(Series {
            provider,
            model: model.into(),
            any_model: models.get(model).into(),
            ok: OnceLock::new(),
            tokens: Default::default(),
            cost: Default::default(),
            duration: OnceLock::new(),
            gen_ai_tokens: Default::default(),
        });
        list.push(s.clone());
        (t, model, Some(s))
    }
}
