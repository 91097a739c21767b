//! The listener step: accept TCP connections, optionally terminate TLS (mTLS with a client
//! CA), serve HTTP/1.1 and HTTP/2 (cleartext prior knowledge, or ALPN over TLS) with
//! hyper-util, and drain gracefully on shutdown. Each connection's peer (address, verified
//! client certificate) is read once and handed to every request on it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Limits;
use crate::tls::ClientCert;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Set when the connection is TLS with a verified client certificate.
    pub client_cert: Option<ClientCert>,
}

impl Peer {
    pub fn loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }
}

/// The connection builder for the data listener, with the configured header limits. hyper's
/// own limits sit above ours so byokd, not hyper, answers an oversize request, in the
/// provider's error shape.
pub fn data_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size((limits.max_header_bytes * 2).max(16 * 1024))
        .max_headers(limits.max_headers * 2 + 16);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes * 2).unwrap_or(u32::MAX));
    b
}

/// The admin listener's builder: small requests only, and no slow-loris on the probe port.
pub fn admin_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    b.http2().timer(TokioTimer::new());
    b
}

/// Serves `listener` until `shutdown` flips to true, then stops accepting and waits up to
/// `drain` for in-flight requests and streams to finish.
pub async fn serve<F, Fut, B>(
    listener: TcpListener,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<(tokio_rustls::TlsAcceptor, Duration)>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) where
    F: Fn(Request<Incoming>, Arc<Peer>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    // Connection tasks live here so the ones still open after the drain can be cut.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, addr) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let h = handler.clone();
                let svc = move |peer: Arc<Peer>| service_fn(move |req| {
                    let fut = h(req, peer.clone());
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                match &tls {
                    None => {
                        let peer = Arc::new(Peer { addr, client_cert: None });
                        let conn = builder.serve_connection(TokioIo::new(stream), svc(peer)).into_owned();
                        let conn = graceful.watch(conn);
                        conns.spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Some((acceptor, handshake_timeout)) => {
                        // The handshake runs in the connection's task, so a slow or hostile
                        // client never holds up the accept loop. Connections still in their
                        // handshake at shutdown are simply dropped with the task set.
                        let (acceptor, timeout) = (acceptor.clone(), *handshake_timeout);
                        let builder = builder.clone();
                        let watcher = graceful.watcher();
                        conns.spawn(async move {
                            let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::info!(peer = %addr, error = %e, "TLS handshake refused");
                                    return;
                                }
                                Err(_) => {
                                    tracing::info!(peer = %addr, "TLS handshake timed out");
                                    return;
                                }
                            };
                            let client_cert = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(crate::tls::client_cert);
                            let peer = Arc::new(Peer { addr, client_cert });
                            let conn = builder.serve_connection(TokioIo::new(tls), svc(peer)).into_owned();
                            if let Err(e) = watcher.watch(conn).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open,
            ?drain,
            "drain timeout reached; closing remaining connections"
        );
    }
    conns.shutdown().await;
}
