//! The HTTP side of `serve`: hyper's HTTP/1 server on a single-threaded
//! tokio runtime, set up like a production exporter. Every limit is here:
//!
//! - request heads must arrive within [`HEADER_READ_TIMEOUT`] (this also
//!   closes keep-alive connections idle that long) and fit in
//!   [`MAX_HEAD_BYTES`] (431 otherwise; after an error answer what the
//!   client still sends is read and dropped for up to [`LINGER`], so the
//!   answer is not lost to a reset, over TLS too);
//! - a write that makes no progress for [`WRITE_TIMEOUT`] closes the
//!   connection (a client that pipelines requests and reads nothing);
//! - at most [`MAX_CONNECTIONS`] connections, fewer when the limit on open
//!   files leaves less room: [`RESERVE`] descriptors stay free for reading
//!   the kernel's figures. One more closes the one that matters least (see
//!   `conns`), or is refused when every other is answering a request; the
//!   same when a new connection's descriptor falls in the reserve (what
//!   else is open grew) or accept() runs out of file descriptors; accept
//!   errors are survived with a back-off and one warning;
//! - at most [`MAX_REQUESTS_PER_CONNECTION`] requests per connection;
//! - GET and HEAD only (405 otherwise), `/metrics` and `/healthz` only (404 otherwise);
//! - `/metrics` in the format the `Accept` header asks for (`format`).
//!
//! Pages are encoded on tokio's blocking pool, so a slow one never stalls
//! accepting or the other connections, and shared (`page`): concurrent
//! scrapes cost one encoding.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    ACCEPT, ALLOW, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, VARY,
    WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

use super::conns::{Activity, Conns};
use super::format::Format;
use super::page::Pages;
use super::throttle::Throttle;
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
/// Open connections allowed however low the limit on open files.
pub const MIN_CONNECTIONS: usize = 4;
/// File descriptors kept free for the refresh (task iterators, /proc).
pub const RESERVE: u64 = 8;
/// Requests on one keep-alive connection before it is closed.
pub const MAX_REQUESTS_PER_CONNECTION: u64 = 1000;
/// Longest time spent reading what a client still sends after an error
/// answer, and most bytes read then.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;
/// Longest wait for the bcrypt check of new credentials.
const VERIFY_WAIT: Duration = Duration::from_secs(5);
/// Queue of connections the kernel completes before they are accepted.
const BACKLOG: u32 = 1024;

/// First and longest pause after an accept() error.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(500));
/// Accept errors are warned about at most this often.
const WARN_EVERY: Duration = Duration::from_secs(600);

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
    pages: Arc<Pages>,
    health: Health,
    auth: Option<Arc<BasicAuth>>,
    /// One bcrypt verification at a time, so a flood of new passwords
    /// cannot take the blocking pool scrapes need: one that waits longer
    /// than [`VERIFY_WAIT`] gets 429.
    verifying: tokio::sync::Semaphore,
    /// Back-off for clients whose passwords fail.
    throttle: Arc<Throttle>,
}

/// Whether `req` from `peer` may be answered: no users configured,
/// credentials that verified before, or a bcrypt verification now (when
/// `peer` is not being slowed down for wrong passwords: 429 then).
async fn authorized(
    site: &Site,
    peer: IpAddr,
    req: &Request<Incoming>,
) -> Result<(), Response<Full<Bytes>>> {
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
            let ticket = match site.throttle.admit(peer, Instant::now()) {
                Ok(ticket) => ticket,
                Err(wait) => {
                    let mut r = text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "kvm-watcher: too many wrong passwords; wait\n",
                    );
                    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
                    return Err(r);
                }
            };
            let Ok(Ok(_permit)) = tokio::time::timeout(VERIFY_WAIT, site.verifying.acquire()).await
            else {
                return Err(text(
                    StatusCode::TOO_MANY_REQUESTS,
                    "kvm-watcher: busy checking passwords\n",
                ));
            };
            let auth = Arc::clone(auth);
            let ok = tokio::task::spawn_blocking(move || auth.verify(header.as_deref()))
                .await
                .unwrap_or(false);
            ticket.done(ok, Instant::now());
            ok
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

async fn answer(site: &Site, peer: IpAddr, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    // /healthz says only whether the monitors are attached: it answers
    // without credentials, as a kubelet's probe sends none.
    let probe = req.uri().path() == "/healthz"
        && (req.method() == Method::GET || req.method() == Method::HEAD);
    if !probe && let Err(refused) = authorized(site, peer, req).await {
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
        // It reads the collector's state, which a refresh may hold: off the
        // thread that serves every connection.
        let health = Arc::clone(&site.health);
        let (status, body) = match tokio::task::spawn_blocking(move || health()).await {
            Ok(Ok(body)) => (StatusCode::OK, body),
            Ok(Err(body)) => (StatusCode::SERVICE_UNAVAILABLE, body),
            Err(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "kvm-watcher: health check failed\n".to_string(),
            ),
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
    let format = Format::negotiate(req.headers().get(ACCEPT).map(HeaderValue::as_bytes));
    match site.pages.get(format).await {
        Ok(body) => {
            let mut r = Response::new(Full::new(body));
            let headers = r.headers_mut();
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            headers.insert(VARY, HeaderValue::from_static("Accept"));
            r
        }
        Err(e) => {
            warn(&format!("cannot encode metrics: {e:#}"));
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "kvm-watcher: cannot encode metrics\n",
            )
        }
    }
}

async fn handle(
    site: Arc<Site>,
    activity: Arc<Activity>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (n, _busy) = activity.request();
    let mut r = answer(&site, peer, &req).await;
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
async fn serve_io<I>(mut io: I, site: Arc<Site>, activity: Arc<Activity>, peer: IpAddr)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        handle(Arc::clone(&site), Arc::clone(&activity), peer, req)
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .serve_connection(TokioIo::new(&mut io), service)
        .await;
    // Only after an error answer to a request (not an idle timeout).
    if served.is_err_and(|e| e.is_parse() || e.is_parse_too_large()) {
        linger(&mut io).await;
    }
}

/// After an error answer (431 for a head too large, 400), reads and drops
/// what the client still sends, for at most [`LINGER`] and
/// [`LINGER_BYTES`], before closing: closing with its request unread would
/// reset the connection and lose the answer, over TLS especially.
async fn linger<I>(io: &mut I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use std::future::poll_fn;
    use std::pin::Pin;
    use tokio::io::ReadBuf;
    let _ = tokio::time::timeout(LINGER, async {
        let _ = poll_fn(|cx| Pin::new(&mut *io).poll_shutdown(cx)).await;
        let mut buf = [0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            let mut rb = ReadBuf::new(&mut buf);
            match poll_fn(|cx| Pin::new(&mut *io).poll_read(cx, &mut rb)).await {
                Ok(()) if !rb.filled().is_empty() => {
                    left = left.saturating_sub(rb.filled().len());
                }
                _ => break,
            }
        }
    })
    .await;
}

fn spawn_connection(
    stream: TcpStream,
    peer: std::net::IpAddr,
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
            None => serve_io(io, site, a, peer).await,
            // The handshake gets the time a request head gets.
            Some(tls) => {
                if let Ok(Ok(stream)) =
                    tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(io)).await
                {
                    serve_io(stream, site, a, peer).await;
                }
            }
        }
    });
    // On this single-threaded runtime the task cannot run (and leave the
    // table) before it is admitted.
    conns.admit(id, peer, activity, Box::new(task.abort_handle()));
}

/// The limit on open files and how many are open.
struct Files {
    limit: u64,
    open: u64,
}

impl Files {
    /// Connections that fit beside what is open and the reserve.
    fn connections(&self) -> usize {
        let room = self.limit.saturating_sub(self.open + RESERVE);
        (room as usize).clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
    }
}

fn open_files() -> Files {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills a local struct.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        u64::MAX
    };
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Files { limit, open }
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

/// Serves `pages` at /metrics on `listener` (with the TLS and basic
/// authentication of `web`) until `stop` or `deadline`.
pub async fn serve(
    listener: TcpListener,
    pages: Arc<Pages>,
    health: Health,
    web: WebConfig,
    stop: Arc<AtomicBool>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let site = Arc::new(Site {
        pages,
        health,
        auth: web.auth.map(Arc::new),
        verifying: tokio::sync::Semaphore::new(1),
        throttle: Arc::new(Throttle::default()),
    });
    let tls = web.tls.map(tokio_rustls::TlsAcceptor::from);
    let conns = Arc::new(Conns::new());
    let mut backoff = BACKOFF.0;
    let mut failures = 0u64;
    let mut last_warning: Option<Instant> = None;
    let files = open_files();
    let cap = files.connections();
    if cap < MAX_CONNECTIONS {
        warn(&format!(
            "the limit of {} open files ({} in use) leaves room for {cap} HTTP connections, not {MAX_CONNECTIONS}, with {RESERVE} kept for reading the kernel's figures; raise LimitNOFILE to {}",
            files.limit,
            files.open,
            files.open + RESERVE + MAX_CONNECTIONS as u64
        ));
        last_warning = Some(Instant::now());
    }
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ended(&stop, deadline) => break,
        };
        match accepted {
            Ok((stream, addr)) => {
                backoff = BACKOFF.0;
                let peer = addr.ip().to_canonical();
                let full = conns.len() >= cap;
                // Descriptors are handed out lowest first: one this high
                // means fewer than RESERVE are left.
                let short = stream.as_raw_fd() as u64 >= files.limit.saturating_sub(RESERVE)
                    && conns.len() >= MIN_CONNECTIONS;
                if short && last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn(&format!(
                        "cannot accept HTTP connections beyond {} (file descriptors are running out): closing the least active one; raise LimitNOFILE if this goes on",
                        conns.len()
                    ));
                    last_warning = Some(Instant::now());
                }
                if (full || short) && !conns.evict_one(Some(peer)) {
                    // Every other connection is answering a request.
                    drop(stream);
                    continue;
                }
                spawn_connection(stream, peer, &site, tls.as_ref(), &conns);
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
                if conns.evict_one(None) {
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
