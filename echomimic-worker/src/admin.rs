//! The operator's commands: `status`, `dlq list|requeue|purge` and `cancel`, over the same
//! Redis settings (flags and environment) as `serve`.
//!
//! Each command writes its report to the writer it is given (stdout in the binary), as text
//! or, with `--json`, as one JSON document, and returns the process exit status: 0 when it
//! did what was asked, 1 when there was nothing to act on (an unknown task id, a task already
//! finished), 2 when a cancellation was requested but not yet answered within `--wait-secs`.
//! Connection and Redis errors are [`WorkerError`]s (exit status of the error).

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use echomimic_protocol::client::{self, CancelOptions, Cancellation, FollowOptions};
use echomimic_protocol::{keys, DeadLetter, ErrorCode, ProgressEvent, QueueItem, Status};
use redis::{Commands, Connection};
use serde::Serialize;

use crate::config::{EventSchema, RedisArgs};
use crate::error::WorkerError;

/// Flags of `echomimic-worker status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub redis: RedisArgs,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `echomimic-worker dlq`.
#[derive(Debug, Clone, Args)]
pub struct DlqArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub redis: RedisArgs,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: DlqCommand,
}

/// What to do with the dead-letter list (`task_dead_letter`).
#[derive(Debug, Clone, Subcommand)]
pub enum DlqCommand {
    /// Show the newest dead letters, oldest first.
    List {
        /// How many (the newest).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print one JSON array of the stored dead letters instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put tasks back on their queues with a fresh attempt count (their stale events are
    /// cleared, as a new submit does) and remove their dead letters.
    Requeue {
        /// The task ids to requeue.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        task_ids: Vec<String>,
        /// Every dead letter that can be requeued.
        #[arg(long)]
        all: bool,
        /// The queue to push onto, instead of the one each dead letter came from.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
    },
    /// Remove dead letters: all of them, or those older than an age.
    Purge {
        /// Only those given up longer ago than this: `90s`, `30m`, `12h`, `7d` (a bare
        /// number is seconds).
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Option<Duration>,
    },
}

/// Flags of `echomimic-worker cancel`.
#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub redis: RedisArgs,
    /// The task to cancel.
    pub task_id: String,
    /// Progress channel the workers publish on.
    #[arg(long = "channel", env = "PROGRESS_CHANNEL", default_value = keys::DEFAULT_PROGRESS_CHANNEL)]
    pub channel: String,
    /// Event schema the workers publish in.
    #[arg(long, env = "ECHOMIMIC_EVENT_SCHEMA", value_enum, default_value_t)]
    pub schema: EventSchema,
    /// A queue to look in besides those found in Redis (`task_queue_gpu_*`, and the queue each
    /// worker serves): a custom queue name no worker has served yet. Repeatable.
    #[arg(long = "queue", env = "TASK_QUEUE_NAME", value_name = "NAME")]
    pub queues: Vec<String>,
    /// For a running task: how long to wait for the worker's `failed` event (0 = do not wait).
    #[arg(long, default_value_t = 60)]
    pub wait_secs: u64,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `90s`, `30m`, `12h`, `7d`, or seconds.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s}: expected a number and a unit (s, m, h, d), e.g. 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{s}: unknown unit {unit:?} (s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

fn connect(redis: &RedisArgs) -> Result<(redis::Client, Connection), WorkerError> {
    let client = redis.client()?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| redis_error(redis, e))?;
    Ok((client, con))
}

fn redis_error(redis: &RedisArgs, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Admin(format!("redis {}: {e}", redis.describe()))
}

fn out_error(e: std::io::Error) -> WorkerError {
    WorkerError::Internal(format!("writing the report: {e}"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `42 s`, `3 min`, `5 h`, `2 d`.
fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} d", s / 86_400),
    }
}

/// A task a worker is working on, with its last event.
#[derive(Debug, Clone, Serialize)]
pub struct RunningTask {
    /// The task id (`?` when the item has none).
    pub task_id: String,
    /// The last event's status.
    pub status: Option<String>,
    /// The last event's progress, in percent.
    pub progress: Option<f32>,
    /// The last event's message.
    pub message: Option<String>,
}

/// One gpu id as Redis describes it.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    /// The gpu id.
    pub gpu_id: u32,
    /// `gpu_status:{gpu}`: `idle`, `busy`, or `None` (no live worker).
    pub status: Option<String>,
    /// `worker_lease:{gpu}`: the holder's id (`host:pid:random`).
    pub lease_holder: Option<String>,
    /// Seconds left on the lease.
    pub lease_ttl_secs: Option<i64>,
    /// The queue it serves (`worker_queue:{gpu}`, else the default name).
    pub queue: String,
    /// Items waiting in that queue.
    pub queue_depth: u64,
    /// Tasks of that queue put aside during a temp-file outage (`task_delayed:{queue}`).
    pub delayed: u64,
    /// Items in `task_processing:{gpu}` (claimed, not settled).
    pub processing: u64,
    /// The tasks being worked on (`worker_active:{gpu}`).
    pub running: Vec<RunningTask>,
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Every gpu id found in Redis, in order.
    pub gpus: Vec<GpuReport>,
    /// Entries in `task_dead_letter`.
    pub dead_letters: u64,
}

/// The gpu ids some key names (`gpu_status:*`, `worker_lease:*`, `worker_queue:*`,
/// `task_processing:*`, `worker_active:*`, `task_queue_gpu_*`).
fn gpu_ids(con: &mut Connection) -> redis::RedisResult<BTreeSet<u32>> {
    let active_prefix = keys::worker_active(0);
    let active_prefix = active_prefix.trim_end_matches('0');
    let mut ids = BTreeSet::new();
    for prefix in [
        keys::GPU_STATUS_PREFIX,
        keys::WORKER_LEASE_PREFIX,
        keys::WORKER_QUEUE_PREFIX,
        keys::PROCESSING_LIST_PREFIX,
        active_prefix,
        keys::TASK_QUEUE_PREFIX,
    ] {
        for key in client::scan_keys(con, &format!("{prefix}*"))? {
            if let Ok(id) = key[prefix.len()..].parse::<u32>() {
                ids.insert(id);
            }
        }
    }
    Ok(ids)
}

/// Reads what `status` shows.
pub fn status_report(con: &mut Connection) -> Result<StatusReport, WorkerError> {
    let e = WorkerError::Redis;
    let mut gpus = Vec::new();
    for gpu_id in gpu_ids(con)? {
        let lease = keys::worker_lease(gpu_id);
        let (status, lease_holder, ttl, queue): (
            Option<String>,
            Option<String>,
            i64,
            Option<String>,
        ) = redis::pipe()
            .get(keys::gpu_status(gpu_id))
            .get(&lease)
            .ttl(&lease)
            .get(keys::worker_queue(gpu_id))
            .query(con)
            .map_err(e)?;
        let queue = queue.unwrap_or_else(|| keys::task_queue(gpu_id));
        let (queue_depth, delayed, processing, active): (u64, u64, u64, Vec<Vec<u8>>) =
            redis::pipe()
                .llen(&queue)
                .zcard(keys::task_delayed(&queue))
                .llen(keys::processing_list(gpu_id))
                .hvals(keys::worker_active(gpu_id))
                .query(con)
                .map_err(e)?;
        let mut running = Vec::new();
        for raw in active {
            let item = QueueItem::parse(&raw);
            let task_id = item.task_id().unwrap_or("?").to_owned();
            let last = match item.task_id() {
                Some(id) => client::read_latest_event(con, id).ok().flatten(),
                None => None,
            };
            running.push(RunningTask {
                task_id,
                status: last.as_ref().map(|l| l.status.as_str().to_owned()),
                progress: last.as_ref().and_then(|l| l.progress),
                message: last.and_then(|l| l.message),
            });
        }
        gpus.push(GpuReport {
            gpu_id,
            status,
            lease_ttl_secs: lease_holder.as_ref().map(|_| ttl),
            lease_holder,
            queue,
            queue_depth,
            delayed,
            processing,
            running,
        });
    }
    let dead_letters: u64 = con.llen(keys::DEAD_LETTER_LIST).map_err(e)?;
    Ok(StatusReport { gpus, dead_letters })
}

/// `echomimic-worker status`.
pub fn status(args: &StatusArgs, out: &mut impl Write) -> Result<u8, WorkerError> {
    let (_, mut con) = connect(&args.redis)?;
    let report = status_report(&mut con)?;
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        writeln!(out, "{text}").map_err(out_error)?;
        return Ok(0);
    }
    if report.gpus.is_empty() {
        writeln!(
            out,
            "no worker, queue or claim found in {}",
            args.redis.describe()
        )
        .map_err(out_error)?;
    }
    for g in &report.gpus {
        let lease = match (&g.lease_holder, g.lease_ttl_secs) {
            (Some(h), Some(t)) => format!("lease {h} ({t} s left)"),
            _ => "no lease".to_owned(),
        };
        writeln!(
            out,
            "gpu {}: {}, {lease}; queue {}: {} waiting{}; {} claimed",
            g.gpu_id,
            g.status.as_deref().unwrap_or("offline"),
            g.queue,
            g.queue_depth,
            if g.delayed > 0 {
                format!(" (+{} put aside during a temp-file outage)", g.delayed)
            } else {
                String::new()
            },
            g.processing
        )
        .map_err(out_error)?;
        for r in &g.running {
            writeln!(
                out,
                "  running {}: {} {} {}",
                r.task_id,
                r.status.as_deref().unwrap_or("-"),
                r.progress.map(|p| format!("{p:.1}%")).unwrap_or_default(),
                r.message.as_deref().unwrap_or("")
            )
            .map_err(out_error)?;
        }
    }
    writeln!(out, "dead letters: {}", report.dead_letters).map_err(out_error)?;
    Ok(0)
}

/// One entry of the dead-letter list: its raw bytes and what they say (`None` when it is not a
/// dead letter this version can read).
type Entry = (Vec<u8>, Option<DeadLetter>);

/// The dead-letter list as stored.
fn dead_letters(con: &mut Connection) -> Result<Vec<Entry>, WorkerError> {
    let raw: Vec<Vec<u8>> = con.lrange(keys::DEAD_LETTER_LIST, 0, -1)?;
    Ok(raw
        .into_iter()
        .map(|r| {
            let dl = DeadLetter::from_json(&r).ok();
            (r, dl)
        })
        .collect())
}

/// Moves one dead letter back onto a queue, only if it is still in the list (two operators
/// requeueing at once requeue it once), clearing the task's stale per-task keys.
const REQUEUE: &str = r#"
if redis.call('LREM', KEYS[1], 1, ARGV[1]) ~= 1 then return 0 end
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"#;

/// `echomimic-worker dlq …`.
pub fn dlq(args: &DlqArgs, out: &mut impl Write) -> Result<u8, WorkerError> {
    let (_, mut con) = connect(&args.redis)?;
    let entries = dead_letters(&mut con)?;
    let now = unix_now();
    match &args.command {
        DlqCommand::List { limit, json } => {
            let start = entries.len().saturating_sub(*limit);
            let shown = &entries[start..];
            if *json {
                let values: Vec<serde_json::Value> = shown
                    .iter()
                    .map(|(raw, _)| {
                        serde_json::from_slice(raw).unwrap_or_else(|_| {
                            serde_json::Value::String(String::from_utf8_lossy(raw).into_owned())
                        })
                    })
                    .collect();
                let text = serde_json::to_string_pretty(&values)
                    .map_err(|e| WorkerError::Internal(e.to_string()))?;
                writeln!(out, "{text}").map_err(out_error)?;
                return Ok(0);
            }
            writeln!(
                out,
                "{} dead letter(s){}",
                entries.len(),
                if shown.len() < entries.len() {
                    format!(", the newest {} shown", shown.len())
                } else {
                    String::new()
                }
            )
            .map_err(out_error)?;
            for (raw, dl) in shown {
                match dl {
                    Some(d) => writeln!(
                        out,
                        "{}  {}  {} ago  attempts {}  queue {}  {}",
                        d.task_id.as_deref().unwrap_or("(no task id)"),
                        d.code,
                        age(now.saturating_sub(d.failed_at)),
                        d.attempts,
                        d.queue.as_deref().unwrap_or("?"),
                        d.reason
                    ),
                    None => writeln!(out, "(unreadable) {}", String::from_utf8_lossy(raw)),
                }
                .map_err(out_error)?;
            }
            Ok(0)
        }
        DlqCommand::Requeue {
            task_ids,
            all,
            queue,
        } => {
            let mut requeued = 0usize;
            let mut missing: BTreeSet<&str> = task_ids.iter().map(String::as_str).collect();
            for (raw, dl) in &entries {
                let Some(d) = dl else { continue };
                let wanted = *all
                    || d.task_id
                        .as_deref()
                        .is_some_and(|t| task_ids.iter().any(|w| w == t));
                if !wanted {
                    continue;
                }
                let id = d.task_id.clone().unwrap_or_default();
                missing.remove(id.as_str());
                if d.payload_truncated || d.task_id.is_none() {
                    writeln!(
                        out,
                        "{}: not requeued: {}",
                        if id.is_empty() { "(no task id)" } else { &id },
                        if d.payload_truncated {
                            "its payload was cut when it was dead-lettered"
                        } else {
                            "it has no task id (not a valid task)"
                        }
                    )
                    .map_err(out_error)?;
                    continue;
                }
                let target = match (queue, &d.queue, d.gpu_id) {
                    (Some(q), _, _) | (None, Some(q), _) => q.clone(),
                    (None, None, Some(g)) => keys::task_queue(g),
                    (None, None, None) => {
                        writeln!(out, "{id}: not requeued: no queue known (pass --queue)")
                            .map_err(out_error)?;
                        continue;
                    }
                };
                let moved: i64 = redis::cmd("EVAL")
                    .arg(REQUEUE)
                    .arg(5)
                    .arg(keys::DEAD_LETTER_LIST)
                    .arg(&target)
                    .arg(keys::latest_event(&id))
                    .arg(keys::task_result(&id))
                    .arg(keys::task_cancel(&id))
                    .arg(raw.as_slice())
                    .arg(&d.payload)
                    .query(&mut con)?;
                if moved == 1 {
                    requeued += 1;
                    writeln!(out, "{id}: requeued on {target}").map_err(out_error)?;
                }
            }
            for id in &missing {
                writeln!(out, "{id}: no dead letter with this task id").map_err(out_error)?;
            }
            writeln!(out, "{requeued} task(s) requeued").map_err(out_error)?;
            Ok(if requeued > 0 && missing.is_empty() {
                0
            } else {
                1
            })
        }
        DlqCommand::Purge { older_than } => {
            let mut removed = 0u64;
            for (raw, dl) in &entries {
                let old_enough = match (older_than, dl) {
                    (None, _) => true,
                    (Some(min), Some(d)) => now.saturating_sub(d.failed_at) >= min.as_secs(),
                    (Some(_), None) => false,
                };
                if old_enough {
                    let n: u64 = con.lrem(keys::DEAD_LETTER_LIST, 1, raw.as_slice())?;
                    removed += n;
                }
            }
            writeln!(
                out,
                "{removed} dead letter(s) removed, {} left",
                entries.len() as u64 - removed
            )
            .map_err(out_error)?;
            Ok(0)
        }
    }
}

/// What `cancel --json` prints.
#[derive(Debug, Serialize)]
struct CancelReport {
    task_id: String,
    /// `dequeued`, `cancelled`, `requested`, `finished`, `unknown`.
    result: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<ProgressEvent>,
}

/// `echomimic-worker cancel <task_id>`.
pub fn cancel(args: &CancelArgs, out: &mut impl Write) -> Result<u8, WorkerError> {
    let (client_, mut con) = connect(&args.redis)?;
    let opts = CancelOptions {
        channel: args.channel.clone(),
        schema: args.schema.into(),
        queues: args.queues.clone(),
    };
    let found = client::cancel_task(&mut con, &args.task_id, &opts)
        .map_err(|e| redis_error(&args.redis, e))?;
    let id = args.task_id.clone();
    let (code, report) = match found {
        Cancellation::Dequeued { queue, event } => (
            0,
            CancelReport {
                task_id: id,
                result: "dequeued",
                detail: format!("removed from {queue} before any worker claimed it"),
                event: Some(event),
            },
        ),
        Cancellation::Finished(event) => (
            1,
            CancelReport {
                task_id: id,
                result: "finished",
                detail: format!("already finished ({})", event.status.as_str()),
                event: Some(event),
            },
        ),
        Cancellation::Unknown => (
            1,
            CancelReport {
                task_id: id,
                result: "unknown",
                detail: "no queued, running or finished task has this id".into(),
                event: None,
            },
        ),
        Cancellation::Requested { processing } if args.wait_secs == 0 => (
            2,
            CancelReport {
                task_id: id,
                result: "requested",
                detail: format!(
                    "claimed by a worker ({processing}); it stops the task between two UNet calls"
                ),
                event: None,
            },
        ),
        Cancellation::Requested { processing } => {
            let follow = FollowOptions {
                channel: args.channel.clone(),
                timeout: Duration::from_secs(args.wait_secs),
                ..FollowOptions::default()
            };
            match client::follow_task(&client_, &args.task_id, &follow, |_| {}) {
                Ok(event) if event.code == Some(ErrorCode::Cancelled) => (
                    0,
                    CancelReport {
                        task_id: id,
                        result: "cancelled",
                        detail: "stopped by its worker".into(),
                        event: Some(event),
                    },
                ),
                Ok(event) => (
                    1,
                    CancelReport {
                        task_id: id,
                        result: "finished",
                        detail: format!(
                            "it finished ({}{}) before the cancellation reached it",
                            event.status.as_str(),
                            match (event.status, event.code) {
                                (Status::Failed, Some(c)) => format!(", {c}"),
                                _ => String::new(),
                            }
                        ),
                        event: Some(event),
                    },
                ),
                Err(echomimic_protocol::ProtocolError::FollowTimeout { .. }) => (
                    2,
                    CancelReport {
                        task_id: id,
                        result: "requested",
                        detail: format!(
                            "claimed by a worker ({processing}); no answer within {} s (the \
                             request stays for {} s)",
                            args.wait_secs,
                            keys::CANCEL_TTL_SECS
                        ),
                        event: None,
                    },
                ),
                Err(e) => return Err(redis_error(&args.redis, e)),
            }
        }
        _ => {
            return Err(WorkerError::Internal(
                "cancel: an answer this version does not know".into(),
            ))
        }
    };
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| WorkerError::Internal(e.to_string()))?;
        writeln!(out, "{text}").map_err(out_error)?;
    } else {
        writeln!(
            out,
            "{}: {}: {}",
            report.task_id, report.result, report.detail
        )
        .map_err(out_error)?;
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_units() {
        assert_eq!(parse_age("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_age("7w").is_err());
        assert!(parse_age("d").is_err());
        assert_eq!(age(59), "59 s");
        assert_eq!(age(3600), "60 min");
        assert_eq!(age(200_000), "2 d");
    }
}
