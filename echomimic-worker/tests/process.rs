//! The `echomimic-worker` binary as a child process, serving the tiny random-weight model in
//! the official layout (`testdata/golden/public`, 64×64 here): the full path, and the faults
//! that need a real process (kill -9, SIGTERM, a second process on the same gpu id, a Redis
//! restart, memory under a flood of garbage). Each test takes a few seconds to ~30 s; they are
//! the slow part of the worker's suite.

#![allow(clippy::print_stdout)] // tests report their measurements

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use echomimic_protocol::{keys, ErrorCode, Status, Task};
use redis::Commands;

/// A task that keeps the tiny model busy for a while (100 UNet calls, the most a task may
/// ask for: about 5 s on a 2-core CPU). It must outlast a stop's cancel, which waits up to a
/// second for the fetcher's last claim to end; at 20 calls the faster CPU path finished first.
fn slow_task(world: &World, id: &str) -> Task {
    let mut t = world.task(id);
    t.steps = Some(100);
    t.cfg = Some(1.0);
    t.frames_num = Some(12);
    t
}

fn quick_task(world: &World, id: &str) -> Task {
    let mut t = world.task(id);
    t.steps = Some(2);
    t.cfg = Some(1.0);
    t.frames_num = Some(12);
    t
}

#[test]
fn help_documents_every_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
        .args(["serve", "--help"])
        .output()
        .expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "REDIS_URL",
        "REDIS_HOST",
        "REDIS_PORT",
        "REDIS_DB",
        "REDIS_PASSWORD",
        "REDIS_USERNAME",
        "REDIS_TLS",
        "REDIS_CA_FILE",
        "BASE_URL",
        "GPU_ID",
        "TASK_QUEUE_NAME",
        "PROGRESS_CHANNEL",
        "PRETRAINED_WEIGHTS_DIR",
        "METRICS_LISTEN",
        "ECHOMIMIC_LOG_FORMAT",
        "--config",
        "--width",
        "--height",
        "--fps",
        "--context-frames",
        "--context-overlap",
        "--variant",
        "--device",
        "--dtype",
        "--max-attempts",
        "--schema",
        "--geometry",
        "--encoder",
        "--event-ttl-secs",
        "--result-ttl-secs",
        "--status-ttl-secs",
        "--lease-ttl-secs",
        "--grace-secs",
        "--temp-dir",
        "--max-download-bytes",
        "--max-audio-secs",
        "--http-attempts",
        "--prefetch",
        "--outage-secs",
        "--max-output-pixels",
    ] {
        assert!(
            help.contains(needle),
            "`serve --help` does not mention {needle}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
        .args(["generate", "--help"])
        .output()
        .expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--image",
        "--audio",
        "--output",
        "--length",
        "--init-noise",
        "--dump-tensors",
    ] {
        assert!(
            help.contains(needle),
            "`generate --help` does not mention {needle}"
        );
    }
}

#[test]
fn a_bad_setting_exits_with_status_2_and_names_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
        .args([
            "--weights",
            "/nonexistent/pretrained_weights",
            "--redis-password",
            "hunter2",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("huggingface-cli download BadToBest/EchoMimic"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

#[test]
fn binary_serves_the_tiny_model_end_to_end() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &["--redis-password", "not-logged-secret"]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let mut task = world.task(&unique("bin"));
    task.steps = Some(2);
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(180));
    assert_eq!(
        done.status,
        Status::Completed,
        "{done:?}\n{}",
        worker.log_text()
    );
    assert_happy_sequence(&rec.of(&task.task_id));
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap());
    assert_eq!(video.video_codec, "h264");
    assert_eq!(video.pix_fmt, "yuv420p");
    assert_eq!(video.audio_codec.as_deref(), Some("aac"));
    let (pw, ph) = image::image_dimensions(photo())?;
    assert_eq!(
        (video.width, video.height),
        (pw & !1, ph & !1),
        "paste-back is the default"
    );
    assert!((video.duration - 1.5).abs() < 0.1, "{video:?}");
    assert_eq!(video.frames, Some(36));
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(world.status(), None);
    assert_eq!(world.lease(), None);
    assert!(!worker.log_text().contains("not-logged-secret"));
    Ok(())
}

/// A voice note (Opus in Ogg) uploaded under a wrong name (`.mp3`, as apps do) is served as
/// `audio/ogg` by the temp-file server and drives a video: the worker decodes it with ffmpeg.
#[test]
fn a_misnamed_voice_note_drives_a_video() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let note = world.dir.path().join("note.ogg");
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i"])
        .arg(speech())
        .args(["-c:a", "libopus", "-b:a", "24k"])
        .arg(&note)
        .status()?;
    assert!(status.success(), "ffmpeg could not make the voice note");
    let audio_id = world.http.upload_file_as(&note, "voice note.mp3")?.file_id;
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &[]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let mut task = quick_task(&world, &unique("voice"));
    task.audio_id = audio_id;
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(180));
    assert_eq!(
        done.status,
        Status::Completed,
        "{done:?}\n{}",
        worker.log_text()
    );
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap());
    assert_eq!(video.frames, Some(12));
    assert_eq!(video.audio_codec.as_deref(), Some("aac"));
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    Ok(())
}

#[test]
fn kill_9_mid_inference_then_restart_completes_exactly_once() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let ttl = ["--lease-ttl-secs", "3", "--status-ttl-secs", "3"];
    let mut worker = WorkerProc::start(&world, &ttl);
    worker.wait_ready(&world, Duration::from_secs(120));
    let task = slow_task(&world, &unique("kill9"));
    world.submit(&task);
    // Wait until at least one UNet call has finished, then pull the plug.
    let end = Instant::now() + Duration::from_secs(120);
    while !rec
        .of(&task.task_id)
        .iter()
        .any(|e| e.message.as_deref().unwrap_or("").contains("UNet call"))
    {
        assert!(
            Instant::now() < end,
            "no UNet progress; log:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    worker.signal("KILL");
    worker.wait_exit(Duration::from_secs(10));
    assert_eq!(
        world.processing_items().len(),
        1,
        "the claimed task stays in the processing list"
    );
    assert_eq!(rec.terminal_count(&task.task_id), 0);

    // The dead worker's lease and status expire on their own; then a new worker recovers.
    let end = Instant::now() + Duration::from_secs(15);
    while world.lease().is_some() || world.status().is_some() {
        assert!(Instant::now() < end, "lease/status did not expire");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut again = WorkerProc::start(&world, &ttl);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(180));
    assert_eq!(
        done.status,
        Status::Completed,
        "{done:?}\n{}",
        again.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rec.terminal_count(&task.task_id),
        1,
        "{:#?}",
        rec.of(&task.task_id)
    );
    let attempts = rec.claims(&task.task_id);
    assert_eq!(
        attempts,
        vec![
            "task claimed (attempt 1 of 2)",
            "task claimed (attempt 2 of 2)"
        ]
    );
    assert!(world.processing_items().is_empty());
    assert!(world.dead_letters().is_empty());
    again.signal("TERM");
    assert!(again.wait_exit(Duration::from_secs(30)).success());
    Ok(())
}

/// Waits for an event of `task` at position `from` or later whose message contains `text`;
/// returns its position.
fn wait_message(
    rec: &Recorder,
    task: &Task,
    text: &str,
    from: usize,
    worker: &WorkerProc,
) -> usize {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let found = rec
            .of(&task.task_id)
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, e)| e.message.as_deref().unwrap_or("").contains(text))
            .map(|(i, _)| i);
        if let Some(i) = found {
            return i;
        }
        assert!(
            Instant::now() < end,
            "no {text:?} for {} from event {from}; log:\n{}",
            task.task_id,
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn kill_9_twice_with_immediate_restarts_charges_only_the_running_task() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    // `running` keeps the model busy far longer than the test; `waiting` is prefetched
    // meanwhile and waits prepared for the model.
    let mut running = world.task(&unique("running"));
    running.steps = Some(100);
    running.cfg = Some(1.0);
    let waiting = quick_task(&world, &unique("waiting"));
    let mut worker = WorkerProc::start(&world, &[]);
    worker.wait_ready(&world, Duration::from_secs(120));
    world.submit(&running);
    world.submit(&waiting);
    let (mut from_running, mut from_waiting) = (0, 0);
    for _round in 1..=2 {
        let claimed = wait_message(&rec, &running, "task claimed", from_running, &worker);
        from_running = wait_message(&rec, &running, "UNet call", claimed, &worker) + 1;
        from_waiting =
            wait_message(&rec, &waiting, "waiting for the GPU", from_waiting, &worker) + 1;
        worker.signal("KILL");
        worker.wait_exit(Duration::from_secs(10));
        // Restarted at once, as a supervisor does: the dead process's lease is taken over.
        // (`gpu_status` still says `busy` from the dead one: watch the new one's log.)
        worker = WorkerProc::start(&world, &[]);
        let end = Instant::now() + Duration::from_secs(60);
        while !worker.log_text().contains("took over the lease") {
            assert!(Instant::now() < end, "no take-over:\n{}", worker.log_text());
            assert!(worker.child.try_wait()?.is_none(), "{}", worker.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Two crashes while it ran: the running task is given up; the bystander is not charged.
    let given_up = rec.wait_terminal(&running.task_id, Duration::from_secs(60));
    assert_eq!(
        given_up.code,
        Some(ErrorCode::AttemptsExhausted),
        "{given_up:?}"
    );
    let done = rec.wait_terminal(&waiting.task_id, Duration::from_secs(120));
    assert_eq!(
        done.status,
        Status::Completed,
        "{done:?}\n{}",
        worker.log_text()
    );
    let claims = rec.claims(&waiting.task_id);
    assert_eq!(claims, vec!["task claimed (attempt 1 of 2)"; 3]);
    assert!(world.processing_items().is_empty());
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    Ok(())
}

#[test]
fn sigterm_while_busy_requeues_without_failed_and_exits_cleanly() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &["--grace-secs", "0"]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let task = slow_task(&world, &unique("term"));
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(120));
    let t = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", worker.log_text());
    println!("stopped {:.2} s after SIGTERM", t.elapsed().as_secs_f64());
    world.assert_requeued_after_stop(&rec, &task);
    Ok(())
}

#[test]
fn a_second_process_with_the_same_gpu_id_refuses_to_start() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let mut first = WorkerProc::start(&world, &[]);
    first.wait_ready(&world, Duration::from_secs(120));
    let log = world.dir.path().join("second.log");
    let mut args = world.args(&[]);
    args.extend(tiny_model_args(64));
    let mut second = WorkerProc::spawn(&args, log, world.gpu_id);
    let status = second.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{}", second.log_text());
    let text = second.log_text();
    assert!(text.contains("already served by another worker"), "{text}");
    assert!(text.contains(&keys::worker_lease(world.gpu_id)), "{text}");
    // The first one still serves.
    assert!(first.child.try_wait()?.is_none());
    assert_eq!(world.status().as_deref(), Some("idle"));
    let rec = world.recorder();
    let task = quick_task(&world, &unique("still-serving"));
    world.submit(&task);
    assert_eq!(
        rec.wait_terminal(&task.task_id, Duration::from_secs(120))
            .status,
        Status::Completed
    );
    Ok(())
}

#[test]
fn a_thousand_malformed_messages_leave_the_worker_alive_and_its_memory_flat() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &[]);
    worker.wait_ready(&world, Duration::from_secs(120));
    // One real task first, so allocator pools and lazy state exist before measuring.
    let warm = quick_task(&world, &unique("warm"));
    world.submit(&warm);
    assert_eq!(
        rec.wait_terminal(&warm.task_id, Duration::from_secs(120))
            .status,
        Status::Completed
    );
    let rss_before = rss_kib(worker.pid());
    let mut pipe = redis::pipe();
    let mut with_id = 0;
    for i in 0..1000 {
        let payload: Vec<u8> = match i % 5 {
            0 => format!("not json {i}").into_bytes(),
            1 => b"[1,2,3]".to_vec(),
            2 => vec![0xff, 0xfe, i as u8],
            3 => {
                with_id += 1;
                let id = format!("{}-{i}", world.queue);
                world.track_task(&id);
                format!(r#"{{"task_id":"{id}","session_id":"s","steps":-4}}"#).into_bytes()
            }
            _ => "y".repeat(100_000).into_bytes(),
        };
        pipe.rpush(&world.queue, payload).ignore();
    }
    let t = Instant::now();
    let _: () = pipe.query(&mut world.con())?;
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let left: u64 = world.con().llen(&world.queue)?;
        if left == 0 && world.processing_items().is_empty() && world.dead_letters().len() == 1000 {
            break;
        }
        assert!(
            Instant::now() < end,
            "flood not drained; log:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "1000 malformed messages handled in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let failed = rec
        .all()
        .iter()
        .filter(|s| {
            s.event.status == Status::Failed && s.event.code == Some(ErrorCode::InvalidTask)
        })
        .count();
    assert_eq!(
        failed, with_id,
        "one failed event per malformed task that had an id"
    );
    let rss_after = rss_kib(worker.pid());
    println!("worker RSS: {rss_before} KiB before, {rss_after} KiB after the flood");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Still serving.
    let task = quick_task(&world, &unique("after-flood"));
    world.submit(&task);
    assert_eq!(
        rec.wait_terminal(&task.task_id, Duration::from_secs(120))
            .status,
        Status::Completed
    );
    assert!(worker.child.try_wait()?.is_none());
    Ok(())
}

#[test]
fn a_redis_restart_mid_task_does_not_lose_the_task() -> TestResult {
    let Some(mut redis_server) = PrivateRedis::start() else {
        return Ok(());
    };
    let world = World::with_redis(&redis_server.url());
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &[]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let task = slow_task(&world, &unique("redis-restart"));
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(120));
    let t = Instant::now();
    redis_server.stop();
    std::thread::sleep(Duration::from_secs(2));
    redis_server.restart();
    println!("redis was down for {:.2} s", t.elapsed().as_secs_f64());
    // The outcome is recorded once Redis is back: the result key says completed.
    let end = Instant::now() + Duration::from_secs(180);
    let done = loop {
        if let Ok(mut con) = world.client.get_connection() {
            if let Ok(Some(r)) = echomimic_protocol::client::read_result(&mut con, &task.task_id) {
                break r;
            }
        }
        assert!(
            Instant::now() < end,
            "no result; log:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done.status, Status::Completed, "{done:?}");
    // Exactly one terminal event was published. The recorder is subscribed again within about
    // 100 ms of the restart, before the reporter's next retry (its backoff is at 0.8 s or more
    // by the end of a 2 s outage), so it sees the event: zero is a failure, not a pass.
    rec.wait_terminal(&task.task_id, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rec.terminal_count(&task.task_id),
        1,
        "{:#?}",
        rec.of(&task.task_id)
    );
    assert!(world.processing_items().is_empty());
    assert!(world.queue_items().is_empty());
    assert!(worker.log_text().contains("redis reachable again"));
    // And it keeps serving.
    let next = quick_task(&world, &unique("after-restart"));
    world.submit(&next);
    wait_completed(&world, &worker, &next);
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    Ok(())
}

/// Waits for `task`'s result through `world`'s client; panics with the worker's log.
fn wait_completed(world: &World, worker: &WorkerProc, task: &Task) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(r) = world.result(&task.task_id) {
            assert_eq!(r.status, Status::Completed, "{r:?}");
            return;
        }
        assert!(
            Instant::now() < end,
            "no result for {}; log:\n{}",
            task.task_id,
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_worker_serves_redis_over_tls_as_an_acl_user_by_url_and_by_settings() -> TestResult {
    // Redis as deployed: TLS only (a private CA), the default user off, an ACL user.
    let Some(redis_server) = PrivateRedis::start_tls() else {
        return Ok(());
    };
    let world = World::with_client(&redis_server.url(), redis_server.client());
    let ca = tls_file("ca.pem").display().to_string();

    // A rediss://user:password@ URL.
    let mut worker = WorkerProc::start(&world, &["--redis-ca-file", &ca]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let task = quick_task(&world, &unique("tls-url"));
    world.submit(&task);
    wait_completed(&world, &worker, &task);
    assert!(
        worker
            .log_text()
            .contains("rediss://worker:<redacted>@localhost"),
        "the log names the server without the password:\n{}",
        worker.log_text()
    );
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());

    // The same through REDIS_HOST/PORT/USERNAME/PASSWORD/TLS and REDIS_CA_FILE.
    let mut args = world.args(&[]);
    let i = args
        .iter()
        .position(|a| a == "--redis-url")
        .expect("url flag");
    args.drain(i..i + 2);
    args.extend(tiny_model_args(64));
    let (user, password) = TLS_USER;
    let port = redis_server.port.to_string();
    let env = [
        ("REDIS_HOST", "localhost"),
        ("REDIS_PORT", port.as_str()),
        ("REDIS_DB", "0"),
        ("REDIS_USERNAME", user),
        ("REDIS_PASSWORD", password),
        ("REDIS_TLS", "1"),
        ("REDIS_CA_FILE", ca.as_str()),
    ];
    let log = world.dir.path().join(unique("tls-settings.log"));
    let mut worker = WorkerProc::spawn_with_env(&args, &env, log, world.gpu_id);
    worker.wait_ready(&world, Duration::from_secs(120));
    let task = quick_task(&world, &unique("tls-settings"));
    world.submit(&task);
    wait_completed(&world, &worker, &task);
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());

    // Without the CA the server's certificate is refused: the worker says so and serves
    // nothing (the system roots do not know the test CA).
    let mut worker = WorkerProc::start(&world, &[]);
    let end = Instant::now() + Duration::from_secs(30);
    while !worker.log_text().to_lowercase().contains("certificate") {
        assert!(
            Instant::now() < end,
            "no certificate error in the log:\n{}",
            worker.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = worker.child.kill();
    let _ = worker.child.wait();
    Ok(())
}

#[test]
fn encoder_ffmpeg_without_ffmpeg_refuses_to_start_and_auto_falls_back() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let mut args = world.args(&["--encoder", "ffmpeg"]);
    args.extend(tiny_model_args(64));
    let out = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
        .args(&args)
        .env("ECHOMIMIC_FFMPEG", "/nonexistent/ffmpeg")
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--encoder ffmpeg") && err.contains("--encoder builtin"),
        "{err}"
    );
    assert_eq!(world.lease(), None, "refused before taking the lease");

    // `auto` without ffmpeg: the built-in encoder (H.264 + Opus), with a warning.
    let rec = world.recorder();
    let mut args = world.args(&["--encoder", "auto"]);
    args.extend(tiny_model_args(64));
    let log = world.dir.path().join("auto.log");
    let mut worker = WorkerProc::spawn_with_env(
        &args,
        &[("ECHOMIMIC_FFMPEG", "/nonexistent/ffmpeg")],
        log,
        world.gpu_id,
    );
    worker.wait_ready(&world, Duration::from_secs(120));
    assert!(
        worker.log_text().contains("built-in encoder"),
        "{}",
        worker.log_text()
    );
    let task = quick_task(&world, &unique("builtin"));
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(120));
    assert_eq!(done.status, Status::Completed, "{done:?}");
    let video = world.fetch_video(done.video_file_id.as_deref().unwrap());
    assert_eq!(video.video_codec, "h264");
    assert_eq!(video.audio_codec.as_deref(), Some("opus"));
    worker.signal("TERM");
    assert!(worker.wait_exit(Duration::from_secs(30)).success());
    Ok(())
}

#[test]
fn every_bad_input_fails_once_with_the_real_model_and_the_worker_keeps_serving() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let mut worker = WorkerProc::start(&world, &[]);
    worker.wait_ready(&world, Duration::from_secs(120));
    let cases = bad_input_cases(&world);
    push_bad_inputs(&world, &cases);
    let good = quick_task(&world, &unique("good-after-bad"));
    world.submit(&good);
    let done = rec.wait_terminal(&good.task_id, Duration::from_secs(120));
    assert_eq!(
        done.status,
        Status::Completed,
        "{done:?}\n{}",
        worker.log_text()
    );
    assert_bad_inputs_failed(&world, &rec, &cases);
    assert!(worker.child.try_wait()?.is_none());
    Ok(())
}
