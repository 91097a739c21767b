//! Validates where keys live and who hears about them: `kms` (local KEK files or AWS KMS),
//! `store` (key file or PostgreSQL), `key_cache`, and `audit` (where key events are written).

use std::path::Path;
use std::time::Duration;

use super::file::{AuditFile, KeyCacheFile, KmsFile, StoreFile};
use super::{AuditConfig, ConfigError, Ctx, KeyCacheConfig, KmsConfig, StoreConfig};
use crate::audit::{AuditTarget, OnError};

/// `kms`: exactly one of `local` and `aws`; none configured is one local KEK next to the
/// config.
pub(super) fn kms(ctx: &Ctx, file: Option<KmsFile>) -> Result<KmsConfig, ConfigError> {
    Ok(match file {
        None => KmsConfig::Local {
            keks: vec![("k1".into(), ctx.resolve(Path::new(".byokd/kek-k1")))],
            active: "k1".into(),
        },
        Some(KmsFile {
            aws: Some(a),
            local: None,
        }) => {
            if a.key_id.trim().is_empty() {
                return Err(
                    ctx.invalid("kms.aws.key_id", "set the KMS key id, ARN or alias".into())
                );
            }
            if !cfg!(feature = "aws-kms") {
                return Err(ctx.invalid(
                    "kms.aws",
                    "this byokd was built without the `aws-kms` feature; build it with default features".into(),
                ));
            }
            KmsConfig::Aws(crate::keys::AwsKmsConfig {
                key_id: a.key_id,
                region: a.region,
                endpoint_url: a.endpoint_url,
                timeout: a.timeout.map_or(Duration::from_secs(2), |d| d.0),
            })
        }
        Some(KmsFile {
            aws: Some(_),
            local: Some(_),
        }) => return Err(ctx.invalid("kms", "set kms.local or kms.aws, not both".into())),
        Some(KmsFile {
            local: Some(l),
            aws: None,
        }) => {
            if !l.keks.contains_key(&l.active) {
                return Err(ctx.invalid(
                    "kms.local.active",
                    format!("`{}` is not one of kms.local.keks", l.active),
                ));
            }
            KmsConfig::Local {
                keks: l
                    .keks
                    .iter()
                    .map(|(k, p)| (k.clone(), ctx.resolve(p)))
                    .collect(),
                active: l.active,
            }
        }
        Some(KmsFile {
            local: None,
            aws: None,
        }) => return Err(ctx.invalid("kms", "set kms.local or kms.aws".into())),
    })
}

/// `store`: exactly one of `file` and `postgres`; none configured is a key file next to the
/// config.
pub(super) fn store(ctx: &Ctx, file: Option<StoreFile>) -> Result<StoreConfig, ConfigError> {
    Ok(match file {
        None => StoreConfig::File {
            path: ctx.resolve(Path::new(".byokd/keys.json")),
            ledger: ctx.resolve(Path::new(".byokd/usage.json")),
        },
        Some(StoreFile {
            postgres: Some(pg),
            file: None,
        }) => {
            if !cfg!(feature = "postgres") {
                return Err(ctx.invalid(
                    "store.postgres",
                    "this byokd was built without the `postgres` feature; build it with default features".into(),
                ));
            }
            if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
                return Err(ctx.invalid("store.postgres.url", "expected a postgres:// URL".into()));
            }
            StoreConfig::Postgres {
                url: crate::vocab::Redacted(pg.url),
            }
        }
        Some(StoreFile {
            postgres: Some(_),
            file: Some(_),
        }) => {
            return Err(ctx.invalid("store", "set store.file or store.postgres, not both".into()));
        }
        Some(StoreFile {
            file: Some(f),
            postgres: None,
        }) => {
            let path = ctx.resolve(&f.path);
            let ledger = match &f.ledger {
                Some(l) => ctx.resolve(l),
                None => path.with_file_name("usage.json"),
            };
            if ledger == path {
                return Err(ctx.invalid(
                    "store.file.ledger",
                    "the ledger needs a file of its own, not the key store's".into(),
                ));
            }
            StoreConfig::File { path, ledger }
        }
        Some(StoreFile {
            file: None,
            postgres: None,
        }) => return Err(ctx.invalid("store", "set store.file or store.postgres".into())),
    })
}

pub(super) fn key_cache(file: &KeyCacheFile) -> KeyCacheConfig {
    KeyCacheConfig {
        ttl: file.ttl.map_or(Duration::from_secs(300), |d| d.0),
        stale_ttl: file.stale_ttl.map_or(Duration::from_secs(3600), |d| d.0),
        max_entries: file.max_entries.unwrap_or(100_000),
    }
}

/// `audit`: a file or a standard stream (not both); none configured is the log, failing
/// closed.
pub(super) fn audit(ctx: &Ctx, file: Option<&AuditFile>) -> Result<AuditConfig, ConfigError> {
    let Some(a) = file else {
        return Ok(AuditConfig {
            target: AuditTarget::Log,
            on_error: OnError::FailClosed,
        });
    };
    let target = match (&a.file, a.stream.as_deref()) {
        (Some(f), None) => AuditTarget::File(ctx.resolve(f)),
        (None, Some("stdout")) => AuditTarget::Stdout,
        (None, Some("stderr")) => AuditTarget::Stderr,
        (None, None) => AuditTarget::Log,
        (None, Some(other)) => {
            return Err(ctx.invalid(
                "audit.stream",
                format!("`{other}`: use stdout or stderr, or audit.file"),
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ctx.invalid("audit", "set audit.file or audit.stream, not both".into()));
        }
    };
    let on_error = match a.on_error.as_deref() {
        None | Some("fail_closed") => OnError::FailClosed,
        Some("fail_open") => OnError::FailOpen,
        Some(other) => {
            return Err(ctx.invalid(
                "audit.on_error",
                format!("`{other}`: use fail_closed or fail_open"),
            ));
        }
    };
    Ok(AuditConfig { target, on_error })
}
