//! Key and token records, and the file store (the embedded default).
//!
//! The store holds only ciphertext, wrapped data keys and SHA-256 token hashes. Writers
//! (the CLI, the admin API) take an exclusive lock, read, modify, write a temp file and
//! rename it over the old one, so `serve` never sees a half-written file; `serve` watches
//! the folder and swaps in a fresh [`Snapshot`] when the file changes.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::KeyError;
use super::perms::{self, KeyFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Active,
    Retired,
    Revoked,
}

/// One stored key version: ciphertext and the wrapped data key, never the plaintext.
/// `Debug` leaves out even those, so a stray `?record` in a log line shows metadata only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub provider: String,
    #[serde(default)]
    pub label: Option<String>,
    pub version: u32,
    pub state: KeyState,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(default)]
    pub expires_at: Option<i64>,
    pub masked: String,
    pub kek_id: String,
    /// Base64 of the wrapped data key.
    pub wrapped_dek: String,
    /// Base64 of the 96-bit nonce.
    pub nonce: String,
    /// Base64 of ciphertext || tag.
    pub ciphertext: String,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("provider", &self.provider)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("masked", &self.masked)
            .field("kek_id", &self.kek_id)
            .finish_non_exhaustive()
    }
}

impl KeyRecord {
    /// Active and not expired at `now` (unix seconds).
    pub fn usable(&self, now: i64) -> bool {
        self.state == KeyState::Active && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A platform token: only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    pub id: String,
    pub tenant: String,
    /// Hex SHA-256 of the token.
    pub sha256: String,
    pub created_at: i64,
    #[serde(default)]
    pub revoked: bool,
}

/// The whole store file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreData {
    #[serde(default = "one")]
    pub format: u32,
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
    #[serde(default)]
    pub tokens: Vec<TokenRecord>,
}

fn one() -> u32 {
    1
}

impl Default for StoreData {
    fn default() -> Self {
        Self {
            format: 1,
            keys: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

/// One change to the store. Both stores apply exactly these semantics (the file store in
/// memory under its lock, PostgreSQL in one transaction), so records stay identical.
#[derive(Debug, Clone)]
pub enum Change {
    AddKey(KeyRecord),
    /// A new version of an existing key id: its active versions become retired, so new
    /// requests use the new version at once while requests in flight finish on theirs.
    Rotate(KeyRecord),
    /// Every version of the key id becomes revoked.
    Revoke {
        key_id: String,
    },
    /// The data key of (id, version) re-wrapped by another KEK. Applies only if the record
    /// is still wrapped by `from_kek`, so two rewraps racing cannot clobber each other.
    Rewrap {
        id: String,
        version: u32,
        from_kek: String,
        kek_id: String,
        wrapped_dek: String,
    },
    AddToken(TokenRecord),
    RevokeToken {
        token_id: String,
    },
    /// Records from another store (`keys import`), all or none: any (id, version) or token id
    /// already here refuses the whole change.
    Import {
        keys: Vec<KeyRecord>,
        tokens: Vec<TokenRecord>,
    },
}

impl StoreData {
    /// Applies `change`; the number of records it touched. Unknown ids are `NotFound`.
    pub fn apply(&mut self, change: &Change) -> Result<usize, KeyError> {
        let not_found =
            |what: &str, id: &str| KeyError::NotFound(format!("no {what} with id `{id}`"));
        match change {
            Change::AddKey(r) => {
                if self
                    .keys
                    .iter()
                    .any(|k| k.id == r.id && k.version == r.version)
                {
                    return Err(KeyError::Invalid(format!(
                        "key {} v{} exists",
                        r.id, r.version
                    )));
                }
                self.keys.push(r.clone());
                Ok(1)
            }
            Change::Rotate(r) => {
                let newest = self
                    .keys
                    .iter()
                    .filter(|k| k.id == r.id)
                    .map(|k| k.version)
                    .max();
                if newest.is_some_and(|v| v + 1 != r.version) {
                    // Two rotations raced from the same version: the second must not add a
                    // second active copy of a version number.
                    return Err(KeyError::Conflict(format!(
                        "key `{}` was rotated meanwhile; retry the rotation",
                        r.id
                    )));
                }
                let mut n = 0;
                for k in self
                    .keys
                    .iter_mut()
                    .filter(|k| k.id == r.id && k.state == KeyState::Active)
                {
                    k.state = KeyState::Retired;
                    n += 1;
                }
                if n == 0 {
                    return Err(not_found("active key", &r.id));
                }
                self.keys.push(r.clone());
                Ok(n + 1)
            }
            Change::Revoke { key_id } => {
                if !self.keys.iter().any(|k| &k.id == key_id) {
                    return Err(not_found("key", key_id));
                }
                let mut n = 0;
                for k in self
                    .keys
                    .iter_mut()
                    .filter(|k| &k.id == key_id && k.state != KeyState::Revoked)
                {
                    k.state = KeyState::Revoked;
                    n += 1;
                }
                Ok(n)
            }
            Change::Rewrap {
                id,
                version,
                from_kek,
                kek_id,
                wrapped_dek,
            } => {
                let Some(k) = self
                    .keys
                    .iter_mut()
                    .find(|k| &k.id == id && k.version == *version)
                else {
                    return Err(not_found("key", id));
                };
                if &k.kek_id != from_kek {
                    return Ok(0);
                }
                k.kek_id = kek_id.clone();
                k.wrapped_dek = wrapped_dek.clone();
                Ok(1)
            }
            Change::AddToken(t) => {
                self.tokens.push(t.clone());
                Ok(1)
            }
            Change::Import { keys, tokens } => {
                if let Some(k) = keys.iter().find(|r| {
                    self.keys
                        .iter()
                        .any(|k| k.id == r.id && k.version == r.version)
                }) {
                    return Err(KeyError::Conflict(format!(
                        "key {} v{} is already in the store",
                        k.id, k.version
                    )));
                }
                if let Some(t) = tokens
                    .iter()
                    .find(|r| self.tokens.iter().any(|t| t.id == r.id))
                {
                    return Err(KeyError::Conflict(format!(
                        "token {} is already in the store",
                        t.id
                    )));
                }
                self.keys.extend(keys.iter().cloned());
                self.tokens.extend(tokens.iter().cloned());
                Ok(keys.len() + tokens.len())
            }
            Change::RevokeToken { token_id } => {
                let t = self
                    .tokens
                    .iter_mut()
                    .find(|t| &t.id == token_id)
                    .ok_or_else(|| not_found("token", token_id))?;
                t.revoked = true;
                Ok(1)
            }
        }
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, KeyError>> + Send + 'a>>;

/// Where key records and token hashes live: the file (embedded default) or PostgreSQL.
/// Only management calls and reloads use it, never a request.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    fn load(&self) -> StoreFuture<'_, StoreData>;
    fn apply(&self, change: Change) -> StoreFuture<'_, usize>;
}

impl KeyStore for FileStore {
    fn load(&self) -> StoreFuture<'_, StoreData> {
        let s = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || s.load())
                .await
                .map_err(|e| KeyError::Corrupt(format!("store task failed: {e}")))?
        })
    }

    fn apply(&self, change: Change) -> StoreFuture<'_, usize> {
        let s = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || s.update(|d| d.apply(&change)))
                .await
                .map_err(|e| KeyError::Corrupt(format!("store task failed: {e}")))?
        })
    }
}

/// The file store. Cheap to construct; every operation opens the file afresh.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the store; a missing file is an empty store, a corrupt one an error, and one that
    /// group or others can write is refused (they could swap records or revive revoked keys).
    pub fn load(&self) -> Result<StoreData, KeyError> {
        use std::io::Read;
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(StoreData::default()),
            Err(e) => return Err(KeyError::io(&self.path, e)),
        };
        perms::check(KeyFile::Store, &self.path, &file)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| KeyError::io(&self.path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            KeyError::Corrupt(format!(
                "store file {} is not valid: {e}",
                self.path.display()
            ))
        })
    }

    /// Like [`load`](Self::load), but a missing file is an error: at run time a vanished
    /// store (moved, mid-restore) must not look like "every key revoked".
    pub fn load_existing(&self) -> Result<StoreData, KeyError> {
        if !self.path.exists() {
            return Err(KeyError::NotFound(format!(
                "store file {} is missing",
                self.path.display()
            )));
        }
        self.load()
    }

    /// Read-modify-write under an exclusive lock, replaced atomically by rename.
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut StoreData) -> Result<T, KeyError>,
    ) -> Result<T, KeyError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| KeyError::io(dir, e))?;
        let lock_path = self.path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| KeyError::io(&lock_path, e))?;
        lock.lock().map_err(|e| KeyError::io(&lock_path, e))?;
        let mut data = self.load()?;
        let out = f(&mut data)?;
        let bytes = serde_json::to_vec_pretty(&data)
            .map_err(|e| KeyError::Corrupt(format!("cannot encode store: {e}")))?;
        let tmp = self.path.with_extension("tmp");
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| KeyError::io(&tmp, e))?;
            // `mode` applies only to a file it creates: a temp file left behind keeps its own.
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| KeyError::io(&tmp, e))?;
            file.write_all(&bytes).map_err(|e| KeyError::io(&tmp, e))?;
            file.sync_all().map_err(|e| KeyError::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| KeyError::io(&self.path, e))?;
        drop(lock);
        Ok(out)
    }
}

/// What one tenant has in the store.
#[derive(Debug, Default)]
pub struct TenantEntry {
    pub name: Arc<str>,
    /// Active, unexpired-at-load records, newest version first. Expiry is rechecked per request.
    pub keys: Vec<Arc<KeyRecord>>,
}

/// An immutable index of the store, swapped atomically when the store changes.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tenants: crate::vocab::FastMap<Arc<str>, TenantEntry>,
    /// SHA-256 of a platform token => tenant.
    pub tokens: HashMap<[u8; 32], Arc<str>>,
}

impl Snapshot {
    /// (tenant, provider) of each usable key that expires within 14 days: rotate them.
    pub fn expiring_soon(&self, now: i64) -> impl Iterator<Item = (&str, &str)> {
        const SOON: i64 = 14 * 86_400;
        self.tenants
            .values()
            .flat_map(|t| t.keys.iter())
            .filter(move |r| r.usable(now) && r.expires_at.is_some_and(|e| e - now <= SOON))
            .map(|r| (&*r.tenant, &*r.provider))
    }

    pub fn build(data: StoreData) -> Self {
        let mut s = Snapshot::default();
        for r in data.keys {
            let entry = s.entry(&r.tenant);
            if r.state == KeyState::Active {
                entry.keys.push(Arc::new(r));
            }
        }
        for e in s.tenants.values_mut() {
            e.keys.sort_by(|a, b| {
                b.version
                    .cmp(&a.version)
                    .then(b.created_at.cmp(&a.created_at))
            });
        }
        for t in data
            .tokens
            .iter()
            .filter(|t| !t.revoked && !crate::vocab::reserved_tenant_id(&t.tenant))
        {
            let mut h = [0u8; 32];
            if hex::decode_to_slice(&t.sha256, &mut h).is_ok() {
                let name = s.entry(&t.tenant).name.clone();
                s.tokens.insert(h, name);
            }
        }
        s
    }

    fn entry(&mut self, tenant: &str) -> &mut TenantEntry {
        self.tenants
            .entry(Arc::from(tenant))
            .or_insert_with_key(|k| TenantEntry {
                name: k.clone(),
                keys: Vec::new(),
            })
    }

    /// The newest usable key of `tenant` for `provider`.
    pub fn key_for(&self, tenant: &str, provider: &str, now: i64) -> Option<&Arc<KeyRecord>> {
        self.tenants
            .get(tenant)?
            .keys
            .iter()
            .find(|r| r.provider == provider && r.usable(now))
    }

    /// Every usable key of `tenant` for `provider` (a key pool): the newest version of each
    /// key id, newest key first. A tenant usually has one, so this allocates nothing until
    /// the caller collects.
    pub fn keys_for<'a>(
        &'a self,
        tenant: &str,
        provider: &'a str,
        now: i64,
    ) -> impl Iterator<Item = &'a Arc<KeyRecord>> + 'a {
        let keys: &'a [Arc<KeyRecord>] = self.tenants.get(tenant).map_or(&[], |t| &t.keys);
        keys.iter().enumerate().filter_map(move |(i, r)| {
            let usable = r.provider == provider && r.usable(now);
            // Two active versions of one id are one key: only the newest (listed first) counts.
            let shadowed = || {
                keys[..i]
                    .iter()
                    .any(|o| o.id == r.id && o.provider == provider && o.usable(now))
            };
            (usable && !shadowed()).then_some(r)
        })
    }
}

/// What `keys list --json` and the admin API show of a record: masked form and metadata,
/// never ciphertext or the wrapped data key.
pub fn public_json(r: &KeyRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "tenant": r.tenant, "provider": r.provider,
        "label": r.label, "version": r.version, "state": r.state,
        "masked": r.masked, "created_at": r.created_at,
        "expires_at": r.expires_at, "kek_id": r.kek_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, version: u32) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            tenant: "acme".into(),
            provider: "openai".into(),
            label: None,
            version,
            state: KeyState::Active,
            created_at: 0,
            expires_at: None,
            masked: "sk-...abcd".into(),
            kek_id: "k1".into(),
            wrapped_dek: "WRAPPED".into(),
            nonce: "NONCE".into(),
            ciphertext: "CIPHERTEXT".into(),
        }
    }

    #[test]
    fn racing_rotations_conflict_instead_of_doubling_a_version() {
        let mut d = StoreData::default();
        d.apply(&Change::AddKey(rec("k", 1))).unwrap();
        d.apply(&Change::Rotate(rec("k", 2))).unwrap();
        // A second rotation computed from version 1 as well.
        let err = d.apply(&Change::Rotate(rec("k", 2))).unwrap_err();
        assert!(matches!(err, KeyError::Conflict(_)), "{err}");
        assert_eq!(
            d.keys
                .iter()
                .filter(|k| k.state == KeyState::Active)
                .count(),
            1
        );
    }

    #[test]
    fn a_store_group_or_others_can_write_is_refused_and_left_alone() {
        use std::os::unix::fs::PermissionsExt;
        let mode_of = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("keys.json"));
        store
            .update(|d| d.apply(&Change::AddKey(rec("k", 1))))
            .unwrap();
        assert_eq!(mode_of(store.path()), 0o600);
        for mode in [0o666, 0o620, 0o602, 0o660] {
            std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let before = std::fs::read(store.path()).unwrap();
            for err in [
                store.load().unwrap_err(),
                store.load_existing().unwrap_err(),
                store
                    .update(|d| d.apply(&Change::AddKey(rec("k2", 1))))
                    .unwrap_err(),
            ] {
                assert!(
                    matches!(&err, KeyError::LoosePermissions { file: KeyFile::Store, mode: m, .. }
                        if *m == mode),
                    "{mode:04o}: {err}"
                );
                let text = err.to_string();
                assert!(
                    text.contains("keys.json")
                        && text.contains(&format!("mode {mode:04o}"))
                        && text.contains("chmod 600"),
                    "{text}"
                );
            }
            // Refused, not repaired: the file and its mode stay as they were.
            assert_eq!(std::fs::read(store.path()).unwrap(), before);
            assert_eq!(mode_of(store.path()), mode);
        }
        // Readable by others is fine for the store: it holds ciphertext only.
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(store.load().unwrap().keys.len(), 1);
    }

    #[test]
    fn the_store_is_written_0600_even_over_a_loose_leftover_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("keys.json"));
        let tmp = store.path().with_extension("tmp");
        std::fs::write(&tmp, b"left over").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();
        store
            .update(|d| d.apply(&Change::AddKey(rec("k", 1))))
            .unwrap();
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o600);
        assert_eq!(store.load().unwrap().keys.len(), 1);
    }

    #[test]
    fn debug_of_a_record_shows_no_ciphertext() {
        let text = format!("{:?}", rec("k", 1));
        for hidden in ["WRAPPED", "NONCE", "CIPHERTEXT"] {
            assert!(!text.contains(hidden), "{text}");
        }
        assert!(text.contains("sk-...abcd"));
    }
}
