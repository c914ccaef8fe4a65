//! One thread's Redis connection, reconnected with capped backoff after any connection-level
//! failure.
//!
//! Each worker thread that talks to Redis (claimer, reporter, heartbeat) owns one
//! [`RedisLink`]. A command that fails because the connection broke (I/O error, reset, Redis
//! restarting or still loading its data set) drops the connection; the next call reconnects
//! after a pause that doubles from 100 ms up to 5 s, with jitter, so a Redis outage never makes
//! a thread spin. Other errors (a script error, a wrong type) are returned as they are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use redis::{Connection, RedisError, RedisResult};

use crate::error::WorkerError;

/// Capped exponential backoff with "equal jitter".
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            failures: 0,
        }
    }

    /// The pause after one more failure.
    pub(crate) fn next_pause(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = self
            .initial
            .saturating_mul(1u32 << (self.failures - 1).min(16))
            .min(self.max);
        let half = exp / 2;
        let jitter = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter))
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// True for errors after which the connection must be replaced and the command may succeed
/// later: I/O failures, dropped connections, and a Redis that is restarting.
///
/// Not a reply that did not parse (`ErrorKind::Parse`): the redis crate reports a reply of
/// another type than the one asked for (a bug on our side, the same on every try) that way
/// too, so retrying it would spin forever. Such a connection is still replaced
/// ([`RedisLink::run`]), in case the stream is out of step.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// Connections made again after one was lost, over every link of the process.
static RECONNECTS: AtomicU64 = AtomicU64::new(0);

/// How many times a link of this process made its connection again after losing it (the
/// `echomimic_redis_reconnects_total` metric).
pub(crate) fn reconnects() -> u64 {
    RECONNECTS.load(Ordering::Relaxed)
}

/// A lazily (re)connected Redis connection owned by one thread.
pub(crate) struct RedisLink {
    client: redis::Client,
    con: Option<Connection>,
    /// A connection was made before (the next one is a reconnect).
    connected_before: bool,
    name: &'static str,
    backoff: Backoff,
    read_timeout: Duration,
    /// When the current outage started (for logs).
    down_since: Option<Instant>,
}

impl RedisLink {
    /// `name` appears in logs; `read_timeout` bounds every reply (must exceed blocking commands).
    pub(crate) fn new(client: redis::Client, name: &'static str, read_timeout: Duration) -> Self {
        RedisLink {
            client,
            con: None,
            connected_before: false,
            name,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            read_timeout,
            down_since: None,
        }
    }

    fn connect(&mut self) -> RedisResult<&mut Connection> {
        if self.con.is_none() {
            let con = self
                .client
                .get_connection_with_timeout(Duration::from_secs(5))?;
            con.set_read_timeout(Some(self.read_timeout))?;
            con.set_write_timeout(Some(Duration::from_secs(10)))?;
            if self.connected_before {
                RECONNECTS.fetch_add(1, Ordering::Relaxed);
            }
            self.connected_before = true;
            self.con = Some(con);
        }
        match self.con.as_mut() {
            Some(con) => Ok(con),
            None => Err(RedisError::from(std::io::Error::other(
                "redis connection missing",
            ))),
        }
    }

    /// Runs `op` once. A connection-level failure drops the connection (the next call
    /// reconnects) and is returned; success resets the backoff.
    pub(crate) fn run<T>(
        &mut self,
        op: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        let result = self.connect().and_then(op);
        match &result {
            Ok(_) => {
                if let Some(since) = self.down_since.take() {
                    tracing::info!(
                        link = self.name,
                        after_s = since.elapsed().as_secs_f64(),
                        "redis reachable again"
                    );
                }
                self.backoff.reset();
            }
            Err(e) if is_connection_error(e) => {
                self.con = None;
                if self.down_since.is_none() {
                    self.down_since = Some(Instant::now());
                }
            }
            Err(e) if e.kind() == redis::ErrorKind::Parse => self.con = None,
            Err(_) => {}
        }
        result
    }

    /// The pause before the next try after a failure (`e`: what failed); logs it (first
    /// failure, then every 10th).
    pub(crate) fn pause_after(&mut self, e: &dyn std::fmt::Display) -> Duration {
        let pause = self.backoff.next_pause();
        let n = self.backoff.failures();
        if n == 1 || n.is_multiple_of(10) {
            tracing::warn!(
                link = self.name,
                error = %e,
                failures = n,
                retry_in_ms = pause.as_millis() as u64,
                "redis did not take the command, retrying"
            );
        }
        pause
    }

    /// Runs `op` until it succeeds, a non-connection error occurs, or `give_up()` is true
    /// (checked between tries; sleeping is split into slices of at most 100 ms).
    pub(crate) fn run_retrying<T>(
        &mut self,
        mut give_up: impl FnMut() -> bool,
        mut op: impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, RetryEnd> {
        loop {
            match self.run(&mut op) {
                Ok(v) => return Ok(v),
                Err(e) if is_connection_error(&e) => {
                    let pause = self.pause_after(&e);
                    if sleep_unless(pause, &mut give_up) {
                        return Err(RetryEnd::GaveUp(e));
                    }
                }
                Err(e) => return Err(RetryEnd::Failed(e)),
            }
        }
    }
}

/// Why [`RedisLink::run_retrying`] stopped without a result.
#[derive(Debug)]
pub(crate) enum RetryEnd {
    /// `give_up()` became true while Redis was unreachable (the last error).
    GaveUp(RedisError),
    /// A command error that retrying cannot fix.
    Failed(RedisError),
}

/// A Redis command of start-up or recovery that did not go through: given up because a stop
/// was requested (a normal stop), or refused by Redis.
impl From<RetryEnd> for WorkerError {
    fn from(e: RetryEnd) -> Self {
        match e {
            RetryEnd::GaveUp(_) => WorkerError::Cancelled,
            RetryEnd::Failed(e) => WorkerError::Redis(e),
        }
    }
}

impl RetryEnd {
    pub(crate) fn into_error(self) -> RedisError {
        match self {
            RetryEnd::GaveUp(e) | RetryEnd::Failed(e) => e,
        }
    }
}

/// Sleeps `total`, waking every 100 ms to ask `stop()`; returns true when it stopped early.
pub(crate) fn sleep_unless(total: Duration, mut stop: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + total;
    loop {
        if stop() {
            return true;
        }
        let now = Instant::now();
        if now >= end {
            return false;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let first = b.next_pause();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..30 {
            let p = b.next_pause();
            assert!(p <= Duration::from_secs(5));
        }
        let late = b.next_pause();
        assert!(late >= Duration::from_millis(2500), "{late:?}");
        b.reset();
        assert!(b.next_pause() <= Duration::from_millis(100));
    }

    #[test]
    fn io_errors_are_connection_errors() {
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(is_connection_error(&e));
        let e = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_connection_error(&e));
    }

    #[test]
    fn a_reply_of_the_wrong_type_fails_at_once_instead_of_retrying() {
        let url = std::env::var("ECHOMIMIC_WORKER_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/13".into());
        let client = redis::Client::open(url.as_str()).unwrap();
        if client.get_connection().is_err() {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
                "no Redis at {url}"
            );
            return;
        }
        let key = format!("echomimic-test-wrong-type-{}", std::process::id());
        let mut link = RedisLink::new(client, "test", Duration::from_secs(1));
        let start = Instant::now();
        let mut tries = 0;
        let r: Result<i64, _> = link.run_retrying(
            || start.elapsed() > Duration::from_secs(5),
            |con| {
                tries += 1;
                redis::cmd("SET")
                    .arg(&key)
                    .arg("not a number")
                    .query::<()>(con)?;
                redis::cmd("GET").arg(&key).query(con)
            },
        );
        assert!(matches!(r, Err(RetryEnd::Failed(_))), "{r:?}");
        assert_eq!(tries, 1);
        assert!(start.elapsed() < Duration::from_secs(1));
        // The link reconnects and serves the next command.
        let n: i64 = link
            .run(|con| redis::cmd("DEL").arg(&key).query(con))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn unreachable_redis_gives_up_without_spinning() {
        // Port 1 on loopback: connection refused at once.
        let client = redis::Client::open("redis://127.0.0.1:1/0").unwrap();
        let mut link = RedisLink::new(client, "test", Duration::from_secs(1));
        let mut tries = 0;
        let start = Instant::now();
        let r: Result<(), _> = link.run_retrying(
            || start.elapsed() > Duration::from_millis(700),
            |con| {
                tries += 1;
                redis::cmd("PING").query(con)
            },
        );
        assert!(matches!(r, Err(RetryEnd::GaveUp(_))));
        // The connect fails before `op` runs, so count the pauses instead: 100+200+400 ms
        // (halved at worst) cannot fit more than ~6 tries into 0.7 s.
        assert!(link.backoff.failures() <= 6, "{}", link.backoff.failures());
        assert_eq!(tries, 0);
    }
}
