//! The bad inputs of the protocol, pushed as tasks, and the failures they must end in.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use echomimic_protocol::{Status, Task};

use super::recorder::Recorder;
use super::redis_server::unique;
use super::world::{png, upload, wav, World};

/// One bad task: its id, the raw payload, and the code its `failed` event must carry.
pub type BadCase = (String, Vec<u8>, echomimic_protocol::ErrorCode);

/// The bad inputs of the protocol, each with a task id: missing field, URL as id, steps out of
/// range, unknown file id, non-image bytes as the photo, a blank photo (no face), silent and
/// corrupt audio.
pub fn bad_input_cases(world: &World) -> Vec<BadCase> {
    use echomimic_protocol::ErrorCode;
    let blank = upload(
        world,
        "blank.png",
        &png(&image::RgbImage::from_pixel(
            256,
            256,
            image::Rgb([200, 200, 200]),
        )),
    );
    let silent = upload(world, "silent.wav", &wav(&vec![0i16; 16000]));
    let corrupt = upload(
        world,
        "corrupt.mp3",
        b"ID3\x04\x00\x00\x00\x00\x00\x00garbage that is not an mp3 stream at all",
    );

    let id = |what: &str| unique(what);
    let mut cases: Vec<(String, Vec<u8>, ErrorCode)> = Vec::new();
    let t = |task_id: &str, image: &str, audio: &str| {
        Task::new(task_id, "s", image, audio).to_json().into_bytes()
    };
    let missing = id("missing");
    cases.push((
        missing.clone(),
        format!(
            r#"{{"task_id":"{missing}","session_id":"s","audio_id":"{}"}}"#,
            world.audio_id
        )
        .into_bytes(),
        ErrorCode::InvalidTask,
    ));
    let bad_id = id("badid");
    cases.push((
        bad_id.clone(),
        format!(r#"{{"task_id":"{bad_id}","session_id":"s","ref_image_id":"http://evil.example/x.png","audio_id":"{}"}}"#, world.audio_id).into_bytes(),
        ErrorCode::InvalidTask,
    ));
    let steps = id("steps");
    cases.push((
        steps.clone(),
        format!(r#"{{"task_id":"{steps}","session_id":"s","ref_image_id":"{}","audio_id":"{}","steps":1000}}"#, world.image_id, world.audio_id).into_bytes(),
        ErrorCode::InvalidTask,
    ));
    let unknown = id("unknown");
    cases.push((
        unknown.clone(),
        t(
            &unknown,
            "00000000-0000-4000-8000-000000000000",
            &world.audio_id,
        ),
        ErrorCode::InputNotFound,
    ));
    let notimage = id("notimage");
    cases.push((
        notimage.clone(),
        t(&notimage, &world.audio_id, &world.audio_id),
        ErrorCode::BadInput,
    ));
    let noface = id("noface");
    cases.push((
        noface.clone(),
        t(&noface, &blank, &world.audio_id),
        ErrorCode::NoFace,
    ));
    let silence = id("silent");
    cases.push((
        silence.clone(),
        t(&silence, &world.image_id, &silent),
        ErrorCode::BadInput,
    ));
    let broken = id("corrupt");
    cases.push((
        broken.clone(),
        t(&broken, &world.image_id, &corrupt),
        ErrorCode::BadInput,
    ));

    cases
}

/// Pushes the cases, preceded by a malformed JSON payload (no task id: dead letter only).
pub fn push_bad_inputs(world: &World, cases: &[BadCase]) {
    world.push_raw(b"{\"task_id\": \"x\", oops");
    for (task_id, raw, _) in cases {
        world.track_task(task_id);
        world.push_raw(raw);
    }
}

/// Checks that each case got exactly one `failed` with its code (also in `task_result`) and no
/// inference, and that the malformed payload and every case were dead-lettered.
pub fn assert_bad_inputs_failed(world: &World, rec: &Recorder, cases: &[BadCase]) {
    for (task_id, _, code) in cases {
        let events = rec.of(task_id);
        let terminals: Vec<_> = events.iter().filter(|e| e.is_terminal()).collect();
        assert_eq!(terminals.len(), 1, "{task_id}: {events:#?}");
        let t = terminals[0];
        assert_eq!(t.status, Status::Failed, "{task_id}");
        assert_eq!(t.code, Some(*code), "{task_id}: {:?}", t.error);
        assert!(!t.error.as_deref().unwrap_or("").is_empty());
        assert_eq!(world.result(task_id).as_ref(), Some(t));
        assert!(
            !events.iter().any(|e| e.status == Status::Inference),
            "{task_id}"
        );
    }
    let letters = world.dead_letters();
    assert_eq!(letters.len(), cases.len() + 1, "{letters:#?}");
    assert!(letters
        .iter()
        .any(|d| d.task_id.is_none() && d.code == echomimic_protocol::ErrorCode::InvalidTask));
}
