//! AWS KMS as the key-encryption key: data keys from `GenerateDataKey` (AES_256), unwrapped
//! with `Decrypt`, re-wrapped with `ReEncrypt` (the data key never leaves KMS in the clear
//! for a rewrap). Every call carries the encryption context {tenant, provider, key_id}, so a
//! record copied to another tenant fails at KMS, and CloudTrail shows whose key was opened.
//!
//! Credentials come from the standard AWS chain (environment, web identity for pods, instance
//! profile). The SDK has no operation timeout by default: one is always set here, because a
//! cold key-cache miss waits on this call.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use tokio::sync::OnceCell;
use zeroize::{Zeroize, Zeroizing};

use super::envelope::{Binding, DataKey};
use super::kms::{Kms, KmsFuture, WrappedKey};
use super::{AwsKmsConfig, KeyError};

pub struct AwsKms {
    cfg: AwsKmsConfig,
    /// Built on first use: loading the credential chain may touch the network (IMDS, STS),
    /// which a CLI command like `keys list` must not pay for.
    client: OnceCell<aws_sdk_kms::Client>,
    /// The ARN `key_id` resolves to, for `rewrap` to know which records are current.
    arn: OnceCell<String>,
}

impl std::fmt::Debug for AwsKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKms")
            .field("key_id", &self.cfg.key_id)
            .field("region", &self.cfg.region)
            .field("endpoint_url", &self.cfg.endpoint_url)
            .finish()
    }
}

impl AwsKms {
    pub fn new(cfg: AwsKmsConfig) -> Self {
        Self {
            cfg,
            client: OnceCell::new(),
            arn: OnceCell::new(),
        }
    }

    /// The record's wrapped key from a KMS answer: the key that wrapped it (its ARN, as KMS
    /// names it) and the ciphertext blob.
    fn wrapped(&self, key_id: Option<&str>, blob: Option<&Blob>) -> Result<WrappedKey, KeyError> {
        Ok(WrappedKey {
            kek_id: key_id.map_or_else(|| self.cfg.key_id.clone(), str::to_string),
            blob: blob
                .map(|b| b.as_ref().to_vec())
                .ok_or_else(|| KeyError::KmsUnavailable("KMS returned no ciphertext".into()))?,
        })
    }

    async fn client(&self) -> &aws_sdk_kms::Client {
        self.client
            .get_or_init(|| async {
                let timeouts = TimeoutConfig::builder()
                    .operation_timeout(self.cfg.timeout)
                    // Half the budget per attempt, so the one retry below can happen.
                    .operation_attempt_timeout(self.cfg.timeout / 2)
                    .connect_timeout(self.cfg.timeout.min(Duration::from_secs(1)))
                    .build();
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .timeout_config(timeouts)
                    // One retry inside the operation timeout: a slow KMS must fail fast so
                    // byokd can serve from its stale cache or answer 503 with retry-after.
                    .retry_config(RetryConfig::standard().with_max_attempts(2));
                if let Some(r) = &self.cfg.region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(u) = &self.cfg.endpoint_url {
                    loader = loader.endpoint_url(u.clone());
                }
                aws_sdk_kms::Client::new(&loader.load().await)
            })
            .await
    }
}

fn context(b: Binding<'_>) -> impl Iterator<Item = (&'static str, String)> + use<'_> {
    [
        ("tenant", b.tenant.to_string()),
        ("provider", b.provider.to_string()),
        ("key_id", b.key_id.to_string()),
    ]
    .into_iter()
}

/// Sorts a KMS failure into three: a refused ciphertext (wrong context, wrong key, altered)
/// is the record's fault; a key KMS will not use (disabled, pending deletion, not found,
/// access denied: an operator's decision) refuses this record without slowing anyone else
/// and without stale serving; anything else (network, timeout, throttling, 5xx) is the KMS
/// being unavailable: the stale cache serves and cold misses back off.
fn classify<E, R>(e: SdkError<E, R>) -> KeyError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = e.code().map(str::to_string);
    match code.as_deref() {
        Some("InvalidCiphertextException" | "IncorrectKeyException") => KeyError::Decrypt,
        Some(
            c @ ("NotFoundException"
            | "DisabledException"
            | "KMSInvalidStateException"
            | "AccessDeniedException"
            | "InvalidKeyUsageException"),
        ) => KeyError::KmsRefused(format!(
            "{c}: {}",
            e.message().unwrap_or("KMS refused to use the key")
        )),
        _ => {
            let detail = match (&code, e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c.clone(),
                _ => crate::vocab::ErrorChain(&e).to_string(),
            };
            KeyError::KmsUnavailable(detail)
        }
    }
}

fn data_key(blob: Option<Blob>) -> Result<DataKey, KeyError> {
    let mut bytes = blob
        .ok_or_else(|| KeyError::KmsUnavailable("KMS returned no plaintext".into()))?
        .into_inner();
    let dek: Result<[u8; 32], _> = bytes.as_slice().try_into();
    bytes.zeroize();
    dek.map(Zeroizing::new)
        .map_err(|_| KeyError::Corrupt("KMS data key is not 32 bytes".into()))
}

impl Kms for AwsKms {
    fn generate_data_key<'a>(
        &'a self,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, (DataKey, WrappedKey)> {
        Box::pin(async move {
            let mut req = self
                .client()
                .await
                .generate_data_key()
                .key_id(&self.cfg.key_id)
                .key_spec(DataKeySpec::Aes256);
            for (k, v) in context(binding) {
                req = req.encryption_context(k, v);
            }
            let out = req.send().await.map_err(classify)?;
            let wrapped = self.wrapped(out.key_id(), out.ciphertext_blob())?;
            let dek = data_key(out.plaintext)?;
            Ok((dek, wrapped))
        })
    }

    fn decrypt<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, DataKey> {
        Box::pin(async move {
            // Naming the key id makes KMS refuse a ciphertext of any other key, so a forged
            // record cannot make byokd decrypt with a key its role happens to reach.
            let mut req = self
                .client()
                .await
                .decrypt()
                .key_id(&wrapped.kek_id)
                .ciphertext_blob(Blob::new(wrapped.blob.clone()));
            for (k, v) in context(binding) {
                req = req.encryption_context(k, v);
            }
            let out = req.send().await.map_err(classify)?;
            data_key(out.plaintext)
        })
    }

    fn rewrap<'a>(
        &'a self,
        wrapped: &'a WrappedKey,
        binding: Binding<'a>,
    ) -> KmsFuture<'a, WrappedKey> {
        Box::pin(async move {
            let mut req = self
                .client()
                .await
                .re_encrypt()
                .source_key_id(&wrapped.kek_id)
                .ciphertext_blob(Blob::new(wrapped.blob.clone()))
                .destination_key_id(&self.cfg.key_id);
            for (k, v) in context(binding) {
                req = req
                    .source_encryption_context(k, v.clone())
                    .destination_encryption_context(k, v);
            }
            let out = req.send().await.map_err(classify)?;
            self.wrapped(out.key_id(), out.ciphertext_blob())
        })
    }

    fn wrap<'a>(&'a self, dek: &'a DataKey, binding: Binding<'a>) -> KmsFuture<'a, WrappedKey> {
        Box::pin(async move {
            // The SDK takes the plaintext as an owned buffer it does not zeroize; this runs
            // only in `keys import`, once per record, never on a request path.
            let mut req = self
                .client()
                .await
                .encrypt()
                .key_id(&self.cfg.key_id)
                .plaintext(Blob::new(dek.to_vec()));
            for (k, v) in context(binding) {
                req = req.encryption_context(k, v);
            }
            let out = req.send().await.map_err(classify)?;
            self.wrapped(out.key_id(), out.ciphertext_blob())
        })
    }

    fn active_id(&self) -> KmsFuture<'_, String> {
        Box::pin(async move {
            self.arn
                .get_or_try_init(|| async {
                    let out = self
                        .client()
                        .await
                        .describe_key()
                        .key_id(&self.cfg.key_id)
                        .send()
                        .await
                        .map_err(classify)?;
                    out.key_metadata()
                        .and_then(|m| m.arn().map(str::to_string))
                        .ok_or_else(|| KeyError::KmsUnavailable("DescribeKey gave no ARN".into()))
                })
                .await
                .cloned()
        })
    }
}
