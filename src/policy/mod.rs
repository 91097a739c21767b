//! Rate limits and budgets, the state behind the admit step: requests and tokens per minute
//! and concurrent requests per tenant and per (tenant, provider), and a monthly budget per
//! tenant with a reservation taken before a request leaves and settled to the metered cost
//! when its response ends.
//!
//! Without `shared_state` the state is this process's (sharded maps, a lock per tenant, never
//! a global one). With `shared_state.redis` it is global across replicas: one Lua script per
//! decision, so each check-and-take is atomic, with server time and keys that expire on their
//! own. When Redis cannot be reached, each policy follows its `on_shared_state_error`:
//! `fail_open` decides locally meanwhile (and adds what it spent to Redis when it returns),
//! `fail_closed` refuses with 503 `shared_state_unavailable`.

mod local;
#[cfg(feature = "redis")]
mod shared;
#[cfg(not(feature = "redis"))]
#[path = "shared_off.rs"]
mod shared;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dashmap::DashMap;

use local::{Local, Scope};
use shared::{CallError, Script, Shared};

use crate::metrics::Metrics;
use crate::vocab::Redacted;

/// The admit step refused the request before it reached the provider.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("provider `{0}` is not allowed for this tenant")]
    ProviderNotAllowed(String),
    #[error("rate limit reached for {who}; retry in {retry_after} s")]
    RateLimited { retry_after: u64, who: Who },
    #[error("the monthly budget of {0} is exhausted")]
    BudgetExceeded(Who),
    #[error("limits cannot be checked right now (shared state unavailable); retry shortly")]
    SharedStateUnavailable,
}

/// Whose limit or budget refused: the tenant as a whole, or one of its end users (the id has
/// the tenant-id charset, so it is safe to show the caller).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Tenant,
    EndUser(Arc<str>),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tenant => f.write_str("this tenant"),
            Self::EndUser(u) => write!(f, "end user `{u}`"),
        }
    }
}

/// What to do with a policy when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LimitSpec {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent: Option<u32>,
    pub on_shared_state_error: FailMode,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpec {
    /// Nano-dollars per UTC calendar month.
    pub monthly_nanos: u64,
    pub alert_at: Option<f64>,
    /// End a stream that crosses the budget (`on_exhausted: cut`) instead of only refusing
    /// the next request.
    pub cut: bool,
    /// Output tokens assumed for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
    pub on_shared_state_error: FailMode,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Redacted,
    pub prefix: String,
    pub timeout: Duration,
}

/// How long a reservation or a concurrency slot outlives a replica that died holding it.
const SLOT_TTL: Duration = Duration::from_secs(15 * 60);
/// Spend keys outlive their month by a few days (a late settle lands in the right month).
const SPEND_TTL_SECS: u64 = 40 * 86_400;

/// Why a request was refused, before it becomes an [`AdmitError`].
#[derive(Debug)]
pub(super) enum Refusal {
    /// Rate or concurrency limit; seconds until a retry may pass.
    Rate(u64),
    Budget,
    Unavailable,
}

impl Refusal {
    fn by(self, who: &Who) -> AdmitError {
        match self {
            Refusal::Rate(s) => AdmitError::RateLimited {
                retry_after: s,
                who: who.clone(),
            },
            Refusal::Budget => AdmitError::BudgetExceeded(who.clone()),
            Refusal::Unavailable => AdmitError::SharedStateUnavailable,
        }
    }
}

// ---------- the engine ----------

/// Per-process policy state, local or backed by Redis.
#[derive(Debug)]
pub struct Policy {
    local: Local,
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
    /// Tenants already alerted this month (`alert_at`), so the log says it once.
    alerted: DashMap<Box<str>, String>,
}

/// What an admitted request holds until its response ends: concurrency slots, the tokens
/// debit still owed, the budget reservation. Settled with the metered usage; dropped
/// unsettled (the request failed before a response) it releases everything.
pub struct Admission {
    policy: Arc<Policy>,
    tenant: Arc<str>,
    member: String,
    local_scopes: Vec<(Arc<Scope>, Arc<LimitSpec>)>,
    redis_scopes: Vec<(String, Arc<LimitSpec>)>,
    /// The budgets this request reserves from: its end user's, then its tenant's.
    holds: Vec<Hold>,
    /// With `on_exhausted: cut`: what this request may cost before its stream is ended (the
    /// budget left after everyone else's spend and reservations when it was admitted).
    allowance: Option<u64>,
    done: bool,
}

/// One budget a request reserves from.
#[derive(Debug)]
struct Hold {
    who: Who,
    /// The ledger's and the local maps' key: `tenant`, or `tenant/end_user` (`/` is in no
    /// id, so the two never collide).
    subject: Arc<str>,
    spec: BudgetSpec,
    /// (estimate, period, decided in Redis) once reserved.
    reservation: Option<(u64, String, bool)>,
}

impl Hold {
    /// Its Redis key: `{tenant}:what:period`, or `{tenant}:@end_user:what:period` (the
    /// tenant's hash tag either way, so one script may touch both).
    fn key(&self, p: &Policy, what: &str, period: &str) -> String {
        match self.subject.split_once('/') {
            Some((tenant, user)) => p.key(&[tenant, &format!("@{user}"), what, period]),
            None => p.key(&[&self.subject, what, period]),
        }
    }
}

/// The ledger key of an end user's spend: `tenant/end_user`.
pub fn end_user_subject(tenant: &str, user: &str) -> String {
    format!("{tenant}/{user}")
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("tenant", &self.tenant)
            .field("holds", &self.holds)
            .finish()
    }
}

impl Policy {
    pub fn new(shared: Option<&RedisConfig>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            local: Local::default(),
            shared: shared.and_then(|cfg| Shared::start(cfg, metrics.clone())),
            metrics,
            alerted: DashMap::new(),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let prefix = self.shared.as_ref().map_or("", |s| s.prefix());
        // The tenant in braces: a Redis Cluster hash tag, so one tenant's keys share a slot
        // and a script can touch them together.
        let mut k = String::with_capacity(prefix.len() + 64);
        k.push_str(prefix);
        k.push('{');
        k.push_str(parts[0]);
        k.push('}');
        for p in &parts[1..] {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    /// The key of one scope's state: `{tenant}:what` or `{tenant}:provider:what`.
    fn scope_key(&self, scope: &str, what: &str) -> String {
        let (t, rest) = scope.split_once('/').unwrap_or((scope, ""));
        if rest.is_empty() {
            self.key(&[t, what])
        } else {
            self.key(&[t, rest, what])
        }
    }

    /// Forgets idle local state (see [`Local::sweep`]); run every few seconds.
    pub fn sweep(&self) {
        self.local.sweep();
    }

    /// The shared state, when it has a connection.
    fn conn(&self) -> Option<Arc<Shared>> {
        let s = self.shared.as_ref()?;
        s.connected().then(|| s.clone())
    }

    fn redis_result<T>(&self, s: &Shared, r: Result<T, CallError>) -> Option<T> {
        match r {
            Ok(v) => {
                if s.set_down(false) {
                    tracing::info!(
                        "shared state: Redis reachable again; limits and budgets are global"
                    );
                    self.metrics.shared_state_up(true);
                }
                Some(v)
            }
            Err(e) => {
                if s.set_down(true) {
                    tracing::error!(error = %e,
                        "shared state: Redis unreachable; each policy follows on_shared_state_error \
                         (defaults: rate limits fail_open with local accounting, budgets fail_closed)");
                    self.metrics.shared_state_up(false);
                }
                None
            }
        }
    }

    /// The rate limits of `tenant` on provider `idx`, and of its end user if the request names
    /// one: refused, or an admission to hold; `None` (nothing allocated, nothing to settle)
    /// when no limit or budget applies.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &Arc<str>,
        end_user: Option<&Arc<str>>,
        (provider, idx): (&str, usize),
        policy: &TenantPolicy,
        request_id: u64,
    ) -> Result<Option<Admission>, AdmitError> {
        let user_limits = end_user.and(policy.end_user_limits.as_ref());
        let user_budget = end_user.and(policy.end_user_budget.as_ref());
        if policy.limits.is_none()
            && policy.provider_limits.is_empty()
            && policy.budget.is_none()
            && user_limits.is_none()
            && user_budget.is_none()
        {
            return Ok(None);
        }
        let mut holds = Vec::new();
        if let (Some(u), Some(b)) = (end_user, user_budget) {
            holds.push(Hold {
                who: Who::EndUser(u.clone()),
                subject: end_user_subject(tenant, u).into(),
                spec: b.clone(),
                reservation: None,
            });
        }
        if let Some(b) = &policy.budget {
            holds.push(Hold {
                who: Who::Tenant,
                subject: tenant.clone(),
                spec: b.clone(),
                reservation: None,
            });
        }
        let mut adm = Admission {
            policy: self.clone(),
            tenant: tenant.clone(),
            member: format!("{request_id:016x}"),
            local_scopes: Vec::new(),
            redis_scopes: Vec::new(),
            holds,
            allowance: None,
            done: false,
        };
        let mut specs: Vec<(String, Arc<LimitSpec>)> = Vec::new();
        if let Some(l) = &policy.limits {
            specs.push((tenant.to_string(), l.clone()));
        }
        if let Some((_, l)) = policy.provider_limits.iter().find(|(i, _)| *i == idx) {
            specs.push((format!("{tenant}/{provider}"), l.clone()));
        }
        self.take(&mut adm, specs, &Who::Tenant).await?;
        // The end user's limits in a call of their own, so a refusal names whose limit it
        // was; a refusal here drops `adm`, which gives back what the tenant's took.
        if let (Some(u), Some(l)) = (end_user, user_limits) {
            let who = Who::EndUser(u.clone());
            self.take(&mut adm, vec![(format!("{tenant}/@{u}"), l.clone())], &who)
                .await?;
        }
        Ok(Some(adm))
    }

    /// Takes a slot and a request from every scope of `specs` into `adm`, in Redis when it
    /// answers, else locally (or refused, for a `fail_closed` policy).
    async fn take(
        self: &Arc<Self>,
        adm: &mut Admission,
        specs: Vec<(String, Arc<LimitSpec>)>,
        who: &Who,
    ) -> Result<(), AdmitError> {
        if specs.is_empty() {
            return Ok(());
        }
        let closed = specs
            .iter()
            .any(|(_, l)| l.on_shared_state_error == FailMode::Closed);
        if let Some(s) = self.conn() {
            let mut rkeys = Vec::with_capacity(specs.len() * 3);
            let mut args = vec![adm.member.clone(), SLOT_TTL.as_millis().to_string()];
            for (scope, l) in &specs {
                for what in ["conc", "rpm", "tpm"] {
                    rkeys.push(self.scope_key(scope, what));
                }
                args.push(l.concurrent.unwrap_or(0).to_string());
                args.push(l.requests_per_minute.unwrap_or(0).to_string());
                args.push(l.tokens_per_minute.unwrap_or(0).to_string());
            }
            let r = s.run::<(u8, u64)>(Script::Admit, &rkeys, &args).await;
            match self.redis_result(&s, r) {
                Some((0, _)) => {
                    adm.redis_scopes.extend(specs);
                    return Ok(());
                }
                Some((_, wait)) => return Err(Refusal::Rate(wait.max(1)).by(who)),
                None => {
                    // The script may have run before the call failed (a timeout): give back
                    // any slot it took, once Redis answers again.
                    let mut release_keys = Vec::new();
                    let mut release_args =
                        vec![adm.member.clone(), specs.len().to_string(), "0".into()];
                    for (scope, _) in &specs {
                        release_keys.push(self.scope_key(scope, "conc"));
                    }
                    for (scope, _) in &specs {
                        release_keys.push(self.scope_key(scope, "tpm"));
                        release_args.push("0".into());
                    }
                    tokio::spawn(finish_in_redis(
                        self.clone(),
                        release_keys,
                        release_args,
                        None,
                    ));
                    if closed {
                        return Err(Refusal::Unavailable.by(who));
                    }
                }
            }
        } else if self.shared.is_some() && closed {
            return Err(Refusal::Unavailable.by(who));
        }
        let scopes: Vec<(Arc<Scope>, Arc<LimitSpec>)> = specs
            .iter()
            .map(|(k, l)| (self.local.scope(k), l.clone()))
            .collect();
        let view: Vec<(Arc<Scope>, &LimitSpec)> =
            scopes.iter().map(|(s, l)| (s.clone(), &**l)).collect();
        self.local.admit(&view).map_err(|r| r.by(who))?;
        adm.local_scopes.extend(scopes);
        Ok(())
    }

    /// The tenant's spend this month per this replica's ledger (all replicas' with the
    /// PostgreSQL store).
    fn ledger_spend(&self, tenant: &str, now: i64) -> u64 {
        self.metrics.ledger.month(tenant, now).cost_nanos()
    }

    /// The tenant's budget gauge and its alert. An end user's spend is never a metric label.
    fn publish(&self, who: &Who, tenant: &str, spent: u64, b: &BudgetSpec, period: &str) {
        if *who != Who::Tenant {
            return;
        }
        self.metrics.budget(tenant, spent, b.monthly_nanos);
        if let Some(a) = b.alert_at
            && spent as f64 >= a * b.monthly_nanos as f64
            && self.alerted.get(tenant).is_none_or(|p| *p != period)
        {
            self.alerted.insert(tenant.into(), period.to_string());
            tracing::warn!(
                tenant,
                spent_usd = spent as f64 / 1e9,
                limit_usd = b.monthly_nanos as f64 / 1e9,
                alert_at = a,
                "tenant budget crossed its alert threshold"
            );
        }
    }
}

impl Admission {
    /// Reserves `estimate` nano-dollars of every budget the request falls under: its end
    /// user's, then its tenant's. A refusal by the second gives back the first.
    pub async fn reserve(&mut self, estimate: u64, now: i64) -> Result<(), AdmitError> {
        for i in 0..self.holds.len() {
            match self.reserve_one(i, estimate, now).await {
                Ok(allowance) => {
                    self.allowance = match (self.allowance, allowance) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Err(e) => {
                    for h in &mut self.holds[..i] {
                        if let Some(r) = h.reservation.take() {
                            self.policy.release_hold(&self.member, h, r);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Reserves from hold `i`; the allowance left under it for a `cut` budget.
    async fn reserve_one(
        &mut self,
        i: usize,
        estimate: u64,
        now: i64,
    ) -> Result<Option<u64>, AdmitError> {
        let p = self.policy.clone();
        let h = &self.holds[i];
        let b = h.spec.clone();
        let period = crate::vocab::clock::month_of(now);
        let subject = h.subject.clone();
        let who = h.who.clone();
        if let Some(s) = p.conn() {
            let seed = p.ledger_spend(&subject, now);
            let unsynced = p
                .local
                .unsynced_spend
                .remove(&(Box::<str>::from(&*subject), period.clone()))
                .map_or(0, |(_, v)| v);
            let member = format!("{}:{estimate}", self.member);
            let keys = [h.key(&p, "res", &period), h.key(&p, "spend", &period)];
            let args = [
                member.clone(),
                estimate.to_string(),
                b.monthly_nanos.to_string(),
                SLOT_TTL.as_millis().to_string(),
                seed.to_string(),
                unsynced.to_string(),
                SPEND_TTL_SECS.to_string(),
            ];
            let r = s.run::<(u8, u64, u64)>(Script::Reserve, &keys, &args).await;
            match p.redis_result(&s, r) {
                Some((ok, spent, others)) => {
                    p.publish(&who, &self.tenant, spent, &b, &period);
                    if ok == 1 {
                        self.holds[i].reservation = Some((estimate, period, true));
                        return Ok(b
                            .cut
                            .then(|| b.monthly_nanos.saturating_sub(spent + others)));
                    }
                    return Err(Refusal::Budget.by(&who));
                }
                None => {
                    // The script may have run before the call failed (its answer lost): give
                    // back the reservation it may have taken once Redis answers, as admit
                    // does with its slots. The finish script with the reservations as its
                    // one slot set is a plain ZREM (no tokens: the bucket is not touched).
                    tokio::spawn(finish_in_redis(
                        p.clone(),
                        vec![keys[0].clone(), p.key(&[&self.tenant, "tpm"])],
                        vec![member, "1".into(), "0".into(), "0".into()],
                        None,
                    ));
                    // The unsynced amount is still owed to Redis.
                    if unsynced > 0 {
                        *p.local
                            .unsynced_spend
                            .entry((Box::<str>::from(&*subject), period.clone()))
                            .or_default() += unsynced;
                    }
                    if b.on_shared_state_error == FailMode::Closed {
                        return Err(Refusal::Unavailable.by(&who));
                    }
                }
            }
        } else if p.shared.is_some() && b.on_shared_state_error == FailMode::Closed {
            return Err(Refusal::Unavailable.by(&who));
        }
        // Local: spend from the ledger, reservations in an atomic per subject. The add is
        // done first and undone on refusal, so two racing requests cannot both fit.
        let reserved = p.local.reserved(&subject);
        let before = reserved.fetch_add(estimate, Ordering::AcqRel);
        let spent = p.ledger_spend(&subject, now);
        p.publish(&who, &self.tenant, spent, &b, &period);
        if spent >= b.monthly_nanos || spent + before + estimate > b.monthly_nanos {
            reserved.fetch_sub(estimate, Ordering::AcqRel);
            return Err(Refusal::Budget.by(&who));
        }
        self.holds[i].reservation = Some((estimate, period, false));
        Ok(b.cut
            .then(|| b.monthly_nanos.saturating_sub(spent + before)))
    }

    /// With `on_exhausted: cut`, what this request may cost before its stream is ended.
    pub fn allowance(&self) -> Option<u64> {
        self.allowance
    }

    /// Whether the request falls under a budget (its tenant's or its end user's).
    pub fn budgeted(&self) -> bool {
        !self.holds.is_empty()
    }

    /// Output tokens assumed for a request that sets no `max_tokens`: the tightest budget's.
    pub fn default_max_tokens(&self) -> Option<u64> {
        self.holds.iter().map(|h| h.spec.default_max_tokens).max()
    }

    /// The response ended: debit the tokens it used and settle the reservation to its cost.
    /// Runs on the body's last poll (or drop), so the Redis part goes to a task.
    pub fn settle(mut self, tokens: u64, cost: u64) {
        self.finish(tokens, cost);
    }

    fn finish(&mut self, tokens: u64, cost: u64) {
        if self.done {
            return;
        }
        self.done = true;
        let p = self.policy.clone();
        p.local.release(&self.local_scopes, tokens);
        let now = crate::vocab::unix_now();
        let mut redis_holds = Vec::new();
        for h in &mut self.holds {
            match h.reservation.take() {
                Some((est, _, false)) => {
                    p.local
                        .reserved(&h.subject)
                        .fetch_sub(est, Ordering::AcqRel);
                    let period = crate::vocab::clock::month_of(now);
                    p.publish(
                        &h.who,
                        &self.tenant,
                        p.ledger_spend(&h.subject, now),
                        &h.spec,
                        &period,
                    );
                    if p.shared.is_some() {
                        // Decided locally during an outage: Redis gets this spend when it
                        // returns.
                        *p.local
                            .unsynced_spend
                            .entry((Box::<str>::from(&*h.subject), period))
                            .or_default() += cost;
                    }
                }
                Some((est, period, true)) => redis_holds.push((h, est, period)),
                None => {}
            }
        }
        if p.shared.is_none() || (self.redis_scopes.is_empty() && redis_holds.is_empty()) {
            return;
        }
        // The slots and the first budget in one script call; any further budget (the tenant's,
        // after its end user's) in a call of its own with no slots.
        let mut holds = redis_holds.into_iter();
        let first = holds.next();
        let calls = std::iter::once((self.redis_scopes.as_slice(), first))
            .chain(holds.map(|h| (&[][..], Some(h))));
        for (slots, hold) in calls {
            if slots.is_empty() && hold.is_none() {
                continue;
            }
            let mut keys: Vec<String> = Vec::new();
            let mut args: Vec<String> = vec![
                self.member.clone(),
                slots.len().to_string(),
                tokens.to_string(),
            ];
            for (scope, _) in slots {
                keys.push(p.scope_key(scope, "conc"));
            }
            for (scope, l) in slots {
                keys.push(p.scope_key(scope, "tpm"));
                args.push(l.tokens_per_minute.unwrap_or(0).to_string());
            }
            let owed = hold.map(|(h, est, period)| {
                keys.push(h.key(&p, "res", &period));
                keys.push(h.key(&p, "spend", &period));
                args.push(format!("{}:{est}", self.member));
                args.push(cost.to_string());
                args.push(p.ledger_spend(&h.subject, now).to_string());
                args.push(SPEND_TTL_SECS.to_string());
                Owed {
                    who: h.who.clone(),
                    tenant: self.tenant.clone(),
                    subject: h.subject.clone(),
                    period,
                    spec: h.spec.clone(),
                    cost,
                }
            });
            tokio::spawn(finish_in_redis(p.clone(), keys, args, owed));
        }
    }
}

/// Spend a finish call settles in Redis, kept for later if Redis never takes it.
struct Owed {
    who: Who,
    tenant: Arc<str>,
    subject: Arc<str>,
    period: String,
    spec: BudgetSpec,
    cost: u64,
}

impl Policy {
    /// Gives back a reservation of a request refused by a later budget.
    fn release_hold(
        self: &Arc<Self>,
        member: &str,
        h: &Hold,
        (est, period, redis): (u64, String, bool),
    ) {
        if !redis {
            self.local
                .reserved(&h.subject)
                .fetch_sub(est, Ordering::AcqRel);
            return;
        }
        let keys = vec![h.key(self, "res", &period), h.key(self, "spend", &period)];
        let args = vec![
            member.to_string(),
            "0".into(),
            "0".into(),
            format!("{member}:{est}"),
            "0".into(),
            self.ledger_spend(&h.subject, crate::vocab::unix_now())
                .to_string(),
            SPEND_TTL_SECS.to_string(),
        ];
        tokio::spawn(finish_in_redis(self.clone(), keys, args, None));
    }
}

/// Runs the finish script until Redis takes it: a slot or reservation left behind would hold
/// a tenant's concurrency or budget for `SLOT_TTL` after a Redis blip. Gives up at that TTL
/// (by then Redis expired them itself) and leaves the spend owed for the next reservation.
/// A call that timed out may have run: retrying can count its spend twice, which errs
/// toward refusing, never toward overspending.
async fn finish_in_redis(p: Arc<Policy>, keys: Vec<String>, args: Vec<String>, owed: Option<Owed>) {
    let deadline = std::time::Instant::now() + SLOT_TTL;
    let mut wait = Duration::from_millis(250);
    loop {
        if let Some(s) = p.conn() {
            let r = s.run::<u64>(Script::Finish, &keys, &args).await;
            if let Some(spent) = p.redis_result(&s, r) {
                if let Some(o) = &owed {
                    p.publish(&o.who, &o.tenant, spent, &o.spec, &o.period);
                }
                return;
            }
        }
        if std::time::Instant::now() >= deadline {
            if let Some(o) = owed {
                *p.local
                    .unsynced_spend
                    .entry((Box::<str>::from(&*o.subject), o.period))
                    .or_default() += o.cost;
            }
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.finish(0, 0);
    }
}

/// A reservation estimate: the request's input (its body size as tokens, at ~4 bytes a token:
/// an over-estimate for JSON) plus its output cap, at the model's prices. `None` when the
/// model has no price (nothing to reserve; the request still counts once metered).
pub fn estimate(
    price: Option<crate::pricing::Price>,
    body_len: u64,
    max_tokens: Option<u64>,
    default_max_tokens: u64,
) -> u64 {
    let Some(p) = price else {
        return 0;
    };
    let input = body_len.div_ceil(4);
    let output = max_tokens.unwrap_or(default_max_tokens);
    input
        .saturating_mul(p.input)
        .saturating_add(output.saturating_mul(p.output))
}

/// A tenant's policy with provider names resolved to indexes into the config's provider list.
#[derive(Debug, Clone)]
pub struct TenantPolicy {
    pub default_provider: usize,
    /// Bit i set = provider i allowed. Providers are capped at 64 in validation.
    pub allowed: u64,
    /// Use `_platform` keys when the tenant has none for a provider.
    pub platform_fallback: bool,
    /// The tenant's end users may send their own key (`passthrough` identity source).
    pub passthrough: bool,
    /// Rate limits of the tenant as a whole; `None` = unlimited.
    pub limits: Option<Arc<LimitSpec>>,
    /// Rate limits of (tenant, provider index), checked on top of the tenant's.
    pub provider_limits: Vec<(usize, Arc<LimitSpec>)>,
    pub budget: Option<BudgetSpec>,
    /// Rate limits of each end user (`limits.end_user`), on top of the tenant's.
    pub end_user_limits: Option<Arc<LimitSpec>>,
    /// The monthly budget of each end user (`budget.end_user_monthly_usd`).
    pub end_user_budget: Option<BudgetSpec>,
    /// Refuse a request that names no end user.
    pub require_end_user: bool,
    /// `failover`: per source provider index, what to try after its keys failed. Empty for
    /// most tenants, so the lookup is a scan of nothing.
    pub failover: Arc<[(usize, Box<[FailoverStep]>)]>,
}

/// One step of a failover chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverStep {
    /// Another provider (index into the config's provider list) with the tenant's key for it.
    Provider(usize),
    /// The `_platform` tenant's key for the source provider.
    Platform,
}

impl TenantPolicy {
    pub fn allows(&self, provider: usize) -> bool {
        provider < 64 && self.allowed & (1u64 << provider) != 0
    }

    /// The failover chain of `provider`; empty when none is configured.
    pub fn failover_of(&self, provider: usize) -> &[FailoverStep] {
        self.failover
            .iter()
            .find(|(p, _)| *p == provider)
            .map_or(&[], |(_, steps)| steps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates() {
        let p = crate::pricing::Price {
            input: 150,
            output: 600,
            ..Default::default()
        };
        assert_eq!(estimate(Some(p), 400, Some(10), 4096), 100 * 150 + 10 * 600);
        assert_eq!(estimate(Some(p), 0, None, 4096), 4096 * 600);
        assert_eq!(estimate(None, 400, Some(10), 4096), 0);
    }
}
