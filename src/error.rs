//! Every error byokd itself answers with, mapped to HTTP in one place.
//!
//! Each step of the data flow has its own error enum, in its own module; [`ProxyError`] wraps them and is
//! the only place that decides the status code, the stable `x-byokd-error` code, who is
//! to blame, and the provider-shaped body the client sees. Details stay in the `#[source]`
//! chain for `tracing`; the client gets a short message and the request id.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::accept::LimitError;
use crate::failover::AttemptError;
use crate::forward::ForwardError;
use crate::identify::IdentifyError;
use crate::keys::CredentialError;
use crate::policy::AdmitError;
use crate::provider::ErrorShape;
use crate::route::RouteError;

/// Name of the response header carrying the stable error code.
pub const ERROR_HEADER: &str = "x-byokd-error";

/// Who caused an error: decides log level and whether an operator must act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    Internal,
}

/// Everything byokd answers with instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Identify(#[from] IdentifyError),
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
}

/// The stable codes of DESIGN §3, each with exactly one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    UnknownTenant,
    IdentityConflict,
    ProviderNotAllowed,
    NoKey,
    RateLimited,
    BudgetExceeded,
    SharedStateUnavailable,
    UnknownRoute,
    BadRequest,
    MethodNotAllowed,
    BodyTooLarge,
    HeadersTooLarge,
    KeyUnavailable,
    PassthroughNotAllowed,
    InvalidUserKey,
    ClientClosed,
    RequestTimeout,
    Overloaded,
    UpstreamUnreachable,
    UpstreamTimeout,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownTenant => "unknown_tenant",
            Self::IdentityConflict => "identity_conflict",
            Self::ProviderNotAllowed => "provider_not_allowed",
            Self::NoKey => "no_key",
            Self::RateLimited => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
            Self::SharedStateUnavailable => "shared_state_unavailable",
            Self::UnknownRoute => "unknown_route",
            Self::BadRequest => "bad_request",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::KeyUnavailable => "key_unavailable",
            Self::PassthroughNotAllowed => "passthrough_not_allowed",
            Self::InvalidUserKey => "invalid_user_key",
            Self::ClientClosed => "client_closed",
            Self::RequestTimeout => "request_timeout",
            Self::Overloaded => "overloaded",
            Self::UpstreamUnreachable => "upstream_unreachable",
            Self::UpstreamTimeout => "upstream_timeout",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::UnknownTenant | Self::IdentityConflict => StatusCode::UNAUTHORIZED,
            Self::ProviderNotAllowed | Self::NoKey => StatusCode::FORBIDDEN,
            Self::UnknownRoute => StatusCode::NOT_FOUND,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::KeyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited | Self::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::SharedStateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::PassthroughNotAllowed => StatusCode::FORBIDDEN,
            Self::InvalidUserKey => StatusCode::BAD_REQUEST,
            Self::ClientClosed => StatusCode::BAD_REQUEST,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl From<AttemptError> for ProxyError {
    fn from(e: AttemptError) -> Self {
        match e {
            AttemptError::Forward(f) => Self::Forward(f),
            AttemptError::Limit(l) => Self::Limit(l),
            AttemptError::Credential(c) => Self::Credential(c),
        }
    }
}

impl ProxyError {
    pub fn kind(&self) -> Code {
        match self {
            Self::Route(RouteError::UnknownRoute | RouteError::UnknownProvider(_)) => {
                Code::UnknownRoute
            }
            Self::Route(RouteError::MethodNotAllowed(_)) => Code::MethodNotAllowed,
            Self::Route(RouteError::BadHost | RouteError::NoCompatEndpoint(_)) => Code::BadRequest,
            Self::Identify(
                IdentifyError::NoIdentity
                | IdentifyError::BadTenantId
                | IdentifyError::UnknownTenant,
            ) => Code::UnknownTenant,
            Self::Identify(IdentifyError::Conflict) => Code::IdentityConflict,
            Self::Identify(IdentifyError::BadEndUser | IdentifyError::EndUserRequired(_)) => {
                Code::BadRequest
            }
            Self::Admit(AdmitError::ProviderNotAllowed(_)) => Code::ProviderNotAllowed,
            Self::Admit(AdmitError::RateLimited { .. }) => Code::RateLimited,
            Self::Admit(AdmitError::BudgetExceeded(_)) => Code::BudgetExceeded,
            Self::Admit(AdmitError::SharedStateUnavailable) => Code::SharedStateUnavailable,
            Self::Credential(CredentialError::NoKey(_)) => Code::NoKey,
            Self::Credential(CredentialError::PassthroughNotAllowed) => Code::PassthroughNotAllowed,
            Self::Credential(CredentialError::BadUserKey(_)) => Code::InvalidUserKey,
            Self::Credential(CredentialError::Unavailable { .. }) => Code::KeyUnavailable,
            Self::Limit(LimitError::HeadersTooLarge) => Code::HeadersTooLarge,
            Self::Limit(LimitError::BodyTooLarge(_)) => Code::BodyTooLarge,
            Self::Limit(LimitError::ClientClosed) => Code::ClientClosed,
            Self::Limit(LimitError::BodyTimeout) => Code::RequestTimeout,
            Self::Limit(LimitError::Overloaded) => Code::Overloaded,
            Self::Forward(
                ForwardError::Connect(_)
                | ForwardError::Unreachable(_)
                | ForwardError::BadUpstreamRequest(_),
            ) => Code::UpstreamUnreachable,
            Self::Forward(ForwardError::BodyFailed(e)) => {
                match crate::timeouts::caused_by::<crate::timeouts::IdleTimedOut>(e.as_ref()) {
                    Some(_) => Code::UpstreamTimeout,
                    None => Code::UpstreamUnreachable,
                }
            }
            Self::Forward(ForwardError::Timeout(_)) => Code::UpstreamTimeout,
            Self::Forward(ForwardError::InvalidCredential) => Code::KeyUnavailable,
        }
    }

    /// The stable code: `x-byokd-error` value, metric label, `code` field.
    pub fn code(&self) -> &'static str {
        self.kind().as_str()
    }

    pub fn status(&self) -> StatusCode {
        self.kind().status()
    }

    pub fn blame(&self) -> Blame {
        match self {
            Self::Route(_) | Self::Identify(_) | Self::Admit(_) | Self::Limit(_) => Blame::Client,
            Self::Credential(
                CredentialError::NoKey(_)
                | CredentialError::PassthroughNotAllowed
                | CredentialError::BadUserKey(_),
            ) => Blame::Client,
            Self::Credential(CredentialError::Unavailable { .. }) => Blame::Internal,
            Self::Forward(
                ForwardError::BadUpstreamRequest(_) | ForwardError::InvalidCredential,
            ) => Blame::Internal,
            Self::Forward(
                ForwardError::Connect(_)
                | ForwardError::Unreachable(_)
                | ForwardError::Timeout(_)
                | ForwardError::BodyFailed(_),
            ) => Blame::Upstream,
        }
    }

    /// Seconds after which a retry may succeed, for the codes that have one.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Admit(AdmitError::RateLimited { retry_after, .. }) => Some(*retry_after),
            Self::Admit(AdmitError::SharedStateUnavailable) => Some(1),
            Self::Credential(CredentialError::Unavailable { retry_after, .. }) => {
                Some(*retry_after)
            }
            Self::Forward(ForwardError::InvalidCredential) => Some(1),
            Self::Limit(LimitError::Overloaded) => Some(1),
            _ => None,
        }
    }

    /// The response the client sees: provider-shaped body, status, `x-byokd-error`.
    pub fn to_response(&self, shape: ErrorShape, request_id: &str) -> Response<Full<Bytes>> {
        let status = self.status();
        let message = format!("byokd: {} (request id {request_id})", self);
        let body = shape.error_body(status, self.code(), &message);
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Admit(AdmitError::BudgetExceeded(_))) {
            // The official SDKs honour this: no automatic retries into a spent budget.
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the public table of DESIGN §3: code and status for every error.
    #[test]
    fn status_and_code_table() {
        let cases: Vec<(ProxyError, &str, u16)> = vec![
            (RouteError::UnknownRoute.into(), "unknown_route", 404),
            (
                RouteError::MethodNotAllowed(http::Method::TRACE).into(),
                "method_not_allowed",
                405,
            ),
            (
                RouteError::UnknownProvider("x".into()).into(),
                "unknown_route",
                404,
            ),
            (IdentifyError::NoIdentity.into(), "unknown_tenant", 401),
            (IdentifyError::BadTenantId.into(), "unknown_tenant", 401),
            (IdentifyError::UnknownTenant.into(), "unknown_tenant", 401),
            (IdentifyError::Conflict.into(), "identity_conflict", 401),
            (
                AdmitError::ProviderNotAllowed("x".into()).into(),
                "provider_not_allowed",
                403,
            ),
            (CredentialError::NoKey("x".into()).into(), "no_key", 403),
            (
                AdmitError::RateLimited {
                    retry_after: 3,
                    who: crate::policy::Who::Tenant,
                }
                .into(),
                "rate_limited",
                429,
            ),
            (
                AdmitError::BudgetExceeded(crate::policy::Who::Tenant).into(),
                "budget_exceeded",
                429,
            ),
            (
                AdmitError::SharedStateUnavailable.into(),
                "shared_state_unavailable",
                503,
            ),
            (
                CredentialError::PassthroughNotAllowed.into(),
                "passthrough_not_allowed",
                403,
            ),
            (
                CredentialError::BadUserKey("x".into()).into(),
                "invalid_user_key",
                400,
            ),
            (
                CredentialError::Unavailable {
                    retry_after: 2,
                    source: std::sync::Arc::new(crate::keys::KeyError::KmsCoolingDown),
                }
                .into(),
                "key_unavailable",
                503,
            ),
            (LimitError::HeadersTooLarge.into(), "headers_too_large", 431),
            (LimitError::BodyTooLarge(1).into(), "body_too_large", 413),
            (LimitError::ClientClosed.into(), "client_closed", 400),
            (LimitError::BodyTimeout.into(), "request_timeout", 408),
            (RouteError::BadHost.into(), "bad_request", 400),
            (LimitError::Overloaded.into(), "overloaded", 503),
            (
                ForwardError::BodyFailed("reset".into()).into(),
                "upstream_unreachable",
                502,
            ),
            (
                ForwardError::BodyFailed(Box::new(crate::timeouts::IdleTimedOut {
                    idle: std::time::Duration::from_secs(1),
                    side: crate::timeouts::Side::Upstream,
                }))
                .into(),
                "upstream_timeout",
                504,
            ),
            (
                ForwardError::Timeout(std::time::Duration::from_secs(1)).into(),
                "upstream_timeout",
                504,
            ),
        ];
        for (err, code, status) in cases {
            assert_eq!(err.code(), code, "{err:?}");
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let resp = err.to_response(ErrorShape::default(), "rid");
            assert_eq!(resp.headers()[ERROR_HEADER], code);
        }
    }
}
