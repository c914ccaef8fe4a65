//! The service with a stand-in engine ([`FakeEngine`]), in process, against a real Redis and a
//! real temp-file server: event sequences, every bad input, retries, shutdown, leases, outages
//! and a flood of malformed messages. Fast (a few seconds each); the real model is exercised
//! in `tests/process.rs`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use echomimic_protocol::{keys, ErrorCode, ProgressEvent, QueueItem, Status};
use echomimic_worker::{ShutdownHandle, Worker, WorkerError};
use redis::Commands;

#[test]
fn happy_path_event_sequence_and_playable_video() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake().with_call_delay(Duration::from_millis(5));
    let worker = start(&world, &["--geometry", "crop"], engine);
    let task = world.task(&unique("happy"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let events = rec.of(&task.task_id);
    assert_happy_sequence(&events);
    let statuses: Vec<Status> = events
        .iter()
        .map(|e| e.status)
        .filter(|s| *s != Status::Inference)
        .collect();
    assert_eq!(
        statuses,
        vec![
            Status::Processing,
            Status::Downloading,
            Status::Downloading,
            Status::FaceDetecting,
            Status::FaceDetecting,
            Status::MergingAudio,
            Status::Uploading,
            Status::Completed
        ]
    );
    let inference: Vec<&ProgressEvent> = events
        .iter()
        .filter(|e| e.status == Status::Inference)
        .collect();
    assert!(inference.len() >= 3, "{inference:#?}");
    assert!(inference.iter().any(|e| e
        .message
        .as_deref()
        .unwrap_or("")
        .contains("denoising step")));

    // The persisted keys match what was published.
    let stored = world.result(&task.task_id).expect("task_result");
    assert_eq!(stored, done);
    let latest = echomimic_protocol::client::read_latest_event(&mut world.con(), &task.task_id)?;
    assert_eq!(latest.as_ref(), Some(&done));
    let ttl: i64 = world.con().ttl(keys::task_result(&task.task_id))?;
    assert!(ttl > 3600, "{ttl}");

    let video = world.fetch_video(done.video_file_id.as_deref().expect("video id"));
    assert_eq!(video.video_codec, "h264");
    assert_eq!(video.pix_fmt, "yuv420p");
    assert_eq!((video.width, video.height), (W, W));
    assert!(video.audio_codec.is_some(), "no audio: {video:?}");
    assert!((video.duration - 1.5).abs() < 0.1, "{video:?}");

    // Idle again, nothing left in flight.
    std::thread::sleep(Duration::from_millis(300));
    assert!(world.processing_items().is_empty());
    assert_eq!(world.status().as_deref(), Some("idle"));
    let stats = stop(worker);
    assert_eq!((stats.claimed, stats.completed, stats.failed), (1, 1, 0));
    // Clean exit: status key and lease gone.
    assert_eq!(world.status(), None);
    assert_eq!(world.lease(), None);
    Ok(())
}

#[test]
fn paste_back_output_has_the_photo_size() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "paste-back"], fake());
    let task = world.task(&unique("paste"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap());
    let (pw, ph) = image::image_dimensions(photo())?;
    assert_eq!((video.width, video.height), (pw & !1, ph & !1));
    stop(worker);
    Ok(())
}

#[test]
fn every_bad_input_fails_once_with_its_code_and_the_worker_keeps_serving() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop"], fake());

    let cases = bad_input_cases(&world);
    push_bad_inputs(&world, &cases);
    let good = world.task(&unique("good-after-bad"));
    world.submit(&good);

    let done = rec.wait_terminal(&good.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert_bad_inputs_failed(&world, &rec, &cases);
    std::thread::sleep(Duration::from_millis(300));
    assert!(world.processing_items().is_empty());
    let stats = stop(worker);
    assert_eq!(stats.completed, 1);
    assert_eq!(stats.failed as usize, cases.len());
    assert_eq!(stats.dead_lettered, 1);
    Ok(())
}

#[test]
fn a_model_failure_is_retried_once_then_dead_lettered() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake();
    let handle = engine.clone();
    let worker = start(
        &world,
        &["--geometry", "crop", "--max-attempts", "2"],
        engine,
    );

    // One failure: retried, then completed; no `failed` event at all.
    handle.fail_next_runs(1);
    let t1 = world.task(&unique("retry-ok"));
    world.submit(&t1);
    let done = rec.wait_terminal(&t1.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed);
    assert_eq!(rec.terminal_count(&t1.task_id), 1);
    let processing = rec
        .of(&t1.task_id)
        .iter()
        .filter(|e| e.status == Status::Processing)
        .count();
    assert_eq!(processing, 2, "two attempts");

    // Two failures: the second attempt is the last; one `failed`, one dead letter.
    handle.fail_next_runs(2);
    let t2 = world.task(&unique("retry-fail"));
    world.submit(&t2);
    let failed = rec.wait_terminal(&t2.task_id, Duration::from_secs(60));
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.code, Some(ErrorCode::InferenceFailed));
    assert!(failed.error.as_deref().unwrap().contains("attempt 2 of 2"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rec.terminal_count(&t2.task_id), 1);
    let letters: Vec<_> = world
        .dead_letters()
        .into_iter()
        .filter(|d| d.task_id.as_deref() == Some(t2.task_id.as_str()))
        .collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 2);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&letters[0].payload)?,
        serde_json::from_str::<serde_json::Value>(&t2.to_json())?
    );
    let stats = stop(worker);
    assert_eq!((stats.retried, stats.completed, stats.failed), (2, 1, 1));
    Ok(())
}

#[test]
fn stop_request_while_busy_requeues_the_task_without_failed() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // 36 frames → 3 windows; 25 steps × 3 × 100 ms = 7.5 s of "inference".
    let engine = fake().with_call_delay(Duration::from_millis(100));
    let worker = start(&world, &["--grace-secs", "0"], engine);
    let task = world.task(&unique("sigterm"));
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(30));
    let t = Instant::now();
    let stats = stop(worker);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stopped in {:?}",
        t.elapsed()
    );
    assert_eq!(stats.released, 1);
    // Back at the head of the queue exactly as submitted (not counted as an attempt).
    world.assert_requeued_after_stop(&rec, &task);

    // The next worker picks it up and completes it.
    let worker = start(&world, &["--geometry", "crop"], fake());
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed);
    stop(worker);
    Ok(())
}

#[test]
fn stop_request_lets_the_running_task_finish_within_the_grace_period() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake().with_call_delay(Duration::from_millis(20));
    let worker = start(
        &world,
        &["--grace-secs", "60", "--geometry", "crop"],
        engine,
    );
    let task = world.task(&unique("grace"));
    let second = world.task(&unique("grace-next"));
    world.submit(&task);
    world.submit(&second);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(30));
    let stats = stop(worker);
    assert_eq!(
        rec.of(&task.task_id).last().map(|e| e.status),
        Some(Status::Completed)
    );
    // The prefetched (or not yet claimed) second task is back in the queue, untouched.
    assert_eq!(rec.terminal_count(&second.task_id), 0);
    let items = world.queue_items();
    assert_eq!(items.len(), 1);
    assert_eq!(QueueItem::parse(&items[0]).task()?, second);
    assert_eq!(QueueItem::parse(&items[0]).attempts(), 0);
    assert_eq!(stats.completed, 1);
    Ok(())
}

#[test]
fn a_second_worker_with_the_same_gpu_id_refuses_to_start() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    // Both in this process: the holder cannot be proven dead, so the second one watches the
    // lease until the first one's heartbeat (every second with a 3 s TTL) refreshes it.
    let ttl = ["--lease-ttl-secs", "3", "--status-ttl-secs", "3"];
    let first = start(&world, &ttl, fake());
    let t = Instant::now();
    let second = Worker::start(world.config(&ttl), ShutdownHandle::new(), || Ok(fake()));
    match second {
        Err(WorkerError::LeaseHeld { gpu_id, owner, .. }) => {
            assert_eq!(gpu_id, world.gpu_id);
            assert_eq!(Some(owner), world.lease());
        }
        other => panic!("expected LeaseHeld, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    // The first one is unaffected.
    assert_eq!(world.status().as_deref(), Some("idle"));
    stop(first);
    Ok(())
}

/// While the temp-file server is down the task has no terminal event; once it is back the
/// task completes, with exactly one terminal event. Its `completed` event.
fn completes_once_the_server_is_back(
    world: &mut World,
    rec: &Recorder,
    task_id: &str,
) -> ProgressEvent {
    assert_eq!(rec.terminal_count(task_id), 0, "{:#?}", rec.of(task_id));
    world.restart_server();
    let done = rec.wait_terminal(task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert_eq!(rec.terminal_count(task_id), 1, "{:#?}", rec.of(task_id));
    done
}

#[test]
fn a_temp_file_outage_shorter_than_the_budget_costs_no_task_and_no_second_run() -> TestResult {
    let Some(mut world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // 0.2 s per UNet call: the second task's inference outlives the stop of the server.
    let engine = fake().with_call_delay(Duration::from_millis(200));
    let runs = engine.clone();
    let worker = start(&world, &["--outage-secs", "60"], engine);
    // Down before the downloads: the task waits for the server instead of failing.
    world.stop_server();
    let task = world.task(&unique("outage-download"));
    world.submit(&task);
    std::thread::sleep(Duration::from_secs(3));
    completes_once_the_server_is_back(&mut world, &rec, &task.task_id);
    assert_eq!(runs.started_runs(), 1);

    // Down while the video is made: the upload waits, the model does not run again.
    let mut task = world.task(&unique("outage-upload"));
    task.steps = Some(5);
    task.cfg = Some(1.0);
    task.frames_num = Some(12);
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(60));
    world.stop_server();
    // The upload starts (and fails) while the server is down.
    rec.wait_status(&task.task_id, Status::Uploading, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    completes_once_the_server_is_back(&mut world, &rec, &task.task_id);
    assert_eq!(
        runs.started_runs(),
        2,
        "one model run per task, none for a retried upload"
    );
    stop(worker);
    Ok(())
}

#[test]
fn an_upload_outage_past_its_budget_requeues_the_task_without_a_second_model_run() -> TestResult {
    let Some(mut world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake().with_call_delay(Duration::from_millis(200));
    let runs = engine.clone();
    // One second of outage riding per upload: the requeue comes quickly.
    let worker = start(
        &world,
        &[
            "--outage-secs",
            "1",
            "--max-attempts",
            "5",
            "--geometry",
            "crop",
        ],
        engine,
    );
    let mut task = world.task(&unique("outage-past-budget"));
    task.steps = Some(5);
    task.cfg = Some(1.0);
    task.frames_num = Some(12);
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(60));
    world.stop_server();
    // The upload gives up, the task goes back with its video kept, and the next attempt
    // (this worker claims it again) starts by uploading that video.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while rec.claims(&task.task_id).len() < 2 {
        assert!(
            std::time::Instant::now() < end,
            "{:#?}",
            rec.of(&task.task_id)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = completes_once_the_server_is_back(&mut world, &rec, &task.task_id);
    assert!(
        done.message
            .as_deref()
            .unwrap_or("")
            .starts_with("video ready: 64x64, 12 frames"),
        "the first attempt's message: {done:?}"
    );
    assert_eq!(
        runs.started_runs(),
        1,
        "one model run, however many upload attempts"
    );
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap_or_default());
    assert_eq!(video.frames, Some(12), "{video:?}");
    let kept = world.dir.path().join("work/echomimic-outbox");
    let left = std::fs::read_dir(&kept).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the kept video is removed once uploaded");
    stop(worker);
    Ok(())
}

/// Starts a worker with `args`, submits a task and checks that it fails with `bad_input`, a
/// message holding every one of `said`, and no model run; the worker is stopped after.
fn fails_as_bad_input_before_the_model_runs(
    world: &World,
    rec: &Recorder,
    args: &[&str],
    said: &[&str],
) {
    let engine = fake();
    let runs = engine.clone();
    let worker = start(world, args, engine);
    let task = world.task(&unique("bad-before-run"));
    world.submit(&task);
    let failed = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.code, Some(ErrorCode::BadInput), "{failed:?}");
    let message = failed.error.clone().unwrap_or_default();
    assert!(said.iter().all(|s| message.contains(s)), "{message}");
    assert_eq!(runs.started_runs(), 0, "no model run for it");
    stop(worker);
}

#[test]
fn a_photo_too_large_to_paste_back_fails_before_the_model_runs() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // The test photo is 512x512 = 262 144 pixels.
    fails_as_bad_input_before_the_model_runs(
        &world,
        &rec,
        &["--max-output-pixels", "100000"],
        &["512x512", "--max-output-pixels"],
    );

    // The crop output is not bounded by it.
    let engine = fake();
    let worker = start(
        &world,
        &["--max-output-pixels", "100000", "--geometry", "crop"],
        engine,
    );
    let task = world.task(&unique("crop-ok"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    stop(worker);
    Ok(())
}

#[test]
fn a_temp_file_outage_past_the_total_fails_the_task_unavailable_after_its_deferrals() -> TestResult
{
    let Some(mut world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let args = [
        "--outage-secs",
        "1",
        "--outage-delay-secs",
        "1",
        "--outage-total-secs",
        "3",
    ];
    let worker = start(&world, &args, fake());
    world.stop_server();
    let task = world.task(&unique("tfdown"));
    world.submit(&task);
    let t = Instant::now();
    let failed = rec.wait_terminal(&task.task_id, Duration::from_secs(40));
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.code, Some(ErrorCode::Unavailable), "{failed:?}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(error.contains("limit of 3 s"), "{error}");
    // 1 s of riding per claim, 1 s aside between claims, until 3 s past the first deferral
    // (counted in whole Unix seconds, so up to one second early).
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(20),
        "{took:?}"
    );
    let claims = rec.claims(&task.task_id).len();
    assert!(
        claims >= 2,
        "claimed {claims} time(s): {:#?}",
        rec.of(&task.task_id)
    );
    assert!(
        rec.of(&task.task_id).iter().any(|e| e
            .message
            .as_deref()
            .is_some_and(|m| m.contains("waits 1 s and is tried again"))),
        "the client is told: {:#?}",
        rec.of(&task.task_id)
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rec.terminal_count(&task.task_id), 1);
    assert!(world.delayed_items().is_empty());
    let dead = world.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1, "an outage costs no attempt");
    stop(worker);
    Ok(())
}

#[test]
fn a_download_outage_past_its_budget_puts_the_task_aside_and_it_completes_once_back() -> TestResult
{
    let Some(mut world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake();
    let runs = engine.clone();
    let args = [
        "--outage-secs",
        "1",
        "--outage-delay-secs",
        "2",
        "--max-attempts",
        "1",
    ];
    let worker = start(&world, &args, engine);
    world.stop_server();
    let task = world.task(&unique("outage-aside"));
    world.submit(&task);
    // Put aside (not failed, not counted), and the worker idle meanwhile.
    let end = Instant::now() + Duration::from_secs(30);
    while world.delayed_items().is_empty() {
        assert!(Instant::now() < end, "{:#?}", rec.of(&task.task_id));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(world.queue_items().is_empty() && world.processing_items().is_empty());
    // A few rounds aside, then the server is back: one completion, one model run, no
    // attempt spent (with --max-attempts 1 a counted retry would have failed it).
    std::thread::sleep(Duration::from_secs(4));
    let done = completes_once_the_server_is_back(&mut world, &rec, &task.task_id);
    assert!(done.video_file_id.is_some(), "{done:?}");
    assert_eq!(runs.started_runs(), 1);
    assert!(rec.claims(&task.task_id).len() >= 2);
    assert!(world.delayed_items().is_empty() && world.dead_letters().is_empty());
    stop(worker);
    Ok(())
}

#[test]
fn a_video_that_cannot_fit_the_upload_limit_fails_before_the_model_runs() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    fails_as_bad_input_before_the_model_runs(
        &world,
        &rec,
        &["--max-upload-bytes", "60000"],
        &["upload limit of 60000 bytes", "512x512"],
    );
    Ok(())
}

#[test]
fn legacy_schema_speaks_the_echome_vocabulary_and_clears_all_task_ids() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(
        &world,
        &["--schema", "legacy", "--geometry", "crop"],
        fake(),
    );
    let task = world.task(&unique("legacy"));
    let _: u64 = world.con().sadd(keys::LEGACY_TASK_SET, &task.task_id)?;
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed);
    let raws: Vec<serde_json::Value> = rec
        .all()
        .into_iter()
        .filter(|s| s.event.task_id == task.task_id)
        .map(|s| serde_json::from_slice(&s.raw).unwrap())
        .collect();
    assert_eq!(raws[0]["status"], "processing");
    assert!(raws
        .iter()
        .any(|v| v["status"] == "progress" && v["percentage"].is_u64()));
    assert_eq!(raws.last().unwrap()["status"], "completed");
    assert!(raws.iter().all(|v| v.get("progress").is_none()));
    let member: bool = world
        .con()
        .sismember(keys::LEGACY_TASK_SET, &task.task_id)?;
    assert!(!member, "task id still in all_task_ids");
    stop(worker);
    Ok(())
}

#[test]
fn frames_num_shortens_the_video_and_cuts_the_audio() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop"], fake());
    let mut task = world.task(&unique("frames"));
    task.frames_num = Some(12);
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert!(done.message.as_deref().unwrap().contains("cut"), "{done:?}");
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap());
    assert!((video.duration - 0.5).abs() < 0.1, "{video:?}");
    stop(worker);
    Ok(())
}

#[test]
fn leftovers_of_a_crashed_run_are_requeued_counting_an_attempt() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // A previous run died working on two items (one on the model, one being encoded): a
    // fresh task, and one on its last attempt.
    let fresh = world.task(&unique("crashed"));
    let last = world.task(&unique("crashed-last"));
    world.track_task(&fresh.task_id);
    world.track_task(&last.task_id);
    let once = QueueItem::parse(fresh.to_json().as_bytes());
    let spent = QueueItem::parse(
        QueueItem::parse(last.to_json().as_bytes())
            .requeued("earlier crash")
            .unwrap()
            .as_bytes(),
    );
    let mut con = world.con();
    let _: u64 = con.rpush(keys::processing_list(world.gpu_id), once.raw())?;
    let _: u64 = con.rpush(keys::processing_list(world.gpu_id), spent.raw())?;
    let active = keys::worker_active(world.gpu_id);
    let _: u64 = con.hset(&active, "claim-1", once.raw())?;
    let _: u64 = con.hset(&active, "claim-2", spent.raw())?;
    let worker = start(
        &world,
        &["--geometry", "crop", "--max-attempts", "2"],
        fake(),
    );
    let done = rec.wait_terminal(&fresh.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed);
    let given_up = rec.wait_terminal(&last.task_id, Duration::from_secs(10));
    assert_eq!(given_up.code, Some(ErrorCode::AttemptsExhausted));
    let stats = stop(worker);
    assert_eq!(stats.recovered, 2);
    assert_eq!(rec.terminal_count(&fresh.task_id), 1);
    assert_eq!(rec.terminal_count(&last.task_id), 1);
    Ok(())
}

#[test]
fn a_thousand_malformed_messages_are_all_dead_lettered_or_failed() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(&world, &["--geometry", "crop"], fake());
    let mut con = world.con();
    let mut with_id = Vec::new();
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        let payload: Vec<u8> = match i % 5 {
            0 => format!("not json {i}").into_bytes(),
            1 => b"[1,2,3]".to_vec(),
            2 => vec![0xff, 0xfe, i as u8],
            3 => {
                let id = format!("{}-{i}", world.queue);
                with_id.push(id.clone());
                format!(r#"{{"task_id":"{id}","session_id":"s"}}"#).into_bytes()
            }
            _ => "x".repeat(200_000).into_bytes(),
        };
        pipe.rpush(&world.queue, payload).ignore();
    }
    for id in &with_id {
        world.track_task(id);
    }
    let _: () = pipe.query(&mut con)?;
    let good = world.task(&unique("after-flood"));
    world.submit(&good);
    let done = rec.wait_terminal(&good.task_id, Duration::from_secs(120));
    assert_eq!(done.status, Status::Completed);
    let stats = stop(worker);
    assert_eq!(stats.failed + stats.dead_lettered, 1000, "{stats:?}");
    assert_eq!(stats.failed as usize, with_id.len());
    for id in with_id.iter().take(20) {
        assert_eq!(rec.terminal_count(id), 1);
    }
    assert_eq!(world.dead_letters().len(), 1000);
    Ok(())
}

#[test]
fn a_second_stop_request_cancels_the_running_task_at_once() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let engine = fake().with_call_delay(Duration::from_millis(100));
    let worker = start(&world, &["--grace-secs", "600"], engine);
    let task = world.task(&unique("twice"));
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(30));
    let handle = worker.shutdown_handle();
    assert_eq!(handle.request(), echomimic_worker::ShutdownLevel::Graceful);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(handle.request(), echomimic_worker::ShutdownLevel::Immediate);
    let stats = worker.join()?;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Requeued once by the cancelled run; the fetcher's last `BLMOVE`, still blocked when the
    // second request came, may take it back and release it again (no event either way).
    assert!(stats.released >= 1, "{stats:?}");
    world.assert_requeued_after_stop(&rec, &task);
    Ok(())
}

#[test]
fn the_next_task_is_prepared_during_inference_and_only_with_prefetch() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    for prefetch in ["true", "false"] {
        let rec = world.recorder();
        let engine = fake().with_call_delay(Duration::from_millis(40));
        let worker = start(
            &world,
            &["--geometry", "crop", "--prefetch", prefetch],
            engine,
        );
        let first = world.task(&unique("first"));
        let second = world.task(&unique("second"));
        world.submit(&first);
        world.submit(&second);
        rec.wait_status(&first.task_id, Status::Inference, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(500));
        let during = rec.of(&second.task_id);
        let first_done = rec.terminal_count(&first.task_id) == 1;
        if prefetch == "true" {
            assert!(!first_done, "the first task should still be running");
            let ready = during.iter().any(|e| {
                e.status == Status::FaceDetecting
                    && e.message
                        .as_deref()
                        .unwrap_or("")
                        .contains("waiting for the GPU")
            });
            assert!(
                ready,
                "second task not prepared during inference: {during:#?}"
            );
            assert_eq!(world.processing_items().len(), 2);
        } else if !first_done {
            assert!(during.is_empty(), "claimed without prefetch: {during:#?}");
            assert_eq!(world.queue_items().len(), 1);
        }
        for t in [&first, &second] {
            assert_eq!(
                rec.wait_terminal(&t.task_id, Duration::from_secs(60))
                    .status,
                Status::Completed
            );
        }
        stop(worker);
    }
    Ok(())
}

const TEMPFILE_TOKEN: &str = "worker-test-token-0123456789abcdef";

#[test]
fn with_a_tempfile_token_on_both_sides_the_task_completes() -> TestResult {
    let Some(world) = World::with_tempfile_tokens(&[TEMPFILE_TOKEN]) else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(
        &world,
        &["--geometry", "crop", "--tempfile-token", TEMPFILE_TOKEN],
        fake(),
    );
    let task = world.task(&unique("token-ok"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(60));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    // The upload went through the token too: the video is there (fetched with the token).
    let video = world.fetch_video(done.video_file_id.as_deref().expect("video id"));
    assert_eq!((video.width, video.height), (W, W));
    let stats = stop(worker);
    assert_eq!((stats.claimed, stats.completed, stats.failed), (1, 1, 0));
    Ok(())
}

#[test]
fn a_refused_tempfile_token_fails_each_task_once_and_the_worker_keeps_serving() -> TestResult {
    let Some(world) = World::with_tempfile_tokens(&[TEMPFILE_TOKEN]) else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(
        &world,
        &["--tempfile-token", "not-the-servers-token-0000000000"],
        fake(),
    );
    let tasks: Vec<_> = (0..2)
        .map(|i| world.task(&unique(&format!("token-bad-{i}"))))
        .collect();
    for task in &tasks {
        world.submit(task);
    }
    for task in &tasks {
        let failed = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
        assert_eq!(failed.status, Status::Failed);
        assert_eq!(
            failed.code,
            Some(ErrorCode::TempfileUnauthorized),
            "{failed:?}"
        );
        let text = failed.error.as_deref().unwrap_or("");
        assert!(
            text.contains("refused the access token") && !text.contains("not-the-servers"),
            "{text}"
        );
    }
    // Once each (no retry, no requeue), dead-lettered with the code, nothing left in flight.
    std::thread::sleep(Duration::from_millis(300));
    for task in &tasks {
        assert_eq!(rec.terminal_count(&task.task_id), 1);
    }
    assert!(world.queue_items().is_empty() && world.processing_items().is_empty());
    let dead = world.dead_letters();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead
        .iter()
        .all(|d| d.code == ErrorCode::TempfileUnauthorized && d.attempts <= 1));
    assert_eq!(world.status().as_deref(), Some("idle"));
    let stats = stop(worker);
    assert_eq!((stats.claimed, stats.failed, stats.retried), (2, 2, 0));
    Ok(())
}
