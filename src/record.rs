//! The record step: when a response body ends (or the client leaves), its usage is counted
//! once in the metrics and the ledger, the admission settled to what it really cost, and one
//! access-log line written.

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{Completed, Metrics};
use crate::usage::Usage;
use crate::vocab::KeySource;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    UpstreamError,
    ClientGone,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::UpstreamError => "upstream_error",
            Self::ClientGone => "client_gone",
        }
    }
}

/// Everything needed to record one forwarded request when its body ends.
#[derive(Debug)]
pub struct Recorder {
    pub metrics: Arc<Metrics>,
    pub tenant: Arc<str>,
    /// The end user inside the tenant: in the ledger and the access log, never a metric.
    pub end_user: Option<Arc<str>>,
    pub provider: Arc<str>,
    pub provider_idx: usize,
    pub status: http::StatusCode,
    pub started: Instant,
    pub request_id: crate::vocab::RequestId,
    pub key_source: KeySource,
    /// Set by `finish` from the pricing table.
    pub price: Option<crate::pricing::Price>,
    /// What the endpoint bills in; decides whether missing usage is worth counting.
    pub capability: crate::usage::Capability,
    /// The request's `model`, found in the first bytes of its body as it streamed upstream:
    /// the label when the response names none (transcriptions, speech, cut streams).
    pub request_model: Arc<std::sync::OnceLock<Box<str>>>,
    /// Text-to-speech: characters of the request's `input`.
    pub characters: u64,
    /// The upstream sent a `content-encoding` other than identity: not scanned.
    pub compressed: bool,
    /// Rate-limit slots and budget reservation, settled to the metered usage at the end.
    pub admission: Option<crate::policy::Admission>,
    /// Set when the stream may be cut for budget (`on_exhausted: cut`).
    pub cut: Option<Arc<crate::cut::CutState>>,
    /// Usage the response headers reported (`Kind::header_usage`), for when the body has none.
    pub header_usage: Option<Usage>,
}

impl Recorder {
    pub fn finish(mut self, mut usage: Usage, outcome: Outcome, bytes: u64) {
        if let (false, Some(h)) = (usage.found, self.header_usage.take()) {
            usage = Usage {
                model: usage.model.take(),
                ..h
            };
        }
        if usage.model.is_none() {
            usage.model = self.request_model.get().map(|m| m.to_string());
        }
        if let Some(c) = &self.cut
            && c.cut.load(std::sync::atomic::Ordering::Relaxed)
        {
            // A cut stream never reached its final usage event: bill the running estimate
            // (an input count reported at the stream's start is exact and kept).
            if !usage.found {
                usage.input = c.input_tokens;
            }
            usage.output = usage
                .output
                .max(c.events.load(std::sync::atomic::Ordering::Relaxed));
            usage.found = true;
        }
        if self.characters > 0 && self.status.is_success() {
            usage.characters = self.characters;
            usage.found = true;
        }
        self.price = usage
            .model
            .as_deref()
            .and_then(|m| self.metrics.pricing.price(&self.provider, m))
            .filter(|p| p.covers(&usage));
        let elapsed = self.started.elapsed();
        self.metrics.completed(
            &Completed {
                tenant: &self.tenant,
                provider: &self.provider,
                provider_idx: self.provider_idx,
                status: self.status,
                elapsed,
                key_source: self.key_source,
                price: self.price,
                capability: self.capability,
                compressed: self.compressed,
            },
            &usage,
        );
        if let Some(u) = &self.end_user {
            self.metrics.ledger.record(
                &crate::policy::end_user_subject(&self.tenant, u),
                &self.provider,
                usage.model.as_deref().unwrap_or(""),
                &usage,
                self.price.map(|p| p.cost_nanos(&usage)),
                crate::vocab::unix_now(),
            );
        }
        if let Some(a) = self.admission.take() {
            let tokens = usage.input
                + usage.cached_input
                + usage.cache_write
                + usage.output
                + usage.reasoning;
            a.settle(tokens, self.price.map_or(0, |p| p.cost_nanos(&usage)));
        }
        crate::access_log::write(&crate::access_log::Line {
            request_id: self.request_id,
            tenant: &self.tenant,
            end_user: self.end_user.as_deref(),
            provider: &self.provider,
            status: self.status.as_u16(),
            model: usage.model.as_deref().unwrap_or(""),
            input_tokens: usage.input,
            cached_input_tokens: usage.cached_input,
            cache_write_tokens: usage.cache_write,
            output_tokens: usage.output,
            reasoning_tokens: usage.reasoning,
            usage_found: usage.found,
            key_source: self.key_source.as_str(),
            cost_usd: self.price.map(|p| p.cost_nanos(&usage) as f64 / 1e9),
            bytes,
            outcome: outcome.as_str(),
            duration_ms: elapsed.as_secs_f64() * 1000.0,
        });
    }
}
