//! The end-to-end bench's paced client and paced streaming upstream (wrk has no fixed rate).
//!
//!   pace load URL --rate 500 --duration 5s [--header 'k: v']... [--body JSON] [--ttfb]
//!       Open loop: request i is due at start + i/rate whatever came before, and its latency
//!       counts from when it was due, so a stalled proxy cannot hide its stall (no coordinated
//!       omission). Keep-alive connections are reused and opened as needed. Prints one line:
//!       `count= errors= p50_us= p99_us= p999_us= frames=` (`frames`: body frames per
//!       response; `--ttfb` times the first body byte instead of the whole response).
//!   pace upstream PORT [--events 20] [--gap-ms 10]
//!       An OpenAI-style SSE upstream: the first chunk at once, then one every gap, the last
//!       with usage, then `[DONE]`. Paced events show whether a proxy merges stream chunks.
//!
//! Built by `cargo build --release --example pace`; `benches/e2e/load.sh` runs it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

struct Load {
    addr: String,
    authority: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    ttfb: bool,
    idle: Mutex<Vec<Conn>>,
}

/// One sample: microseconds from due time to done, and the body frames seen.
type Sample = Result<(u64, u64), String>;

impl Load {
    async fn conn(&self) -> Result<Conn, String> {
        if let Some(c) = self.idle.lock().await.pop() {
            return Ok(c);
        }
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(send)
    }

    async fn one(self: Arc<Self>, due: Instant) -> Sample {
        let mut c = self.conn().await?;
        c.ready().await.map_err(|e| e.to_string())?;
        let mut req = http::Request::post(&self.path).header("host", &self.authority);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(self.body.clone()))
            .map_err(|e| e.to_string())?;
        let resp = c.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut frames = 0;
        let mut first = None;
        while let Some(f) = body.frame().await {
            let f = f.map_err(|e| e.to_string())?;
            if f.data_ref().is_some_and(|d| !d.is_empty()) {
                frames += 1;
                first.get_or_insert_with(|| due.elapsed());
            }
        }
        let took = match (self.ttfb, first) {
            (true, Some(t)) => t,
            _ => due.elapsed(),
        };
        self.idle.lock().await.push(c);
        Ok((took.as_micros() as u64, frames))
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: pace load URL --rate N --duration 5s [--header 'k: v']... [--body S] [--ttfb]\n       pace upstream PORT [--events N] [--gap-ms MS]"
    );
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| usage()))
        .unwrap_or(default)
}

async fn load(args: &[String]) {
    let url: http::Uri = args
        .first()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| usage());
    let rate: f64 = arg(args, "--rate", 500.0);
    let duration: humantime::Duration =
        arg(args, "--duration", "5s".parse().unwrap_or_else(|_| usage()));
    let authority = url
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| usage());
    let headers = args
        .windows(2)
        .filter(|w| w[0] == "--header")
        .filter_map(|w| w[1].split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let load = Arc::new(Load {
        addr: authority.clone(),
        authority,
        path: url
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or("/".into()),
        headers,
        body: Bytes::from(arg(args, "--body", String::new())),
        ttfb: args.iter().any(|a| a == "--ttfb"),
        idle: Mutex::new(Vec::new()),
    });
    let total = (rate * duration.as_secs_f64()) as u64;
    let start = Instant::now() + Duration::from_millis(10);
    // tokio's timer ticks in whole milliseconds, which would add up to 1 ms to every sample;
    // a plain thread sleeping with nanosleep hands each request to the runtime on time
    // (within the kernel's ~50 µs timer slack, the same for every path measured).
    let rt = tokio::runtime::Handle::current();
    let ticker = std::thread::spawn(move || {
        (0..total)
            .map(|i| {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                rt.spawn(load.clone().one(due))
            })
            .collect::<Vec<_>>()
    });
    let tasks = tokio::task::spawn_blocking(move || ticker.join())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_else(|| panic!("pace: the ticker thread failed"));
    let (mut lat, mut frames, mut errors, mut first_error) = (Vec::new(), 0, 0, None);
    for t in tasks {
        match t.await {
            Ok(Ok((us, f))) => {
                lat.push(us);
                frames += f;
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("pace: {errors} errors, first: {e}");
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "count={} errors={errors} p50_us={} p99_us={} p999_us={} frames={:.2}",
        lat.len(),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        frames as f64 / lat.len().max(1) as f64
    );
}

/// The SSE body of one paced chat completion.
fn events(
    n: usize,
    gap: Duration,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let stream = futures_util::stream::unfold(0, move |i| async move {
        if i > n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(gap).await;
        }
        let text = if i == n {
            "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":20,\"total_tokens\":31}}\n\ndata: [DONE]\n\n".to_string()
        } else {
            format!(
                "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i} \"}}}}]}}\n\n"
            )
        };
        Some((Ok(Frame::data(Bytes::from(text))), i + 1))
    });
    StreamBody::new(stream)
}

async fn upstream(args: &[String]) {
    let port: u16 = args
        .first()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| usage());
    let n: usize = arg(args, "--events", 20);
    let gap = Duration::from_millis(arg(args, "--gap-ms", 10));
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("pace upstream: cannot listen on {port}: {e}"));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    // Read the request body before answering, as a provider does.
                    let _ = req.into_body().collect().await;
                    http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(events(n, gap))
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("pace: no runtime: {e}"));
    match args.first().map(String::as_str) {
        Some("load") => rt.block_on(load(&args[1..])),
        Some("upstream") => rt.block_on(upstream(&args[1..])),
        _ => usage(),
    }
}
