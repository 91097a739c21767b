//! Key-encryption keys: who wraps and unwraps the data keys.
//!
//! The embedded default is a set of local KEK files (32 random bytes each, versioned by id);
//! AWS KMS plugs in behind the same trait. Unwrapping happens only on a key-cache miss, never
//! per request, so the boxed future costs nothing on the hot path.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use zeroize::Zeroizing;

use super::KeyError;
use super::envelope::{self, Binding, DataKey, NONCE_LEN};

pub type KmsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send + 'a>>;

/// A data key wrapped by a KEK: which KEK, and the opaque blob.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub kek_id: String,
    pub blob: Vec<u8>,
}

/// Wraps fresh data keys and unwraps stored ones, bound to the key's identity.
pub trait Kms: Send + Sync {
    /// A new data key (plaintext, for sealing now) and its wrapped form (for the record).
    fn generate_data_key<'a>(
        &'a self,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, (DataKey, WrappedKey)>;
    fn decrypt<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, DataKey>;
    /// The same data key wrapped by the active KEK (master-key rotation).
    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, WrappedKey>;
    /// The `kek_id` new records get; records with another one are due for a rewrap.
    fn active_id(&self) -> KmsFuture<'_, String>;
}

/// Local KEK files; `active` wraps new keys, every listed one can unwrap.
pub struct LocalKek {
    keks: HashMap<String, Zeroizing<[u8; 32]>>,
    active: String,
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKek")
            .field("keks", &self.keks.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

impl LocalKek {
    /// Loads every KEK file. The active one is created (0600) if missing, with a warning:
    /// a KEK beside the store on local disk is a development setup, not a production one.
    pub fn load(keks: &[(String, PathBuf)], active: &str) -> Result<Self, KeyError> {
        let mut map = HashMap::new();
        for (id, path) in keks {
            if id == active && !path.exists() {
                create_kek_file(path)?;
                tracing::warn!(
                    kek = %id, path = %path.display(),
                    "created a new local key-encryption key; this is for development: \
                     back it up, or use kms.aws in production"
                );
            }
            map.insert(id.clone(), read_kek_file(path)?);
        }
        Ok(Self {
            keks: map,
            active: active.to_string(),
        })
    }

    fn kek(&self, id: &str) -> Result<&[u8; 32], KeyError> {
        self.keks
            .get(id)
            .map(|k| &**k)
            .ok_or_else(|| KeyError::UnknownKek(id.to_string()))
    }
}

impl Kms for LocalKek {
    fn generate_data_key<'a>(
        &'a self,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, (DataKey, WrappedKey)> {
        Box::pin(async move {
            let dek = envelope::new_data_key()?;
            let wrapped = self.wrap(dek.as_ref(), binding)?;
            Ok((dek, wrapped))
        })
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, WrappedKey> {
        Box::pin(async move {
            let dek = self.decrypt(wrapped, binding).await?;
            self.wrap(dek.as_ref(), binding)
        })
    }

    fn active_id(&self) -> KmsFuture<'_, String> {
        Box::pin(async move { Ok(self.active.clone()) })
    }

    fn decrypt<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, DataKey> {
        Box::pin(async move {
            let kek = self.kek(&wrapped.kek_id)?;
            if wrapped.blob.len() < NONCE_LEN {
                return Err(KeyError::Corrupt("wrapped data key too short".into()));
            }
            let (nonce, ct) = wrapped.blob.split_at(NONCE_LEN);
            let pt = envelope::open(kek, nonce, ct, &binding.aad())?;
            let dek: [u8; 32] = pt
                .as_slice()
                .try_into()
                .map_err(|_| KeyError::Corrupt("data key length".into()))?;
            Ok(Zeroizing::new(dek))
        })
    }
}

impl LocalKek {
    fn wrap(&self, dek: &[u8], binding: Binding<'_>) -> Result<WrappedKey, KeyError> {
        let kek = self.kek(&self.active)?;
        let (nonce, ct) = envelope::seal(kek, dek, &binding.aad())?;
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        Ok(WrappedKey {
            kek_id: self.active.clone(),
            blob,
        })
    }
}

/// Writes 32 random bytes to a new file readable by the owner only.
pub fn create_kek_file(path: &Path) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| KeyError::io(path, e))?;
    }
    let mut k = Zeroizing::new([0u8; 32]);
    envelope::random_bytes(k.as_mut())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KeyError::io(path, e))?;
    f.write_all(k.as_ref()).map_err(|e| KeyError::io(path, e))?;
    f.sync_all().map_err(|e| KeyError::io(path, e))?;
    Ok(())
}

fn read_kek_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| KeyError::io(path, e))?);
    let k: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        KeyError::Corrupt(format!(
            "KEK file {} must hold exactly 32 bytes",
            path.display()
        ))
    })?;
    Ok(Zeroizing::new(k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_kek_wraps_unwraps_and_binds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek-k1");
        let kms = LocalKek::load(&[("k1".into(), path.clone())], "k1").unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = Binding {
            tenant: "acme",
            provider: "openai",
            key_id: "k",
            version: 1,
        };
        let (dek, wrapped) = kms.generate_data_key(b).await.unwrap();
        assert_eq!(*kms.decrypt(&wrapped, b).await.unwrap(), *dek);
        let other = Binding {
            tenant: "evil",
            ..b
        };
        assert!(kms.decrypt(&wrapped, other).await.is_err());
    }
}
