//! Every Redis key and channel name of the protocol, with its type, writer and lifetime.
//!
//! `{gpu}` is the worker's `GPU_ID`; `{task_id}` is a task's validated `task_id` (it cannot
//! contain `:`, so names cannot collide across kinds).
//!
//! | name | type | written by | read by | lifetime |
//! |---|---|---|---|---|
//! | [`task_queue`] `task_queue_gpu_{gpu}` (or `TASK_QUEUE_NAME`) | list of task JSON | clients `RPUSH` | worker `BLMOVE … LEFT RIGHT` into its processing list | until claimed |
//! | [`processing_list`] `task_processing:{gpu}` | list of claimed queue items | worker | worker (start-up recovery) | removed once the outcome is recorded |
//! | [`DEAD_LETTER_LIST`] `task_dead_letter` | list of [`DeadLetter`](crate::queue::DeadLetter) JSON | worker `RPUSH` + `LTRIM` to [`DEAD_LETTER_MAX_LEN`] | operators | trimmed, no TTL |
//! | [`worker_lease`] `worker_lease:{gpu}` | string: owner id | worker `SET NX EX`, refreshed by a heartbeat | worker | [`LEASE_TTL_SECS`] |
//! | [`gpu_status`] `gpu_status:{gpu}` | string: [`WorkerState`] | worker `SET EX`, refreshed by a heartbeat, deleted on clean exit | schedulers | [`GPU_STATUS_TTL_SECS`]; a missing key means offline |
//! | [`DEFAULT_PROGRESS_CHANNEL`] `task_progress` (or `PROGRESS_CHANNEL`) | Pub/Sub channel of event JSON | worker `PUBLISH` | clients `SUBSCRIBE` | not stored |
//! | [`latest_event`] `task_progress:{task_id}` | string: the last event published for the task, byte-identical | worker `SET EX` with every publish | late or reconnecting clients | [`EVENT_TTL_SECS`] |
//! | [`task_result`] `task_result:{task_id}` | string: the terminal event, byte-identical to what was published | worker `SET EX` before publishing it | late clients | [`RESULT_TTL_SECS`] |
//! | [`task_cancel`] `task_cancel:{task_id}` | string `1`: cancellation asked for | [`client::cancel_task`](crate::client) (`echomimic-worker cancel`) | the worker holding the task: polled while it holds claims, checked before a run | [`CANCEL_TTL_SECS`]; deleted with the task's terminal event and by a new submit |
//! | [`task_delayed`] `task_delayed:{queue}` | sorted set of queue items scored by when they are due (Unix ms, Redis's clock) | worker, with the outcome of an attempt whose download met a temp-file outage (uncounted; [`QueueItem::deferred`](crate::queue::QueueItem::deferred)) | any worker of the queue moves due items to the head of the queue; [`client::cancel_task`](crate::client) | until due |
//! | [`LEGACY_TASK_SET`] `all_task_ids` | set of task ids | the EchoMe webapp `SADD` | worker `SREM` after every outcome (legacy schema only) | webapp-managed |
//!
//! # Claiming, attempts and dead letters
//!
//! The worker claims with `BLMOVE queue processing LEFT RIGHT`, so a crash never loses a task:
//! at start-up the worker finds what its own processing list still holds and pushes it back to
//! the *head* of its queue (`LPUSH`, so it is served next) wrapped in a
//! [`QueueItem`](crate::queue::QueueItem) envelope, `{"attempts": n, "last_error": "…",
//! "task": {…}}`, that counts the attempt inside the item itself. No side table is needed, and
//! two identical payloads (the EchoMe webapp reuses ids) never share a count. The same envelope
//! is used when a transient failure (temp-file API down, ...) is retried. An item whose attempts
//! reach the worker's limit, or that is permanently invalid, is moved to [`DEAD_LETTER_LIST`]
//! with a `failed` event. An item is removed from the processing list (`LREM processing 1 item`)
//! only after its outcome is recorded.
//!
//! # Stale results
//!
//! Task ids are not unique (the EchoMe webapp reuses them), so a new run must not be confused
//! with an old result: [`submit_task`](crate::client::submit_task) deletes both per-task keys
//! before pushing, and the worker overwrites [`latest_event`] and deletes [`task_result`] when
//! it claims a task.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Default Pub/Sub channel for progress events (`PROGRESS_CHANNEL`).
pub const DEFAULT_PROGRESS_CHANNEL: &str = "task_progress";
/// Dead-letter list shared by all workers.
pub const DEAD_LETTER_LIST: &str = "task_dead_letter";
/// The dead-letter list is trimmed to its newest this many entries.
pub const DEAD_LETTER_MAX_LEN: usize = 10_000;
/// Set of pending task ids kept by the EchoMe webapp.
pub const LEGACY_TASK_SET: &str = "all_task_ids";

/// Expiry of `gpu_status:{gpu}`; the worker refreshes it at least every third of this.
pub const GPU_STATUS_TTL_SECS: u64 = 30;
/// Expiry of `worker_lease:{gpu}`; the worker refreshes it at least every third of this.
pub const LEASE_TTL_SECS: u64 = 30;
/// Expiry of `task_progress:{task_id}` (one day, like temp files).
pub const EVENT_TTL_SECS: u64 = 24 * 3600;
/// Expiry of `task_result:{task_id}` (one day: the video's temp file expires then too).
pub const RESULT_TTL_SECS: u64 = 24 * 3600;

/// Default task queue of a worker: `task_queue_gpu_{gpu_id}`.
pub fn task_queue(gpu_id: u32) -> String {
    format!("{TASK_QUEUE_PREFIX}{gpu_id}")
}

/// The worker's state key: `gpu_status:{gpu_id}`.
pub fn gpu_status(gpu_id: u32) -> String {
    format!("{GPU_STATUS_PREFIX}{gpu_id}")
}

/// The start of every [`processing_list`] key.
pub const PROCESSING_LIST_PREFIX: &str = "task_processing:";

/// The worker's list of claimed, unfinished queue items: `task_processing:{gpu_id}`.
pub fn processing_list(gpu_id: u32) -> String {
    format!("{PROCESSING_LIST_PREFIX}{gpu_id}")
}

/// The lease that keeps a second worker off the same GPU id: `worker_lease:{gpu_id}`.
pub fn worker_lease(gpu_id: u32) -> String {
    format!("{WORKER_LEASE_PREFIX}{gpu_id}")
}

/// The claims a worker is working on: `worker_active:{gpu_id}`, a hash of claim id → the raw
/// item, for the items being downloaded and checked, on the model, or being encoded and
/// uploaded (not those waiting prepared). When a worker dies, the next one on the gpu id
/// charges an attempt only to the items found here; the rest of its processing list goes back
/// to the queue uncounted.
pub fn worker_active(gpu_id: u32) -> String {
    format!("worker_active:{gpu_id}")
}

/// The queue a worker serves: `worker_queue:{gpu_id}` (no expiry), written at start. A worker
/// sweeping for orphans takes over the processing list of a dead worker (lease expired) only
/// when it served the same queue, so the items go back where they came from.
pub fn worker_queue(gpu_id: u32) -> String {
    format!("{WORKER_QUEUE_PREFIX}{gpu_id}")
}

/// The last event published for a task: `task_progress:{task_id}`.
pub fn latest_event(task_id: &str) -> String {
    format!("task_progress:{task_id}")
}

/// The terminal event of a task: `task_result:{task_id}`.
pub fn task_result(task_id: &str) -> String {
    format!("task_result:{task_id}")
}

/// A request to cancel a task: `task_cancel:{task_id}`. A worker holding a claim of the task
/// stops it between two UNet calls (or before its run starts) and publishes one `failed`
/// event with the code `cancelled`; a queued task is removed by the canceller itself (see
/// [`client::cancel_task`](crate::client)).
pub fn task_cancel(task_id: &str) -> String {
    format!("task_cancel:{task_id}")
}

/// Tasks waiting out a temp-file outage before their next attempt: `task_delayed:{queue}`, a
/// sorted set of queue items scored by the Unix time in milliseconds (Redis's own clock) at
/// which each goes back to the head of `queue`. Every worker serving `queue` moves the due
/// ones; each member is unique (its envelope names the claim that deferred it).
pub fn task_delayed(queue: &str) -> String {
    format!("{TASK_DELAYED_PREFIX}{queue}")
}

/// The start of every [`task_delayed`] key.
pub const TASK_DELAYED_PREFIX: &str = "task_delayed:";

/// Expiry of [`task_cancel`] (one hour): long enough for a worker that is reconnecting to see
/// it, short enough that a forgotten request cannot cancel a task resubmitted much later with
/// the same id (a submit deletes it anyway).
pub const CANCEL_TTL_SECS: u64 = 3600;

/// The start of every [`task_queue`] key under the default naming.
pub const TASK_QUEUE_PREFIX: &str = "task_queue_gpu_";

/// The start of every [`gpu_status`] key.
pub const GPU_STATUS_PREFIX: &str = "gpu_status:";

/// The start of every [`worker_lease`] key.
pub const WORKER_LEASE_PREFIX: &str = "worker_lease:";

/// The start of every [`worker_queue`] key.
pub const WORKER_QUEUE_PREFIX: &str = "worker_queue:";

/// The value of `gpu_status:{gpu}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WorkerState {
    /// Waiting for a task.
    Idle,
    /// From the moment a task is claimed until its outcome is recorded.
    Busy,
    /// A value this version does not know.
    #[serde(other)]
    Unknown,
}

impl WorkerState {
    /// The wire value, `"idle"` or `"busy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Unknown => "unknown",
        }
    }

    /// Reads a key value; anything but `idle`/`busy` is [`WorkerState::Unknown`].
    pub fn parse(value: &str) -> Self {
        match value {
            "idle" => WorkerState::Idle,
            "busy" => WorkerState::Busy,
            _ => WorkerState::Unknown,
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(task_queue(0), "task_queue_gpu_0");
        assert_eq!(gpu_status(3), "gpu_status:3");
        assert_eq!(processing_list(1), "task_processing:1");
        assert_eq!(worker_lease(1), "worker_lease:1");
        assert_eq!(latest_event("t-1"), "task_progress:t-1");
        assert_eq!(task_result("t-1"), "task_result:t-1");
        assert_eq!(task_cancel("t-1"), "task_cancel:t-1");
        assert_eq!(worker_queue(2), "worker_queue:2");
        assert_eq!(DEFAULT_PROGRESS_CHANNEL, "task_progress");
        assert_eq!(LEGACY_TASK_SET, "all_task_ids");
    }

    #[test]
    fn worker_state_values() {
        assert_eq!(WorkerState::parse("idle"), WorkerState::Idle);
        assert_eq!(WorkerState::parse("busy"), WorkerState::Busy);
        assert_eq!(WorkerState::parse("offline"), WorkerState::Unknown);
        for s in [WorkerState::Idle, WorkerState::Busy] {
            assert_eq!(WorkerState::parse(s.as_str()), s);
        }
    }
}
