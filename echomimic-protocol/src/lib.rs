//! Wire types, Redis key names and validation for the EchoMimic worker protocol.
//!
//! The user's contract is the EchoMimic Worker usage guide: clients `RPUSH` a [`Task`] as JSON
//! onto a worker's queue ([`keys::task_queue`]), and the worker publishes [`ProgressEvent`]s on a
//! Pub/Sub channel ([`keys::DEFAULT_PROGRESS_CHANNEL`]) and its state under
//! [`keys::gpu_status`]. This crate holds those types, their validation, every key name
//! ([`keys`]), the legacy EchoMe event schema ([`legacy`]), the queue envelope and dead letters
//! ([`queue`]), and, with the `redis` feature, blocking client helpers ([`client`]).
//!
//! Without features it depends only on `serde` and `serde_json`.
#![deny(missing_docs)]

mod decode;
pub mod error;
pub mod keys;
pub mod legacy;
pub mod progress;
pub mod queue;
pub mod task;

#[cfg(feature = "redis")]
pub mod client;

pub use error::{InvalidTask, ProtocolError, RawExcerpt, TaskProblem};
pub use keys::WorkerState;
pub use legacy::{LegacyEvent, LegacyStatus, Schema};
pub use progress::{ErrorCode, ProgressEvent, Stage, Status};
pub use queue::{DeadLetter, QueueItem};
pub use task::Task;
