//! One claimed queue item on its way through the worker, and the outcome records it ends with.
//!
//! Every claim gets a fresh id (`Claim::id`, a UUID) that names it in logs and in the outcome
//! marker: task ids are not unique (the EchoMe webapp reuses one per session), so nothing is
//! keyed by `task_id` inside the worker.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use echomimic_protocol::{DeadLetter, ErrorCode, ProgressEvent, QueueItem, Stage, Task};

use crate::config::TaskDefaults;
use crate::engine::GenParams;
use crate::error::{Retry, WorkerError};
use crate::progress::Monotonic;
use crate::reporter::ReporterHandle;
use crate::store::{OutcomeKind, OutcomeRecord};

/// A claimed queue item.
#[derive(Debug)]
pub(crate) struct Claim {
    pub(crate) id: Arc<str>,
    pub(crate) item: QueueItem,
    pub(crate) claimed_at: Instant,
}

impl Claim {
    /// A claim of `raw`; an item over `max_bytes` is not parsed (see
    /// [`QueueItem::parse_bounded`]).
    pub(crate) fn new(raw: &[u8], max_bytes: usize) -> Self {
        Claim {
            id: Arc::from(uuid::Uuid::new_v4().simple().to_string()),
            item: QueueItem::parse_bounded(raw, max_bytes),
            claimed_at: Instant::now(),
        }
    }

    /// The number of this attempt, 1-based.
    pub(crate) fn attempt(&self) -> u32 {
        self.item.attempts().saturating_add(1)
    }
}

/// How a requeue reason written by the watchdog starts ([`Policy::hung`]).
const HUNG: &str = "the model made no progress";

/// Where outcomes go and how many attempts a task gets.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) max_attempts: u32,
    pub(crate) gpu_id: u32,
    pub(crate) queue: String,
    /// Longest queue item parsed (`--max-item-bytes`).
    pub(crate) max_item_bytes: usize,
    /// How a temp-file outage met while downloading is waited out across attempts.
    pub(crate) outage: OutageWait,
}

/// How long a task whose downloads met a temp-file outage is put aside before its next try
/// (`--outage-delay-secs`), and for how long in all, counted from the first time it was put
/// aside (`--outage-total-secs`; zero: never put aside, it fails at once).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutageWait {
    pub(crate) delay: Duration,
    pub(crate) total: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Policy {
    /// A claim of a raw item, bounded by `max_item_bytes`.
    pub(crate) fn claim(&self, raw: &[u8]) -> Claim {
        Claim::new(raw, self.max_item_bytes)
    }
    /// The video is ready.
    pub(crate) fn completed(
        &self,
        claim: &Claim,
        task: &Task,
        video_file_id: &str,
        message: String,
    ) -> OutcomeRecord {
        OutcomeRecord {
            claim_id: claim.id.to_string(),
            raw: claim.item.raw().to_vec(),
            requeue: None,
            event: Some(ProgressEvent::completed(
                &task.task_id,
                &task.session_id,
                video_file_id,
                message,
            )),
            dead_letter: None,
            what: OutcomeKind::Completed,
            code: None,
            delay: None,
        }
    }

    /// The item goes back to the head of the queue exactly as it was (not counted): the worker
    /// is stopping.
    pub(crate) fn released(&self, claim: &Claim) -> OutcomeRecord {
        OutcomeRecord {
            claim_id: claim.id.to_string(),
            raw: claim.item.raw().to_vec(),
            requeue: Some(claim.item.raw().to_vec()),
            event: None,
            dead_letter: None,
            what: OutcomeKind::Released,
            code: None,
            delay: None,
        }
    }

    /// Another attempt: the item goes back to the queue with the attempt counted and `reason`
    /// recorded in its envelope; when it cannot be re-enveloped it fails with `code` instead.
    fn retried(
        &self,
        claim: &Claim,
        ids: Option<(&str, &str)>,
        code: ErrorCode,
        reason: String,
    ) -> OutcomeRecord {
        match claim.item.requeued(&reason) {
            Some(envelope) => pushed_back(claim, envelope, OutcomeKind::Retried, code, None),
            None => self.failed(claim, ids, code, reason),
        }
    }

    /// A permanent failure: `failed` (when the item has a usable task id) and a dead letter.
    fn failed(
        &self,
        claim: &Claim,
        ids: Option<(&str, &str)>,
        code: ErrorCode,
        error: String,
    ) -> OutcomeRecord {
        let dead_letter = DeadLetter::new(&claim.item, code, error.clone(), unix_now())
            .with_origin(self.gpu_id, self.queue.clone());
        let event = ids.map(|(task_id, session_id)| {
            ProgressEvent::failed(task_id, session_id, code, error.clone())
        });
        OutcomeRecord {
            claim_id: claim.id.to_string(),
            raw: claim.item.raw().to_vec(),
            requeue: None,
            what: if event.is_some() {
                OutcomeKind::Failed
            } else {
                OutcomeKind::DeadLettered
            },
            event,
            dead_letter: Some(dead_letter),
            code: Some(code),
            delay: None,
        }
    }

    /// Cancelled on request ([`echomimic_protocol::keys::task_cancel`]): one `failed` event
    /// with the code `cancelled`; not dead-lettered (nothing went wrong) and not retried.
    pub(crate) fn cancelled(&self, claim: &Claim, task: &Task, when: &str) -> OutcomeRecord {
        let event = ProgressEvent::failed(
            &task.task_id,
            &task.session_id,
            ErrorCode::Cancelled,
            format!("the task was cancelled on request {when}"),
        );
        OutcomeRecord {
            claim_id: claim.id.to_string(),
            raw: claim.item.raw().to_vec(),
            requeue: None,
            event: Some(event),
            dead_letter: None,
            what: OutcomeKind::Cancelled,
            code: Some(ErrorCode::Cancelled),
            delay: None,
        }
    }

    /// A download met a temp-file outage: the task is put aside in the queue's delayed set
    /// for [`OutageWait::delay`], attempts unchanged, while its outage has lasted less than
    /// [`OutageWait::total`]; then it fails with `code`.
    fn deferred(
        &self,
        claim: &Claim,
        ids: Option<(&str, &str)>,
        code: ErrorCode,
        reason: String,
    ) -> OutcomeRecord {
        let now = unix_now();
        let waited = now.saturating_sub(claim.item.outage_since().unwrap_or(now));
        let total = self.outage.total.as_secs();
        if total == 0 || waited >= total {
            let error = if total == 0 {
                reason
            } else {
                format!(
                    "{reason} (the temp-file API has been unavailable to this task for {waited} s \
                     since it was first put aside, more than the worker's limit of {total} s)"
                )
            };
            return self.failed(claim, ids, code, error);
        }
        match claim.item.deferred(&reason, now, &claim.id) {
            Some(envelope) => pushed_back(
                claim,
                envelope,
                OutcomeKind::Deferred,
                code,
                Some(self.outage.delay),
            ),
            None => self.failed(claim, ids, code, reason),
        }
    }

    /// True when the claim goes back to the queue after `err` (requeued as it was, or
    /// retried with attempts left): a finished video is then worth keeping for the next
    /// attempt ([`crate::outbox`]).
    pub(crate) fn requeues(&self, claim: &Claim, err: &WorkerError) -> bool {
        match err.failure().retry {
            Retry::Requeue | Retry::Defer => true,
            Retry::Attempts => claim.attempt() < self.max_attempts,
            Retry::Never => false,
        }
    }

    /// The outcome of an attempt that ended with `err` (see [`WorkerError::failure`]).
    pub(crate) fn after_error(
        &self,
        claim: &Claim,
        ids: Option<(&str, &str)>,
        err: &WorkerError,
    ) -> OutcomeRecord {
        let failure = err.failure();
        let text = err.public_message();
        match failure.retry {
            Retry::Requeue => self.released(claim),
            Retry::Defer => self.deferred(claim, ids, failure.code, text),
            Retry::Attempts if self.requeues(claim, err) => {
                self.retried(claim, ids, failure.code, text)
            }
            Retry::Attempts => self.failed(
                claim,
                ids,
                failure.code,
                format!(
                    "{text} (attempt {} of {})",
                    claim.attempt(),
                    self.max_attempts
                ),
            ),
            Retry::Never => self.failed(claim, ids, failure.code, text),
        }
    }

    /// The outcome for an item found in the processing list at start-up: its attempt was cut
    /// short by a crash or a kill. Requeued with the attempt counted, or given up once the
    /// attempts are spent.
    pub(crate) fn recovered(&self, claim: &Claim) -> OutcomeRecord {
        let task = match claim.item.task() {
            Ok(task) => task,
            Err(invalid) => {
                let ids = invalid
                    .task_id()
                    .map(|t| (t.to_owned(), invalid.session_id().unwrap_or("").to_owned()));
                let err = WorkerError::InvalidTask(invalid);
                return self.after_error(
                    claim,
                    ids.as_ref().map(|(t, s)| (t.as_str(), s.as_str())),
                    &err,
                );
            }
        };
        let ids = Some((task.task_id.as_str(), task.session_id.as_str()));
        let reason = "the worker stopped while the task was running";
        if claim.attempt() >= self.max_attempts {
            let err = WorkerError::AttemptsExhausted {
                attempts: claim.attempt(),
                reason: reason.into(),
            };
            return self.failed(claim, ids, ErrorCode::AttemptsExhausted, err.to_string());
        }
        self.retried(claim, ids, ErrorCode::Internal, reason.into())
    }

    /// The outcome for the claim the model hung on (the watchdog's): requeued once with the
    /// attempt counted; failed when its previous attempt hung too (a task that hangs the model
    /// would otherwise cost a restart per attempt), or when its attempts are spent.
    pub(crate) fn hung(&self, claim: &Claim, secs: u64) -> OutcomeRecord {
        let reason = format!("{HUNG} for {secs} s (watchdog)");
        let (task_id, session_id) = match claim.item.task() {
            Ok(t) => (t.task_id, t.session_id),
            Err(invalid) => return self.invalid(claim, invalid),
        };
        let ids = Some((task_id.as_str(), session_id.as_str()));
        let hung_before = claim.item.last_error().is_some_and(|e| e.starts_with(HUNG));
        if hung_before || claim.attempt() >= self.max_attempts {
            let error = format!(
                "{reason}; gave up after {} attempt(s){}",
                claim.attempt(),
                if hung_before {
                    ", the previous one hung too"
                } else {
                    ""
                }
            );
            return self.failed(claim, ids, ErrorCode::Internal, error);
        }
        self.retried(claim, ids, ErrorCode::Internal, reason)
    }

    /// The outcome for a claimed item that is not a valid task.
    pub(crate) fn invalid(
        &self,
        claim: &Claim,
        err: echomimic_protocol::InvalidTask,
    ) -> OutcomeRecord {
        let ids = err
            .task_id()
            .map(|t| (t.to_owned(), err.session_id().unwrap_or("").to_owned()));
        let err = WorkerError::InvalidTask(err);
        self.after_error(
            claim,
            ids.as_ref().map(|(t, s)| (t.as_str(), s.as_str())),
            &err,
        )
    }
}

/// The claimed item goes back as `envelope` (no event, no dead letter): onto the head of the
/// queue, or with `delay` into the queue's delayed set.
fn pushed_back(
    claim: &Claim,
    envelope: String,
    what: OutcomeKind,
    code: ErrorCode,
    delay: Option<Duration>,
) -> OutcomeRecord {
    OutcomeRecord {
        claim_id: claim.id.to_string(),
        raw: claim.item.raw().to_vec(),
        requeue: Some(envelope.into_bytes()),
        event: None,
        dead_letter: None,
        what,
        code: Some(code),
        delay,
    }
}

/// The name a task's finished video is uploaded under.
pub(crate) fn video_name(task: &Task) -> String {
    format!("echomimic_{}.mp4", task.task_id)
}

/// The generation settings of a task: its own values, else the worker's defaults.
pub(crate) fn resolve_params(task: &Task, d: &TaskDefaults, max_audio_secs: f64) -> GenParams {
    let seed = match task.seed {
        Some(_) => task.fixed_seed(),
        None => u64::try_from(d.seed).ok(),
    }
    .unwrap_or_else(|| u64::from(rand::random::<u32>()));
    GenParams {
        steps: task.steps.unwrap_or(d.steps),
        cfg: task.cfg.unwrap_or(d.cfg),
        seed,
        fps: d.fps,
        frames_num: task.frames_num,
        max_audio_secs,
    }
}

/// Publishes the events of one task, keeping `progress` monotonic.
pub(crate) struct TaskEvents {
    claim: Arc<str>,
    task_id: String,
    session_id: String,
    reporter: ReporterHandle,
    mono: Monotonic,
}

impl TaskEvents {
    pub(crate) fn new(claim: &Claim, task: &Task, reporter: ReporterHandle) -> Self {
        TaskEvents {
            claim: claim.id.clone(),
            task_id: task.task_id.clone(),
            session_id: task.session_id.clone(),
            reporter,
            mono: Monotonic::default(),
        }
    }

    fn event(&mut self, stage: Stage, progress: f32, message: String) -> ProgressEvent {
        let p = self.mono.next(progress);
        ProgressEvent::stage(&self.task_id, &self.session_id, stage, p, message)
    }

    /// The first event of a claim (`processing`); also clears the task's old result.
    pub(crate) fn start(&mut self, message: String) {
        let e = self.event(Stage::Processing, 0.0, message);
        self.reporter.stage(&self.claim, e, true);
    }

    /// A stage event (never dropped).
    pub(crate) fn stage(&mut self, stage: Stage, progress: f32, message: impl Into<String>) {
        let e = self.event(stage, progress, message.into());
        self.reporter.stage(&self.claim, e, false);
    }

    /// An intermediate progress event (may be coalesced or dropped).
    pub(crate) fn progress(&mut self, stage: Stage, progress: f32, message: String) {
        let e = self.event(stage, progress, message);
        self.reporter.progress(&self.claim, e);
    }
}

/// Wall time spent in each stage of one task.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Timings {
    pub(crate) download: Duration,
    pub(crate) prepare: Duration,
    pub(crate) wait: Duration,
    pub(crate) inference: Duration,
    pub(crate) decode: Duration,
    pub(crate) encode: Duration,
    pub(crate) upload: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u32) -> Policy {
        Policy {
            max_attempts: max,
            gpu_id: 7,
            queue: "q".into(),
            max_item_bytes: 4096,
            outage: OutageWait {
                delay: Duration::from_secs(60),
                total: Duration::from_secs(1800),
            },
        }
    }

    const TASK: &str =
        r#"{"task_id":"t-1","session_id":"s-1","ref_image_id":"img","audio_id":"aud"}"#;

    #[test]
    fn retries_then_fails_with_the_errors_code() {
        let p = policy(2);
        let err = WorkerError::Inference(echomimic_pipeline::PipelineError::Media("boom".into()));
        let first = Claim::new(TASK.as_bytes(), 4096);
        let r = p.after_error(&first, Some(("t-1", "s-1")), &err);
        assert_eq!(r.what, OutcomeKind::Retried);
        assert!(r.event.is_none() && r.dead_letter.is_none());
        let second = Claim::new(&r.requeue.unwrap(), 4096);
        assert_eq!(second.attempt(), 2);
        let r = p.after_error(&second, Some(("t-1", "s-1")), &err);
        assert_eq!(r.what, OutcomeKind::Failed);
        let e = r.event.unwrap();
        assert_eq!(e.code, Some(ErrorCode::InferenceFailed));
        assert!(e.error.unwrap().contains("attempt 2 of 2"));
        let dl = r.dead_letter.unwrap();
        assert_eq!(
            (dl.attempts, dl.gpu_id, dl.code),
            (2, Some(7), ErrorCode::InferenceFailed)
        );
        // The dead letter holds the task as the client sent it, not the envelope.
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&dl.payload).unwrap(),
            serde_json::from_str::<serde_json::Value>(TASK).unwrap()
        );
    }

    #[test]
    fn an_outage_defers_the_task_uncounted_until_its_total_is_spent() {
        let p = policy(2);
        let err = WorkerError::Download {
            input: crate::error::InputKind::Image,
            file_id: "img".into(),
            source: echomimic_tempfile::TempfileError::Status {
                method: "GET",
                url: "u".into(),
                status: 503,
                message: "down".into(),
            },
        };
        let first = Claim::new(TASK.as_bytes(), 4096);
        let r = p.after_error(&first, Some(("t-1", "s-1")), &err);
        assert_eq!(r.what, OutcomeKind::Deferred);
        assert_eq!(r.delay, Some(Duration::from_secs(60)));
        assert!(r.event.is_none() && r.dead_letter.is_none());
        let again = Claim::new(&r.requeue.unwrap(), 4096);
        assert_eq!(again.attempt(), 1, "an outage is not the task's attempt");
        let since = again.item.outage_since().unwrap();
        assert!(since.abs_diff(unix_now()) <= 2);
        // Still within the total: put aside again, the first outage time kept.
        let r = p.after_error(&again, Some(("t-1", "s-1")), &err);
        assert_eq!(r.what, OutcomeKind::Deferred);
        let third = Claim::new(&r.requeue.unwrap(), 4096);
        assert_eq!(third.item.outage_since(), Some(since));
        // An outage that began longer ago than the total: failed `unavailable`.
        let old = first
            .item
            .deferred("down", unix_now() - 1801, "c-old")
            .unwrap();
        let r = p.after_error(
            &Claim::new(old.as_bytes(), 4096),
            Some(("t-1", "s-1")),
            &err,
        );
        assert_eq!(r.what, OutcomeKind::Failed);
        let e = r.event.unwrap();
        assert_eq!(e.code, Some(ErrorCode::Unavailable));
        assert!(e.error.unwrap().contains("limit of 1800 s"));
        // With a total of zero nothing is put aside.
        let mut never = policy(2);
        never.outage.total = Duration::ZERO;
        let r = never.after_error(&first, Some(("t-1", "s-1")), &err);
        assert_eq!(r.what, OutcomeKind::Failed);
    }

    #[test]
    fn shutdown_requeues_the_raw_item_uncounted() {
        let c = Claim::new(TASK.as_bytes(), 4096);
        let r = policy(2).after_error(&c, Some(("t-1", "s-1")), &WorkerError::Cancelled);
        assert_eq!(r.what, OutcomeKind::Released);
        assert_eq!(r.requeue.as_deref(), Some(TASK.as_bytes()));
    }

    #[test]
    fn recovery_counts_the_crashed_attempt() {
        let p = policy(2);
        let c = Claim::new(TASK.as_bytes(), 4096);
        let r = p.recovered(&c);
        assert_eq!(r.what, OutcomeKind::Retried);
        let again = Claim::new(&r.requeue.unwrap(), 4096);
        assert_eq!(again.item.attempts(), 1);
        let r = p.recovered(&again);
        assert_eq!(r.what, OutcomeKind::Failed);
        assert_eq!(r.event.unwrap().code, Some(ErrorCode::AttemptsExhausted));
    }

    #[test]
    fn garbage_is_dead_lettered_without_event() {
        let c = Claim::new(b"\xff not json", 4096);
        let err = c.item.task().unwrap_err();
        let r = policy(2).invalid(&c, err);
        assert_eq!(r.what, OutcomeKind::DeadLettered);
        assert!(r.event.is_none());
        assert_eq!(r.dead_letter.unwrap().code, ErrorCode::InvalidTask);
    }

    #[test]
    fn invalid_task_with_an_id_gets_a_failed_event() {
        let raw =
            br#"{"task_id":"t-2","session_id":"s-2","ref_image_id":"i","audio_id":"a","steps":0}"#;
        let c = Claim::new(raw, 4096);
        let err = c.item.task().unwrap_err();
        let r = policy(2).invalid(&c, err);
        let e = r.event.unwrap();
        assert_eq!((e.task_id.as_str(), e.session_id.as_str()), ("t-2", "s-2"));
        assert_eq!(e.code, Some(ErrorCode::InvalidTask));
        assert!(e.error.unwrap().contains("steps"));
    }

    #[test]
    fn params_use_task_values_then_defaults() {
        let d = TaskDefaults {
            steps: 6,
            cfg: 1.0,
            seed: 420,
            fps: 24.0,
        };
        let mut t = Task::new("t", "s", "i", "a");
        let p = resolve_params(&t, &d, 60.0);
        assert_eq!((p.steps, p.cfg, p.seed, p.frames_num), (6, 1.0, 420, None));
        t.steps = Some(30);
        t.cfg = Some(3.0);
        t.seed = Some(42);
        t.frames_num = Some(48);
        let p = resolve_params(&t, &d, 60.0);
        assert_eq!(
            (p.steps, p.cfg, p.seed, p.frames_num),
            (30, 3.0, 42, Some(48))
        );
    }
}
