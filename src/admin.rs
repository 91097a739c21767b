//! The admin listener: `/metrics`, `/healthz`, `/readyz`, and behind the admin bearer token
//! the `/admin/*` API: keys (register, list, rotate, revoke), platform tokens, usage. Kept off
//! the data port so the app (and anything it proxies) cannot reach it, and so scrapes never
//! queue behind LLM traffic. Every `/admin/*` call, allowed or denied, is audited.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use sha2::{Digest, Sha256};

use crate::metrics::Metrics;
use crate::pipeline::Proxy;

#[derive(Debug)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub proxy: Arc<Proxy>,
    /// Set once the store is loaded and the data listener accepts; cleared on shutdown.
    pub ready: AtomicBool,
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if !crate::accept::host_ok(req.version(), req.headers()) {
            return text(
                StatusCode::BAD_REQUEST,
                b"an HTTP/1.1 request needs exactly one Host header\n".to_vec(),
            );
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut r = text(StatusCode::OK, self.metrics.render());
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, b"ok\n".to_vec()),
            (&Method::GET, "/readyz") => {
                if self.ready.load(Ordering::Acquire) {
                    text(StatusCode::OK, b"ready\n".to_vec())
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, b"not ready\n".to_vec())
                }
            }
            (method, path) if path.starts_with("/admin/") => {
                if let Some(refusal) = self.refuse(req.headers(), method, path) {
                    return refusal;
                }
                let (method, path) = (method.clone(), path.to_string());
                let resp = crate::admin_api::handle(&self.proxy, req).await;
                // Fail-closed auditing applies to key operations (inside the handlers); the
                // access record of the call itself is best effort so a full disk cannot lock
                // the operator out of revoking a key.
                let _ = self.proxy.keyring.audit().record(
                    "admin_call",
                    serde_json::json!({
                        "method": method.as_str(), "path": path,
                        "status": resp.status().as_u16(),
                    }),
                );
                resp
            }
            _ => text(StatusCode::NOT_FOUND, b"not found\n".to_vec()),
        }
    }

    /// Checks the admin bearer token (SHA-256, compared in constant time); the refusal to
    /// send if it is wrong or missing. Every refusal is audited.
    fn refuse(
        &self,
        headers: &http::HeaderMap,
        method: &Method,
        path: &str,
    ) -> Option<Response<Full<Bytes>>> {
        let Some(expected) = self.proxy.config.admin_token_sha256 else {
            return Some(text(
                StatusCode::NOT_FOUND,
                b"admin API disabled: set admin.token_sha256\n".to_vec(),
            ));
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| crate::identify::bearer_token(v.as_bytes()))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim_ascii())));
        let ok = presented
            .is_some_and(|d| bool::from(subtle::ConstantTimeEq::ct_eq(&d[..], &expected[..])));
        if ok {
            return None;
        }
        let _ = self.proxy.keyring.audit().record(
            "admin_denied",
            serde_json::json!({
                "method": method.as_str(), "path": path,
                "reason": if presented.is_some() { "wrong token" } else { "no token" },
            }),
        );
        let mut r = text(StatusCode::UNAUTHORIZED, b"admin token required\n".to_vec());
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(r)
    }
}

pub(crate) fn text(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
