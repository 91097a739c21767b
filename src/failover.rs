//! Failover: which keys and providers a request may try, in order, and the attempt loop of
//! the credential ► rewrite ► forward steps over them.
//!
//! The order: the tenant's usable keys for the routed provider (least in-flight first, keys
//! cooling down after a 429 skipped), then each step of the tenant's `failover` chain (another
//! provider of the same wire format with the tenant's key for it, or `platform`: the
//! `_platform` key for the routed provider). An attempt is retried only when nothing went
//! back to the client yet: on a connect error, a timeout before the response headers, a 429
//! or a 5xx. The last attempt's answer passes through unchanged.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, request};
use sha2::Digest as _;
use smallvec::{SmallVec, smallvec};

use crate::forward::Upstream;
use crate::forward::{ForwardError, SendError};
use crate::keys::CredentialError;
use crate::keys::store::{KeyRecord, Snapshot};
use crate::keys::{Credential, KeySource, Keyring, PLATFORM_TENANT};
use crate::metrics::Metrics;
use crate::policy::{FailoverStep, TenantPolicy};
use crate::pool::{KeyLoad, KeyPools, Lease};
use crate::provider::Provider;
use crate::rewrite::rewrite;
use crate::route::Route;
use crate::stream_usage::{BodyKind, RequestBody, add_include_usage};
use crate::vocab::RequestId;
use crate::vocab::unix_now;

/// Response header: how many upstream attempts the answer took.
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-byokd-attempts");

/// Most upstream attempts one request makes, however many keys and chain steps there are:
/// a request must not hammer a failing provider through a large pool.
pub const MAX_ATTEMPTS: usize = 8;

/// One key (or no key) on one provider.
#[derive(Debug)]
pub struct Candidate {
    pub provider: usize,
    record: Option<Arc<KeyRecord>>,
    source: KeySource,
    /// An end user's own key: already a credential, never pooled.
    given: Option<Credential>,
    load: Option<Arc<KeyLoad>>,
    /// A candidate of a tiered alias: its own endpoint and body.
    over: Option<Arc<Override>>,
    /// The platform's credential from the environment (`platform_credentials: environment`).
    environment: bool,
}

/// One candidate of a `models:` alias with several: the request goes to its provider's
/// OpenAI-compatible endpoint with its own model name in the body.
#[derive(Debug)]
pub struct Override {
    pub path: &'static str,
    pub body: Bytes,
    /// Its index in the alias's candidates (for the time-to-first-byte average).
    pub tier: usize,
    /// `provider/model`, for the response header and the metric label.
    pub label: Box<str>,
}

/// The attempts a request may make, in order. One key and no chain (the usual case) is a
/// plan of one candidate built without touching the pool state.
#[derive(Debug)]
pub struct Plan {
    /// Inline for the usual single attempt: no allocation per request.
    candidates: SmallVec<[Candidate; 1]>,
    /// Count the request's key as in flight: it belongs to a pool of several, or other
    /// attempts may follow.
    counted: bool,
}

impl Plan {
    /// Only the attempts at `provider` (its key pool and platform key): a request routed by
    /// model carries that provider's model name, which no other provider would understand.
    pub fn only(mut self, provider: usize) -> Self {
        self.candidates.retain(|c| c.provider == provider);
        self
    }

    /// The end user's own key (`passthrough`): one attempt, no failover to keys they did not
    /// bring.
    pub fn given(provider: usize, credential: Credential) -> Self {
        Self {
            candidates: smallvec![Candidate {
                provider,
                record: None,
                source: credential.source,
                given: Some(credential),
                load: None,
                over: None,
                environment: false,
            }],
            counted: false,
        }
    }

    /// More than one attempt is possible, so the request body must be replayable.
    /// Every attempt of this plan goes to `over`'s endpoint with its body.
    pub fn over(mut self, over: Arc<Override>) -> Self {
        for c in &mut self.candidates {
            c.over = Some(over.clone());
        }
        self
    }

    /// `next`'s attempts after this plan's (a tiered alias's next candidate), up to
    /// [`MAX_ATTEMPTS`] in all.
    pub fn then(mut self, next: Plan) -> Self {
        self.candidates.extend(next.candidates);
        self.candidates.truncate(MAX_ATTEMPTS);
        self.counted = self.counted || next.counted || self.candidates.len() > 1;
        self
    }

    pub fn can_retry(&self) -> bool {
        self.candidates.len() > 1
    }

    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The key of the first attempt (benches and diagnostics).
    pub fn first_record(&self) -> Option<&Arc<KeyRecord>> {
        self.candidates.first()?.record.as_ref()
    }
}

/// Builds the plan for `tenant` on provider `idx`. No usable key for the routed provider is
/// `no_key` as before failover existed: a chain backs up a failing provider, it does not
/// stand in for a missing key.
pub fn plan(
    keyring: &Keyring,
    providers: &[Arc<Provider>],
    policy: &TenantPolicy,
    tenant: &str,
    idx: usize,
) -> Result<Plan, CredentialError> {
    let now = unix_now();
    let snap = keyring.snapshot();
    let provider = &providers[idx];
    let chain = policy.failover_of(idx);

    // Fast path: one key and no chain, the usual case: no pool state is touched.
    if chain.is_empty() {
        let mut own = snap.keys_for(tenant, &provider.name, now);
        match (own.next(), own.next()) {
            (Some(k), None) => return Ok(single(idx, k.clone(), KeySource::Tenant)),
            (None, _) if policy.platform_fallback => {
                let mut platform = snap.keys_for(PLATFORM_TENANT, &provider.name, now);
                if let (Some(k), None) = (platform.next(), platform.next()) {
                    return Ok(single(idx, k.clone(), KeySource::Platform));
                }
            }
            _ => {}
        }
    }

    let mut b = Builder {
        snap: &snap,
        pools: keyring.pools(),
        now,
        out: Vec::new(),
        cooled: Vec::new(),
        pooled: false,
    };
    if !b.own_or_platform(tenant, idx, provider, policy.platform_fallback) {
        if policy.platform_fallback && provider.platform_from_environment {
            b.out.push(Candidate {
                provider: idx,
                record: None,
                source: KeySource::Platform,
                given: None,
                load: None,
                over: None,
                environment: true,
            });
        } else if provider.requires_key() {
            return Err(CredentialError::NoKey(provider.name.to_string()));
        }
        b.keyless(idx);
    }
    for step in chain {
        match *step {
            FailoverStep::Platform => {
                b.stage(PLATFORM_TENANT, idx, provider, KeySource::Platform);
            }
            // A chain inherited from `defaults` may name a provider this tenant's own
            // allow-list excludes: skipped, since a refused provider is never reached.
            FailoverStep::Provider(q) if policy.allows(q) => {
                let p = &providers[q];
                if !b.own_or_platform(tenant, q, p, policy.platform_fallback) && !p.requires_key() {
                    b.keyless(q);
                }
            }
            FailoverStep::Provider(_) => {}
        }
    }
    let Builder {
        mut out,
        mut cooled,
        pooled,
        ..
    } = b;
    if out.is_empty() {
        // Every key rests: try the one whose cooldown ends first rather than refuse; the
        // provider's own 429 then passes through if it still objects.
        cooled.sort_by_key(|(ms, _)| *ms);
        out.extend(cooled.into_iter().map(|(_, c)| c).take(1));
    }
    out.truncate(MAX_ATTEMPTS);
    let counted = pooled || out.len() > 1;
    Ok(Plan {
        candidates: out.into(),
        counted,
    })
}

fn single(provider: usize, record: Arc<KeyRecord>, source: KeySource) -> Plan {
    Plan {
        candidates: smallvec![Candidate {
            provider,
            record: Some(record),
            source,
            given: None,
            load: None,
            over: None,
            environment: false,
        }],
        counted: false,
    }
}

struct Builder<'a> {
    snap: &'a Snapshot,
    pools: &'a KeyPools,
    now: i64,
    out: Vec<Candidate>,
    /// Keys resting after a 429, with the milliseconds left.
    cooled: Vec<(u64, Candidate)>,
    pooled: bool,
}

impl Builder<'_> {
    /// Adds `tenant`'s usable keys for provider `idx`, least loaded first; false if it has none.
    fn stage(&mut self, tenant: &str, idx: usize, provider: &Provider, source: KeySource) -> bool {
        let records: Vec<&Arc<KeyRecord>> = self
            .snap
            .keys_for(tenant, &provider.name, self.now)
            .collect();
        if records.is_empty() {
            return false;
        }
        self.pooled |= records.len() > 1;
        let mut ranked: Vec<_> = records
            .into_iter()
            .filter(|r| {
                let seen = |c: &Candidate| c.record.as_ref().is_some_and(|o| o.id == r.id);
                !self.out.iter().any(seen) && !self.cooled.iter().any(|(_, c)| seen(c))
            })
            .map(|r| {
                let load = self.pools.load(&r.id);
                (KeyPools::rank(&load), r.clone(), load)
            })
            .collect();
        // Stable: equal loads keep the store's order (newest key first).
        ranked.sort_by_key(|(rank, _, _)| *rank);
        for (_, record, load) in ranked {
            let cooling = self.pools.cooling_ms(&load);
            let c = Candidate {
                provider: idx,
                record: Some(record),
                source,
                given: None,
                load: Some(load),
                over: None,
                environment: false,
            };
            if cooling == 0 {
                self.out.push(c);
            } else {
                self.cooled.push((cooling, c));
            }
        }
        true
    }

    /// The tenant's keys for provider `idx`, else (if its policy allows) the platform's;
    /// false if neither has one. The same rule as a request without failover.
    fn own_or_platform(
        &mut self,
        tenant: &str,
        idx: usize,
        provider: &Provider,
        fallback: bool,
    ) -> bool {
        self.stage(tenant, idx, provider, KeySource::Tenant)
            || (fallback && self.stage(PLATFORM_TENANT, idx, provider, KeySource::Platform))
    }

    /// A provider that needs no key (a local server): one attempt without auth.
    fn keyless(&mut self, idx: usize) {
        self.out.push(Candidate {
            provider: idx,
            record: None,
            source: KeySource::None,
            given: None,
            load: None,
            over: None,
            environment: false,
        });
    }
}

/// The request body, once or replayable.
pub enum Payload {
    /// Streamed (or larger than the inspection bound): one attempt only.
    Once(Option<RequestBody>),
    /// Read whole (at most `MAX_INSPECTED_BODY`): replayed for each attempt, edited per
    /// provider when it wants `stream_options.include_usage`.
    Whole {
        original: Bytes,
        /// `add_include_usage(original)`, computed on first need.
        edited: OnceLock<Option<Bytes>>,
        /// A POST to `/chat/completions`: the edit applies.
        chat: bool,
    },
}

impl Payload {
    pub fn whole(original: Bytes, chat: bool) -> Self {
        Self::Whole {
            original,
            edited: OnceLock::new(),
            chat,
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Whole { .. })
    }

    /// The body for one attempt at `provider`, and whether byokd asked for usage (so the
    /// response must be stripped of it).
    /// `openai_wire`: the request was routed by model to an OpenAI-compatible endpoint, which
    /// takes `include_usage` whatever the provider's native API does.
    /// `last`: no attempt follows, so the body is handed over rather than shared (sharing a
    /// body read into a `Vec` costs an allocation on its first clone).
    fn body_for(
        &mut self,
        provider: &Provider,
        openai_wire: bool,
        headers: &mut HeaderMap,
        last: bool,
    ) -> (RequestBody, bool) {
        let give = |b: &mut Bytes| if last { std::mem::take(b) } else { b.clone() };
        match self {
            Self::Once(b) => (b.take().unwrap_or_else(RequestBody::empty), false),
            Self::Whole {
                original,
                edited,
                chat,
            } => {
                if *chat && (provider.stream_usage || openai_wire) {
                    edited.get_or_init(|| add_include_usage(original).map(Bytes::from));
                    if let Some(Some(e)) = edited.get_mut() {
                        set_length(headers, e.len());
                        return (RequestBody::whole(give(e)), true);
                    }
                }
                // The body is known whole: its length is said, whatever the app's header said
                // (a body routed by model had its `model` rewritten).
                set_length(headers, original.len());
                (RequestBody::whole(give(original)), false)
            }
        }
    }
}

/// Sets `Content-Length`, unless the app's header already says exactly that (the usual case:
/// a header value made from a number is an allocation, and the insert a hash).
fn set_length(headers: &mut HeaderMap, len: usize) {
    // One lookup: exactly one value, all digits, equal to `len`.
    let mut said = headers.get_all(header::CONTENT_LENGTH).iter();
    let exact = match (said.next(), said.next()) {
        (Some(v), None) => {
            let v = v.as_bytes();
            !v.is_empty()
                && v.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    == Some(len)
        }
        _ => false,
    };
    if !exact {
        headers.insert(header::CONTENT_LENGTH, len.into());
    }
}

/// The answer the loop settled on.
pub struct Attempted {
    pub response: Response<crate::forward::ResponseBody>,
    pub provider: usize,
    pub source: KeySource,
    /// The key's in-flight count, held until the response body ends.
    pub lease: Option<Lease>,
    /// byokd added `include_usage` to this attempt's body.
    pub asked_usage: bool,
    /// The tier candidate that answered, for a tiered alias.
    pub over: Option<Arc<Override>>,
}

/// What the attempt loop needs from the pipeline.
pub struct Attempts<'a> {
    pub providers: &'a [Arc<Provider>],
    pub keyring: &'a Keyring,
    pub metrics: &'a Metrics,
    pub upstream: &'a Upstream,
    pub route: &'a Route,
    pub tenant: &'a str,
    /// The request headers that never go upstream.
    pub strip: &'a crate::rewrite::HeaderSet,
    pub request_id: RequestId,
    pub started: Instant,
    /// For the request-model tap, set on every attempt's body (first answer wins).
    pub body_kind: Option<BodyKind>,
    pub request_model: Arc<OnceLock<Box<str>>>,
}

/// Why the attempt loop gave up: the last upstream call's failure, a rewrite that could not
/// be built, or no usable key.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Limit(#[from] crate::accept::LimitError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
}

impl From<SendError> for AttemptError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Forward(f) => Self::Forward(f),
            SendError::Limit(l) => Self::Limit(l),
        }
    }
}

/// Progress visible to the pipeline when the loop ends in an error.
#[derive(Debug, Default)]
pub struct Progress {
    pub attempts: u32,
    /// The provider last tried (labels byokd's own error).
    pub provider: Option<usize>,
}

impl Attempts<'_> {
    /// Runs the plan. `parts` is the request as received; each attempt rewrites a copy (the
    /// last one, the original).
    ///
    /// An `async` block over the arguments rather than an `async fn`, which would keep each
    /// argument twice (as passed and as its binding); and each attempt's request is built by
    /// a plain function, so its parts live on the stack, not in the future. This future is
    /// inside every request's, which is moved into place a few times per request.
    // Kept apart from `async fn` on purpose (see above).
    #[allow(clippy::manual_async_fn)]
    pub fn run<'s>(
        &'s self,
        mut plan: Plan,
        mut parts: request::Parts,
        mut payload: Payload,
        progress: &'s mut Progress,
    ) -> impl Future<Output = Result<Attempted, AttemptError>> + Send + 's {
        async move {
            let max = if payload.replayable() {
                plan.candidates.len()
            } else {
                // A body streamed to the first upstream cannot be sent again.
                1
            };
            let counted = plan.counted;
            let mut taken = false;
            // Providers that failed to connect or answer in time during this request: their
            // other keys reach the same host, so they are skipped.
            let mut down = 0u64;
            let mut candidates = plan.candidates.drain(..).take(max);
            let mut next = self.next_ready(&mut candidates, down, true).await?;
            loop {
                let (cand, credential) = match next {
                    Some(n) => n,
                    None => break,
                };
                if taken {
                    break;
                }
                let provider = &self.providers[cand.provider];
                progress.provider = Some(cand.provider);
                let last = candidates.len() == 0;
                let attempt_parts = if last {
                    taken = true;
                    std::mem::replace(&mut parts, Request::new(()).into_parts().0)
                } else {
                    clone_parts(&parts)
                };
                let (req, asked_usage) = self.prepare(
                    &cand,
                    credential.as_ref(),
                    attempt_parts,
                    &mut payload,
                    last,
                )?;
                let lease = if counted {
                    cand.load.clone().map(KeyPools::lease)
                } else {
                    None
                };
                if progress.attempts == 0 {
                    self.metrics.overhead(self.started);
                }
                progress.attempts += 1;
                let failure = match self.upstream.send(req).await {
                    Err(e) => {
                        let kind = e.kind();
                        self.metrics.upstream_error(&provider.name, kind);
                        if !e.never_sent() {
                            // Sent (or maybe sent) already: another attempt could be billed a
                            // second time, so the error is the answer.
                            return Err(e.into());
                        }
                        down |= bit(cand.provider);
                        (kind, Err(e.into()))
                    }
                    Ok(resp) => {
                        let status = resp.status();
                        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                            if let Some(r) = &cand.record {
                                self.keyring
                                    .pools()
                                    .cool_down(&r.id, crate::pool::retry_after(resp.headers()));
                            }
                            "status_429"
                        } else if status.is_server_error() {
                            "status_5xx"
                        } else {
                            return Ok(Attempted {
                                response: resp,
                                provider: cand.provider,
                                source: cand.source,
                                lease,
                                asked_usage,
                                over: cand.over,
                            });
                        };
                        self.metrics.upstream_error(&provider.name, kind);
                        (
                            kind,
                            Ok(Attempted {
                                response: resp,
                                provider: cand.provider,
                                source: cand.source,
                                lease,
                                asked_usage,
                                over: cand.over.clone(),
                            }),
                        )
                    }
                };
                // Find the next attempt before dropping this answer: if none can be made, this
                // one passes through unchanged.
                next = self.next_ready(&mut candidates, down, false).await?;
                if next.is_none() {
                    return failure.1;
                }
                tracing::info!(
                    request_id = %self.request_id, provider = %provider.name, kind = failure.0,
                    attempt = progress.attempts, "upstream attempt failed; trying the next"
                );
            }
            Err(CredentialError::NoKey(
                progress
                    .provider
                    .map_or_else(String::new, |i| self.providers[i].name.to_string()),
            )
            .into())
        }
    }

    /// One attempt's request: its body, the provider's region and signature, the rewrite,
    /// the model tap. Also whether byokd asked for usage in the body.
    fn prepare(
        &self,
        cand: &Candidate,
        credential: Option<&Credential>,
        mut parts: request::Parts,
        payload: &mut Payload,
        last: bool,
    ) -> Result<(Request<crate::forward::UpstreamBody>, bool), AttemptError> {
        let provider = &self.providers[cand.provider];
        let (mut body, asked_usage, route) = match &cand.over {
            Some(o) => {
                let (b, asked) = Payload::whole(o.body.clone(), true).body_for(
                    provider,
                    true,
                    &mut parts.headers,
                    true,
                );
                let route = Route {
                    path: Some(o.path),
                    ..*self.route
                };
                (b, asked, route)
            }
            None => {
                let (b, asked) = payload.body_for(
                    provider,
                    self.route.path.is_some(),
                    &mut parts.headers,
                    last,
                );
                (b, asked, *self.route)
            }
        };
        if let Some(region) = &provider.region {
            parts.extensions.insert(crate::provider::Scope {
                region: region.clone(),
            });
        }
        if let (true, Some(region)) = (provider.kind.signs_body(), &provider.region) {
            // A signature covers the body: it was read whole for this (a larger one is
            // refused before any attempt).
            let whole = body.whole_bytes().ok_or(ForwardError::InvalidCredential)?;
            parts.extensions.insert(crate::provider::Signing {
                region: region.clone(),
                payload_sha256: hex::encode(sha2::Sha256::digest(whole)),
            });
        }
        rewrite(&mut parts, provider, &route, credential, self.strip)?;
        if let Some(kind) = self.body_kind {
            body.tap_model(kind, self.request_model.clone());
        }
        Ok((Request::from_parts(parts, body), asked_usage))
    }

    /// The next candidate that will really be tried, with its credential: providers that
    /// went down in this request are skipped, and so (after the first) are keys that cannot
    /// be decrypted right now.
    async fn next_ready(
        &self,
        candidates: &mut impl Iterator<Item = Candidate>,
        down: u64,
        first: bool,
    ) -> Result<Option<(Candidate, Option<Credential>)>, AttemptError> {
        for cand in candidates.by_ref() {
            if down & bit(cand.provider) != 0 {
                continue;
            }
            let provider = &self.providers[cand.provider];
            match self.credential(&cand, provider).await {
                Ok(c) => return Ok(Some((cand, c))),
                // The routed provider's first key failing is the request's answer, as
                // before failover: a KMS outage is not the provider's fault.
                Err(e) if first => return Err(e.into()),
                Err(e) => tracing::warn!(
                    request_id = %self.request_id, provider = %provider.name, error = %e,
                    "failover key unavailable; skipped"
                ),
            }
        }
        Ok(None)
    }

    async fn credential(
        &self,
        cand: &Candidate,
        provider: &Provider,
    ) -> Result<Option<Credential>, CredentialError> {
        if let Some(c) = &cand.given {
            return Ok(Some(c.clone()));
        }
        if cand.environment {
            let fetch = provider
                .kind
                .environment_credential()
                .ok_or_else(|| CredentialError::NoKey(provider.name.to_string()))?;
            let value = fetch.await.map_err(|e| {
                tracing::warn!(request_id = %self.request_id, provider = %provider.name, error = %e,
                    "platform credential from the environment unavailable");
                CredentialError::Unavailable {
                    retry_after: 1,
                    source: std::sync::Arc::new(crate::keys::KeyError::Exchange(e)),
                }
            })?;
            return Ok(Some(Credential {
                value,
                record: None,
                source: KeySource::Platform,
                decrypted: false,
            }));
        }
        let Some(record) = &cand.record else {
            return Ok(None);
        };
        let mut c = self
            .keyring
            .resolve(record.clone(), cand.source, provider, self.request_id)
            .await?;
        let exchanged = match provider.auth().exchange(
            &c.value,
            self.upstream,
            provider.token_uri.as_deref(),
            provider.project.as_deref(),
        ) {
            Some(exchange) => Some(exchange.await.map_err(|e| {
                tracing::warn!(request_id = %self.request_id, provider = %provider.name, error = %e,
                    "credential exchange failed");
                CredentialError::Unavailable {
                    retry_after: 1,
                    source: Arc::new(crate::keys::KeyError::Exchange(e)),
                }
            })?),
            None => None,
        };
        if let Some(v) = exchanged {
            c.value = v;
        }
        self.metrics.key_lookup(
            self.tenant,
            &provider.name,
            c.decrypted,
            c.source == KeySource::Tenant,
        );
        Ok(Some(c))
    }
}

fn bit(provider: usize) -> u64 {
    1u64.checked_shl(provider as u32).unwrap_or(0)
}

/// A copy of the request head for one more attempt (extensions are not needed upstream).
fn clone_parts(p: &request::Parts) -> request::Parts {
    let (mut q, ()) = Request::new(()).into_parts();
    q.method = p.method.clone();
    q.uri = p.uri.clone();
    q.version = p.version;
    q.headers = p.headers.clone();
    q
}

/// `x-byokd-attempts: n`.
pub fn attempts_value(n: u32) -> HeaderValue {
    // Every answered request carries it: the usual counts need no allocation.
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(s) => HeaderValue::from_static(s),
        None => HeaderValue::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_header_values_are_the_decimal_count() {
        for n in [0, 1, 9, 10, 4_000_000_000] {
            assert_eq!(attempts_value(n).to_str().unwrap(), n.to_string());
        }
    }

    #[test]
    fn content_length_is_kept_only_when_it_says_exactly_the_length() {
        let mut h = HeaderMap::new();
        set_length(&mut h, 12);
        assert_eq!(h[header::CONTENT_LENGTH], "12");
        for (app, want) in [("12", "12"), ("13", "12"), ("+12", "12"), ("012", "012")] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, http::HeaderValue::from_static(app));
            set_length(&mut h, 12);
            assert_eq!(h[header::CONTENT_LENGTH], want, "app said {app}");
        }
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, http::HeaderValue::from_static("12"));
        h.append(header::CONTENT_LENGTH, http::HeaderValue::from_static("12"));
        set_length(&mut h, 12);
        assert_eq!(h.get_all(header::CONTENT_LENGTH).iter().count(), 1);
    }
}
