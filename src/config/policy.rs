//! Validates `defaults` and `tenants` into [`TenantPolicy`] (provider choice, limits and
//! budget specs; the failover chains in `failover.rs`) and `shared_state` (Redis).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::failover::failover_chains;
use super::file::{BudgetFile, LimitsFile_, PolicyFile, SharedStateFile};
use super::{ConfigError, Ctx, TenantPolicy};
use crate::policy::{BudgetSpec, FailMode, LimitSpec};
use crate::provider::Provider;

/// `shared_state.redis`: a plain `redis://` URL (TLS to Redis is not supported).
pub(super) fn shared_state(
    ctx: &Ctx,
    file: Option<&SharedStateFile>,
) -> Result<Option<crate::policy::RedisConfig>, ConfigError> {
    let Some(r) = file.and_then(|s| s.redis.as_ref()) else {
        return Ok(None);
    };
    if !cfg!(feature = "redis") {
        return Err(ctx.invalid(
            "shared_state.redis",
            "this byokd was built without the `redis` feature; build it with default features \
             to share limits and budgets across replicas"
                .into(),
        ));
    }
    if r.url.starts_with("rediss://") {
        return Err(ctx.invalid(
            "shared_state.redis.url",
            "TLS to Redis (rediss://) is not supported in this version; reach Redis \
             over a private network or a local TLS tunnel with redis://"
                .into(),
        ));
    }
    if !r.url.starts_with("redis://") {
        return Err(ctx.invalid("shared_state.redis.url", "expected a redis:// URL".into()));
    }
    Ok(Some(crate::policy::RedisConfig {
        url: crate::vocab::Redacted(r.url.clone()),
        prefix: r.prefix.clone().unwrap_or_else(|| "byokd:".into()),
        timeout: r.timeout.map_or(Duration::from_millis(500), |d| d.0),
    }))
}

/// `defaults`, then each tenant's override on top of them; the map key is the tenant name.
pub(super) fn policies(
    ctx: &Ctx,
    defaults: &PolicyFile,
    tenants: &BTreeMap<String, PolicyFile>,
    providers: &[Provider],
) -> Result<(TenantPolicy, crate::identify::Configured), ConfigError> {
    let defaults = policy(ctx, "defaults", defaults, None, providers)?;
    let mut out = crate::identify::Configured::default();
    for (name, pf) in tenants {
        if !crate::vocab::valid_tenant_id(name) || crate::vocab::reserved_tenant_id(name) {
            return Err(ctx.invalid(
                &format!("tenants.{name}"),
                "tenant ids use [A-Za-z0-9_.:-]{1,128} and do not start with `_` (reserved)".into(),
            ));
        }
        let p = policy(
            ctx,
            &format!("tenants.{name}"),
            pf,
            Some(&defaults),
            providers,
        )?;
        out.insert(Arc::<str>::from(name.as_str()), p);
    }
    Ok((defaults, out))
}

fn index(providers: &[Provider], name: &str) -> Option<usize> {
    providers.iter().position(|p| &*p.name == name)
}

/// One policy block at `field`; what it leaves out comes from `base` (the defaults), or the
/// built-in defaults when this is the defaults block itself.
fn policy(
    ctx: &Ctx,
    field: &str,
    pf: &PolicyFile,
    base: Option<&TenantPolicy>,
    providers: &[Provider],
) -> Result<TenantPolicy, ConfigError> {
    let default_provider = match &pf.default_provider {
        Some(n) => index(providers, n).ok_or_else(|| {
            ctx.invalid(
                &format!("{field}.default_provider"),
                format!("unknown provider `{n}`"),
            )
        })?,
        None => match base {
            Some(b) => b.default_provider,
            None => index(providers, crate::provider::DEFAULT_PROVIDER).unwrap_or(0),
        },
    };
    let allowed = match &pf.allowed_providers {
        Some(list) => {
            let mut bits = 0u64;
            for n in list {
                let i = index(providers, n).ok_or_else(|| {
                    ctx.invalid(
                        &format!("{field}.allowed_providers"),
                        format!("unknown provider `{n}`"),
                    )
                })?;
                bits |= 1 << i;
            }
            bits
        }
        None => match base {
            Some(b) => b.allowed,
            None => u64::MAX,
        },
    };
    let platform_fallback = match &pf.fallback {
        Some(list) => {
            for f in list {
                if f != "platform" {
                    return Err(ctx.invalid(
                        &format!("{field}.fallback"),
                        format!("unknown fallback `{f}`; the only one is `platform`"),
                    ));
                }
            }
            !list.is_empty()
        }
        None => base.is_some_and(|b| b.platform_fallback),
    };
    let passthrough = pf
        .passthrough
        .unwrap_or_else(|| base.is_some_and(|b| b.passthrough));
    let (limits, provider_limits) = match &pf.limits {
        None => (
            base.and_then(|b| b.limits.clone()),
            base.map(|b| b.provider_limits.clone()).unwrap_or_default(),
        ),
        Some(l) => limits(ctx, &format!("{field}.limits"), l, base, providers)?,
    };
    let end_user_limits = match pf.limits.as_ref().and_then(|l| l.end_user.as_deref()) {
        None => base.and_then(|b| b.end_user_limits.clone()),
        Some(l) => {
            let f = format!("{field}.limits.end_user");
            if l.providers.is_some() || l.end_user.is_some() {
                return Err(ctx.invalid(
                    &f,
                    "end_user limits cannot nest providers or end_user".into(),
                ));
            }
            let base = base.and_then(|b| b.end_user_limits.as_deref());
            Some(Arc::new(limit_spec(ctx, &f, l, base)?))
        }
    };
    let base_budget = base.and_then(|b| b.budget.as_ref());
    let base_user_budget = base.and_then(|b| b.end_user_budget.as_ref());
    let (budget, end_user_budget) = match &pf.budget {
        None => (base_budget.cloned(), base_user_budget.cloned()),
        Some(bf) => {
            let f = format!("{field}.budget");
            let tenant = if bf.monthly_usd.is_some()
                || base_budget.is_some()
                || bf.end_user_monthly_usd.is_none()
            {
                Some(budget(ctx, &f, bf, base_budget)?)
            } else {
                None
            };
            let user = match bf.end_user_monthly_usd {
                None => base_user_budget.cloned(),
                Some(usd) => {
                    let like = BudgetFile {
                        monthly_usd: Some(usd),
                        alert_at: None,
                        ..bf.clone()
                    };
                    let mut spec = budget(
                        ctx,
                        &format!("{f}.end_user_monthly_usd"),
                        &like,
                        tenant.as_ref().or(base_user_budget),
                    )?;
                    spec.alert_at = None;
                    Some(spec)
                }
            };
            (tenant, user)
        }
    };
    let require_end_user = pf
        .require_end_user
        .unwrap_or_else(|| base.is_some_and(|b| b.require_end_user));
    let failover = match &pf.failover {
        Some(map) => {
            failover_chains(field, map, providers, allowed).map_err(|(f, m)| ctx.invalid(&f, m))?
        }
        None => base.map_or_else(|| Arc::from([]), |b| b.failover.clone()),
    };
    Ok(TenantPolicy {
        default_provider,
        allowed,
        platform_fallback,
        passthrough,
        limits,
        provider_limits,
        budget,
        end_user_limits,
        end_user_budget,
        require_end_user,
        failover,
    })
}

fn fail_mode(
    ctx: &Ctx,
    field: &str,
    v: Option<&str>,
    default: FailMode,
) -> Result<FailMode, ConfigError> {
    match v {
        None => Ok(default),
        Some("fail_open") => Ok(FailMode::Open),
        Some("fail_closed") => Ok(FailMode::Closed),
        Some(o) => Err(ctx.invalid(field, format!("`{o}`: use fail_open or fail_closed"))),
    }
}

/// Limits of (tenant, provider index), as in [`TenantPolicy::provider_limits`].
type ProviderLimits = Vec<(usize, Arc<LimitSpec>)>;

/// A `limits` block at `f`: the tenant's own limits (absent when it sets none) and its
/// per-provider limits, each on top of `base`'s.
fn limits(
    ctx: &Ctx,
    f: &str,
    l: &LimitsFile_,
    base: Option<&TenantPolicy>,
    providers: &[Provider],
) -> Result<(Option<Arc<LimitSpec>>, ProviderLimits), ConfigError> {
    let spec = limit_spec(ctx, f, l, base.and_then(|b| b.limits.as_deref()))?;
    let mut per = base.map(|b| b.provider_limits.clone()).unwrap_or_default();
    for (name, pl) in l.providers.iter().flatten() {
        let i = index(providers, name).ok_or_else(|| {
            ctx.invalid(
                &format!("{f}.providers"),
                format!("unknown provider `{name}`"),
            )
        })?;
        let pf = format!("{f}.providers.{name}");
        if pl.providers.is_some() {
            return Err(ctx.invalid(&pf, "providers cannot nest".into()));
        }
        per.retain(|(j, _)| *j != i);
        per.push((i, Arc::new(limit_spec(ctx, &pf, pl, None)?)));
    }
    let any = spec.requests_per_minute.is_some()
        || spec.tokens_per_minute.is_some()
        || spec.concurrent.is_some();
    Ok((any.then(|| Arc::new(spec)), per))
}

fn limit_spec(
    ctx: &Ctx,
    f: &str,
    l: &LimitsFile_,
    base: Option<&LimitSpec>,
) -> Result<LimitSpec, ConfigError> {
    let spec = LimitSpec {
        requests_per_minute: l
            .requests_per_minute
            .or(base.and_then(|b| b.requests_per_minute)),
        tokens_per_minute: l
            .tokens_per_minute
            .or(base.and_then(|b| b.tokens_per_minute)),
        concurrent: l.concurrent.or(base.and_then(|b| b.concurrent)),
        on_shared_state_error: fail_mode(
            ctx,
            &format!("{f}.on_shared_state_error"),
            l.on_shared_state_error.as_deref(),
            base.map_or(FailMode::Open, |b| b.on_shared_state_error),
        )?,
    };
    if [
        spec.requests_per_minute.map(u64::from),
        spec.tokens_per_minute,
        spec.concurrent.map(u64::from),
    ]
    .contains(&Some(0))
    {
        return Err(ctx.invalid(
            f,
            "a limit of 0 refuses everything; leave it out for no limit".into(),
        ));
    }
    Ok(spec)
}

/// A `budget` block at `f`, on top of the defaults' budget `b` if any.
fn budget(
    ctx: &Ctx,
    f: &str,
    bf: &BudgetFile,
    b: Option<&BudgetSpec>,
) -> Result<BudgetSpec, ConfigError> {
    let monthly_nanos = match (bf.monthly_usd, b) {
        (Some(usd), _) if usd.is_finite() && usd >= 0.0 => (usd * 1e9).round() as u64,
        (Some(_), _) => {
            return Err(ctx.invalid(
                &format!("{f}.monthly_usd"),
                "a non-negative amount in USD".into(),
            ));
        }
        (None, Some(b)) => b.monthly_nanos,
        (None, None) => {
            return Err(ctx.invalid(&format!("{f}.monthly_usd"), "required".into()));
        }
    };
    let alert_at = bf.alert_at.or(b.and_then(|b| b.alert_at));
    if alert_at.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
        return Err(ctx.invalid(
            &format!("{f}.alert_at"),
            "a fraction between 0 and 1".into(),
        ));
    }
    let cut = match bf.on_exhausted.as_deref() {
        None => b.is_some_and(|b| b.cut),
        Some("reject") => false,
        Some("cut") => true,
        Some(o) => {
            return Err(ctx.invalid(
                &format!("{f}.on_exhausted"),
                format!("`{o}`: use reject or cut"),
            ));
        }
    };
    Ok(BudgetSpec {
        monthly_nanos,
        alert_at,
        cut,
        default_max_tokens: bf
            .default_max_tokens
            .or(b.map(|b| b.default_max_tokens))
            .unwrap_or(4096),
        on_shared_state_error: fail_mode(
            ctx,
            &format!("{f}.on_shared_state_error"),
            bf.on_shared_state_error.as_deref(),
            b.map_or(FailMode::Closed, |b| b.on_shared_state_error),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_parse as parse;

    #[test]
    fn tenant_overrides_inherit_defaults() {
        let c = parse(
            "defaults: { default_provider: openai, allowed_providers: [openai, anthropic] }\n\
             tenants:\n  acme: { allowed_providers: [anthropic] }\n",
        )
        .unwrap();
        let a = c.provider_index("anthropic").unwrap();
        let o = c.provider_index("openai").unwrap();
        let acme = c.policy("acme");
        assert!(acme.allows(a) && !acme.allows(o));
        assert_eq!(acme.default_provider, o);
        assert!(c.policy("other").allows(o));
    }

    #[test]
    fn policy_blocks_parse_and_inherit() {
        let c = parse(
            "defaults:\n  limits: { requests_per_minute: 60, providers: { anthropic: { concurrent: 2 } } }\n  budget: { monthly_usd: 500, alert_at: 0.8 }\n\
             tenants:\n  acme: { limits: { concurrent: 4 }, budget: { monthly_usd: 2000, on_exhausted: cut } }\n",
        )
        .unwrap();
        let acme = c.policy("acme");
        let l = acme.limits.as_deref().unwrap();
        assert_eq!((l.requests_per_minute, l.concurrent), (Some(60), Some(4)));
        assert_eq!(acme.provider_limits.len(), 1);
        let b = acme.budget.as_ref().unwrap();
        assert_eq!(
            (b.monthly_nanos, b.alert_at, b.cut),
            (2_000_000_000_000, Some(0.8), true)
        );
        assert_eq!(b.on_shared_state_error, crate::policy::FailMode::Closed);
        for bad in [
            "defaults: { limits: { requests_per_minute: 0 } }\n",
            "defaults: { budget: { monthly_usd: -1 } }\n",
            "defaults: { budget: { monthly_usd: 5, on_exhausted: later } }\n",
            "shared_state: { redis: { url: \"rediss://x\" } }\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
