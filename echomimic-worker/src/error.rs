//! The worker's error type and the one place where an error becomes a wire [`ErrorCode`] and a
//! retry decision ([`WorkerError::failure`]), as TEI maps its errors to an `ErrorType` once.
//!
//! | error | code | what happens to the task |
//! |---|---|---|
//! | task JSON rejected | `invalid_task` | `failed` + dead letter, no retry |
//! | input file id unknown / expired (HTTP 404) | `input_not_found` | `failed` + dead letter, no retry |
//! | input larger than `--max-download-bytes`, undecodable image or audio, silent or too long audio | `bad_input` | `failed` + dead letter, no retry |
//! | no face in the photo | `no_face` | `failed` + dead letter, no retry |
//! | temp-file API unreachable / 5xx while downloading, after the in-place retries (`--http-attempts`) and `--outage-secs` of retrying | `unavailable` | put aside for `--outage-delay-secs` (not counted, [`keys::task_delayed`](echomimic_protocol::keys::task_delayed)) and tried again, until the outage has lasted `--outage-total-secs` for this task; then `failed` + dead letter |
//! | temp-file API answered something else that is not usable (a 4xx other than 401/404, a malformed reply) | `unavailable` | `failed` + dead letter |
//! | temp-file API refused the worker's token (HTTP 401, `--tempfile-token`) | `tempfile_unauthorized` | `failed` + dead letter, no retry; the worker keeps serving |
//! | model failure | `inference_failed` | requeued while attempts remain (`--max-attempts`), then `failed` + dead letter |
//! | accelerator out of memory | `oom` | as `inference_failed` |
//! | encoding / muxing failure, local I/O | `internal` | as `inference_failed` |
//! | upload failed after retries (and `--outage-secs` of retrying a transient failure) | `upload_failed` | requeued while attempts remain if transient (the video kept on local disk for the next attempt), else `failed` |
//! | worker crashed while the task ran (found at start-up) | `attempts_exhausted` once the attempts are spent | requeued until then |
//! | shutdown stopped the task (also a download cut short by it) | — | requeued as it was, no event, not counted |
//! | the model made no progress for `--watchdog-secs` | `internal` | requeued once (counted), `failed` + dead letter if it hangs again; the worker exits 5 |
//!
//! Redis errors never fail a task: every Redis operation is retried with capped backoff until
//! Redis answers again (the `redis_link` module).

use std::fmt;
use std::path::PathBuf;

use echomimic_pipeline::PipelineError;
use echomimic_protocol::{ErrorCode, InvalidTask};
use echomimic_tempfile::TempfileError;

/// Which input a download or decode error concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// The reference portrait.
    Image,
    /// The driving speech.
    Audio,
}

impl fmt::Display for InputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InputKind::Image => "reference image",
            InputKind::Audio => "audio",
        })
    }
}

/// Errors of the worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The task JSON was rejected.
    #[error(transparent)]
    InvalidTask(#[from] InvalidTask),
    /// The task already used up its attempts.
    #[error("gave up after {attempts} attempt(s): {reason}")]
    AttemptsExhausted {
        /// Attempts started.
        attempts: u32,
        /// Why the last one ended.
        reason: String,
    },
    /// An input could not be downloaded from the temp-file API.
    #[error("downloading the {input} ({file_id}): {source}")]
    Download {
        /// Which input.
        input: InputKind,
        /// Its temp-file id.
        file_id: String,
        /// The client error (after its retries).
        #[source]
        source: TempfileError,
    },
    /// An input is unusable (undecodable, no face, silent, too long, ...).
    #[error("{input}: {source}")]
    Input {
        /// Which input.
        input: InputKind,
        /// Why.
        #[source]
        source: PipelineError,
    },
    /// The model failed.
    #[error("inference: {0}")]
    Inference(#[source] PipelineError),
    /// Encoding or muxing the video failed.
    #[error("video: {0}")]
    Encode(#[source] PipelineError),
    /// The finished video could not be uploaded.
    #[error("uploading the video: {0}")]
    Upload(#[source] TempfileError),
    /// A shutdown request stopped the task.
    #[error("stopped by a shutdown request")]
    Cancelled,
    /// A Redis command failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// An operator command (`status`, `dlq`, `cancel`) could not do its work.
    #[error("{0}")]
    Admin(String),
    /// Another worker holds the lease of this gpu id.
    #[error(
        "gpu id {gpu_id} is already served by another worker (lease key `{key}` held by {owner:?}, \
         {ttl_secs} s left); stop it first, or pick another GPU_ID"
    )]
    LeaseHeld {
        /// The gpu id.
        gpu_id: u32,
        /// The lease key.
        key: String,
        /// The holder's id (`hostname:pid:uuid`).
        owner: String,
        /// Seconds until the lease expires without a heartbeat.
        ttl_secs: i64,
    },
    /// The lease was taken by another worker while this one ran (it was cut off from Redis for
    /// longer than the lease TTL); this worker must stop without recording anything.
    #[error("lost the lease `{key}` to {owner:?}; stopping without recording outcomes")]
    LeaseLost {
        /// The lease key.
        key: String,
        /// The new holder.
        owner: Option<String>,
    },
    /// Local file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A setting is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The model could not be loaded.
    #[error("loading the model: {0}")]
    ModelLoad(#[source] PipelineError),
    /// A bug or an unexpected condition (a thread panicked, a channel closed).
    #[error("internal error: {0}")]
    Internal(String),
    /// The model made no progress for longer than the watchdog allows (`--watchdog-secs`):
    /// a hung kernel or driver. The task is requeued once and the worker exits so that its
    /// supervisor starts a fresh process.
    #[error("the model made no progress for {secs} s (watchdog); the worker stops so that its supervisor restarts it")]
    ModelHung {
        /// Seconds since the last progress.
        secs: u64,
    },
}

/// What to do with a task after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Permanent: publish `failed`, dead-letter.
    Never,
    /// Requeue (counting the attempt) while attempts remain, then `failed` + dead letter.
    Attempts,
    /// Push back as it was, not counted, no event (shutdown).
    Requeue,
    /// Put aside for `--outage-delay-secs` in the queue's delayed set, not counted, while the
    /// task's outage has lasted less than `--outage-total-secs`; then `failed` + dead letter.
    Defer,
}

/// An error's wire code and retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// The `code` of the `failed` event.
    pub code: ErrorCode,
    /// What to do with the task.
    pub retry: Retry,
}

impl Failure {
    const fn new(code: ErrorCode, retry: Retry) -> Self {
        Failure { code, retry }
    }
}

/// True when an error (or anything in its source chain) says the device ran out of memory.
pub fn is_out_of_memory(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().to_ascii_lowercase();
        if text.contains("out of memory") || text.contains("out_of_memory") {
            return true;
        }
        cur = err.source();
    }
    false
}

fn pipeline_input_failure(e: &PipelineError) -> Failure {
    match e {
        PipelineError::NoFace { .. } => Failure::new(ErrorCode::NoFace, Retry::Never),
        PipelineError::Cancelled => Failure::new(ErrorCode::Internal, Retry::Requeue),
        e if e.is_bad_input() => Failure::new(ErrorCode::BadInput, Retry::Never),
        e if is_out_of_memory(e) => Failure::new(ErrorCode::Oom, Retry::Attempts),
        _ => Failure::new(ErrorCode::Internal, Retry::Attempts),
    }
}

impl WorkerError {
    /// The wire code and the retry decision for this error (see the [module docs](self)).
    pub fn failure(&self) -> Failure {
        use ErrorCode as C;
        match self {
            WorkerError::InvalidTask(_) => Failure::new(C::InvalidTask, Retry::Never),
            WorkerError::AttemptsExhausted { .. } => {
                Failure::new(C::AttemptsExhausted, Retry::Never)
            }
            WorkerError::Download { source, .. } => match source {
                TempfileError::Unauthorized { .. } => {
                    Failure::new(C::TempfileUnauthorized, Retry::Never)
                }
                TempfileError::NotFound { .. } => Failure::new(C::InputNotFound, Retry::Never),
                TempfileError::TooLarge { .. } => Failure::new(C::BadInput, Retry::Never),
                TempfileError::InvalidFileId(_) => Failure::new(C::InvalidTask, Retry::Never),
                TempfileError::Io { .. } => Failure::new(C::Internal, Retry::Attempts),
                TempfileError::Cancelled { .. } => Failure::new(C::Internal, Retry::Requeue),
                e if e.is_retryable() => Failure::new(C::Unavailable, Retry::Defer),
                _ => Failure::new(C::Unavailable, Retry::Never),
            },
            WorkerError::Input { source, .. } => pipeline_input_failure(source),
            WorkerError::Inference(e) => match e {
                PipelineError::Cancelled => Failure::new(C::Internal, Retry::Requeue),
                e if e.is_bad_input() => pipeline_input_failure(e),
                e if is_out_of_memory(e) => Failure::new(C::Oom, Retry::Attempts),
                _ => Failure::new(C::InferenceFailed, Retry::Attempts),
            },
            WorkerError::Encode(e) => match e {
                e if e.is_bad_input() => Failure::new(C::BadInput, Retry::Never),
                _ => Failure::new(C::Internal, Retry::Attempts),
            },
            WorkerError::Upload(TempfileError::Unauthorized { .. }) => {
                Failure::new(C::TempfileUnauthorized, Retry::Never)
            }
            WorkerError::Upload(e) if e.is_retryable() => {
                Failure::new(C::UploadFailed, Retry::Attempts)
            }
            WorkerError::Upload(_) => Failure::new(C::UploadFailed, Retry::Never),
            WorkerError::Cancelled => Failure::new(C::Internal, Retry::Requeue),
            WorkerError::Redis(_)
            | WorkerError::Io { .. }
            | WorkerError::Internal(_)
            | WorkerError::ModelHung { .. }
            | WorkerError::ModelLoad(_) => Failure::new(C::Internal, Retry::Attempts),
            WorkerError::LeaseHeld { .. }
            | WorkerError::LeaseLost { .. }
            | WorkerError::Admin(_)
            | WorkerError::Config(_) => Failure::new(C::Internal, Retry::Never),
        }
    }

    /// The process exit status for this error: 2 invalid configuration, 3 the gpu id is
    /// served by another worker, 4 the lease was lost while running, 5 the model hung
    /// (watchdog), 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::Config(_) => 2,
            WorkerError::LeaseHeld { .. } => 3,
            WorkerError::LeaseLost { .. } => 4,
            WorkerError::ModelHung { .. } => 5,
            _ => 1,
        }
    }

    /// The text published in a `failed` event's `error`.
    pub fn public_message(&self) -> String {
        self.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use echomimic_pipeline::AudioError;

    fn dl(source: TempfileError) -> WorkerError {
        WorkerError::Download {
            input: InputKind::Image,
            file_id: "f".into(),
            source,
        }
    }

    #[test]
    fn codes_and_retries() {
        let f = |e: WorkerError| e.failure();
        assert_eq!(
            f(dl(TempfileError::NotFound {
                file_id: "f".into()
            })),
            Failure::new(ErrorCode::InputNotFound, Retry::Never)
        );
        assert_eq!(
            f(dl(TempfileError::TooLarge {
                file_id: "f".into(),
                limit: 1
            }))
            .code,
            ErrorCode::BadInput
        );
        assert_eq!(
            f(dl(TempfileError::Status {
                method: "GET",
                url: "u".into(),
                status: 503,
                message: "down".into()
            })),
            Failure::new(ErrorCode::Unavailable, Retry::Defer)
        );
        assert_eq!(
            f(dl(TempfileError::Status {
                method: "GET",
                url: "u".into(),
                status: 400,
                message: "no".into()
            })),
            Failure::new(ErrorCode::Unavailable, Retry::Never)
        );
        assert_eq!(
            f(WorkerError::Input {
                input: InputKind::Image,
                source: PipelineError::NoFace { best: None }
            }),
            Failure::new(ErrorCode::NoFace, Retry::Never)
        );
        assert_eq!(
            f(WorkerError::Input {
                input: InputKind::Audio,
                source: PipelineError::Audio(AudioError::Silent { peak: 0.0 })
            }),
            Failure::new(ErrorCode::BadInput, Retry::Never)
        );
        assert_eq!(
            f(WorkerError::Inference(PipelineError::Media(
                "shape mismatch".into()
            ))),
            Failure::new(ErrorCode::InferenceFailed, Retry::Attempts)
        );
        assert_eq!(
            f(WorkerError::Inference(PipelineError::Candle(candle_msg(
                "CUDA_ERROR_OUT_OF_MEMORY: out of memory"
            )))),
            Failure::new(ErrorCode::Oom, Retry::Attempts)
        );
        assert_eq!(
            f(WorkerError::Inference(PipelineError::Cancelled)).retry,
            Retry::Requeue
        );
        assert_eq!(f(WorkerError::Cancelled).retry, Retry::Requeue);
        assert_eq!(
            f(WorkerError::Upload(TempfileError::Status {
                method: "POST",
                url: "u".into(),
                status: 413,
                message: "too large".into()
            })),
            Failure::new(ErrorCode::UploadFailed, Retry::Never)
        );
        assert_eq!(
            f(WorkerError::Upload(TempfileError::Status {
                method: "POST",
                url: "u".into(),
                status: 502,
                message: "bad gateway".into()
            })),
            Failure::new(ErrorCode::UploadFailed, Retry::Attempts)
        );
        let refused = || TempfileError::Unauthorized {
            method: "GET",
            url: "u".into(),
            message: "missing or invalid access token".into(),
        };
        let tempfile_unauthorized = Failure::new(ErrorCode::TempfileUnauthorized, Retry::Never);
        assert_eq!(f(dl(refused())), tempfile_unauthorized);
        assert_eq!(f(WorkerError::Upload(refused())), tempfile_unauthorized);
    }

    fn candle_msg(m: &str) -> candle_core::Error {
        candle_core::Error::Msg(m.into())
    }
}
