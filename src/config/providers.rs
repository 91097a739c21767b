//! Validates `providers` (built-ins, overrides and additions: names, kinds, base URLs,
//! `stream_usage`, the 64-provider cap) and `pricing` (the price file it points to).

use std::collections::BTreeMap;
use std::path::Path;

use super::ConfigError;
use super::Ctx;
use super::file::{ModelFile, ProviderFile};
use crate::provider::{self, Provider};

/// The provider table: built-ins first, then config entries override or add. Indexes into it
/// are the provider ids the rest of the config (allow-lists, failover) refers to.
pub(super) fn providers(
    ctx: &Ctx,
    file: &BTreeMap<String, ProviderFile>,
) -> Result<Vec<Provider>, ConfigError> {
    let mut providers: Vec<Provider> = provider::builtins();
    for (name, pf) in file {
        let existing = providers.iter().position(|p| &*p.name == name.as_str());
        let p = provider(ctx, name, pf, existing.map(|i| &providers[i]))?;
        match existing {
            Some(i) => providers[i] = p,
            None => providers.push(p),
        }
    }
    // A built-in without a public default host is usable only once configured.
    providers.retain(|p| !p.base_url.is_empty());
    if providers.len() > 64 {
        return Err(ctx.invalid("providers", "at most 64 providers are supported".into()));
    }
    Ok(providers)
}

/// One `providers.NAME` entry; `builtin` is the built-in of that name it overrides, if any.
fn provider(
    ctx: &Ctx,
    name: &str,
    pf: &ProviderFile,
    builtin: Option<&Provider>,
) -> Result<Provider, ConfigError> {
    let field = format!("providers.{name}");
    // `.` and `..` would pass the character check, but the route step refuses them as dot
    // segments: such a provider could never be reached by its `/{name}/` route.
    if !crate::vocab::valid_tenant_id(name) || matches!(name, "v1" | "byokd" | "." | "..") {
        return Err(ctx.invalid(
            &field,
            "provider names use [A-Za-z0-9_.:-] and cannot be `v1`, `byokd`, `.` or `..`".into(),
        ));
    }
    let kind = match (&pf.kind, builtin) {
        (Some(k), _) => provider::kind(k).ok_or_else(|| {
            ctx.invalid(
                &format!("{field}.kind"),
                format!("unknown kind `{k}`; use one of {}", provider::kind_names()),
            )
        })?,
        (None, Some(b)) => b.kind,
        (None, None) => {
            return Err(ctx.invalid(
                &format!("{field}.kind"),
                "a provider that is not built in needs a kind".into(),
            ));
        }
    };
    let regional = |r: &str| kind.regional_base_url(r);
    // Google calls it a location, AWS a region: either key, not both.
    if pf.region.is_some() && pf.location.is_some() {
        return Err(ctx.invalid(&field, "set region or location, not both".into()));
    }
    let pf_region = pf.region.clone().or_else(|| pf.location.clone());
    if kind.regional_base_url("x").is_some() && pf_region.is_none() {
        return Err(ctx.invalid(
            &format!("{field}.region"),
            format!(
                "the {} kind signs requests for a region: set it (e.g. us-east-1)",
                kind.name()
            ),
        ));
    }
    let region = match &pf_region {
        Some(r) if regional(r).is_none() => {
            return Err(ctx.invalid(
                &format!("{field}.region"),
                format!("the {} kind takes no region", kind.name()),
            ));
        }
        Some(r) if r.is_empty() || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') => {
            return Err(ctx.invalid(&format!("{field}.region"), format!("`{r}` is not a region")));
        }
        r => r.clone(),
    };
    let base_url = match (&pf.base_url, builtin, region.as_deref().and_then(regional)) {
        (Some(u), _, _) => u.clone(),
        (None, _, Some(u)) => u,
        (None, Some(b), None) => b.base_url.clone(),
        (None, None, None) => {
            return Err(ctx.invalid(
                &format!("{field}.base_url"),
                "a provider that is not built in needs a base_url".into(),
            ));
        }
    };
    let mut p = Provider::new(name, kind, &base_url)
        .map_err(|m| ctx.invalid(&format!("{field}.base_url"), m))?;
    p.region = region.map(|r| r.as_str().into());
    p.project = pf.project.as_deref().map(Into::into);
    if let Some(u) = &pf.token_uri {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(ctx.invalid(&format!("{field}.token_uri"), "an http(s) URL".into()));
        }
        p.token_uri = Some(u.as_str().into());
    }
    match pf.platform_credentials.as_deref() {
        None | Some("stored") => {}
        Some("environment") if kind.environment_credential().is_some() => {
            p.platform_from_environment = true;
        }
        Some("environment") => {
            return Err(ctx.invalid(
                &format!("{field}.platform_credentials"),
                format!(
                    "the {} kind has no credential in the environment",
                    kind.name()
                ),
            ));
        }
        Some(o) => {
            return Err(ctx.invalid(
                &format!("{field}.platform_credentials"),
                format!("`{o}`: use stored or environment"),
            ));
        }
    }
    if let Some(su) = pf.stream_usage {
        if su && !kind.stream_usage() {
            let with: Vec<&str> = provider::KINDS
                .iter()
                .filter(|k| k.stream_usage())
                .map(|k| k.name())
                .collect();
            return Err(ctx.invalid(
                &format!("{field}.stream_usage"),
                format!(
                    "the {} kind has no stream_options (kinds that do: {})",
                    kind.name(),
                    with.join(", ")
                ),
            ));
        }
        p.stream_usage = su;
    }
    Ok(p)
}

/// The compiled-in prices, with the `pricing` file's (resolved against the config's folder)
/// replacing or adding to them model by model.
pub(super) fn pricing(
    ctx: &Ctx,
    file: Option<&Path>,
) -> Result<crate::pricing::Pricing, ConfigError> {
    match file.map(|p| ctx.resolve(p)) {
        None => Ok(crate::pricing::Pricing::builtin()),
        Some(p) => crate::pricing::Pricing::builtin_with(&p)
            .map_err(|e| ctx.invalid("pricing", e.to_string())),
    }
}

/// `models:` aliases: each `alias: provider/model`, the provider a configured one. An alias
/// is matched whole, before any `provider/` prefix, so it may itself contain a `/`.
pub(super) fn models(
    ctx: &Ctx,
    file: &BTreeMap<String, ModelFile>,
    providers: &[Provider],
) -> Result<
    std::collections::HashMap<Box<str>, std::sync::Arc<crate::route::ModelRoute>>,
    ConfigError,
> {
    use crate::route::{ModelRoute, Rule, TierCandidate};
    let mut out = std::collections::HashMap::with_capacity(file.len());
    for (alias, target) in file {
        let field = format!("models.{alias}");
        if alias.is_empty() || alias.len() > 256 {
            return Err(ctx.invalid(&field, "an alias is 1 to 256 characters".into()));
        }
        let (targets, rule) = match target {
            ModelFile::One(t) => (std::slice::from_ref(t), Rule::Order),
            ModelFile::Tier { candidates, rule } => {
                let rule = match rule.as_deref() {
                    None | Some("order") => Rule::Order,
                    Some("cheapest") => Rule::Cheapest,
                    Some("fastest") => Rule::Fastest,
                    Some(o) => {
                        return Err(ctx.invalid(
                            &format!("{field}.rule"),
                            format!("`{o}`: use order, cheapest or fastest"),
                        ));
                    }
                };
                if candidates.is_empty() || candidates.len() > crate::failover::MAX_ATTEMPTS {
                    return Err(ctx.invalid(
                        &format!("{field}.candidates"),
                        format!("1 to {} `provider/model`", crate::failover::MAX_ATTEMPTS),
                    ));
                }
                (candidates.as_slice(), rule)
            }
        };
        let mut candidates = Vec::with_capacity(targets.len());
        for target in targets {
            let Some((name, model)) = target
                .split_once('/')
                .filter(|(p, m)| !p.is_empty() && !m.is_empty())
            else {
                return Err(ctx.invalid(
                    &field,
                    format!(
                        "`{target}` is not `provider/model` (e.g. `anthropic/claude-sonnet-4-5`)"
                    ),
                ));
            };
            let Some(provider) = providers.iter().position(|p| &*p.name == name) else {
                return Err(ctx.invalid(&field, format!("no provider named `{name}`")));
            };
            candidates.push(TierCandidate::new(provider, model));
        }
        out.insert(
            alias.as_str().into(),
            std::sync::Arc::new(ModelRoute {
                candidates: candidates.into(),
                rule,
            }),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::test_parse as parse;

    /// Found by the `config` fuzz target's check that every accepted provider is routable
    /// (seed `fuzz/corpus/config/provider_named_dot_dot.yaml`).
    #[test]
    fn names_the_router_refuses_are_refused() {
        let yaml = |name: &str| {
            format!(
                "providers:\n  \"{name}\": {{ kind: openai, base_url: \"https://x.example\" }}\n"
            )
        };
        for name in ["v1", "byokd", ".", ".."] {
            let err = parse(&yaml(name)).unwrap_err().to_string();
            assert!(err.contains(&format!("providers.{name}")), "{err}");
        }
        let cfg = parse(&yaml("...")).unwrap();
        let i = cfg.provider_index("...").unwrap();
        let r = crate::route::route(&cfg.providers, "/.../v1/chat/completions").unwrap();
        assert_eq!(r.target, crate::route::Target::Named(i));
    }
}
