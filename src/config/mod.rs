//! YAML config: a file struct that rejects unknown keys, validated into the runtime [`Config`].
//!
//! Parsing and validation are separate on purpose: the file struct mirrors the YAML a user
//! writes (DESIGN §3), the runtime struct is what the hot path reads (provider indexes,
//! allow-lists as bit sets, durations), so no request ever re-interprets config text.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::provider::{self, Provider, ProviderKind};

/// Default config path, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/byokd.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// A duration written as `10s`, `5m`, `90d`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses `10s`, `5m`, `90d`; the error says what a valid value looks like.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. 500ms, 10s, 5m, 90d"))
}

// ---------- the file as written ----------

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub admin: AdminFile,
    pub tls: Option<TlsFile>,
    pub identity: Option<Vec<IdentityFile>>,
    pub kms: Option<KmsFile>,
    pub store: Option<StoreFile>,
    #[serde(default)]
    pub key_cache: KeyCacheFile,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderFile>,
    #[serde(default)]
    pub upstream: UpstreamFile,
    #[serde(default)]
    pub defaults: PolicyFile,
    #[serde(default)]
    pub tenants: BTreeMap<String, PolicyFile>,
    pub pricing: Option<PathBuf>,
    pub audit: Option<AuditFile>,
    pub shared_state: Option<SharedStateFile>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub metrics: MetricsFile,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<SocketAddr>,
    pub token_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum IdentityFile {
    Header(HeaderSourceFile),
    Bearer(EmptyFile),
    Mtls(MtlsSourceFile),
    Passthrough(PassthroughFile),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EmptyFile {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSourceFile {
    #[serde(default = "default_tenant_header")]
    pub name: String,
    pub only_from: Option<String>,
}

fn default_tenant_header() -> String {
    "x-tenant-id".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsSourceFile {
    pub uri_san_prefix: Option<String>,
    pub subject_cn: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughFile {
    pub key_header: Option<String>,
    pub provider_header: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsFile {
    pub local: Option<LocalKmsFile>,
    pub aws: Option<AwsKmsFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalKmsFile {
    pub keks: BTreeMap<String, PathBuf>,
    pub active: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsFile {
    pub key_id: String,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    pub file: Option<FileStoreFile>,
    pub postgres: Option<PostgresFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStoreFile {
    pub path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresFile {
    pub url: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct KeyCacheFile {
    pub ttl: Option<Dur>,
    pub stale_ttl: Option<Dur>,
    pub max_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub kind: Option<String>,
    pub base_url: Option<String>,
    /// Ask OpenAI-wire streams for usage (`stream_options.include_usage`) when the app did not.
    pub stream_usage: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    /// Extra PEM CA bundle trusted for upstream TLS, on top of the webpki roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Option<Dur>,
    pub pool_idle_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub default_provider: Option<String>,
    pub allowed_providers: Option<Vec<String>>,
    pub fallback: Option<Vec<String>>,
    pub passthrough: Option<bool>,
    pub limits: Option<LimitsFile_>,
    pub budget: Option<BudgetFile>,
    pub failover: Option<BTreeMap<String, Vec<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    pub file: Option<PathBuf>,
    /// `stdout` or `stderr` instead of a file.
    pub stream: Option<String>,
    pub on_error: Option<String>,
}

/// `limits` under `defaults` or a tenant (named with a trailing underscore: the top-level
/// `limits` block is the request-size one).
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile_ {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub concurrent: Option<u32>,
    pub on_shared_state_error: Option<String>,
    /// Limits of one (tenant, provider), on top of the tenant's.
    pub providers: Option<BTreeMap<String, LimitsFile_>>,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    pub monthly_usd: Option<f64>,
    pub alert_at: Option<f64>,
    pub on_exhausted: Option<String>,
    pub default_max_tokens: Option<u64>,
    pub on_shared_state_error: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedStateFile {
    pub redis: Option<RedisFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    pub url: String,
    pub prefix: Option<String>,
    pub timeout: Option<Dur>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub max_header_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub header_timeout: Option<Dur>,
    pub first_byte_timeout: Option<Dur>,
    pub idle_timeout: Option<Dur>,
    pub drain_timeout: Option<Dur>,
    pub body_timeout: Option<Dur>,
    pub keepalive_timeout: Option<Dur>,
    pub max_buffered_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    pub max_tenants: Option<usize>,
    pub max_models_per_tenant: Option<usize>,
    pub max_models: Option<usize>,
}

/// Parses the YAML into the file schema. A failure is one line: `LINE:COLUMN: FIELD.PATH: what
/// was wrong, what was expected`, with a pointer to the reference.
fn parse_file(text: &str) -> Result<FileConfig, String> {
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
        "{at}{field}{}; see the configuration reference in README.md",
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

// ---------- the validated runtime config ----------

pub use crate::accept::Limits;
pub use crate::audit::AuditConfig;
pub use crate::forward::UpstreamConfig;
pub use crate::identify::{CertTenant, HeaderTrust, IdentitySource};
pub use crate::keys::{KeyCacheConfig, KmsConfig, StoreConfig};
pub use crate::policy::{FailoverStep, TenantPolicy};

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token_sha256: Option<[u8; 32]>,
    pub identity: Vec<IdentitySource>,
    pub tls: Option<crate::tls::TlsFiles>,
    pub shared_state: Option<crate::policy::RedisConfig>,
    pub kms: KmsConfig,
    pub store: StoreConfig,
    pub key_cache: KeyCacheConfig,
    pub audit: AuditConfig,
    pub providers: Vec<Arc<Provider>>,
    pub defaults: TenantPolicy,
    /// Tenants with config overrides; the key is the canonical tenant name.
    pub tenants: HashMap<Arc<str>, TenantPolicy>,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    /// Prices loaded from the `pricing` file (empty when none is configured).
    pub pricing: crate::pricing::Pricing,
    pub metric_caps: crate::metrics::LabelCaps,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    /// Parses YAML text as if read from `path` (relative paths resolve against its folder).
    pub fn from_yaml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let file = parse_file(text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        validate(file, path)
    }

    pub fn provider_index(&self, name: &str) -> Option<usize> {
        self.providers.iter().position(|p| &*p.name == name)
    }

    /// The policy for `tenant`: its override or the defaults.
    pub fn policy(&self, tenant: &str) -> &TenantPolicy {
        self.tenants.get(tenant).unwrap_or(&self.defaults)
    }
}

/// Wire formats a request can move between unchanged: the same kind, or two kinds that
/// speak the OpenAI API (Azure has its own paths and auth, so it pairs only with Azure).
fn same_wire(a: ProviderKind, b: ProviderKind) -> bool {
    let openai_like = |k| matches!(k, ProviderKind::OpenAi | ProviderKind::Ollama);
    a == b || (openai_like(a) && openai_like(b))
}

/// Resolves `failover: { source: [target, ...] }` into provider indexes; the error is
/// (field, message).
#[allow(clippy::type_complexity)]
fn failover_chains(
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
                if !same_wire(a.kind, b.kind) {
                    return Err((
                        f,
                        format!(
                            "`{source}` speaks the {} wire format and `{t}` speaks {}: failover needs the same wire format (the same kind, or two OpenAI-compatible kinds: openai, ollama)",
                            a.kind.as_str(),
                            b.kind.as_str()
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

fn validate(file: FileConfig, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        field: field.to_string(),
        message,
    };
    let base_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let resolve = |p: &Path| -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        }
    };
    let tls = file.tls.as_ref().map(|t| crate::tls::TlsFiles {
        cert: resolve(&t.cert),
        key: resolve(&t.key),
        client_ca: t.client_ca.as_deref().map(resolve),
    });
    let shared_state = match file.shared_state.as_ref().and_then(|s| s.redis.as_ref()) {
        None => None,
        Some(r) => {
            if r.url.starts_with("rediss://") {
                return Err(invalid(
                    "shared_state.redis.url",
                    "TLS to Redis (rediss://) is not supported in this version; reach Redis \
                     over a private network or a local TLS tunnel with redis://"
                        .into(),
                ));
            }
            if !r.url.starts_with("redis://") {
                return Err(invalid(
                    "shared_state.redis.url",
                    "expected a redis:// URL".into(),
                ));
            }
            Some(crate::policy::RedisConfig {
                url: crate::vocab::Redacted(r.url.clone()),
                prefix: r.prefix.clone().unwrap_or_else(|| "byokd:".into()),
                timeout: r.timeout.map_or(Duration::from_millis(500), |d| d.0),
            })
        }
    };

    // Providers: built-ins first, then config entries override or add.
    let mut providers: Vec<Provider> = provider::builtins();
    for (name, pf) in &file.providers {
        let field = format!("providers.{name}");
        if !crate::vocab::valid_tenant_id(name) || name == "v1" || name == "byokd" {
            return Err(invalid(
                &field,
                "provider names use [A-Za-z0-9_.:-] and cannot be `v1` or `byokd`".into(),
            ));
        }
        let existing = providers.iter().position(|p| &*p.name == name.as_str());
        let kind = match (&pf.kind, existing) {
            (Some(k), _) => ProviderKind::parse(k).ok_or_else(|| {
                invalid(
                    &format!("{field}.kind"),
                    format!(
                        "unknown kind `{k}`; use one of openai, anthropic, gemini, azure, ollama"
                    ),
                )
            })?,
            (None, Some(i)) => providers[i].kind,
            (None, None) => {
                return Err(invalid(
                    &format!("{field}.kind"),
                    "a provider that is not built in needs a kind".into(),
                ));
            }
        };
        let base_url = match (&pf.base_url, existing) {
            (Some(u), _) => u.clone(),
            (None, Some(i)) => providers[i].base_url.clone(),
            (None, None) => {
                return Err(invalid(
                    &format!("{field}.base_url"),
                    "a provider that is not built in needs a base_url".into(),
                ));
            }
        };
        let mut p = Provider::new(name, kind, &base_url)
            .map_err(|m| invalid(&format!("{field}.base_url"), m))?;
        if let Some(su) = pf.stream_usage {
            if su && matches!(kind, ProviderKind::Anthropic | ProviderKind::Gemini) {
                return Err(invalid(
                    &format!("{field}.stream_usage"),
                    "only OpenAI-wire providers (openai, azure, ollama) have stream_options".into(),
                ));
            }
            p.stream_usage = su;
        }
        match existing {
            Some(i) => providers[i] = p,
            None => providers.push(p),
        }
    }
    // Azure has no public default host: it is usable only once configured.
    providers.retain(|p| !p.base_url.is_empty());
    if providers.len() > 64 {
        return Err(invalid(
            "providers",
            "at most 64 providers are supported".into(),
        ));
    }
    let index = |name: &str| providers.iter().position(|p| &*p.name == name);

    let policy = |field: &str, pf: &PolicyFile, base: Option<&TenantPolicy>| {
        let default_provider = match &pf.default_provider {
            Some(n) => index(n).ok_or_else(|| {
                invalid(
                    &format!("{field}.default_provider"),
                    format!("unknown provider `{n}`"),
                )
            })?,
            None => match base {
                Some(b) => b.default_provider,
                None => index("openai").unwrap_or(0),
            },
        };
        let allowed = match &pf.allowed_providers {
            Some(list) => {
                let mut bits = 0u64;
                for n in list {
                    let i = index(n).ok_or_else(|| {
                        invalid(
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
                        return Err(invalid(
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
        let fail_mode = |f: &str, v: Option<&str>, default| match v {
            None => Ok(default),
            Some("fail_open") => Ok(crate::policy::FailMode::Open),
            Some("fail_closed") => Ok(crate::policy::FailMode::Closed),
            Some(o) => Err(invalid(f, format!("`{o}`: use fail_open or fail_closed"))),
        };
        let limit_spec = |f: &str,
                          l: &LimitsFile_,
                          base: Option<&crate::policy::LimitSpec>|
         -> Result<crate::policy::LimitSpec, ConfigError> {
            let spec = crate::policy::LimitSpec {
                requests_per_minute: l
                    .requests_per_minute
                    .or(base.and_then(|b| b.requests_per_minute)),
                tokens_per_minute: l
                    .tokens_per_minute
                    .or(base.and_then(|b| b.tokens_per_minute)),
                concurrent: l.concurrent.or(base.and_then(|b| b.concurrent)),
                on_shared_state_error: fail_mode(
                    &format!("{f}.on_shared_state_error"),
                    l.on_shared_state_error.as_deref(),
                    base.map_or(crate::policy::FailMode::Open, |b| b.on_shared_state_error),
                )?,
            };
            if [
                spec.requests_per_minute.map(u64::from),
                spec.tokens_per_minute,
                spec.concurrent.map(u64::from),
            ]
            .contains(&Some(0))
            {
                return Err(invalid(
                    f,
                    "a limit of 0 refuses everything; leave it out for no limit".into(),
                ));
            }
            Ok(spec)
        };
        let (limits, provider_limits) = match &pf.limits {
            None => (
                base.and_then(|b| b.limits.clone()),
                base.map(|b| b.provider_limits.clone()).unwrap_or_default(),
            ),
            Some(l) => {
                let f = format!("{field}.limits");
                let spec = limit_spec(&f, l, base.and_then(|b| b.limits.as_deref()))?;
                let mut per = base.map(|b| b.provider_limits.clone()).unwrap_or_default();
                for (name, pl) in l.providers.iter().flatten() {
                    let i = index(name).ok_or_else(|| {
                        invalid(
                            &format!("{f}.providers"),
                            format!("unknown provider `{name}`"),
                        )
                    })?;
                    let pf = format!("{f}.providers.{name}");
                    if pl.providers.is_some() {
                        return Err(invalid(&pf, "providers cannot nest".into()));
                    }
                    per.retain(|(j, _)| *j != i);
                    per.push((i, Arc::new(limit_spec(&pf, pl, None)?)));
                }
                let any = spec.requests_per_minute.is_some()
                    || spec.tokens_per_minute.is_some()
                    || spec.concurrent.is_some();
                (any.then(|| Arc::new(spec)), per)
            }
        };
        let budget = match (&pf.budget, base.and_then(|b| b.budget.as_ref())) {
            (None, b) => b.cloned(),
            (Some(bf), b) => {
                let f = format!("{field}.budget");
                let monthly_nanos = match (bf.monthly_usd, b) {
                    (Some(usd), _) if usd.is_finite() && usd >= 0.0 => (usd * 1e9).round() as u64,
                    (Some(_), _) => {
                        return Err(invalid(
                            &format!("{f}.monthly_usd"),
                            "a non-negative amount in USD".into(),
                        ));
                    }
                    (None, Some(b)) => b.monthly_nanos,
                    (None, None) => {
                        return Err(invalid(&format!("{f}.monthly_usd"), "required".into()));
                    }
                };
                let alert_at = bf.alert_at.or(b.and_then(|b| b.alert_at));
                if alert_at.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
                    return Err(invalid(
                        &format!("{f}.alert_at"),
                        "a fraction between 0 and 1".into(),
                    ));
                }
                let cut = match bf.on_exhausted.as_deref() {
                    None => b.is_some_and(|b| b.cut),
                    Some("reject") => false,
                    Some("cut") => true,
                    Some(o) => {
                        return Err(invalid(
                            &format!("{f}.on_exhausted"),
                            format!("`{o}`: use reject or cut"),
                        ));
                    }
                };
                Some(crate::policy::BudgetSpec {
                    monthly_nanos,
                    alert_at,
                    cut,
                    default_max_tokens: bf
                        .default_max_tokens
                        .or(b.map(|b| b.default_max_tokens))
                        .unwrap_or(4096),
                    on_shared_state_error: fail_mode(
                        &format!("{f}.on_shared_state_error"),
                        bf.on_shared_state_error.as_deref(),
                        b.map_or(crate::policy::FailMode::Closed, |b| b.on_shared_state_error),
                    )?,
                })
            }
        };
        let failover = match &pf.failover {
            Some(map) => {
                failover_chains(field, map, &providers, allowed).map_err(|(f, m)| invalid(&f, m))?
            }
            None => base.map_or_else(|| Arc::from([]), |b| b.failover.clone()),
        };
        Ok::<_, ConfigError>(TenantPolicy {
            default_provider,
            allowed,
            platform_fallback,
            passthrough,
            limits,
            provider_limits,
            budget,
            failover,
        })
    };
    let defaults = policy("defaults", &file.defaults, None)?;
    let mut tenants = HashMap::new();
    for (name, pf) in &file.tenants {
        if !crate::vocab::valid_tenant_id(name) || crate::vocab::reserved_tenant_id(name) {
            return Err(invalid(
                &format!("tenants.{name}"),
                "tenant ids use [A-Za-z0-9_.:-]{1,128} and do not start with `_` (reserved)".into(),
            ));
        }
        let p = policy(&format!("tenants.{name}"), pf, Some(&defaults))?;
        tenants.insert(Arc::<str>::from(name.as_str()), p);
    }

    let header_name = |field: &str, n: &str| {
        http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| invalid(field, format!("`{n}` is not a header name")))
    };
    let identity = match &file.identity {
        None => vec![
            IdentitySource::Header {
                name: http::HeaderName::from_static("x-tenant-id"),
                only_from: HeaderTrust::Loopback,
            },
            IdentitySource::Bearer,
        ],
        Some(list) => {
            let mut out = Vec::new();
            for (i, src) in list.iter().enumerate() {
                let field = format!("identity[{i}]");
                out.push(match src {
                    IdentityFile::Header(h) => {
                        let only_from = match h.only_from.as_deref() {
                            None | Some("loopback") => HeaderTrust::Loopback,
                            Some("mtls") => HeaderTrust::Mtls,
                            Some("any") => HeaderTrust::Any,
                            Some(o) => {
                                return Err(invalid(
                                    &format!("{field}.header.only_from"),
                                    format!("`{o}`: use loopback, mtls or any"),
                                ));
                            }
                        };
                        if only_from == HeaderTrust::Mtls
                            && file.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
                        {
                            return Err(invalid(
                                &format!("{field}.header.only_from"),
                                "`mtls` needs tls.client_ca (client certificates)".into(),
                            ));
                        }
                        IdentitySource::Header {
                            name: header_name(&field, &h.name)?,
                            only_from,
                        }
                    }
                    IdentityFile::Bearer(_) => IdentitySource::Bearer,
                    IdentityFile::Mtls(m) => {
                        if file.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
                            return Err(invalid(
                                &format!("{field}.mtls"),
                                "the mtls source needs tls.cert, tls.key and tls.client_ca".into(),
                            ));
                        }
                        match (&m.uri_san_prefix, m.subject_cn) {
                            (Some(p), None | Some(false)) if !p.is_empty() => {
                                IdentitySource::Mtls(CertTenant::UriSanPrefix(p.clone()))
                            }
                            (None, Some(true)) => IdentitySource::Mtls(CertTenant::SubjectCn),
                            _ => {
                                return Err(invalid(
                                    &format!("{field}.mtls"),
                                    "set exactly one of uri_san_prefix (e.g. \
                                     \"spiffe://example.org/tenant/\") or subject_cn: true"
                                        .into(),
                                ));
                            }
                        }
                    }
                    IdentityFile::Passthrough(p) => IdentitySource::Passthrough {
                        key_header: header_name(
                            &field,
                            p.key_header.as_deref().unwrap_or("x-user-api-key"),
                        )?,
                        provider_header: header_name(
                            &field,
                            p.provider_header.as_deref().unwrap_or("x-user-provider"),
                        )?,
                    },
                });
            }
            if !out
                .iter()
                .any(|s| !matches!(s, IdentitySource::Passthrough { .. }))
            {
                return Err(invalid(
                    "identity",
                    "list at least one source that names the tenant (header, bearer, mtls)".into(),
                ));
            }
            out
        }
    };

    let listen = file.listen.unwrap_or(([127, 0, 0, 1], 8787).into());
    if !listen.ip().is_loopback()
        && identity.iter().any(|s| {
            matches!(
                s,
                IdentitySource::Header {
                    only_from: HeaderTrust::Any,
                    ..
                }
            )
        })
    {
        return Err(invalid(
            "identity",
            format!(
                "`only_from: any` trusts the tenant header from anyone, and `listen` is \
                 {listen}, not loopback; use only_from: loopback or mtls, or bearer tokens"
            ),
        ));
    }

    let kms = match file.kms {
        None => KmsConfig::Local {
            keks: vec![("k1".into(), resolve(Path::new(".byokd/kek-k1")))],
            active: "k1".into(),
        },
        Some(KmsFile {
            aws: Some(a),
            local: None,
        }) => {
            if a.key_id.trim().is_empty() {
                return Err(invalid(
                    "kms.aws.key_id",
                    "set the KMS key id, ARN or alias".into(),
                ));
            }
            KmsConfig::Aws(crate::keys::aws::AwsKmsConfig {
                key_id: a.key_id,
                region: a.region,
                endpoint_url: a.endpoint_url,
                timeout: a.timeout.map_or(Duration::from_secs(2), |d| d.0),
            })
        }
        Some(KmsFile {
            aws: Some(_),
            local: Some(_),
        }) => return Err(invalid("kms", "set kms.local or kms.aws, not both".into())),
        Some(KmsFile {
            local: Some(l),
            aws: None,
        }) => {
            if !l.keks.contains_key(&l.active) {
                return Err(invalid(
                    "kms.local.active",
                    format!("`{}` is not one of kms.local.keks", l.active),
                ));
            }
            KmsConfig::Local {
                keks: l
                    .keks
                    .iter()
                    .map(|(k, p)| (k.clone(), resolve(p)))
                    .collect(),
                active: l.active,
            }
        }
        Some(KmsFile {
            local: None,
            aws: None,
        }) => return Err(invalid("kms", "set kms.local or kms.aws".into())),
    };

    let store = match file.store {
        None => StoreConfig::File {
            path: resolve(Path::new(".byokd/keys.json")),
        },
        Some(StoreFile {
            postgres: Some(pg),
            file: None,
        }) => {
            if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
                return Err(invalid(
                    "store.postgres.url",
                    "expected a postgres:// URL".into(),
                ));
            }
            StoreConfig::Postgres {
                url: crate::vocab::Redacted(pg.url),
            }
        }
        Some(StoreFile {
            postgres: Some(_),
            file: Some(_),
        }) => {
            return Err(invalid(
                "store",
                "set store.file or store.postgres, not both".into(),
            ));
        }
        Some(StoreFile {
            file: Some(f),
            postgres: None,
        }) => StoreConfig::File {
            path: resolve(&f.path),
        },
        Some(StoreFile {
            file: None,
            postgres: None,
        }) => return Err(invalid("store", "set store.file or store.postgres".into())),
    };
    let audit = match &file.audit {
        None => AuditConfig {
            target: crate::audit::AuditTarget::Log,
            on_error: crate::audit::OnError::FailClosed,
        },
        Some(a) => {
            let target = match (&a.file, a.stream.as_deref()) {
                (Some(f), None) => crate::audit::AuditTarget::File(resolve(f)),
                (None, Some("stdout")) => crate::audit::AuditTarget::Stdout,
                (None, Some("stderr")) => crate::audit::AuditTarget::Stderr,
                (None, None) => crate::audit::AuditTarget::Log,
                (None, Some(other)) => {
                    return Err(invalid(
                        "audit.stream",
                        format!("`{other}`: use stdout or stderr, or audit.file"),
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "audit",
                        "set audit.file or audit.stream, not both".into(),
                    ));
                }
            };
            let on_error = match a.on_error.as_deref() {
                None | Some("fail_closed") => crate::audit::OnError::FailClosed,
                Some("fail_open") => crate::audit::OnError::FailOpen,
                Some(other) => {
                    return Err(invalid(
                        "audit.on_error",
                        format!("`{other}`: use fail_closed or fail_open"),
                    ));
                }
            };
            AuditConfig { target, on_error }
        }
    };

    let admin_token_sha256 = match &file.admin.token_sha256 {
        None => None,
        Some(h) => {
            let mut out = [0u8; 32];
            hex::decode_to_slice(h.trim(), &mut out).map_err(|_| {
                invalid(
                    "admin.token_sha256",
                    "expected 64 hex characters (sha256sum of the admin token)".into(),
                )
            })?;
            Some(out)
        }
    };

    let pricing = match file.pricing.as_deref().map(resolve) {
        None => crate::pricing::Pricing::default(),
        Some(p) => {
            crate::pricing::Pricing::load(&p).map_err(|e| invalid("pricing", e.to_string()))?
        }
    };

    let d = Limits::default();
    let l = &file.limits;
    let limits = Limits {
        max_header_bytes: l.max_header_bytes.unwrap_or(d.max_header_bytes),
        max_headers: l.max_headers.unwrap_or(d.max_headers),
        max_body_bytes: l.max_body_bytes.unwrap_or(d.max_body_bytes),
        header_timeout: l.header_timeout.map_or(d.header_timeout, |x| x.0),
        first_byte_timeout: l.first_byte_timeout.map_or(d.first_byte_timeout, |x| x.0),
        idle_timeout: l.idle_timeout.map_or(d.idle_timeout, |x| x.0),
        drain_timeout: l.drain_timeout.map_or(d.drain_timeout, |x| x.0),
        body_timeout: l.body_timeout.map_or(d.body_timeout, |x| x.0),
        keepalive_timeout: l.keepalive_timeout.map_or(d.keepalive_timeout, |x| x.0),
        max_buffered_bytes: l.max_buffered_bytes.unwrap_or(d.max_buffered_bytes),
    };
    if limits.max_buffered_bytes < crate::stream_usage::MAX_INSPECTED_BODY as u64 + 65536 {
        return Err(invalid(
            "limits.max_buffered_bytes",
            format!(
                "must be at least {} (one inspected body)",
                crate::stream_usage::MAX_INSPECTED_BODY + 65536
            ),
        ));
    }
    if limits.max_header_bytes < 1024 || limits.max_headers == 0 {
        return Err(invalid(
            "limits",
            "max_header_bytes must be at least 1024 and max_headers at least 1".into(),
        ));
    }

    Ok(Config {
        path: path.to_path_buf(),
        listen,
        admin_listen: file.admin.listen.unwrap_or(([127, 0, 0, 1], 9787).into()),
        admin_token_sha256,
        identity,
        tls,
        shared_state,
        kms,
        store,
        audit,
        key_cache: KeyCacheConfig {
            ttl: file.key_cache.ttl.map_or(Duration::from_secs(300), |d| d.0),
            stale_ttl: file
                .key_cache
                .stale_ttl
                .map_or(Duration::from_secs(3600), |d| d.0),
            max_entries: file.key_cache.max_entries.unwrap_or(100_000),
        },
        providers: providers.into_iter().map(Arc::new).collect(),
        defaults,
        tenants,
        upstream: UpstreamConfig {
            ca_file: file.upstream.ca_file.as_deref().map(resolve),
            connect_timeout: file
                .upstream
                .connect_timeout
                .map_or(Duration::from_secs(10), |d| d.0),
            pool_idle_timeout: file
                .upstream
                .pool_idle_timeout
                .map_or(Duration::from_secs(90), |d| d.0),
        },
        limits,
        pricing,
        metric_caps: {
            let d = crate::metrics::LabelCaps::default();
            crate::metrics::LabelCaps {
                max_tenants: file.metrics.max_tenants.unwrap_or(d.max_tenants),
                max_models_per_tenant: file
                    .metrics
                    .max_models_per_tenant
                    .unwrap_or(d.max_models_per_tenant),
                max_models: file.metrics.max_models.unwrap_or(d.max_models),
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(y, Path::new("/etc/byokd/byokd.yaml"))
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c =
            parse("providers:\n  openai: { kind: openai, base_url: \"https://api.openai.com\" }\n")
                .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9787");
        assert_eq!(c.limits.max_body_bytes, 32 * 1024 * 1024);
        assert!(
            matches!(&c.store, StoreConfig::File { path } if path == Path::new("/etc/byokd/.byokd/keys.json"))
        );
        let openai = c.provider_index("openai").unwrap();
        assert_eq!(c.defaults.default_provider, openai);
        assert!(c.defaults.allows(openai));
        // Azure has no default host, so it only exists when configured.
        assert!(c.provider_index("azure").is_none());
    }

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

    #[test]
    fn bad_values_are_errors_with_the_field() {
        let err = parse("defaults:\n  allowed_providers: [nope]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("defaults.allowed_providers") && err.contains("nope"),
            "{err}"
        );
        let err = parse("limits: { idle_timeout: forever }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("forever"), "{err}");
    }

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

    #[test]
    fn header_identity_trusted_from_anyone_needs_a_loopback_listener() {
        // The default header source believes loopback peers only, checked per request.
        assert!(parse("listen: 0.0.0.0:8787\n").is_ok());
        let any = "identity: [ { header: { name: x-tenant-id, only_from: any } } ]\n";
        let err = parse(&format!("listen: 0.0.0.0:8787\n{any}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("loopback"), "{err}");
        assert!(parse(any).is_ok());
        let err = parse("identity: [ { header: { only_from: mtls } } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_ca"), "{err}");
        let err = parse("identity: [ { mtls: { subject_cn: true } } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("client_ca"), "{err}");
        let mtls = "tls: { cert: c, key: k, client_ca: ca }\n";
        let err = parse(&format!("{mtls}identity: [ {{ mtls: {{}} }} ]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one"), "{err}");
        let c = parse(&format!(
            "{mtls}identity: [ {{ mtls: {{ uri_san_prefix: \"spiffe://x/t/\" }} }}, {{ passthrough: {{}} }} ]\n"
        ))
        .unwrap();
        assert!(
            matches!(&c.identity[0], IdentitySource::Mtls(CertTenant::UriSanPrefix(p)) if p == "spiffe://x/t/")
        );
        let err = parse("identity: [ { passthrough: {} } ]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("names the tenant"), "{err}");
        assert!(parse("listen: 0.0.0.0:8787\nidentity: [ { bearer: {} } ]\n").is_ok());
        let err = parse("tenants:\n  _platform: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
    }

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
