//! What travels on the task queue and the dead-letter list.
//!
//! A queue item is either a task exactly as a client pushed it, or a task the worker pushed back
//! after an interrupted attempt, wrapped in an envelope that counts attempts (see
//! [`crate::keys`] for the whole claim/requeue/dead-letter design):
//!
//! ```json
//! {"attempts": 1, "last_error": "worker restarted while the task was running",
//!  "task": {"task_id": "t-1", "session_id": "s-1", "ref_image_id": "…", "audio_id": "…"}}
//! ```
//!
//! An object is taken as an envelope when it has an object `task`, an integer `attempts`, and no
//! `task_id` of its own.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{InvalidTask, ProtocolError, RawExcerpt, TaskProblem};
use crate::progress::ErrorCode;
use crate::task::Task;

/// Largest payload a dead letter keeps, in bytes (longer ones are cut and flagged).
pub const DEAD_LETTER_PAYLOAD_MAX: usize = 64 * 1024;

/// One item popped from a task queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueItem {
    raw: Vec<u8>,
    attempts: u32,
    last_error: Option<String>,
    /// Unix time (s) of the first temp-file outage that deferred this task, if one did.
    outage_since: Option<u64>,
    /// The task JSON: the whole item for a plain task, the `task` member of an envelope,
    /// `None` when the item is not JSON at all.
    task: Option<Value>,
    envelope: bool,
    /// Set by [`QueueItem::parse_bounded`] when the item was over the limit (not parsed).
    too_large: Option<Box<TooLarge>>,
}

/// What is known of an item over the size limit.
#[derive(Debug, Clone, PartialEq)]
struct TooLarge {
    max: usize,
    task_id: Option<String>,
    session_id: Option<String>,
}

/// The two ids of a task, read by streaming over the item: every other member is skipped
/// by the parser without being built (no JSON tree, no copy of the big member).
#[derive(Deserialize)]
struct Ids {
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    session_id: Option<String>,
}

impl TooLarge {
    fn scan(raw: &[u8], max: usize) -> Self {
        let ids: Option<Ids> = serde_json::from_slice(raw).ok();
        let valid = |id: Option<String>| id.filter(|id| crate::task::is_valid_id(id));
        let (task_id, session_id) = match ids {
            Some(ids) => (valid(ids.task_id), valid(ids.session_id)),
            None => (None, None),
        };
        TooLarge {
            max,
            task_id,
            session_id,
        }
    }
}

impl QueueItem {
    /// Classifies a raw item. Never fails: validation happens in [`QueueItem::task`].
    pub fn parse(raw: &[u8]) -> Self {
        let value: Option<Value> = serde_json::from_slice(raw).ok();
        if let Some(Value::Object(obj)) = &value {
            let attempts = obj.get("attempts").and_then(Value::as_u64);
            let inner = obj.get("task").filter(|t| t.is_object());
            if let (Some(attempts), Some(inner), false) =
                (attempts, inner, obj.contains_key("task_id"))
            {
                return QueueItem {
                    raw: raw.to_vec(),
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    last_error: obj
                        .get("last_error")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    outage_since: obj.get("outage_since").and_then(Value::as_u64),
                    task: Some(inner.clone()),
                    envelope: true,
                    too_large: None,
                };
            }
        }
        QueueItem {
            raw: raw.to_vec(),
            attempts: 0,
            last_error: None,
            outage_since: None,
            task: value,
            envelope: false,
            too_large: None,
        }
    }

    /// Like [`QueueItem::parse`], but an item longer than `max_bytes` is not parsed into a
    /// JSON tree: only its top-level `task_id` and `session_id` are looked for (streaming,
    /// other members skipped), so that the client can still get a `failed` event.
    /// [`QueueItem::task`] then fails with [`TaskProblem::ItemTooLarge`], the item cannot be
    /// requeued, and its dead letter keeps only the start of it. A worker uses this so that a
    /// huge item (by mistake or malice) costs one copy of its bytes, never a tree.
    pub fn parse_bounded(raw: &[u8], max_bytes: usize) -> Self {
        if raw.len() <= max_bytes {
            return QueueItem::parse(raw);
        }
        QueueItem {
            raw: raw.to_vec(),
            attempts: 0,
            last_error: None,
            outage_since: None,
            task: None,
            envelope: false,
            too_large: Some(Box::new(TooLarge::scan(raw, max_bytes))),
        }
    }

    /// The task id the item carries (its `task_id` member, inside the envelope for a requeued
    /// item), valid or not; `None` when it has none or is not JSON.
    pub fn task_id(&self) -> Option<&str> {
        if let Some(big) = &self.too_large {
            return big.task_id.as_deref();
        }
        self.task.as_ref()?.get("task_id")?.as_str()
    }

    /// True when [`QueueItem::parse_bounded`] refused to parse the item.
    pub fn is_too_large(&self) -> bool {
        self.too_large.is_some()
    }

    /// The item exactly as it was popped (use it for `LREM` on the processing list).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// How many attempts were started on this task before this one (0 for a fresh task).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Why the previous attempt ended, for a requeued task.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// When a temp-file outage first deferred this task (Unix time in seconds), for an item
    /// deferred by [`QueueItem::deferred`] (and not attempted successfully since).
    pub fn outage_since(&self) -> Option<u64> {
        self.outage_since
    }

    /// True when the worker requeued this item.
    pub fn is_requeued(&self) -> bool {
        self.envelope
    }

    /// Validates the task (see [`Task::from_json`]).
    pub fn task(&self) -> Result<Task, InvalidTask> {
        if let Some(big) = &self.too_large {
            let problem = TaskProblem::ItemTooLarge {
                len: self.raw.len(),
                max: big.max,
            };
            return Err(InvalidTask::new(
                problem,
                &self.raw,
                big.task_id.clone(),
                big.session_id.clone(),
            ));
        }
        match (&self.task, self.envelope) {
            (Some(value), true) => Task::from_value(value),
            _ => Task::from_json(&self.raw),
        }
    }

    /// The envelope to push back for another attempt: `attempts` + 1 and `last_error` set.
    /// `None` when the item is not JSON (it can only be dead-lettered).
    pub fn requeued(&self, last_error: &str) -> Option<String> {
        let task = self.task.as_ref()?;
        Some(
            json!({
                "attempts": self.attempts.saturating_add(1),
                "last_error": last_error,
                "task": task,
            })
            .to_string(),
        )
    }

    /// The envelope for a task put aside while the temp-file API is down (see
    /// [`crate::keys::task_delayed`]): `attempts` unchanged (an outage is not the task's
    /// fault), `last_error` set, `outage_since` kept from an earlier deferral or set to `now`
    /// (Unix seconds), and `deferral`, the id of the claim that deferred it, which keeps two
    /// deferrals of identical tasks apart in the sorted set. `None` when the item is not JSON.
    pub fn deferred(&self, last_error: &str, now: u64, deferral: &str) -> Option<String> {
        let task = self.task.as_ref()?;
        Some(
            json!({
                "attempts": self.attempts,
                "last_error": last_error,
                "outage_since": self.outage_since.unwrap_or(now),
                "deferral": deferral,
                "task": task,
            })
            .to_string(),
        )
    }

    /// The task as the client sent it (unwrapped from an envelope), as text.
    pub fn original_payload(&self) -> String {
        match (&self.task, self.envelope) {
            (Some(value), true) => value.to_string(),
            // Never more than a dead letter keeps (+ one UTF-8 character to cut at).
            _ if self.too_large.is_some() => {
                let end = self.raw.len().min(DEAD_LETTER_PAYLOAD_MAX + 4);
                String::from_utf8_lossy(&self.raw[..end]).into_owned()
            }
            _ => String::from_utf8_lossy(&self.raw).into_owned(),
        }
    }
}

/// A task given up on, as stored in [`DEAD_LETTER_LIST`](crate::keys::DEAD_LETTER_LIST).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The task as the client sent it (unwrapped), lossy UTF-8, cut at [`DEAD_LETTER_PAYLOAD_MAX`] bytes.
    pub payload: String,
    /// True when `payload` was cut.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub payload_truncated: bool,
    /// Human-readable reason.
    pub reason: String,
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// Attempts started on the task, this one included.
    pub attempts: u32,
    /// When it was given up, Unix time in seconds.
    pub failed_at: u64,
    /// The task id, when the payload had a usable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The worker's GPU id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_id: Option<u32>,
    /// The queue the task came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

impl DeadLetter {
    /// A dead letter for `item`, counting the attempt that just ended.
    pub fn new(
        item: &QueueItem,
        code: ErrorCode,
        reason: impl Into<String>,
        failed_at: u64,
    ) -> Self {
        let mut payload = item.original_payload();
        let payload_truncated = payload.len() > DEAD_LETTER_PAYLOAD_MAX;
        if payload_truncated {
            let mut end = DEAD_LETTER_PAYLOAD_MAX;
            while !payload.is_char_boundary(end) {
                end -= 1;
            }
            payload.truncate(end);
        }
        let task_id = match item.task() {
            Ok(task) => Some(task.task_id),
            Err(e) => e.task_id().map(str::to_owned),
        };
        DeadLetter {
            payload,
            payload_truncated,
            reason: reason.into(),
            code,
            attempts: item.attempts().saturating_add(1),
            failed_at,
            task_id,
            gpu_id: None,
            queue: None,
        }
    }

    /// Sets `gpu_id` and `queue`.
    pub fn with_origin(mut self, gpu_id: u32, queue: impl Into<String>) -> Self {
        self.gpu_id = Some(gpu_id);
        self.queue = Some(queue.into());
        self
    }

    /// The record as compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Decodes a record read from the dead-letter list.
    pub fn from_json(raw: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(raw).map_err(|source| ProtocolError::Decode {
            what: "dead letter",
            source,
            raw: RawExcerpt::new(raw),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK: &str =
        r#"{"task_id":"t-1","session_id":"s-1","ref_image_id":"img","audio_id":"aud"}"#;

    #[test]
    fn a_deferral_keeps_the_count_and_the_first_outage_and_a_retry_forgets_it() {
        let fresh = QueueItem::parse(TASK.as_bytes());
        assert_eq!(fresh.outage_since(), None);
        let once = QueueItem::parse(fresh.deferred("api down", 100, "c1").unwrap().as_bytes());
        assert!(once.is_requeued());
        assert_eq!((once.attempts(), once.outage_since()), (0, Some(100)));
        assert_eq!(once.last_error(), Some("api down"));
        assert_eq!(once.task().unwrap().task_id, "t-1");
        let value = |s: String| serde_json::from_str::<Value>(&s).unwrap();
        assert_eq!(
            value(once.original_payload()),
            value(fresh.original_payload())
        );
        let twice = QueueItem::parse(once.deferred("still down", 500, "c2").unwrap().as_bytes());
        assert_eq!((twice.attempts(), twice.outage_since()), (0, Some(100)));
        // The same task deferred by two claims makes two distinct members.
        assert_ne!(
            fresh.deferred("x", 1, "c1").unwrap(),
            fresh.deferred("x", 1, "c2").unwrap()
        );
        // A counted retry (the downloads worked, the model failed) starts a new outage clock.
        let retried = QueueItem::parse(twice.requeued("model failed").unwrap().as_bytes());
        assert_eq!((retried.attempts(), retried.outage_since()), (1, None));
        assert!(QueueItem::parse(b"not json")
            .deferred("x", 1, "c")
            .is_none());
    }

    #[test]
    fn an_item_over_the_limit_is_not_parsed_and_its_dead_letter_is_cut() {
        let small = QueueItem::parse_bounded(TASK.as_bytes(), TASK.len());
        assert!(!small.is_too_large() && small.task().is_ok());
        let mut big = String::from(
            r#"{"task_id":"t-9","session_id":"s","ref_image_id":"i","audio_id":"a","x":""#,
        );
        big.push_str(&"a".repeat(200_000));
        big.push_str("\"}");
        let item = QueueItem::parse_bounded(big.as_bytes(), 1024);
        assert!(item.is_too_large());
        let err = item.task().unwrap_err();
        assert!(matches!(
            err.problem(),
            TaskProblem::ItemTooLarge { len, max: 1024 } if *len == big.len()
        ));
        assert!(err.to_string().contains("not parsed"), "{err}");
        assert_eq!(err.task_id(), Some("t-9"), "the ids are still found");
        assert_eq!(err.session_id(), Some("s"));
        let no_ids = QueueItem::parse_bounded(&[b'['; 5000], 1024);
        assert_eq!(no_ids.task().unwrap_err().task_id(), None);
        assert!(item.requeued("x").is_none());
        let dl = DeadLetter::new(&item, ErrorCode::InvalidTask, err.to_string(), 0);
        assert!(dl.payload_truncated);
        assert_eq!(dl.payload.len(), DEAD_LETTER_PAYLOAD_MAX);
        assert!(dl.payload.starts_with(r#"{"task_id":"t-9""#));
    }

    #[test]
    fn plain_item_then_two_requeues() {
        let item = QueueItem::parse(TASK.as_bytes());
        assert_eq!(item.attempts(), 0);
        assert!(!item.is_requeued());
        assert_eq!(item.task().unwrap().task_id, "t-1");

        let again = QueueItem::parse(item.requeued("worker restarted").unwrap().as_bytes());
        assert!(again.is_requeued());
        assert_eq!(again.attempts(), 1);
        assert_eq!(again.last_error(), Some("worker restarted"));
        assert_eq!(again.task().unwrap(), item.task().unwrap());
        assert_eq!(
            serde_json::from_str::<Value>(&again.original_payload()).unwrap(),
            serde_json::from_str::<Value>(TASK).unwrap()
        );

        let third = QueueItem::parse(again.requeued("again").unwrap().as_bytes());
        assert_eq!(third.attempts(), 2);
    }

    #[test]
    fn task_with_extra_task_field_is_not_an_envelope() {
        let raw = r#"{"task_id":"t","session_id":"s","ref_image_id":"i","audio_id":"a","attempts":3,"task":{}}"#;
        let item = QueueItem::parse(raw.as_bytes());
        assert!(!item.is_requeued());
        assert_eq!(item.attempts(), 0);
        assert!(item.task().is_ok());
    }

    #[test]
    fn garbage_cannot_be_requeued_but_can_be_dead_lettered() {
        let item = QueueItem::parse(b"not json");
        assert!(item.requeued("x").is_none());
        assert!(item.task().is_err());
        let dl = DeadLetter::new(&item, ErrorCode::InvalidTask, "not json", 1_700_000_000)
            .with_origin(0, "task_queue_gpu_0");
        assert_eq!(dl.payload, "not json");
        assert_eq!(dl.attempts, 1);
        assert_eq!(dl.task_id, None);
        let back = DeadLetter::from_json(dl.to_json().as_bytes()).unwrap();
        assert_eq!(back, dl);
    }

    #[test]
    fn dead_letter_keeps_task_id_of_an_invalid_task() {
        let raw = r#"{"task_id":"t-9","session_id":"s","ref_image_id":"http://x","audio_id":"a"}"#;
        let dl = DeadLetter::new(
            &QueueItem::parse(raw.as_bytes()),
            ErrorCode::InvalidTask,
            "url",
            0,
        );
        assert_eq!(dl.task_id.as_deref(), Some("t-9"));
    }

    #[test]
    fn dead_letter_payload_is_capped() {
        let big = format!("\"{}\"", "x".repeat(DEAD_LETTER_PAYLOAD_MAX * 2));
        let dl = DeadLetter::new(
            &QueueItem::parse(big.as_bytes()),
            ErrorCode::InvalidTask,
            "big",
            0,
        );
        assert!(dl.payload_truncated);
        assert_eq!(dl.payload.len(), DEAD_LETTER_PAYLOAD_MAX);
    }
}
