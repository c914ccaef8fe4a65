//! Blocking client helpers over the `redis` crate (feature `redis`).
//!
//! ```no_run
//! # fn main() -> Result<(), echomimic_protocol::ProtocolError> {
//! use std::time::Duration;
//! use echomimic_protocol::{client, keys, Task};
//!
//! let redis = redis::Client::open(client::connection_info("localhost", 6379, 0, None)?)?;
//! let mut con = redis.get_connection()?;
//! let task = Task::new("t-1", "s-1", "550e8400-e29b-41d4-a716-446655440000", "661f9511-f3ac-52e5-b827-557766551111");
//! client::submit_task(&mut con, &keys::task_queue(0), &task)?;
//! let opts = client::FollowOptions { timeout: Duration::from_secs(600), ..Default::default() };
//! let last = client::follow_task(&redis, &task.task_id, &opts, |e| println!("{} {:?}", e.status, e.progress))?;
//! # Ok(()) }
//! ```

use std::time::{Duration, Instant};

use redis::{Commands, ConnectionLike};

use crate::error::{InvalidTask, ProtocolError};
use crate::keys::{self, WorkerState};
use crate::progress::ProgressEvent;
use crate::task::Task;

/// Connection settings from the guide's variables (`REDIS_HOST`, `REDIS_PORT`, `REDIS_DB`,
/// `REDIS_PASSWORD`). An empty password means none. [`RedisSettings`] adds an ACL user name
/// and TLS.
pub fn connection_info(
    host: &str,
    port: u16,
    db: i64,
    password: Option<&str>,
) -> Result<redis::ConnectionInfo, ProtocolError> {
    RedisSettings {
        host,
        port,
        db,
        username: None,
        password,
        tls: false,
    }
    .connection_info()
}

/// Where and how to reach Redis as deployed: host, port and database, an ACL user
/// (`REDIS_USERNAME`; Redis 6+) with its password, and TLS (`rediss://`; the server's
/// certificate is checked against the system's roots, or against a CA given to
/// `redis::Client::build_with_tls`). Empty strings mean none.
#[derive(Debug, Clone, Copy)]
pub struct RedisSettings<'a> {
    /// Host name or address (IPv6 without brackets).
    pub host: &'a str,
    /// TCP port.
    pub port: u16,
    /// Database index.
    pub db: i64,
    /// ACL user name; `None` or empty = the default user.
    pub username: Option<&'a str>,
    /// Password (of `username`, or of the default user); `None` or empty = none.
    pub password: Option<&'a str>,
    /// Connect with TLS.
    pub tls: bool,
}

impl RedisSettings<'_> {
    /// The connection info for `redis::Client::open` (or `build_with_tls`).
    pub fn connection_info(&self) -> Result<redis::ConnectionInfo, ProtocolError> {
        use redis::IntoConnectionInfo;
        let mut settings = redis::RedisConnectionInfo::default().set_db(self.db);
        if let Some(user) = self.username.filter(|u| !u.is_empty()) {
            settings = settings.set_username(user);
        }
        if let Some(pw) = self.password.filter(|p| !p.is_empty()) {
            settings = settings.set_password(pw);
        }
        let addr = if self.tls {
            let host = if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.to_owned()
            };
            format!("rediss://{host}:{}", self.port).into_connection_info()?
        } else {
            (self.host, self.port).into_connection_info()?
        };
        Ok(addr.set_redis_settings(settings))
    }
}

/// Validates `task`, clears its per-task keys ([`keys::latest_event`], [`keys::task_result`],
/// [`keys::task_cancel`]) so an old run with the same id cannot be mistaken for this one, and
/// `RPUSH`es it onto `queue`,
/// all in one `MULTI`. Returns the queue length after the push.
pub fn submit_task(
    con: &mut impl ConnectionLike,
    queue: &str,
    task: &Task,
) -> Result<u64, ProtocolError> {
    let json = task.to_json();
    if let Err(problem) = task.validate() {
        return Err(InvalidTask::new(problem, json.as_bytes(), None, None).into());
    }
    let (len,): (u64,) = redis::pipe()
        .atomic()
        .del(keys::latest_event(&task.task_id))
        .ignore()
        .del(keys::task_result(&task.task_id))
        .ignore()
        .del(keys::task_cancel(&task.task_id))
        .ignore()
        .rpush(queue, json)
        .query(con)?;
    Ok(len)
}

/// Reads `gpu_status:{gpu_id}`; `None` when the key is missing (no live worker).
pub fn read_worker_state(
    con: &mut impl ConnectionLike,
    gpu_id: u32,
) -> Result<Option<WorkerState>, ProtocolError> {
    let value: Option<String> = con.get(keys::gpu_status(gpu_id))?;
    Ok(value.as_deref().map(WorkerState::parse))
}

/// Reads the persisted terminal event of a task ([`keys::task_result`]), in either schema.
pub fn read_result(
    con: &mut impl ConnectionLike,
    task_id: &str,
) -> Result<Option<ProgressEvent>, ProtocolError> {
    read_event_key(con, &keys::task_result(task_id))
}

/// Reads the last event published for a task ([`keys::latest_event`]), in either schema.
pub fn read_latest_event(
    con: &mut impl ConnectionLike,
    task_id: &str,
) -> Result<Option<ProgressEvent>, ProtocolError> {
    read_event_key(con, &keys::latest_event(task_id))
}

fn read_event_key(
    con: &mut impl ConnectionLike,
    key: &str,
) -> Result<Option<ProgressEvent>, ProtocolError> {
    let raw: Option<Vec<u8>> = con.get(key)?;
    raw.map(|raw| ProgressEvent::parse_any(&raw)).transpose()
}

/// Options of [`follow_task`].
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// The progress channel (`PROGRESS_CHANNEL`).
    pub channel: String,
    /// Give up after this long without a terminal event.
    pub timeout: Duration,
    /// While no message arrives, re-read [`keys::task_result`] this often (covers a client that
    /// listens on the wrong channel, or a publish that happened while the connection was down).
    pub recheck_interval: Duration,
}

impl Default for FollowOptions {
    /// Channel `task_progress`, timeout 30 minutes, re-check every 5 seconds.
    fn default() -> Self {
        FollowOptions {
            channel: keys::DEFAULT_PROGRESS_CHANNEL.to_owned(),
            timeout: Duration::from_secs(30 * 60),
            recheck_interval: Duration::from_secs(5),
        }
    }
}

/// Follows one task until its terminal event and returns that event.
///
/// Subscribes to the channel first, then reads the persisted keys, so nothing published in
/// between is missed: a stored result is returned at once, a stored latest event is reported.
/// Then every message on the channel for `task_id` (either schema) is passed to `on_event`;
/// other tasks' messages and undecodable messages are skipped, and an event identical to the one
/// just reported is not reported twice. Returns [`ProtocolError::FollowTimeout`] (with the last
/// event seen) when `opts.timeout` passes first. Uses two connections from `client`.
pub fn follow_task(
    client: &redis::Client,
    task_id: &str,
    opts: &FollowOptions,
    mut on_event: impl FnMut(&ProgressEvent),
) -> Result<ProgressEvent, ProtocolError> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut kv = client.get_connection()?;
    let mut sub_con = client.get_connection()?;
    let mut pubsub = sub_con.as_pubsub();
    pubsub.subscribe(&opts.channel)?;

    let mut last: Option<ProgressEvent> = None;
    let mut report = |event: ProgressEvent, last: &mut Option<ProgressEvent>| {
        if last.as_ref() != Some(&event) {
            on_event(&event);
        }
        *last = Some(event);
    };

    if let Some(result) = read_result(&mut kv, task_id)? {
        report(result.clone(), &mut last);
        return Ok(result);
    }
    if let Some(latest) = read_latest_event(&mut kv, task_id)? {
        let terminal = latest.is_terminal();
        report(latest.clone(), &mut last);
        if terminal {
            return Ok(latest);
        }
    }

    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(ProtocolError::FollowTimeout {
                task_id: task_id.to_owned(),
                waited: now - started,
                last: last.map(Box::new),
            });
        }
        let wait = (deadline - now)
            .min(opts.recheck_interval)
            .max(Duration::from_millis(1));
        pubsub.set_read_timeout(Some(wait))?;
        match pubsub.get_message() {
            Ok(msg) => {
                let Ok(event) = ProgressEvent::parse_any(msg.get_payload_bytes()) else {
                    continue;
                };
                if event.task_id != task_id {
                    continue;
                }
                let terminal = event.is_terminal();
                report(event.clone(), &mut last);
                if terminal {
                    return Ok(event);
                }
            }
            Err(e) if e.is_timeout() => {
                if let Some(result) = read_result(&mut kv, task_id)? {
                    report(result.clone(), &mut last);
                    return Ok(result);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes a queued item (`ARGV[1]`) from `KEYS[1]` (a queue list, or with `ARGV[7]` = `z` a
/// [`keys::task_delayed`] sorted set) and, only when it was still there, records its `failed` event as a worker records a terminal event: `SET` the latest event
/// and the result (TTLs), `PUBLISH` it, delete the cancel request, and in the legacy schema
/// `SREM` the task id. 1 when removed, 0 when a worker claimed it first.
const DEQUEUE_CANCELLED: &str = r#"
local removed
if ARGV[7] == 'z' then
  removed = redis.call('ZREM', KEYS[1], ARGV[1])
else
  removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
end
if removed ~= 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[5])
redis.call('PUBLISH', ARGV[3], ARGV[2])
redis.call('DEL', KEYS[4])
if ARGV[6] ~= '' then redis.call('SREM', KEYS[5], ARGV[6]) end
return 1
"#;

/// Options of [`cancel_task`].
#[derive(Debug, Clone)]
pub struct CancelOptions {
    /// The progress channel (`PROGRESS_CHANNEL`) the `failed` event of a queued task goes to.
    pub channel: String,
    /// The event schema the workers publish in.
    pub schema: crate::Schema,
    /// Queues to look in besides those found in Redis (every `task_queue_gpu_*` list and every
    /// queue a worker said it serves, [`keys::worker_queue`]): a custom `TASK_QUEUE_NAME` that
    /// no worker has served yet.
    pub queues: Vec<String>,
}

impl Default for CancelOptions {
    fn default() -> Self {
        CancelOptions {
            channel: keys::DEFAULT_PROGRESS_CHANNEL.to_owned(),
            schema: crate::Schema::Default,
            queues: Vec::new(),
        }
    }
}

/// What [`cancel_task`] found and did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Cancellation {
    /// The task was still queued: it was removed from `queue` and its `failed` event (code
    /// `cancelled`) published and stored.
    Dequeued {
        /// The queue it was removed from.
        queue: String,
        /// The event published.
        event: ProgressEvent,
    },
    /// A worker holds the task (in `processing`): it stops it between two UNet calls (or
    /// before its run) and publishes the `failed` event; follow the task to see it.
    Requested {
        /// The processing list holding the claim.
        processing: String,
    },
    /// The task had already finished: its terminal event. Nothing was changed.
    Finished(ProgressEvent),
    /// No queued, running or finished task has this id. Nothing was changed.
    Unknown,
}

/// Every key matching `pattern` (`SCAN`, so a large database is not blocked), sorted.
pub fn scan_keys(con: &mut impl ConnectionLike, pattern: &str) -> redis::RedisResult<Vec<String>> {
    let mut cursor = 0u64;
    let mut found = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(con)?;
        found.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The queues found in Redis: every `task_queue_gpu_*` list, every queue named by a worker's
/// [`keys::worker_queue`] key and every queue with a [`keys::task_delayed`] set, sorted,
/// without duplicates.
pub fn known_queues(con: &mut impl ConnectionLike) -> Result<Vec<String>, ProtocolError> {
    let mut queues = scan_keys(con, &format!("{}*", keys::TASK_QUEUE_PREFIX))?;
    for key in scan_keys(con, &format!("{}*", keys::WORKER_QUEUE_PREFIX))? {
        let named: Option<String> = con.get(&key)?;
        queues.extend(named);
    }
    for key in scan_keys(con, &format!("{}*", keys::TASK_DELAYED_PREFIX))? {
        if let Some(queue) = key.strip_prefix(keys::TASK_DELAYED_PREFIX) {
            queues.push(queue.to_owned());
        }
    }
    queues.sort();
    queues.dedup();
    Ok(queues)
}

/// True when a raw queue item carries `task_id`.
fn item_is(raw: &[u8], task_id: &str) -> bool {
    crate::QueueItem::parse(raw).task_id() == Some(task_id)
}

/// Cancels a task by id, wherever it is:
///
/// 1. writes the cancel request [`keys::task_cancel`] (first, so that a worker claiming the
///    task meanwhile sees it);
/// 2. a task still in a queue, or waiting out a temp-file outage in the queue's
///    [`keys::task_delayed`] set, is removed (atomically: only if no worker claimed it first) and
///    gets its one `failed` event with the code [`ErrorCode::Cancelled`](crate::ErrorCode);
/// 3. a task a worker holds (in a `task_processing:*` list) is left to that worker, which stops
///    it between two UNet calls and publishes the `failed` event;
/// 4. otherwise the request is withdrawn and the task's stored result (finished) or
///    [`Cancellation::Unknown`] is returned.
pub fn cancel_task(
    con: &mut impl ConnectionLike,
    task_id: &str,
    opts: &CancelOptions,
) -> Result<Cancellation, ProtocolError> {
    let request = keys::task_cancel(task_id);
    redis::cmd("SET")
        .arg(&request)
        .arg(1)
        .arg("EX")
        .arg(keys::CANCEL_TTL_SECS)
        .query::<()>(con)?;
    let mut queues = known_queues(con)?;
    queues.extend(opts.queues.iter().cloned());
    queues.sort();
    queues.dedup();
    for queue in &queues {
        let delayed = keys::task_delayed(queue);
        for (key, sorted_set) in [(queue.as_str(), false), (delayed.as_str(), true)] {
            let items: Vec<Vec<u8>> = if sorted_set {
                con.zrange(key, 0, -1)?
            } else {
                con.lrange(key, 0, -1)?
            };
            for raw in items.iter().filter(|raw| item_is(raw, task_id)) {
                let item = crate::QueueItem::parse(raw);
                let session = item
                    .task()
                    .map(|t| t.session_id)
                    .unwrap_or_else(|e| e.session_id().unwrap_or_default().to_owned());
                let event = ProgressEvent::failed(
                    task_id,
                    session,
                    crate::ErrorCode::Cancelled,
                    "the task was cancelled on request before it started",
                );
                let payload = opts.schema.encode(&event);
                let legacy = if opts.schema == crate::Schema::Legacy {
                    task_id
                } else {
                    ""
                };
                let removed: i64 = redis::cmd("EVAL")
                    .arg(DEQUEUE_CANCELLED)
                    .arg(5)
                    .arg(key)
                    .arg(keys::latest_event(task_id))
                    .arg(keys::task_result(task_id))
                    .arg(&request)
                    .arg(keys::LEGACY_TASK_SET)
                    .arg(raw.as_slice())
                    .arg(&payload)
                    .arg(&opts.channel)
                    .arg(keys::EVENT_TTL_SECS)
                    .arg(keys::RESULT_TTL_SECS)
                    .arg(legacy)
                    .arg(if sorted_set { "z" } else { "" })
                    .query(con)?;
                if removed == 1 {
                    return Ok(Cancellation::Dequeued {
                        queue: queue.clone(),
                        event,
                    });
                }
            }
        }
    }
    for processing in scan_keys(con, &format!("{}*", keys::PROCESSING_LIST_PREFIX))? {
        let items: Vec<Vec<u8>> = con.lrange(&processing, 0, -1)?;
        if items.iter().any(|raw| item_is(raw, task_id)) {
            return Ok(Cancellation::Requested { processing });
        }
    }
    con.del::<_, ()>(&request)?;
    Ok(match read_result(con, task_id)? {
        Some(event) => Cancellation::Finished(event),
        None => Cancellation::Unknown,
    })
}
