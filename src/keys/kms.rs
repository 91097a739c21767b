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
use super::perms::{self, KeyFile};

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
    /// A data key unwrapped elsewhere, wrapped by the active KEK: `keys import` moving a
    /// record from another KMS or KEK.
    fn wrap<'a>(&'a self, dek: &'a DataKey, binding: Binding<'a>) -> KmsFuture<'a, WrappedKey>;
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
    /// A KEK file others can read, or group or others can write, is refused.
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
            let wrapped = self.wrap_active(dek.as_ref(), binding)?;
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
            self.wrap_active(dek.as_ref(), binding)
        })
    }

    fn active_id(&self) -> KmsFuture<'_, String> {
        Box::pin(async move { Ok(self.active.clone()) })
    }

    fn wrap<'a>(&'a self, dek: &'a DataKey, binding: Binding<'a>) -> KmsFuture<'a, WrappedKey> {
        Box::pin(async move { self.wrap_active(dek.as_ref(), binding) })
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
    fn wrap_active(&self, dek: &[u8], binding: Binding<'_>) -> Result<WrappedKey, KeyError> {
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

/// Refuses every configured KEK file that exists and others could read or anyone but its
/// owner could write (see [`perms`]), without reading it: for commands that do not unwrap
/// (`keys list`), so a loose KEK is caught by whichever command runs first.
pub fn check_kek_files(keks: &[(String, PathBuf)]) -> Result<(), KeyError> {
    keks.iter()
        .try_for_each(|(_, path)| perms::check_path(KeyFile::Kek, path))
}

/// Reads a KEK file, refused before reading if its mode lets others read or write it.
fn read_kek_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, KeyError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| KeyError::io(path, e))?;
    perms::check(KeyFile::Kek, path, &file)?;
    // One byte more than a KEK, allocated up front: a longer file is refused below, and the
    // buffer never grows (a reallocation would leave a copy that is not zeroized).
    let mut bytes = Zeroizing::new(Vec::with_capacity(33));
    file.take(33)
        .read_to_end(&mut bytes)
        .map_err(|e| KeyError::io(path, e))?;
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

    #[test]
    fn a_kek_others_can_read_or_write_is_refused_by_load_and_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek-k1");
        create_kek_file(&path).unwrap();
        let keks = [("k1".to_string(), path.clone())];
        for mode in [0o644, 0o604, 0o620, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            for err in [
                LocalKek::load(&keks, "k1").unwrap_err(),
                check_kek_files(&keks).unwrap_err(),
            ] {
                assert!(
                    matches!(&err, KeyError::LoosePermissions { path: p, mode: m, .. }
                        if *p == path && *m == mode),
                    "{mode:04o}: {err}"
                );
                let text = err.to_string();
                assert!(
                    text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"),
                    "{text}"
                );
            }
        }
        // Owner only, or group read (a Kubernetes Secret in a pod with fsGroup): used.
        for mode in [0o600, 0o400, 0o440, 0o640] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            LocalKek::load(&keks, "k1").unwrap();
            check_kek_files(&keks).unwrap();
        }
        // A configured KEK that does not exist yet is not a permission problem.
        check_kek_files(&[("k2".to_string(), dir.path().join("kek-k2"))]).unwrap();
    }

    #[test]
    fn a_kek_file_of_the_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for len in [31, 33, 64] {
            let path = dir.path().join(format!("kek-{len}"));
            std::fs::write(&path, vec![7u8; len]).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let err = LocalKek::load(&[("k".to_string(), path)], "k").unwrap_err();
            assert!(err.to_string().contains("exactly 32 bytes"), "{err}");
        }
    }
}
