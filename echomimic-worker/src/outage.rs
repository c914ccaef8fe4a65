//! Riding out an outage of the temp-file API: a transfer that failed for a transient reason
//! (connection refused, timeout, 5xx) after its own retries (`--http-attempts`) is tried again
//! with growing pauses until `--outage-secs` have passed since its first failure. A restart or
//! a short outage of the temp-file server then costs no task and, for an upload, no second GPU
//! run: the finished video waits on local disk.

use std::time::{Duration, Instant};

use echomimic_tempfile::TempfileError;

use crate::redis_link::sleep_unless;

/// First pause between two tries of a transfer during an outage.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(15);

/// Runs `call` until it succeeds, fails for a reason that retrying cannot fix, `budget` has
/// passed since its first transient failure, or `stop()` says so (then the last error is
/// returned). `what` names the transfer in the log.
pub(crate) fn through_outage<T>(
    what: &str,
    budget: Duration,
    mut stop: impl FnMut() -> bool,
    mut call: impl FnMut() -> Result<T, TempfileError>,
) -> Result<T, TempfileError> {
    let mut first_failure: Option<Instant> = None;
    let mut pause = FIRST_PAUSE;
    loop {
        let err = match call() {
            Err(e) if e.is_retryable() => e,
            other => {
                if let (Ok(_), Some(t)) = (&other, first_failure) {
                    tracing::info!(
                        what,
                        outage_s = t.elapsed().as_secs_f64(),
                        "temp-file API reachable again"
                    );
                }
                return other;
            }
        };
        let since = *first_failure.get_or_insert_with(Instant::now);
        let left = budget.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(err);
        }
        tracing::warn!(what, error = %err, retry_in_s = pause.min(left).as_secs_f64(),
            budget_left_s = left.as_secs_f64(), "temp-file API unavailable; retrying");
        if sleep_unless(pause.min(left), &mut stop) {
            return Err(err);
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> TempfileError {
        TempfileError::Status {
            method: "GET",
            url: "u".into(),
            status: 503,
            message: "down".into(),
        }
    }

    #[test]
    fn a_short_outage_is_ridden_out() {
        let mut calls = 0;
        let got = through_outage(
            "test",
            Duration::from_secs(10),
            || false,
            || {
                calls += 1;
                if calls < 3 {
                    Err(down())
                } else {
                    Ok(calls)
                }
            },
        );
        assert_eq!(got.unwrap(), 3);
    }

    #[test]
    fn the_budget_and_a_stop_end_it_and_permanent_errors_are_not_retried() {
        let t = Instant::now();
        let mut calls = 0;
        let got: Result<(), _> = through_outage(
            "test",
            Duration::from_millis(300),
            || false,
            || {
                calls += 1;
                Err(down())
            },
        );
        assert!(got.is_err() && calls >= 1);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

        let mut calls = 0;
        let got: Result<(), _> = through_outage(
            "test",
            Duration::from_secs(60),
            || true,
            || {
                calls += 1;
                Err(down())
            },
        );
        assert!(got.is_err());
        assert_eq!(calls, 1, "a stop ends the wait at once");

        let mut calls = 0;
        let got: Result<(), _> = through_outage(
            "test",
            Duration::from_secs(60),
            || false,
            || {
                calls += 1;
                Err(TempfileError::NotFound {
                    file_id: "f".into(),
                })
            },
        );
        assert!(matches!(got, Err(TempfileError::NotFound { .. })));
        assert_eq!(calls, 1);
    }
}
