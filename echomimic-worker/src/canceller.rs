//! The canceller thread: watches the cancellation requests
//! ([`echomimic_protocol::keys::task_cancel`]) of the tasks this worker holds.
//!
//! While the worker holds claims it reads their requests every [`POLL`] with one `MGET`; a
//! request found is handed to [`Shared::request_cancel`], which stops the task's run between
//! two UNet calls when it is on the model, or makes the inference thread fail it before its
//! run when it is still being prepared. The outcome (`failed`, code `cancelled`) is recorded
//! like any other (see [`crate::job::Policy::cancelled`]). Polling rather than a Pub/Sub
//! subscription: a request written while this worker was reconnecting is not missed, and an
//! idle worker sends nothing.

use std::sync::Arc;
use std::time::Duration;

use echomimic_protocol::{keys, QueueItem};

use crate::redis_link::{sleep_unless, RedisLink};
use crate::state::Shared;

/// How often the requests of the held tasks are read.
pub(crate) const POLL: Duration = Duration::from_millis(500);

pub(crate) struct Canceller {
    pub(crate) link: RedisLink,
    pub(crate) shared: Arc<Shared>,
    /// Longest queue item parsed (`--max-item-bytes`).
    pub(crate) max_item_bytes: usize,
}

impl Canceller {
    pub(crate) fn run(mut self) {
        while !self.done() {
            self.poll();
            if sleep_unless(POLL, || self.done()) {
                break;
            }
        }
    }

    /// Stopping and nothing held any more, or the running task cancelled for a stop.
    fn done(&self) -> bool {
        self.shared.cancelled() || (self.shared.stopping() && self.shared.inflight() == 0)
    }

    fn poll(&mut self) {
        let mut ids: Vec<String> = self
            .shared
            .held()
            .iter()
            .filter_map(|h| {
                QueueItem::parse_bounded(&h.raw, self.max_item_bytes)
                    .task_id()
                    .map(str::to_owned)
            })
            .collect();
        ids.sort();
        ids.dedup();
        if ids.is_empty() {
            return;
        }
        let names: Vec<String> = ids.iter().map(|id| keys::task_cancel(id)).collect();
        let found = self.link.run(|con| {
            redis::cmd("MGET")
                .arg(&names)
                .query::<Vec<Option<String>>>(con)
        });
        match found {
            Ok(values) => {
                for (id, value) in ids.iter().zip(values) {
                    if value.is_some() && self.shared.request_cancel(id) {
                        tracing::info!(task_id = %id, "cancellation requested");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading cancellation requests"),
        }
    }
}
