//! Key and token management: register, list (masked), revoke; issue and revoke platform tokens.
//!
//! Shared by the CLI and (later) the admin API. Nothing here ever returns a secret: a key
//! goes in as [`PlainKey`] and comes back out only as its masked form.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::envelope::{self, Binding};
use super::kms::Kms;
use super::store::{FileStore, KeyRecord, KeyState, TokenRecord};
use super::{KeyError, PLATFORM_TENANT, PlainKey, unix_now};
use crate::config::{reserved_tenant_id, valid_tenant_id};
use crate::provider::{Provider, mask};

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

/// Seals and stores a new key; returns its record (which holds no plaintext).
pub async fn add_key(
    store: &FileStore,
    kms: &dyn Kms,
    new: NewKey<'_>,
) -> Result<KeyRecord, KeyError> {
    if new.tenant != PLATFORM_TENANT {
        check_tenant(new.tenant)?;
    }
    let secret = new.secret.expose().trim();
    new.provider
        .check_key_format(secret)
        .map_err(KeyError::Invalid)?;
    let id = random_id("key_")?;
    let version = 1;
    let binding = Binding {
        tenant: new.tenant,
        provider: &new.provider.name,
        key_id: &id,
        version,
    };
    let (dek, wrapped) = kms.generate_data_key(binding).await?;
    let (nonce, ct) = envelope::seal(&dek, secret.as_bytes(), &binding.aad())?;
    let now = unix_now();
    let record = KeyRecord {
        id: id.clone(),
        tenant: new.tenant.to_string(),
        provider: new.provider.name.to_string(),
        label: new.label,
        version,
        state: KeyState::Active,
        created_at: now,
        expires_at: new
            .expires_in
            .map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))),
        masked: mask(secret),
        kek_id: wrapped.kek_id,
        wrapped_dek: B64.encode(&wrapped.blob),
        nonce: B64.encode(nonce),
        ciphertext: B64.encode(&ct),
    };
    let stored = record.clone();
    store.update(move |d| {
        d.keys.push(stored);
        Ok(())
    })?;
    tracing::info!(target: "byokd::audit", event = "key_register", tenant = %record.tenant,
        provider = %record.provider, key_id = %record.id, version = record.version);
    Ok(record)
}

/// Revokes every version of `key_id`. Serving replicas stop using it on their next reload.
pub fn revoke_key(store: &FileStore, key_id: &str) -> Result<usize, KeyError> {
    let n = store.update(|d| {
        let mut n = 0;
        for r in d
            .keys
            .iter_mut()
            .filter(|r| r.id == key_id && r.state != KeyState::Revoked)
        {
            r.state = KeyState::Revoked;
            n += 1;
        }
        if n == 0 && !d.keys.iter().any(|r| r.id == key_id) {
            return Err(KeyError::NotFound(format!("no key with id `{key_id}`")));
        }
        Ok(n)
    })?;
    tracing::info!(target: "byokd::audit", event = "key_revoke", key_id, versions = n);
    Ok(n)
}

/// Key records, optionally of one tenant; they carry masked forms only.
pub fn list_keys(store: &FileStore, tenant: Option<&str>) -> Result<Vec<KeyRecord>, KeyError> {
    let d = store.load()?;
    Ok(d.keys
        .into_iter()
        .filter(|r| tenant.is_none_or(|t| r.tenant == t))
        .collect())
}

/// The token text (shown once) and its record.
pub fn new_token(
    store: &FileStore,
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
    let stored = record.clone();
    store.update(move |d| {
        d.tokens.push(stored);
        Ok(())
    })?;
    tracing::info!(target: "byokd::audit", event = "token_issue", tenant, token_id = %record.id);
    Ok((token, record))
}

pub fn revoke_token(store: &FileStore, token_id: &str) -> Result<(), KeyError> {
    store.update(|d| {
        let t = d
            .tokens
            .iter_mut()
            .find(|t| t.id == token_id)
            .ok_or_else(|| KeyError::NotFound(format!("no token with id `{token_id}`")))?;
        t.revoked = true;
        Ok(())
    })?;
    tracing::info!(target: "byokd::audit", event = "token_revoke", token_id);
    Ok(())
}
