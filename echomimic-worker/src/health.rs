//! `--metrics-listen`: the worker's metrics and probes over a small blocking HTTP server.
//!
//! * `GET /metrics`: [`crate::metrics`] in the Prometheus text format; the gauges that
//!   describe Redis and the accelerator are read at this moment.
//! * `GET /healthz` (liveness): 200 while every thread of the worker is alive, 503 once one
//!   died (the worker then exits for its supervisor anyway; the probe says so first).
//! * `GET /readyz` (readiness): 200 when the model is loaded, Redis answers and the lease is
//!   this worker's; else 503. Both answer a short JSON body: `{"status":"ok"}` or
//!   `{"status":"unavailable","reasons":[…]}`.
//!
//! Hardened like the temp-file server, at a smaller scale: at most [`MAX_CONNECTIONS`]
//! requests served at once (more are closed at once), [`IO_TIMEOUT`] to send a request head of
//! at most [`MAX_REQUEST`] bytes and to read the answer, bodies refused. Nothing here touches
//! the model: a scrape reads atomics, the registry and Redis (with its own connection and a
//! one-second timeout), so a slow or hostile client cannot delay a task.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::WorkerError;
use crate::redis_link::reconnects;
use crate::state::Shared;

/// Requests served at once.
pub(crate) const MAX_CONNECTIONS: usize = 16;
/// Longest request head (request line and headers).
pub(crate) const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request and to take the answer.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect, read and write timeout of the probe's Redis connection.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// What the probes read in Redis.
pub(crate) struct Probe {
    pub(crate) client: redis::Client,
    pub(crate) queue: String,
    /// The queue's delayed set.
    pub(crate) delayed: String,
    pub(crate) processing: String,
    pub(crate) lease: String,
    pub(crate) owner: String,
}

/// Redis as the probe found it.
struct RedisView {
    queue_depth: i64,
    delayed: i64,
    processing: i64,
    lease_holder: Option<String>,
}

struct Server {
    shared: Arc<Shared>,
    probe: Probe,
    con: Mutex<Option<redis::Connection>>,
    active: AtomicUsize,
}

/// The running server; dropping it stops it (the port is free again when `drop` returns).
pub(crate) struct HealthServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HealthServer {
    /// Binds `addr` and serves until dropped.
    pub(crate) fn start(
        addr: SocketAddr,
        shared: Arc<Shared>,
        probe: Probe,
    ) -> Result<HealthServer, WorkerError> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            WorkerError::Config(format!("--metrics-listen {addr}: cannot listen there: {e}"))
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| WorkerError::Internal(format!("metrics listener: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| WorkerError::Internal(format!("metrics listener: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Server {
            shared,
            probe,
            con: Mutex::new(None),
            active: AtomicUsize::new(0),
        });
        let stop_here = stop.clone();
        let thread = std::thread::Builder::new()
            .name("echomimic-metrics".into())
            .spawn(move || accept_loop(&listener, &server, &stop_here))
            .map_err(|e| WorkerError::Internal(format!("cannot start the metrics thread: {e}")))?;
        tracing::info!(addr = %bound, "metrics and health endpoints: /metrics /healthz /readyz");
        Ok(HealthServer {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    /// The address served (the port chosen when `:0` was asked for).
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, server: &Arc<Server>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if server.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    server.active.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropped: closed at once
                }
                let here = server.clone();
                let spawned = std::thread::Builder::new()
                    .name("echomimic-metrics-conn".into())
                    .spawn(move || {
                        here.serve(stream);
                        here.active.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    server.active.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::debug!(error = %e, "metrics listener: accept");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The request line's method and path, once the whole head is in.
fn read_head(stream: &mut TcpStream) -> Result<(String, String), u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST {
            return Err(431);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Err(408),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(400);
    };
    let has_body = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        (l.starts_with("content-length:") && l[15..].trim() != "0")
            || l.starts_with("transfer-encoding:")
    });
    if has_body {
        return Err(413);
    }
    let path = target.split('?').next().unwrap_or("").to_owned();
    Ok((method.to_owned(), path))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    }
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &[u8], head_only: bool) {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    if !head_only {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
}

/// Closes after an error answer without resetting the connection under the client (which
/// would lose the answer): stops writing, then reads and drops what the client still sends,
/// briefly and boundedly.
fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut left = 64 * 1024usize;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// `{"status":"ok"}` or `{"status":"unavailable","reasons":[…]}`, with its HTTP status.
fn verdict(reasons: &[String]) -> (u16, Vec<u8>) {
    if reasons.is_empty() {
        (200, br#"{"status":"ok"}"#.to_vec())
    } else {
        let body = serde_json::json!({ "status": "unavailable", "reasons": reasons });
        (503, body.to_string().into_bytes())
    }
}

impl Server {
    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let (method, path) = match read_head(&mut stream) {
            Ok(r) => r,
            Err(status) => {
                respond(
                    &mut stream,
                    status,
                    "text/plain",
                    reason(status).as_bytes(),
                    false,
                );
                linger(&mut stream);
                return;
            }
        };
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            respond(&mut stream, 405, "text/plain", b"GET only\n", false);
            return;
        }
        match path.as_str() {
            "/metrics" => {
                let body = self.metrics();
                respond(
                    &mut stream,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    &body,
                    head_only,
                );
            }
            "/healthz" | "/livez" => {
                let (status, body) = verdict(&self.liveness());
                respond(&mut stream, status, "application/json", &body, head_only);
            }
            "/readyz" => {
                let (status, body) = verdict(&self.readiness().0);
                respond(&mut stream, status, "application/json", &body, head_only);
            }
            _ => respond(
                &mut stream,
                404,
                "text/plain",
                b"not found: try /metrics, /healthz or /readyz\n",
                head_only,
            ),
        }
    }

    /// Queue depth, processing list and lease holder, in one round trip; the connection is
    /// dropped on any error (the next probe reconnects).
    fn redis_view(&self) -> Result<RedisView, String> {
        let Ok(mut slot) = self.con.lock() else {
            return Err("internal: probe lock poisoned".into());
        };
        if slot.is_none() {
            let con = self
                .probe
                .client
                .get_connection_with_timeout(REDIS_TIMEOUT)
                .map_err(|e| format!("redis unreachable: {e}"))?;
            let _ = con.set_read_timeout(Some(REDIS_TIMEOUT));
            let _ = con.set_write_timeout(Some(REDIS_TIMEOUT));
            *slot = Some(con);
        }
        let Some(con) = slot.as_mut() else {
            return Err("redis unreachable".into());
        };
        let answer: redis::RedisResult<(i64, i64, i64, Option<String>)> = redis::pipe()
            .llen(&self.probe.queue)
            .zcard(&self.probe.delayed)
            .llen(&self.probe.processing)
            .get(&self.probe.lease)
            .query(con);
        match answer {
            Ok((queue_depth, delayed, processing, lease_holder)) => Ok(RedisView {
                queue_depth,
                delayed,
                processing,
                lease_holder,
            }),
            Err(e) => {
                *slot = None;
                Err(format!("redis unreachable: {e}"))
            }
        }
    }

    fn liveness(&self) -> Vec<String> {
        match self.shared.died() {
            Some(name) => vec![format!("the {name} thread died")],
            None => Vec::new(),
        }
    }

    /// Why the worker is not ready (empty when it is), and what Redis said.
    fn readiness(&self) -> (Vec<String>, Option<RedisView>) {
        let mut reasons = self.liveness();
        if self.shared.stopping() {
            reasons.push("stopping".into());
        } else if !self.shared.ready() {
            reasons.push("starting: taking the lease and loading the model".into());
        }
        let view = match self.redis_view() {
            Ok(view) => {
                match &view.lease_holder {
                    Some(holder) if *holder == self.probe.owner => {}
                    Some(holder) => reasons.push(format!(
                        "the lease {} is held by another worker ({holder})",
                        self.probe.lease
                    )),
                    None => reasons.push(format!("the lease {} is not held", self.probe.lease)),
                }
                Some(view)
            }
            Err(e) => {
                reasons.push(e);
                None
            }
        };
        (reasons, view)
    }

    fn metrics(&self) -> Vec<u8> {
        let m = &self.shared.metrics;
        let live = self.liveness().is_empty();
        let (not_ready, view) = self.readiness();
        m.claims_in_flight
            .set(i64::try_from(self.shared.inflight()).unwrap_or(i64::MAX));
        m.redis_up.set(i64::from(view.is_some()));
        if let Some(view) = &view {
            m.queue_depth
                .with_label_values(&[&self.probe.queue])
                .set(view.queue_depth);
            m.delayed_tasks
                .with_label_values(&[&self.probe.queue])
                .set(view.delayed);
            m.processing_length
                .with_label_values(&[&self.probe.processing])
                .set(view.processing);
        }
        let seen = m.redis_reconnects.get();
        let now = reconnects();
        if now > seen {
            m.redis_reconnects.inc_by(now - seen);
        }
        m.gpu_memory_used.set(
            self.shared
                .memory_in_use()
                .and_then(|b| i64::try_from(b).ok())
                .unwrap_or(0),
        );
        m.up.with_label_values(&["live"]).set(i64::from(live));
        m.up.with_label_values(&["ready"])
            .set(i64::from(not_ready.is_empty()));
        m.render()
    }
}
