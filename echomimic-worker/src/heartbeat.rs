//! The heartbeat thread: keeps `worker_lease:{gpu}` and `gpu_status:{gpu}` alive.
//!
//! Every third of the shorter TTL, and at once whenever the worker turns busy or idle, it runs
//! one script that refreshes the lease if it is still ours (re-taking it when it vanished, e.g.
//! after Redis lost its data) and writes `idle`/`busy` with its TTL. If another worker holds the
//! lease, this worker stops at once without recording anything (its items were recovered by
//! the other). On a clean exit it deletes both keys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use echomimic_protocol::WorkerState;

use crate::error::WorkerError;
use crate::redis_link::{is_connection_error, RedisLink};
use crate::state::Shared;
use crate::store::{Beat, Keys};

pub(crate) fn run(
    mut link: RedisLink,
    keys: Keys,
    shared: Arc<Shared>,
    interval: Duration,
    wake: Receiver<()>,
) {
    loop {
        if shared.heartbeat_should_stop() {
            break;
        }
        let state = shared.ready().then(|| {
            if shared.inflight() > 0 {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            }
        });
        let next_wait = match link.run(|con| keys.heartbeat(con, state)) {
            Ok(Beat::Refreshed) => interval,
            Ok(Beat::Retaken) => {
                tracing::warn!(lease = %keys.lease, "the lease had vanished (Redis restarted or lost its data?); taken again");
                interval
            }
            Ok(Beat::Lost) => {
                let owner = link.run(|con| keys.lease_holder(con)).ok().flatten();
                tracing::error!(lease = %keys.lease, ?owner, "another worker took the lease; stopping now");
                shared.fatal(WorkerError::LeaseLost {
                    key: keys.lease.clone(),
                    owner,
                });
                return;
            }
            Err(e) if is_connection_error(&e) => link.pause_after(&e).min(interval),
            Err(e) => {
                tracing::error!(error = %e, "heartbeat failed");
                interval
            }
        };
        match wake.recv_timeout(next_wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(next_wait),
        }
    }
    // Clean exit: delete the status key and the lease (bounded wait if Redis is away).
    let deadline = Instant::now() + Duration::from_secs(3);
    match link.run_retrying(|| Instant::now() > deadline, |con| keys.release(con)) {
        Ok(true) => {
            tracing::info!(lease = %keys.lease, status = %keys.status, "status key deleted and lease released")
        }
        Ok(false) => tracing::warn!(lease = %keys.lease, "the lease was no longer ours at exit"),
        Err(e) => {
            tracing::warn!(error = %e.into_error(), "could not release the lease (it expires on its own)")
        }
    }
}
