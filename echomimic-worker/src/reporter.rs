//! The reporter thread: the only writer of progress events and outcomes.
//!
//! It owns its Redis connection and is fed through a bounded channel. It never makes the
//! inference thread wait: progress updates are sent with `try_send` and dropped when the channel
//! is full, and the thread keeps draining the channel into its own queue even while Redis is
//! unreachable, where a newer progress update of a claim replaces an older one still waiting
//! ("coalescing"). Stage events and outcomes are never reordered: they are applied in the
//! order they were sent, and an outcome is retried (idempotently, see [`crate::store`]) after
//! any error until Redis takes it. Only when the service is stopping and Redis stays away past the
//! shutdown deadline does the reporter give up; the unrecorded items then stay in the
//! processing list and are recovered at the next start.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use echomimic_protocol::ProgressEvent;

use crate::redis_link::{is_connection_error, RedisLink};
use crate::state::Shared;
use crate::store::{Keys, OutcomeRecord, Recorded};

/// Capacity of the reporter's channel.
const CHANNEL_CAPACITY: usize = 256;

pub(crate) enum Report {
    Event {
        claim: Arc<str>,
        event: ProgressEvent,
        /// A later progress event of the same claim may replace this one.
        coalesce: bool,
        /// Delete the task's old `task_result` first (first event of a claim).
        reset_result: bool,
    },
    /// The claim is being worked on (`Some`: its raw item) or waits (`None`); see
    /// [`echomimic_protocol::keys::worker_active`].
    Active {
        claim: Arc<str>,
        raw: Option<Arc<[u8]>>,
    },
    Outcome(Box<OutcomeRecord>),
}

impl Report {
    fn claim(&self) -> &str {
        match self {
            Report::Event { claim, .. } | Report::Active { claim, .. } => claim,
            Report::Outcome(r) => &r.claim_id,
        }
    }
}

/// The sending side, cloned into every thread that reports.
#[derive(Clone)]
pub(crate) struct ReporterHandle {
    tx: Sender<Report>,
}

impl ReporterHandle {
    /// An intermediate progress event: dropped if the reporter is behind.
    pub(crate) fn progress(&self, claim: &Arc<str>, event: ProgressEvent) {
        let report = Report::Event {
            claim: claim.clone(),
            event,
            coalesce: true,
            reset_result: false,
        };
        match self.tx.try_send(report) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => {
                tracing::debug!("reporter gone; progress event dropped")
            }
        }
    }

    /// A stage event (never dropped).
    pub(crate) fn stage(&self, claim: &Arc<str>, event: ProgressEvent, reset_result: bool) {
        let report = Report::Event {
            claim: claim.clone(),
            event,
            coalesce: false,
            reset_result,
        };
        if self.tx.send(report).is_err() {
            tracing::error!("reporter gone; stage event lost");
        }
    }

    /// Marks the claim as worked on (`Some(raw)`) or waiting (`None`).
    pub(crate) fn active(&self, claim: &Arc<str>, raw: Option<&[u8]>) {
        let report = Report::Active {
            claim: claim.clone(),
            raw: raw.map(Arc::from),
        };
        if self.tx.send(report).is_err() {
            tracing::debug!("reporter gone; active mark dropped");
        }
    }

    /// An outcome (never dropped).
    pub(crate) fn outcome(&self, record: OutcomeRecord) {
        if let Err(e) = self.tx.send(Report::Outcome(Box::new(record))) {
            if let Report::Outcome(r) = e.0 {
                tracing::error!(
                    claim = %r.claim_id,
                    what = r.what.as_str(),
                    "reporter gone; outcome not recorded (the item stays in the processing list)"
                );
            }
        }
    }
}

/// Creates the channel.
pub(crate) fn channel() -> (ReporterHandle, Receiver<Report>) {
    let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
    (ReporterHandle { tx }, rx)
}

fn push(queue: &mut VecDeque<Report>, report: Report) {
    if let Report::Event { coalesce: true, .. } = &report {
        let claim = report.claim();
        if let Some(last) = queue.iter_mut().rev().find(|r| r.claim() == claim) {
            if let Report::Event { coalesce: true, .. } = last {
                *last = report;
                return;
            }
        }
    }
    queue.push_back(report);
}

/// Moves everything waiting in the channel into the queue; false once the channel is closed
/// and empty.
fn drain(rx: &Receiver<Report>, queue: &mut VecDeque<Report>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(r) => push(queue, r),
            Err(TryRecvError::Empty) => return true,
            Err(TryRecvError::Disconnected) => return false,
        }
    }
}

/// What became of the report at the head of the queue.
enum Applied {
    /// Done with it (written, or dropped on purpose).
    Done(Option<Recorded>),
    /// Not yet: wait and try again.
    Later(String),
}

fn apply(con: &mut redis::Connection, keys: &Keys, head: &Report) -> redis::RedisResult<Applied> {
    Ok(match head {
        Report::Event {
            event,
            reset_result,
            ..
        } => {
            if !keys.publish(con, event, *reset_result)? {
                tracing::debug!(task_id = %event.task_id, "event not published: the lease is not ours");
            }
            Applied::Done(None)
        }
        Report::Active { claim, raw } => {
            keys.set_active(con, claim, raw.as_deref())?;
            Applied::Done(None)
        }
        Report::Outcome(record) => match keys.record(con, record)? {
            Recorded::LeaseMissing => Applied::Later("the lease is missing".into()),
            r => Applied::Done(Some(r)),
        },
    })
}

/// Runs the reporter until every sender is gone (or the supervisor closed it) and the queue
/// is empty (or, when stopping, until Redis has stayed away past the shutdown deadline).
///
/// An outcome is retried, with the link's capped backoff, after *any* error (connection
/// loss, and also replies such as OOM under `maxmemory`, MISCONF, READONLY after a
/// failover) and while the lease is missing: it is never dropped. Events and active-claim
/// marks are retried after connection errors only; Redis refusing one drops it.
pub(crate) fn run(mut link: RedisLink, keys: Keys, rx: Receiver<Report>, shared: Arc<Shared>) {
    let mut queue: VecDeque<Report> = VecDeque::new();
    let mut open = true;
    loop {
        if open {
            // Closed by the supervisor (stuck threads left behind): take what was sent, then
            // end once it is recorded.
            let closed = shared.reporter_closed();
            open = drain(&rx, &mut queue) && !closed;
        }
        let Some(head) = queue.front() else {
            if !open {
                break;
            }
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => push(&mut queue, r),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
            continue;
        };
        let is_outcome = matches!(head, Report::Outcome(_));
        let why = match link.run(|con| apply(con, &keys, head)) {
            Ok(Applied::Done(recorded)) => {
                let done = queue.pop_front();
                if let (Some(Report::Outcome(record)), Some(recorded)) = (done, recorded) {
                    shared.outcome_recorded(&record, recorded);
                }
                continue;
            }
            Ok(Applied::Later(why)) => {
                // The heartbeat takes a missing lease again (or finds it taken).
                shared.wake_heartbeat();
                why
            }
            Err(e) if is_outcome || is_connection_error(&e) => e.to_string(),
            Err(e) => {
                if let Some(Report::Event { event, .. }) = queue.pop_front() {
                    tracing::warn!(error = %e, task_id = %event.task_id, "redis refused an event; dropped");
                } else {
                    tracing::warn!(error = %e, "redis refused an active-claim mark; dropped");
                }
                continue;
            }
        };
        if shared.reporter_gives_up() {
            let lost: Vec<_> = queue
                .iter()
                .filter_map(|r| match r {
                    Report::Outcome(o) => Some(format!("{} ({})", o.claim_id, o.what.as_str())),
                    _ => None,
                })
                .collect();
            tracing::error!(
                error = %why,
                unrecorded = ?lost,
                "outcomes still not recorded at the shutdown deadline; their items stay in the processing list and are recovered at the next start"
            );
            break;
        }
        let pause = link.pause_after(&why);
        let until = Instant::now() + pause;
        // Keep taking reports while waiting, so senders never block.
        while open && Instant::now() < until {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(r) => push(&mut queue, r),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        if !open {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use echomimic_protocol::Stage;

    fn ev(claim: &str, p: f32, coalesce: bool) -> Report {
        Report::Event {
            claim: Arc::from(claim),
            event: ProgressEvent::stage("t", "s", Stage::Inference, p, "m"),
            coalesce,
            reset_result: false,
        }
    }

    fn progress_of(r: &Report) -> f32 {
        match r {
            Report::Event { event, .. } => event.progress.unwrap_or(-1.0),
            Report::Outcome(_) | Report::Active { .. } => -2.0,
        }
    }

    #[test]
    fn progress_coalesces_but_stages_stay() {
        let mut q = VecDeque::new();
        push(&mut q, ev("a", 10.0, false));
        push(&mut q, ev("a", 11.0, true));
        push(&mut q, ev("a", 12.0, true));
        push(&mut q, ev("b", 50.0, true));
        push(&mut q, ev("a", 13.0, true));
        assert_eq!(
            q.iter().map(progress_of).collect::<Vec<_>>(),
            vec![10.0, 13.0, 50.0]
        );
        push(&mut q, ev("a", 90.0, false));
        push(&mut q, ev("a", 91.0, true));
        assert_eq!(
            q.iter().map(progress_of).collect::<Vec<_>>(),
            vec![10.0, 13.0, 50.0, 90.0, 91.0]
        );
    }
}
