//! The `/admin/*` routes behind the admin token: key and token management and per-tenant
//! usage, as JSON. Shares `keys::manage` with the CLI, so both validate and audit alike.
//! No response ever carries a secret: keys come back masked, tokens are shown once at issue.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::keys::manage::{self, NewKey};
use crate::keys::store::public_json;
use crate::keys::{KeyError, PlainKey};
use crate::pipeline::Proxy;
use crate::verify::{VerifyError, verify_key};

/// Management bodies are small; a larger one is a mistake or an attack.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("body over {MAX_BODY} bytes")]
    TooLarge,
    #[error("not found")]
    NoRoute,
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

impl AdminError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::Key(KeyError::Invalid(_)) => StatusCode::BAD_REQUEST,
            Self::Key(KeyError::NotFound(_)) => StatusCode::NOT_FOUND,
            Self::Key(KeyError::Conflict(_)) => StatusCode::CONFLICT,
            Self::Key(KeyError::KmsRefused(_)) => StatusCode::BAD_GATEWAY,
            Self::Key(e) if e.transient() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Key(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Verify(VerifyError::Rejected(_) | VerifyError::Unsupported(_)) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Verify(VerifyError::Inconclusive(_) | VerifyError::Unreachable(_)) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) | Self::Key(KeyError::Invalid(_)) => "invalid_request",
            Self::TooLarge => "body_too_large",
            Self::NoRoute | Self::Key(KeyError::NotFound(_)) => "not_found",
            Self::Key(KeyError::Conflict(_)) => "conflict",
            Self::Key(KeyError::KmsRefused(_)) => "kms_refused",
            Self::Key(e) if e.transient() => "unavailable",
            Self::Key(_) => "internal_error",
            Self::Verify(VerifyError::Rejected(_)) => "key_rejected",
            Self::Verify(VerifyError::Unsupported(_)) => "verify_unsupported",
            Self::Verify(_) => "verify_failed",
        }
    }
}

/// A secret field in a request body: deserialized straight into a zeroizing buffer.
struct Secret(PlainKey);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        Ok(Secret(PlainKey::new(s.trim().to_string())))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddKey {
    tenant: String,
    provider: String,
    secret: Secret,
    label: Option<String>,
    expires_in: Option<String>,
    #[serde(default)]
    verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    secret: Secret,
    #[serde(default)]
    verify: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    tenant: String,
}

pub async fn handle(proxy: &Proxy, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match route(proxy, req).await {
        Ok((status, body)) => json(status, &body),
        Err(e) => {
            let status = e.status();
            if status.is_server_error() {
                tracing::warn!(error = %e, "admin call failed");
            }
            json(
                status,
                &serde_json::json!({"error": {"message": e.to_string(), "type": e.code(), "code": e.code()}}),
            )
        }
    }
}

async fn route(
    proxy: &Proxy,
    req: Request<Incoming>,
) -> Result<(StatusCode, serde_json::Value), AdminError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let store = proxy.keyring.store().as_ref();
    let audit = proxy.keyring.audit().as_ref();
    let kms = proxy.keyring.kms().as_ref();
    let out = match (&parts.method, segs.as_slice()) {
        (&Method::GET, ["admin", "tenants", t, "usage"]) if crate::vocab::valid_tenant_id(t) => {
            let q = parts.uri.query();
            if query_param(q, "by").as_deref() == Some("end_user") {
                let num = |name: &str, default: usize| match query_param(q, name) {
                    None => Ok(default),
                    Some(v) => v.parse::<usize>().map_err(|_| {
                        AdminError::BadRequest(format!("`{name}` must be a whole number"))
                    }),
                };
                let limit = num("limit", 100)?.clamp(1, 1000);
                let page = proxy.end_users_page(t, num("offset", 0)?, limit);
                return Ok((StatusCode::OK, page));
            }
            let user = query_param(q, "end_user");
            if user
                .as_deref()
                .is_some_and(|u| !crate::vocab::valid_tenant_id(u))
            {
                return Err(AdminError::BadRequest(
                    "`end_user` is not a valid id".into(),
                ));
            }
            let resp = proxy.usage(t, user.as_deref());
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let v = serde_json::from_slice(&bytes).unwrap_or_default();
            return Ok((StatusCode::OK, v));
        }
        (&Method::GET, ["admin", "keys"]) => {
            let tenant = query_param(parts.uri.query(), "tenant");
            let list = manage::list_keys(store, tenant.as_deref()).await?;
            let keys: Vec<_> = list.iter().map(public_json).collect();
            (StatusCode::OK, serde_json::json!({ "keys": keys }))
        }
        (&Method::POST, ["admin", "keys"]) => {
            let add: AddKey = read_json(body).await?;
            let provider = provider(proxy, &add.provider)?;
            manage::check_new_key(&add.tenant, &provider, add.secret.0.expose())?;
            let expires_in = add
                .expires_in
                .as_deref()
                .map(crate::config::parse_duration)
                .transpose()
                .map_err(AdminError::BadRequest)?;
            if add.verify {
                verify_key(&proxy.upstream, &provider, add.secret.0.expose()).await?;
            }
            let rec = manage::add_key(
                store,
                kms,
                audit,
                NewKey {
                    tenant: &add.tenant,
                    provider: &provider,
                    secret: &add.secret.0,
                    label: add.label,
                    expires_in,
                },
            )
            .await?;
            (StatusCode::CREATED, public_json(&rec))
        }
        (&Method::POST, ["admin", "keys", id, "rotate"]) => {
            let rot: RotateKey = read_json(body).await?;
            let current = manage::list_keys(store, None)
                .await?
                .into_iter()
                .find(|r| r.id == *id)
                .ok_or_else(|| KeyError::NotFound(format!("no key with id `{id}`")))?;
            let provider = provider(proxy, &current.provider)?;
            manage::check_new_key(&current.tenant, &provider, rot.secret.0.expose())?;
            if rot.verify {
                verify_key(&proxy.upstream, &provider, rot.secret.0.expose()).await?;
            }
            let rec = manage::rotate_key(store, kms, audit, id, &provider, &rot.secret.0).await?;
            (StatusCode::OK, public_json(&rec))
        }
        (&Method::DELETE, ["admin", "keys", id]) => {
            let n = manage::revoke_key(store, audit, id).await?;
            (
                StatusCode::OK,
                serde_json::json!({"id": id, "revoked_versions": n}),
            )
        }
        (&Method::POST, ["admin", "tokens"]) => {
            let t: NewToken = read_json(body).await?;
            let (token, rec) = manage::new_token(store, audit, &t.tenant).await?;
            // The one response that carries a credential: the platform token, shown once.
            (
                StatusCode::CREATED,
                serde_json::json!({"id": rec.id, "tenant": rec.tenant, "token": token.as_str()}),
            )
        }
        (&Method::DELETE, ["admin", "tokens", id]) => {
            manage::revoke_token(store, audit, id).await?;
            (
                StatusCode::OK,
                serde_json::json!({"id": id, "revoked": true}),
            )
        }
        _ => return Err(AdminError::NoRoute),
    };
    // Read-your-writes: the change serves from this replica at once, not at the next
    // watcher event or notification.
    if parts.method != Method::GET {
        match proxy.keyring.reload().await {
            Ok(()) => proxy.metrics.key_expiry(
                proxy
                    .keyring
                    .snapshot()
                    .expiring_soon(crate::vocab::unix_now()),
            ),
            Err(e) => tracing::warn!(error = %e,
                "reload after an admin change failed; the watcher will retry"),
        }
    }
    Ok(out)
}

fn provider(
    proxy: &Proxy,
    name: &str,
) -> Result<std::sync::Arc<crate::provider::Provider>, AdminError> {
    proxy
        .config
        .provider_index(name)
        .map(|i| proxy.config.providers[i].clone())
        .ok_or_else(|| {
            let known: Vec<&str> = proxy.config.providers.iter().map(|p| &*p.name).collect();
            AdminError::BadRequest(format!(
                "unknown provider `{name}`; configured: {}",
                known.join(", ")
            ))
        })
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Incoming) -> Result<T, AdminError> {
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if crate::forward::body_too_large(e.as_ref()) {
                AdminError::TooLarge
            } else {
                AdminError::BadRequest("the body could not be read".into())
            }
        })?
        .to_bytes();
    // The body may hold a secret: parse from a copy that is wiped afterwards. (The `Bytes`
    // buffer hyper filled is freed without wiping; it never leaves this function.)
    let buf = Zeroizing::new(bytes.to_vec());
    serde_json::from_slice(&buf).map_err(|e| {
        // serde may quote a value it could not use ("invalid type: string \"sk-...\""): such a
        // message is replaced by its position, so a misplaced secret is never echoed.
        let msg = e.to_string();
        if msg.contains('"') {
            AdminError::BadRequest(format!(
                "invalid JSON body at line {} column {}",
                e.line(),
                e.column()
            ))
        } else {
            AdminError::BadRequest(format!("invalid JSON body: {msg}"))
        }
    })
}

/// A query parameter, percent-decoded (`%3A` → `:`: tenant ids may hold `:`, which clients
/// escape in a query).
fn query_param(q: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(q?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).unwrap_or_default(),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            super::query_param(Some("a=1&tenant=acme%3Aeu"), "tenant").as_deref(),
            Some("acme:eu")
        );
        assert_eq!(
            super::query_param(Some("tenant=x%2"), "tenant").as_deref(),
            Some("x%2")
        );
    }
}
