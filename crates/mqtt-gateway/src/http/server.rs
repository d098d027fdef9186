//! The HTTP server under the routes: accepts TCP connections, serves HTTP/1.1 and HTTP/2 (prior
//! knowledge) on each with hyper, and keeps slow, idle or hostile clients from holding the
//! gateway's file descriptors and memory.
//!
//! What it enforces, per connection (see SECURITY.md for the defaults and what each protects):
//! - **Connections**: at most `--http-max-connections` at once, fewer than the process may open
//!   files, so the broker connection always finds a descriptor. Past the cap a connection gets a
//!   short 503 and is closed; one log line says the cap was reached.
//! - **Request head** (HTTP/1.1): from the first byte of a request head, or from accepting the
//!   connection, to the complete head: `--http-header-timeout-ms`, else the connection is closed.
//!   Its size is capped (`--http-max-header-bytes`; hyper answers 431 past it).
//! - **Idle**: a connection with no request in progress for `--http-idle-timeout-ms` is closed
//!   (HTTP/2: GOAWAY).
//! - **Writing responses**: every response must make progress (a piece of it handed to the
//!   connection), and every blocked write must go through, within `--http-write-timeout-ms`; a
//!   client that stops reading (a full TCP window, an HTTP/2 flow-control window of zero) loses
//!   its connection, and the memory its responses held is freed. HTTP/2 responses are handed
//!   over in frame-sized pieces, so what hyper buffers per stream stays small, the rest is held
//!   where the timeout sees it, and each stream is judged on its own (one stream that moves
//!   cannot hide others that do not).
//!
//! One watchdog task per server checks every connection once a tick (a quarter of the shortest
//! timeout) and tells a connection to close or to stop; a connection's own task never polls a
//! timer, and the hot path reads a coarse clock the watchdog refreshes instead of the system
//! clock. Request bodies are the call's business: it reads them under its own timeout and the
//! byte budget (see [`super::devices`]).
//!
//! axum's own `serve` has none of these (hyper without a timer never times out a header read,
//! and nothing bounds idle connections), which is why this file exists. hyper does the HTTP;
//! this only watches bytes, requests and time.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use futures::task::AtomicWaker;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulConnection;
use pin_project_lite::pin_project;
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// HTTP/2 DATA frames are at most 16 KiB unless the client allows more: responses are handed to
/// hyper in pieces of this size, so a stream whose window is closed holds one piece in hyper and
/// the rest in its body, where the write timeout applies.
const HTTP2_CHUNK: usize = 16 * 1024;

/// Connections past the cap that may be answered 503 at once; more than this are closed
/// without an answer, so a flood of connections cannot hold descriptors through the refusals.
const REFUSALS_AT_ONCE: usize = 16;

/// How long a refused connection may take to receive its 503.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// What the server enforces; every field has a flag (see `crate::cli::ServeArgs`).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub max_header_bytes: usize,
    pub http2_max_streams: u32,
    /// After the shutdown signal, how long connections already open stay open while idle (the
    /// listener is closed at once). A balancer that reuses an idle connection to this gateway
    /// the moment the gateway closes it gets no answer, and passes that on to its client as a
    /// closed connection; in this window its requests get an answer (503 for calls, which it
    /// may retry elsewhere), and its health checks, refused by the closed listener, take this
    /// gateway out first.
    pub shutdown_drain: Duration,
}

/// [`ServerLimits::shutdown_drain`] unless the shutdown grace is shorter: the shipped HAProxy
/// configuration takes a gateway out within 750 ms of its first refused check.
pub(crate) const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

impl ServerLimits {
    /// How often the watchdog looks at every connection: a quarter of the shortest timeout,
    /// between 20 ms and one second (one task and one timer for all connections).
    fn tick(&self) -> Duration {
        let shortest = self
            .header_timeout
            .min(self.idle_timeout)
            .min(self.write_timeout);
        (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct ServerStats {
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections refused because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed by a timeout (head, write, or a close that did not finish).
    pub timed_out: AtomicU64,
}

/// Serves `service` on `listener` until `shutdown` completes; then stops accepting, keeps the
/// connections already open for [`ServerLimits::shutdown_drain`], asks every connection to
/// close once its requests are answered, and returns when all have.
pub(crate) async fn serve<S>(
    listener: TcpListener,
    service: S,
    limits: ServerLimits,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let limits = Arc::new(limits);
    let builder = Arc::new(builder(&limits));
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let watchdog = Arc::new(Watchdog::new(limits.clone(), stats.clone()));
    let watching = tokio::spawn(watchdog.clone().run());
    let mut full = Every::new(Duration::from_secs(10));
    let mut accept_errors = Every::new(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // EMFILE and the like: something else holds the descriptors. Do not spin.
                if let Some(also) = accept_errors.now() {
                    warn!(error = %e, also, "cannot accept an HTTP connection");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            if let Some(also) = full.now() {
                warn!(
                    limit = max,
                    refused_since_last_line = also,
                    "HTTP connection limit reached: new connections get 503 until some close \
                     (--http-max-connections)"
                );
            }
            refuse(tcp, &refusals);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            debug!("cannot set TCP_NODELAY on an HTTP connection: {e}");
        }
        let builder = builder.clone();
        let watchdog = watchdog.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _slot = slot;
            serve_connection(tcp, service, &builder, &watchdog).await;
        });
    }
    drop(listener);
    // Connections stay open (and answered) for the drain, unless all of them close first.
    if let Ok(all) = tokio::time::timeout(
        limits.shutdown_drain,
        slots.clone().acquire_many_owned(max as u32),
    )
    .await
    {
        drop(all);
    }
    watchdog.stop_all();
    // Every connection gives its slot back when it ends; each ends once its requests are
    // answered (the caller bounds that with the shutdown grace) or a timeout closes it.
    let _ = slots.acquire_many(max as u32).await;
    watching.abort();
    Ok(())
}

/// hyper's settings: HTTP/1.1 and HTTP/2 on one port, the head size cap, HTTP/2 streams.
fn builder(limits: &ServerLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    // hyper's minimum; the head must fit in its read buffer, so this caps the head's size.
    builder
        .http1()
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .max_concurrent_streams(limits.http2_max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The answer to a connection past the cap: a complete HTTP/1.1 response, then close.
fn refusal_response() -> &'static [u8] {
    static RESPONSE: OnceLock<Vec<u8>> = OnceLock::new();
    RESPONSE.get_or_init(|| {
        let code = super::error::ProblemCode::Overloaded;
        let body = serde_json::json!({
            "type": format!("{}{}", super::error::PROBLEM_TYPE_PREFIX, code.as_str()),
            "title": code.title(),
            "status": code.status().as_u16(),
            "detail": "the gateway has as many HTTP connections open as it allows \
                       (--http-max-connections); retry shortly",
            "code": code,
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    })
}

/// Answers a connection past the cap with a 503 (bounded in time and in how many at once), or
/// closes it when too many refusals are already under way.
fn refuse(mut tcp: TcpStream, refusals: &Arc<Semaphore>) {
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            tcp.write_all(refusal_response()).await?;
            tcp.shutdown().await?;
            // Read what the client sent, so closing does not reset the connection before the
            // client has read the answer.
            let mut sink = [0u8; 4096];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                let n = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await?;
                if n == 0 {
                    break;
                }
                left = left.saturating_sub(n);
            }
            io::Result::Ok(())
        })
        .await;
    });
}

/// One accepted connection: hyper serves it, registered with the watchdog until it ends.
async fn serve_connection<S>(
    tcp: TcpStream,
    service: S,
    builder: &Builder<TokioExecutor>,
    watchdog: &Watchdog,
) where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let state = Arc::new(ConnState::new());
    let key = watchdog.register(&state);
    let io = TokioIo::new(Watched {
        inner: tcp,
        state: state.clone(),
    });
    let service = PerConnection {
        service,
        state: state.clone(),
    };
    let served = Guarded {
        conn: builder.serve_connection(io, service),
        state: &state,
        asked_to_close: false,
    };
    served.await;
    watchdog.unregister(key);
}

/// What the watchdog tells a connection.
const CARRY_ON: u8 = 0;
/// Close once the requests in progress are answered (HTTP/2: GOAWAY).
const CLOSE: u8 = 1;
/// Drop it now: a timeout passed.
const ABORT: u8 = 2;

pin_project! {
    /// hyper's connection future, doing what the watchdog says: polled only when the
    /// connection has work (or the watchdog a word), never for a timer of its own.
    struct Guarded<'a, C> {
        #[pin]
        conn: C,
        state: &'a ConnState,
        asked_to_close: bool,
    }
}

impl<C> Future for Guarded<'_, C>
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // Registered before the command is read, so a word from the watchdog is never missed.
        this.state.waker.register(cx.waker());
        match this.state.command.load(Ordering::Acquire) {
            ABORT => return Poll::Ready(()),
            CLOSE if !*this.asked_to_close => {
                *this.asked_to_close = true;
                this.conn.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        match ready!(this.conn.poll(cx)) {
            Ok(()) => {}
            Err(e) => debug!("HTTP connection ended: {e}"),
        }
        Poll::Ready(())
    }
}

/// Watches every connection of one server: once a tick, tells each that has been idle, or
/// whose timeout passed, to close; and refreshes the coarse clock the connections read. One
/// task and one timer for all connections, so no connection polls a timer of its own on
/// every wake-up.
struct Watchdog {
    limits: Arc<ServerLimits>,
    stats: Arc<ServerStats>,
    connections: Mutex<Slab<Arc<ConnState>>>,
    /// The server is shutting down: every connection closes once its requests are answered.
    stopping: AtomicBool,
}

impl Watchdog {
    fn new(limits: Arc<ServerLimits>, stats: Arc<ServerStats>) -> Self {
        Self {
            limits,
            stats,
            connections: Mutex::new(Slab::new()),
            stopping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Arc<ConnState>>> {
        // One slab operation or one scan per critical section: a poisoned lock is consistent.
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, state: &Arc<ConnState>) -> usize {
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        if self.stopping.load(Ordering::Acquire) {
            state.tell(CLOSE, now_ms());
        }
        self.lock().insert(state.clone())
    }

    fn unregister(&self, key: usize) {
        self.lock().try_remove(key);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Shutdown: every connection closes once its requests are answered.
    fn stop_all(&self) {
        self.stopping.store(true, Ordering::Release);
        let now = now_ms();
        for (_, state) in self.lock().iter() {
            state.tell(CLOSE, now);
        }
    }

    async fn run(self: Arc<Self>) {
        let every = self.limits.tick();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = now_ms();
            COARSE_NOW.fetch_max(now, Ordering::Relaxed);
            for (_, state) in self.lock().iter() {
                match state.check(now, &self.limits) {
                    Verdict::Fine => {}
                    Verdict::Idle => {
                        state.tell(CLOSE, now);
                    }
                    Verdict::Stuck(why) => {
                        if state.tell(ABORT, now) {
                            self.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                            debug!("closing an HTTP connection: {why}");
                        }
                    }
                }
            }
        }
    }
}

/// The most recent time a watchdog read the clock (0 before any did): what the connections use
/// for their timestamps, a load instead of a clock read per request. It lags the clock by at
/// most one tick, which is a quarter of the shortest timeout.
static COARSE_NOW: AtomicU64 = AtomicU64::new(0);

/// The coarse time (see [`COARSE_NOW`]), or the clock before any watchdog ran.
fn coarse_now_ms() -> u64 {
    match COARSE_NOW.load(Ordering::Relaxed) {
        0 => now_ms(),
        now => now,
    }
}

/// Milliseconds since the process first asked, never 0 (0 means "not set" below).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What one connection is doing, as its watchdog needs to know. Written by the I/O wrapper and
/// the request guards (HTTP/2 streams run on other tasks), read by the watchdog.
#[derive(Debug)]
struct ConnState {
    /// Requests whose response is not finished (the service's future, then its body).
    requests: AtomicUsize,
    /// When `requests` last became 0 (or the connection was accepted).
    idle_since: AtomicU64,
    /// HTTP/1: when bytes of a request head started to arrive with no request in progress
    /// (accepting counts as a start); 0 when none is being received.
    head_since: AtomicU64,
    /// When a write last returned "would block" without a write succeeding since; 0 if none.
    write_blocked_since: AtomicU64,
    /// Whether the client has sent anything yet.
    first_read_done: AtomicBool,
    /// The client opened with the HTTP/2 preface.
    http2: AtomicBool,
    /// What the watchdog said: [`CARRY_ON`], [`CLOSE`] or [`ABORT`].
    command: AtomicU8,
    /// When the watchdog said [`CLOSE`]; 0 before.
    closing_since: AtomicU64,
    /// Wakes the connection's task when the watchdog has a word for it.
    waker: AtomicWaker,
    /// When each response still being handed to hyper last made progress (was ready, or had
    /// a piece taken).
    responses: Mutex<Slab<u64>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Nothing in progress for the idle timeout: close gracefully.
    Idle,
    /// A timeout passed: drop the connection now.
    Stuck(String),
}

impl ConnState {
    fn new() -> Self {
        let now = coarse_now_ms();
        Self {
            requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(now),
            write_blocked_since: AtomicU64::new(0),
            first_read_done: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            command: AtomicU8::new(CARRY_ON),
            closing_since: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            responses: Mutex::new(Slab::new()),
        }
    }

    fn lock_responses(&self) -> std::sync::MutexGuard<'_, Slab<u64>> {
        // Each critical section is one slab operation: a poisoned lock is still consistent.
        self.responses.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the connection `command` (never a milder one than before); true when that
    /// changed it.
    fn tell(&self, command: u8, now: u64) -> bool {
        if command == CLOSE {
            let _ =
                self.closing_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
        let before = self.command.fetch_max(command, Ordering::AcqRel);
        if before < command {
            self.waker.wake();
            return true;
        }
        false
    }

    /// A response took a step: its write timeout starts again.
    fn progressed(&self, key: usize) {
        if let Some(at) = self.lock_responses().get_mut(key) {
            *at = coarse_now_ms();
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        // A load first: the swap (a read-modify-write) happens once per connection, not per
        // read.
        if !self.first_read_done.load(Ordering::Relaxed)
            && !self.first_read_done.swap(true, Ordering::Relaxed)
        {
            if bytes.starts_with(b"PRI") {
                self.http2.store(true, Ordering::Relaxed);
                self.head_since.store(0, Ordering::Relaxed);
            }
            return;
        }
        if !self.http2.load(Ordering::Relaxed)
            && self.requests.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(coarse_now_ms(), Ordering::Relaxed);
        }
    }

    fn on_write(&self, blocked: bool) {
        let since = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked {
            if since == 0 {
                self.write_blocked_since
                    .store(coarse_now_ms(), Ordering::Relaxed);
            }
        } else if since != 0 {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// The verdict at `now`. Timestamps are coarse (up to one tick old), so every timeout is
    /// given one tick more: it never fires early, and at most two ticks late.
    fn check(&self, now: u64, limits: &ServerLimits) -> Verdict {
        let closing = match self.closing_since.load(Ordering::Acquire) {
            0 => None,
            at => Some(at),
        };
        let slack = ms(limits.tick());
        let write = ms(limits.write_timeout);
        let since = |at: u64| (at != 0).then(|| now.saturating_sub(at).saturating_sub(slack));
        if since(self.write_blocked_since.load(Ordering::Relaxed)).is_some_and(|d| d >= write) {
            return Verdict::Stuck(format!(
                "the client read nothing of its response for {write} ms"
            ));
        }
        let stalest = self.lock_responses().iter().map(|(_, at)| *at).min();
        if stalest.and_then(since).is_some_and(|d| d >= write) {
            return Verdict::Stuck(format!(
                "the client took nothing of a response for {write} ms"
            ));
        }
        if self.requests.load(Ordering::Acquire) > 0 {
            return Verdict::Fine;
        }
        let idle_since = self.idle_since.load(Ordering::Relaxed);
        if let Some(closing) = closing {
            // Asked to close with nothing in progress, yet still open: HTTP/2 data the client
            // will not take. Requests in progress are bounded by their own timeouts.
            return if now
                .saturating_sub(closing.max(idle_since))
                .saturating_sub(slack)
                >= write
            {
                Verdict::Stuck(format!("the connection did not close within {write} ms"))
            } else {
                Verdict::Fine
            };
        }
        if !self.http2.load(Ordering::Relaxed)
            && since(self.head_since.load(Ordering::Relaxed))
                .is_some_and(|d| d >= ms(limits.header_timeout))
        {
            return Verdict::Stuck(format!(
                "no complete request head within {} ms",
                ms(limits.header_timeout)
            ));
        }
        if now.saturating_sub(idle_since).saturating_sub(slack) >= ms(limits.idle_timeout) {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

/// Counts one request from the moment hyper hands it over until its response body is gone.
#[derive(Debug)]
struct RequestGuard {
    state: Arc<ConnState>,
}

impl RequestGuard {
    fn new(state: &Arc<ConnState>) -> Self {
        state.requests.fetch_add(1, Ordering::AcqRel);
        state.head_since.store(0, Ordering::Relaxed);
        Self {
            state: state.clone(),
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.state.requests.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state
                .idle_since
                .store(coarse_now_ms(), Ordering::Relaxed);
        }
    }
}

pin_project! {
    /// The connection's I/O: reports reads and blocked writes to the watchdog.
    struct Watched {
        #[pin]
        inner: TcpStream,
        state: Arc<ConnState>,
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = this.inner.poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.on_read(&buf.filled()[before..]);
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write(cx, buf);
        this.state.on_write(written.is_pending());
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let written = this.inner.poll_write_vectored(cx, bufs);
        this.state.on_write(written.is_pending());
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// The application's service, as hyper calls it for one connection.
#[derive(Clone)]
struct PerConnection<S> {
    service: S,
    state: Arc<ConnState>,
}

impl<S> hyper::service::Service<hyper::Request<Incoming>> for PerConnection<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone,
{
    type Response = hyper::Response<TrackedBody>;
    type Error = Infallible;
    type Future = Tracked<S::Future>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = RequestGuard::new(&self.state);
        // The application's service is always ready (a `service_fn`).
        let future = self.service.clone().call(request.map(Body::new));
        Tracked {
            future,
            guard: Some(guard),
        }
    }
}

pin_project! {
    /// A request's future, counted as in progress by its guard until the response body is done.
    struct Tracked<F> {
        #[pin]
        future: F,
        guard: Option<RequestGuard>,
    }
}

impl<F> Future for Tracked<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<hyper::Response<TrackedBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.future.poll(cx))?;
        let guard = this
            .guard
            .take()
            .expect("a Tracked future is not polled after it completed");
        Poll::Ready(Ok(response.map(|body| TrackedBody::new(body, guard))))
    }
}

pin_project! {
    /// A response body, registered with its connection's watchdog until hyper has taken all of
    /// it (or dropped it); on HTTP/2, handed over in frame-sized pieces.
    pub struct TrackedBody {
        #[pin]
        inner: Body,
        // The part of the last data frame not yet handed over.
        rest: Bytes,
        chunk: usize,
        key: usize,
        guard: RequestGuard,
    }

    impl PinnedDrop for TrackedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.guard.state.lock_responses().try_remove(*this.key);
        }
    }
}

impl TrackedBody {
    fn new(inner: Body, guard: RequestGuard) -> Self {
        let key = guard.state.lock_responses().insert(coarse_now_ms());
        let chunk = if guard.state.http2.load(Ordering::Relaxed) {
            HTTP2_CHUNK
        } else {
            usize::MAX
        };
        Self {
            inner,
            rest: Bytes::new(),
            chunk,
            key,
            guard,
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.project();
        if !this.rest.is_empty() {
            let n = (*this.chunk).min(this.rest.len());
            this.guard.state.progressed(*this.key);
            return Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))));
        }
        let frame = ready!(this.inner.poll_frame(cx));
        if frame.is_some() {
            this.guard.state.progressed(*this.key);
        }
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) if data.len() > *this.chunk => {
                    let first = data.split_to(*this.chunk);
                    *this.rest = data;
                    Poll::Ready(Some(Ok(Frame::data(first))))
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => Poll::Ready(other),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// At most one event per period: `now()` says whether to log, and how many were skipped.
struct Every {
    period: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl Every {
    fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            skipped: 0,
        }
    }

    /// Some(events skipped since the last one) when this one should be told.
    fn now(&mut self) -> Option<u64> {
        match self.last {
            Some(last) if last.elapsed() < self.period => {
                self.skipped += 1;
                None
            }
            _ => {
                self.last = Some(Instant::now());
                Some(std::mem::take(&mut self.skipped))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ServerLimits {
        ServerLimits {
            max_connections: 10,
            header_timeout: Duration::from_millis(100),
            idle_timeout: Duration::from_millis(1000),
            write_timeout: Duration::from_millis(500),
            max_header_bytes: 8192,
            http2_max_streams: 10,
            shutdown_drain: Duration::ZERO,
        }
    }

    #[test]
    fn a_connection_is_judged_by_what_it_is_doing() {
        let l = limits();
        // Timestamps are coarse by up to a tick: every timeout gets one tick more.
        let tick = ms(l.tick());
        let state = Arc::new(ConnState::new());
        let t0 = state.head_since.load(Ordering::Relaxed);
        // Accepted, nothing sent: the head timeout runs from the accept.
        assert_eq!(state.check(t0 + 100, &l), Verdict::Fine);
        assert!(matches!(
            state.check(t0 + 100 + tick, &l),
            Verdict::Stuck(_)
        ));

        // HTTP/2 has no head timeout, only the idle one.
        let h2 = Arc::new(ConnState::new());
        h2.on_read(b"PRI * HTTP/2.0\r\n");
        let t0 = h2.idle_since.load(Ordering::Relaxed);
        assert_eq!(h2.check(t0 + 500, &l), Verdict::Fine);
        assert_eq!(h2.check(t0 + 1000 + tick, &l), Verdict::Idle);

        // A request in progress is never idle, nor subject to the head timeout.
        let busy = Arc::new(ConnState::new());
        busy.on_read(b"POST / HTTP/1.1\r\n");
        let guard = RequestGuard::new(&busy);
        assert_eq!(busy.check(t0 + 5000, &l), Verdict::Fine);
        // ...unless it cannot write.
        busy.on_write(true);
        let blocked = busy.write_blocked_since.load(Ordering::Relaxed);
        assert!(matches!(
            busy.check(blocked + 500 + tick, &l),
            Verdict::Stuck(_)
        ));
        busy.on_write(false);
        assert_eq!(busy.check(blocked + 500 + tick, &l), Verdict::Fine);
        // A response not taken in time...
        let body = TrackedBody::new(Body::empty(), guard);
        let ready = busy.lock_responses()[body.key];
        assert!(matches!(
            busy.check(ready + 500 + tick, &l),
            Verdict::Stuck(_)
        ));
        // ...unless a piece of it was taken since: each response is judged by its progress.
        std::thread::sleep(Duration::from_millis(20));
        busy.progressed(body.key);
        let moved = busy.lock_responses()[body.key];
        assert!(moved > ready);
        assert_eq!(busy.check(moved + 500, &l), Verdict::Fine);
        assert!(matches!(
            busy.check(moved + 500 + tick, &l),
            Verdict::Stuck(_)
        ));
        drop(body);
        let idle = busy.idle_since.load(Ordering::Relaxed);
        assert_eq!(busy.requests.load(Ordering::Relaxed), 0);
        // Idle again: a new head's first bytes start the head timeout.
        busy.on_read(b"PO");
        let head = busy.head_since.load(Ordering::Relaxed);
        assert!(head >= idle);
        assert!(matches!(
            busy.check(head + 100 + tick, &l),
            Verdict::Stuck(_)
        ));
        // Closing with nothing in progress must finish within the write timeout.
        let closing = Arc::new(ConnState::new());
        closing.on_read(b"PRI");
        let at = closing.idle_since.load(Ordering::Relaxed);
        assert!(closing.tell(CLOSE, at));
        assert!(!closing.tell(CLOSE, at), "told once");
        assert_eq!(closing.check(at + 100, &l), Verdict::Fine);
        assert!(matches!(
            closing.check(at + 500 + tick, &l),
            Verdict::Stuck(_)
        ));
        assert!(closing.tell(ABORT, at), "a stronger word is told");
        assert!(!closing.tell(CLOSE, at), "never a milder one after it");
    }

    #[test]
    fn the_connection_adds_one_pointer_to_a_calls_future() {
        let call = async {
            let waiting = [0u8; 500];
            tokio::task::yield_now().await;
            Ok::<_, Infallible>(Response::new(Body::from(waiting.to_vec())))
        };
        let inner = std::mem::size_of_val(&call);
        let tracked = Tracked {
            future: call,
            guard: Some(RequestGuard::new(&Arc::new(ConnState::new()))),
        };
        assert!(std::mem::size_of_val(&tracked) <= inner + 8, "{inner}");
    }

    #[test]
    fn http2_responses_are_handed_over_in_frame_sized_pieces() {
        use http_body::Body as _;
        use http_body_util::BodyExt;
        let state = Arc::new(ConnState::new());
        state.on_read(b"PRI");
        let body = TrackedBody::new(
            Body::from(vec![7u8; 3 * HTTP2_CHUNK + 5]),
            RequestGuard::new(&state),
        );
        assert_eq!(body.size_hint().exact(), Some(3 * HTTP2_CHUNK as u64 + 5));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let sizes = runtime.block_on(async {
            let mut body = std::pin::pin!(body);
            let mut sizes = Vec::new();
            while let Some(frame) = body.frame().await {
                sizes.push(frame.unwrap().into_data().unwrap().len());
            }
            sizes
        });
        assert_eq!(sizes, [HTTP2_CHUNK, HTTP2_CHUNK, HTTP2_CHUNK, 5]);
        assert_eq!(state.requests.load(Ordering::Relaxed), 0);
        assert!(state.lock_responses().is_empty());
    }
}
