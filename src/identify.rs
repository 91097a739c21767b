//! The identify step: which tenant is calling.
//!
//! Sources are tried in config order. The first that names a tenant wins, but every source
//! is consulted: two sources naming different tenants is `identity_conflict`, never resolved
//! silently. A tenant exists once it has a key or a token in the store, or a config entry.

use std::sync::Arc;

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::accept::Peer;

use crate::keys::store::Snapshot;
use crate::policy::TenantPolicy;
use crate::vocab::{reserved_tenant_id, valid_tenant_id};

/// The identify step found no tenant, or found two.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error("no tenant identity: send a platform token as the API key or the tenant header")]
    NoIdentity,
    #[error("the tenant header is not a valid tenant id ([A-Za-z0-9_.:-]{{1,128}})")]
    BadTenantId,
    #[error("tenant is not known to byokd")]
    UnknownTenant,
    #[error("identity sources disagree about the tenant")]
    Conflict,
    #[error("the end user id is not valid ([A-Za-z0-9_.:-]{{1,128}}, one value)")]
    BadEndUser,
    #[error("this tenant requires an end user: send the `{0}` header")]
    EndUserRequired(http::HeaderName),
}

/// `end_user`: where the end user inside a tenant is named. The end user is in the access
/// log and the ledger, never a metric label (one series per user would not scale).
#[derive(Debug, Clone)]
pub struct EndUserConfig {
    pub header: http::HeaderName,
    /// An OpenAI-wire body's `user` or `safety_identifier` names the end user when the
    /// header does not.
    pub from_body: bool,
    /// Send the header on to the provider instead of stripping it.
    pub forward: bool,
}

impl Default for EndUserConfig {
    fn default() -> Self {
        Self {
            header: http::HeaderName::from_static("x-end-user-id"),
            from_body: false,
            forward: false,
        }
    }
}

/// The end user the header names, if any; the same id rules as tenants, and one value.
pub fn end_user(
    cfg: &EndUserConfig,
    headers: &HeaderMap,
) -> Result<Option<Arc<str>>, IdentifyError> {
    let mut values = headers.get_all(&cfg.header).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.any(|other| other != v) {
        return Err(IdentifyError::BadEndUser);
    }
    let u = v.to_str().map_err(|_| IdentifyError::BadEndUser)?;
    valid_end_user(u).map(Some)
}

/// The end user an OpenAI-wire body names: `user`, else `safety_identifier` (OpenAI's newer
/// name for the same thing). A body that is not JSON names none; one that names an invalid
/// id is refused like the header. The usual body's top level is scanned
/// ([`crate::route::head::members`]) rather than the conversation parsed.
pub fn body_end_user(body: &[u8]) -> Result<Option<Arc<str>>, IdentifyError> {
    let fields = match crate::route::head::members(body) {
        Some(m) => scanned_fields(&m),
        None => parsed_fields(body),
    };
    match fields.and_then(|(user, safety_identifier)| user.or(safety_identifier)) {
        Some(u) if !u.is_empty() => valid_end_user(&u).map(Some),
        _ => Ok(None),
    }
}

type Field = Option<String>;

/// `user` and `safety_identifier` as serde's typed read gives them: `None` when either is a
/// duplicate or not a string (or `null`).
fn scanned_fields(m: &crate::route::head::Members<'_>) -> Option<(Field, Field)> {
    let field = |key: &str| -> Option<Field> {
        if m.count(key) > 1 {
            return None;
        }
        m.get(key)
            .map_or(Some(None), |raw| serde_json::from_slice(raw).ok())
    };
    Some((field("user")?, field("safety_identifier")?))
}

fn parsed_fields(body: &[u8]) -> Option<(Field, Field)> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        user: Field,
        #[serde(default)]
        safety_identifier: Field,
    }
    let head = serde_json::from_slice::<Head>(body).ok()?;
    Some((head.user, head.safety_identifier))
}

/// An end user id from a request body field.
pub fn valid_end_user(u: &str) -> Result<Arc<str>, IdentifyError> {
    if valid_tenant_id(u) {
        Ok(u.into())
    } else {
        Err(IdentifyError::BadEndUser)
    }
}

/// Headers an SDK puts its `api_key` in; any of them may carry a platform token.
const TOKEN_HEADERS: [&str; 3] = ["x-api-key", "x-goog-api-key", "api-key"];

/// Tenants named in the config's `tenants:` section (they exist without a key or token).
pub type Configured = crate::vocab::FastMap<Arc<str>, TenantPolicy>;

/// `open`: a tenant a trusted header or verified certificate names exists even if neither the
/// store nor the config knows it (`tenants_from_identity: open`).
pub fn identify(
    sources: &[IdentitySource],
    configured: &Configured,
    snap: &Snapshot,
    headers: &HeaderMap,
    peer: &Peer,
    open: bool,
) -> Result<Arc<str>, IdentifyError> {
    let mut found: Option<Arc<str>> = None;
    for src in sources {
        let t = match src {
            IdentitySource::Header { name, only_from } => {
                let trusted = match only_from {
                    HeaderTrust::Loopback => peer.loopback(),
                    HeaderTrust::Mtls => peer.client_cert.is_some(),
                    HeaderTrust::Any => true,
                };
                // From a peer it does not trust, the header is not evidence of anything: it is
                // ignored (and stripped before forwarding), never an error that probes it.
                if trusted {
                    from_header(configured, snap, headers, name, open)?
                } else {
                    None
                }
            }
            IdentitySource::Bearer => from_token(snap, headers)?,
            IdentitySource::Mtls(how) => from_cert(configured, snap, peer, how, open)?,
            IdentitySource::Passthrough { .. } => None,
        };
        match (&found, t) {
            (None, Some(t)) => found = Some(t),
            (Some(a), Some(b)) if *a != b => return Err(IdentifyError::Conflict),
            _ => {}
        }
    }
    found.ok_or(IdentifyError::NoIdentity)
}

fn from_header(
    configured: &Configured,
    snap: &Snapshot,
    headers: &HeaderMap,
    name: &http::HeaderName,
    open: bool,
) -> Result<Option<Arc<str>>, IdentifyError> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    // The header twice with different tenants is a conflict, not "the first one wins".
    if values.any(|other| other != v) {
        return Err(IdentifyError::Conflict);
    }
    let t = v.to_str().map_err(|_| IdentifyError::BadTenantId)?;
    if !valid_tenant_id(t) {
        return Err(IdentifyError::BadTenantId);
    }
    if reserved_tenant_id(t) {
        return Err(IdentifyError::UnknownTenant);
    }
    known_or_open(configured, snap, t, open)
}

/// The tenant a verified client certificate names: a URI SAN under the configured prefix
/// (a SPIFFE ID such as `spiffe://example.org/tenant/acme`) or the subject CN.
fn from_cert(
    configured: &Configured,
    snap: &Snapshot,
    peer: &Peer,
    how: &CertTenant,
    open: bool,
) -> Result<Option<Arc<str>>, IdentifyError> {
    let Some(cert) = &peer.client_cert else {
        return Ok(None);
    };
    let t = match how {
        CertTenant::UriSanPrefix(prefix) => {
            let mut names = cert
                .uri_sans
                .iter()
                .filter_map(|u| u.strip_prefix(prefix.as_str()));
            let first = names.next();
            // A certificate naming two tenants under the prefix names neither.
            if first.is_some_and(|f| names.any(|n| n != f)) {
                return Err(IdentifyError::Conflict);
            }
            first
        }
        CertTenant::SubjectCn => cert.common_name.as_deref(),
    };
    let Some(t) = t else {
        return Ok(None);
    };
    if !valid_tenant_id(t) {
        return Err(IdentifyError::BadTenantId);
    }
    if reserved_tenant_id(t) {
        return Err(IdentifyError::UnknownTenant);
    }
    known_or_open(configured, snap, t, open)
}

/// The end user's own key for this one request (`passthrough`): the provider it is for and
/// the key, if both headers are present. Never stored, cached or logged.
pub fn user_key<'h>(
    sources: &[IdentitySource],
    headers: &'h HeaderMap,
) -> Option<(&'h [u8], &'h [u8])> {
    sources.iter().find_map(|s| match s {
        IdentitySource::Passthrough {
            key_header,
            provider_header,
        } => Some((
            headers.get(provider_header)?.as_bytes(),
            headers.get(key_header)?.as_bytes(),
        )),
        _ => None,
    })
}

/// The shared `Arc<str>` for a tenant name, so later steps never allocate it.
/// The tenant `t` names: a known one, or, with open tenants, `t` itself.
fn known_or_open(
    configured: &Configured,
    snap: &Snapshot,
    t: &str,
    open: bool,
) -> Result<Option<Arc<str>>, IdentifyError> {
    match canonical(configured, snap, t) {
        Some(k) => Ok(Some(k)),
        None if open => Ok(Some(Arc::from(t))),
        None => Err(IdentifyError::UnknownTenant),
    }
}

pub fn canonical(configured: &Configured, snap: &Snapshot, t: &str) -> Option<Arc<str>> {
    snap.tenants
        .get_key_value(t)
        .map(|(k, _)| k.clone())
        .or_else(|| configured.get_key_value(t).map(|(k, _)| k.clone()))
}

/// The credentials of an `Authorization: Bearer ...` value. The scheme is case-insensitive
/// (RFC 9110 §11.1), so `bearer` and `BEARER` count as well.
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// A platform token in whichever header the SDK used. Only the SHA-256 is compared: the
/// map lookup is on a digest the caller cannot steer, so timing reveals nothing of the token.
fn from_token(snap: &Snapshot, headers: &HeaderMap) -> Result<Option<Arc<str>>, IdentifyError> {
    if snap.tokens.is_empty() {
        return Ok(None);
    }
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    let others = TOKEN_HEADERS
        .iter()
        .filter_map(|h| headers.get(*h).map(|v| v.as_bytes()));
    // Every candidate is hashed and looked up, so the time does not depend on which header
    // held a token; two tokens of different tenants are a conflict.
    let mut found: Option<&Arc<str>> = None;
    for candidate in bearer.into_iter().chain(others) {
        let digest: [u8; 32] = Sha256::digest(candidate.trim_ascii()).into();
        match (found, snap.tokens.get(&digest)) {
            (None, Some(t)) => found = Some(t),
            (Some(a), Some(b)) if a != b => return Err(IdentifyError::Conflict),
            _ => {}
        }
    }
    Ok(found.cloned())
}

/// Which peers the tenant header is believed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderTrust {
    /// Only from a loopback peer (the app in the same pod): the default.
    Loopback,
    /// Only on a connection with a verified client certificate.
    Mtls,
    /// From anyone who can reach the listener.
    Any,
}

/// How the tenant is read from a verified client certificate.
#[derive(Debug, Clone)]
pub enum CertTenant {
    /// A URI SAN starting with this prefix; the rest is the tenant (SPIFFE IDs).
    UriSanPrefix(String),
    /// The subject common name.
    SubjectCn,
}

/// Where the tenant id may come from, in the order they are tried.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    Header {
        name: http::HeaderName,
        only_from: HeaderTrust,
    },
    Bearer,
    Mtls(CertTenant),
    /// Not a tenant source: enables the end user's own key for tenants that allow it.
    Passthrough {
        key_header: http::HeaderName,
        provider_header: http::HeaderName,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR tok"] {
            assert_eq!(bearer_token(v.as_bytes()), Some(&b"tok"[..]), "{v}");
        }
        for v in ["Basic tok", "Bearertok", "Bear", ""] {
            assert_eq!(bearer_token(v.as_bytes()), None, "{v}");
        }
    }

    /// The scan's reading of `user` and `safety_identifier` is serde's, for every JSON body
    /// among the one-byte changes, insertions and deletions of a few.
    #[test]
    fn the_end_user_scanned_is_the_end_user_parsed() {
        let seeds: [&[u8]; 4] = [
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"user":"u-1"}"#,
            br#"{"user":null,"safety_identifier":"s-2","messages":[{"user":"x"}]}"#,
            br#"{ "user" : "", "safety_identifier" : "s" }"#,
            br#"{"messages":[],"user":"caf\u00e9"}"#,
        ];
        let mut compared = 0;
        for seed in seeds {
            assert!(crate::route::head::members(seed).is_some());
            crate::route::head::variants(seed, b"{}[]\":,\\ \nusr_1n", |b| {
                if serde_json::from_slice::<serde_json::Value>(b).is_err() {
                    return;
                }
                if let Some(m) = crate::route::head::members(b) {
                    let scanned = scanned_fields(&m);
                    assert_eq!(scanned, parsed_fields(b), "{}", String::from_utf8_lossy(b));
                    compared += 1;
                }
            });
        }
        assert!(compared > 1_000, "{compared}");
        assert_eq!(
            body_end_user(br#"{"messages":[{"user":"inner"}],"user":"outer"}"#)
                .unwrap()
                .as_deref(),
            Some("outer")
        );
        assert!(
            body_end_user(br#"{"user":"a","user":"b"}"#)
                .unwrap()
                .is_none()
        );
        assert!(body_end_user(br#"{"user":"bad id with spaces"}"#).is_err());
    }
}
