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
//! Start-up: sweep task folders of dead processes, take the lease (from a dead predecessor on
//! this host at once, after waiting out an unrefreshed one, or refuse with
//! [`WorkerError::LeaseHeld`] when its holder is alive), start the heartbeat, load and warm the
//! model, requeue what the processing list still holds from a previous run (counting an
//! attempt for the items that run was working on), then serve.
//!
//! Stopping ([`ShutdownHandle::request`]): the first request stops claiming and requeues a
//! prepared task that has not started; the running task may finish within the grace period,
//! after which it is cancelled between two UNet calls and requeued as it was (no `failed`
//! event, attempt not counted). A second request cancels at once. When the threads are done,
//! the reporter records what is left (it waits for Redis up to a deadline), and the heartbeat
//! deletes the status key and releases the lease.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use echomimic_pipeline::video::{resolve_backend, EncoderBackend};
use echomimic_protocol::QueueItem;
use echomimic_tempfile::{ClientConfig, TempfileClient};

use crate::canceller::Canceller;
use crate::config::WorkerConfig;
use crate::engine::Engine;
use crate::error::WorkerError;
use crate::fetcher::{sweep_dead_task_dirs, Fetcher, OutputLimits};
use crate::finisher::Finisher;
use crate::health::{HealthServer, Probe};
use crate::inference::Inference;
use crate::job::{Claim, OutageWait, Policy};
use crate::outbox::{self, Outbox};
use crate::redis_link::{sleep_unless, RedisLink};
use crate::reporter::ReporterHandle;
use crate::shutdown::{ShutdownHandle, ShutdownLevel};
use crate::state::{Shared, Stats};
use crate::store::{host_name, owner_host_pid, owner_id, process_alive, Keys};
use crate::sweeper::{recover_leftovers, Sweeper};
use crate::{heartbeat, reporter};

/// The encoder, decided once at start by the library's one rule
/// ([`resolve_backend`]): `ffmpeg` must be present when asked for; `auto` falls back to the
/// built-in encoder with a warning.
fn resolve_encoder(choice: EncoderBackend) -> Result<EncoderBackend, WorkerError> {
    match resolve_backend(choice, None) {
        Ok(kind) => {
            tracing::info!(encoder = %kind, "video encoder");
            Ok(kind.into())
        }
        Err(e) => Err(WorkerError::Config(format!(
            "--encoder {choice}: {e}; install ffmpeg (e.g. `apt-get install ffmpeg`) or use --encoder builtin"
        ))),
    }
}

/// A running worker. Dropping it stops it at once and joins its threads.
pub struct Worker {
    shared: Arc<Shared>,
    grace: Duration,
    /// Time the threads get after the running task was cancelled.
    stop_timeout: Duration,
    /// Longest time without model progress.
    watchdog: Option<Duration>,
    workers: Vec<(&'static str, JoinHandle<()>)>,
    reporter: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    reporter_drain: Duration,
    /// How the supervisor records outcomes for claims it takes from stuck threads (set once
    /// serving).
    outcomes: Option<(ReporterHandle, Policy)>,
    /// Claims the supervisor has already recorded an outcome for.
    settled_here: Vec<Arc<str>>,
    /// `--metrics-listen`: stopped last, so probes answer until the worker is gone.
    health: Option<HealthServer>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("stats", &self.shared.stats())
            .finish_non_exhaustive()
    }
}

/// Starts a named thread. A panic in it is recorded in `died` (the first one wins) before the
/// thread ends, so the supervisor can name the thread that died rather than the ones that
/// ended after it.
fn spawn(
    name: &'static str,
    died: &Arc<Shared>,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, WorkerError> {
    let shared = died.clone();
    std::thread::Builder::new()
        .name(format!("echomimic-{name}"))
        .spawn(move || {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                shared.thread_died(name);
            }
        })
        .map_err(|e| WorkerError::Internal(format!("cannot start the {name} thread: {e}")))
}

/// What start-up builds from the configuration before it touches Redis.
struct Plan {
    client: redis::Client,
    http: TempfileClient,
    keys: Keys,
    policy: Policy,
    encoder: EncoderBackend,
    outbox: Outbox,
}

impl Plan {
    fn new(config: &WorkerConfig) -> Result<Plan, WorkerError> {
        let encoder = resolve_encoder(config.encoder)?;
        let swept = sweep_dead_task_dirs(config.ensure_temp_dir()?);
        if swept > 0 {
            tracing::warn!(folders = swept, temp_dir = %config.temp_dir.display(),
                "removed task folders left by workers that are gone");
        }
        let outbox = Outbox::new(&config.temp_dir);
        let stale = outbox.sweep(outbox::MAX_AGE);
        if stale > 0 {
            tracing::warn!(files = stale, "removed kept videos older than a day");
        }
        let client = config.redis.client()?;
        let http = TempfileClient::with_config(ClientConfig {
            connect_timeout: config.http_connect_timeout,
            retry: config.http_retry.clone(),
            transfer_deadline: config.http_deadline,
            token: config.tempfile_token.clone(),
            ..ClientConfig::new(config.base_url.clone())
        })
        .map_err(|e| WorkerError::Config(format!("BASE_URL: {e}")))?;
        let keys = Keys {
            owner: owner_id(),
            queue: config.queue.clone(),
            delayed: echomimic_protocol::keys::task_delayed(&config.queue),
            processing: echomimic_protocol::keys::processing_list(config.gpu_id),
            lease: echomimic_protocol::keys::worker_lease(config.gpu_id),
            status: echomimic_protocol::keys::gpu_status(config.gpu_id),
            active: echomimic_protocol::keys::worker_active(config.gpu_id),
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
            max_item_bytes: config.max_item_bytes,
            outage: OutageWait {
                delay: config.outage_delay,
                total: config.outage_total,
            },
        };
        Ok(Plan {
            client,
            http,
            keys,
            policy,
            encoder,
            outbox,
        })
    }

    fn link(&self, name: &'static str, read_timeout: Duration) -> RedisLink {
        RedisLink::new(self.client.clone(), name, read_timeout)
    }
}

/// Step 1 of start-up: the lease (waiting for Redis if it is not up yet).
///
/// When another worker's id holds it:
/// * a holder on this host whose process is gone (a crashed predecessor) is replaced at once;
/// * otherwise the lease is watched for up to its TTL plus a margin: a live holder refreshes
///   it (its TTL goes up), and this worker refuses with [`WorkerError::LeaseHeld`]; a dead one
///   lets it expire, and this worker takes it. So a supervisor's restart right after a crash
///   serves, and a second live worker on the same gpu id is still refused.
fn take_lease(
    link: &mut RedisLink,
    keys: &Keys,
    shared: &Shared,
    gpu_id: u32,
) -> Result<(), WorkerError> {
    let stopped = || shared.shutdown().level() > ShutdownLevel::Running;
    let held = |owner: String, ttl_ms: i64| WorkerError::LeaseHeld {
        gpu_id,
        key: keys.lease.clone(),
        owner,
        ttl_secs: if ttl_ms > 0 {
            (ttl_ms + 999) / 1000
        } else {
            ttl_ms
        },
    };
    // The holder being watched and its TTL at the last look.
    let mut watched: Option<(String, i64)> = None;
    let watch_end = Instant::now() + keys.lease_ttl + Duration::from_secs(5);
    let me = host_name();
    loop {
        let taken = link.run_retrying(stopped, |con| keys.acquire_lease(con))?;
        if taken.is_ok() {
            return Ok(());
        }
        let (owner, ttl_ms) = link.run_retrying(stopped, |con| keys.lease_state(con))?;
        let Some(owner) = owner else {
            continue; // expired between the two commands
        };
        if let Some((host, pid)) = owner_host_pid(&owner) {
            let dead = host == me && pid != std::process::id() && process_alive(pid) == Some(false);
            if dead {
                let took = link.run_retrying(stopped, |con| keys.take_over_lease(con, &owner))?;
                if took {
                    tracing::warn!(lease = %keys.lease, previous = %owner, pid,
                        "took over the lease of a worker that is gone (same host, its process no longer exists)");
                    return Ok(());
                }
                continue;
            }
        }
        if ttl_ms < 0 {
            // No expiry: not a worker's lease (set by hand?); never waits it out.
            return Err(held(owner, ttl_ms));
        }
        match &watched {
            Some((prev_owner, prev_ttl)) if *prev_owner == owner && ttl_ms > *prev_ttl + 250 => {
                return Err(held(owner, ttl_ms)); // refreshed: its worker is alive
            }
            Some((prev_owner, _)) if *prev_owner != owner => return Err(held(owner, ttl_ms)),
            Some(_) => {}
            None => tracing::warn!(lease = %keys.lease, holder = %owner, ttl_ms,
                "the lease is held by another worker id; waiting to see whether it is still alive"),
        }
        if Instant::now() >= watch_end {
            return Err(held(owner, ttl_ms));
        }
        watched = Some((owner, ttl_ms));
        if sleep_unless(Duration::from_millis(250), stopped) {
            return Err(WorkerError::Cancelled);
        }
    }
}

/// Step 2: the model, loaded and warmed up while the heartbeat keeps the lease.
fn load_engine<E: Engine>(
    load: impl FnOnce() -> Result<E, WorkerError>,
    shared: &Shared,
) -> Result<E, WorkerError> {
    let started = Instant::now();
    let mut engine = load()?;
    tracing::info!(engine = %engine.describe(), secs = started.elapsed().as_secs_f64(), "model loaded");
    let t = Instant::now();
    engine.warm_up()?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "model warmed up");
    let labels = engine.labels();
    shared.metrics.model_loaded(
        started.elapsed().as_secs_f64(),
        &labels.device,
        &labels.dtype,
        &labels.variant,
    );
    shared.set_memory_probe(engine.memory_probe());
    if shared.shutdown().level() > ShutdownLevel::Running {
        return Err(WorkerError::Cancelled);
    }
    Ok(engine)
}

fn start_heartbeat(
    plan: &Plan,
    config: &WorkerConfig,
    shared: &Arc<Shared>,
    wake: Receiver<()>,
) -> Result<JoinHandle<()>, WorkerError> {
    let link = plan.link("heartbeat", Duration::from_secs(10));
    let (keys, shared_here) = (plan.keys.clone(), shared.clone());
    let interval = config.heartbeat_interval();
    spawn("heartbeat", shared, move || {
        heartbeat::run(link, keys, shared_here, interval, wake)
    })
}

fn start_reporter(
    client: &redis::Client,
    keys: &Keys,
    shared: &Arc<Shared>,
    rx: Receiver<reporter::Report>,
) -> Result<JoinHandle<()>, WorkerError> {
    let link = RedisLink::new(client.clone(), "reporter", Duration::from_secs(10));
    let (keys, shared_here) = (keys.clone(), shared.clone());
    spawn("reporter", shared, move || {
        reporter::run(link, keys, rx, shared_here)
    })
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
        let plan = Plan::new(&config)?;
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared::new(shutdown, plan.keys.lease.clone(), wake_tx));
        // Probes answer from the start: live at once, ready once the model serves.
        let health = match config.metrics_listen {
            Some(addr) => Some(HealthServer::start(
                addr,
                shared.clone(),
                Probe {
                    client: plan.client.clone(),
                    queue: plan.keys.queue.clone(),
                    delayed: plan.keys.delayed.clone(),
                    processing: plan.keys.processing.clone(),
                    lease: plan.keys.lease.clone(),
                    owner: plan.keys.owner.clone(),
                },
            )?),
            None => None,
        };
        let mut link = plan.link("start-up", Duration::from_secs(10));
        tracing::info!(redis = %config.redis.describe(), lease = %plan.keys.lease, owner = %plan.keys.owner, "taking the lease");
        take_lease(&mut link, &plan.keys, &shared, config.gpu_id)?;
        // From here on, dropping `worker` (on an error) releases the lease.
        let mut worker = Worker {
            shared: shared.clone(),
            grace: config.grace,
            stop_timeout: config.stop_timeout,
            watchdog: config.watchdog,
            workers: Vec::new(),
            reporter: None,
            heartbeat: None,
            reporter_drain: config.grace + Duration::from_secs(30),
            outcomes: None,
            settled_here: Vec::new(),
            health,
        };
        worker.heartbeat = Some(start_heartbeat(&plan, &config, &shared, wake_rx)?);
        let engine = load_engine(load, &shared)?;
        // Say which queue this gpu id serves (sweepers of the same queue recover our list if
        // we die and nobody restarts us), then recover what a previous run left.
        let queue_key = echomimic_protocol::keys::worker_queue(config.gpu_id);
        link.run_retrying(
            || shared.shutdown().level() > ShutdownLevel::Running,
            |con| {
                redis::cmd("SET")
                    .arg(&queue_key)
                    .arg(&config.queue)
                    .query::<()>(con)
            },
        )?;
        recover_leftovers(&mut link, &plan.keys, &plan.policy, &shared)?;
        drop(link);
        worker.serve(engine, plan, &config)?;
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

    /// Starts the reporter and the three task threads, then reports ready.
    fn serve<E: Engine>(
        &mut self,
        engine: E,
        plan: Plan,
        config: &WorkerConfig,
    ) -> Result<(), WorkerError> {
        let Plan {
            client,
            http,
            keys,
            policy,
            encoder,
            outbox,
        } = plan;
        let shared = &self.shared;
        let frame_size = engine.frame_size();
        let (reporter, reporter_rx) = reporter::channel();
        self.reporter = Some(start_reporter(&client, &keys, shared, reporter_rx)?);
        self.outcomes = Some((reporter.clone(), policy.clone()));
        let (job_tx, job_rx) = crossbeam_channel::bounded(0);
        let (finish_tx, finish_rx) = crossbeam_channel::bounded(1);
        let finisher = Finisher {
            shared: shared.clone(),
            http: http.clone(),
            reporter: reporter.clone(),
            policy: policy.clone(),
            geometry: config.geometry,
            encoder,
            frame_size,
            max_upload_bytes: config.max_upload_bytes,
            outbox: outbox.clone(),
        };
        self.workers.push((
            "finisher",
            spawn("finisher", shared, move || finisher.run(finish_rx))?,
        ));
        let preparer = engine.preparer();
        let inference = Inference {
            engine,
            shared: shared.clone(),
            reporter: reporter.clone(),
            policy: policy.clone(),
        };
        self.workers.push((
            "inference",
            spawn("inference", shared, move || {
                inference.run(job_rx, finish_tx)
            })?,
        ));
        let canceller = Canceller {
            link: RedisLink::new(client.clone(), "cancel", Duration::from_secs(10)),
            shared: shared.clone(),
            max_item_bytes: policy.max_item_bytes,
        };
        self.workers.push((
            "canceller",
            spawn("canceller", shared, move || canceller.run())?,
        ));
        if let Some(interval) = config.sweep_interval {
            let sweeper = Sweeper {
                link: RedisLink::new(client.clone(), "sweep", Duration::from_secs(10)),
                keys: keys.clone(),
                policy: policy.clone(),
                shared: shared.clone(),
                interval,
            };
            self.workers
                .push(("sweeper", spawn("sweeper", shared, move || sweeper.run())?));
        }
        let fetcher = Fetcher {
            link: RedisLink::new(
                client,
                "claim",
                config.claim_timeout + Duration::from_secs(10),
            ),
            keys,
            preparer,
            shared: shared.clone(),
            reporter,
            policy,
            http,
            temp_dir: config.temp_dir.clone(),
            max_download_bytes: config.max_download_bytes,
            output: OutputLimits {
                geometry: config.geometry,
                frame_size,
                max_pixels: config.max_output_pixels,
                max_bytes: config.max_upload_bytes,
            },
            max_audio_secs: config.max_audio_secs,
            defaults: config.defaults,
            prefetch: config.prefetch,
            claim_timeout: config.claim_timeout,
            jobs: job_tx,
            outbox,
        };
        self.workers
            .push(("fetcher", spawn("fetcher", shared, move || fetcher.run())?));
        shared.set_ready();
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The address of the metrics and health endpoints (`--metrics-listen`), once bound.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.health.as_ref().map(HealthServer::addr)
    }

    /// True while nothing is claimed.
    pub fn is_idle(&self) -> bool {
        self.shared.inflight() == 0
    }

    /// A handle to stop this worker.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shared.shutdown().clone()
    }

    /// Blocks until the worker has stopped (after a [`ShutdownHandle::request`] or a fatal
    /// error), enforcing the grace period. Returns the counters, or the fatal error.
    pub fn join(mut self) -> Result<Stats, WorkerError> {
        self.wait();
        match self.shared.take_fatal() {
            Some(e) => Err(e),
            None => Ok(self.shared.stats()),
        }
    }

    /// A thread that ended while the worker was still running died (a panic: every thread
    /// loops until a stop is requested). The whole worker stops with an error so that its
    /// supervisor restarts it; what the dead thread held stays in the processing list and is
    /// recovered at that start (charged only when it was being worked on).
    fn check_threads(&self) {
        if self.shared.shutdown().level() > ShutdownLevel::Running {
            return;
        }
        if let Some(name) = self.shared.died() {
            tracing::error!(thread = name, "a worker thread died; stopping the worker");
            self.shared.fatal(WorkerError::Internal(format!(
                "the {name} thread stopped unexpectedly (a panic); the worker stops so that its supervisor restarts it"
            )));
        }
    }

    /// The watchdog: when the model has made no progress on its claim for longer than
    /// allowed, that claim is requeued once ([`Policy::hung`]) and the worker stops with
    /// [`WorkerError::ModelHung`] (the stuck thread is left behind `stop_timeout` later).
    fn check_watchdog(&mut self) {
        let (Some(limit), Some(beat)) = (self.watchdog, self.shared.model_beat()) else {
            return;
        };
        let quiet = beat.last.elapsed();
        if quiet < limit || self.shared.shutdown().level() > ShutdownLevel::Running {
            return;
        }
        let secs = quiet.as_secs();
        tracing::error!(claim = %beat.held.claim, secs, "the model made no progress (watchdog): requeueing its task and stopping the worker");
        if let Some((reporter, policy)) = &self.outcomes {
            let claim = Claim {
                id: beat.held.claim.clone(),
                item: QueueItem::parse_bounded(&beat.held.raw, policy.max_item_bytes),
                claimed_at: Instant::now(),
            };
            reporter.outcome(policy.hung(&claim, secs));
            self.settled_here.push(beat.held.claim);
        }
        self.shared.fatal(WorkerError::ModelHung { secs });
    }

    /// Gives up on threads that did not end in time: what they still hold goes back to the
    /// queue as it was (not counted), the reporter ends once that is recorded, and the
    /// threads are left behind (the process exits without them).
    fn abandon(&mut self, why: &str) {
        let stuck: Vec<&str> = self
            .workers
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .map(|(name, _)| *name)
            .collect();
        tracing::error!(threads = ?stuck, "{why}; requeueing what they hold and stopping without them");
        if let Some((reporter, policy)) = &self.outcomes {
            for held in self.shared.held() {
                if self.settled_here.contains(&held.claim) {
                    continue;
                }
                let claim = Claim {
                    id: held.claim.clone(),
                    item: QueueItem::parse_bounded(&held.raw, policy.max_item_bytes),
                    claimed_at: Instant::now(),
                };
                reporter.outcome(policy.released(&claim));
                self.settled_here.push(held.claim);
            }
        }
        self.shared.close_reporter();
        // Dropping a handle detaches its thread.
        self.workers.retain(|(_, h)| h.is_finished());
    }

    fn wait(&mut self) {
        // Supervise: cancel the running task when the grace period is over; give up on
        // threads that have not ended `stop_timeout` after the cancel.
        let mut cancelled_at: Option<Instant> = None;
        while self.workers.iter().any(|(_, h)| !h.is_finished()) {
            self.check_threads();
            // A stuck call never returns: the stop below leaves it behind after
            // `stop_timeout`, once the fetcher has given back what it claimed meanwhile.
            self.check_watchdog();
            let shutdown = self.shared.shutdown();
            // After the grace period, cancel once the fetcher has stopped claiming, so the
            // requeued task is not claimed again by this worker's last `BLMOVE` (but no later
            // than `stop_timeout` after the grace period); a second signal cancels at once.
            let fetcher_done = self
                .workers
                .iter()
                .find(|(name, _)| *name == "fetcher")
                .is_none_or(|(_, h)| h.is_finished());
            let cancel = match (shutdown.level(), shutdown.since()) {
                (ShutdownLevel::Immediate, _) => true,
                (ShutdownLevel::Graceful, Some(since)) => {
                    since.elapsed() >= self.grace
                        && (fetcher_done || since.elapsed() >= self.grace + self.stop_timeout)
                }
                _ => false,
            };
            if cancel && !self.shared.cancelled() {
                tracing::info!("cancelling the running task (it will be requeued)");
                self.shared.cancel_task();
            }
            if self.shared.cancelled() {
                let at = *cancelled_at.get_or_insert_with(Instant::now);
                if at.elapsed() >= self.stop_timeout {
                    self.abandon(&format!(
                        "threads still running {} s after the stop",
                        self.stop_timeout.as_secs()
                    ));
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (name, h) in self.workers.drain(..) {
            if h.join().is_err() {
                tracing::error!(thread = name, "thread panicked");
            }
        }
        // The last sender the reporter waits for once the threads are gone.
        self.outcomes = None;
        self.shared
            .set_reporter_deadline(Instant::now() + self.reporter_drain);
        if let Some(h) = self.reporter.take() {
            if h.join().is_err() {
                tracing::error!("reporter thread panicked");
            }
        }
        self.shared.stop_heartbeat();
        if let Some(h) = self.heartbeat.take() {
            if h.join().is_err() {
                tracing::error!("heartbeat thread panicked");
            }
        }
        self.health = None;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.heartbeat.is_some() || self.reporter.is_some() || !self.workers.is_empty() {
            self.shared.shutdown().stop_now();
            self.reporter_drain = Duration::from_secs(5);
            self.wait();
        }
    }
}
