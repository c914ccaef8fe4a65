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
//! 1. **fence**: unless `worker_lease:{gpu}` holds this worker's id, nothing is written: held
//!    by another worker, this one was cut off longer than the lease TTL and its items were
//!    recovered by the other; missing (expired, or Redis lost its data), the reporter waits for
//!    the heartbeat to take it again and retries;
//! 2. **once**: if `worker_outcome:{claim_id}` exists the outcome was already applied (a retry
//!    after a reply lost with the connection), nothing is written;
//! 3. **still ours**: if the claimed item is no longer in the processing list (`LPOS`), it was
//!    recovered by someone else, nothing is written;
//! 4. the marker is set first, so that a write Redis refuses (out of memory, disk errors) fails
//!    the script before anything changed; then `LREM` the item from the processing list and
//!    `LPUSH` it (or its requeue envelope) back onto the queue when requeued, or `ZADD` it to
//!    the queue's [`keys::task_delayed`] set, due after the deferral's delay by Redis's clock;
//! 5. for a terminal outcome: `SET task_progress:{id}`, `SET task_result:{id}` (TTLs) and
//!    `PUBLISH` the event, byte-identical in all three; a cancel request for the task
//!    ([`keys::task_cancel`]) is done with and deleted;
//! 6. `RPUSH` the dead letter (trimmed to the newest [`keys::DEAD_LETTER_MAX_LEN`]), and in
//!    the legacy schema `SREM all_task_ids {task_id}`; the claim leaves the worker's
//!    [`keys::worker_active`] hash.
//!
//! So a crash can neither publish two terminal events for one claim nor lose the task: before
//! the script the item is still in the processing list (and is recovered at the next start),
//! after it the item is gone and its outcome is published. A script is used rather than
//! `MULTI`/`EXEC` because steps 1–2 are conditions that a transaction cannot express.

use std::time::Duration;

use echomimic_protocol::{keys, DeadLetter, ErrorCode, ProgressEvent, Schema};
use redis::{Connection, RedisResult};

/// The idempotency marker of one claim's outcome: `worker_outcome:{claim_id}`.
pub fn outcome_marker(claim_id: &str) -> String {
    format!("worker_outcome:{claim_id}")
}

/// See the [module docs](self).
pub(crate) const RECORD_OUTCOME: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return -1 end
  return -2
end
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if not redis.call('LPOS', KEYS[2], ARGV[3]) then return -3 end
redis.call('SET', KEYS[3], '1', 'EX', ARGV[12])
redis.call('LREM', KEYS[2], 1, ARGV[3])
if ARGV[4] ~= '' then
  if ARGV[14] ~= '' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('ZADD', KEYS[11], now + tonumber(ARGV[14]), ARGV[4])
  else
    redis.call('LPUSH', KEYS[4], ARGV[4])
  end
end
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[7])
  redis.call('SET', KEYS[6], ARGV[5], 'EX', ARGV[8])
  redis.call('PUBLISH', ARGV[6], ARGV[5])
  redis.call('DEL', KEYS[10])
end
if ARGV[9] ~= '' then
  redis.call('RPUSH', KEYS[7], ARGV[9])
  redis.call('LTRIM', KEYS[7], -tonumber(ARGV[10]), -1)
end
if ARGV[11] ~= '' then redis.call('SREM', KEYS[8], ARGV[11]) end
redis.call('HDEL', KEYS[9], ARGV[13])
return 1
"#;

/// Moves up to `ARGV[1]` items of the delayed set `KEYS[1]` that are due (score at or before
/// Redis's clock, in ms) to the head of the queue `KEYS[2]`; returns how many.
const PROMOTE_DUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, item in ipairs(due) do
  redis.call('ZREM', KEYS[1], item)
  redis.call('LPUSH', KEYS[2], item)
end
return #due
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

/// Publishes a non-terminal event and stores it as the task's latest event, only while the
/// lease is this worker's (fenced like an outcome); with a non-empty `ARGV[5]`, first deletes
/// the task's old result. 1 when published, 0 when not ours.
const PUBLISH_EVENT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[5] ~= '' then redis.call('DEL', KEYS[3]) end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"#;

/// Takes the lease over from `ARGV[1]` (a holder proven dead) if it still holds it.
const TAKE_OVER: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
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
    /// [`keys::task_delayed`] of the queue.
    pub(crate) delayed: String,
    pub(crate) processing: String,
    pub(crate) lease: String,
    pub(crate) status: String,
    /// [`keys::worker_active`] of this gpu id.
    pub(crate) active: String,
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
    /// Pushed onto the head of the queue (requeue), or with `delay` into the delayed set.
    pub(crate) requeue: Option<Vec<u8>>,
    /// Put `requeue` aside in [`keys::task_delayed`] for this long instead (a deferral).
    pub(crate) delay: Option<Duration>,
    /// The terminal event (published and persisted).
    pub(crate) event: Option<ProgressEvent>,
    /// Appended to the dead-letter list.
    pub(crate) dead_letter: Option<DeadLetter>,
    /// What kind of outcome this is.
    pub(crate) what: OutcomeKind,
    /// The error code behind a failure or a retry (for the metrics; the event and the dead
    /// letter carry their own).
    pub(crate) code: Option<ErrorCode>,
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
    /// `failed` with the code `cancelled` published on request (not dead-lettered).
    Cancelled,
    /// Put aside in the queue's delayed set (not counted): the temp-file API is down.
    Deferred,
}

impl OutcomeKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Completed => "completed",
            OutcomeKind::Failed => "failed",
            OutcomeKind::DeadLettered => "dead-lettered",
            OutcomeKind::Retried => "requeued for another attempt",
            OutcomeKind::Released => "requeued (worker stopping)",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::Deferred => "put aside until the temp-file API is back",
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
    /// Not applied: the lease is missing (expired or lost with Redis's data); applied once the
    /// heartbeat has taken it again.
    LeaseMissing,
    /// Not applied: the item is no longer in the processing list (recovered by another worker).
    ClaimGone,
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
    /// `reset_result`, first deletes the task's old result (task ids are reused). Fenced: false
    /// (nothing written) when the lease is not this worker's.
    pub(crate) fn publish(
        &self,
        con: &mut Connection,
        event: &ProgressEvent,
        reset_result: bool,
    ) -> RedisResult<bool> {
        let payload = self.schema.encode(event);
        let r: i64 = redis::cmd("EVAL")
            .arg(PUBLISH_EVENT)
            .arg(3)
            .arg(&self.lease)
            .arg(keys::latest_event(&event.task_id))
            .arg(keys::task_result(&event.task_id))
            .arg(&self.owner)
            .arg(&payload)
            .arg(ttl_secs(self.event_ttl))
            .arg(&self.channel)
            .arg(if reset_result { "1" } else { "" })
            .query(con)?;
        Ok(r == 1)
    }

    /// Marks a claim as worked on (`Some(raw)`) or as waiting (`None`) in [`keys::worker_active`].
    pub(crate) fn set_active(
        &self,
        con: &mut Connection,
        claim_id: &str,
        raw: Option<&[u8]>,
    ) -> RedisResult<()> {
        match raw {
            Some(raw) => redis::cmd("HSET")
                .arg(&self.active)
                .arg(claim_id)
                .arg(raw)
                .query(con),
            None => redis::cmd("HDEL")
                .arg(&self.active)
                .arg(claim_id)
                .query(con),
        }
    }

    /// The raw items of [`keys::worker_active`] (left by a previous run), and deletes the hash.
    pub(crate) fn take_active(&self, con: &mut Connection) -> RedisResult<Vec<Vec<u8>>> {
        let (items,): (Vec<Vec<u8>>,) = redis::pipe()
            .atomic()
            .cmd("HVALS")
            .arg(&self.active)
            .cmd("DEL")
            .arg(&self.active)
            .ignore()
            .query(con)?;
        Ok(items)
    }

    /// The lease's holder and its remaining time in milliseconds (`-1`: no expiry, `-2`: gone).
    pub(crate) fn lease_state(&self, con: &mut Connection) -> RedisResult<(Option<String>, i64)> {
        redis::pipe().get(&self.lease).pttl(&self.lease).query(con)
    }

    /// Takes the lease from `dead_owner` if it still holds it; true when taken.
    pub(crate) fn take_over_lease(
        &self,
        con: &mut Connection,
        dead_owner: &str,
    ) -> RedisResult<bool> {
        let r: i64 = redis::cmd("EVAL")
            .arg(TAKE_OVER)
            .arg(1)
            .arg(&self.lease)
            .arg(dead_owner)
            .arg(&self.owner)
            .arg(ttl_secs(self.lease_ttl))
            .query(con)?;
        Ok(r == 1)
    }

    /// Moves the items of the queue's delayed set that are due back to the head of the queue
    /// (at most 100 per call); returns how many.
    pub(crate) fn promote_due(&self, con: &mut Connection) -> RedisResult<u64> {
        redis::cmd("EVAL")
            .arg(PROMOTE_DUE)
            .arg(2)
            .arg(&self.delayed)
            .arg(&self.queue)
            .arg(100)
            .query(con)
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
        let (latest, result, cancel) = match &outcome.event {
            Some(e) => (
                keys::latest_event(&e.task_id),
                keys::task_result(&e.task_id),
                keys::task_cancel(&e.task_id),
            ),
            None => (marker.clone(), marker.clone(), marker.clone()),
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
            .arg(11)
            .arg(&self.lease)
            .arg(&self.processing)
            .arg(&marker)
            .arg(&self.queue)
            .arg(&latest)
            .arg(&result)
            .arg(keys::DEAD_LETTER_LIST)
            .arg(keys::LEGACY_TASK_SET)
            .arg(&self.active)
            .arg(&cancel)
            .arg(&self.delayed)
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
            .arg(&outcome.claim_id)
            .arg(
                outcome
                    .delay
                    .map(|d| d.as_millis().to_string())
                    .unwrap_or_default(),
            )
            .query(con)?;
        Ok(match r {
            1 => Recorded::Applied,
            0 => Recorded::AlreadyApplied,
            -2 => Recorded::LeaseMissing,
            -3 => Recorded::ClaimGone,
            _ => Recorded::LeaseLost,
        })
    }
}

/// This machine's host name.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned())
}

/// `host:pid:random`, the value of the lease key.
pub(crate) fn owner_id() -> String {
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{}:{}:{}", host_name(), std::process::id(), &rand[..12])
}

/// The host and pid of a lease value written by [`owner_id`].
pub(crate) fn owner_host_pid(owner: &str) -> Option<(&str, u32)> {
    let mut parts = owner.rsplitn(3, ':');
    let _rand = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    Some((parts.next()?, pid))
}

/// True when process `pid` exists on this machine (Linux: `/proc/{pid}`); `None` where that
/// cannot be told.
pub(crate) fn process_alive(pid: u32) -> Option<bool> {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    Some(proc.join(pid.to_string()).exists())
}

#[cfg(test)]
mod tests {
    use super::*;
    use echomimic_protocol::{Stage, Task};
    use echomimic_testkit::redis::{unique, Cleanup, TestRedis};

    /// Database 13: the worker's integration tests use 12, the protocol's 11.
    const REDIS: TestRedis = TestRedis {
        env_var: "ECHOMIMIC_WORKER_UNIT_REDIS_URL",
        default_url: "redis://127.0.0.1:6379/13",
    };

    /// Keys of a made-up worker, their clean-up, and a connection.
    fn setup() -> Option<(Keys, Cleanup, Connection)> {
        let client = REDIS.client()?;
        let tag = unique("store", "t");
        let keys = Keys {
            owner: owner_id(),
            queue: format!("{tag}:queue"),
            delayed: format!("{tag}:delayed"),
            processing: format!("{tag}:processing"),
            lease: format!("{tag}:lease"),
            status: format!("{tag}:status"),
            active: format!("{tag}:active"),
            channel: format!("{tag}:channel"),
            schema: Schema::Default,
            lease_ttl: Duration::from_secs(30),
            status_ttl: Duration::from_secs(30),
            event_ttl: Duration::from_secs(30),
            result_ttl: Duration::from_secs(30),
        };
        let task_keys = ["t-store"]
            .iter()
            .flat_map(|t| [keys::latest_event(t), keys::task_result(t)]);
        let mut all = vec![
            keys.queue.clone(),
            keys.delayed.clone(),
            keys.processing.clone(),
            keys.lease.clone(),
            keys.status.clone(),
            keys.active.clone(),
            outcome_marker(&format!("{tag}-claim")),
        ];
        all.extend(task_keys);
        let con = client.get_connection().ok()?;
        Some((keys, Cleanup::new(client, all), con))
    }

    fn completed(keys: &Keys, raw: &[u8]) -> OutcomeRecord {
        let claim_id = format!("{}-claim", keys.queue.trim_end_matches(":queue"));
        OutcomeRecord {
            claim_id,
            raw: raw.to_vec(),
            requeue: None,
            event: Some(ProgressEvent::completed(
                "t-store",
                "s",
                "video",
                "done".to_owned(),
            )),
            dead_letter: None,
            what: OutcomeKind::Completed,
            code: None,
            delay: None,
        }
    }

    fn exists(con: &mut Connection, key: &str) -> bool {
        redis::cmd("EXISTS").arg(key).query::<i64>(con).unwrap() == 1
    }

    #[test]
    fn an_outcome_is_written_only_with_our_lease_and_our_claim() {
        let Some((keys, _cleanup, mut con)) = setup() else {
            return;
        };
        let raw = Task::new("t-store", "s", "i", "a").to_json().into_bytes();
        let record = completed(&keys, &raw);
        let marker = outcome_marker(&record.claim_id);
        let _: () = redis::cmd("RPUSH")
            .arg(&keys.processing)
            .arg(&raw)
            .query(&mut con)
            .unwrap();
        keys.set_active(&mut con, &record.claim_id, Some(&raw))
            .unwrap();

        // No lease: nothing written, the reporter waits for the heartbeat to take it again.
        assert_eq!(
            keys.record(&mut con, &record).unwrap(),
            Recorded::LeaseMissing
        );
        // Another worker's lease: nothing written.
        let _: () = redis::cmd("SET")
            .arg(&keys.lease)
            .arg("other:1:x")
            .query(&mut con)
            .unwrap();
        assert_eq!(keys.record(&mut con, &record).unwrap(), Recorded::LeaseLost);
        assert!(!exists(&mut con, &marker));
        assert!(!exists(&mut con, &keys::task_result("t-store")));
        // Ours, but the claim left the processing list (recovered elsewhere): nothing written.
        assert!(keys.acquire_lease(&mut con).unwrap().is_err());
        let _: () = redis::cmd("DEL").arg(&keys.lease).query(&mut con).unwrap();
        assert!(keys.acquire_lease(&mut con).unwrap().is_ok());
        let _: () = redis::cmd("LREM")
            .arg(&keys.processing)
            .arg(1)
            .arg(&raw)
            .query(&mut con)
            .unwrap();
        assert_eq!(keys.record(&mut con, &record).unwrap(), Recorded::ClaimGone);
        assert!(!exists(&mut con, &marker));
        assert!(!exists(&mut con, &keys::task_result("t-store")));
        // Ours and claimed: applied once, the active mark gone.
        let _: () = redis::cmd("RPUSH")
            .arg(&keys.processing)
            .arg(&raw)
            .query(&mut con)
            .unwrap();
        assert_eq!(keys.record(&mut con, &record).unwrap(), Recorded::Applied);
        assert_eq!(
            keys.record(&mut con, &record).unwrap(),
            Recorded::AlreadyApplied
        );
        assert!(exists(&mut con, &keys::task_result("t-store")));
        assert!(!exists(&mut con, &keys.processing));
        assert!(keys.take_active(&mut con).unwrap().is_empty());
    }

    #[test]
    fn a_deferred_item_waits_in_the_delayed_set_until_due_then_heads_the_queue() {
        let Some((keys, _cleanup, mut con)) = setup() else {
            return;
        };
        let raw = Task::new("t-store", "s", "i", "a").to_json().into_bytes();
        let _: () = redis::cmd("RPUSH")
            .arg(&keys.processing)
            .arg(&raw)
            .query(&mut con)
            .unwrap();
        let _: () = redis::cmd("RPUSH")
            .arg(&keys.queue)
            .arg("next")
            .query(&mut con)
            .unwrap();
        assert!(keys.acquire_lease(&mut con).unwrap().is_ok());
        let mut record = completed(&keys, &raw);
        record.event = None;
        record.what = OutcomeKind::Deferred;
        record.requeue = Some(b"later".to_vec());
        record.delay = Some(Duration::from_millis(400));
        assert_eq!(keys.record(&mut con, &record).unwrap(), Recorded::Applied);
        assert!(!exists(&mut con, &keys.processing));
        let zcard = |con: &mut Connection| -> u64 {
            redis::cmd("ZCARD").arg(&keys.delayed).query(con).unwrap()
        };
        assert_eq!(zcard(&mut con), 1);
        // Not due yet: nothing moves.
        assert_eq!(keys.promote_due(&mut con).unwrap(), 0);
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(keys.promote_due(&mut con).unwrap(), 1);
        assert_eq!(zcard(&mut con), 0);
        let queue: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&keys.queue)
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .unwrap();
        assert_eq!(queue, vec![b"later".to_vec(), b"next".to_vec()]);
    }

    #[test]
    fn events_are_published_only_under_our_lease() {
        let Some((keys, _cleanup, mut con)) = setup() else {
            return;
        };
        let event = ProgressEvent::stage("t-store", "s", Stage::Inference, 50.0, "m");
        assert!(!keys.publish(&mut con, &event, false).unwrap(), "no lease");
        let _: () = redis::cmd("SET")
            .arg(&keys.lease)
            .arg("other:1:x")
            .query(&mut con)
            .unwrap();
        assert!(
            !keys.publish(&mut con, &event, false).unwrap(),
            "not our lease"
        );
        assert!(!exists(&mut con, &keys::latest_event("t-store")));
        let _: () = redis::cmd("SET")
            .arg(&keys.lease)
            .arg(&keys.owner)
            .query(&mut con)
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(keys::task_result("t-store"))
            .arg("old")
            .query(&mut con)
            .unwrap();
        assert!(keys.publish(&mut con, &event, true).unwrap());
        assert!(exists(&mut con, &keys::latest_event("t-store")));
        assert!(!exists(&mut con, &keys::task_result("t-store")), "reset");
    }

    #[test]
    fn active_marks_are_taken_once() {
        let Some((keys, _cleanup, mut con)) = setup() else {
            return;
        };
        keys.set_active(&mut con, "c1", Some(b"one")).unwrap();
        keys.set_active(&mut con, "c2", Some(b"two")).unwrap();
        keys.set_active(&mut con, "c2", None).unwrap();
        assert_eq!(keys.take_active(&mut con).unwrap(), vec![b"one".to_vec()]);
        assert!(keys.take_active(&mut con).unwrap().is_empty());
    }

    #[test]
    fn a_dead_holders_lease_is_taken_over_only_while_it_holds_it() {
        let Some((keys, _cleanup, mut con)) = setup() else {
            return;
        };
        let _: () = redis::cmd("SET")
            .arg(&keys.lease)
            .arg("h:1:dead")
            .query(&mut con)
            .unwrap();
        assert!(!keys.take_over_lease(&mut con, "h:2:other").unwrap());
        assert!(keys.take_over_lease(&mut con, "h:1:dead").unwrap());
        let (holder, ttl) = keys.lease_state(&mut con).unwrap();
        assert_eq!(holder.as_deref(), Some(keys.owner.as_str()));
        assert!(ttl > 25_000, "{ttl}");
    }

    #[test]
    fn owner_ids_name_host_and_pid() {
        let me = owner_id();
        assert_eq!(
            owner_host_pid(&me),
            Some((host_name().as_str(), std::process::id()))
        );
        assert_eq!(owner_host_pid("a:b"), None);
        assert_eq!(owner_host_pid("h:x:r"), None);
        assert_eq!(process_alive(std::process::id()), Some(true));
        assert_eq!(process_alive(999_999_999), Some(false));
    }
}
