//! Validates the `failover` map of a policy block: each chain resolves to provider indexes,
//! stays within the tenant's allowed providers and keeps the wire format.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::FailoverStep;
use crate::provider::Provider;

/// Wire formats a request can move between unchanged: the same kind, or two kinds that
/// speak the OpenAI API (Azure has its own paths and auth, so it pairs only with Azure).
/// Resolves `failover: { source: [target, ...] }` into provider indexes; the error is
/// (field, message).
#[allow(clippy::type_complexity)]
pub(super) fn failover_chains(
    field: &str,
    map: &BTreeMap<String, Vec<String>>,
    providers: &[Provider],
    allowed: u64,
) -> Result<Arc<[(usize, Box<[FailoverStep]>)]>, (String, String)> {
    let index = |name: &str| providers.iter().position(|p| &*p.name == name);
    let mut out = Vec::new();
    for (source, targets) in map {
        let f = format!("{field}.failover.{source}");
        let src =
            index(source).ok_or_else(|| (f.clone(), format!("unknown provider `{source}`")))?;
        let mut steps: Vec<FailoverStep> = Vec::new();
        for t in targets {
            let step = if t == "platform" {
                FailoverStep::Platform
            } else {
                let i = index(t).ok_or_else(|| {
                    (
                        f.clone(),
                        format!("unknown provider `{t}`; a step is a provider name or `platform`"),
                    )
                })?;
                let (a, b) = (&providers[src], &providers[i]);
                if i == src {
                    return Err((
                        f,
                        format!(
                            "`{t}` fails over to itself; its other keys are tried anyway, and `platform` adds the platform key"
                        ),
                    ));
                }
                if a.kind.wire() != b.kind.wire() {
                    return Err((
                        f,
                        format!(
                            "`{source}` speaks the {} wire format and `{t}` speaks {}: failover needs the same wire format",
                            a.kind.wire(),
                            b.kind.wire()
                        ),
                    ));
                }
                if i >= 64 || allowed & (1u64 << i) == 0 {
                    return Err((
                        f,
                        format!(
                            "`{t}` is not in allowed_providers: failover never reaches a provider the tenant may not use"
                        ),
                    ));
                }
                FailoverStep::Provider(i)
            };
            if steps.contains(&step) {
                return Err((f, format!("`{t}` is listed twice")));
            }
            steps.push(step);
        }
        if !steps.is_empty() {
            out.push((src, steps.into_boxed_slice()));
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use crate::config::{FailoverStep, test_parse as parse};

    #[test]
    fn failover_chains_resolve_and_check_the_wire_format() {
        let c = parse(
            "defaults: { failover: { openai: [openrouter, platform] } }\n\
             tenants:\n  acme: { failover: { anthropic: [platform] } }\n  solo: { failover: {} }\n",
        )
        .unwrap();
        let (o, r, a) = (
            c.provider_index("openai").unwrap(),
            c.provider_index("openrouter").unwrap(),
            c.provider_index("anthropic").unwrap(),
        );
        let other = c.policy("other");
        assert_eq!(
            other.failover_of(o),
            [FailoverStep::Provider(r), FailoverStep::Platform]
        );
        assert!(other.failover_of(a).is_empty());
        // A tenant's map replaces the defaults' whole.
        assert!(c.policy("acme").failover_of(o).is_empty());
        assert_eq!(c.policy("acme").failover_of(a), [FailoverStep::Platform]);
        assert!(c.policy("solo").failover_of(o).is_empty());
        // OpenAI-compatible kinds pair; ollama speaks the OpenAI API too.
        assert!(parse("defaults: { failover: { openai: [ollama, groq] } }\n").is_ok());
        for (y, want) in [
            (
                "defaults: { failover: { openai: [anthropic] } }\n",
                "same wire format",
            ),
            (
                "defaults: { failover: { openai: [azure] } }\n",
                "unknown provider",
            ),
            ("defaults: { failover: { openai: [openai] } }\n", "itself"),
            (
                "defaults: { failover: { openai: [nope] } }\n",
                "unknown provider `nope`",
            ),
            (
                "defaults: { failover: { nope: [platform] } }\n",
                "unknown provider `nope`",
            ),
            (
                "defaults: { failover: { openai: [platform, platform] } }\n",
                "twice",
            ),
            (
                "defaults: { allowed_providers: [openai], failover: { openai: [groq] } }\n",
                "allowed_providers",
            ),
        ] {
            let err = parse(y).unwrap_err().to_string();
            assert!(err.contains(want), "{y}: {err}");
            assert!(err.contains(".failover."), "{y}: {err}");
        }
        let azure = "providers: { azure: { base_url: \"https://x.openai.azure.com\" } }\n";
        let err = parse(&format!(
            "{azure}defaults: {{ failover: {{ azure: [openai] }} }}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("azure wire format"), "{err}");
    }
}
