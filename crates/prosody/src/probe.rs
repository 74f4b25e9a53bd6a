//! The health probe server: `/readyz` and `/livez` over plain HTTP/1.1.
//!
//! `/readyz` answers 200 once the consumer owns partitions (503 before), so a
//! rolling deploy waits for the group to settle; `/livez` answers 503 while a
//! partition is stalled, so an orchestrator restarts a wedged process;
//! `/metrics` serves the client's Prometheus metrics (OpenMetrics text).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Format;

/// What the probes report.
pub(crate) trait Health: Send + Sync + 'static {
    fn ready(&self) -> bool;
    fn live(&self) -> bool;
    /// The page for `/metrics`.
    fn metrics(&self, format: Format) -> String;
}

/// A running probe server; stops when dropped.
pub(crate) struct ProbeServer {
    address: SocketAddr,
    stop: CancellationToken,
    /// Disconnects once the server task has closed its listener.
    closed: std::sync::mpsc::Receiver<()>,
}

impl ProbeServer {
    /// Binds `0.0.0.0:port` (port 0 picks a free port). A port that cannot be
    /// bound is logged and the consumer runs without probes.
    pub(crate) fn start(port: u16, health: Arc<dyn Health>, runtime: &Handle) -> Option<Self> {
        let (address, listener) = match bind(port, runtime) {
            Ok(bound) => bound,
            Err(error) => {
                warn!(
                    port,
                    "cannot start the probe server; continuing without it: {error}"
                );
                return None;
            }
        };
        let stop = CancellationToken::new();
        let (closing, closed) = std::sync::mpsc::channel();
        let token = stop.clone();
        runtime.spawn(async move {
            serve(listener, health, token).await;
            drop(closing);
        });
        info!(%address, "probe server listening (/readyz, /livez)");
        Some(Self {
            address,
            stop,
            closed,
        })
    }

    /// Stops the server and waits (briefly, blocking) until its port is closed,
    /// so nothing answers probes after `unsubscribe` returns.
    pub(crate) fn shut_down(self) {
        self.stop.cancel();
        let _ = self.closed.recv_timeout(Duration::from_secs(1));
    }

    /// Where the server listens.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for ProbeServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `0.0.0.0:port` as a tokio listener on `runtime`.
fn bind(port: u16, runtime: &Handle) -> std::io::Result<(SocketAddr, TcpListener)> {
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;
    let _entered = runtime.enter();
    Ok((address, TcpListener::from_std(listener)?))
}

async fn serve(listener: TcpListener, health: Arc<dyn Health>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let health = Arc::clone(&health);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, health.as_ref()).await {
                        debug!("probe request failed: {error}");
                    }
                });
            }
            Err(error) => {
                warn!("probe server cannot accept: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, health: &dyn Health) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(256);
    let mut buffer = [0_u8; 512];
    // Only the request line matters; stop at the end of the headers or at 8 KiB.
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        while !request.windows(4).any(|window| window == b"\r\n\r\n") && request.len() < 8_192 {
            let count = stream.read(&mut buffer).await?;
            if count == 0 {
                break;
            }
            request.extend_from_slice(&buffer[..count]);
        }
        Ok::<_, std::io::Error>(())
    });
    read.await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    const PLAIN: &str = "text/plain";
    let format = Format::for_accept(&accept_header(&line));
    let metrics;
    let (status, content_type, body) = match (method, path.split('?').next().unwrap_or_default()) {
        ("GET" | "HEAD", "/readyz") if health.ready() => ("200 OK", PLAIN, "ready\n"),
        ("GET" | "HEAD", "/readyz") => {
            ("503 Service Unavailable", PLAIN, "no partitions assigned\n")
        }
        ("GET" | "HEAD", "/livez") if health.live() => ("200 OK", PLAIN, "live\n"),
        ("GET" | "HEAD", "/livez") => ("503 Service Unavailable", PLAIN, "stalled\n"),
        ("GET" | "HEAD", "/metrics") => {
            metrics = health.metrics(format);
            ("200 OK", format.content_type(), metrics.as_str())
        }
        _ => ("404 Not Found", PLAIN, "try /readyz, /livez or /metrics\n"),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if method == "HEAD" { "" } else { body }
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The value of the request's `Accept` header (empty when absent).
fn accept_header(request: &str) -> String {
    request
        .lines()
        .skip(1)
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("accept")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default()
}
