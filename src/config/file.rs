//! The YAML file schema, as written: every struct rejects unknown keys, and a parse error is
//! one line naming the position and the field. Nothing here checks meaning; the section
//! validators do that.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Dur;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub(crate) listen: Option<SocketAddr>,
    #[serde(default)]
    pub(crate) admin: AdminFile,
    pub(crate) tls: Option<TlsFile>,
    pub(crate) identity: Option<Vec<IdentityFile>>,
    pub(crate) kms: Option<KmsFile>,
    pub(crate) store: Option<StoreFile>,
    #[serde(default)]
    pub(crate) key_cache: KeyCacheFile,
    #[serde(default)]
    pub(crate) providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    pub(crate) upstream: UpstreamFile,
    #[serde(default)]
    pub(crate) defaults: PolicyFile,
    #[serde(default)]
    pub(crate) tenants: BTreeMap<String, PolicyFile>,
    pub(crate) pricing: Option<PathBuf>,
    pub(crate) audit: Option<AuditFile>,
    pub(crate) shared_state: Option<SharedStateFile>,
    #[serde(default)]
    pub(crate) limits: LimitsFile,
    #[serde(default)]
    pub(crate) metrics: MetricsFile,
    /// `registered` (default) or `open`: whether a tenant named by a trusted source must
    /// have a key or token in the store (or a config entry) to exist.
    pub(crate) tenants_from_identity: Option<String>,
    /// Model aliases for `/v1`: alias => `provider/model`, or candidates and a rule.
    #[serde(default)]
    pub(crate) models: BTreeMap<String, ModelFile>,
    #[serde(default)]
    pub(crate) end_user: EndUserFile,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) token_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFile {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) enum IdentityFile {
    Header(HeaderSourceFile),
    Bearer(EmptyFile),
    Mtls(MtlsSourceFile),
    Passthrough(PassthroughFile),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmptyFile {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HeaderSourceFile {
    #[serde(default = "default_tenant_header")]
    pub(crate) name: String,
    pub(crate) only_from: Option<String>,
}

fn default_tenant_header() -> String {
    "x-tenant-id".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MtlsSourceFile {
    pub(crate) uri_san_prefix: Option<String>,
    pub(crate) subject_cn: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PassthroughFile {
    pub(crate) key_header: Option<String>,
    pub(crate) provider_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KmsFile {
    pub(crate) local: Option<LocalKmsFile>,
    pub(crate) aws: Option<AwsKmsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LocalKmsFile {
    pub(crate) keks: BTreeMap<String, PathBuf>,
    pub(crate) active: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsKmsFile {
    pub(crate) key_id: String,
    pub(crate) region: Option<String>,
    pub(crate) endpoint_url: Option<String>,
    pub(crate) timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoreFile {
    pub(crate) file: Option<FileStoreFile>,
    pub(crate) postgres: Option<PostgresFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileStoreFile {
    pub(crate) path: PathBuf,
    pub(crate) ledger: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PostgresFile {
    pub(crate) url: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyCacheFile {
    pub(crate) ttl: Option<Dur>,
    pub(crate) stale_ttl: Option<Dur>,
    pub(crate) max_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProviderFile {
    pub(crate) kind: Option<String>,
    pub(crate) base_url: Option<String>,
    /// Ask OpenAI-wire streams for usage (`stream_options.include_usage`) when the app did not.
    pub(crate) stream_usage: Option<bool>,
    /// The cloud region of a kind that signs requests for one (Bedrock).
    pub(crate) region: Option<String>,
    /// `environment`: the `_platform` fallback takes its credential from the environment.
    pub(crate) platform_credentials: Option<String>,
    /// Vertex: the location (its `region`), the project for accounts that name none, and
    /// where tokens are minted.
    pub(crate) location: Option<String>,
    pub(crate) project: Option<String>,
    pub(crate) token_uri: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamFile {
    /// Extra PEM CA bundle trusted for upstream TLS, on top of the webpki roots.
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) connect_timeout: Option<Dur>,
    pub(crate) pool_idle_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub(crate) default_provider: Option<String>,
    pub(crate) allowed_providers: Option<Vec<String>>,
    pub(crate) fallback: Option<Vec<String>>,
    pub(crate) passthrough: Option<bool>,
    pub(crate) limits: Option<LimitsFile_>,
    pub(crate) budget: Option<BudgetFile>,
    pub(crate) failover: Option<BTreeMap<String, Vec<String>>>,
    /// Refuse requests that name no end user.
    pub(crate) require_end_user: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditFile {
    pub(crate) file: Option<PathBuf>,
    /// `stdout` or `stderr` instead of a file.
    pub(crate) stream: Option<String>,
    pub(crate) on_error: Option<String>,
}

/// `limits` under `defaults` or a tenant (named with a trailing underscore: the top-level
/// `limits` block is the request-size one).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile_ {
    pub(crate) requests_per_minute: Option<u32>,
    pub(crate) tokens_per_minute: Option<u64>,
    pub(crate) concurrent: Option<u32>,
    pub(crate) on_shared_state_error: Option<String>,
    /// Limits of one (tenant, provider), on top of the tenant's.
    pub(crate) providers: Option<BTreeMap<String, LimitsFile_>>,
    /// Limits of each end user of the tenant, on top of the tenant's.
    pub(crate) end_user: Option<Box<LimitsFile_>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct BudgetFile {
    pub(crate) monthly_usd: Option<f64>,
    pub(crate) end_user_monthly_usd: Option<f64>,
    pub(crate) alert_at: Option<f64>,
    pub(crate) on_exhausted: Option<String>,
    pub(crate) default_max_tokens: Option<u64>,
    pub(crate) on_shared_state_error: Option<String>,
}

/// One `models:` alias: `provider/model`, or `{ candidates: [provider/model, ...], rule }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum ModelFile {
    One(String),
    Tier {
        candidates: Vec<String>,
        rule: Option<String>,
    },
}

/// `end_user`: where the end user inside a tenant is named.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndUserFile {
    pub(crate) header: Option<String>,
    pub(crate) from_body: Option<bool>,
    pub(crate) forward: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SharedStateFile {
    pub(crate) redis: Option<RedisFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedisFile {
    pub(crate) url: String,
    pub(crate) prefix: Option<String>,
    pub(crate) timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    pub(crate) max_header_bytes: Option<usize>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) max_body_bytes: Option<u64>,
    pub(crate) header_timeout: Option<Dur>,
    pub(crate) first_byte_timeout: Option<Dur>,
    pub(crate) idle_timeout: Option<Dur>,
    pub(crate) drain_timeout: Option<Dur>,
    pub(crate) body_timeout: Option<Dur>,
    pub(crate) keepalive_timeout: Option<Dur>,
    pub(crate) max_buffered_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsFile {
    pub(crate) max_tenants: Option<usize>,
    pub(crate) max_models_per_tenant: Option<usize>,
    pub(crate) max_models: Option<usize>,
}

/// Parses the YAML into the file schema. A failure is one line: `LINE:COLUMN: FIELD.PATH: what
/// was wrong, what was expected`, with a pointer to the reference.
pub(super) fn parse_file(text: &str) -> Result<FileConfig, String> {
    let options = serde_saphyr::options! { with_snippet: false };
    let mut track = serde_path_to_error::Track::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        FileConfig::deserialize(serde_path_to_error::Deserializer::new(de, &mut track))
    });
    let e = match parsed {
        Ok(file) => return Ok(file),
        Err(e) => e,
    };
    let at = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| format!("line {} column {}: ", l.line(), l.column()))
        .unwrap_or_default();
    let field = track.path().to_string();
    let field = if field.is_empty() || field == "." || field == "?" {
        String::new()
    } else {
        format!("{field}: ")
    };
    Err(format!(
        "{at}{field}{}; see docs/configuration.md",
        plain_message(&e.to_string())
    ))
}

/// The YAML library's message, without its own position prefix or library-specific hints, and
/// with the expected type in words.
fn plain_message(raw: &str) -> String {
    let mut m = raw.trim();
    if let Some(rest) = m.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        m = &rest[i + 2..];
    }
    let m = m.lines().next().unwrap_or(m);
    let m = m.split(", set DuplicateKeyPolicy").next().unwrap_or(m);
    let m = m.rsplit_once(" at line ").map_or(m, |(head, _)| head);
    if let Some(key) = m.strip_prefix("duplicate mapping key: ") {
        return format!("`{key}` is set twice; keep one");
    }
    for (ty, words) in [
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number, 0 or more"),
        ("usize", "a whole number, 0 or more"),
        ("u16", "a whole number from 0 to 65535"),
        ("f64", "a number"),
        ("bool", "true or false"),
    ] {
        if m == format!("invalid {ty}") {
            return format!("expected {words}");
        }
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use crate::config::test_parse as parse;

    #[test]
    fn parse_errors_are_one_line_with_position_field_and_expectation() {
        let cases = [
            (
                "limits:\n  max_body_bytes: lots\n",
                &[
                    "line 2 column 19",
                    "limits.max_body_bytes",
                    "expected a whole number",
                ][..],
            ),
            (
                "defaults:\n  limits: { requests_per_minute: -5 }\n",
                &[
                    "line 2",
                    "defaults.limits.requests_per_minute",
                    "expected a whole number",
                ],
            ),
            (
                "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n",
                &["line 2 column 1", "`listen` is set twice; keep one"],
            ),
            (
                "limits:\n  idle_timeout: forever\n",
                &[
                    "line 2 column 17",
                    "limits.idle_timeout",
                    "write e.g. 500ms",
                ],
            ),
        ];
        for (yaml, wanted) in cases {
            let err = parse(yaml).unwrap_err().to_string();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.starts_with("/etc/byokd/byokd.yaml: "), "{err}");
            assert_eq!(err.matches("error").count(), 0, "{err}");
            assert!(
                !err.contains("DuplicateKeyPolicy") && !err.contains("?:"),
                "{err}"
            );
            for w in wanted {
                assert!(err.contains(w), "{w:?} missing: {err}");
            }
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = parse("listen: 127.0.0.1:1\nlisten_typo: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_typo"), "{err}");
        assert!(err.contains("byokd.yaml"), "{err}");
    }
}
