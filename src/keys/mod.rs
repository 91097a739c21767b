//! The credential step: the plaintext provider key for (tenant, provider), from a small
//! in-memory cache or from the store + KMS.
//!
//! The hot path reads an immutable [`Snapshot`] through `ArcSwap` (no lock) and a sharded
//! cache (`DashMap`, no global lock). A miss decrypts once through the KMS/KEK and writes an
//! audit event; nothing on this path touches the disk.

pub mod envelope;
pub mod kms;
pub mod manage;
pub mod secret;
pub mod store;
pub mod watch;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use dashmap::DashMap;

use crate::error::CredentialError;
use crate::provider::Provider;
use envelope::Binding;
use kms::{Kms, WrappedKey};
pub use secret::{AuthValue, PlainKey};
use store::{KeyRecord, Snapshot, StoreData};

/// The reserved tenant whose keys serve tenants with `fallback: [platform]`.
pub const PLATFORM_TENANT: &str = "_platform";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Corrupt(String),
    #[error("decryption failed: wrong key-encryption key, or the record was altered or moved")]
    Decrypt,
    #[error("key-encryption key `{0}` is not configured")]
    UnknownKek(String),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

impl KeyError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Who pays for a request: label `key_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Tenant,
    Platform,
    None,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tenant => "tenant",
            Self::Platform => "platform",
            Self::None => "none",
        }
    }
}

/// The key a request will use.
#[derive(Debug, Clone)]
pub struct Credential {
    pub value: AuthValue,
    pub record: Arc<KeyRecord>,
    pub source: KeySource,
    /// True when this request paid for a decryption (cache miss).
    pub decrypted: bool,
}

struct CacheEntry {
    version: u32,
    value: AuthValue,
    inserted: Instant,
}

/// Snapshot of the store + KMS + plaintext cache.
pub struct Keyring {
    snapshot: ArcSwap<Snapshot>,
    kms: Arc<dyn Kms>,
    cache: DashMap<Arc<str>, CacheEntry>,
    ttl: Duration,
    max_entries: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("cached", &self.cache.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Keyring {
    pub fn new(kms: Arc<dyn Kms>, data: &StoreData, ttl: Duration, max_entries: usize) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(Snapshot::build(data)),
            kms,
            cache: DashMap::new(),
            ttl,
            max_entries,
        }
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Swaps in a new store state and drops cached plaintext of keys no longer usable,
    /// so a revocation stops serving at once rather than at TTL.
    pub fn replace(&self, data: &StoreData) {
        let snap = Arc::new(Snapshot::build(data));
        // Swap first, prune second: a request that still holds the old snapshot may re-insert
        // a just-revoked key, but it can no longer be found through the new snapshot, and the
        // sweep zeroizes it at its TTL at the latest.
        self.snapshot.store(snap.clone());
        let now = unix_now();
        let usable: std::collections::HashSet<(&str, u32)> = snap
            .tenants
            .values()
            .flat_map(|t| t.keys.iter())
            .filter(|r| r.usable(now))
            .map(|r| (r.id.as_str(), r.version))
            .collect();
        self.cache
            .retain(|id, e| usable.contains(&(&**id, e.version)));
    }

    /// Number of cached plaintext keys.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The key for `tenant` and `provider`: the tenant's own, else the platform's if the
    /// tenant's policy allows fallback. `Ok(None)` when the provider needs no key.
    pub async fn credential(
        &self,
        tenant: &str,
        provider: &Provider,
        platform_fallback: bool,
        request_id: crate::pipeline::RequestId,
    ) -> Result<Option<Credential>, CredentialError> {
        let now = unix_now();
        let found = {
            let snap = self.snapshot.load();
            snap.key_for(tenant, &provider.name, now)
                .map(|r| (r.clone(), KeySource::Tenant))
                .or_else(|| {
                    platform_fallback
                        .then(|| snap.key_for(PLATFORM_TENANT, &provider.name, now))
                        .flatten()
                        .map(|r| (r.clone(), KeySource::Platform))
                })
        };
        let Some((record, source)) = found else {
            return if provider.requires_key() {
                Err(CredentialError::NoKey(provider.name.to_string()))
            } else {
                Ok(None)
            };
        };
        if let Some(value) = self.cached_value(&record) {
            return Ok(Some(Credential {
                value,
                record,
                source,
                decrypted: false,
            }));
        }
        let value = self
            .decrypt(&record, provider.auth_header().1, request_id)
            .await
            .map_err(CredentialError::Unavailable)?;
        self.insert(&record, value.clone());
        Ok(Some(Credential {
            value,
            record,
            source,
            decrypted: true,
        }))
    }

    fn cached_value(&self, record: &KeyRecord) -> Option<AuthValue> {
        let e = self.cache.get(record.id.as_str())?;
        (e.version == record.version && e.inserted.elapsed() < self.ttl).then(|| e.value.clone())
    }

    /// Drops (and so zeroizes) entries past their TTL. Run periodically by the server.
    pub fn sweep(&self) {
        let ttl = self.ttl;
        self.cache.retain(|_, e| e.inserted.elapsed() < ttl);
    }

    fn insert(&self, record: &KeyRecord, value: AuthValue) {
        if self.cache.len() >= self.max_entries {
            self.sweep();
            if self.cache.len() >= self.max_entries {
                // Still full of live keys: make room for a tenth rather than stop caching,
                // which would turn every miss into a decryption.
                let victims: Vec<Arc<str>> = self
                    .cache
                    .iter()
                    .take(self.max_entries / 10 + 1)
                    .map(|e| e.key().clone())
                    .collect();
                for v in victims {
                    self.cache.remove(&v);
                }
            }
        }
        self.cache.insert(
            Arc::from(record.id.as_str()),
            CacheEntry {
                version: record.version,
                value,
                inserted: Instant::now(),
            },
        );
    }

    async fn decrypt(
        &self,
        r: &KeyRecord,
        prefix: &str,
        request_id: crate::pipeline::RequestId,
    ) -> Result<AuthValue, KeyError> {
        let binding = Binding {
            tenant: &r.tenant,
            provider: &r.provider,
            key_id: &r.id,
            version: r.version,
        };
        let decode = |field: &str, v: &str| {
            B64.decode(v)
                .map_err(|_| KeyError::Corrupt(format!("key {} has a malformed {field}", r.id)))
        };
        let wrapped = WrappedKey {
            kek_id: r.kek_id.clone(),
            blob: decode("wrapped_dek", &r.wrapped_dek)?,
        };
        let result = async {
            let dek = self.kms.decrypt(&wrapped, binding).await?;
            let plain = envelope::open(
                &dek,
                &decode("nonce", &r.nonce)?,
                &decode("ciphertext", &r.ciphertext)?,
                &binding.aad(),
            )?;
            Ok::<_, KeyError>(AuthValue::new(prefix, &plain))
        }
        .await;
        tracing::info!(
            target: "byokd::audit",
            event = "key_decrypt",
            tenant = %r.tenant,
            provider = %r.provider,
            key_id = %r.id,
            version = r.version,
            kek_id = %r.kek_id,
            request_id = %request_id,
            reason = "cache_miss",
            ok = result.is_ok(),
            error = result.as_ref().err().map(|e| e.to_string()),
        );
        result
    }
}
