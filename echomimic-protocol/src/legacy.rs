//! The legacy progress schema of the EchoMe webapp (opt-in on the worker).
//!
//! The original Python worker, and the EchoMe webapp that consumes it, use a vocabulary that
//! differs from the usage guide's §3.2 (`docs/worker-usage-guide.zh.md`; the guide's own §5.2
//! client example checks these names too):
//!
//! ```json
//! {"task_id":"t","session_id":"s","status":"processing","message":"…"}
//! {"task_id":"t","session_id":"s","status":"progress","percentage":20,"message":"…"}
//! {"task_id":"t","session_id":"s","status":"completed","video_file_id":"…","message":"…"}
//! {"task_id":"t","session_id":"s","status":"error","error":"…","message":"…","code":"no_face"}
//! ```
//!
//! Mapping from [`ProgressEvent`] ([`LegacyEvent::from_event`]):
//!
//! | default schema | legacy |
//! |---|---|
//! | `processing` | `processing` (no `percentage`) |
//! | `downloading`, `face_detecting`, `inference`, `merging_audio`, `uploading`, unknown | `progress` with `percentage` = ⌊`progress`⌋ (0 when absent) |
//! | `completed` | `completed` with `video_file_id` and `message` |
//! | `failed` | `error` with `error`, `message` (the event's message, else the error text) and `code` |
//!
//! The way back ([`LegacyEvent::into_event`]) maps `progress` to [`Status::Processing`] (the
//! legacy schema does not say which stage), `error` to [`Status::Failed`].

use serde::{Deserialize, Deserializer, Serialize};

use crate::progress::{ErrorCode, ProgressEvent, Status};

/// The `status` field of a legacy event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LegacyStatus {
    /// Task taken; work starts.
    Processing,
    /// Work advances; `percentage` is set.
    Progress,
    /// Terminal success; `video_file_id` is set.
    Completed,
    /// Terminal failure; `error` is set.
    Error,
    /// A status this version does not know (decoding only).
    #[serde(other)]
    Unknown,
}

/// One event in the legacy EchoMe schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyEvent {
    /// The task's `task_id`.
    pub task_id: String,
    /// The task's `session_id`.
    pub session_id: String,
    /// Current status.
    pub status: LegacyStatus,
    /// Whole percent done, 0 to 100 (decoding also accepts a float, rounded down and clamped).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "tolerant_percentage"
    )]
    pub percentage: Option<u8>,
    /// Human-readable description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Temp-file id of the video; with `completed` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_file_id: Option<String>,
    /// Error text; with `error` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Machine-readable error; with `error` only (our addition; the webapp shows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
}

fn tolerant_percentage<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
    let v: Option<f64> = Option::deserialize(d)?;
    Ok(v.map(|p| {
        if p.is_nan() {
            0
        } else {
            p.clamp(0.0, 100.0) as u8
        }
    }))
}

impl LegacyEvent {
    /// Maps a default-schema event to the legacy schema (see the [module docs](self)).
    pub fn from_event(event: &ProgressEvent) -> Self {
        let mut out = LegacyEvent {
            task_id: event.task_id.clone(),
            session_id: event.session_id.clone(),
            status: LegacyStatus::Progress,
            percentage: None,
            message: event.message.clone(),
            video_file_id: None,
            error: None,
            code: None,
        };
        match event.status {
            Status::Processing => out.status = LegacyStatus::Processing,
            Status::Completed => {
                out.status = LegacyStatus::Completed;
                out.video_file_id = event.video_file_id.clone();
            }
            Status::Failed => {
                out.status = LegacyStatus::Error;
                let error = event
                    .error
                    .clone()
                    .unwrap_or_else(|| "task failed".to_owned());
                out.message = Some(event.message.clone().unwrap_or_else(|| error.clone()));
                out.error = Some(error);
                out.code = Some(event.code.unwrap_or(ErrorCode::Internal));
            }
            _ => {
                let p = event.progress.unwrap_or(0.0);
                let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
                out.percentage = Some(p.floor() as u8);
            }
        }
        out
    }

    /// Normalises a legacy event into the default schema (see the [module docs](self)).
    pub fn into_event(self) -> ProgressEvent {
        let progress = self.percentage.map(f32::from);
        let mut event = ProgressEvent {
            task_id: self.task_id,
            session_id: self.session_id,
            status: Status::Processing,
            progress,
            message: self.message,
            video_file_id: None,
            error: None,
            code: None,
        };
        match self.status {
            LegacyStatus::Processing | LegacyStatus::Progress => {}
            LegacyStatus::Completed => {
                event.status = Status::Completed;
                event.progress = Some(100.0);
                event.video_file_id = self.video_file_id;
            }
            LegacyStatus::Error => {
                event.status = Status::Failed;
                event.error = Some(
                    self.error
                        .or_else(|| event.message.clone())
                        .unwrap_or_else(|| "task failed".to_owned()),
                );
                event.code = self.code;
            }
            LegacyStatus::Unknown => event.status = Status::Unknown,
        }
        event
    }

    /// The event as compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl From<&ProgressEvent> for LegacyEvent {
    fn from(event: &ProgressEvent) -> Self {
        LegacyEvent::from_event(event)
    }
}

/// Which schema a worker publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Schema {
    /// The guide's §3.2 schema ([`ProgressEvent`]).
    #[default]
    Default,
    /// The EchoMe webapp's schema ([`LegacyEvent`]).
    Legacy,
}

impl Schema {
    /// Encodes `event` in this schema.
    pub fn encode(self, event: &ProgressEvent) -> String {
        match self {
            Schema::Default => event.to_json(),
            Schema::Legacy => LegacyEvent::from_event(event).to_json(),
        }
    }
}

impl std::str::FromStr for Schema {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "default" | "guide" => Ok(Schema::Default),
            "legacy" | "echome" => Ok(Schema::Legacy),
            other => Err(format!(
                "unknown progress schema {other:?} (expected \"default\" or \"legacy\")"
            )),
        }
    }
}
