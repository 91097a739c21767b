//! The admin listener: `/metrics`, `/healthz`, `/readyz`. Kept off the data port so the app
//! (and anything it proxies) cannot reach it, and so scrapes never queue behind LLM traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Set once the store is loaded and the data listener accepts; cleared on shutdown.
    pub ready: AtomicBool,
}

impl Admin {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            _ => text(StatusCode::NOT_FOUND, b"not found\n".to_vec()),
        }
    }
}

fn text(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
