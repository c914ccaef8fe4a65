//! The state the worker's threads share ([`Shared`]) and the counters it keeps ([`Stats`]).
//!
//! Every thread holds an `Arc<Shared>`; none of them holds another thread's type. This module
//! sits below all of them: it imports only the leaf modules [`crate::shutdown`],
//! [`crate::error`], [`crate::metrics`] and [`crate::store`] (none of which import anything
//! of this crate), and the [`crate::engine`] boundary's probe type.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use echomimic_protocol::QueueItem;

use crate::engine::MemoryProbe;
use crate::error::WorkerError;
use crate::metrics::Metrics;
use crate::shutdown::{ShutdownHandle, ShutdownLevel};
use crate::store::{OutcomeKind, OutcomeRecord, Recorded};

/// Cancellation requests ([`echomimic_protocol::keys::task_cancel`]) seen by this worker, and
/// the task on the model, under one lock so a request cannot miss the run it is for nor hit
/// the next one.
#[derive(Default)]
struct Cancels {
    requested: HashSet<String>,
    running: Option<String>,
}

/// Counters of a worker's outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Items claimed.
    pub claimed: u64,
    /// `completed` recorded.
    pub completed: u64,
    /// `failed` recorded (each also dead-lettered).
    pub failed: u64,
    /// Dead-lettered without an event (no usable task id).
    pub dead_lettered: u64,
    /// Requeued for another attempt.
    pub retried: u64,
    /// Requeued uncounted because the worker was stopping.
    pub released: u64,
    /// Cancelled on request (`failed` with the code `cancelled`, not dead-lettered).
    pub cancelled: u64,
    /// Put aside uncounted while the temp-file API was down (the queue's delayed set).
    pub deferred: u64,
    /// Leftovers of a previous run found at start-up, and orphans requeued by the sweep.
    pub recovered: u64,
}

#[derive(Default)]
struct Counters {
    claimed: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    dead_lettered: AtomicU64,
    retried: AtomicU64,
    released: AtomicU64,
    cancelled: AtomicU64,
    deferred: AtomicU64,
    recovered: AtomicU64,
}

/// A claim in flight: its id (the outcome marker's key) and its raw item.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) claim: Arc<str>,
    pub(crate) raw: Vec<u8>,
}

/// The claim on the model, and the last time the model reported progress on it.
#[derive(Debug, Clone)]
pub(crate) struct ModelBeat {
    pub(crate) held: Held,
    pub(crate) last: Instant,
}

/// State shared by the worker's threads.
pub(crate) struct Shared {
    shutdown: ShutdownHandle,
    /// `worker_lease:{gpu}`, for error messages.
    lease_key: String,
    /// Set by a stop (grace period over, second signal, fatal error): the running task must
    /// stop and be requeued. Never cleared.
    cancel: AtomicBool,
    /// The engine's cancel flag for the run in progress: set by a stop, or by a cancellation
    /// request for that run's task; reset when the next run starts.
    pub(crate) run_cancel: AtomicBool,
    cancels: Mutex<Cancels>,
    /// The worker's metrics.
    pub(crate) metrics: Metrics,
    /// The accelerator's memory, once the model is loaded (CUDA only).
    memory_probe: Mutex<Option<MemoryProbe>>,
    ready: AtomicBool,
    inflight: AtomicUsize,
    /// The claims in flight (their raw items form a multiset), so a sweep can tell an item in
    /// the processing list that this worker never received (a `BLMOVE` reply lost) from its
    /// own, and a stop that gives up on a stuck thread can requeue what it held.
    held: Mutex<Vec<Held>>,
    /// The claim on the model and when it last made progress (the watchdog's view).
    model: Mutex<Option<ModelBeat>>,
    /// Set when the supervisor leaves stuck threads behind: the reporter then ends once its
    /// queue is empty instead of waiting for their senders to go.
    reporter_closed: AtomicBool,
    heartbeat_stop: AtomicBool,
    /// The first thread that panicked.
    died: Mutex<Option<&'static str>>,
    reporter_deadline: Mutex<Option<Instant>>,
    fatal: Mutex<Option<WorkerError>>,
    /// Wakes the heartbeat thread (busy/idle changes, shutdown).
    wake: Sender<()>,
    counters: Counters,
}

impl Shared {
    /// The state of a worker that is starting: not ready, nothing in flight.
    pub(crate) fn new(shutdown: ShutdownHandle, lease_key: String, wake: Sender<()>) -> Self {
        Shared {
            shutdown,
            lease_key,
            cancel: AtomicBool::new(false),
            run_cancel: AtomicBool::new(false),
            cancels: Mutex::new(Cancels::default()),
            metrics: Metrics::new(),
            memory_probe: Mutex::new(None),
            ready: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            held: Mutex::new(Vec::new()),
            model: Mutex::new(None),
            reporter_closed: AtomicBool::new(false),
            heartbeat_stop: AtomicBool::new(false),
            died: Mutex::new(None),
            reporter_deadline: Mutex::new(None),
            fatal: Mutex::new(None),
            wake,
            counters: Counters::default(),
        }
    }

    /// The worker's stop handle.
    pub(crate) fn shutdown(&self) -> &ShutdownHandle {
        &self.shutdown
    }

    /// No more claims.
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.level() >= ShutdownLevel::Graceful
    }

    /// The running task must stop.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Cancels the running task (between two UNet calls) for a stop: it is requeued.
    pub(crate) fn cancel_task(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.run_cancel.store(true, Ordering::SeqCst);
    }

    /// A cancellation was requested for `task_id` (seen in Redis). Stops its run when it is
    /// the one on the model; true when this is news.
    pub(crate) fn request_cancel(&self, task_id: &str) -> bool {
        let Ok(mut c) = self.cancels.lock() else {
            return false;
        };
        if c.running.as_deref() == Some(task_id) {
            self.run_cancel.store(true, Ordering::SeqCst);
        }
        c.requested.insert(task_id.to_owned())
    }

    /// True when a cancellation was requested for `task_id`.
    pub(crate) fn cancel_requested(&self, task_id: &str) -> bool {
        self.cancels
            .lock()
            .map(|c| c.requested.contains(task_id))
            .unwrap_or(false)
    }

    /// The accelerator's memory reader, set once the model is loaded.
    pub(crate) fn set_memory_probe(&self, probe: Option<MemoryProbe>) {
        if let Ok(mut p) = self.memory_probe.lock() {
            *p = probe;
        }
    }

    /// The accelerator's memory in use, when the model runs on one that can say.
    pub(crate) fn memory_in_use(&self) -> Option<u64> {
        let probe = self.memory_probe.lock().ok()?.clone()?;
        probe()
    }

    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Start-up is over: the heartbeat reports `idle`/`busy` from now on.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
        self.wake_heartbeat();
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    pub(crate) fn wake_heartbeat(&self) {
        let _ = self.wake.try_send(());
    }

    /// Claim `claim` of `raw` was made: busy until its outcome is recorded.
    pub(crate) fn claimed(&self, claim: &Arc<str>, raw: &[u8]) {
        if let Ok(mut held) = self.held.lock() {
            held.push(Held {
                claim: claim.clone(),
                raw: raw.to_vec(),
            });
        }
        self.counters.claimed.fetch_add(1, Ordering::Relaxed);
        if self.inflight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.wake_heartbeat();
        }
    }

    /// A leftover of a previous run was dealt with at start-up.
    pub(crate) fn recovered(&self) {
        self.counters.recovered.fetch_add(1, Ordering::Relaxed);
    }

    /// True while a claim of this exact item is in flight here.
    pub(crate) fn holds(&self, raw: &[u8]) -> bool {
        self.held
            .lock()
            .map(|held| held.iter().any(|h| h.raw == raw))
            .unwrap_or(true)
    }

    /// The claims in flight now.
    pub(crate) fn held(&self) -> Vec<Held> {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// The claim's outcome is in: not in flight any more. False when it was not held (settled
    /// before, or an item this worker never claimed, such as a sweep's recovery).
    fn settle(&self, claim: &str, raw: &[u8]) -> bool {
        if let Ok(mut held) = self.held.lock() {
            let at = held
                .iter()
                .position(|h| &*h.claim == claim)
                .or_else(|| held.iter().position(|h| h.raw == raw));
            match at {
                Some(i) => {
                    held.swap_remove(i);
                }
                None => return false,
            }
        }
        let prev = self
            .inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if prev == 1 {
            self.wake_heartbeat();
        }
        true
    }

    /// Called by the reporter once an outcome is in Redis.
    pub(crate) fn outcome_recorded(&self, record: &OutcomeRecord, recorded: Recorded) {
        if recorded == Recorded::LeaseLost {
            tracing::error!(claim = %record.claim_id, "outcome not recorded: another worker holds the lease");
            self.fatal(WorkerError::LeaseLost {
                key: self.lease_key.clone(),
                owner: None,
            });
            self.settle(&record.claim_id, &record.raw);
            return;
        }
        if recorded == Recorded::ClaimGone {
            tracing::error!(claim = %record.claim_id, outcome = record.what.as_str(),
                "outcome not recorded: the item is no longer in the processing list (recovered by another worker)");
            self.settle(&record.claim_id, &record.raw);
            return;
        }
        let held = self.settle(&record.claim_id, &record.raw);
        // Whatever the outcome, a cancellation request seen for this task is dealt with (a
        // requeued task's request is still in Redis and is seen again at its next claim).
        let task_id = match &record.event {
            Some(e) => Some(e.task_id.clone()),
            None => QueueItem::parse(&record.raw).task_id().map(str::to_owned),
        };
        if let (Some(id), Ok(mut c)) = (&task_id, self.cancels.lock()) {
            c.requested.remove(id);
        }
        if recorded == Recorded::AlreadyApplied && !held {
            // A second outcome for a claim already settled here (the supervisor requeued
            // what a stuck thread held, and the thread answered after all): counted once.
            return;
        }
        let c = &self.counters;
        let counter = match record.what {
            OutcomeKind::Completed => &c.completed,
            OutcomeKind::Failed => &c.failed,
            OutcomeKind::DeadLettered => &c.dead_lettered,
            OutcomeKind::Retried => &c.retried,
            OutcomeKind::Released => &c.released,
            OutcomeKind::Cancelled => &c.cancelled,
            OutcomeKind::Deferred => &c.deferred,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let outcome = match record.what {
            OutcomeKind::Completed => "completed",
            OutcomeKind::Failed | OutcomeKind::DeadLettered | OutcomeKind::Cancelled => "failed",
            OutcomeKind::Retried | OutcomeKind::Released | OutcomeKind::Deferred => "requeued",
        };
        self.metrics.task(
            outcome,
            record.code.map(|c| c.as_str()).unwrap_or("none"),
            record.what == OutcomeKind::Retried,
            record.dead_letter.is_some(),
        );
        let task_id = record.event.as_ref().map(|e| e.task_id.as_str());
        tracing::info!(
            claim = %record.claim_id,
            task_id = task_id.unwrap_or("-"),
            outcome = record.what.as_str(),
            code = record.event.as_ref().and_then(|e| e.code).map(|c| c.as_str()).unwrap_or("-"),
            "outcome recorded"
        );
    }

    /// The model starts on a claim.
    ///
    /// The run's cancel flag starts set when the worker is stopping or a cancellation of
    /// `task_id` was already requested.
    pub(crate) fn model_started(&self, claim: &Arc<str>, raw: &[u8], task_id: &str) {
        if let Ok(mut c) = self.cancels.lock() {
            c.running = Some(task_id.to_owned());
            let cancel = self.cancelled() || c.requested.contains(task_id);
            self.run_cancel.store(cancel, Ordering::SeqCst);
        }
        if let Ok(mut m) = self.model.lock() {
            *m = Some(ModelBeat {
                held: Held {
                    claim: claim.clone(),
                    raw: raw.to_vec(),
                },
                last: Instant::now(),
            });
        }
    }

    /// The model made progress (a UNet call, a decoded frame).
    pub(crate) fn model_progress(&self) {
        if let Ok(mut m) = self.model.lock() {
            if let Some(beat) = m.as_mut() {
                beat.last = Instant::now();
            }
        }
    }

    /// The model is done with its claim.
    pub(crate) fn model_done(&self) {
        if let Ok(mut c) = self.cancels.lock() {
            c.running = None;
        }
        if let Ok(mut m) = self.model.lock() {
            *m = None;
        }
    }

    /// The claim on the model and its last progress, if one is running.
    pub(crate) fn model_beat(&self) -> Option<ModelBeat> {
        self.model.lock().ok().and_then(|m| m.clone())
    }

    /// Tells the reporter to end once what it has been sent is recorded.
    pub(crate) fn close_reporter(&self) {
        self.reporter_closed.store(true, Ordering::SeqCst);
    }

    pub(crate) fn reporter_closed(&self) -> bool {
        self.reporter_closed.load(Ordering::SeqCst)
    }

    /// A condition that ends the worker (lease lost).
    pub(crate) fn fatal(&self, e: WorkerError) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.cancel_task();
        self.shutdown.stop_now();
    }

    /// Records that thread `name` panicked (the first one is kept).
    pub(crate) fn thread_died(&self, name: &'static str) {
        if let Ok(mut d) = self.died.lock() {
            d.get_or_insert(name);
        }
    }

    /// The first thread that panicked, if one did.
    pub(crate) fn died(&self) -> Option<&'static str> {
        self.died.lock().ok().and_then(|d| *d)
    }

    /// The error that ended the worker, if one did.
    pub(crate) fn take_fatal(&self) -> Option<WorkerError> {
        self.fatal.lock().ok().and_then(|mut f| f.take())
    }

    /// From `deadline` on, the reporter gives up on an unreachable Redis.
    pub(crate) fn set_reporter_deadline(&self, deadline: Instant) {
        if let Ok(mut d) = self.reporter_deadline.lock() {
            *d = Some(deadline);
        }
    }

    pub(crate) fn reporter_gives_up(&self) -> bool {
        self.reporter_deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|d| Instant::now() >= d)
    }

    /// Tells the heartbeat to release its keys and end.
    pub(crate) fn stop_heartbeat(&self) {
        self.heartbeat_stop.store(true, Ordering::SeqCst);
        self.wake_heartbeat();
    }

    pub(crate) fn heartbeat_should_stop(&self) -> bool {
        self.heartbeat_stop.load(Ordering::SeqCst)
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            claimed: l(&c.claimed),
            completed: l(&c.completed),
            failed: l(&c.failed),
            dead_lettered: l(&c.dead_lettered),
            retried: l(&c.retried),
            released: l(&c.released),
            cancelled: l(&c.cancelled),
            deferred: l(&c.deferred),
            recovered: l(&c.recovered),
        }
    }
}
