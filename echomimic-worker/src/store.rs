//! The worker's Redis operations: the lease, the heartbeat, claiming, and recording outcomes.
//!
//! Key names come from [`echomimic_protocol::keys`]; the one key the worker adds is
//! [`outcome_marker`] (`worker_outcome:{claim_id}`), which makes recording an outcome
//! idempotent.
//!
//! # Recording an outcome
//!
//! Every outcome of a claimed item (completed, failed, requeued, dead-lettered) is one Lua
//! script (`RECORD_OUTCOME`), so Redis applies all of it or nothing:
//!
//! 1. **fence**: if `worker_lease:{gpu}` is held by another worker, nothing is written (this
//!    worker was cut off longer than the lease TTL and its items were recovered by the other);
//! 2. **once**: `SET worker_outcome:{claim_id} NX` — if the marker exists the outcome was
//!    already applied (a retry after a reply lost with the connection), nothing is written;
//! 3. `LREM` the item from the processing list; `LPUSH` it (or its requeue envelope) back onto
//!    the queue when requeued;
//! 4. for a terminal outcome: `SET task_progress:{id}`, `SET task_result:{id}` (TTLs) and
//!    `PUBLISH` the event, byte-identical in all three;
//! 5. `RPUSH` the dead letter (trimmed to the newest [`keys::DEAD_LETTER_MAX_LEN`]), and in
//!    the legacy schema `SREM all_task_ids {task_id}`.
//!
//! So a crash can neither publish two terminal events for one claim nor lose the task: before
//! the script the item is still in the processing list (and is recovered at the next start),
//! after it the item is gone and its outcome is published. A script is used rather than
//! `MULTI`/`EXEC` because steps 1–2 are conditions that a transaction cannot express.

use std::time::Duration;

use echomimic_protocol::{keys, DeadLetter, ProgressEvent, Schema};
use redis::{Connection, RedisResult};

/// The idempotency marker of one claim's outcome: `worker_outcome:{claim_id}`.
pub fn outcome_marker(claim_id: &str) -> String {
    format!("worker_outcome:{claim_id}")
}

/// See the [module docs](self).
pub(crate) const RECORD_OUTCOME: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
if not holder then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) end
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[12]) then return 0 end
redis.call('LREM', KEYS[2], 1, ARGV[3])
if ARGV[4] ~= '' then redis.call('LPUSH', KEYS[4], ARGV[4]) end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[7])
  redis.call('SET', KEYS[6], ARGV[5], 'EX', ARGV[8])
  redis.call('PUBLISH', ARGV[6], ARGV[5])
end
if ARGV[9] ~= '' then
  redis.call('RPUSH', KEYS[7], ARGV[9])
  redis.call('LTRIM', KEYS[7], -tonumber(ARGV[10]), -1)
end
if ARGV[11] ~= '' then redis.call('SREM', KEYS[8], ARGV[11]) end
return 1
"#;

/// Refreshes the lease while it is ours (re-taking it when it vanished, e.g. after a Redis
/// restart without persistence) and writes the status; -1 when another worker holds it.
const HEARTBEAT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4]) end
if holder then return 1 end
return 2
"#;

/// Deletes the lease and the status key if the lease is ours.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"#;

/// Names and settings every Redis operation of one worker needs.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) owner: String,
    pub(crate) queue: String,
    pub(crate) processing: String,
    pub(crate) lease: String,
    pub(crate) status: String,
    pub(crate) channel: String,
    pub(crate) schema: Schema,
    pub(crate) lease_ttl: Duration,
    pub(crate) status_ttl: Duration,
    pub(crate) event_ttl: Duration,
    pub(crate) result_ttl: Duration,
}

fn ttl_secs(d: Duration) -> u64 {
    d.as_secs().max(1)
}

/// What happens to a claimed item. Built by [`crate::job`]; applied by [`Keys::record`].
#[derive(Debug, Clone)]
pub(crate) struct OutcomeRecord {
    /// The per-claim id (marker).
    pub(crate) claim_id: String,
    /// The item as claimed (removed from the processing list).
    pub(crate) raw: Vec<u8>,
    /// Pushed onto the head of the queue (requeue).
    pub(crate) requeue: Option<Vec<u8>>,
    /// The terminal event (published and persisted).
    pub(crate) event: Option<ProgressEvent>,
    /// Appended to the dead-letter list.
    pub(crate) dead_letter: Option<DeadLetter>,
    /// What kind of outcome this is.
    pub(crate) what: OutcomeKind,
}

/// The kinds of outcome, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutcomeKind {
    /// `completed` published.
    Completed,
    /// `failed` published (and dead-lettered).
    Failed,
    /// Dead-lettered without an event (no usable task id).
    DeadLettered,
    /// Pushed back for another attempt (counted).
    Retried,
    /// Pushed back as it was because the worker is stopping (not counted).
    Released,
}

impl OutcomeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Completed => "completed",
            OutcomeKind::Failed => "failed",
            OutcomeKind::DeadLettered => "dead-lettered",
            OutcomeKind::Retried => "requeued for another attempt",
            OutcomeKind::Released => "requeued (worker stopping)",
        }
    }
}

/// Result of [`Keys::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Applied now.
    Applied,
    /// Had been applied before (a retry).
    AlreadyApplied,
    /// Not applied: another worker holds the lease.
    LeaseLost,
}

/// Result of a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// The lease was ours and is refreshed.
    Refreshed,
    /// The lease had vanished and is ours again.
    Retaken,
    /// Another worker holds it.
    Lost,
}

impl Keys {
    /// Tries to take the lease (`SET NX EX`). `Err(Some((owner, ttl)))` when another worker
    /// holds it.
    pub(crate) fn acquire_lease(
        &self,
        con: &mut Connection,
    ) -> RedisResult<Result<(), (String, i64)>> {
        let set: Option<String> = redis::cmd("SET")
            .arg(&self.lease)
            .arg(&self.owner)
            .arg("NX")
            .arg("EX")
            .arg(ttl_secs(self.lease_ttl))
            .query(con)?;
        if set.is_some() {
            return Ok(Ok(()));
        }
        let (owner, ttl): (Option<String>, i64) =
            redis::pipe().get(&self.lease).ttl(&self.lease).query(con)?;
        Ok(Err((owner.unwrap_or_default(), ttl)))
    }

    /// Refreshes the lease and (when `state` is given) writes `gpu_status:{gpu}` with its TTL.
    pub(crate) fn heartbeat(
        &self,
        con: &mut Connection,
        state: Option<keys::WorkerState>,
    ) -> RedisResult<Beat> {
        let r: i64 = redis::cmd("EVAL")
            .arg(HEARTBEAT)
            .arg(2)
            .arg(&self.lease)
            .arg(&self.status)
            .arg(&self.owner)
            .arg(ttl_secs(self.lease_ttl))
            .arg(state.map(|s| s.as_str()).unwrap_or(""))
            .arg(ttl_secs(self.status_ttl))
            .query(con)?;
        Ok(match r {
            -1 => Beat::Lost,
            2 => Beat::Retaken,
            _ => Beat::Refreshed,
        })
    }

    /// Deletes the status key and the lease, if the lease is still ours.
    pub(crate) fn release(&self, con: &mut Connection) -> RedisResult<bool> {
        let r: i64 = redis::cmd("EVAL")
            .arg(RELEASE)
            .arg(2)
            .arg(&self.lease)
            .arg(&self.status)
            .arg(&self.owner)
            .query(con)?;
        Ok(r == 1)
    }

    /// The current lease holder.
    pub(crate) fn lease_holder(&self, con: &mut Connection) -> RedisResult<Option<String>> {
        redis::cmd("GET").arg(&self.lease).query(con)
    }

    /// `BLMOVE queue processing LEFT RIGHT timeout`: the next item, or `None` after `timeout`.
    pub(crate) fn claim(
        &self,
        con: &mut Connection,
        timeout: Duration,
    ) -> RedisResult<Option<Vec<u8>>> {
        redis::cmd("BLMOVE")
            .arg(&self.queue)
            .arg(&self.processing)
            .arg("LEFT")
            .arg("RIGHT")
            .arg(timeout.as_secs_f64())
            .query(con)
    }

    /// Everything in this worker's processing list, oldest first.
    pub(crate) fn leftovers(&self, con: &mut Connection) -> RedisResult<Vec<Vec<u8>>> {
        redis::cmd("LRANGE")
            .arg(&self.processing)
            .arg(0)
            .arg(-1)
            .query(con)
    }

    /// Publishes a non-terminal event and stores it as the task's latest event; with
    /// `reset_result`, first deletes the task's old result (task ids are reused).
    pub(crate) fn publish(
        &self,
        con: &mut Connection,
        event: &ProgressEvent,
        reset_result: bool,
    ) -> RedisResult<()> {
        let payload = self.schema.encode(event);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if reset_result {
            pipe.del(keys::task_result(&event.task_id)).ignore();
        }
        pipe.cmd("SET")
            .arg(keys::latest_event(&event.task_id))
            .arg(&payload)
            .arg("EX")
            .arg(ttl_secs(self.event_ttl))
            .ignore()
            .cmd("PUBLISH")
            .arg(&self.channel)
            .arg(&payload)
            .ignore();
        pipe.query(con)
    }

    /// Applies an outcome (see the [module docs](self)).
    pub(crate) fn record(
        &self,
        con: &mut Connection,
        outcome: &OutcomeRecord,
    ) -> RedisResult<Recorded> {
        let marker = outcome_marker(&outcome.claim_id);
        let payload = outcome
            .event
            .as_ref()
            .map(|e| self.schema.encode(e))
            .unwrap_or_default();
        let (latest, result) = match &outcome.event {
            Some(e) => (
                keys::latest_event(&e.task_id),
                keys::task_result(&e.task_id),
            ),
            None => (marker.clone(), marker.clone()),
        };
        let legacy = match (&outcome.event, self.schema) {
            (Some(e), Schema::Legacy) => e.task_id.clone(),
            _ => String::new(),
        };
        let dead_letter = outcome
            .dead_letter
            .as_ref()
            .map(|d| d.to_json())
            .unwrap_or_default();
        let r: i64 = redis::cmd("EVAL")
            .arg(RECORD_OUTCOME)
            .arg(8)
            .arg(&self.lease)
            .arg(&self.processing)
            .arg(&marker)
            .arg(&self.queue)
            .arg(&latest)
            .arg(&result)
            .arg(keys::DEAD_LETTER_LIST)
            .arg(keys::LEGACY_TASK_SET)
            .arg(&self.owner)
            .arg(ttl_secs(self.lease_ttl))
            .arg(&outcome.raw)
            .arg(outcome.requeue.as_deref().unwrap_or(b""))
            .arg(&payload)
            .arg(&self.channel)
            .arg(ttl_secs(self.event_ttl))
            .arg(ttl_secs(self.result_ttl))
            .arg(&dead_letter)
            .arg(keys::DEAD_LETTER_MAX_LEN)
            .arg(&legacy)
            .arg(ttl_secs(self.result_ttl))
            .query(con)?;
        Ok(match r {
            1 => Recorded::Applied,
            0 => Recorded::AlreadyApplied,
            _ => Recorded::LeaseLost,
        })
    }
}

/// `host:pid:random`, the value of the lease key.
pub(crate) fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &rand[..12])
}
