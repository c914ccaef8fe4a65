//! A thread-based server for the temp-file API, compatible with the original EchoMe web app.
//!
//! | request | answer |
//! |---|---|
//! | `POST /api/tempfile/upload`, multipart field `file` | 200 `{"success":true,"file_id","file_type","original_name","size","expires_at"}` |
//! | `GET`/`HEAD /api/tempfile/download/{id}` | the bytes; `Content-Type` of the true format, `Content-Disposition: attachment` with the original name (RFC 6266/8187 for non-ASCII), single `Range: bytes=` → 206 or 416 |
//! | `DELETE /api/tempfile/delete/{id}` | 200 `{"success":true,"message"}` or 404 |
//! | `POST /api/tempfile/batch-delete`, `{"file_ids":[…]}` | 200 `{"success":true,"deleted_count":n}` |
//! | `GET /health` | 200 `{"success":true,"files":n}` |
//!
//! With [`ServerConfig::tokens`] set, every endpoint but `/health` needs
//! `Authorization: Bearer <token>` (else 401), and a download may instead carry a signed link's
//! `exp` and `sig` (else 403); see [`crate::auth`].
//!
//! Errors are `{"success":false,"message":…}` with 400 (bad request, extension not accepted,
//! content not matching the extension, empty file), 404 (unknown or expired id, unknown path),
//! 405, 408 (a request head or body slower than the limits below), 413 (upload over
//! [`ServerConfig::max_upload_bytes`]), 431, 500, 503 (at the connection cap) or 507 (storage
//! quota or free-space floor reached; nothing of the upload is kept).
//!
//! Abuse limits: each connection is served by a thread of its own, at most
//! [`ServerConfig::max_connections`] at once (more are answered 503 and closed without reading);
//! a request head must arrive whole within [`ServerConfig::header_timeout`] and a body at
//! [`ServerConfig::min_body_rate`] on average after [`ServerConfig::body_grace`], so slow
//! clients (slowloris) cost a thread for seconds, not forever, and honest clients keep being
//! served beside hundreds of them. Stored plus in-flight bytes stay under
//! [`ServerConfig::quota_bytes`], and an upload never takes the disk below
//! [`ServerConfig::min_free_bytes`].
//!
//! Beyond the original: files and their metadata persist across restarts; files expire after
//! [`ServerConfig::expiry`] (checked on every access and swept every
//! [`ServerConfig::sweep_interval`]); uploads are streamed to disk and stopped as soon as they
//! pass the size limit; the content is checked (a misnamed file is accepted when its content is
//! an accepted format of the kind its name says, and served under its true type; see
//! [`crate::types`]);
//! ids are random UUID v4 and the stored file is named by its id only. Without tokens nothing
//! needs credentials, as in the original: then bind to loopback (the default) or put it behind a
//! proxy.

mod http;
pub(crate) mod multipart;
mod pace;
mod store;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::auth::{AccessTokens, LinkCheck, Token};
use crate::error::TempfileError;
use crate::types::{
    extension_of, file_type_for_extension, recognise_content, ContentRefusal, SNIFF_BYTES,
};
use http::{parse_range, Body, Framing, Head, HeadError, Payload, RangeRequest, Response};
use multipart::{boundary_from_content_type, Multipart, MultipartError};
use pace::PacedStream;
pub use store::{Clock, ManualClock};
use store::{NewFile, NoSpace, SpaceLimits, Store};

/// Default largest upload: 200 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 200 * 1024 * 1024;
/// Default lifetime of a file: 24 hours.
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Default connection cap (one thread each).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default free-space floor: 256 MiB.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;
/// Stack of a connection thread: the handlers keep their buffers on the heap.
const CONNECTION_STACK_BYTES: usize = 256 * 1024;
/// Slack allowed above the file size for the multipart framing of an upload.
const MULTIPART_OVERHEAD: u64 = 64 * 1024;
/// Largest accepted batch-delete body.
const MAX_JSON_BODY: u64 = 1024 * 1024;
/// Largest unread request-body rest read to keep a connection alive.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Most ids in one batch delete.
const MAX_BATCH_IDS: usize = 1000;
/// Longest stored file name, in bytes.
const MAX_NAME_BYTES: usize = 200;

/// Server settings. [`ServerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on, e.g. `127.0.0.1:3000` (port 0 picks a free port).
    pub listen: String,
    /// Storage folder (created if missing).
    pub dir: PathBuf,
    /// Largest accepted file, in bytes (default [`DEFAULT_MAX_UPLOAD_BYTES`]).
    pub max_upload_bytes: u64,
    /// How long a file lives after its upload (default [`DEFAULT_EXPIRY`]).
    pub expiry: Duration,
    /// How often expired files are swept (default 60 s).
    pub sweep_interval: Duration,
    /// Connections served at once, each on a thread of its own (default
    /// [`DEFAULT_MAX_CONNECTIONS`]); one more is answered 503 and closed.
    pub max_connections: usize,
    /// Socket read/write timeout of one read or write while a request is in flight
    /// (default 60 s).
    pub io_timeout: Duration,
    /// How long an idle keep-alive connection is kept (default 5 s).
    pub keep_alive_timeout: Duration,
    /// A request head must arrive whole within this time from the connection's start (or from
    /// its first byte on a kept-alive connection), else 408 and close (default 10 s).
    pub header_timeout: Duration,
    /// Least average rate of a request body in bytes/s, counted after [`Self::body_grace`]
    /// (default 1024; 0 = only [`Self::io_timeout`] per read). A slower upload gets 408.
    pub min_body_rate: u64,
    /// Time a body may take before [`Self::min_body_rate`] applies (default 10 s).
    pub body_grace: Duration,
    /// Most bytes of stored files plus uploads in progress; `None` (the default) = no quota.
    /// An upload that would pass it gets 507.
    pub quota_bytes: Option<u64>,
    /// Free bytes every upload leaves on the storage's filesystem (default
    /// [`DEFAULT_MIN_FREE_BYTES`]); an upload that would go below gets 507.
    pub min_free_bytes: u64,
    /// Time source (default: the system clock).
    pub clock: Clock,
    /// Accepted access tokens; empty (the default) = open to anyone who can connect. See
    /// [`crate::auth`].
    pub tokens: Vec<Token>,
}

impl ServerConfig {
    /// Defaults, storing under `dir`, listening on `127.0.0.1:3000`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ServerConfig {
            listen: "127.0.0.1:3000".to_owned(),
            dir: dir.into(),
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
            expiry: DEFAULT_EXPIRY,
            sweep_interval: Duration::from_secs(60),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            io_timeout: Duration::from_secs(60),
            keep_alive_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            min_body_rate: 1024,
            body_grace: Duration::from_secs(10),
            quota_bytes: None,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            clock: Clock::system(),
            tokens: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), TempfileError> {
        let bad = |m: &str| Err(TempfileError::Config(m.to_owned()));
        if self.max_upload_bytes == 0 {
            return bad("max upload size must be at least 1 byte");
        }
        if self.expiry.is_zero() {
            return bad("expiry must be positive");
        }
        if self.sweep_interval.is_zero() {
            return bad("sweep interval must be positive");
        }
        if self.max_connections == 0 || self.max_connections > 65_536 {
            return bad("the connection cap must be in 1..=65536");
        }
        if self.io_timeout.is_zero()
            || self.keep_alive_timeout.is_zero()
            || self.header_timeout.is_zero()
        {
            return bad("timeouts must be positive");
        }
        if self.quota_bytes == Some(0) {
            return bad("the storage quota must be at least 1 byte");
        }
        Ok(())
    }
}

struct Shared {
    store: Store,
    config: ServerConfig,
    access: AccessTokens,
    shutdown: AtomicBool,
    /// Open connections, so shutdown can unblock their reads.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    /// Connection threads running; shutdown waits (briefly) for them.
    open: (Mutex<usize>, Condvar),
    /// Connections answered 503 at the cap, for the log.
    refused: AtomicUsize,
    sweeper: (Mutex<()>, Condvar),
}

/// A running server. Dropping it shuts it down.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the storage, binds, and starts the acceptor, worker and sweeper threads.
    pub fn start(config: ServerConfig) -> Result<Server, TempfileError> {
        config.validate()?;
        let limits = SpaceLimits {
            quota: config.quota_bytes,
            min_free: config.min_free_bytes,
        };
        let store = Store::open(&config.dir, config.expiry, config.clock.clone(), limits)
            .map_err(|e| TempfileError::io("open storage", &config.dir, e))?;
        let listener = TcpListener::bind(&config.listen).map_err(|source| TempfileError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|source| TempfileError::Bind {
                addr: config.listen.clone(),
                source,
            })?;
        let shared = Arc::new(Shared {
            store,
            access: AccessTokens::new(&config.tokens),
            config,
            shutdown: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            open: (Mutex::new(0), Condvar::new()),
            refused: AtomicUsize::new(0),
            sweeper: (Mutex::new(()), Condvar::new()),
        });
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| TempfileError::io("spawn thread", "", e))
        };
        let mut threads = Vec::new();
        {
            let shared = Arc::clone(&shared);
            threads.push(spawn(
                "tempfile-accept".into(),
                Box::new(move || accept_loop(&shared, &listener)),
            )?);
        }
        {
            let shared = Arc::clone(&shared);
            threads.push(spawn(
                "tempfile-sweeper".into(),
                Box::new(move || sweep_loop(&shared)),
            )?);
        }
        tracing::info!(%addr, dir = %shared.config.dir.display(), max_upload_bytes = shared.config.max_upload_bytes,
            expiry_s = shared.config.expiry.as_secs_f64(), tokens = shared.config.tokens.len(),
            max_connections = shared.config.max_connections, quota_bytes = ?shared.config.quota_bytes,
            min_free_bytes = shared.config.min_free_bytes, "temp-file server listening");
        Ok(Server {
            addr,
            shared,
            threads,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://{addr}`, the base URL clients use.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Deletes expired files now (the sweeper does this periodically); returns how many.
    pub fn sweep_now(&self) -> usize {
        self.shared.store.sweep()
    }

    /// Stops accepting, interrupts open connections, and joins all threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if self.shared.shutdown.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the acceptor with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        for (_, conn) in self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            let _ = conn.shutdown(Shutdown::Both);
        }
        self.shared.sweeper.1.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // Connection threads end once their sockets are shut; wait a little for them (a
        // thread blocked in a disk write cannot be interrupted, and is not waited for long).
        let (lock, cvar) = &self.shared.open;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cvar
            .wait_timeout_while(guard, Duration::from_secs(5), |n| *n > 0)
            .unwrap_or_else(|p| p.into_inner());
        if *guard > 0 {
            tracing::warn!(
                threads = *guard,
                "connection threads still running at shutdown"
            );
        }
        tracing::info!("temp-file server stopped");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &TcpListener) {
    for stream in listener.incoming() {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Back off on errors such as EMFILE instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if let Err(mut stream) = spawn_connection(shared, stream) {
            let refused = shared.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    cap = shared.config.max_connections,
                    "at the connection cap; answering 503"
                );
            }
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = Response::error(503, "server busy, retry later")
                .with_header("Retry-After", "1")
                .write_to(&mut stream, false, false);
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// Serves `stream` on a thread of its own, or gives it back when the server is at its
/// connection cap. A thread that cannot be started (the system is out of threads) drops the
/// connection: the client sees it closed and retries.
fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) -> Result<(), TcpStream> {
    {
        let mut open = shared.open.0.lock().unwrap_or_else(|p| p.into_inner());
        if *open >= shared.config.max_connections {
            return Err(stream);
        }
        *open += 1;
    }
    let accepted = Instant::now();
    let worker = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("tempfile-conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || {
            serve_connection(&worker, stream, accepted);
            let (lock, cvar) = &worker.open;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            cvar.notify_all();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a connection thread; connection dropped");
        *shared.open.0.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
    }
    Ok(())
}

fn sweep_loop(shared: &Shared) {
    let (lock, cvar) = &shared.sweeper;
    let mut guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    while !shared.shutdown.load(Ordering::SeqCst) {
        guard = cvar
            .wait_timeout(guard, shared.config.sweep_interval)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        let n = shared.store.sweep();
        if n > 0 {
            tracing::info!(removed = n, "swept expired files");
        }
    }
}

/// Serves requests on one connection until it closes, errs, or should not be kept alive.
fn serve_connection(shared: &Shared, stream: TcpStream, accepted: Instant) {
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    if let Ok(clone) = stream.try_clone() {
        shared
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, clone);
    }
    if !shared.shutdown.load(Ordering::SeqCst) {
        if let Err(e) = connection_loop(shared, &stream, accepted) {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }
    shared
        .conns
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

/// True for the errors of a read or write that ran out of time.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

fn connection_loop(shared: &Shared, stream: &TcpStream, accepted: Instant) -> io::Result<()> {
    let cfg = &shared.config;
    let _ = stream.set_nodelay(true);
    stream.set_write_timeout(Some(cfg.io_timeout))?;
    let mut reader = BufReader::with_capacity(
        16 * 1024,
        PacedStream::new(stream.try_clone()?, cfg.io_timeout),
    );
    let mut first = true;
    loop {
        if first {
            reader.get_mut().set_deadline(accepted + cfg.header_timeout);
        } else {
            // Kept alive: wait idle for the next request's first byte, then give its head the
            // header timeout.
            reader
                .get_mut()
                .set_deadline(Instant::now() + cfg.keep_alive_timeout);
            match reader.fill_buf() {
                Ok(b) if !b.is_empty() => {}
                _ => return Ok(()),
            }
            reader
                .get_mut()
                .set_deadline(Instant::now() + cfg.header_timeout);
        }
        first = false;
        let head = match http::read_head(&mut reader) {
            Ok(h) => h,
            Err(HeadError::Closed) => return Ok(()),
            Err(HeadError::Io(e)) if is_timeout(&e) => {
                tracing::debug!("request head too slow; answering 408");
                let response = Response::error(408, "the request head did not arrive in time");
                return finish(stream, &mut reader, response, false, false);
            }
            Err(HeadError::Io(e)) => return Err(e),
            Err(HeadError::Bad(msg)) => {
                return finish(stream, &mut reader, Response::error(400, msg), false, false)
            }
            Err(HeadError::TooLarge) => {
                return finish(
                    stream,
                    &mut reader,
                    Response::error(431, "request head too large"),
                    false,
                    false,
                )
            }
        };
        reader
            .get_mut()
            .set_body_rate(cfg.min_body_rate, cfg.body_grace);
        let started = Instant::now();
        let mut body = Body::new(&head, &mut reader, stream);
        let response = route(shared, &head, &mut body);
        let status = response.status;
        let mut body_done = body.is_finished();
        if !body_done
            && !body.is_waiting_for_continue()
            && body.remaining_hint().is_none_or(|n| n <= DRAIN_LIMIT)
        {
            // A small rest is read (briefly) so the connection can be reused; a client that
            // stalls or a large rest closes the connection instead.
            body.pace_for(Duration::from_secs(1));
            body_done = drain(&mut body, DRAIN_LIMIT);
        }
        let unread_body = !body_done && !body.is_waiting_for_continue();
        let keep_alive =
            body_done && head.wants_keep_alive() && !shared.shutdown.load(Ordering::SeqCst);
        tracing::debug!(method = %head.method, path = %head.path, status, ms = started.elapsed().as_millis() as u64, "request");
        let head_only = head.method == "HEAD";
        if !keep_alive {
            return finish(stream, &mut reader, response, head_only, unread_body);
        }
        let mut w = stream;
        response.write_to(&mut w, head_only, true)?;
    }
}

/// Reads and discards up to `limit` bytes of the rest of a body; true when it ended.
fn drain(body: &mut Body<'_>, limit: u64) -> bool {
    let mut sink = [0u8; 8192];
    let mut total = 0u64;
    while total < limit {
        match body.read(&mut sink) {
            Ok(0) => return body.is_finished(),
            Ok(n) => total += n as u64,
            Err(_) => return false,
        }
    }
    body.is_finished()
}

/// Writes a final response and closes. When the client may still be sending a body, the write
/// side is shut first and incoming bytes are discarded for a short while, so the client reads
/// the response instead of a connection reset.
fn finish(
    stream: &TcpStream,
    reader: &mut BufReader<PacedStream>,
    response: Response,
    head_only: bool,
    unread_body: bool,
) -> io::Result<()> {
    let mut w = stream;
    let result = response.write_to(&mut w, head_only, false);
    let _ = stream.shutdown(Shutdown::Write);
    if unread_body {
        let deadline = Instant::now() + Duration::from_secs(2);
        reader.get_mut().set_deadline(deadline);
        let mut sink = [0u8; 16 * 1024];
        let mut total = 0usize;
        while Instant::now() < deadline && total < 16 * 1024 * 1024 {
            match reader.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    result
}

/// `Err(response)` when the request may not proceed: every path but `/health` needs a token
/// when the server has any; a download may carry a signed link instead.
fn authorize(shared: &Shared, head: &Head) -> Result<(), Response> {
    if shared.access.is_open() || head.path == "/health" {
        return Ok(());
    }
    let download = head
        .path
        .strip_prefix("/api/tempfile/download/")
        .filter(|_| head.method == "GET" || head.method == "HEAD");
    if shared.access.accepts_header(head.header("authorization")) {
        return Ok(());
    }
    if let (Some(id), Some((exp, sig))) = (download, signed_link_params(&head.query)) {
        let now = shared
            .config
            .clock
            .now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        return match shared.access.check_link(id, exp, sig, now) {
            LinkCheck::Valid => Ok(()),
            LinkCheck::Expired => Err(Response::error(403, "download link expired")),
            LinkCheck::Invalid => Err(Response::error(403, "invalid download link")),
        };
    }
    // Only the method and path are logged: never the header or the query.
    tracing::info!(method = %head.method, path = %head.path, "request without a valid access token refused");
    Err(Response::error(401, "missing or invalid access token")
        .with_header("WWW-Authenticate", "Bearer realm=\"echomimic-tempfile\""))
}

/// `exp` and `sig` of a query string, when both are present exactly once.
fn signed_link_params(query: &str) -> Option<(&str, &str)> {
    let (mut exp, mut sig) = (None, None);
    for pair in query.split('&') {
        let slot = match pair.split_once('=') {
            Some(("exp", v)) => (&mut exp, v),
            Some(("sig", v)) => (&mut sig, v),
            _ => continue,
        };
        if slot.0.replace(slot.1).is_some() {
            return None;
        }
    }
    exp.zip(sig)
}

fn route(shared: &Shared, head: &Head, body: &mut Body<'_>) -> Response {
    if let Err(refused) = authorize(shared, head) {
        return refused;
    }
    let method = head.method.as_str();
    let path = head.path.as_str();
    let allow = |methods: &str| {
        Response::error(405, format!("method {method} not allowed")).with_header("Allow", methods)
    };
    if path == "/api/tempfile/upload" {
        return if method == "POST" {
            upload(shared, head, body)
        } else {
            allow("POST")
        };
    }
    if path == "/api/tempfile/batch-delete" {
        return if method == "POST" {
            batch_delete(shared, body)
        } else {
            allow("POST")
        };
    }
    if path == "/health" {
        return if method == "GET" || method == "HEAD" {
            Response::json(200, &json!({"success": true, "files": shared.store.len()}))
        } else {
            allow("GET, HEAD")
        };
    }
    if let Some(id) = path.strip_prefix("/api/tempfile/download/") {
        return if method == "GET" || method == "HEAD" {
            download(shared, head, id)
        } else {
            allow("GET, HEAD")
        };
    }
    if let Some(id) = path.strip_prefix("/api/tempfile/delete/") {
        return if method == "DELETE" {
            delete(shared, id)
        } else {
            allow("DELETE")
        };
    }
    Response::error(404, "no such endpoint")
}

fn parse_id(id: &str) -> Option<Uuid> {
    // Only the canonical hyphenated form: one spelling per file.
    let uuid = Uuid::parse_str(id).ok()?;
    (uuid.hyphenated().to_string() == id.to_ascii_lowercase() && id.len() == 36).then_some(uuid)
}

fn not_found() -> Response {
    Response::error(404, "file not found or expired")
}

fn download(shared: &Shared, head: &Head, id: &str) -> Response {
    let Some(uuid) = parse_id(id) else {
        return not_found();
    };
    let Some((meta, file)) = shared.store.open_file(uuid) else {
        return not_found();
    };
    let len = meta.size;
    let base = |status: u16, payload: Payload| Response {
        status,
        headers: vec![
            ("Content-Type", meta.content_type.clone()),
            (
                "Content-Disposition",
                content_disposition(&meta.original_name),
            ),
            ("Accept-Ranges", "bytes".to_owned()),
            ("Cache-Control", "private, max-age=0".to_owned()),
            ("X-Content-Type-Options", "nosniff".to_owned()),
        ],
        payload,
    };
    match parse_range(head.header("range"), len) {
        RangeRequest::Full => base(
            200,
            Payload::File {
                file,
                offset: 0,
                len,
            },
        ),
        RangeRequest::Partial { start, end } => base(
            206,
            Payload::File {
                file,
                offset: start,
                len: end - start + 1,
            },
        )
        .with_header("Content-Range", format!("bytes {start}-{end}/{len}")),
        RangeRequest::Unsatisfiable => Response::error(416, "range not satisfiable")
            .with_header("Content-Range", format!("bytes */{len}")),
    }
}

/// `attachment; filename="<ascii fallback>"; filename*=UTF-8''<percent-encoded>` (RFC 6266).
fn content_disposition(name: &str) -> String {
    format!("attachment; {}", crate::types::filename_params(name))
}

fn delete(shared: &Shared, id: &str) -> Response {
    match parse_id(id) {
        Some(uuid) if shared.store.delete(uuid) => {
            tracing::info!(file_id = %uuid, "deleted");
            Response::json(200, &json!({"success": true, "message": "file deleted"}))
        }
        _ => not_found(),
    }
}

fn batch_delete(shared: &Shared, body: &mut Body<'_>) -> Response {
    if let Framing::Length(n) = body.framing() {
        if n > MAX_JSON_BODY {
            return Response::error(413, "request body too large");
        }
    }
    let mut raw = Vec::new();
    match body.take(MAX_JSON_BODY + 1).read_to_end(&mut raw) {
        Ok(_) if raw.len() as u64 > MAX_JSON_BODY => {
            return Response::error(413, "request body too large")
        }
        Ok(_) => {}
        Err(e) => return Response::error(400, format!("could not read body: {e}")),
    }
    #[derive(serde::Deserialize)]
    struct Batch {
        file_ids: Vec<String>,
    }
    let batch: Batch = match serde_json::from_slice(&raw) {
        Ok(b) => b,
        Err(e) => return Response::error(400, format!("expected {{\"file_ids\": [..]}}: {e}")),
    };
    if batch.file_ids.len() > MAX_BATCH_IDS {
        return Response::error(400, format!("at most {MAX_BATCH_IDS} ids per batch"));
    }
    let deleted = batch
        .file_ids
        .iter()
        .filter(|id| parse_id(id).is_some_and(|u| shared.store.delete(u)))
        .count();
    tracing::info!(requested = batch.file_ids.len(), deleted, "batch delete");
    Response::json(200, &json!({"success": true, "deleted_count": deleted}))
}

/// Makes a client-supplied file name safe to store as metadata and to echo in headers: only
/// the last path component (after `/` or `\`), no control characters, no leading dots or
/// surrounding spaces, at most 200 bytes (keeping the extension).
pub fn sanitize_file_name(raw: &str) -> Option<String> {
    let last = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim().trim_start_matches('.').trim();
    if cleaned.is_empty() {
        return None;
    }
    if cleaned.len() <= MAX_NAME_BYTES {
        return Some(cleaned.to_owned());
    }
    let (stem, ext) = match cleaned.rsplit_once('.') {
        Some((s, e)) if e.len() <= 16 => (s, format!(".{e}")),
        _ => (cleaned, String::new()),
    };
    let mut cut = MAX_NAME_BYTES - ext.len();
    while !stem.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(format!("{}{ext}", &stem[..cut]))
}

enum UploadFailure {
    Client(u16, String),
    Server(String),
    /// The storage quota or the free-space floor: 507.
    Full(NoSpace),
}

impl From<NoSpace> for UploadFailure {
    fn from(e: NoSpace) -> Self {
        UploadFailure::Full(e)
    }
}

fn upload(shared: &Shared, head: &Head, body: &mut Body<'_>) -> Response {
    match upload_inner(shared, head, body) {
        Ok(resp) => resp,
        Err(UploadFailure::Client(status, msg)) => {
            tracing::info!(status, reason = %msg, "upload refused");
            Response::error(status, msg)
        }
        Err(UploadFailure::Server(msg)) => {
            tracing::error!(reason = %msg, "upload failed");
            Response::error(500, msg)
        }
        Err(UploadFailure::Full(why)) => {
            tracing::warn!(reason = %why, used_bytes = shared.store.used_bytes(), "upload refused: storage full");
            Response::error(507, why.to_string())
        }
    }
}

fn upload_inner(
    shared: &Shared,
    head: &Head,
    body: &mut Body<'_>,
) -> Result<Response, UploadFailure> {
    let max = shared.config.max_upload_bytes;
    let too_large =
        || UploadFailure::Client(413, format!("file larger than the limit of {max} bytes"));
    let client = |m: &str| UploadFailure::Client(400, m.to_owned());
    let boundary = head
        .header("content-type")
        .and_then(boundary_from_content_type)
        .ok_or_else(|| client("expected a multipart/form-data body with a boundary"))?;
    let declared = match head.framing {
        Framing::None => return Err(client("empty request body")),
        Framing::Length(n) if n > max.saturating_add(MULTIPART_OVERHEAD) => return Err(too_large()),
        Framing::Length(n) => n,
        Framing::Chunked => 0,
    };
    // Space for the declared length before any of the body is read (a client that waits for
    // `100 Continue` never sends it); a chunked body's grows as it is written.
    let mut reservation = shared.store.reserve(declared)?;
    let min_rate = shared.config.min_body_rate;
    let mut mp = Multipart::new(&mut *body, &boundary);
    let mp_err = |e: MultipartError| match e {
        MultipartError::Malformed(m) => {
            UploadFailure::Client(400, format!("malformed multipart body: {m}"))
        }
        MultipartError::Io(e) if is_timeout(&e) => UploadFailure::Client(
            408,
            format!("the upload arrived too slowly (less than {min_rate} bytes/s)"),
        ),
        MultipartError::Io(e) => {
            UploadFailure::Client(400, format!("could not read the upload: {e}"))
        }
    };
    let info = loop {
        match mp.next_part().map_err(mp_err)? {
            None => return Err(client("no file part named \"file\"")),
            Some(info) if info.name.as_deref() == Some("file") => break info,
            Some(_) => {}
        }
    };
    let raw_name = info
        .filename
        .ok_or_else(|| client("the \"file\" part has no filename"))?;
    let name = sanitize_file_name(&raw_name).ok_or_else(|| client("the file name is empty"))?;
    let ext = extension_of(&name).ok_or_else(|| client("the file name has no extension"))?;
    let file_type = file_type_for_extension(&ext).ok_or_else(|| {
        let allowed: Vec<&str> = crate::types::allowed_extensions().collect();
        UploadFailure::Client(
            400,
            format!(
                "file type .{ext} is not allowed (allowed: {})",
                allowed.join(", ")
            ),
        )
    })?;

    let mut pending = shared
        .store
        .begin_upload()
        .map_err(|e| UploadFailure::Server(format!("cannot create a temporary file: {e}")))?;
    let mut head_bytes = Vec::with_capacity(SNIFF_BYTES);
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = mp.read_data(&mut buf).map_err(mp_err)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max {
            return Err(too_large());
        }
        reservation.cover(size)?;
        if head_bytes.len() < SNIFF_BYTES {
            let take = (SNIFF_BYTES - head_bytes.len()).min(n);
            head_bytes.extend_from_slice(&buf[..take]);
        }
        pending
            .file
            .write_all(&buf[..n])
            .map_err(|e| UploadFailure::Server(format!("cannot write the upload: {e}")))?;
    }
    if size == 0 {
        return Err(client("the file is empty"));
    }
    let recognised = recognise_content(&ext, &head_bytes).map_err(|refusal| {
        let message = match refusal {
            ContentRefusal::NotOfItsKind(_) => {
                format!("the content is not a .{ext} file: {refusal}")
            }
            other => other.to_string(),
        };
        UploadFailure::Client(400, message)
    })?;
    if recognised.renamed {
        tracing::info!(name = %name, true_type = recognised.content_type, "misnamed upload accepted under its true type");
    }
    let meta = shared
        .store
        .commit(
            pending,
            reservation,
            NewFile {
                original_name: name,
                extension: recognised.ext.to_owned(),
                file_type,
                content_type: recognised.content_type.to_owned(),
                size,
            },
        )
        .map_err(|e| UploadFailure::Server(format!("cannot store the upload: {e}")))?;
    tracing::info!(file_id = %meta.file_id, name = %meta.original_name, size, "uploaded");
    Ok(Response::json(
        200,
        &json!({
            "success": true,
            "file_id": meta.file_id,
            "file_type": meta.file_type,
            "original_name": meta.original_name,
            "size": meta.size,
            "expires_at": meta.expires_at_ms / 1000,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised() {
        assert_eq!(
            sanitize_file_name("../../etc/passwd.png").as_deref(),
            Some("passwd.png")
        );
        assert_eq!(
            sanitize_file_name("/abs/path/a.png").as_deref(),
            Some("a.png")
        );
        assert_eq!(
            sanitize_file_name("C:\\Users\\me\\face.jpg").as_deref(),
            Some("face.jpg")
        );
        assert_eq!(sanitize_file_name("a\0b.png").as_deref(), Some("ab.png"));
        assert_eq!(
            sanitize_file_name("line\r\nbreak.png").as_deref(),
            Some("linebreak.png")
        );
        assert_eq!(sanitize_file_name("..").as_deref(), None);
        assert_eq!(sanitize_file_name("dir/").as_deref(), None);
        assert_eq!(
            sanitize_file_name("  .hidden.png ").as_deref(),
            Some("hidden.png")
        );
        assert_eq!(sanitize_file_name("头像.png").as_deref(), Some("头像.png"));
        let long = format!("{}.wav", "é".repeat(300));
        let s = sanitize_file_name(&long).unwrap();
        assert!(s.len() <= MAX_NAME_BYTES && s.ends_with(".wav"));
    }

    #[test]
    fn content_disposition_forms() {
        assert_eq!(
            content_disposition("a b.png"),
            "attachment; filename=\"a b.png\""
        );
        assert_eq!(
            content_disposition("头像.png"),
            "attachment; filename=\"__.png\"; filename*=UTF-8''%E5%A4%B4%E5%83%8F.png"
        );
        assert_eq!(
            content_disposition("a\"b.png"),
            "attachment; filename=\"a_b.png\"; filename*=UTF-8''a%22b.png"
        );
    }

    #[test]
    fn ids_must_be_canonical_uuids() {
        let id = Uuid::new_v4().to_string();
        assert!(parse_id(&id).is_some());
        assert!(parse_id(&id.to_uppercase()).is_some());
        assert!(parse_id(&id.replace('-', "")).is_none());
        assert!(parse_id("..").is_none());
        assert!(parse_id(&format!("{{{id}}}")).is_none());
    }
}
