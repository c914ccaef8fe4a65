//! Stop requests: how far a stop has gone, and the handle that escalates it.
//!
//! A leaf module: it imports nothing of this crate, so every thread can hold a
//! [`ShutdownHandle`] without the threads depending on each other.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How far a stop request has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ShutdownLevel {
    /// Serving.
    Running = 0,
    /// No new claims; the running task may finish within the grace period.
    Graceful = 1,
    /// The running task is cancelled between UNet calls and requeued.
    Immediate = 2,
}

impl ShutdownLevel {
    /// The level stored in an atomic (values other than the enum's are treated as the last).
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Running,
            1 => Self::Graceful,
            _ => Self::Immediate,
        }
    }

    /// One level further (the last level stays).
    fn escalated(self) -> Self {
        match self {
            Self::Running => Self::Graceful,
            Self::Graceful | Self::Immediate => Self::Immediate,
        }
    }
}

#[derive(Debug)]
struct ShutdownState {
    /// A [`ShutdownLevel`] as `u8`.
    level: AtomicU8,
    /// When the first request came in (the grace period counts from it).
    since: Mutex<Option<Instant>>,
}

impl Default for ShutdownState {
    fn default() -> Self {
        Self {
            level: AtomicU8::new(ShutdownLevel::Running as u8),
            since: Mutex::new(None),
        }
    }
}

/// Asks a worker to stop; cheap to clone, usable from a signal-handling thread.
#[derive(Debug, Clone, Default)]
pub struct ShutdownHandle(Arc<ShutdownState>);

impl ShutdownHandle {
    /// A handle for a worker that has not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Escalates one level (running → graceful → immediate) and returns the new level.
    pub fn request(&self) -> ShutdownLevel {
        let old = self
            .0
            .level
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                Some(ShutdownLevel::from_u8(l).escalated() as u8)
            })
            .map_or(ShutdownLevel::Immediate, ShutdownLevel::from_u8);
        if old == ShutdownLevel::Running {
            if let Ok(mut since) = self.0.since.lock() {
                *since = Some(Instant::now());
            }
        }
        self.level()
    }

    /// Stops at once (cancels the running task).
    pub fn stop_now(&self) {
        if let Ok(mut since) = self.0.since.lock() {
            since.get_or_insert_with(Instant::now);
        }
        self.0
            .level
            .store(ShutdownLevel::Immediate as u8, Ordering::SeqCst);
    }

    /// The current level.
    pub fn level(&self) -> ShutdownLevel {
        ShutdownLevel::from_u8(self.0.level.load(Ordering::SeqCst))
    }

    /// When the first stop request came in.
    pub(crate) fn since(&self) -> Option<Instant> {
        self.0.since.lock().ok().and_then(|s| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_escalate_and_stop() {
        let h = ShutdownHandle::new();
        assert_eq!(h.level(), ShutdownLevel::Running);
        assert!(h.since().is_none());
        assert_eq!(h.request(), ShutdownLevel::Graceful);
        let since = h.since().unwrap();
        assert_eq!(h.request(), ShutdownLevel::Immediate);
        assert_eq!(h.request(), ShutdownLevel::Immediate);
        assert_eq!(
            h.since(),
            Some(since),
            "the grace period counts from the first request"
        );
        let h = ShutdownHandle::new();
        h.stop_now();
        assert_eq!(
            (h.level(), h.since().is_some()),
            (ShutdownLevel::Immediate, true)
        );
    }
}
