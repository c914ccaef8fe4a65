//! Errors of the protocol crate.
//!
//! [`InvalidTask`] says exactly which field of a task was wrong and why, and keeps the start of the
//! raw payload so a worker can log or dead-letter it. [`ProtocolError`] covers everything else
//! (events that do not decode, and, with the `redis` feature, Redis and timeout errors of the
//! client helpers).

use std::fmt;

/// How many bytes of a bad payload an error keeps (cut at a UTF-8 character boundary).
pub const RAW_EXCERPT_BYTES: usize = 1024;

/// The start of a raw payload, kept for logs and dead letters.
///
/// Invalid UTF-8 is replaced with U+FFFD; the text is cut to at most [`RAW_EXCERPT_BYTES`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExcerpt {
    /// The (possibly cut) text.
    pub text: String,
    /// Length of the whole payload in bytes.
    pub total_len: usize,
}

impl RawExcerpt {
    /// Keeps the first [`RAW_EXCERPT_BYTES`] bytes of `raw`.
    pub fn new(raw: &[u8]) -> Self {
        let lossy = String::from_utf8_lossy(raw);
        let mut end = lossy.len().min(RAW_EXCERPT_BYTES);
        while !lossy.is_char_boundary(end) {
            end -= 1;
        }
        RawExcerpt {
            text: lossy[..end].to_owned(),
            total_len: raw.len(),
        }
    }

    /// True when [`text`](Self::text) is shorter than the payload it came from.
    pub fn is_truncated(&self) -> bool {
        self.text.len() < self.total_len
    }
}

impl fmt::Display for RawExcerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)?;
        if self.is_truncated() {
            write!(
                f,
                " (first {} of {} bytes)",
                self.text.len(),
                self.total_len
            )?;
        }
        Ok(())
    }
}

/// The JSON type of a value, for "wrong type" messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// `null`
    Null,
    /// `true` / `false`
    Bool,
    /// any number
    Number,
    /// a string
    String,
    /// an array
    Array,
    /// an object
    Object,
}

impl JsonKind {
    /// The kind of `value`.
    pub fn of(value: &serde_json::Value) -> Self {
        match value {
            serde_json::Value::Null => JsonKind::Null,
            serde_json::Value::Bool(_) => JsonKind::Bool,
            serde_json::Value::Number(_) => JsonKind::Number,
            serde_json::Value::String(_) => JsonKind::String,
            serde_json::Value::Array(_) => JsonKind::Array,
            serde_json::Value::Object(_) => JsonKind::Object,
        }
    }
}

impl fmt::Display for JsonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JsonKind::Null => "null",
            JsonKind::Bool => "a boolean",
            JsonKind::Number => "a number",
            JsonKind::String => "a string",
            JsonKind::Array => "an array",
            JsonKind::Object => "an object",
        })
    }
}

/// What is wrong with a task.
#[derive(Debug)]
#[non_exhaustive]
pub enum TaskProblem {
    /// The payload is not UTF-8.
    NotUtf8,
    /// The payload is not JSON.
    NotJson(serde_json::Error),
    /// The payload is JSON but not an object.
    NotAnObject {
        /// What it is instead.
        found: JsonKind,
    },
    /// A required field is absent.
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong JSON type.
    WrongType {
        /// The field.
        field: &'static str,
        /// What the protocol expects, e.g. "a string" or "an integer".
        expected: &'static str,
        /// What was sent.
        found: JsonKind,
    },
    /// An id field is the empty string.
    Empty {
        /// The field.
        field: &'static str,
    },
    /// An id field is longer than [`MAX_ID_LEN`](crate::task::MAX_ID_LEN) bytes.
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An id field holds a URL or a path (`/`, `:` or `\`); only temp-file ids are accepted.
    LooksLikeUrlOrPath {
        /// The field.
        field: &'static str,
    },
    /// An id field holds a character outside `[A-Za-z0-9._-]`, or does not start with a letter or digit.
    BadIdChar {
        /// The field.
        field: &'static str,
        /// The offending character.
        ch: char,
        /// Its byte offset in the id.
        at: usize,
    },
    /// An integer field holds a number with a fractional part (e.g. `30.5`).
    NotAnInteger {
        /// The field.
        field: &'static str,
        /// The value sent.
        value: f64,
    },
    /// A number is outside its documented range.
    OutOfRange {
        /// The field.
        field: &'static str,
        /// The value sent, as written in JSON.
        value: String,
        /// The accepted range, e.g. "1..=100".
        range: &'static str,
    },
    /// The whole queue item is larger than the worker accepts; it was not parsed.
    ItemTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
}

impl fmt::Display for TaskProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskProblem::NotUtf8 => f.write_str("task payload is not valid UTF-8"),
            TaskProblem::NotJson(e) => write!(f, "task payload is not valid JSON: {e}"),
            TaskProblem::NotAnObject { found } => {
                write!(f, "task payload must be a JSON object, found {found}")
            }
            TaskProblem::Missing { field } => write!(f, "field `{field}` is required"),
            TaskProblem::WrongType {
                field,
                expected,
                found,
            } => write!(f, "field `{field}` must be {expected}, found {found}"),
            TaskProblem::Empty { field } => write!(f, "field `{field}` must not be empty"),
            TaskProblem::TooLong { field, len, max } => {
                write!(f, "field `{field}` is {len} bytes long, at most {max} allowed")
            }
            TaskProblem::LooksLikeUrlOrPath { field } => write!(
                f,
                "field `{field}` looks like a URL or a path; upload the file to the temp-file API and send its id"
            ),
            TaskProblem::BadIdChar { field, ch, at } => write!(
                f,
                "field `{field}` has character {ch:?} at byte {at}; ids use only ASCII letters, digits, '.', '_' and '-' and start with a letter or digit"
            ),
            TaskProblem::NotAnInteger { field, value } => {
                write!(f, "field `{field}` must be an integer, found {value}")
            }
            TaskProblem::OutOfRange {
                field,
                value,
                range,
            } => write!(f, "field `{field}` is {value}, outside the accepted range {range}"),
            TaskProblem::ItemTooLarge { len, max } => write!(
                f,
                "queue item is {len} bytes, larger than the {max} bytes a task may take; it was not parsed"
            ),
        }
    }
}

/// A task payload that was rejected, with the reason and the start of the payload.
///
/// Boxed inside, so `Result<Task, InvalidTask>` stays small.
#[derive(Debug)]
pub struct InvalidTask(Box<InvalidTaskInner>);

#[derive(Debug)]
struct InvalidTaskInner {
    problem: TaskProblem,
    raw: RawExcerpt,
    task_id: Option<String>,
    session_id: Option<String>,
}

impl InvalidTask {
    pub(crate) fn new(
        problem: TaskProblem,
        raw: &[u8],
        task_id: Option<String>,
        session_id: Option<String>,
    ) -> Self {
        InvalidTask(Box::new(InvalidTaskInner {
            problem,
            raw: RawExcerpt::new(raw),
            task_id,
            session_id,
        }))
    }

    /// Why it was rejected.
    pub fn problem(&self) -> &TaskProblem {
        &self.0.problem
    }

    /// The start of the payload as received.
    pub fn raw(&self) -> &RawExcerpt {
        &self.0.raw
    }

    /// `task_id` when the payload had a valid one (so a `failed` event can still be addressed).
    pub fn task_id(&self) -> Option<&str> {
        self.0.task_id.as_deref()
    }

    /// `session_id` when the payload had a valid one.
    pub fn session_id(&self) -> Option<&str> {
        self.0.session_id.as_deref()
    }

    /// The field at fault, when the problem concerns one field.
    pub fn field(&self) -> Option<&'static str> {
        match &self.0.problem {
            TaskProblem::Missing { field }
            | TaskProblem::WrongType { field, .. }
            | TaskProblem::Empty { field }
            | TaskProblem::TooLong { field, .. }
            | TaskProblem::LooksLikeUrlOrPath { field }
            | TaskProblem::BadIdChar { field, .. }
            | TaskProblem::NotAnInteger { field, .. }
            | TaskProblem::OutOfRange { field, .. } => Some(field),
            TaskProblem::NotUtf8
            | TaskProblem::NotJson(_)
            | TaskProblem::NotAnObject { .. }
            | TaskProblem::ItemTooLarge { .. } => None,
        }
    }
}

impl fmt::Display for InvalidTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid task: {}", self.0.problem)
    }
}

impl std::error::Error for InvalidTask {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.0.problem {
            TaskProblem::NotJson(e) => Some(e),
            _ => None,
        }
    }
}

/// Errors of the protocol crate other than task validation.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A task failed validation.
    InvalidTask(InvalidTask),
    /// A message (event, dead letter, queue item) did not decode.
    Decode {
        /// What was being decoded, e.g. "progress event".
        what: &'static str,
        /// The JSON error.
        source: serde_json::Error,
        /// The start of the payload.
        raw: RawExcerpt,
    },
    /// A Redis command failed.
    #[cfg(feature = "redis")]
    Redis(redis::RedisError),
    /// No terminal event for the task arrived in time.
    #[cfg(feature = "redis")]
    FollowTimeout {
        /// The task that was followed.
        task_id: String,
        /// How long the helper waited.
        waited: std::time::Duration,
        /// The last event seen for the task, if any.
        last: Option<Box<crate::progress::ProgressEvent>>,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::InvalidTask(e) => e.fmt(f),
            ProtocolError::Decode { what, source, raw } => {
                write!(f, "could not decode {what}: {source}; payload {raw}")
            }
            #[cfg(feature = "redis")]
            ProtocolError::Redis(e) => write!(f, "redis: {e}"),
            #[cfg(feature = "redis")]
            ProtocolError::FollowTimeout {
                task_id,
                waited,
                last,
            } => {
                write!(
                    f,
                    "no terminal event for task {task_id:?} within {:.1} s",
                    waited.as_secs_f64()
                )?;
                if let Some(last) = last {
                    write!(f, " (last status: {})", last.status)?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProtocolError::InvalidTask(e) => Some(e),
            ProtocolError::Decode { source, .. } => Some(source),
            #[cfg(feature = "redis")]
            ProtocolError::Redis(e) => Some(e),
            #[cfg(feature = "redis")]
            ProtocolError::FollowTimeout { .. } => None,
        }
    }
}

impl From<InvalidTask> for ProtocolError {
    fn from(e: InvalidTask) -> Self {
        ProtocolError::InvalidTask(e)
    }
}

#[cfg(feature = "redis")]
impl From<redis::RedisError> for ProtocolError {
    fn from(e: redis::RedisError) -> Self {
        ProtocolError::Redis(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_cuts_at_char_boundary() {
        let raw = "é".repeat(RAW_EXCERPT_BYTES); // 2 bytes each
        let ex = RawExcerpt::new(raw.as_bytes());
        assert!(ex.text.len() <= RAW_EXCERPT_BYTES);
        assert!(ex.text.chars().all(|c| c == 'é'));
        assert!(ex.is_truncated());
        assert_eq!(ex.total_len, raw.len());
    }

    #[test]
    fn excerpt_of_short_payload_is_whole() {
        let ex = RawExcerpt::new(b"{\"a\":1}");
        assert_eq!(ex.text, "{\"a\":1}");
        assert!(!ex.is_truncated());
    }
}
