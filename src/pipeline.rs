//! Runs the steps of the data flow, in order, over one request. The only file that knows
//! the order: route ► identify ► admit ► credential ► rewrite ► forward ► meter ► record.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Request, Response};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;

use crate::accept::LimitError;
use crate::accept::Peer;
use crate::admit::admit;
use crate::config::{Config, IdentitySource};
use crate::error::ProxyError;
use crate::failover::Payload;
use crate::forward::ForwardError;
use crate::forward::Upstream;
use crate::identify::{identify, user_key};
use crate::keys::CredentialError;
use crate::keys::{KeySource, Keyring};
use crate::meter::ResponseBody;
use crate::metrics::Metrics;
use crate::provider::{CompatEndpoint, ErrorShape, Provider, openai_wire};
use crate::record::Recorder;
use crate::rewrite::{strip_hop_by_hop, strip_own_headers};
use crate::route::{ByModel, Target, check_method, route};
use crate::stream_usage::{
    BodyKind, Peeked, RequestBody, StripUsage, read_bounded, speech_characters,
};
use crate::timeouts::Side;
use crate::usage::{Capability, scanner_for_capability};
use crate::vocab::{ErrorChain, RequestId};

/// What the data listener answers with: a metered upstream body or byokd's own error.
pub type ProxyBody = Either<ResponseBody<crate::forward::ResponseBody>, Full<Bytes>>;

/// Per-request state shared by the steps.
#[derive(Debug)]
struct RequestCtx {
    id: RequestId,
    started: Instant,
    shape: ErrorShape,
    tenant: Option<Arc<str>>,
    /// The end user inside the tenant, when the request names one.
    end_user: Option<Arc<str>>,
    provider: Option<Arc<Provider>>,
    /// Upstream attempts made so far (failover), for `x-byokd-attempts`.
    progress: crate::failover::Progress,
}

/// Everything a request needs, built once at start.
#[derive(Debug)]
pub struct Proxy {
    pub config: Arc<Config>,
    pub keyring: Arc<Keyring>,
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub policy: Arc<crate::policy::Policy>,
    /// Request headers stripped before forwarding (identity headers among them).
    strip: crate::rewrite::HeaderSet,
    /// Request-body bytes held in memory across all connections.
    buffers: crate::accept::BufferBudget,
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        keyring: Arc<Keyring>,
        metrics: Arc<Metrics>,
        upstream: Upstream,
        policy: Arc<crate::policy::Policy>,
    ) -> Self {
        let tenant_headers: Vec<HeaderName> = config
            .identity
            .iter()
            .flat_map(|s| match s {
                IdentitySource::Header { name, .. } => vec![name.clone()],
                IdentitySource::Passthrough {
                    key_header,
                    provider_header,
                } => vec![key_header.clone(), provider_header.clone()],
                IdentitySource::Bearer | IdentitySource::Mtls(_) => vec![],
            })
            .chain((!config.end_user.forward).then(|| config.end_user.header.clone()))
            .collect();
        let buffers = crate::accept::BufferBudget::new(config.limits.max_buffered_bytes);
        Self {
            config,
            keyring,
            metrics,
            upstream,
            policy,
            strip: crate::rewrite::HeaderSet::request(&tenant_headers),
            buffers,
        }
    }

    /// Answers one request. Never fails: errors become provider-shaped responses.
    /// Takes its `Arc`s by value so the listener can call it without an `async` wrapper,
    /// which would make every request's future twice the size.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<ProxyBody> {
        let mut ctx = RequestCtx {
            id: RequestId::new(),
            started: Instant::now(),
            shape: ErrorShape::default(),
            tenant: None,
            end_user: None,
            provider: None,
            progress: Default::default(),
        };
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        match self.run(parts, &mut body, &peer, &mut ctx).await {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(b) = body {
                    self.discard(b).await;
                }
                self.reject(&ctx, &e)
            }
        }
    }

    /// Reads and drops what is left of a small request body before byokd answers it itself.
    /// An HTTP/2 stream answered while the client is still sending is reset, and clients then
    /// lose the answer (curl: "stream was not closed cleanly"); a large or slow body is left
    /// unread after a short bound.
    async fn discard(&self, mut body: Incoming) {
        const MAX_DISCARD: u64 = 256 * 1024;
        use http_body::Body as _;
        use http_body_util::BodyExt as _;
        if body.is_end_stream() || body.size_hint().lower() > MAX_DISCARD {
            return;
        }
        let wait = self
            .config
            .limits
            .body_timeout
            .min(std::time::Duration::from_secs(1));
        let _ = tokio::time::timeout(wait, async {
            let mut seen = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                seen += f.data_ref().map_or(0, |d| d.len() as u64);
                if seen > MAX_DISCARD {
                    break;
                }
            }
        })
        .await;
    }

    fn reject(&self, ctx: &RequestCtx, e: &ProxyError) -> Response<ProxyBody> {
        let tenant = ctx.tenant.as_deref().unwrap_or("");
        let provider = ctx.provider.as_ref().map_or("", |p| &*p.name);
        let end_user = ctx.end_user.as_deref();
        self.metrics
            .rejected(tenant, provider, e.code(), e.status());
        match e.blame() {
            crate::error::Blame::Client => tracing::info!(
                target: "byokd::access", request_id = %ctx.id, tenant, end_user, provider,
                status = e.status().as_u16(), error = e.code(), detail = %e,
            ),
            _ => tracing::warn!(
                target: "byokd::access", request_id = %ctx.id, tenant, end_user, provider,
                status = e.status().as_u16(), error = e.code(), detail = %ErrorChain(e),
            ),
        }
        let mut resp = e.to_response(ctx.shape, &ctx.id.to_string());
        if ctx.progress.attempts > 0 {
            resp.headers_mut().insert(
                crate::failover::ATTEMPTS_HEADER,
                crate::failover::attempts_value(ctx.progress.attempts),
            );
        }
        resp.map(Either::Right)
    }

    /// The steps in order. `body` is taken when the request is forwarded; while it is still
    /// there, nothing of it was read.
    ///
    /// An `async` block over the arguments rather than an `async fn`, which would keep `parts`
    /// twice (as passed and as its binding) in the future every request moves around.
    #[allow(clippy::manual_async_fn)]
    fn run<'s>(
        &'s self,
        parts: http::request::Parts,
        body: &'s mut Option<Incoming>,
        peer: &'s Peer,
        ctx: &'s mut RequestCtx,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 's {
        async move {
            let cfg = &*self.config;

            // route
            let mut route = self.route(&parts, ctx)?;
            let declared = declared_length(&parts.headers);

            // identify
            let snapshot = self.keyring.snapshot();
            let tenant = identify(
                &cfg.identity,
                &cfg.tenants,
                &snapshot,
                &parts.headers,
                peer,
                cfg.open_tenants,
            )?;
            drop(snapshot);
            ctx.tenant = Some(tenant.clone());
            let policy = cfg.policy(&tenant);
            let mut end_user = crate::identify::end_user(&cfg.end_user, &parts.headers)?;
            // Held until the upstream answered: the buffered body may be sent again on failover.
            let mut permit = self.buffers.permit();
            // route by model: a `/v1` chat or embeddings body read first, when its `model` may
            // name another provider (`provider/model` or an alias).
            let mut early = None;
            let mut tier = None;
            let mut known = BodyKnown::default();
            let idx = match route.target {
                Target::Default => match CompatEndpoint::of_path(parts.uri.path())
                    .filter(|_| parts.method == http::Method::POST)
                {
                    Some(ep) => {
                        let incoming = body.take().ok_or(LimitError::ClientClosed)?;
                        let (peeked, routed, t, k) = self
                            .by_model(incoming, ep, &mut permit, (&tenant, policy))
                            .await?;
                        early = Some(peeked);
                        known = k;
                        tier = t;
                        match routed {
                            Some((i, path)) => {
                                route.target = Target::Named(i);
                                route.path = Some(path);
                                i
                            }
                            None => policy.default_provider,
                        }
                    }
                    None => policy.default_provider,
                },
                Target::Named(i) => i,
                Target::Usage => {
                    let user = match query_value(parts.uri.query(), "end_user") {
                        Some(u) => Some(crate::identify::valid_end_user(&u)?),
                        None => None,
                    };
                    return Ok(self.usage(&tenant, user.as_deref()).map(Either::Right));
                }
            };
            let by_model = route.path.is_some();
            let provider = cfg.providers[idx].clone();
            // The end user from an OpenAI-wire body's `user` / `safety_identifier`, when allowed
            // and the header named none: the body is then read before admit.
            if end_user.is_none()
                && cfg.end_user.from_body
                && parts.method == http::Method::POST
                && (by_model || provider.kind.wire() == "openai")
            {
                if early.is_none() {
                    let incoming = body.take().ok_or(LimitError::ClientClosed)?;
                    early = Some(
                        self.read_inspected(self.limited(incoming), &mut permit)
                            .await?,
                    );
                }
                if let Some(Peeked::Whole(b)) = &early {
                    end_user = crate::identify::body_end_user(b)?;
                }
            }
            if end_user.is_none() && policy.require_end_user {
                return Err(crate::identify::IdentifyError::EndUserRequired(
                    cfg.end_user.header.clone(),
                )
                .into());
            }
            ctx.end_user = end_user.clone();
            // A request routed by model speaks the OpenAI wire whichever provider answers it.
            let (dialect, shape) = if by_model {
                openai_wire()
            } else {
                let path = route.upstream_path(parts.uri.path());
                (provider.kind.usage_at(path), provider.kind.errors_at(path))
            };
            ctx.shape = shape;
            ctx.provider = Some(provider.clone());

            // admit
            let mut admission = self
                .admit(
                    declared,
                    (&tenant, end_user.as_ref()),
                    policy,
                    (idx, &provider),
                    ctx,
                )
                .await?;

            // credential: the end user's own key if sent (and allowed), else the tenant's key
            // pool and failover chain; each attempt below decrypts the key it uses.
            let plan = match &tier {
                Some(t) => self.tier_plan(&parts, &tenant, policy, t)?,
                None if by_model => self
                    .plan(&parts, &tenant, policy, (idx, &provider))?
                    .only(idx),
                None => self.plan(&parts, &tenant, policy, (idx, &provider))?,
            };

            // forward: the body (read first when byokd must look inside or may resend it), the
            // budget reservation, then the attempts.
            let budgeted = admission
                .as_ref()
                .is_some_and(crate::policy::Admission::budgeted);
            let facts = Facts::of(
                &parts,
                declared,
                budgeted,
                &provider,
                by_model,
                known.streams,
            );
            let body = match early {
                Some(peeked) => Body::Read(peeked),
                None => Body::Unread(body.take().ok_or(LimitError::ClientClosed)?),
            };
            let (payload, read) = self
                .payload(body, &facts, plan.can_retry(), &mut permit)
                .await?;
            let cut = match admission.as_mut() {
                Some(a) if a.budgeted() => {
                    let path = route.upstream_path(parts.uri.path());
                    self.reserve(a, (&provider, shape), path, &facts, read.estimate)
                        .await?
                }
                _ => None,
            };
            let request_model = Arc::new(std::sync::OnceLock::new());
            // APIs that name the model in the path: the label comes from there.
            if let Some(m) = provider
                .kind
                .path_model(route.upstream_path(parts.uri.path()))
            {
                let _ = request_model.set(m.into_boxed_str());
            } else if let Some(m) = known.model.take() {
                let _ = request_model.set(m);
            }
            let body_kind = BodyKind::of(content_type(&parts.headers));
            let outcome = self
                .attempts(&route, &tenant, ctx, body_kind, request_model.clone())
                .run(plan, parts, payload, &mut ctx.progress)
                .await;
            if let Some(i) = ctx.progress.provider {
                ctx.provider = Some(cfg.providers[i].clone());
            }
            let done = outcome?;
            self.metrics.first_byte(done.provider, ctx.started);
            let chosen = done.over.clone();
            if let (Some(t), Some(o)) = (&tier, &chosen) {
                let us = u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX);
                t.route.candidates[o.tier].observe(us);
                self.metrics.model_choice(&t.alias, &o.label);
            }
            drop(permit);

            // meter + record
            let metered = Metered {
                dialect,
                tenant,
                end_user,
                capability: facts.capability,
                characters: read.characters,
                request_model,
                admission,
                cut,
            };
            let mut resp = self.respond(done, metered, ctx).await?;
            if let Some(v) = chosen.and_then(|o| http::HeaderValue::from_str(&o.label).ok()) {
                resp.headers_mut().insert(MODEL_HEADER, v);
            }
            Ok(resp)
        }
    }

    /// The forward step's attempt loop for this request.
    fn attempts<'a>(
        &'a self,
        route: &'a crate::route::Route,
        tenant: &'a Arc<str>,
        ctx: &RequestCtx,
        body_kind: Option<BodyKind>,
        request_model: Arc<std::sync::OnceLock<Box<str>>>,
    ) -> crate::failover::Attempts<'a> {
        crate::failover::Attempts {
            providers: &self.config.providers,
            keyring: &self.keyring,
            metrics: &self.metrics,
            upstream: &self.upstream,
            route,
            tenant,
            strip: &self.strip,
            request_id: ctx.id,
            started: ctx.started,
            body_kind,
            request_model,
        }
    }

    /// The route step, with the request-level checks that come before any lookup: one `Host`
    /// (HTTP/1.1), a proxied method, header limits. It also fixes the error shape the app's
    /// SDK expects.
    fn route(
        &self,
        parts: &http::request::Parts,
        ctx: &mut RequestCtx,
    ) -> Result<crate::route::Route, ProxyError> {
        let cfg = &*self.config;
        if !crate::accept::host_ok(parts.version, &parts.headers) {
            return Err(crate::route::RouteError::BadHost.into());
        }
        check_method(&parts.method)?;
        let route = route(&cfg.providers, parts.uri.path())?;
        if let Target::Named(i) = route.target {
            ctx.shape = cfg.providers[i].error_shape();
        }
        check_header_limits(&parts.headers, cfg)?;
        Ok(route)
    }

    /// The request body as it will be sent: streamed, or read first (whole, up to
    /// `MAX_INSPECTED_BODY`) when byokd must look inside (OpenAI-wire streaming chat, to ask
    /// for usage; text-to-speech, billed by the request's `input`; a budget, whose reservation
    /// needs the model and output cap) or may have to send it again (a second key or a
    /// failover chain). A larger body gets a single attempt.
    async fn payload(
        &self,
        body: Body,
        facts: &Facts,
        may_retry: bool,
        permit: &mut crate::accept::BufferPermit<'_>,
    ) -> Result<(Payload, BodyRead), LimitError> {
        let mut read = BodyRead {
            characters: 0,
            estimate: Estimate {
                len: facts.declared_length,
                body: None,
            },
        };
        let peeked = match body {
            Body::Read(peeked) => peeked,
            Body::Unread(body) => {
                let limited = self.limited(body);
                if !(facts.usage_edit
                    || facts.speech
                    || may_retry
                    || facts.budgeted
                    || facts.signed)
                {
                    return Ok((Payload::Once(Some(RequestBody::streaming(limited))), read));
                }
                self.read_inspected(limited, permit).await?
            }
        };
        let payload = match peeked {
            Peeked::Whole(b) => {
                if facts.budgeted {
                    read.estimate = Estimate {
                        len: b.len() as u64,
                        body: Some(b.clone()),
                    };
                }
                if facts.speech {
                    read.characters = speech_characters(&b);
                }
                Payload::whole(b, facts.chat_path)
            }
            // A signature needs the whole body's hash: past the inspection bound it cannot
            // be signed without holding all of it.
            Peeked::Partial(_) if facts.signed => {
                return Err(LimitError::BodyTooLarge(
                    crate::stream_usage::MAX_INSPECTED_BODY as u64,
                ));
            }
            Peeked::Partial(rb) => Payload::Once(Some(*rb)),
        };
        Ok((payload, read))
    }

    /// The client body behind its stall timeout and size limit.
    fn limited(&self, body: Incoming) -> Limited<crate::timeouts::ClientBody> {
        let limits = &self.config.limits;
        Limited::new(
            crate::timeouts::ClientBody::new(body, limits.body_timeout, Side::Client),
            limits.max_body_bytes as usize,
        )
    }

    /// Reads the body whole up to the inspection bound (a larger one streams on behind what
    /// was read), each failure named for the client.
    async fn read_inspected(
        &self,
        limited: Limited<crate::timeouts::ClientBody>,
        permit: &mut crate::accept::BufferPermit<'_>,
    ) -> Result<Peeked, LimitError> {
        let max_body = self.config.limits.max_body_bytes;
        read_bounded(limited, permit).await.map_err(|e| {
            if crate::forward::body_too_large(e.as_ref()) {
                LimitError::BodyTooLarge(max_body)
            } else if crate::timeouts::client_stalled(e.as_ref()) {
                LimitError::BodyTimeout
            } else if e.is::<crate::accept::BufferFull>() {
                LimitError::Overloaded
            } else {
                LimitError::ClientClosed
            }
        })
    }

    /// Route by model: reads a `/v1` chat or embeddings body (bounded) and, when its `model`
    /// is `provider/model` or a `models:` alias, names that provider and its OpenAI-compatible
    /// path and rewrites the body's `model` (and nothing else). A provider without such an
    /// endpoint is a 400 naming its native route.
    /// An alias with several candidates becomes a [`Tier`]: the candidates the tenant may
    /// use, in the alias's rule order, each with its own body.
    async fn by_model(
        &self,
        body: Incoming,
        ep: CompatEndpoint,
        permit: &mut crate::accept::BufferPermit<'_>,
        (tenant, policy): (&str, &crate::policy::TenantPolicy),
    ) -> Result<ModelRouted, ProxyError> {
        let cfg = &*self.config;
        let peeked = self.read_inspected(self.limited(body), permit).await?;
        let Peeked::Whole(b) = &peeked else {
            return Ok((peeked, None, None, BodyKnown::default()));
        };
        let head = crate::route::body_head(b);
        let mut known = BodyKnown {
            streams: head.streams,
            model: None,
        };
        let Some((model, at)) = head.model else {
            return Ok((peeked, None, None, known));
        };
        let (idx, name) = match crate::route::by_model(&cfg.providers, &cfg.models, &model) {
            None => {
                known.model = crate::stream_usage::model_label(model);
                return Ok((peeked, None, None, known));
            }
            Some(ByModel::Provider(i, m)) => (i, m),
            Some(ByModel::Alias(r)) if r.candidates.len() > 1 => {
                if let Some(tier) = self.tier(r, &model, ep, b, at.clone(), (tenant, policy)) {
                    let first = &tier.overs[0];
                    let idx = r.candidates[first.tier].provider;
                    let routed = (idx, first.path);
                    // Each candidate's body names its own model: the label comes from the
                    // one sent.
                    return Ok((
                        Peeked::Whole(first.body.clone()),
                        Some(routed),
                        Some(tier),
                        known,
                    ));
                }
                (r.candidates[0].provider, &*r.candidates[0].model)
            }
            Some(ByModel::Alias(r)) => (r.candidates[0].provider, &*r.candidates[0].model),
        };
        let provider = &cfg.providers[idx];
        let path = provider
            .openai_compat(ep)
            .ok_or_else(|| crate::route::RouteError::NoCompatEndpoint(provider.name.to_string()))?;
        let rewritten = crate::route::with_model(b, at, name);
        known.model = crate::stream_usage::model_label(name.to_string());
        Ok((Peeked::Whole(rewritten), Some((idx, path)), None, known))
    }

    /// The candidates of alias `r` the tenant may use, in its rule's order: allowed, with an
    /// OpenAI-compatible endpoint for `ep`, and a key (its own or the platform's). `None`
    /// when none qualifies: the first candidate is then tried alone, and its error answers.
    fn tier(
        &self,
        r: &Arc<crate::route::ModelRoute>,
        alias: &str,
        ep: CompatEndpoint,
        body: &[u8],
        at: std::ops::Range<usize>,
        (tenant, policy): (&str, &crate::policy::TenantPolicy),
    ) -> Option<Tier> {
        let cfg = &*self.config;
        let price = |c: &crate::route::TierCandidate| {
            let p = self
                .metrics
                .pricing
                .price(&cfg.providers[c.provider].name, &c.model)?;
            Some(p.input.saturating_add(p.output))
        };
        let snap = self.keyring.snapshot();
        let now = crate::vocab::unix_now();
        let has_key = |p: &Provider| {
            !p.kind.requires_key()
                || snap.key_for(tenant, &p.name, now).is_some()
                || (policy.platform_fallback
                    && snap
                        .key_for(crate::keys::PLATFORM_TENANT, &p.name, now)
                        .is_some())
        };
        let overs: Vec<Arc<crate::failover::Override>> = r
            .ordered(price)
            .into_iter()
            .filter_map(|i| {
                let c = &r.candidates[i];
                let provider = &cfg.providers[c.provider];
                if !policy.allows(c.provider) || !has_key(provider) {
                    return None;
                }
                Some(Arc::new(crate::failover::Override {
                    path: provider.openai_compat(ep)?,
                    body: crate::route::with_model(body, at.clone(), &c.model),
                    tier: i,
                    label: format!("{}/{}", provider.name, c.model).into(),
                }))
            })
            .collect();
        (!overs.is_empty()).then(|| Tier {
            alias: alias.into(),
            route: r.clone(),
            overs,
        })
    }

    /// A tiered alias's plan: each candidate's keys in turn, each with its own body.
    fn tier_plan(
        &self,
        parts: &http::request::Parts,
        tenant: &Arc<str>,
        policy: &crate::policy::TenantPolicy,
        tier: &Tier,
    ) -> Result<crate::failover::Plan, ProxyError> {
        let cfg = &*self.config;
        let mut plan: Option<crate::failover::Plan> = None;
        let mut first_err = None;
        for o in &tier.overs {
            let idx = tier.route.candidates[o.tier].provider;
            match self.plan(parts, tenant, policy, (idx, &cfg.providers[idx])) {
                Ok(p) => {
                    let p = p.only(idx).over(o.clone());
                    plan = Some(match plan {
                        Some(before) => before.then(p),
                        None => p,
                    });
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (plan, first_err) {
            (Some(p), _) => Ok(p),
            (None, Some(e)) => Err(e),
            (None, None) => Err(CredentialError::NoKey(String::new()).into()),
        }
    }

    /// The allow-list, the rate limits (an admission held until the response ends) and the
    /// declared body size.
    async fn admit(
        &self,
        declared: Option<u64>,
        (tenant, end_user): (&Arc<str>, Option<&Arc<str>>),
        policy: &crate::policy::TenantPolicy,
        (idx, provider): (usize, &Provider),
        ctx: &RequestCtx,
    ) -> Result<Option<crate::policy::Admission>, ProxyError> {
        admit(policy, idx, provider)?;
        let admission = self
            .policy
            .admit(
                tenant,
                end_user,
                (&provider.name, idx),
                policy,
                ctx.id.as_u64(),
            )
            .await?;
        let max_body = self.config.limits.max_body_bytes;
        if declared.is_some_and(|n| n > max_body) {
            return Err(LimitError::BodyTooLarge(max_body).into());
        }
        Ok(admission)
    }

    /// The credentials to try, in order: the end user's own key, or the tenant's key pool
    /// and failover chain.
    fn plan(
        &self,
        parts: &http::request::Parts,
        tenant: &Arc<str>,
        policy: &crate::policy::TenantPolicy,
        (idx, provider): (usize, &Provider),
    ) -> Result<crate::failover::Plan, ProxyError> {
        let cfg = &*self.config;
        Ok(match user_key(&cfg.identity, &parts.headers) {
            Some((for_provider, key)) => crate::failover::Plan::given(
                idx,
                user_credential(policy, provider, for_provider, key)?,
            ),
            None => crate::failover::plan(&self.keyring, &cfg.providers, policy, tenant, idx)?,
        })
    }

    /// Reserves the request's worst case against the budget before it leaves, and plans the
    /// stream cut when the budget says `on_exhausted: cut`.
    async fn reserve(
        &self,
        admission: &mut crate::policy::Admission,
        (provider, shape): (&Provider, ErrorShape),
        path: &str,
        facts: &Facts,
        estimate: Estimate,
    ) -> Result<Option<crate::cut::CutPlan>, ProxyError> {
        let (model, max_out) = crate::route::head::with_members(estimate.body.as_deref(), |m| {
            provider.model_and_output_cap(m, path)
        });
        let price = model
            .as_deref()
            .and_then(|m| self.metrics.pricing.price(&provider.name, m));
        let nanos = if facts.is_post {
            let default_out = admission.default_max_tokens().unwrap_or(4096);
            crate::policy::estimate(price, estimate.len, max_out, default_out)
        } else {
            0
        };
        admission.reserve(nanos, crate::vocab::unix_now()).await?;
        let (Some(allowance), Some(price)) = (admission.allowance(), price) else {
            return Ok(None);
        };
        let input_tokens = estimate.len.div_ceil(4);
        Ok(Some(crate::cut::CutPlan {
            allowance,
            input_nanos: input_tokens.saturating_mul(price.input),
            output_nanos_per_token: price.output,
            shape,
            state: Arc::new(crate::cut::CutState {
                input_tokens,
                ..Default::default()
            }),
        }))
    }

    /// The answer the app gets: the upstream's head (hop-by-hop and `x-byokd-*` removed,
    /// `x-byokd-attempts` added) and its body streaming through the meter. The body's first
    /// frame is awaited before the head goes back, so an upstream that fails before sending
    /// anything is answered 502, not with a bare closed connection.
    async fn respond(
        &self,
        done: crate::failover::Attempted,
        metered: Metered,
        ctx: &RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let provider = &self.config.providers[done.provider];
        let (mut rparts, mut rbody) = done.response.into_parts();
        rbody.prime().await.map_err(ForwardError::BodyFailed)?;
        strip_hop_by_hop(&mut rparts.headers);
        // Only byokd may say `x-byokd-error`: an upstream must not forge byokd's verdicts.
        strip_own_headers(&mut rparts.headers);
        // byokd asks for identity (see rewrite); an upstream that compresses anyway passes
        // through unscanned and is counted, since scanning compressed bytes finds nothing.
        let compressed = rparts
            .headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        let ok = rparts.status.is_success() && !compressed;
        let ct = content_type(&rparts.headers);
        let event_stream = ct.is_some_and(|v| v.starts_with(b"text/event-stream"));
        // Only an event stream can be cut cleanly; a JSON body is whole or nothing. A binary
        // event stream is cut between its messages, if its wire has an error message to end
        // it with.
        let framed_stream =
            ct.is_some_and(|v| v.starts_with(b"application/vnd.amazon.eventstream"));
        let scanner = if ok {
            scanner_for_capability(metered.dialect, metered.capability, ct)
        } else {
            crate::usage::Scanner::Off
        };
        let recorder = Recorder {
            metrics: self.metrics.clone(),
            tenant: metered.tenant,
            end_user: metered.end_user,
            provider: provider.name.clone(),
            provider_idx: done.provider,
            status: rparts.status,
            started: ctx.started,
            request_id: ctx.id,
            key_source: done.source,
            price: None,
            capability: metered.capability,
            request_model: metered.request_model,
            characters: metered.characters,
            compressed,
            admission: metered.admission,
            cut: metered.cut.as_ref().map(|p| p.state.clone()),
            header_usage: ok
                .then(|| provider.kind.header_usage(&rparts.headers))
                .flatten(),
        };
        let sse = ok && event_stream;
        // The app never asked for usage, so its stream must not carry any.
        let strip = done.asked_usage && sse;
        if strip {
            rparts.headers.remove(header::CONTENT_LENGTH);
        }
        rparts.headers.insert(
            crate::failover::ATTEMPTS_HEADER,
            crate::failover::attempts_value(ctx.progress.attempts),
        );
        let cut = metered.cut.filter(|p| {
            rparts.status.is_success() && (event_stream || (framed_stream && p.shape.framed()))
        });
        let body = ResponseBody::new(
            rbody,
            done.lease,
            cut.map(crate::cut::CutFilter::new),
            scanner,
            recorder,
            strip.then(StripUsage::new),
        );
        Ok(Response::from_parts(rparts, Either::Left(body)))
    }
}

/// What the request's method, path and headers say about how its body must be handled.
struct Facts {
    is_post: bool,
    /// What the endpoint bills in. Every billed call is a POST; a GET of the same path lists
    /// or fetches stored objects.
    capability: Capability,
    /// A POST to `/chat/completions` that may stream. A body already read and found not to
    /// stream is not one: it needs no `include_usage`, nor a second parse to find that out.
    chat_path: bool,
    /// A streaming chat to a provider that wants `include_usage` added: the body is read.
    usage_edit: bool,
    speech: bool,
    /// The tenant has a budget: the reservation needs the body's model and output cap.
    budgeted: bool,
    /// The provider signs requests over their body (SigV4): it is read whole.
    signed: bool,
    declared_length: u64,
}

impl Facts {
    /// `by_model`: routed by model to an OpenAI-compatible endpoint, which takes
    /// `include_usage` whatever the provider's native API does. `streams`: what reading the
    /// body for routing found, if it was read.
    fn of(
        parts: &http::request::Parts,
        declared: Option<u64>,
        budgeted: bool,
        provider: &Provider,
        by_model: bool,
        streams: Option<bool>,
    ) -> Self {
        let is_post = parts.method == http::Method::POST;
        let path = parts.uri.path();
        let capability = if is_post {
            Capability::of_path(path)
        } else {
            Capability::Other
        };
        let chat_path = is_post && path.ends_with("/chat/completions") && streams != Some(false);
        Self {
            is_post,
            capability,
            chat_path,
            usage_edit: chat_path && (provider.stream_usage || by_model),
            speech: is_post && capability == Capability::Speech,
            budgeted: is_post && budgeted,
            signed: provider.kind.signs_body(),
            declared_length: declared.unwrap_or(0),
        }
    }
}

/// What the meter and the recorder need from the request side.
struct Metered {
    /// The usage dialect of the response: the provider's, or the OpenAI wire's when the
    /// request was routed by model.
    dialect: crate::usage::DialectRef,
    tenant: Arc<str>,
    end_user: Option<Arc<str>>,
    capability: Capability,
    characters: u64,
    request_model: Arc<std::sync::OnceLock<Box<str>>>,
    admission: Option<crate::policy::Admission>,
    cut: Option<crate::cut::CutPlan>,
}

/// What routing by model found: the body (rewritten for the chosen provider), that provider
/// and its endpoint, and for an alias with several candidates, all of them.
type ModelRouted = (
    Peeked,
    Option<(usize, &'static str)>,
    Option<Tier>,
    BodyKnown,
);

/// What reading the body for routing learnt, so that later steps need not parse it again.
#[derive(Debug, Default)]
struct BodyKnown {
    /// Whether the body asks for a stream, when known.
    streams: Option<bool>,
    /// The model the body sent upstream names, as the meter's label.
    model: Option<Box<str>>,
}

/// The candidates of a tiered alias this request may try, in order.
struct Tier {
    alias: Box<str>,
    route: Arc<crate::route::ModelRoute>,
    overs: Vec<Arc<crate::failover::Override>>,
}

/// Response header naming the candidate of a tiered alias that answered: `provider/model`.
const MODEL_HEADER: http::HeaderName = http::HeaderName::from_static("x-byokd-model");

/// The request body as the forward step gets it.
enum Body {
    /// Not touched yet.
    Unread(Incoming),
    /// Read for routing by model (whole, or the head of a larger body).
    Read(Peeked),
}

/// What reading the body found out.
struct BodyRead {
    /// Text-to-speech: characters of the request's `input`.
    characters: u64,
    estimate: Estimate,
}

/// The inputs of a budget reservation: body size, output cap and model.
struct Estimate {
    len: u64,
    /// The whole body, when it was read: the model and output cap come from it.
    body: Option<Bytes>,
}

fn content_type(h: &http::HeaderMap) -> Option<&[u8]> {
    h.get(header::CONTENT_TYPE).map(|v| v.as_bytes())
}

impl Proxy {
    /// `GET /byokd/usage` (and the admin API's per-tenant usage): this month's totals and the
    /// tenant's policy; with `end_user`, that end user's totals and the per-user policy.
    pub fn usage(&self, tenant: &str, end_user: Option<&str>) -> Response<Full<Bytes>> {
        let body = match end_user {
            Some(u) => self.end_user_usage(tenant, u),
            None => self.tenant_usage(tenant),
        };
        let mut resp = Response::new(Full::new(Bytes::from(
            serde_json::to_vec(&body).unwrap_or_default(),
        )));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        resp
    }

    fn end_user_usage(&self, tenant: &str, user: &str) -> serde_json::Value {
        let policy = self.config.policy(tenant);
        let subject = crate::policy::end_user_subject(tenant, user);
        let month = self
            .metrics
            .ledger
            .month(&subject, crate::vocab::unix_now());
        let limits = serde_json::json!({
            "rate": policy.end_user_limits.as_deref().map(rate_json),
            "budget": policy.end_user_budget.as_ref().map(|b| budget_json(b, &month)),
            "required": policy.require_end_user,
        });
        let mut body = crate::ledger::usage_json(tenant, &month, limits);
        body["end_user"] = user.into();
        body
    }

    /// The month's end users of `tenant`, top spenders first, `limit` from `offset`.
    pub fn end_users_page(&self, tenant: &str, offset: usize, limit: usize) -> serde_json::Value {
        let now = crate::vocab::unix_now();
        let mut users = self.metrics.ledger.end_users(tenant, now);
        users.sort_by(|(a, ma), (b, mb)| mb.cost_nanos().cmp(&ma.cost_nanos()).then(a.cmp(b)));
        let total = users.len();
        let page: Vec<serde_json::Value> = users
            .iter()
            .skip(offset)
            .take(limit)
            .map(|(u, m)| {
                let t = m.providers.values().flat_map(|ms| ms.values()).fold(
                    crate::ledger::Totals::default(),
                    |mut acc, t| {
                        acc.merge(t);
                        acc
                    },
                );
                serde_json::json!({
                    "end_user": u,
                    "requests": t.requests,
                    "input_tokens": t.input + t.cached_input + t.cache_write,
                    "output_tokens": t.output + t.reasoning,
                    "cost_usd": crate::ledger::usd(t.cost_nanos),
                })
            })
            .collect();
        let next = (offset + page.len() < total).then_some(offset + page.len());
        serde_json::json!({
            "tenant": tenant,
            "period": crate::vocab::clock::month_of(now),
            "end_users": page,
            "total": total,
            "next_offset": next,
        })
    }

    fn tenant_usage(&self, tenant: &str) -> serde_json::Value {
        let cfg = &*self.config;
        let policy = cfg.policy(tenant);
        let allowed: Vec<&str> = cfg
            .providers
            .iter()
            .enumerate()
            .filter(|(i, _)| policy.allows(*i))
            .map(|(_, p)| &*p.name)
            .collect();
        let month = self.metrics.ledger.month(tenant, crate::vocab::unix_now());
        let per_provider: serde_json::Map<String, serde_json::Value> = policy
            .provider_limits
            .iter()
            .filter_map(|(i, l)| Some((cfg.providers.get(*i)?.name.to_string(), rate_json(l))))
            .collect();
        let limits = serde_json::json!({
            "default_provider": cfg.providers.get(policy.default_provider).map(|p| &*p.name),
            "allowed_providers": allowed,
            "fallback": if policy.platform_fallback { vec!["platform"] } else { vec![] },
            "rate": policy.limits.as_deref().map(rate_json),
            "rate_per_provider": per_provider,
            "budget": policy.budget.as_ref().map(|b| budget_json(b, &month)),
            "end_user": {
                "rate": policy.end_user_limits.as_deref().map(rate_json),
                "monthly_usd": policy.end_user_budget.as_ref().map(|b| crate::ledger::usd(b.monthly_nanos)),
                "required": policy.require_end_user,
            },
        });
        crate::ledger::usage_json(tenant, &month, limits)
    }
}

fn rate_json(l: &crate::policy::LimitSpec) -> serde_json::Value {
    serde_json::json!({
        "requests_per_minute": l.requests_per_minute,
        "tokens_per_minute": l.tokens_per_minute,
        "concurrent": l.concurrent,
    })
}

fn budget_json(
    b: &crate::policy::BudgetSpec,
    month: &crate::ledger::TenantMonth,
) -> serde_json::Value {
    let spent = month.cost_nanos();
    serde_json::json!({
        "monthly_usd": crate::ledger::usd(b.monthly_nanos),
        "spent_usd": crate::ledger::usd(spent),
        "remaining_usd": crate::ledger::usd(b.monthly_nanos.saturating_sub(spent)),
        "alert_at": b.alert_at,
        "on_exhausted": if b.cut { "cut" } else { "reject" },
        "resets_at": crate::vocab::clock::next_month_start(&month.period),
    })
}

/// One query parameter, percent-decoded.
fn query_value(q: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(q?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A credential from the end user's key header: checked, used for this request, never kept.
fn user_credential(
    policy: &crate::policy::TenantPolicy,
    provider: &Provider,
    for_provider: &[u8],
    key: &[u8],
) -> Result<crate::keys::Credential, CredentialError> {
    if !policy.passthrough {
        return Err(CredentialError::PassthroughNotAllowed);
    }
    if for_provider != provider.name.as_bytes() {
        return Err(CredentialError::BadUserKey(format!(
            "the user provider header must name the provider this route goes to, `{}`",
            provider.name
        )));
    }
    let key = std::str::from_utf8(key)
        .map_err(|_| CredentialError::BadUserKey("not printable ASCII".into()))?;
    provider
        .check_key_format(key)
        .map_err(CredentialError::BadUserKey)?;
    Ok(crate::keys::Credential {
        value: provider.auth().credential(key.as_bytes()),
        record: None,
        source: KeySource::User,
        decrypted: false,
    })
}

fn declared_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn check_header_limits(h: &http::HeaderMap, cfg: &Config) -> Result<(), LimitError> {
    if h.len() > cfg.limits.max_headers {
        return Err(LimitError::HeadersTooLarge);
    }
    let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum();
    if bytes > cfg.limits.max_header_bytes {
        return Err(LimitError::HeadersTooLarge);
    }
    Ok(())
}
