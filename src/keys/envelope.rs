//! Envelope encryption of one provider key: AES-256-GCM under a fresh data key.
//!
//! The associated data binds the ciphertext to tenant, provider, key id and version, so a
//! record copied to another tenant (or renamed, or re-versioned) fails to decrypt.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroizing;

use super::KeyError;

pub const NONCE_LEN: usize = 12;

/// A 256-bit data key, zeroized on drop.
pub type DataKey = Zeroizing<[u8; 32]>;

/// Fills `buf` from the OS CSPRNG.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), KeyError> {
    getrandom::fill(buf).map_err(|e| KeyError::Random(e.to_string()))
}

pub fn new_data_key() -> Result<DataKey, KeyError> {
    let mut k = Zeroizing::new([0u8; 32]);
    random_bytes(k.as_mut())?;
    Ok(k)
}

/// What a sealed secret is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub tenant: &'a str,
    pub provider: &'a str,
    pub key_id: &'a str,
    pub version: u32,
}

impl Binding<'_> {
    /// Length-prefixed fields, so no two different bindings share an encoding.
    pub fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"byokd-key-v1");
        for f in [self.tenant, self.provider, self.key_id] {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f.as_bytes());
        }
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// AES-256-GCM with a random 96-bit nonce; returns (nonce, ciphertext || tag).
pub fn seal(
    key: &[u8; 32],
    plaintext: &[u8],
    aad: &[u8],
) -> Result<([u8; NONCE_LEN], Vec<u8>), KeyError> {
    let cipher =
        Aes256Gcm::new_from_slice(key).map_err(|_| KeyError::Corrupt("key length".into()))?;
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce)?;
    let ct = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| KeyError::Corrupt("encryption failed".into()))?;
    Ok((nonce, ct))
}

/// Decrypts and authenticates; a wrong key, binding or tampered byte is [`KeyError::Decrypt`].
pub fn open(
    key: &[u8; 32],
    nonce: &[u8],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let cipher =
        Aes256Gcm::new_from_slice(key).map_err(|_| KeyError::Corrupt("key length".into()))?;
    let nonce: [u8; NONCE_LEN] = nonce
        .try_into()
        .map_err(|_| KeyError::Corrupt("nonce length".into()))?;
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| KeyError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(tenant: &str) -> Binding<'_> {
        Binding {
            tenant,
            provider: "openai",
            key_id: "key_1",
            version: 1,
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let k = new_data_key().unwrap();
        let (n, ct) = seal(&k, b"sk-secret", &binding("acme").aad()).unwrap();
        assert_eq!(
            &*open(&k, &n, &ct, &binding("acme").aad()).unwrap(),
            b"sk-secret"
        );
        // Moved to another tenant: refuses.
        assert!(matches!(
            open(&k, &n, &ct, &binding("evil").aad()),
            Err(KeyError::Decrypt)
        ));
        let mut tampered = ct.clone();
        tampered[0] ^= 1;
        assert!(open(&k, &n, &tampered, &binding("acme").aad()).is_err());
        // Field boundaries are unambiguous.
        let a = Binding {
            tenant: "ab",
            provider: "c",
            key_id: "k",
            version: 1,
        }
        .aad();
        let b = Binding {
            tenant: "a",
            provider: "bc",
            key_id: "k",
            version: 1,
        }
        .aad();
        assert_ne!(a, b);
    }
}
