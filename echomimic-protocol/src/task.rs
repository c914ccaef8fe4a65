//! The task a client pushes onto a worker queue (usage guide §5.1,
//! `docs/worker-usage-guide.zh.md`).
//!
//! ```json
//! {"task_id": "t-1", "session_id": "s-1",
//!  "ref_image_id": "550e8400-e29b-41d4-a716-446655440000",
//!  "audio_id": "661f9511-f3ac-52e5-b827-557766551111",
//!  "steps": 30, "cfg": 3.0, "seed": 42}
//! ```
//!
//! # Validation rules
//!
//! [`Task::from_json`] reports the first problem it finds, checking fields in the order
//! `task_id`, `session_id`, `ref_image_id`, `audio_id`, `steps`, `cfg`, `seed`, `frames_num`.
//!
//! * **Ids** (all four required fields): a JSON string of 1 to [`MAX_ID_LEN`] bytes made of
//!   ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit. A `/`, `:` or `\`
//!   is reported as "looks like a URL or a path": the guide forbids URLs and paths, the worker
//!   only downloads temp-file ids. The same rule applies to `task_id` and `session_id`
//!   because they become part of Redis key names and file names.
//! * **Optional numbers**: absent and `null` both mean "not given".
//!   Integer fields (`steps`, `seed`, `frames_num`) also accept a float with no fractional part
//!   (`30.0`, as Python's `json.dumps` writes floats), but not `30.5`
//!   ([`TaskProblem::NotAnInteger`]) and not strings (`"30"` is [`TaskProblem::WrongType`]).
//!   Out-of-range values are rejected, never clamped:
//!   `steps` in [`STEPS_RANGE`], `cfg` in [`CFG_RANGE`] (any JSON number, integers included),
//!   `seed` any `i64` (a negative seed means "pick a random seed", as in the reference
//!   `infer_audio2vid.py`, which seeds only when `seed > -1`), `frames_num` in [`FRAMES_NUM_RANGE`].
//! * **Unknown fields** are ignored, for forward compatibility.

use std::ops::RangeInclusive;

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::error::{InvalidTask, JsonKind, TaskProblem};

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Accepted `steps` (denoising steps). The normal weights use 25–30, the accelerated ones 4–6.
pub const STEPS_RANGE: RangeInclusive<u32> = 1..=100;
/// Accepted `cfg` (classifier-free guidance scale). 1.0 or less disables guidance.
pub const CFG_RANGE: RangeInclusive<f64> = 0.0..=20.0;
/// Accepted `frames_num`: up to 5 minutes of video at EchoMimic's 24 fps.
pub const FRAMES_NUM_RANGE: RangeInclusive<u32> = 1..=7200;

const STEPS_RANGE_TEXT: &str = "1..=100";
const CFG_RANGE_TEXT: &str = "0.0..=20.0";
const SEED_RANGE_TEXT: &str = "-9223372036854775808..=9223372036854775807";
const FRAMES_NUM_RANGE_TEXT: &str = "1..=7200";

/// A generation task: which uploaded photo to animate with which uploaded speech.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Task {
    /// Client-chosen task id; echoed in every progress event. Not necessarily unique: the EchoMe
    /// webapp reuses one id per session.
    pub task_id: String,
    /// Client session id; echoed in every progress event.
    pub session_id: String,
    /// Temp-file id of the reference portrait (image).
    pub ref_image_id: String,
    /// Temp-file id of the driving speech (audio).
    pub audio_id: String,
    /// Denoising steps, in [`STEPS_RANGE`]; `None` = the worker's default for its weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Guidance scale, in [`CFG_RANGE`]; `None` = the worker's default for its weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg: Option<f64>,
    /// Random seed; negative = random (see [`Task::fixed_seed`]); `None` = the worker's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Number of video frames, in [`FRAMES_NUM_RANGE`]; `None` = derived from the audio length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frames_num: Option<u32>,
}

impl Task {
    /// A task with the four required fields and no options.
    pub fn new(
        task_id: impl Into<String>,
        session_id: impl Into<String>,
        ref_image_id: impl Into<String>,
        audio_id: impl Into<String>,
    ) -> Self {
        Task {
            task_id: task_id.into(),
            session_id: session_id.into(),
            ref_image_id: ref_image_id.into(),
            audio_id: audio_id.into(),
            steps: None,
            cfg: None,
            seed: None,
            frames_num: None,
        }
    }

    /// Parses and validates a raw queue payload (see the [module docs](self) for the rules).
    pub fn from_json(raw: &[u8]) -> Result<Task, InvalidTask> {
        let fail = |problem| InvalidTask::new(problem, raw, None, None);
        let text = std::str::from_utf8(raw).map_err(|_| fail(TaskProblem::NotUtf8))?;
        let value: Value = serde_json::from_str(text).map_err(|e| fail(TaskProblem::NotJson(e)))?;
        Task::from_value_with_raw(&value, raw)
    }

    /// Validates an already parsed JSON value.
    pub fn from_value(value: &Value) -> Result<Task, InvalidTask> {
        let raw = serde_json::to_vec(value).unwrap_or_default();
        Task::from_value_with_raw(value, &raw)
    }

    fn from_value_with_raw(value: &Value, raw: &[u8]) -> Result<Task, InvalidTask> {
        let obj = match value {
            Value::Object(obj) => obj,
            other => {
                return Err(InvalidTask::new(
                    TaskProblem::NotAnObject {
                        found: JsonKind::of(other),
                    },
                    raw,
                    None,
                    None,
                ))
            }
        };
        parse_object(obj).map_err(|problem| {
            InvalidTask::new(
                problem,
                raw,
                usable_id(obj, "task_id"),
                usable_id(obj, "session_id"),
            )
        })
    }

    /// Checks a task built in code against the same rules as [`Task::from_json`].
    pub fn validate(&self) -> Result<(), TaskProblem> {
        check_id("task_id", &self.task_id)?;
        check_id("session_id", &self.session_id)?;
        check_id("ref_image_id", &self.ref_image_id)?;
        check_id("audio_id", &self.audio_id)?;
        if let Some(steps) = self.steps {
            if !STEPS_RANGE.contains(&steps) {
                return Err(out_of_range("steps", steps, STEPS_RANGE_TEXT));
            }
        }
        if let Some(cfg) = self.cfg {
            if !cfg.is_finite() || !CFG_RANGE.contains(&cfg) {
                return Err(out_of_range("cfg", cfg, CFG_RANGE_TEXT));
            }
        }
        if let Some(frames) = self.frames_num {
            if !FRAMES_NUM_RANGE.contains(&frames) {
                return Err(out_of_range("frames_num", frames, FRAMES_NUM_RANGE_TEXT));
            }
        }
        Ok(())
    }

    /// The seed to use, or `None` when the worker should pick one at random
    /// (no seed given, or a negative seed as in the reference implementation).
    pub fn fixed_seed(&self) -> Option<u64> {
        self.seed.and_then(|s| u64::try_from(s).ok())
    }

    /// The task as compact JSON (options that are `None` are left out).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl std::str::FromStr for Task {
    type Err = InvalidTask;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::from_json(s.as_bytes())
    }
}

impl<'de> serde::Deserialize<'de> for Task {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Task::from_value(&value).map_err(|e| serde::de::Error::custom(e.problem()))
    }
}

/// True when `id` satisfies the id rules of the [module docs](self).
pub fn is_valid_id(id: &str) -> bool {
    check_id("id", id).is_ok()
}

/// Checks one id field against the id rules of the [module docs](self).
pub fn check_id(field: &'static str, id: &str) -> Result<(), TaskProblem> {
    if id.is_empty() {
        return Err(TaskProblem::Empty { field });
    }
    if id.len() > MAX_ID_LEN {
        return Err(TaskProblem::TooLong {
            field,
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    if id.contains(['/', ':', '\\']) {
        return Err(TaskProblem::LooksLikeUrlOrPath { field });
    }
    for (at, ch) in id.char_indices() {
        let ok = ch.is_ascii_alphanumeric() || (at > 0 && matches!(ch, '.' | '_' | '-'));
        if !ok {
            return Err(TaskProblem::BadIdChar { field, ch, at });
        }
    }
    Ok(())
}

fn parse_object(obj: &Map<String, Value>) -> Result<Task, TaskProblem> {
    let task_id = id_field(obj, "task_id")?;
    let session_id = id_field(obj, "session_id")?;
    let ref_image_id = id_field(obj, "ref_image_id")?;
    let audio_id = id_field(obj, "audio_id")?;
    let steps = u32_field(obj, "steps", &STEPS_RANGE, STEPS_RANGE_TEXT)?;
    let cfg = float_field(obj, "cfg", CFG_RANGE, CFG_RANGE_TEXT)?;
    let seed = int_field(obj, "seed", i64::MIN, i64::MAX, SEED_RANGE_TEXT)?;
    let frames_num = u32_field(obj, "frames_num", &FRAMES_NUM_RANGE, FRAMES_NUM_RANGE_TEXT)?;
    Ok(Task {
        task_id,
        session_id,
        ref_image_id,
        audio_id,
        steps,
        cfg,
        seed,
        frames_num,
    })
}

fn usable_id(obj: &Map<String, Value>, field: &'static str) -> Option<String> {
    match obj.get(field) {
        Some(Value::String(s)) if check_id(field, s).is_ok() => Some(s.clone()),
        _ => None,
    }
}

fn id_field(obj: &Map<String, Value>, field: &'static str) -> Result<String, TaskProblem> {
    match obj.get(field) {
        None => Err(TaskProblem::Missing { field }),
        Some(Value::String(s)) => {
            check_id(field, s)?;
            Ok(s.clone())
        }
        Some(other) => Err(TaskProblem::WrongType {
            field,
            expected: "a string",
            found: JsonKind::of(other),
        }),
    }
}

fn out_of_range(field: &'static str, value: impl ToString, range: &'static str) -> TaskProblem {
    TaskProblem::OutOfRange {
        field,
        value: value.to_string(),
        range,
    }
}

/// Largest magnitude up to which every integer is exactly representable in an `f64`.
const F64_EXACT_INT: f64 = 9_007_199_254_740_992.0; // 2^53

fn int_field(
    obj: &Map<String, Value>,
    field: &'static str,
    min: i64,
    max: i64,
    range: &'static str,
) -> Result<Option<i64>, TaskProblem> {
    let n = match obj.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(other) => {
            return Err(TaskProblem::WrongType {
                field,
                expected: "an integer",
                found: JsonKind::of(other),
            })
        }
    };
    let v = integer_value(field, n, range)?;
    if v < min || v > max {
        return Err(out_of_range(field, n, range));
    }
    Ok(Some(v))
}

fn u32_field(
    obj: &Map<String, Value>,
    field: &'static str,
    range: &RangeInclusive<u32>,
    range_text: &'static str,
) -> Result<Option<u32>, TaskProblem> {
    let min = i64::from(*range.start());
    let max = i64::from(*range.end());
    // In range of a u32 range, so the conversion cannot fail.
    Ok(int_field(obj, field, min, max, range_text)?.and_then(|v| u32::try_from(v).ok()))
}

fn integer_value(field: &'static str, n: &Number, range: &'static str) -> Result<i64, TaskProblem> {
    if let Some(v) = n.as_i64() {
        return Ok(v);
    }
    if n.is_u64() {
        // Above i64::MAX.
        return Err(out_of_range(field, n, range));
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if !f.is_finite() || f.fract() != 0.0 {
        return Err(TaskProblem::NotAnInteger { field, value: f });
    }
    if f.abs() > F64_EXACT_INT {
        return Err(out_of_range(field, n, range));
    }
    Ok(f as i64)
}

fn float_field(
    obj: &Map<String, Value>,
    field: &'static str,
    range: RangeInclusive<f64>,
    range_text: &'static str,
) -> Result<Option<f64>, TaskProblem> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if v.is_finite() && range.contains(&v) {
                Ok(Some(v))
            } else {
                Err(out_of_range(field, n, range_text))
            }
        }
        Some(other) => Err(TaskProblem::WrongType {
            field,
            expected: "a number",
            found: JsonKind::of(other),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        assert!(is_valid_id("550e8400-e29b-41d4-a716-446655440000"));
        assert!(is_valid_id("unique_task_123"));
        assert!(is_valid_id("a.b_c-d"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".."));
        assert!(!is_valid_id("-a"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id(&"a".repeat(MAX_ID_LEN + 1)));
        assert!(is_valid_id(&"a".repeat(MAX_ID_LEN)));
    }

    #[test]
    fn url_and_path_chars_are_named_as_such() {
        for id in ["http://x/y", "/api/tempfile/download/1", "C:\\a", "a/b"] {
            assert!(matches!(
                check_id("audio_id", id),
                Err(TaskProblem::LooksLikeUrlOrPath { field: "audio_id" })
            ));
        }
    }

    #[test]
    fn fixed_seed_follows_reference_convention() {
        let mut t = Task::new("t", "s", "i", "a");
        assert_eq!(t.fixed_seed(), None);
        t.seed = Some(-1);
        assert_eq!(t.fixed_seed(), None);
        t.seed = Some(0);
        assert_eq!(t.fixed_seed(), Some(0));
        t.seed = Some(42);
        assert_eq!(t.fixed_seed(), Some(42));
    }

    #[test]
    fn validate_matches_parser_bounds() {
        let mut t = Task::new("t", "s", "i", "a");
        assert!(t.validate().is_ok());
        t.steps = Some(0);
        assert!(matches!(
            t.validate(),
            Err(TaskProblem::OutOfRange { field: "steps", .. })
        ));
        t.steps = Some(100);
        t.cfg = Some(f64::NAN);
        assert!(matches!(
            t.validate(),
            Err(TaskProblem::OutOfRange { field: "cfg", .. })
        ));
        t.cfg = Some(20.0);
        t.frames_num = Some(7201);
        assert!(matches!(
            t.validate(),
            Err(TaskProblem::OutOfRange {
                field: "frames_num",
                ..
            })
        ));
        t.frames_num = Some(7200);
        assert!(t.validate().is_ok());
        t.ref_image_id = "http://evil".into();
        assert!(matches!(
            t.validate(),
            Err(TaskProblem::LooksLikeUrlOrPath {
                field: "ref_image_id"
            })
        ));
    }
}
