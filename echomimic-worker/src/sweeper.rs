//! Putting orphaned claims back: at start-up (this gpu id's leftovers) and, while serving,
//! every `--sweep-secs` (the sweeper thread).
//!
//! An orphan is an item in a processing list that no live worker will ever record an
//! outcome for:
//!
//! * **in this worker's own list, but never received**: a `BLMOVE` whose reply was lost with
//!   the connection moved the item, and the fetcher never saw it. The sweep finds items of
//!   its list that no claim in flight holds; one still there at the next sweep (an interval
//!   later, far longer than a reply takes) goes back to the queue uncounted;
//! * **in the list of a dead worker** (its lease expired) that served the same queue
//!   (`worker_queue:{gpu}`): a worker that crashed and was not restarted, or a gpu id taken
//!   out of service. The sweeper takes that gpu id's lease for the moment of the recovery
//!   (so a worker starting on it meanwhile waits, and two sweepers never both recover it),
//!   recovers the list exactly as a restarted worker would ([`recover_leftovers`]) and
//!   releases the lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use echomimic_protocol::client::scan_keys;
use echomimic_protocol::keys;

use crate::error::WorkerError;
use crate::job::Policy;
use crate::redis_link::{sleep_unless, RedisLink};
use crate::state::Shared;
use crate::store::{Keys, Recorded};

/// What the sweeper needs.
pub(crate) struct Sweeper {
    pub(crate) link: RedisLink,
    pub(crate) keys: Keys,
    pub(crate) policy: Policy,
    pub(crate) shared: Arc<Shared>,
    pub(crate) interval: Duration,
}

/// Requeues what `keys.processing` holds from a run that is gone. An item that run was
/// working on ([`keys::worker_active`]) is requeued counting the interrupted attempt, or given
/// up once its attempts are spent; an item it had only claimed or prepared goes back as it
/// was. `keys.lease` must be held by `keys.owner`. Returns how many items were dealt with.
pub(crate) fn recover_leftovers(
    link: &mut RedisLink,
    keys: &Keys,
    policy: &Policy,
    shared: &Shared,
) -> Result<usize, WorkerError> {
    let stopped = || shared.shutdown().level() > crate::shutdown::ShutdownLevel::Running;
    let leftovers = link.run_retrying(stopped, |con| keys.leftovers(con))?;
    let mut active = link.run_retrying(stopped, |con| keys.take_active(con))?;
    let mut done = 0;
    for raw in leftovers.into_iter().rev() {
        let claim = policy.claim(&raw);
        let was_running = match active.iter().position(|a| *a == raw) {
            Some(i) => {
                active.swap_remove(i);
                true
            }
            None => false,
        };
        let record = if was_running {
            policy.recovered(&claim)
        } else {
            policy.released(&claim)
        };
        tracing::warn!(
            list = %keys.processing,
            attempts = claim.item.attempts() + u32::from(was_running),
            was_running,
            outcome = record.what.as_str(),
            "found a task left by a run that is gone"
        );
        let recorded = link.run_retrying(stopped, |con| keys.record(con, &record))?;
        match recorded {
            Recorded::LeaseLost | Recorded::LeaseMissing => {
                return Err(WorkerError::LeaseLost {
                    key: keys.lease.clone(),
                    owner: None,
                })
            }
            Recorded::ClaimGone => {
                tracing::warn!("the item left the processing list meanwhile; skipped")
            }
            Recorded::Applied | Recorded::AlreadyApplied => {
                shared.recovered();
                done += 1;
            }
        }
    }
    Ok(done)
}

/// The gpu id of a `task_processing:{gpu}` key.
fn gpu_of(processing_key: &str) -> Option<u32> {
    processing_key
        .strip_prefix(keys::PROCESSING_LIST_PREFIX)?
        .parse()
        .ok()
}

impl Sweeper {
    /// Sweeps every interval until the worker stops.
    pub(crate) fn run(mut self) {
        // Items of our own list not held at the previous sweep.
        let mut suspects: Vec<Vec<u8>> = Vec::new();
        loop {
            if sleep_unless(self.interval, || self.shared.stopping()) {
                return;
            }
            match self.sweep_own(&suspects) {
                Ok(next) => suspects = next,
                Err(e) => tracing::warn!(error = %e, "orphan sweep of this worker's list failed"),
            }
            if let Err(e) = self.sweep_dead_peers() {
                tracing::warn!(error = %e, "orphan sweep of other workers' lists failed");
            }
        }
    }

    /// Puts back the items of our list that no claim holds and that were already suspects at
    /// the last sweep; returns the new suspects.
    fn sweep_own(&mut self, suspects: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, WorkerError> {
        let keys = &self.keys;
        let items = self.link.run(|con| keys.leftovers(con))?;
        let mut next = Vec::new();
        for raw in items {
            if self.shared.holds(&raw) {
                continue;
            }
            if !suspects.contains(&raw) {
                next.push(raw);
                continue;
            }
            let claim = self.policy.claim(&raw);
            let record = self.policy.released(&claim);
            match self.link.run(|con| keys.record(con, &record))? {
                Recorded::Applied | Recorded::AlreadyApplied => {
                    tracing::warn!(
                        list = %keys.processing,
                        "an item of this worker's processing list was never received (a claim reply lost?); requeued uncounted"
                    );
                    self.shared.recovered();
                }
                other => tracing::warn!(?other, "could not requeue an unreceived item"),
            }
        }
        Ok(next)
    }

    /// Recovers the processing lists of dead workers that served our queue.
    fn sweep_dead_peers(&mut self) -> Result<(), WorkerError> {
        let pattern = format!("{}*", keys::PROCESSING_LIST_PREFIX);
        let lists: Vec<String> = self.link.run(|con| scan_keys(con, &pattern))?;
        for list in lists {
            let Some(gpu) = gpu_of(&list) else { continue };
            if gpu == self.policy.gpu_id || self.shared.stopping() {
                continue;
            }
            let peer = Keys {
                processing: list.clone(),
                lease: keys::worker_lease(gpu),
                status: keys::gpu_status(gpu),
                active: keys::worker_active(gpu),
                ..self.keys.clone()
            };
            let queue_key = keys::worker_queue(gpu);
            let served: Option<String> = self
                .link
                .run(|con| redis::cmd("GET").arg(&queue_key).query(con))?;
            if served.as_deref() != Some(self.keys.queue.as_str()) {
                continue; // another queue's worker (or one that never said): not ours to touch
            }
            // A live worker (or another sweeper) holds the lease: not an orphan.
            if self.link.run(|con| peer.acquire_lease(con))?.is_err() {
                continue;
            }
            let t = Instant::now();
            let policy = Policy {
                gpu_id: gpu,
                ..self.policy.clone()
            };
            let result = recover_leftovers(&mut self.link, &peer, &policy, &self.shared);
            if let Err(e) = self.link.run(|con| peer.release(con)) {
                tracing::warn!(error = %e, lease = %peer.lease, "could not release a swept lease (it expires)");
            }
            let n = result?;
            if n > 0 {
                tracing::warn!(list = %list, items = n, secs = t.elapsed().as_secs_f64(),
                    "requeued the claims of a dead worker that served this queue");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ids_from_processing_keys() {
        assert_eq!(gpu_of(&keys::processing_list(7)), Some(7));
        assert_eq!(gpu_of("task_processing:x"), None);
        assert_eq!(gpu_of("other:7"), None);
    }
}
