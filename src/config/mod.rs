//! Config: parse the YAML into the file schema (`file.rs`), then validate it section by
//! section into the runtime [`Config`].
//!
//! Parsing and validation are separate on purpose: the file schema mirrors the YAML a user
//! writes (DESIGN §3) and rejects unknown keys; the runtime struct is what the hot path reads
//! (provider indexes, allow-lists as bit sets, durations), so no request ever re-interprets
//! config text. Config only assembles: the runtime spec types belong to the modules that use
//! them and are re-exported here. Each section has its own validator file; `validate`
//! calls them in order, and the order is part of the contract (with several mistakes in one
//! file, the first section's error is the one reported).

mod failover;
mod file;
mod identity;
mod keys;
mod limits;
mod policy;
mod providers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::provider::Provider;
use file::{FileConfig, parse_file};

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
    pub tenants: crate::identify::Configured,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    /// Prices loaded from the `pricing` file (empty when none is configured).
    pub pricing: crate::pricing::Pricing,
    pub metric_caps: crate::metrics::LabelCaps,
    /// `tenants_from_identity: open`: a tenant named by a trusted header or a verified
    /// certificate exists with the `defaults` policy even with nothing in the store.
    pub open_tenants: bool,
    /// `models:` aliases a `/v1` request's `model` may name.
    pub models: HashMap<Box<str>, Arc<crate::route::ModelRoute>>,
    /// Where the end user inside a tenant is named.
    pub end_user: crate::identify::EndUserConfig,
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

/// What every section validator needs: where the file is (for errors) and the folder its
/// relative paths resolve against.
struct Ctx<'a> {
    path: &'a Path,
    base_dir: PathBuf,
}

impl<'a> Ctx<'a> {
    fn new(path: &'a Path) -> Self {
        Ctx {
            path,
            base_dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        }
    }

    /// A validation error at `field` (the dotted path in the YAML).
    fn invalid(&self, field: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            message,
        }
    }

    /// A path from the file: absolute as written, relative to the config's folder otherwise.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// The file schema into the runtime config, one section at a time. Providers come before
/// the policies that refer to them by index, identity before the listener check that reads it.
fn validate(file: FileConfig, path: &Path) -> Result<Config, ConfigError> {
    let ctx = Ctx::new(path);
    let tls = identity::tls(&ctx, file.tls.as_ref());
    let shared_state = policy::shared_state(&ctx, file.shared_state.as_ref())?;
    let providers = providers::providers(&ctx, &file.providers)?;
    let (defaults, tenants) = policy::policies(&ctx, &file.defaults, &file.tenants, &providers)?;
    let identity = identity::identity(&ctx, file.identity.as_deref(), file.tls.as_ref())?;
    let listen = limits::listen(&ctx, file.listen, &identity)?;
    let kms = keys::kms(&ctx, file.kms)?;
    let store = keys::store(&ctx, file.store)?;
    let audit = keys::audit(&ctx, file.audit.as_ref())?;
    let admin_token_sha256 = limits::admin_token(&ctx, &file.admin)?;
    let pricing = providers::pricing(&ctx, file.pricing.as_deref())?;
    let models = providers::models(&ctx, &file.models, &providers)?;
    let open_tenants = match file.tenants_from_identity.as_deref() {
        None | Some("registered") => false,
        Some("open") => true,
        Some(other) => {
            return Err(ctx.invalid(
                "tenants_from_identity",
                format!("`{other}` is not `registered` or `open`"),
            ));
        }
    };
    let limits = limits::limits(&ctx, &file.limits)?;
    let end_user = identity::end_user(&ctx, &file.end_user, &identity)?;
    Ok(Config {
        path: path.to_path_buf(),
        listen,
        admin_listen: limits::admin_listen(&file.admin),
        admin_token_sha256,
        identity,
        tls,
        shared_state,
        kms,
        store,
        audit,
        key_cache: keys::key_cache(&file.key_cache),
        providers: providers.into_iter().map(Arc::new).collect(),
        defaults,
        tenants,
        upstream: limits::upstream(&ctx, &file.upstream),
        limits,
        pricing,
        metric_caps: limits::metric_caps(&file.metrics),
        models,
        open_tenants,
        end_user,
    })
}

/// Parses YAML as if read from `/etc/byokd/byokd.yaml`; shared by the section tests.
#[cfg(test)]
fn test_parse(y: &str) -> Result<Config, ConfigError> {
    Config::from_yaml(y, Path::new("/etc/byokd/byokd.yaml"))
}

#[cfg(test)]
mod tests {
    use super::test_parse as parse;
    use super::*;

    #[test]
    fn end_user_policy_inherits_and_stands_alone() {
        let c = parse(
            "end_user: { header: x-app-user }\ndefaults:\n  limits: { end_user: { requests_per_minute: 10 } }\n  budget: { end_user_monthly_usd: 2 }\ntenants:\n  acme: { limits: { end_user: { concurrent: 2 } }, require_end_user: true }\n",
        )
        .unwrap();
        assert_eq!(c.end_user.header.as_str(), "x-app-user");
        assert!(!c.end_user.from_body && !c.end_user.forward);
        // A per-user budget with no tenant budget at all.
        assert!(c.defaults.budget.is_none());
        assert_eq!(
            c.defaults.end_user_budget.as_ref().unwrap().monthly_nanos,
            2_000_000_000
        );
        let acme = c.policy("acme");
        let l = acme.end_user_limits.as_deref().unwrap();
        assert_eq!((l.requests_per_minute, l.concurrent), (Some(10), Some(2)));
        assert!(acme.require_end_user && !c.defaults.require_end_user);
        assert!(acme.end_user_budget.is_some(), "inherited");
        for bad in [
            "defaults: { limits: { end_user: { providers: {} } } }\n",
            "end_user: { header: x-tenant-id }\n",
            "defaults: { budget: { end_user_monthly_usd: -1 } }\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_ledger_sits_beside_the_file_store_unless_moved() {
        let at = |y: &str| match parse(y).map(|c| c.store) {
            Ok(StoreConfig::File { path, ledger }) => Ok((path, ledger)),
            Ok(_) => panic!("not a file store"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            at("store: { file: { path: keys/keys.json } }\n").unwrap(),
            (
                PathBuf::from("/etc/byokd/keys/keys.json"),
                PathBuf::from("/etc/byokd/keys/usage.json")
            )
        );
        let (_, ledger) =
            at("store: { file: { path: /secret/keys.json, ledger: /var/lib/byokd/usage.json } }\n")
                .unwrap();
        assert_eq!(ledger, PathBuf::from("/var/lib/byokd/usage.json"));
        let e = at("store: { file: { path: k.json, ledger: k.json } }\n").unwrap_err();
        assert!(e.contains("store.file.ledger"), "{e}");
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
            matches!(&c.store, StoreConfig::File { path, .. } if path == Path::new("/etc/byokd/.byokd/keys.json"))
        );
        let openai = c.provider_index("openai").unwrap();
        assert_eq!(c.defaults.default_provider, openai);
        assert!(c.defaults.allows(openai));
        // Azure has no default host, so it only exists when configured.
        assert!(c.provider_index("azure").is_none());
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
}
