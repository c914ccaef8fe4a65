//! Wire-format tests: every JSON example of the usage guide, the legacy EchoMe messages,
//! round trips in both directions, and one test per validation error.

use std::fmt::Debug;

use echomimic_protocol::error::JsonKind;
use echomimic_protocol::{
    DeadLetter, ErrorCode, InvalidTask, LegacyEvent, LegacyStatus, ProgressEvent, QueueItem,
    Schema, Stage, Status, Task, TaskProblem, WorkerState,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Checks `value` serialises to exactly the JSON object `json` (so `None` fields must be
/// omitted, not `null`) and that `json` deserialises back to `value`.
fn assert_wire<T>(value: &T, json: &str)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let expected: Value = serde_json::from_str(json).expect("fixture is JSON");
    let got = serde_json::to_value(value).expect("serialises");
    assert_eq!(got, expected, "serialised form differs");
    let back: T = serde_json::from_str(json).expect("fixture deserialises");
    assert_eq!(&back, value, "deserialised value differs");
}

fn parse_err(json: &str) -> InvalidTask {
    match Task::from_json(json.as_bytes()) {
        Ok(t) => panic!("expected an error for {json}, got {t:?}"),
        Err(e) => e,
    }
}

const IMG: &str = "550e8400-e29b-41d4-a716-446655440000";
const AUD: &str = "661f9511-f3ac-52e5-b827-557766551111";

fn base() -> serde_json::Map<String, Value> {
    serde_json::json!({"task_id":"t-1","session_id":"s-1","ref_image_id":IMG,"audio_id":AUD})
        .as_object()
        .cloned()
        .unwrap()
}

fn with(field: &str, value: Value) -> String {
    let mut m = base();
    m.insert(field.to_owned(), value);
    Value::Object(m).to_string()
}

fn without(field: &str) -> String {
    let mut m = base();
    m.remove(field);
    Value::Object(m).to_string()
}

// ---------------------------------------------------------------- guide examples

/// Usage guide (`docs/worker-usage-guide.zh.md`) §5.2: the task dict built by the Python
/// example, as `json.dumps` writes it.
#[test]
fn guide_python_example_task_parses() -> TestResult {
    let raw = format!(
        r#"{{"task_id": "0f8fad5b-d9cb-469f-a165-70867728950e", "session_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "ref_image_id": "{IMG}", "audio_id": "{AUD}", "steps": 30, "cfg": 3.0, "seed": 42}}"#
    );
    let task = Task::from_json(raw.as_bytes())?;
    assert_eq!(task.task_id, "0f8fad5b-d9cb-469f-a165-70867728950e");
    assert_eq!(task.ref_image_id, IMG);
    assert_eq!(task.audio_id, AUD);
    assert_eq!(task.steps, Some(30));
    assert_eq!(task.cfg, Some(3.0));
    assert_eq!(task.seed, Some(42));
    assert_eq!(task.frames_num, None);
    Ok(())
}

/// Guide §3.1: the RPUSH example (with its `...` removed) has no `session_id`, which §5.1
/// marks as required: the error says exactly that.
#[test]
fn guide_rpush_example_lacks_session_id() {
    let raw = format!(
        r#"{{"task_id": "unique_task_123", "ref_image_id": "{IMG}", "audio_id": "{AUD}"}}"#
    );
    let err = parse_err(&raw);
    assert!(matches!(
        err.problem(),
        TaskProblem::Missing {
            field: "session_id"
        }
    ));
    assert_eq!(err.task_id(), Some("unique_task_123"));
    assert_eq!(
        err.to_string(),
        "invalid task: field `session_id` is required"
    );
}

/// Guide §5.1: the schema description itself (types written as strings) is not a task.
#[test]
fn guide_schema_placeholder_is_rejected_precisely() {
    let raw = r#"{"task_id": "string (必须, 任务唯一ID)", "session_id": "string (必须, 会话ID)",
        "ref_image_id": "string", "audio_id": "string", "steps": "integer (可选, 推理步数，默认通常为25)"}"#;
    let err = parse_err(raw);
    assert!(matches!(
        err.problem(),
        TaskProblem::BadIdChar {
            field: "task_id",
            ch: ' ',
            at: 6
        }
    ));
}

/// Guide §3.2: each documented message shape decodes in the default schema.
#[test]
fn guide_progress_message_shapes_parse() -> TestResult {
    let cases = [
        (
            r#"{"task_id":"t","session_id":"s","status":"processing","progress":0.0,"message":"queued"}"#,
            Status::Processing,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"downloading","progress":5.0,"message":"downloading inputs"}"#,
            Status::Downloading,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"face_detecting","progress":10.0}"#,
            Status::FaceDetecting,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"inference","progress":42.5,"message":"step 3/6"}"#,
            Status::Inference,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"merging_audio","progress":95}"#,
            Status::MergingAudio,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"completed","progress":100.0,"video_file_id":"550e8400-e29b-41d4-a716-446655440000"}"#,
            Status::Completed,
        ),
        (
            r#"{"task_id":"t","session_id":"s","status":"failed","error":"no face found"}"#,
            Status::Failed,
        ),
    ];
    for (raw, status) in cases {
        let e = ProgressEvent::from_json(raw.as_bytes())?;
        assert_eq!(e.status, status, "{raw}");
        assert_eq!(ProgressEvent::parse_any(raw.as_bytes())?, e, "{raw}");
    }
    let done = ProgressEvent::from_json(cases[5].0.as_bytes())?;
    assert_eq!(done.video_file_id.as_deref(), Some(IMG));
    assert!(done.is_terminal());
    let failed = ProgressEvent::from_json(cases[6].0.as_bytes())?;
    assert_eq!(failed.error.as_deref(), Some("no face found"));
    assert_eq!(failed.code, None);
    // `progress` written as an integer decodes as a float.
    assert_eq!(
        ProgressEvent::from_json(cases[4].0.as_bytes())?.progress,
        Some(95.0)
    );
    Ok(())
}

/// The legacy messages of the original worker (ASCII-escaped Chinese, as `json.dumps` writes),
/// which the guide's §5.2 client example reads.
#[test]
fn legacy_messages_of_the_original_worker_parse() -> TestResult {
    let processing = r#"{"task_id": "s1", "session_id": "s1", "status": "processing", "message": "\u4e0b\u8f7d\u5fc5\u8981\u6587\u4ef6..."}"#;
    let e = ProgressEvent::parse_any(processing.as_bytes())?;
    assert_eq!(e.status, Status::Processing);
    assert_eq!(e.message.as_deref(), Some("下载必要文件..."));
    assert_eq!(e.progress, None);

    let progress = r#"{"task_id": "s1", "session_id": "s1", "status": "progress", "percentage": 20, "message": "\u5f00\u59cb\u751f\u6210\u89c6\u9891..."}"#;
    let e = ProgressEvent::parse_any(progress.as_bytes())?;
    assert_eq!(e.status, Status::Processing);
    assert_eq!(e.progress, Some(20.0));
    assert_eq!(e.message.as_deref(), Some("开始生成视频..."));

    let completed = format!(
        r#"{{"task_id": "s1", "session_id": "s1", "status": "completed", "video_file_id": "{IMG}", "message": "\u89c6\u9891\u751f\u6210\u5b8c\u6210"}}"#
    );
    let e = ProgressEvent::parse_any(completed.as_bytes())?;
    assert_eq!(e.status, Status::Completed);
    assert_eq!(e.video_file_id.as_deref(), Some(IMG));

    let error1 = r#"{"task_id": "s1", "session_id": "s1", "status": "error", "error": "CUDA out of memory"}"#;
    let e = ProgressEvent::parse_any(error1.as_bytes())?;
    assert_eq!(e.status, Status::Failed);
    assert_eq!(e.error.as_deref(), Some("CUDA out of memory"));
    assert!(e.is_terminal());

    // Our legacy output adds message and code; both come back.
    let error2 = r#"{"task_id":"s1","session_id":"s1","status":"error","error":"no face","message":"no face","code":"no_face"}"#;
    let e = ProgressEvent::parse_any(error2.as_bytes())?;
    assert_eq!(e.code, Some(ErrorCode::NoFace));

    // The default-schema decoder alone does not know "progress"/"error".
    assert_eq!(
        ProgressEvent::from_json(progress.as_bytes())?.status,
        Status::Unknown
    );
    Ok(())
}

// ---------------------------------------------------------------- round trips

#[test]
fn task_round_trip_omits_absent_options() {
    let mut task = Task::new("t-1", "s-1", IMG, AUD);
    assert_wire(
        &task,
        &format!(
            r#"{{"task_id":"t-1","session_id":"s-1","ref_image_id":"{IMG}","audio_id":"{AUD}"}}"#
        ),
    );
    task.steps = Some(6);
    task.cfg = Some(2.5);
    task.seed = Some(-1);
    task.frames_num = Some(240);
    assert_wire(
        &task,
        &format!(
            r#"{{"task_id":"t-1","session_id":"s-1","ref_image_id":"{IMG}","audio_id":"{AUD}","steps":6,"cfg":2.5,"seed":-1,"frames_num":240}}"#
        ),
    );
    assert_eq!(Task::from_json(task.to_json().as_bytes()).unwrap(), task);
}

#[test]
fn progress_event_round_trips() {
    assert_wire(
        &ProgressEvent::stage("t", "s", Stage::Inference, 42.5, "step 3/6"),
        r#"{"task_id":"t","session_id":"s","status":"inference","progress":42.5,"message":"step 3/6"}"#,
    );
    assert_wire(
        &ProgressEvent::stage("t", "s", Stage::Uploading, 98.0, "uploading video"),
        r#"{"task_id":"t","session_id":"s","status":"uploading","progress":98.0,"message":"uploading video"}"#,
    );
    assert_wire(
        &ProgressEvent::completed("t", "s", "vid", "done"),
        r#"{"task_id":"t","session_id":"s","status":"completed","progress":100.0,"message":"done","video_file_id":"vid"}"#,
    );
    assert_wire(
        &ProgressEvent::failed("t", "s", ErrorCode::InputNotFound, "audio 123 not found"),
        r#"{"task_id":"t","session_id":"s","status":"failed","error":"audio 123 not found","code":"input_not_found"}"#,
    );
    assert_wire(
        &ProgressEvent::failed("t", "s", ErrorCode::Oom, "out of memory")
            .with_message("try fewer frames"),
        r#"{"task_id":"t","session_id":"s","status":"failed","message":"try fewer frames","error":"out of memory","code":"oom"}"#,
    );
}

#[test]
fn legacy_mapping_table() {
    let cases = [
        (
            ProgressEvent::stage("t", "s", Stage::Processing, 0.0, "claimed"),
            r#"{"task_id":"t","session_id":"s","status":"processing","message":"claimed"}"#,
        ),
        (
            ProgressEvent::stage("t", "s", Stage::Downloading, 5.0, "dl"),
            r#"{"task_id":"t","session_id":"s","status":"progress","percentage":5,"message":"dl"}"#,
        ),
        (
            ProgressEvent::stage("t", "s", Stage::FaceDetecting, 10.9, "face"),
            r#"{"task_id":"t","session_id":"s","status":"progress","percentage":10,"message":"face"}"#,
        ),
        (
            ProgressEvent::stage("t", "s", Stage::Inference, 55.5, "inf"),
            r#"{"task_id":"t","session_id":"s","status":"progress","percentage":55,"message":"inf"}"#,
        ),
        (
            ProgressEvent::stage("t", "s", Stage::MergingAudio, 95.0, "mux"),
            r#"{"task_id":"t","session_id":"s","status":"progress","percentage":95,"message":"mux"}"#,
        ),
        (
            ProgressEvent::stage("t", "s", Stage::Uploading, 98.0, "up"),
            r#"{"task_id":"t","session_id":"s","status":"progress","percentage":98,"message":"up"}"#,
        ),
        (
            ProgressEvent::completed("t", "s", "vid", "done"),
            r#"{"task_id":"t","session_id":"s","status":"completed","message":"done","video_file_id":"vid"}"#,
        ),
        (
            ProgressEvent::failed("t", "s", ErrorCode::NoFace, "no face found"),
            r#"{"task_id":"t","session_id":"s","status":"error","message":"no face found","error":"no face found","code":"no_face"}"#,
        ),
    ];
    for (event, json) in cases {
        let legacy = LegacyEvent::from_event(&event);
        assert_wire(&legacy, json);
        let encoded: Value = serde_json::from_str(&Schema::Legacy.encode(&event)).unwrap();
        assert_eq!(encoded, serde_json::from_str::<Value>(json).unwrap());
        // The client side normalises it back; terminal-ness and ids survive.
        let back = ProgressEvent::parse_any(json.as_bytes()).unwrap();
        assert_eq!(back.is_terminal(), event.is_terminal());
        assert_eq!(back.task_id, "t");
        assert_eq!(back.video_file_id, event.video_file_id);
        assert_eq!(back.code, event.code);
    }
    let default: Value = serde_json::from_str(&Schema::Default.encode(&cases_first())).unwrap();
    assert_eq!(default["status"], "processing");
}

fn cases_first() -> ProgressEvent {
    ProgressEvent::stage("t", "s", Stage::Processing, 0.0, "claimed")
}

#[test]
fn legacy_percentage_tolerates_floats() {
    let e: LegacyEvent = serde_json::from_str(
        r#"{"task_id":"t","session_id":"s","status":"progress","percentage":45.7}"#,
    )
    .unwrap();
    assert_eq!(e.percentage, Some(45));
    assert_eq!(e.status, LegacyStatus::Progress);
    let e: LegacyEvent = serde_json::from_str(
        r#"{"task_id":"t","session_id":"s","status":"progress","percentage":250}"#,
    )
    .unwrap();
    assert_eq!(e.percentage, Some(100));
}

#[test]
fn schema_names() {
    assert_eq!("default".parse::<Schema>().unwrap(), Schema::Default);
    assert_eq!("legacy".parse::<Schema>().unwrap(), Schema::Legacy);
    assert!("xml".parse::<Schema>().unwrap_err().contains("xml"));
}

#[test]
fn dead_letter_wire_shape() {
    let item = QueueItem::parse(with("steps", Value::from(0)).as_bytes());
    let err = item.task().unwrap_err();
    let dl = DeadLetter::new(
        &item,
        ErrorCode::InvalidTask,
        err.to_string(),
        1_700_000_000,
    )
    .with_origin(0, "task_queue_gpu_0");
    assert_wire(
        &dl,
        &format!(
            r#"{{"payload":{},"reason":"invalid task: field `steps` is 0, outside the accepted range 1..=100","code":"invalid_task","attempts":1,"failed_at":1700000000,"task_id":"t-1","gpu_id":0,"queue":"task_queue_gpu_0"}}"#,
            serde_json::to_string(&with("steps", Value::from(0))).unwrap()
        ),
    );
}

#[test]
fn worker_state_wire() {
    assert_wire(&WorkerState::Idle, r#""idle""#);
    assert_wire(&WorkerState::Busy, r#""busy""#);
    let other: WorkerState = serde_json::from_str(r#""offline""#).unwrap();
    assert_eq!(other, WorkerState::Unknown);
}

// ---------------------------------------------------------------- tolerance

#[test]
fn unknown_fields_are_ignored() -> TestResult {
    let raw = with("priority", Value::from("high"));
    let task = Task::from_json(raw.as_bytes())?;
    assert_eq!(task, Task::new("t-1", "s-1", IMG, AUD));

    let e = ProgressEvent::from_json(
        br#"{"task_id":"t","session_id":"s","status":"inference","progress":1,"eta_s":12,"gpu":{"id":0}}"#,
    )?;
    assert_eq!(e.status, Status::Inference);
    Ok(())
}

#[test]
fn unknown_status_and_code_decode_as_unknown() -> TestResult {
    let e = ProgressEvent::parse_any(
        br#"{"task_id":"t","session_id":"s","status":"warming_up","progress":1}"#,
    )?;
    assert_eq!(e.status, Status::Unknown);
    assert!(!e.is_terminal());
    let e = ProgressEvent::parse_any(
        br#"{"task_id":"t","session_id":"s","status":"failed","error":"x","code":"disk_full"}"#,
    )?;
    assert_eq!(e.code, Some(ErrorCode::Unknown));
    assert!(e.is_terminal());
    Ok(())
}

#[test]
fn null_optionals_mean_absent() -> TestResult {
    let mut m = base();
    for f in ["steps", "cfg", "seed", "frames_num"] {
        m.insert(f.into(), Value::Null);
    }
    let task = Task::from_json(Value::Object(m).to_string().as_bytes())?;
    assert_eq!(task, Task::new("t-1", "s-1", IMG, AUD));
    Ok(())
}

#[test]
fn integer_valued_floats_are_accepted() -> TestResult {
    assert_eq!(
        Task::from_json(with("steps", serde_json::json!(30.0)).as_bytes())?.steps,
        Some(30)
    );
    assert_eq!(
        Task::from_json(with("seed", serde_json::json!(42.0)).as_bytes())?.seed,
        Some(42)
    );
    assert_eq!(
        Task::from_json(with("frames_num", serde_json::json!(240.0)).as_bytes())?.frames_num,
        Some(240)
    );
    assert_eq!(
        Task::from_json(with("cfg", serde_json::json!(3)).as_bytes())?.cfg,
        Some(3.0)
    );
    Ok(())
}

#[test]
fn boundary_values_are_accepted() -> TestResult {
    for (f, v) in [
        ("steps", serde_json::json!(1)),
        ("steps", serde_json::json!(100)),
        ("cfg", serde_json::json!(0.0)),
        ("cfg", serde_json::json!(20.0)),
        ("seed", serde_json::json!(i64::MIN)),
        ("seed", serde_json::json!(i64::MAX)),
        ("frames_num", serde_json::json!(1)),
        ("frames_num", serde_json::json!(7200)),
    ] {
        Task::from_json(with(f, v.clone()).as_bytes())
            .map_err(|e| format!("{f}={v} rejected: {e}"))?;
    }
    Ok(())
}

#[test]
fn serde_deserialize_validates_too() {
    let err = serde_json::from_str::<Task>(&with("audio_id", Value::from("../x"))).unwrap_err();
    assert!(
        err.to_string()
            .contains("`audio_id` looks like a URL or a path"),
        "{err}"
    );
}

// ---------------------------------------------------------------- precise errors

#[test]
fn not_utf8() {
    let err = Task::from_json(b"{\"task_id\":\"\xff\"}").unwrap_err();
    assert!(matches!(err.problem(), TaskProblem::NotUtf8));
    assert_eq!(err.raw().total_len, 15);
}

#[test]
fn not_json_keeps_raw_and_source() {
    let err = parse_err("{\"task_id\": ");
    assert!(matches!(err.problem(), TaskProblem::NotJson(_)));
    assert_eq!(err.raw().text, "{\"task_id\": ");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn raw_of_a_huge_payload_is_truncated() {
    let raw = with("padding", Value::from("x".repeat(10_000))).replace("\"t-1\"", "1");
    let err = parse_err(&raw);
    assert!(err.raw().is_truncated());
    assert_eq!(
        err.raw().text.len(),
        echomimic_protocol::error::RAW_EXCERPT_BYTES
    );
    assert_eq!(err.raw().total_len, raw.len());
}

#[test]
fn not_an_object() {
    for (raw, kind) in [
        ("[1,2]", JsonKind::Array),
        ("\"task\"", JsonKind::String),
        ("null", JsonKind::Null),
        ("42", JsonKind::Number),
    ] {
        let err = parse_err(raw);
        assert!(
            matches!(err.problem(), TaskProblem::NotAnObject { found } if *found == kind),
            "{raw}: {err}"
        );
    }
}

#[test]
fn each_required_field_missing() {
    for f in ["task_id", "session_id", "ref_image_id", "audio_id"] {
        let err = parse_err(&without(f));
        assert!(
            matches!(err.problem(), TaskProblem::Missing { field } if *field == f),
            "{f}: {err}"
        );
        assert_eq!(err.field(), Some(f));
    }
}

#[test]
fn wrong_types() {
    let cases = [
        ("task_id", Value::from(123), "a string", JsonKind::Number),
        ("session_id", Value::Null, "a string", JsonKind::Null),
        (
            "audio_id",
            serde_json::json!(["a"]),
            "a string",
            JsonKind::Array,
        ),
        ("steps", Value::from("30"), "an integer", JsonKind::String),
        ("steps", Value::from(true), "an integer", JsonKind::Bool),
        ("cfg", Value::from("2.5"), "a number", JsonKind::String),
        (
            "seed",
            serde_json::json!({"v":1}),
            "an integer",
            JsonKind::Object,
        ),
        (
            "frames_num",
            Value::from("240"),
            "an integer",
            JsonKind::String,
        ),
    ];
    for (f, v, exp, kind) in cases {
        let err = parse_err(&with(f, v));
        assert!(
            matches!(err.problem(), TaskProblem::WrongType { field, expected, found }
                if *field == f && *expected == exp && *found == kind),
            "{f}: {err}"
        );
    }
    assert_eq!(
        parse_err(&with("steps", Value::from("30"))).to_string(),
        "invalid task: field `steps` must be an integer, found a string"
    );
}

#[test]
fn empty_ids() {
    for f in ["task_id", "session_id", "ref_image_id", "audio_id"] {
        let err = parse_err(&with(f, Value::from("")));
        assert!(
            matches!(err.problem(), TaskProblem::Empty { field } if *field == f),
            "{err}"
        );
    }
}

#[test]
fn overlong_id() {
    let err = parse_err(&with("ref_image_id", Value::from("a".repeat(129))));
    assert!(matches!(
        err.problem(),
        TaskProblem::TooLong {
            field: "ref_image_id",
            len: 129,
            max: 128
        }
    ));
}

#[test]
fn urls_and_paths_instead_of_ids() {
    for v in [
        "http://localhost:3000/api/tempfile/download/x",
        "https://evil.example/a.jpg",
        "/api/tempfile/download/550e8400",
        "../../etc/passwd",
        "C:\\Users\\a.jpg",
        "file:a.jpg",
    ] {
        let err = parse_err(&with("ref_image_id", Value::from(v)));
        assert!(
            matches!(
                err.problem(),
                TaskProblem::LooksLikeUrlOrPath {
                    field: "ref_image_id"
                }
            ),
            "{v}: {err}"
        );
        assert!(err.to_string().contains("temp-file API"));
    }
}

#[test]
fn bad_id_characters() {
    for (v, ch, at) in [
        ("a b", ' ', 1),
        ("ab\u{0}", '\u{0}', 2),
        ("..", '.', 0),
        ("-x", '-', 0),
        ("ü", 'ü', 0),
    ] {
        let err = parse_err(&with("audio_id", Value::from(v)));
        assert!(
            matches!(err.problem(), TaskProblem::BadIdChar { field: "audio_id", ch: c, at: a } if *c == ch && *a == at),
            "{v:?}: {err}"
        );
    }
}

#[test]
fn out_of_range_numbers() {
    let cases = [
        ("steps", serde_json::json!(0), "0"),
        ("steps", serde_json::json!(101), "101"),
        ("steps", serde_json::json!(-5), "-5"),
        ("steps", serde_json::json!(1e30), "1e+30"),
        ("cfg", serde_json::json!(-0.1), "-0.1"),
        ("cfg", serde_json::json!(20.5), "20.5"),
        ("seed", serde_json::json!(u64::MAX), "18446744073709551615"),
        ("seed", serde_json::json!(1e19), "1e+19"),
        ("frames_num", serde_json::json!(0), "0"),
        ("frames_num", serde_json::json!(7201), "7201"),
    ];
    for (f, v, shown) in cases {
        let err = parse_err(&with(f, v));
        assert!(
            matches!(err.problem(), TaskProblem::OutOfRange { field, value, .. } if *field == f && value == shown),
            "{f}: {err}"
        );
    }
    assert_eq!(
        parse_err(&with("steps", serde_json::json!(101))).to_string(),
        "invalid task: field `steps` is 101, outside the accepted range 1..=100"
    );
}

#[test]
fn fractional_integers() {
    for f in ["steps", "seed", "frames_num"] {
        let err = parse_err(&with(f, serde_json::json!(30.5)));
        assert!(
            matches!(err.problem(), TaskProblem::NotAnInteger { field, value } if *field == f && *value == 30.5),
            "{f}: {err}"
        );
    }
}

#[test]
fn first_problem_wins_and_ids_are_kept() {
    let mut m = base();
    m.insert("steps".into(), Value::from(0));
    m.insert("cfg".into(), Value::from(99));
    let err = parse_err(&Value::Object(m).to_string());
    assert_eq!(err.field(), Some("steps"));
    assert_eq!(err.task_id(), Some("t-1"));
    assert_eq!(err.session_id(), Some("s-1"));
}
