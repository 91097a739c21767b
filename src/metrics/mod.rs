//! The record step: Prometheus series, the label cardinality cap, and the access log line.
//!
//! Metric names and labels are public (DESIGN §3). `tenant` and `model` label values are
//! capped: past `metrics.max_tenants` distinct values, new ones fold into `__other__`, so a
//! SaaS with a million tenants cannot blow up the scrape.

use std::sync::atomic::Ordering;
use std::time::Instant;

use dashmap::DashMap;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts,
    Registry, TextEncoder,
};

use crate::usage::Usage;
use crate::vocab::KeySource;

mod family;
mod labels;

use family::Counters;
use labels::{LabelCap, TOKEN_TYPES, TenantLabels, with};

pub const OTHER: &str = "__other__";

/// Bounds on label values (config `metrics`).
#[derive(Debug, Clone, Copy)]
pub struct LabelCaps {
    /// Distinct `tenant` values; the rest fold into `__other__`.
    pub max_tenants: usize,
    /// Distinct (provider, `model`) pairs per tenant.
    pub max_models_per_tenant: usize,
    /// Distinct `model` values of the series without a tenant label.
    pub max_models: usize,
}

impl Default for LabelCaps {
    fn default() -> Self {
        Self {
            max_tenants: 10_000,
            max_models_per_tenant: 20,
            max_models: 200,
        }
    }
}

#[derive(Debug, Clone)]
struct ProviderSeries {
    duration: Histogram,
    ttfb: Histogram,
}

/// Every series byokd exports.
pub struct Metrics {
    pub registry: Registry,
    /// The families with a `tenant` label that every request touches (`family.rs`).
    requests: Counters<4>,
    tokens: Counters<4>,
    /// Resolved once per provider (index = `Config::providers` index): no label hashing or
    /// lock on the request path for the histograms.
    per_provider: Vec<ProviderSeries>,
    overhead: Histogram,
    rejections: IntCounterVec,
    decryptions: Counters<2>,
    cache_hits: IntCounter,
    upstream_errors: IntCounterVec,
    model_choices: IntCounterVec,
    pub config_reloads: IntCounterVec,
    keys_expiring: prometheus::IntGaugeVec,
    budget_spent: prometheus::GaugeVec,
    budget_limit: prometheus::GaugeVec,
    shared_state_up: prometheus::IntGauge,
    /// OpenTelemetry GenAI semantic-convention names, for dashboards built on them.
    gen_ai_tokens: HistogramVec,
    gen_ai_duration: HistogramVec,
    /// `byokd_cost_usd_total`, counted in integer nano-dollars and shown in USD, so no cost is
    /// ever accumulated in floating point.
    cost: Counters<4>,
    /// Prices for `byokd_cost_usd_total`.
    pub pricing: crate::pricing::Pricing,
    /// This month's per-tenant totals, for the usage API.
    pub ledger: crate::ledger::Ledger,
    unpriced: IntCounterVec,
    /// Units that are not tokens (`image`, `character`, `audio_second`): a separate series so
    /// `byokd_tokens_total` keeps meaning tokens only and its types still add up.
    units: CounterVec,
    /// Successful responses of a metered endpoint where no usage was found: silent zeros made
    /// visible (stream cut early, a provider without usage, a compressed body).
    usage_missing: IntCounterVec,
    /// The one-time log for an upstream that compressed despite `accept-encoding: identity`.
    compressed_logged: std::sync::atomic::AtomicBool,
    /// (provider, model) pairs already logged as unpriced: one log line each, not one per request.
    unpriced_logged: DashMap<Box<str>, ()>,
    tenants: TenantLabels,
    /// The `model` label of the series without a tenant (the GenAI histograms, unpriced
    /// requests): models that took a tenant's slot, capped across tenants.
    models: LabelCap,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.05,
];

impl Metrics {
    /// `providers` are the configured provider names, in config order.
    pub fn new(
        caps: LabelCaps,
        providers: &[&str],
        pricing: crate::pricing::Pricing,
        ledger: crate::ledger::Ledger,
    ) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let requests = Counters::new(
            "byokd_requests_total",
            "Requests by tenant, provider, model and HTTP status code.",
            ["code", "model", "provider", "tenant"],
        );
        let tokens = Counters::new(
            "byokd_tokens_total",
            "Tokens by disjoint type: input, cached_input, cache_write, output, reasoning.",
            ["model", "provider", "tenant", "type"],
        );
        let rejections = counter(
            "byokd_rejections_total",
            "Requests byokd answered itself, by error code.",
            &["tenant", "reason"],
        )?;
        let decryptions = Counters::new(
            "byokd_key_decryptions_total",
            "Key decryptions through the KMS or local KEK (key-cache misses).",
            ["provider", "tenant"],
        );
        let upstream_errors = counter(
            "byokd_upstream_errors_total",
            "Failed upstream attempts by kind: connect, timeout, body_too_large.",
            &["provider", "kind"],
        )?;
        let model_choices = counter(
            "byokd_model_choice_total",
            "Requests to a models: alias with several candidates, by the candidate that answered (provider/model, from the config).",
            &["alias", "choice"],
        )?;
        let config_reloads = counter(
            "byokd_config_reloads_total",
            "Store and config reloads by result.",
            &["result"],
        )?;
        let keys_expiring = prometheus::IntGaugeVec::new(
            Opts::new(
                "byokd_keys_expiring_soon",
                "Usable keys that expire within 14 days, by tenant and provider: rotate them.",
            ),
            &["tenant", "provider"],
        )?;
        registry.register(Box::new(keys_expiring.clone()))?;
        let gauge = |name: &str, help: &str| -> Result<prometheus::GaugeVec, prometheus::Error> {
            let g = prometheus::GaugeVec::new(Opts::new(name, help), &["tenant"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let budget_spent = gauge(
            "byokd_budget_spent_usd",
            "Spend this UTC month of tenants with a budget, USD.",
        )?;
        let budget_limit = gauge(
            "byokd_budget_limit_usd",
            "Monthly budget of tenants with one, USD.",
        )?;
        let shared_state_up = prometheus::IntGauge::new(
            "byokd_shared_state_up",
            "1 while Redis (shared_state) answers; 0 while policies follow on_shared_state_error.",
        )?;
        registry.register(Box::new(shared_state_up.clone()))?;
        let unpriced = counter(
            "byokd_unpriced_requests_total",
            "Metered requests whose model has no price: tokens counted, cost unknown.",
            &["provider", "model"],
        )?;
        let usage_missing = counter(
            "byokd_usage_missing_total",
            "Successful responses of a metered endpoint in which no usage was found, by reason: not_found, compressed.",
            &["provider", "reason"],
        )?;
        let units = CounterVec::new(
            Opts::new(
                "byokd_usage_units_total",
                "Usage in units other than tokens: image (images generated), character (text-to-speech input), audio_second (transcribed audio).",
            ),
            &["tenant", "provider", "model", "unit"],
        )?;
        registry.register(Box::new(units.clone()))?;
        let gen_ai_tokens = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_token_usage",
                "OpenTelemetry GenAI: tokens per request by gen_ai_token_type (input, output).",
            )
            .buckets(vec![
                1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
                4194304.0,
            ]),
            &[
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_token_type",
            ],
        )?;
        registry.register(Box::new(gen_ai_tokens.clone()))?;
        let gen_ai_duration = HistogramVec::new(
            HistogramOpts::new(
                "gen_ai_client_operation_duration_seconds",
                "OpenTelemetry GenAI: duration of a model call, to the end of the response.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["gen_ai_provider_name", "gen_ai_request_model"],
        )?;
        registry.register(Box::new(gen_ai_duration.clone()))?;
        let cost = Counters::new(
            "byokd_cost_usd_total",
            "Cost in USD from the pricing table, by who pays (key_source).",
            ["key_source", "model", "provider", "tenant"],
        )
        .scaled(1_000_000_000);
        let hist =
            |name: &str, help: &str, buckets: &[f64]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                    &["provider"],
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let duration = hist(
            "byokd_request_duration_seconds",
            "Whole request duration, to the end of the response body.",
            LATENCY_BUCKETS,
        )?;
        let ttfb = hist(
            "byokd_time_to_first_byte_seconds",
            "Time until the upstream response headers arrived.",
            LATENCY_BUCKETS,
        )?;
        let per_provider = providers
            .iter()
            .map(|p| {
                Ok(ProviderSeries {
                    duration: duration.get_metric_with_label_values(&[p])?,
                    ttfb: ttfb.get_metric_with_label_values(&[p])?,
                })
            })
            .collect::<Result<Vec<_>, prometheus::Error>>()?;
        let overhead = Histogram::with_opts(
            HistogramOpts::new(
                "byokd_overhead_seconds",
                "Time inside byokd before the upstream request left.",
            )
            .buckets(OVERHEAD_BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(overhead.clone()))?;
        let cache_hits = IntCounter::new(
            "byokd_key_cache_hits_total",
            "Requests served from the plaintext key cache.",
        )?;
        registry.register(Box::new(cache_hits.clone()))?;
        Ok(Self {
            registry,
            requests,
            tokens,
            per_provider,
            overhead,
            rejections,
            decryptions,
            cache_hits,
            upstream_errors,
            model_choices,
            config_reloads,
            keys_expiring,
            budget_spent,
            budget_limit,
            shared_state_up,
            gen_ai_tokens,
            gen_ai_duration,
            cost,
            pricing,
            ledger,
            unpriced,
            units,
            usage_missing,
            compressed_logged: std::sync::atomic::AtomicBool::new(false),
            unpriced_logged: DashMap::new(),
            tenants: TenantLabels::new(caps.max_tenants, caps.max_models_per_tenant),
            models: LabelCap::new(caps.max_models),
        })
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        self.requests.render(&mut out);
        self.tokens.render(&mut out);
        self.cost.render(&mut out);
        self.decryptions.render(&mut out);
        out
    }

    /// `own`: the key is the tenant's own (the store vouches for the tenant), not the platform's.
    pub fn key_lookup(&self, tenant: &str, provider: &str, decrypted: bool, own: bool) {
        if decrypted {
            let t = if own {
                self.tenants.admit(tenant)
            } else {
                self.tenants.peek(tenant)
            };
            self.decryptions.inc_by([provider, t], 1);
        } else {
            self.cache_hits.inc();
        }
    }

    /// A budgeted tenant's spend and limit (nano-dollars), as the two budget gauges.
    /// Tenants without a label slot are left out: a gauge summed under `__other__` means nothing.
    pub fn budget(&self, tenant: &str, spent: u64, limit: u64) {
        let t = self.tenants.peek(tenant);
        if t == OTHER {
            return;
        }
        self.budget_spent
            .with_label_values(&[t])
            .set(spent as f64 / 1e9);
        self.budget_limit
            .with_label_values(&[t])
            .set(limit as f64 / 1e9);
    }

    pub fn shared_state_up(&self, up: bool) {
        self.shared_state_up.set(i64::from(up));
    }

    /// Recounts `byokd_keys_expiring_soon` from the (tenant, provider) of every usable key
    /// that expires soon (on reload and every sweep). The store vouches for these tenants, so
    /// they take label slots.
    pub fn key_expiry<'a>(&self, expiring: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut counts: std::collections::HashMap<(&str, &str), i64> = Default::default();
        for (tenant, provider) in expiring {
            *counts
                .entry((self.tenants.admit(tenant), provider))
                .or_default() += 1;
        }
        self.keys_expiring.reset();
        for ((t, p), n) in counts {
            self.keys_expiring.with_label_values(&[t, p]).set(n);
        }
    }

    pub fn overhead(&self, started: Instant) {
        self.overhead.observe(started.elapsed().as_secs_f64());
    }

    pub fn first_byte(&self, provider: usize, started: Instant) {
        if let Some(s) = self.per_provider.get(provider) {
            s.ttfb.observe(started.elapsed().as_secs_f64());
        }
    }

    pub fn upstream_error(&self, provider: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[provider, kind])
            .inc();
    }

    /// The candidate of a tiered alias that answered. Both labels come from the config, so
    /// their number is bounded by it.
    pub fn model_choice(&self, alias: &str, choice: &str) {
        self.model_choices.with_label_values(&[alias, choice]).inc();
    }

    /// A request byokd answered itself.
    pub fn rejected(&self, tenant: &str, provider: &str, code: &str, status: http::StatusCode) {
        let t = self.tenants.peek(tenant);
        self.rejections.with_label_values(&[t, code]).inc();
        self.requests.inc_by([status.as_str(), "", provider, t], 1);
    }

    /// Counts a finished request in every series and the ledger.
    pub fn completed(&self, r: &Completed<'_>, usage: &Usage) {
        let success = r.status.is_success();
        let (t, model, series) = self.tenants.labels(
            r.tenant,
            r.provider_idx,
            usage.model.as_deref().unwrap_or(""),
            success,
            &self.models,
        );
        let series = series.as_deref();
        let any_model = match (series, model) {
            (Some(s), _) => &*s.any_model,
            (None, "" | OTHER) => model,
            (None, m) => self.models.peek(m),
        };
        let provider = r.provider;
        let ok = series.filter(|_| r.status == http::StatusCode::OK);
        with(
            ok.map(|s| &s.ok),
            || self.requests.get([r.status.as_str(), model, provider, t]),
            |c| add(c, 1),
        );
        let counts = [
            usage.input,
            usage.cached_input,
            usage.cache_write,
            usage.output,
            usage.reasoning,
        ];
        for ((i, kind), n) in TOKEN_TYPES.iter().enumerate().zip(counts) {
            if n > 0 {
                with(
                    series.map(|s| &s.tokens[i]),
                    || self.tokens.get([model, provider, t, kind]),
                    |c| add(c, n),
                );
            }
        }
        for (unit, n) in [
            ("image", usage.images as f64),
            ("character", usage.characters as f64),
            ("audio_second", usage.audio_ms as f64 / 1000.0),
        ] {
            if n > 0.0 {
                self.units
                    .with_label_values(&[t, provider, model, unit])
                    .inc_by(n);
            }
        }
        if r.status.is_success() && r.capability.expects_usage() && !usage.found {
            let reason = if r.compressed {
                "compressed"
            } else {
                "not_found"
            };
            self.usage_missing
                .with_label_values(&[provider, reason])
                .inc();
            if r.compressed && !self.compressed_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    provider,
                    "upstream answered with a compressed body despite accept-encoding: identity; it passes through unmetered (byokd_usage_missing_total{{reason=\"compressed\"}})"
                );
            }
        }
        let elapsed = r.elapsed.as_secs_f64();
        if let Some(s) = self.per_provider.get(r.provider_idx) {
            s.duration.observe(elapsed);
        }
        with(
            series.map(|s| &s.duration),
            || {
                self.gen_ai_duration
                    .with_label_values(&[provider, any_model])
            },
            |m| m.observe(elapsed),
        );
        // Requests metered only in other units (images, speech, audio seconds) have no token
        // observation: a zero would skew the token histogram.
        if usage.found && usage.total() > 0 {
            let input = usage.input + usage.cached_input + usage.cache_write;
            let output = usage.output + usage.reasoning;
            for (i, (ty, n)) in [("input", input), ("output", output)]
                .into_iter()
                .enumerate()
            {
                with(
                    series.map(|s| &s.gen_ai_tokens[i]),
                    || {
                        self.gen_ai_tokens
                            .with_label_values(&[provider, any_model, ty])
                    },
                    |m| m.observe(n as f64),
                );
            }
        }
        self.ledger.record(
            r.tenant,
            provider,
            usage.model.as_deref().unwrap_or(""),
            usage,
            r.price.map(|p| p.cost_nanos(usage)),
            crate::vocab::unix_now(),
        );
        if usage.metered() {
            match r.price {
                Some(p) => with(
                    series.map(|s| &s.cost[r.key_source as usize]),
                    || self.cost.get([r.key_source.as_str(), model, provider, t]),
                    |c| add(c, p.cost_nanos(usage)),
                ),
                None => {
                    self.unpriced
                        .with_label_values(&[provider, any_model])
                        .inc();
                    let model = usage.model.as_deref().unwrap_or("");
                    let key = format!("{provider}/{model}");
                    if !self.unpriced_logged.contains_key(key.as_str())
                        && self.unpriced_logged.len() < 10_000
                    {
                        self.unpriced_logged.insert(key.into(), ());
                        tracing::warn!(
                            provider,
                            model,
                            "no price for this model: tokens are counted, cost is not; add it to the pricing file"
                        );
                    }
                }
            }
        }
    }
}

fn add(c: &family::Counter, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One finished request, as the series need it (the record step builds it).
#[derive(Debug, Clone, Copy)]
pub struct Completed<'a> {
    pub tenant: &'a str,
    pub provider: &'a str,
    /// Index into the configured providers, for the per-provider histograms.
    pub provider_idx: usize,
    pub status: http::StatusCode,
    /// From the request's arrival to its response's end, read once for every series and
    /// the access-log line.
    pub elapsed: std::time::Duration,
    pub key_source: KeySource,
    pub price: Option<crate::pricing::Price>,
    /// What the endpoint bills in; decides whether missing usage is worth counting.
    pub capability: crate::usage::Capability,
    /// The upstream sent a `content-encoding` other than identity: not scanned.
    pub compressed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn metrics(caps: LabelCaps) -> Arc<Metrics> {
        Arc::new(
            Metrics::new(
                caps,
                &["openai"],
                Default::default(),
                crate::ledger::Ledger::in_memory(),
            )
            .unwrap(),
        )
    }

    fn finish(m: &Arc<Metrics>, tenant: &str, model: &str, status: u16) {
        let r = Completed {
            tenant,
            provider: "openai",
            provider_idx: 0,
            status: http::StatusCode::from_u16(status).unwrap(),
            elapsed: std::time::Duration::from_millis(3),
            key_source: KeySource::Tenant,
            price: None,
            capability: crate::usage::Capability::Tokens,
            compressed: false,
        };
        let usage = Usage {
            input: 1,
            model: Some(model.into()),
            found: true,
            ..Usage::default()
        };
        m.completed(&r, &usage);
    }

    fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .collect()
    }

    #[test]
    fn twenty_thousand_tenants_fold_past_the_cap() {
        let m = metrics(LabelCaps::default());
        for i in 0..20_000 {
            finish(&m, &format!("tenant-{i}"), "gpt-4o", 200);
        }
        let text = String::from_utf8(m.render()).unwrap();
        let requests = series(&text, "byokd_requests_total");
        assert_eq!(requests.len(), 10_001, "10,000 tenants and __other__");
        let other = requests
            .iter()
            .find(|l| l.contains("tenant=\"__other__\""))
            .unwrap();
        assert!(other.ends_with(" 10000"), "{other}");
    }

    #[test]
    fn only_tenants_with_a_success_take_a_slot() {
        let m = metrics(LabelCaps {
            max_tenants: 2,
            ..LabelCaps::default()
        });
        // Rejections and failed answers never take a slot, however many tenants send them.
        for i in 0..50 {
            m.rejected(
                &format!("stranger-{i}"),
                "openai",
                "no_key",
                http::StatusCode::FORBIDDEN,
            );
            finish(&m, &format!("failing-{i}"), "gpt-4o", 401);
        }
        finish(&m, "payer-1", "gpt-4o", 200);
        finish(&m, "payer-2", "gpt-4o", 200);
        m.rejected(
            "payer-1",
            "openai",
            "rate_limited",
            http::StatusCode::TOO_MANY_REQUESTS,
        );
        let text = String::from_utf8(m.render()).unwrap();
        for l in text.lines().filter(|l| l.starts_with("byokd_")) {
            assert!(!l.contains("stranger-") && !l.contains("failing-"), "{l}");
        }
        assert!(text.contains("byokd_requests_total{code=\"200\",model=\"gpt-4o\",provider=\"openai\",tenant=\"payer-2\"} 1"), "{text}");
        assert!(
            text.contains("byokd_rejections_total{reason=\"rate_limited\",tenant=\"payer-1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("byokd_rejections_total{reason=\"no_key\",tenant=\"__other__\"} 50"),
            "{text}"
        );
    }

    #[test]
    fn invented_models_spend_only_their_tenants_slots() {
        let m = metrics(LabelCaps {
            max_tenants: 100,
            max_models_per_tenant: 3,
            max_models: 5,
        });
        finish(&m, "honest", "gpt-4o", 200);
        for i in 0..1_500 {
            finish(&m, "noisy", &format!("invented-{i}"), 200);
        }
        finish(&m, "honest", "gpt-4o-mini", 200);
        let text = String::from_utf8(m.render()).unwrap();
        let tokens = series(&text, "byokd_tokens_total");
        let noisy: Vec<_> = tokens
            .iter()
            .filter(|l| l.contains("tenant=\"noisy\""))
            .collect();
        assert_eq!(noisy.len(), 4, "3 models and __other__: {noisy:?}");
        assert!(
            noisy
                .iter()
                .any(|l| l.contains("model=\"__other__\"") && l.ends_with(" 1497")),
            "{noisy:?}"
        );
        for model in ["gpt-4o", "gpt-4o-mini"] {
            assert!(
                tokens.iter().any(|l| l.contains("tenant=\"honest\"")
                    && l.contains(&format!("model=\"{model}\""))),
                "{model}: {tokens:?}"
            );
        }
        // The histograms without a tenant keep at most max_models model values (+ __other__).
        let models: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("gen_ai_client_operation_duration_seconds_count{"))
            .filter_map(|l| l.split("gen_ai_request_model=\"").nth(1)?.split('"').next())
            .collect();
        assert!(models.len() <= 6, "{models:?}");
        assert!(models.contains(OTHER), "{models:?}");
    }

    /// The series cached per (tenant, provider, model) count exactly what the labelled
    /// lookups would: every status, token type and payer lands on its own series.
    #[test]
    fn cached_series_count_like_labelled_ones() {
        let m = metrics(LabelCaps::default());
        let price = crate::pricing::Price {
            input: 2,
            output: 3,
            ..Default::default()
        };
        let usage = Usage {
            input: 10,
            output: 5,
            reasoning: 1,
            model: Some("gpt-4o".into()),
            found: true,
            ..Usage::default()
        };
        for (status, source) in [
            (200, KeySource::Tenant),
            (200, KeySource::Tenant),
            (200, KeySource::Platform),
            (500, KeySource::Tenant),
        ] {
            let r = Completed {
                tenant: "acme",
                provider: "openai",
                provider_idx: 0,
                status: http::StatusCode::from_u16(status).unwrap(),
                elapsed: std::time::Duration::from_millis(3),
                key_source: source,
                price: Some(price),
                capability: crate::usage::Capability::Tokens,
                compressed: false,
            };
            m.completed(&r, &usage);
        }
        let text = String::from_utf8(m.render()).unwrap();
        let labels = "model=\"gpt-4o\",provider=\"openai\",tenant=\"acme\"";
        for line in [
            format!("byokd_requests_total{{code=\"200\",{labels}}} 3"),
            format!("byokd_requests_total{{code=\"500\",{labels}}} 1"),
            format!("byokd_tokens_total{{{labels},type=\"input\"}} 40"),
            format!("byokd_tokens_total{{{labels},type=\"output\"}} 20"),
            format!("byokd_tokens_total{{{labels},type=\"reasoning\"}} 4"),
            // 10 x 2 + 6 x 3 = 38 nano-dollars a request.
            format!("byokd_cost_usd_total{{key_source=\"tenant\",{labels}}} 0.000000114"),
            format!("byokd_cost_usd_total{{key_source=\"platform\",{labels}}} 0.000000038"),
            "gen_ai_client_operation_duration_seconds_count{gen_ai_provider_name=\"openai\",gen_ai_request_model=\"gpt-4o\"} 4".to_string(),
        ] {
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(
            !text.contains("type=\"cached_input\""),
            "untouched types stay absent"
        );
    }

    #[test]
    fn label_cap_folds_into_other() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.get("a"), "a");
        assert_eq!(cap.get("b"), "b");
        assert_eq!(cap.get("c"), OTHER);
        assert_eq!(cap.get("a"), "a");
        assert_eq!(cap.peek("c"), OTHER);
        assert_eq!(cap.peek("b"), "b");
    }
}
