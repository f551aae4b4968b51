//! The HTTP side of `serve`: hyper's HTTP/1 server on a single-threaded
//! tokio runtime, set up like a production exporter. Every limit is here:
//!
//! - request heads must arrive within [`HEADER_READ_TIMEOUT`] (this also
//!   closes keep-alive connections idle that long) and fit in
//!   [`MAX_HEAD_BYTES`] (431 otherwise);
//! - a write that makes no progress for [`WRITE_TIMEOUT`] closes the
//!   connection (a client that pipelines requests and reads nothing);
//! - at most [`MAX_CONNECTIONS`] connections: one more closes the one that
//!   matters least (see `conns`), as does accept() running out of file
//!   descriptors; accept errors are survived with a back-off and one warning;
//! - at most [`MAX_REQUESTS_PER_CONNECTION`] requests per connection;
//! - GET and HEAD only (405 otherwise), `/metrics` and `/healthz` only (404 otherwise).
//!
//! Scrapes are encoded on tokio's blocking pool, so a slow one never stalls
//! accepting or the other connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

use super::conns::{Activity, Conns};
use super::web_config::{BasicAuth, WebConfig};
use crate::output::warn;

/// Time a client has to send a whole request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a write may make no progress.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a read in the middle of a request may make no progress.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (hyper's read buffer; its minimum is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers in a request.
pub const MAX_HEADERS: usize = 64;
/// Most open connections.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests on one keep-alive connection before it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
/// Longest wait for the bcrypt check of new credentials.
const VERIFY_WAIT: Duration = Duration::from_secs(5);
/// Queue of connections the kernel completes before they are accepted.
const BACKLOG: u32 = 1024;

/// First and longest pause after an accept() error.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(500));
/// Accept errors are warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(600);

/// Renders the metrics page (run on the blocking pool).
pub type Scrape = Arc<dyn Fn() -> anyhow::Result<String> + Send + Sync>;

/// `/healthz`: Ok(body) for 200, Err(body) for 503.
pub type Health = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Binds `addr` with a deep backlog; a one-line error naming the address.
/// Call it inside the runtime (`Runtime::enter`).
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(BACKLOG)
    };
    bind().map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr}: {e}; choose another --listen address")
    })
}

/// What a request is answered with.
struct Site {
    scrape: Scrape,
    health: Health,
    auth: Option<Arc<BasicAuth>>,
    /// One bcrypt verification at a time, so a flood of new passwords
    /// cannot take the blocking pool scrapes need: one that waits longer
    /// than [`VERIFY_WAIT`] gets 429.
    verifying: tokio::sync::Semaphore,
}

/// Whether `req` may be answered: no users configured, credentials that
/// verified before, or a bcrypt verification now.
async fn authorized(site: &Site, req: &Request<Incoming>) -> Result<(), Response<Full<Bytes>>> {
    let Some(auth) = &site.auth else {
        return Ok(());
    };
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    let ok = match auth.remembered(header.as_deref()) {
        Some(ok) => ok,
        None => {
            let Ok(Ok(_permit)) = tokio::time::timeout(VERIFY_WAIT, site.verifying.acquire()).await
            else {
                return Err(text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "kvm-watcher: busy checking passwords\n",
                ));
            };
            let auth = Arc::clone(auth);
            tokio::task::spawn_blocking(move || auth.verify(header.as_deref()))
                .await
                .unwrap_or(false)
        }
    };
    if ok {
        return Ok(());
    }
    let mut r = text(StatusCode::UNAUTHORIZED, "kvm-watcher: unauthorized\n");
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"kvm-watcher\""),
    );
    Err(r)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn answer(site: &Site, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Err(refused) = authorized(site, req).await {
        return refused;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "kvm-watcher: only GET and HEAD\n",
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if req.uri().path() == "/healthz" {
        let (status, body) = match (site.health)() {
            Ok(body) => (StatusCode::OK, body),
            Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        return r;
    }
    if req.uri().path() != "/metrics" {
        return text(
            StatusCode::NOT_FOUND,
            "kvm-watcher: metrics are at /metrics\n",
        );
    }
    let scrape = Arc::clone(&site.scrape);
    match tokio::task::spawn_blocking(move || scrape()).await {
        Ok(Ok(body)) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        Ok(Err(e)) => {
            warn(&format!("cannot encode metrics: {e:#}"));
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "kvm-watcher: cannot encode metrics\n",
            )
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "kvm-watcher: scrape failed\n",
        ),
    }
}

async fn handle(
    site: Arc<Site>,
    activity: Arc<Activity>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = activity.request();
    let mut r = answer(&site, &req).await;
    if n >= MAX_REQUESTS_PER_CONNECTION {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(r)
}

/// Removes a connection from the table however its task ends.
struct Leave(Arc<Conns>, u64);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.remove(self.1);
    }
}

/// Serves HTTP/1 on `io` until the connection ends.
async fn serve_io<I>(io: I, site: Arc<Site>, activity: Arc<Activity>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        handle(Arc::clone(&site), Arc::clone(&activity), req)
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .await;
}

fn spawn_connection(
    stream: TcpStream,
    site: &Arc<Site>,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    conns: &Arc<Conns>,
) {
    let _ = stream.set_nodelay(true);
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(Some(WRITE_TIMEOUT));
    io.set_read_timeout(Some(READ_TIMEOUT));
    let (id, activity) = conns.reserve();
    let leave = Leave(Arc::clone(conns), id);
    let site = Arc::clone(site);
    let a = Arc::clone(&activity);
    let tls = tls.cloned();
    let task = tokio::spawn(async move {
        let _leave = leave;
        let io = Box::pin(io);
        match tls {
            None => serve_io(io, site, a).await,
            // The handshake gets the time a request head gets.
            Some(tls) => {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(io)).await
                {
                    serve_io(stream, site, a).await;
                }
            }
        }
    });
    // On this single-threaded runtime the task cannot run (and leave the
    // table) before it is admitted.
    conns.admit(id, activity, Box::new(task.abort_handle()));
}

/// True for accept() errors that concern one connection only.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(libc::EPROTO)
}

/// Resolves when `stop` is set or `deadline` passes.
async fn ended(stop: &AtomicBool, deadline: Option<Instant>) {
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serves `scrape` at /metrics on `listener` (with the TLS and basic
/// authentication of `web`) until `stop` or `deadline`.
pub async fn serve(
    listener: TcpListener,
    scrape: Scrape,
    health: Health,
    web: WebConfig,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let site = Arc::new(Site {
        scrape,
        health,
        auth: web.auth.map(Arc::new),
        verifying: tokio::sync::Semaphore::new(1),
    });
    let tls = web.tls.map(tokio_rustls::TlsAcceptor::from);
    let conns = Arc::new(Conns::new());
    let mut backoff = BACKOFF.0;
    let mut failures = 0u64;
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ended(&stop, deadline) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = BACKOFF.0;
                if conns.len() >= MAX_CONNECTIONS {
                    conns.evict_one();
                }
                spawn_connection(stream, &site, tls.as_ref(), &conns);
                // Let the new connection read its request first: a scrape
                // then counts as active before the next accept can evict.
                tokio::task::yield_now().await;
            }
            Err(e) if connection_error(&e) => {}
            Err(e) => {
                // Out of file descriptors (or memory): make room, wait, retry.
                failures += 1;
                if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn(&format!(
                        "cannot accept HTTP connections ({e}; {failures} times so far): closing the least active of {} connections and retrying; raise LimitNOFILE if this goes on",
                        conns.len()
                    ));
                    last_warning = Some(Instant::now());
                }
                if conns.evict_one() {
                    // Its file is closed once its task is dropped: let that
                    // happen, then accept again at once.
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }
    Ok(())
}
