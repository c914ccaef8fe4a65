//! The read side of a connection with the time limits that keep slow clients from holding it:
//! a deadline for a whole request head, and a minimum average rate for a body.
//!
//! A slowloris client sends a head one byte at a time, each byte just inside the per-read
//! timeout, and so keeps a connection thread forever; a slow-body client does the same with an
//! upload. [`PacedStream`] turns both into a bounded cost: every read waits at most until the
//! current limit's due time (and never longer than the per-read timeout), then fails with
//! [`io::ErrorKind::TimedOut`].

use std::io::{self, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What the next bytes are due by.
#[derive(Debug, Clone, Copy)]
enum Limit {
    /// Only the per-read timeout.
    Idle,
    /// Every byte of the current unit (a request head, the first byte of a keep-alive request)
    /// by this instant.
    Deadline(Instant),
    /// A body: after `grace` from `start`, at least `min_rate` bytes per second on average.
    Rate {
        start: Instant,
        grace: Duration,
        min_rate: u64,
        read: u64,
    },
}

/// A [`TcpStream`] read under a [`Limit`].
#[derive(Debug)]
pub(crate) struct PacedStream {
    stream: TcpStream,
    io_timeout: Duration,
    limit: Limit,
}

impl PacedStream {
    pub(crate) fn new(stream: TcpStream, io_timeout: Duration) -> Self {
        PacedStream {
            stream,
            io_timeout,
            limit: Limit::Idle,
        }
    }

    /// The next reads must be done by `deadline`.
    pub(crate) fn set_deadline(&mut self, deadline: Instant) {
        self.limit = Limit::Deadline(deadline);
    }

    /// The next reads are a body: after `grace`, at least `min_rate` bytes/s on average
    /// (0 = no rate, only the per-read timeout).
    pub(crate) fn set_body_rate(&mut self, min_rate: u64, grace: Duration) {
        self.limit = if min_rate == 0 {
            Limit::Idle
        } else {
            Limit::Rate {
                start: Instant::now(),
                grace,
                min_rate,
                read: 0,
            }
        };
    }

    /// When the next byte is due, if a limit applies.
    fn due(&self) -> Option<Instant> {
        match self.limit {
            Limit::Idle => None,
            Limit::Deadline(d) => Some(d),
            Limit::Rate {
                start,
                grace,
                min_rate,
                read,
            } => Some(start + grace + Duration::from_secs_f64(read as f64 / min_rate as f64)),
        }
    }
}

impl Read for PacedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = match self.due() {
            None => self.io_timeout,
            Some(due) => {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent too slowly",
                    ));
                }
                left.min(self.io_timeout)
            }
        };
        self.stream.set_read_timeout(Some(wait))?;
        let n = match self.stream.read(buf) {
            // A socket read timeout reads as WouldBlock on Unix: say what it is.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, e))
            }
            other => other?,
        };
        if let Limit::Rate { read, .. } = &mut self.limit {
            *read += n as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, PacedStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, PacedStream::new(server, Duration::from_secs(5)))
    }

    #[test]
    fn a_deadline_bounds_the_whole_unit_not_each_read() {
        let (mut client, mut paced) = pair();
        paced.set_deadline(Instant::now() + Duration::from_millis(300));
        let started = Instant::now();
        let writer = std::thread::spawn(move || {
            // One byte every 50 ms: each read is quick, the whole is not.
            for _ in 0..40 {
                if client.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let mut buf = [0u8; 16];
        let mut got = 0usize;
        let err = loop {
            match paced.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(got > 0, "some bytes arrive before the deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(2),
            "{took:?}"
        );
        drop(paced);
        writer.join().unwrap();
    }

    #[test]
    fn a_body_below_the_minimum_rate_times_out_after_the_grace() {
        let (mut client, mut paced) = pair();
        // 10 kB/s required after 200 ms; the client sends 100 B every 50 ms (2 kB/s).
        paced.set_body_rate(10_000, Duration::from_millis(200));
        let writer = std::thread::spawn(move || {
            for _ in 0..100 {
                if client.write_all(&[7u8; 100]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        let err = loop {
            match paced.read(&mut buf) {
                Ok(n) => total += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(total > 0 && total < 10_000, "{total}");
        drop(paced);
        writer.join().unwrap();
    }

    #[test]
    fn a_body_at_the_rate_is_read_whole() {
        let (mut client, mut paced) = pair();
        paced.set_body_rate(1_000, Duration::from_millis(100));
        let writer = std::thread::spawn(move || {
            for _ in 0..10 {
                client.write_all(&[1u8; 10_000]).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut total = 0usize;
        let mut buf = [0u8; 4096];
        while total < 100_000 {
            total += paced.read(&mut buf).unwrap();
        }
        writer.join().unwrap();
        assert_eq!(total, 100_000);
    }
}
