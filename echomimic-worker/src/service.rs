//! Starting, running and stopping the worker: the threads and the state they share.
//!
//! ```text
//!            BLMOVE                  rendezvous               frames (bounded)
//!  Redis ──────────────▶ fetcher ──────────────▶ inference ───────────────────▶ finisher
//!  queue   (claim, download,       (owns the engine,         (encode + mux,
//!           face, audio checks)     progress per UNet call)    upload, outcome)
//!                 │                         │                        │
//!                 └──── events, outcomes ───┴──────── bounded ───────┴──▶ reporter ──▶ Redis
//!                                                                        (publish, record)
//!  heartbeat: lease + gpu_status every TTL/3 and on busy/idle changes
//! ```
//!
//! Start-up: take the lease (or refuse with [`WorkerError::LeaseHeld`]), start the heartbeat,
//! load and warm the model, requeue what the processing list still holds from a previous run
//! (counting an attempt), then serve.
//!
//! Stopping ([`ShutdownHandle::request`]): the first request stops claiming and requeues a
//! prepared task that has not started; the running task may finish within the grace period,
//! after which it is cancelled between two UNet calls and requeued as it was (no `failed`
//! event, attempt not counted). A second request cancels at once. When the threads are done,
//! the reporter records what is left (it waits for Redis up to a deadline), and the heartbeat
//! deletes the status key and releases the lease.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use echomimic_pipeline::video::{probe_ffmpeg, EncoderBackend};
use echomimic_tempfile::{ClientConfig, TempfileClient};

use crate::config::{Encoder, WorkerConfig};
use crate::engine::Engine;
use crate::error::WorkerError;
use crate::fetcher::Fetcher;
use crate::finisher::Finisher;
use crate::inference::Inference;
use crate::job::{Claim, Policy};
use crate::redis_link::{RedisLink, RetryEnd};
use crate::store::{owner_id, Keys, OutcomeKind, OutcomeRecord, Recorded};
use crate::{heartbeat, reporter};

/// How far a stop request has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ShutdownLevel {
    /// Serving.
    Running,
    /// No new claims; the running task may finish within the grace period.
    Graceful,
    /// The running task is cancelled between UNet calls and requeued.
    Immediate,
}

#[derive(Debug, Default)]
struct ShutdownState {
    level: AtomicU8,
    since: Mutex<Option<Instant>>,
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
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| Some((l + 1).min(2)))
            .unwrap_or(2);
        if old == 0 {
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
        self.0.level.store(2, Ordering::SeqCst);
    }

    /// The current level.
    pub fn level(&self) -> ShutdownLevel {
        match self.0.level.load(Ordering::SeqCst) {
            0 => ShutdownLevel::Running,
            1 => ShutdownLevel::Graceful,
            _ => ShutdownLevel::Immediate,
        }
    }

    fn since(&self) -> Option<Instant> {
        self.0.since.lock().ok().and_then(|s| *s)
    }
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
    /// Leftovers of a previous run found at start-up.
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
    recovered: AtomicU64,
}

/// State shared by the worker's threads.
pub(crate) struct Shared {
    shutdown: ShutdownHandle,
    /// `worker_lease:{gpu}`, for error messages.
    lease_key: String,
    /// The engine's cancel flag.
    pub(crate) cancel: AtomicBool,
    ready: AtomicBool,
    inflight: AtomicUsize,
    heartbeat_stop: AtomicBool,
    reporter_deadline: Mutex<Option<Instant>>,
    fatal: Mutex<Option<WorkerError>>,
    wake: Sender<()>,
    counters: Counters,
}

impl Shared {
    /// No more claims.
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.level() >= ShutdownLevel::Graceful
    }

    /// The running task must stop.
    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    fn wake_heartbeat(&self) {
        let _ = self.wake.try_send(());
    }

    /// A claim was made: busy until its outcome is recorded.
    pub(crate) fn claimed(&self) {
        self.counters.claimed.fetch_add(1, Ordering::Relaxed);
        if self.inflight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.wake_heartbeat();
        }
    }

    fn settle(&self) {
        let prev = self
            .inflight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if prev == 1 {
            self.wake_heartbeat();
        }
    }

    /// Called by the reporter once an outcome is in Redis.
    pub(crate) fn outcome_recorded(&self, record: &OutcomeRecord, recorded: Recorded) {
        if recorded == Recorded::LeaseLost {
            tracing::error!(claim = %record.claim_id, "outcome not recorded: another worker holds the lease");
            self.fatal(WorkerError::LeaseLost {
                key: self.lease_key.clone(),
                owner: None,
            });
            self.settle();
            return;
        }
        let c = &self.counters;
        let counter = match record.what {
            OutcomeKind::Completed => &c.completed,
            OutcomeKind::Failed => &c.failed,
            OutcomeKind::DeadLettered => &c.dead_lettered,
            OutcomeKind::Retried => &c.retried,
            OutcomeKind::Released => &c.released,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let task_id = record.event.as_ref().map(|e| e.task_id.as_str());
        tracing::info!(
            claim = %record.claim_id,
            task_id = task_id.unwrap_or("-"),
            outcome = record.what.as_str(),
            code = record.event.as_ref().and_then(|e| e.code).map(|c| c.as_str()).unwrap_or("-"),
            "outcome recorded"
        );
        self.settle();
    }

    /// Called by the reporter when Redis refused an outcome for good.
    pub(crate) fn outcome_abandoned(&self, _record: &OutcomeRecord) {
        self.settle();
    }

    /// A condition that ends the worker (lease lost).
    pub(crate) fn fatal(&self, e: WorkerError) {
        if let Ok(mut f) = self.fatal.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
        self.cancel.store(true, Ordering::SeqCst);
        self.shutdown.stop_now();
    }

    pub(crate) fn reporter_gives_up(&self) -> bool {
        self.reporter_deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|d| Instant::now() >= d)
    }

    pub(crate) fn heartbeat_should_stop(&self) -> bool {
        self.heartbeat_stop.load(Ordering::SeqCst)
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            claimed: l(&c.claimed),
            completed: l(&c.completed),
            failed: l(&c.failed),
            dead_lettered: l(&c.dead_lettered),
            retried: l(&c.retried),
            released: l(&c.released),
            recovered: l(&c.recovered),
        }
    }
}

/// The encoder to use, decided once at start: `ffmpeg` must be present when asked for; `auto`
/// falls back to the built-in encoder with a warning.
fn resolve_encoder(choice: Encoder) -> Result<EncoderBackend, WorkerError> {
    match choice {
        Encoder::Builtin => Ok(EncoderBackend::Builtin),
        Encoder::Ffmpeg => match probe_ffmpeg(None) {
            Ok(info) => {
                tracing::info!(ffmpeg = %info.binary.display(), version = %info.version, "encoder: ffmpeg");
                Ok(EncoderBackend::Ffmpeg)
            }
            Err(e) => Err(WorkerError::Config(format!(
                "--encoder ffmpeg: {e}; install ffmpeg (e.g. `apt-get install ffmpeg`) or use --encoder builtin"
            ))),
        },
        Encoder::Auto => match probe_ffmpeg(None) {
            Ok(info) => {
                tracing::info!(ffmpeg = %info.binary.display(), version = %info.version, "encoder: ffmpeg");
                Ok(EncoderBackend::Ffmpeg)
            }
            Err(e) => {
                tracing::warn!(error = %e, "ffmpeg is not usable: videos are encoded with the built-in encoder (H.264 Constrained Baseline + Opus audio); install ffmpeg for H.264 High + AAC");
                Ok(EncoderBackend::Builtin)
            }
        },
    }
}

/// A running worker. Dropping it stops it at once and joins its threads.
pub struct Worker {
    shared: Arc<Shared>,
    grace: Duration,
    workers: Vec<(&'static str, JoinHandle<()>)>,
    reporter: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    reporter_drain: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

fn spawn(
    name: &'static str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, WorkerError> {
    std::thread::Builder::new()
        .name(format!("echomimic-{name}"))
        .spawn(f)
        .map_err(|e| WorkerError::Internal(format!("cannot start the {name} thread: {e}")))
}

impl Worker {
    /// Starts a worker: takes the lease, loads the engine with `load` (while the lease is kept
    /// alive), warms it up, recovers leftovers and starts serving. `shutdown` may be requested
    /// at any time, also during start-up.
    pub fn start<E: Engine>(
        config: WorkerConfig,
        shutdown: ShutdownHandle,
        load: impl FnOnce() -> Result<E, WorkerError>,
    ) -> Result<Worker, WorkerError> {
        let encoder = resolve_encoder(config.encoder)?;
        config.ensure_temp_dir()?;
        let client = config.redis.client()?;
        let http = TempfileClient::with_config(ClientConfig {
            connect_timeout: config.http_connect_timeout,
            retry: config.http_retry.clone(),
            token: config.tempfile_token.clone(),
            ..ClientConfig::new(config.base_url.clone())
        })
        .map_err(|e| WorkerError::Config(format!("BASE_URL: {e}")))?;
        let keys = Keys {
            owner: owner_id(),
            queue: config.queue.clone(),
            processing: echomimic_protocol::keys::processing_list(config.gpu_id),
            lease: echomimic_protocol::keys::worker_lease(config.gpu_id),
            status: echomimic_protocol::keys::gpu_status(config.gpu_id),
            channel: config.channel.clone(),
            schema: config.schema,
            lease_ttl: config.lease_ttl,
            status_ttl: config.status_ttl,
            event_ttl: config.event_ttl,
            result_ttl: config.result_ttl,
        };
        let policy = Policy {
            max_attempts: config.max_attempts,
            gpu_id: config.gpu_id,
            queue: config.queue.clone(),
        };
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            shutdown: shutdown.clone(),
            lease_key: keys.lease.clone(),
            cancel: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            heartbeat_stop: AtomicBool::new(false),
            reporter_deadline: Mutex::new(None),
            fatal: Mutex::new(None),
            wake: wake_tx,
            counters: Counters::default(),
        });
        let stopped = || shutdown.level() > ShutdownLevel::Running;

        // 1. The lease (waiting for Redis if it is not up yet).
        let mut link = RedisLink::new(client.clone(), "start-up", Duration::from_secs(10));
        tracing::info!(redis = %config.redis.describe(), lease = %keys.lease, owner = %keys.owner, "taking the lease");
        let taken = link
            .run_retrying(stopped, |con| keys.acquire_lease(con))
            .map_err(|e| match e {
                RetryEnd::GaveUp(_) => WorkerError::Cancelled,
                RetryEnd::Failed(e) => WorkerError::Redis(e),
            })?;
        if let Err((owner, ttl_secs)) = taken {
            return Err(WorkerError::LeaseHeld {
                gpu_id: config.gpu_id,
                key: keys.lease.clone(),
                owner,
                ttl_secs,
            });
        }
        let mut worker = Worker {
            shared: shared.clone(),
            grace: config.grace,
            workers: Vec::new(),
            reporter: None,
            heartbeat: None,
            reporter_drain: config.grace + Duration::from_secs(30),
        };
        {
            let link = RedisLink::new(client.clone(), "heartbeat", Duration::from_secs(10));
            let (keys, shared) = (keys.clone(), shared.clone());
            let interval = config.heartbeat_interval();
            worker.heartbeat = Some(spawn("heartbeat", move || {
                heartbeat::run(link, keys, shared, interval, wake_rx)
            })?);
        }

        // 2. The model (dropping `worker` on error releases the lease).
        let t = Instant::now();
        let mut engine = load()?;
        tracing::info!(engine = %engine.describe(), secs = t.elapsed().as_secs_f64(), "model loaded");
        let t = Instant::now();
        engine.warm_up()?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "model warmed up");
        if stopped() {
            return Err(WorkerError::Cancelled);
        }

        // 3. Leftovers of a previous run.
        let gave_up = |e: RetryEnd| match e {
            RetryEnd::GaveUp(_) => WorkerError::Cancelled,
            RetryEnd::Failed(e) => WorkerError::Redis(e),
        };
        let leftovers = link
            .run_retrying(stopped, |con| keys.leftovers(con))
            .map_err(gave_up)?;
        for raw in leftovers.into_iter().rev() {
            let claim = Claim::new(raw);
            let record = policy.recovered(&claim);
            tracing::warn!(
                attempts = claim.item.attempts() + 1,
                outcome = record.what.as_str(),
                "found a task interrupted by a previous run"
            );
            let recorded = link
                .run_retrying(stopped, |con| keys.record(con, &record))
                .map_err(gave_up)?;
            if recorded == Recorded::LeaseLost {
                return Err(WorkerError::LeaseLost {
                    key: keys.lease.clone(),
                    owner: None,
                });
            }
            shared.counters.recovered.fetch_add(1, Ordering::Relaxed);
        }
        drop(link);

        // 4. Serve.
        let (reporter_handle, reporter_rx) = reporter::channel();
        {
            let link = RedisLink::new(client.clone(), "reporter", Duration::from_secs(10));
            let (keys, shared) = (keys.clone(), shared.clone());
            worker.reporter = Some(spawn("reporter", move || {
                reporter::run(link, keys, reporter_rx, shared)
            })?);
        }
        let (job_tx, job_rx) = crossbeam_channel::bounded(0);
        let (finish_tx, finish_rx) = crossbeam_channel::bounded(1);
        let frame_size = engine.frame_size();
        let finisher = Finisher {
            http: http.clone(),
            reporter: reporter_handle.clone(),
            policy: policy.clone(),
            geometry: config.geometry,
            encoder,
            frame_size,
        };
        worker.workers.push((
            "finisher",
            spawn("finisher", move || finisher.run(finish_rx))?,
        ));
        let preparer = engine.preparer();
        let inference = Inference {
            engine,
            shared: shared.clone(),
            reporter: reporter_handle.clone(),
            policy: policy.clone(),
        };
        worker.workers.push((
            "inference",
            spawn("inference", move || inference.run(job_rx, finish_tx))?,
        ));
        let fetcher = Fetcher {
            link: RedisLink::new(
                client,
                "claim",
                config.claim_timeout + Duration::from_secs(10),
            ),
            keys,
            preparer,
            shared: shared.clone(),
            reporter: reporter_handle,
            policy,
            http,
            temp_dir: config.temp_dir.clone(),
            max_download_bytes: config.max_download_bytes,
            max_audio_secs: config.max_audio_secs,
            defaults: config.defaults,
            prefetch: config.prefetch,
            claim_timeout: config.claim_timeout,
            jobs: job_tx,
        };
        worker
            .workers
            .push(("fetcher", spawn("fetcher", move || fetcher.run())?));
        shared.ready.store(true, Ordering::SeqCst);
        shared.wake_heartbeat();
        tracing::info!(
            queue = %config.queue,
            channel = %config.channel,
            gpu_id = config.gpu_id,
            variant = %config.variant,
            steps = config.defaults.steps,
            cfg = config.defaults.cfg,
            max_attempts = config.max_attempts,
            "serving"
        );
        Ok(worker)
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// True while nothing is claimed.
    pub fn is_idle(&self) -> bool {
        self.shared.inflight() == 0
    }

    /// A handle to stop this worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shared.shutdown.clone()
    }

    /// Blocks until the worker has stopped (after a [`ShutdownHandle::request`] or a fatal
    /// error), enforcing the grace period. Returns the counters, or the fatal error.
    pub fn join(mut self) -> Result<Stats, WorkerError> {
        self.wait();
        let fatal = self.shared.fatal.lock().ok().and_then(|mut f| f.take());
        match fatal {
            Some(e) => Err(e),
            None => Ok(self.shared.stats()),
        }
    }

    fn wait(&mut self) {
        // Supervise: cancel the running task when the grace period is over.
        while self.workers.iter().any(|(_, h)| !h.is_finished()) {
            let shutdown = &self.shared.shutdown;
            // After the grace period, cancel once the fetcher has stopped claiming, so the
            // requeued task is not claimed again by this worker's last `BLMOVE`; a second
            // signal cancels at once.
            let fetcher_done = self
                .workers
                .iter()
                .find(|(name, _)| *name == "fetcher")
                .is_none_or(|(_, h)| h.is_finished());
            let cancel = match (shutdown.level(), shutdown.since()) {
                (ShutdownLevel::Immediate, _) => true,
                (ShutdownLevel::Graceful, Some(since)) => {
                    since.elapsed() >= self.grace && fetcher_done
                }
                _ => false,
            };
            if cancel && !self.shared.cancelled() {
                tracing::info!("cancelling the running task (it will be requeued)");
                self.shared.cancel.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (name, h) in self.workers.drain(..) {
            if h.join().is_err() {
                tracing::error!(thread = name, "thread panicked");
            }
        }
        if let Ok(mut d) = self.shared.reporter_deadline.lock() {
            *d = Some(Instant::now() + self.reporter_drain);
        }
        if let Some(h) = self.reporter.take() {
            if h.join().is_err() {
                tracing::error!("reporter thread panicked");
            }
        }
        self.shared.heartbeat_stop.store(true, Ordering::SeqCst);
        self.shared.wake_heartbeat();
        if let Some(h) = self.heartbeat.take() {
            if h.join().is_err() {
                tracing::error!("heartbeat thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.heartbeat.is_some() || self.reporter.is_some() || !self.workers.is_empty() {
            self.shared.shutdown.stop_now();
            self.reporter_drain = Duration::from_secs(5);
            self.wait();
        }
    }
}
