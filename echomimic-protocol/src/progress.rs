//! Progress events published on the progress channel (usage guide §3.2,
//! `docs/worker-usage-guide.zh.md`).
//!
//! One JSON object per message:
//!
//! ```json
//! {"task_id":"t-1","session_id":"s-1","status":"inference","progress":42.5,"message":"denoising step 3/6"}
//! {"task_id":"t-1","session_id":"s-1","status":"completed","progress":100.0,"video_file_id":"…"}
//! {"task_id":"t-1","session_id":"s-1","status":"failed","error":"no face found","code":"no_face"}
//! ```
//!
//! A task moves through `processing` → `downloading` → `face_detecting` → `inference` (repeated,
//! `progress` rising) → `merging_audio` → `uploading` → `completed`, or to `failed` from any stage.
//! `uploading` is our addition (the guide's list is open: "possible values include"); clients
//! that do not know it should ignore it like any unknown status. Exactly one terminal event
//! (`completed` or `failed`) is published per task outcome.
//!
//! Decoding is tolerant: unknown fields are ignored, an unknown `status` becomes
//! [`Status::Unknown`], an unknown `code` becomes [`ErrorCode::Unknown`].
//!
//! This module holds the types only and imports nothing of this crate; reading them off the wire
//! ([`ProgressEvent::from_json`], and [`ProgressEvent::parse_any`], which also understands the
//! legacy EchoMe schema of [`crate::legacy`]) lives in `decode.rs`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The `status` field of a progress event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Status {
    /// The task was taken off the queue.
    Processing,
    /// The input files are being downloaded from the temp-file API.
    Downloading,
    /// The face in the reference image is being located and cropped.
    FaceDetecting,
    /// The diffusion model is running; `progress` advances per denoising step.
    Inference,
    /// Frames are being encoded and muxed with the audio.
    MergingAudio,
    /// The finished video is being uploaded to the temp-file API (our addition to the guide).
    Uploading,
    /// Terminal: the video is ready; `video_file_id` is set.
    Completed,
    /// Terminal: the task failed; `error` and `code` are set.
    Failed,
    /// A status this version does not know (decoding only).
    #[serde(other)]
    Unknown,
}

impl Status {
    /// The wire name, e.g. `"face_detecting"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Processing => "processing",
            Status::Downloading => "downloading",
            Status::FaceDetecting => "face_detecting",
            Status::Inference => "inference",
            Status::MergingAudio => "merging_audio",
            Status::Uploading => "uploading",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Unknown => "unknown",
        }
    }

    /// True for `completed` and `failed`.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A non-terminal stage, for [`ProgressEvent::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// See [`Status::Processing`].
    Processing,
    /// See [`Status::Downloading`].
    Downloading,
    /// See [`Status::FaceDetecting`].
    FaceDetecting,
    /// See [`Status::Inference`].
    Inference,
    /// See [`Status::MergingAudio`].
    MergingAudio,
    /// See [`Status::Uploading`].
    Uploading,
}

impl From<Stage> for Status {
    fn from(stage: Stage) -> Status {
        match stage {
            Stage::Processing => Status::Processing,
            Stage::Downloading => Status::Downloading,
            Stage::FaceDetecting => Status::FaceDetecting,
            Stage::Inference => Status::Inference,
            Stage::MergingAudio => Status::MergingAudio,
            Stage::Uploading => Status::Uploading,
        }
    }
}

/// Machine-readable failure reason, the `code` field of a `failed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The task JSON was rejected (bad field, missing field, URL instead of id, ...).
    InvalidTask,
    /// An input file id is unknown or expired on the temp-file API (HTTP 404).
    InputNotFound,
    /// An input file exists but cannot be used (undecodable image or audio, too long, ...).
    BadInput,
    /// No face was found in the reference image.
    NoFace,
    /// The model failed while generating.
    InferenceFailed,
    /// The accelerator ran out of memory.
    Oom,
    /// The finished video could not be uploaded.
    UploadFailed,
    /// The task ran longer than the worker's limit.
    Timeout,
    /// The temp-file API or another dependency stayed unavailable after retries.
    Unavailable,
    /// The worker could not authenticate to the temp-file API (HTTP 401: its `TEMPFILE_TOKEN`
    /// is missing or not one of the server's). A configuration error of the worker, not of the
    /// task: the task is not retried and the worker keeps serving.
    TempfileUnauthorized,
    /// The task was given up after the worker's attempt limit (e.g. it crashed the worker repeatedly).
    AttemptsExhausted,
    /// A bug or an unexpected condition in the worker.
    Internal,
    /// Cancelled on request ([`client::cancel_task`](crate::client) or `echomimic-worker
    /// cancel`): removed from its queue, or stopped between two UNet calls.
    Cancelled,
    /// A code this version does not know (decoding only).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name, e.g. `"no_face"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidTask => "invalid_task",
            ErrorCode::InputNotFound => "input_not_found",
            ErrorCode::BadInput => "bad_input",
            ErrorCode::NoFace => "no_face",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::Oom => "oom",
            ErrorCode::UploadFailed => "upload_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TempfileUnauthorized => "tempfile_unauthorized",
            ErrorCode::AttemptsExhausted => "attempts_exhausted",
            ErrorCode::Internal => "internal",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One progress event (the default schema: usage guide §3.2).
///
/// Build events with [`ProgressEvent::stage`], [`ProgressEvent::completed`] and
/// [`ProgressEvent::failed`], which keep `video_file_id` on `completed` only and
/// `error`/`code` on `failed` only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressEvent {
    /// The task's `task_id`.
    pub task_id: String,
    /// The task's `session_id`.
    pub session_id: String,
    /// Current status.
    pub status: Status,
    /// Percent done, 0.0 to 100.0, non-decreasing within one task; 100.0 on `completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
    /// Human-readable description of the current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Temp-file id of the generated MP4; present only with `completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_file_id: Option<String>,
    /// Human-readable error; present only with `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine-readable error; present only with `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

/// Clamps a progress value into 0..=100 (NaN becomes 0).
fn clamp_progress(p: f32) -> f32 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 100.0)
    }
}

impl ProgressEvent {
    /// A non-terminal event. `progress` is clamped into 0..=100 (NaN becomes 0).
    pub fn stage(
        task_id: impl Into<String>,
        session_id: impl Into<String>,
        stage: Stage,
        progress: f32,
        message: impl Into<String>,
    ) -> Self {
        ProgressEvent {
            task_id: task_id.into(),
            session_id: session_id.into(),
            status: stage.into(),
            progress: Some(clamp_progress(progress)),
            message: Some(message.into()),
            video_file_id: None,
            error: None,
            code: None,
        }
    }

    /// The terminal success event, with progress 100.
    pub fn completed(
        task_id: impl Into<String>,
        session_id: impl Into<String>,
        video_file_id: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ProgressEvent {
            task_id: task_id.into(),
            session_id: session_id.into(),
            status: Status::Completed,
            progress: Some(100.0),
            message: Some(message.into()),
            video_file_id: Some(video_file_id.into()),
            error: None,
            code: None,
        }
    }

    /// The terminal failure event. `progress` is left out.
    pub fn failed(
        task_id: impl Into<String>,
        session_id: impl Into<String>,
        code: ErrorCode,
        error: impl Into<String>,
    ) -> Self {
        ProgressEvent {
            task_id: task_id.into(),
            session_id: session_id.into(),
            status: Status::Failed,
            progress: None,
            message: None,
            video_file_id: None,
            error: Some(error.into()),
            code: Some(code),
        }
    }

    /// Sets `message`.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// True for `completed` and `failed`.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The event as compact JSON in the default schema.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn wire_names_match_serde() {
        for s in [
            Status::Processing,
            Status::Downloading,
            Status::FaceDetecting,
            Status::Inference,
            Status::MergingAudio,
            Status::Uploading,
            Status::Completed,
            Status::Failed,
            Status::Unknown,
        ] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                Value::String(s.as_str().into())
            );
        }
        for c in [
            ErrorCode::InvalidTask,
            ErrorCode::InputNotFound,
            ErrorCode::BadInput,
            ErrorCode::NoFace,
            ErrorCode::InferenceFailed,
            ErrorCode::Oom,
            ErrorCode::UploadFailed,
            ErrorCode::Timeout,
            ErrorCode::Unavailable,
            ErrorCode::TempfileUnauthorized,
            ErrorCode::AttemptsExhausted,
            ErrorCode::Internal,
            ErrorCode::Cancelled,
            ErrorCode::Unknown,
        ] {
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                Value::String(c.as_str().into())
            );
        }
    }

    #[test]
    fn stage_clamps_progress() {
        let e = ProgressEvent::stage("t", "s", Stage::Inference, 150.0, "x");
        assert_eq!(e.progress, Some(100.0));
        let e = ProgressEvent::stage("t", "s", Stage::Inference, -1.0, "x");
        assert_eq!(e.progress, Some(0.0));
        let e = ProgressEvent::stage("t", "s", Stage::Inference, f32::NAN, "x");
        assert_eq!(e.progress, Some(0.0));
        assert!(!e.is_terminal());
    }
}
