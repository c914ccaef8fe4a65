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

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use echomimic_pipeline::video::{resolve_backend, EncoderBackend};
use echomimic_tempfile::{ClientConfig, TempfileClient};

use crate::config::WorkerConfig;
use crate::engine::Engine;
use crate::error::WorkerError;
use crate::fetcher::Fetcher;
use crate::finisher::Finisher;
use crate::inference::Inference;
use crate::job::{Claim, Policy};
use crate::redis_link::{RedisLink, RetryEnd};
use crate::shutdown::{ShutdownHandle, ShutdownLevel};
use crate::state::{Shared, Stats};
use crate::store::{owner_id, Keys, Recorded};
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

/// What start-up builds from the configuration before it touches Redis.
struct Plan {
    client: redis::Client,
    http: TempfileClient,
    keys: Keys,
    policy: Policy,
    encoder: EncoderBackend,
}

impl Plan {
    fn new(config: &WorkerConfig) -> Result<Plan, WorkerError> {
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
        Ok(Plan {
            client,
            http,
            keys,
            policy,
            encoder,
        })
    }

    fn link(&self, name: &'static str, read_timeout: Duration) -> RedisLink {
        RedisLink::new(self.client.clone(), name, read_timeout)
    }
}

/// A start-up Redis command that did not go through: given up because a stop was requested
/// (a normal stop), or refused by Redis.
fn startup_error(e: RetryEnd) -> WorkerError {
    match e {
        RetryEnd::GaveUp(_) => WorkerError::Cancelled,
        RetryEnd::Failed(e) => WorkerError::Redis(e),
    }
}

/// Step 1 of start-up: the lease (waiting for Redis if it is not up yet).
fn take_lease(
    link: &mut RedisLink,
    keys: &Keys,
    shared: &Shared,
    gpu_id: u32,
) -> Result<(), WorkerError> {
    let stopped = || shared.shutdown().level() > ShutdownLevel::Running;
    let taken = link
        .run_retrying(stopped, |con| keys.acquire_lease(con))
        .map_err(startup_error)?;
    taken.map_err(|(owner, ttl_secs)| WorkerError::LeaseHeld {
        gpu_id,
        key: keys.lease.clone(),
        owner,
        ttl_secs,
    })
}

/// Step 2: the model, loaded and warmed up while the heartbeat keeps the lease.
fn load_engine<E: Engine>(
    load: impl FnOnce() -> Result<E, WorkerError>,
    shared: &Shared,
) -> Result<E, WorkerError> {
    let t = Instant::now();
    let mut engine = load()?;
    tracing::info!(engine = %engine.describe(), secs = t.elapsed().as_secs_f64(), "model loaded");
    let t = Instant::now();
    engine.warm_up()?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), "model warmed up");
    if shared.shutdown().level() > ShutdownLevel::Running {
        return Err(WorkerError::Cancelled);
    }
    Ok(engine)
}

/// Step 3: what the processing list still holds from a previous run is requeued (counting
/// the interrupted attempt) or given up.
fn recover_leftovers(
    link: &mut RedisLink,
    plan: &Plan,
    shared: &Shared,
) -> Result<(), WorkerError> {
    let (keys, policy) = (&plan.keys, &plan.policy);
    let stopped = || shared.shutdown().level() > ShutdownLevel::Running;
    let leftovers = link
        .run_retrying(stopped, |con| keys.leftovers(con))
        .map_err(startup_error)?;
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
            .map_err(startup_error)?;
        if recorded == Recorded::LeaseLost {
            return Err(WorkerError::LeaseLost {
                key: keys.lease.clone(),
                owner: None,
            });
        }
        shared.recovered();
    }
    Ok(())
}

fn start_heartbeat(
    plan: &Plan,
    config: &WorkerConfig,
    shared: &Arc<Shared>,
    wake: Receiver<()>,
) -> Result<JoinHandle<()>, WorkerError> {
    let link = plan.link("heartbeat", Duration::from_secs(10));
    let (keys, shared) = (plan.keys.clone(), shared.clone());
    let interval = config.heartbeat_interval();
    spawn("heartbeat", move || {
        heartbeat::run(link, keys, shared, interval, wake)
    })
}

fn start_reporter(
    client: &redis::Client,
    keys: &Keys,
    shared: &Arc<Shared>,
    rx: Receiver<reporter::Report>,
) -> Result<JoinHandle<()>, WorkerError> {
    let link = RedisLink::new(client.clone(), "reporter", Duration::from_secs(10));
    let (keys, shared) = (keys.clone(), shared.clone());
    spawn("reporter", move || reporter::run(link, keys, rx, shared))
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
        let mut link = plan.link("start-up", Duration::from_secs(10));
        tracing::info!(redis = %config.redis.describe(), lease = %plan.keys.lease, owner = %plan.keys.owner, "taking the lease");
        take_lease(&mut link, &plan.keys, &shared, config.gpu_id)?;
        // From here on, dropping `worker` (on an error) releases the lease.
        let mut worker = Worker {
            shared: shared.clone(),
            grace: config.grace,
            workers: Vec::new(),
            reporter: None,
            heartbeat: None,
            reporter_drain: config.grace + Duration::from_secs(30),
        };
        worker.heartbeat = Some(start_heartbeat(&plan, &config, &shared, wake_rx)?);
        let engine = load_engine(load, &shared)?;
        recover_leftovers(&mut link, &plan, &shared)?;
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
        } = plan;
        let shared = &self.shared;
        let (reporter, reporter_rx) = reporter::channel();
        self.reporter = Some(start_reporter(&client, &keys, shared, reporter_rx)?);
        let (job_tx, job_rx) = crossbeam_channel::bounded(0);
        let (finish_tx, finish_rx) = crossbeam_channel::bounded(1);
        let finisher = Finisher {
            http: http.clone(),
            reporter: reporter.clone(),
            policy: policy.clone(),
            geometry: config.geometry,
            encoder,
            frame_size: engine.frame_size(),
        };
        self.workers.push((
            "finisher",
            spawn("finisher", move || finisher.run(finish_rx))?,
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
            reporter,
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
        self.workers
            .push(("fetcher", spawn("fetcher", move || fetcher.run())?));
        shared.set_ready();
        Ok(())
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

    fn wait(&mut self) {
        // Supervise: cancel the running task when the grace period is over.
        while self.workers.iter().any(|(_, h)| !h.is_finished()) {
            let shutdown = self.shared.shutdown();
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
                self.shared.cancel_task();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for (name, h) in self.workers.drain(..) {
            if h.join().is_err() {
                tracing::error!(thread = name, "thread panicked");
            }
        }
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
