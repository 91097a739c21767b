//! The floor under byokd's cost (benches/e2e/instructions.sh): the least a proxy on byokd's
//! own stack (hyper 1 on tokio's multi-threaded runtime) can do per request. It replaces
//! `Authorization`, drops `x-tenant-id` and sends the request on one upstream HTTP/1
//! connection per client connection; no identity, key, policy, metering or pool.
//!
//!     floor LISTEN_PORT UPSTREAM_PORT

use std::error::Error;
use std::sync::Arc;

use http::HeaderValue;
use http::header::AUTHORIZATION;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        return Err("usage: floor LISTEN_PORT UPSTREAM_PORT".into());
    };
    let upstream = format!("127.0.0.1:{upstream}");
    let listener = TcpListener::bind(format!("127.0.0.1:{listen}")).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let upstream = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, &upstream).await {
                eprintln!("floor: {e}");
            }
        });
    }
}

async fn serve(client: TcpStream, upstream: &str) -> Result<(), BoxError> {
    client.set_nodelay(true)?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    let sender = Arc::new(Mutex::new(sender));
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let h = req.headers_mut();
            h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer sk-bench"));
            h.remove("x-tenant-id");
            let mut s = sender.lock().await;
            s.ready().await?;
            let resp: Response<Incoming> = s.send_request(req).await?;
            Ok::<_, hyper::Error>(resp)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(client), svc)
        .await?;
    Ok(())
}
