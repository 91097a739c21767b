//! Key and token management: register, list (masked), revoke; issue and revoke platform tokens.
//!
//! Shared by the CLI and the admin API. Nothing here ever returns a secret: a key
//! goes in as [`PlainKey`] and comes back out only as its masked form.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::envelope::{self, Binding};
use super::kms::Kms;
use super::kms::WrappedKey;
use super::store::{Change, KeyRecord, KeyState, KeyStore, TokenRecord};
use super::{KeyError, PLATFORM_TENANT, PlainKey};
use crate::audit::Audit;
use crate::provider::Provider;
use crate::vocab::{reserved_tenant_id, unix_now, valid_tenant_id};

/// What a caller asks to register.
#[derive(Debug)]
pub struct NewKey<'a> {
    pub tenant: &'a str,
    pub provider: &'a Provider,
    pub secret: &'a PlainKey,
    pub label: Option<String>,
    pub expires_in: Option<std::time::Duration>,
}

fn random_id(prefix: &str) -> Result<String, KeyError> {
    let mut b = [0u8; 8];
    envelope::random_bytes(&mut b)?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

fn check_tenant(tenant: &str) -> Result<(), KeyError> {
    if reserved_tenant_id(tenant) {
        return Err(KeyError::Invalid(format!(
            "`{tenant}` is reserved: ids starting with `_` belong to byokd"
        )));
    }
    if valid_tenant_id(tenant) {
        Ok(())
    } else {
        Err(KeyError::Invalid(format!(
            "`{tenant}` is not a valid tenant id: use [A-Za-z0-9_.:-], 1 to 128 characters"
        )))
    }
}

/// Seals `secret` into a record for (tenant, provider, id, version).
#[allow(clippy::too_many_arguments)]
async fn seal(
    kms: &dyn Kms,
    tenant: &str,
    provider: &Provider,
    id: &str,
    version: u32,
    secret: &str,
    label: Option<String>,
    expires_at: Option<i64>,
) -> Result<KeyRecord, KeyError> {
    let binding = Binding {
        tenant,
        provider: &provider.name,
        key_id: id,
        version,
    };
    let (dek, wrapped) = kms.generate_data_key(binding).await?;
    let (nonce, ct) = envelope::seal(&dek, secret.as_bytes(), &binding.aad())?;
    Ok(KeyRecord {
        id: id.to_string(),
        tenant: tenant.to_string(),
        provider: provider.name.to_string(),
        label,
        version,
        state: KeyState::Active,
        created_at: unix_now(),
        expires_at,
        masked: provider.mask_key(secret),
        kek_id: wrapped.kek_id,
        wrapped_dek: B64.encode(&wrapped.blob),
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(&ct),
    })
}

fn audit_fields(r: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "tenant": r.tenant, "provider": r.provider, "key_id": r.id,
        "version": r.version, "kek_id": r.kek_id,
    })
}

fn audited(audit: &Audit, event: &str, fields: serde_json::Value) -> Result<(), KeyError> {
    audit.record(event, fields).map_err(KeyError::Audit)
}

/// Checks the tenant and the key's format before anything is sealed.
pub fn check_new_key(tenant: &str, provider: &Provider, secret: &str) -> Result<(), KeyError> {
    if tenant != PLATFORM_TENANT {
        check_tenant(tenant)?;
    }
    provider.check_key_format(secret).map_err(KeyError::Invalid)
}

/// Seals and stores a new key; returns its record (which holds no plaintext).
pub async fn add_key(
    store: &dyn KeyStore,
    kms: &dyn Kms,
    audit: &Audit,
    new: NewKey<'_>,
) -> Result<KeyRecord, KeyError> {
    let secret = new.secret.expose().trim();
    check_new_key(new.tenant, new.provider, secret)?;
    let id = random_id("key_")?;
    let expires_at = new
        .expires_in
        .map(|d| unix_now().saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
    let record = seal(
        kms,
        new.tenant,
        new.provider,
        &id,
        1,
        secret,
        new.label,
        expires_at,
    )
    .await?;
    store.apply(Change::AddKey(record.clone())).await?;
    audited(audit, "key_register", audit_fields(&record))?;
    Ok(record)
}

/// The newest active key of (tenant, provider), if any.
pub async fn active_key(
    store: &dyn KeyStore,
    tenant: &str,
    provider: &str,
) -> Result<Option<KeyRecord>, KeyError> {
    let d = store.load().await?;
    Ok(d.keys
        .into_iter()
        .filter(|r| r.tenant == tenant && r.provider == provider && r.state == KeyState::Active)
        .max_by_key(|r| r.version))
}

/// Every active key of `tenant` for `provider` (a key pool), the newest version of each id.
pub async fn active_keys(
    store: &dyn KeyStore,
    tenant: &str,
    provider: &str,
) -> Result<Vec<KeyRecord>, KeyError> {
    let d = store.load().await?;
    let mut out: Vec<KeyRecord> = Vec::new();
    for r in d
        .keys
        .into_iter()
        .filter(|r| r.tenant == tenant && r.provider == provider && r.state == KeyState::Active)
    {
        match out.iter_mut().find(|o| o.id == r.id) {
            Some(o) if o.version < r.version => *o = r,
            Some(_) => {}
            None => out.push(r),
        }
    }
    Ok(out)
}

/// A new secret for `key_id` as version n+1, active at once; the old version is retired.
pub async fn rotate_key(
    store: &dyn KeyStore,
    kms: &dyn Kms,
    audit: &Audit,
    key_id: &str,
    provider: &Provider,
    secret: &PlainKey,
) -> Result<KeyRecord, KeyError> {
    let d = store.load().await?;
    let current = d
        .keys
        .iter()
        .filter(|r| r.id == key_id)
        .max_by_key(|r| r.version)
        .ok_or_else(|| KeyError::NotFound(format!("no key with id `{key_id}`")))?;
    if current.state == KeyState::Revoked {
        return Err(KeyError::Invalid(format!(
            "key `{key_id}` is revoked; add a new one"
        )));
    }
    if *current.provider != *provider.name {
        return Err(KeyError::Invalid(format!(
            "key `{key_id}` is a {} key, not {}",
            current.provider, provider.name
        )));
    }
    let secret = secret.expose().trim();
    check_new_key(&current.tenant, provider, secret)?;
    let record = seal(
        kms,
        &current.tenant,
        provider,
        key_id,
        current.version + 1,
        secret,
        current.label.clone(),
        current.expires_at.map(|e| {
            // A rotation keeps the key's lifetime length, counted from now.
            unix_now().saturating_add(e.saturating_sub(current.created_at).max(0))
        }),
    )
    .await?;
    store.apply(Change::Rotate(record.clone())).await?;
    audited(audit, "key_rotate", audit_fields(&record))?;
    Ok(record)
}

/// Revokes every version of `key_id`. Serving replicas stop using it on their next reload.
pub async fn revoke_key(
    store: &dyn KeyStore,
    audit: &Audit,
    key_id: &str,
) -> Result<usize, KeyError> {
    let n = store
        .apply(Change::Revoke {
            key_id: key_id.to_string(),
        })
        .await?;
    audited(
        audit,
        "key_revoke",
        serde_json::json!({"key_id": key_id, "versions": n}),
    )?;
    Ok(n)
}

/// Key records, optionally of one tenant; they carry masked forms only.
pub async fn list_keys(
    store: &dyn KeyStore,
    tenant: Option<&str>,
) -> Result<Vec<KeyRecord>, KeyError> {
    let d = store.load().await?;
    Ok(d.keys
        .into_iter()
        .filter(|r| tenant.is_none_or(|t| r.tenant == t))
        .collect())
}

/// What `keys rewrap` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rewrapped {
    pub rewrapped: usize,
    pub current: usize,
    pub failed: usize,
}

/// Re-wraps every non-revoked record whose data key is not under the active KEK, one record
/// per store write, so a serving replica never sees more than one record change at a time
/// and a failure halfway leaves every record readable (old or new KEK).
pub async fn rewrap(
    store: &dyn KeyStore,
    kms: &dyn Kms,
    audit: &Audit,
) -> Result<Rewrapped, KeyError> {
    let active = kms.active_id().await?;
    let d = store.load().await?;
    let mut out = Rewrapped::default();
    for r in d.keys.iter().filter(|r| r.state != KeyState::Revoked) {
        if r.kek_id == active {
            out.current += 1;
            continue;
        }
        let binding = Binding {
            tenant: &r.tenant,
            provider: &r.provider,
            key_id: &r.id,
            version: r.version,
        };
        let wrapped = WrappedKey {
            kek_id: r.kek_id.clone(),
            blob: B64.decode(&r.wrapped_dek).map_err(|_| {
                KeyError::Corrupt(format!("key {} has a malformed wrapped_dek", r.id))
            })?,
        };
        match kms.rewrap(&wrapped, binding).await {
            Ok(new) => {
                let n = store
                    .apply(Change::Rewrap {
                        id: r.id.clone(),
                        version: r.version,
                        from_kek: r.kek_id.clone(),
                        kek_id: new.kek_id.clone(),
                        wrapped_dek: B64.encode(&new.blob),
                    })
                    .await?;
                out.rewrapped += n;
                audited(
                    audit,
                    "key_rewrap",
                    serde_json::json!({
                        "tenant": r.tenant, "provider": r.provider, "key_id": r.id,
                        "version": r.version, "from_kek": r.kek_id, "kek_id": new.kek_id,
                    }),
                )?;
            }
            Err(e) => {
                out.failed += 1;
                tracing::error!(key_id = %r.id, version = r.version, error = %e, "rewrap failed; the record keeps its old KEK");
            }
        }
    }
    Ok(out)
}

/// The token text (shown once) and its record.
pub async fn new_token(
    store: &dyn KeyStore,
    audit: &Audit,
    tenant: &str,
) -> Result<(Zeroizing<String>, TokenRecord), KeyError> {
    check_tenant(tenant)?;
    let mut raw = Zeroizing::new([0u8; 32]);
    envelope::random_bytes(raw.as_mut())?;
    let token = Zeroizing::new(format!("byokd_{}", URL_SAFE_NO_PAD.encode(raw.as_ref())));
    let record = TokenRecord {
        id: random_id("tok_")?,
        tenant: tenant.to_string(),
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
        created_at: unix_now(),
        revoked: false,
    };
    store.apply(Change::AddToken(record.clone())).await?;
    audited(
        audit,
        "token_issue",
        serde_json::json!({"tenant": tenant, "token_id": record.id}),
    )?;
    Ok((token, record))
}

pub async fn revoke_token(
    store: &dyn KeyStore,
    audit: &Audit,
    token_id: &str,
) -> Result<(), KeyError> {
    store
        .apply(Change::RevokeToken {
            token_id: token_id.to_string(),
        })
        .await?;
    audited(
        audit,
        "token_revoke",
        serde_json::json!({"token_id": token_id}),
    )?;
    Ok(())
}
