//! The EchoMimic worker service: a reliable Redis task consumer that turns a portrait photo
//! and a speech clip into a talking-head MP4 (EchoMimic v1), following the EchoMimic Worker
//! usage guide and `worker-protocol.md`.
//!
//! * [`config`]: every setting (flags with the guide's environment variables).
//! * [`service::Worker`]: the threads (fetcher, inference, finisher, reporter, heartbeat),
//!   start-up (lease, model, recovery) and shutdown (grace period, requeue).
//! * [`engine`]: the inference boundary ([`engine::Engine`], [`engine::Preparer`]), with the
//!   real model in [`engine::pipeline`] and a stand-in in [`engine::fake`].
//! * [`error`]: errors and the one mapping to wire codes and retry decisions.
//! * [`progress`]: stage bands, per-UNet-call progress and the ETA.
//! * [`store`]: the Redis scripts (lease, heartbeat, idempotent outcome recording).
//! * [`admin`]: the operator's commands (`status`, `dlq`, `cancel`) over the same keys.
//! * `metrics` and `health`: Prometheus metrics and the `/healthz`/`/readyz` probes
//!   (`--metrics-listen`).
//! * `outbox`: finished videos kept on local disk when their upload gave up, so the task's
//!   next attempt uploads instead of generating again.
//!
//! # Redis keys and events, as implemented
//!
//! Names are those of [`echomimic_protocol::keys`]. A claim moves the raw item with
//! `BLMOVE queue task_processing:{gpu} LEFT RIGHT 1` and counts the worker busy
//! (`gpu_status:{gpu}` = `busy`) until its outcome is recorded. The first event of a claim
//! (`processing`) deletes the task's old `task_result:{id}`; every event is published on the
//! channel and stored in `task_progress:{id}`; the terminal event is also stored in
//! `task_result:{id}`, in the same script that removes the item from the processing list
//! (see [`store`]). Exactly one terminal event is published per task outcome; an attempt that
//! is retried publishes none.

pub mod admin;
mod canceller;
pub mod config;
pub mod engine;
pub mod error;
mod fetcher;
mod finisher;
pub mod generate;
mod handoff;
mod health;
mod heartbeat;
mod inference;
mod job;
mod metrics;
mod outbox;
pub mod progress;
mod redis_link;
mod reporter;
pub mod runtime;
pub mod service;
pub mod shutdown;
mod state;
pub mod store;
mod sweeper;

pub use config::{ServeArgs, WorkerConfig};
pub use error::WorkerError;
pub use service::Worker;
pub use shutdown::{ShutdownHandle, ShutdownLevel};
pub use state::Stats;
