//! A TCP fault proxy for tests: listens on 127.0.0.1:0, forwards every connection to one
//! target, and injects the faults a network can: added latency, a bandwidth limit, resets,
//! half-open connections, a peer that hangs, and refused connections. The mode switches at
//! run time and applies to the connections already open as well as to new ones.
//!
//! ```text
//! client ──► FaultProxy (127.0.0.1:P) ──► target        Dir::Up:   client → target
//!                                                       Dir::Down: target → client
//! ```
//!
//! Each accepted connection gets its own target connection and two pumps, one per
//! direction, that read a chunk, wait as the mode says, and write it on. `tc netem` would do
//! this below the sockets; here it is a small proxy any test can start on a free port.
//! `tests/faults.rs` checks each mode against an echo server
//! (`the_fault_proxy_does_what_each_mode_says`) and uses it on byokd's links.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to target (requests).
    Up,
    /// Target to client (responses).
    Down,
}

/// What the proxy does with the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Wait this long before forwarding each chunk read, in both directions.
    Latency(Duration),
    /// At most this many bytes a second per direction and connection, in slices of about
    /// 50 ms each, so a large chunk is spread out (and split at arbitrary bytes) rather than
    /// delayed and sent in one burst.
    Bandwidth(u64),
    /// Stop forwarding in one direction, keep both sockets open: the peer waiting on that
    /// direction sees neither data nor a close (a stalled stream, a lost reply).
    HalfOpen(Dir),
    /// Accept, connect, and never forward anything either way: a peer that hangs. Existing
    /// connections stop forwarding too.
    Blackhole,
    /// New connections are refused (nothing listens on the port: `ECONNREFUSED`); existing
    /// ones keep their current state. Leaving this mode listens on the same port again.
    Refuse,
}

impl Mode {
    /// Does this mode hold the bytes of `dir`?
    fn blocks(self, dir: Dir) -> bool {
        match self {
            Mode::HalfOpen(d) => d == dir,
            Mode::Blackhole => true,
            _ => false,
        }
    }
}

/// Counters a test can read, e.g. to see that a connection was made.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub reset: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// The proxy; stops (and resets everything it holds) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    pub target: SocketAddr,
    pub stats: Arc<Stats>,
    mode: watch::Sender<Mode>,
    /// Bumped by [`FaultProxy::reset`]: every connection open at that moment is reset.
    resets: watch::Sender<u64>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::Pass`] on 127.0.0.1:0 in front of `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::Pass);
        let (resets, _) = watch::channel(0u64);
        let stats = Arc::new(Stats::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            addr,
            target,
            mode.clone(),
            resets.clone(),
            stats.clone(),
        ));
        FaultProxy {
            addr,
            target,
            stats,
            mode,
            resets,
            accept,
        }
    }

    /// `http://127.0.0.1:P`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Resets every connection open now, on both sides (RST, `SO_LINGER` 0): the client and
    /// the target each see "connection reset by peer". New connections follow the mode.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    resets: watch::Sender<u64>,
    stats: Arc<Stats>,
) {
    let mut modes = mode.subscribe();
    let mut listener = Some(listener);
    loop {
        let Some(l) = &listener else {
            // Refusing: nothing listens until the mode changes, then the same port again
            // (SO_REUSEADDR, so the closed connections' TIME_WAIT does not stand in the way).
            if modes.changed().await.is_err() {
                return;
            }
            if *modes.borrow_and_update() != Mode::Refuse {
                listener = Some(rebind(addr).await);
            }
            continue;
        };
        tokio::select! {
            r = l.accept() => {
                let Ok((client, _)) = r else { continue };
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(
                    client,
                    target,
                    mode.subscribe(),
                    resets.subscribe(),
                    stats.clone(),
                ));
            }
            r = modes.changed() => {
                if r.is_err() {
                    return;
                }
                if *modes.borrow_and_update() == Mode::Refuse {
                    listener = None;
                }
            }
        }
    }
}

async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..100 {
        let s = TcpSocket::new_v4().unwrap();
        s.set_reuseaddr(true).unwrap();
        if s.bind(addr).is_ok()
            && let Ok(l) = s.listen(1024)
        {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("fault proxy: cannot listen on {addr} again");
}

/// One proxied connection: two pumps until both directions closed, or a reset.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mode: watch::Receiver<Mode>,
    mut resets: watch::Receiver<u64>,
    stats: Arc<Stats>,
) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        // The target refuses: pass that on as a reset.
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let reset = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = pump(cr, uw, Dir::Up, mode.clone(), &stats.bytes_up);
        let down = pump(ur, cw, Dir::Down, mode, &stats.bytes_down);
        tokio::select! {
            // An error on either side (a reset by one peer) resets the other one too.
            r = async { tokio::try_join!(up, down) } => r.is_err(),
            _ = resets.changed() => true,
        }
    };
    if reset {
        stats.reset.fetch_add(1, Ordering::Relaxed);
        // SO_LINGER 0: closing sends RST instead of FIN.
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Copies `from` to `to` chunk by chunk as the mode says; on EOF, half-closes `to`.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    dir: Dir,
    mut mode: watch::Receiver<Mode>,
    count: &AtomicU64,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A blocked direction does not even read, so the peer's data waits in the kernel
        // buffers and its writes eventually stall, as behind a dead link.
        wait_unblocked(&mut mode, dir).await;
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            // The mode may have changed while the chunk was read: hold it if blocked now.
            wait_unblocked(&mut mode, dir).await;
            let m = *mode.borrow();
            let take = match m {
                Mode::Latency(d) => {
                    tokio::time::sleep(d).await;
                    chunk.len()
                }
                Mode::Bandwidth(bps) => {
                    let slice = (bps / 20).max(1) as usize;
                    let take = chunk.len().min(slice);
                    tokio::time::sleep(Duration::from_secs_f64(take as f64 / bps.max(1) as f64))
                        .await;
                    take
                }
                _ => chunk.len(),
            };
            to.write_all(&chunk[..take]).await?;
            count.fetch_add(take as u64, Ordering::Relaxed);
            chunk = &chunk[take..];
        }
    }
}

async fn wait_unblocked(mode: &mut watch::Receiver<Mode>, dir: Dir) {
    while mode.borrow_and_update().blocks(dir) {
        if mode.changed().await.is_err() {
            // The proxy is gone: stay blocked until the connection is dropped.
            std::future::pending::<()>().await;
        }
    }
}
