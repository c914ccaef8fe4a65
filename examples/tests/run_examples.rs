//! Runs the example programs as a user does, on the tiny model of `testdata/golden/public` at
//! small sizes, and checks what they print and write.
//!
//! The binaries are the ones cargo builds for the test run: `cargo test` and `cargo nextest run`
//! build every example of the package unless a single test target is named (`--test`); then
//! `cargo build -p echomimic-examples --examples` has to come first.
#![allow(clippy::print_stderr)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use echomimic_pipeline::video::{probe_mp4, TrackKind};

/// `target/<profile>/examples/<name>`, next to this test's `deps/` folder.
fn example(name: &str) -> Command {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let bin = dir.join("examples").join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    let fresh = match (bin.metadata(), source.metadata()) {
        (Ok(b), Ok(s)) => b.modified().ok() >= s.modified().ok(),
        _ => false,
    };
    assert!(
        fresh,
        "{} is missing or older than {}: run `cargo build -p echomimic-examples --examples` \
         (cargo test/nextest do it unless a single --test is named)",
        bin.display(),
        source.display()
    );
    let mut cmd = Command::new(bin);
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let t = Instant::now();
    let out = cmd.output().expect("the example starts");
    eprintln!(
        "{:?} took {:.2} s, exit {:?}\n--- stderr:\n{}",
        cmd.get_program(),
        t.elapsed().as_secs_f64(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).replace('\r', "\n")
    );
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An MP4 with a video and an audio track and at least one frame.
fn assert_video(path: &Path, size: u16) {
    let info = probe_mp4(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let video = info
        .track(TrackKind::Video)
        .unwrap_or_else(|| panic!("{}: no video track", path.display()));
    assert_eq!((video.width, video.height), (size, size));
    assert!(video.sample_count > 0, "{info:?}");
    assert!(info.track(TrackKind::Audio).is_some(), "{info:?}");
}

#[test]
fn generate_video_writes_an_mp4_on_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("talking.mp4");
    let done = run(example("generate_video")
        .args(["-W", "64", "-H", "64", "--steps", "2", "-o"])
        .arg(&out));
    let stderr = text(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(stderr.contains("loaded the normal weights"), "{stderr}");
    assert!(
        stderr.contains("denoising") && stderr.contains("decoding"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("wrote {}", out.display())),
        "{stderr}"
    );
    assert_video(&out, 64);
}

#[test]
fn generate_video_stops_on_ctrl_c_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.mp4");
    // Large enough that it cannot finish before the signal arrives.
    let mut child = example("generate_video")
        .args(["-W", "128", "-H", "128", "--steps", "50", "-o"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !text(&seen).contains("denoising") {
        assert!(Instant::now() < deadline, "no progress: {}", text(&seen));
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "the example ended early: {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let t = Instant::now();
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    stderr.read_to_end(&mut seen).unwrap();
    let status = child.wait().unwrap();
    eprintln!(
        "stopped {:.2} s after SIGINT\n{}",
        t.elapsed().as_secs_f64(),
        text(&seen)
    );
    assert_eq!(status.code(), Some(130), "{}", text(&seen));
    assert!(text(&seen).contains("cancelled"), "{}", text(&seen));
    assert!(!out.exists());
    let left: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn serve_requests_loads_once_and_serves_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(example("serve_requests")
        .args([
            "-W",
            "64",
            "-H",
            "64",
            "--steps",
            "1",
            "--requests",
            "3",
            "--out-dir",
        ])
        .arg(dir.path()));
    let stderr = text(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert_eq!(stderr.matches("weights loaded once").count(), 1, "{stderr}");
    for i in 0..3 {
        let video = dir.path().join(format!("video-{i}.mp4"));
        assert!(
            stderr.contains(&format!("request {i}: wrote {}", video.display())),
            "{stderr}"
        );
        assert!(stderr.contains(&format!("seed {}", 420 + i)), "{stderr}");
        assert_video(&video, 64);
    }
}

#[test]
fn serve_requests_reports_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let done = run(example("serve_requests")
        .args(["-W", "64", "-H", "64", "--steps", "1", "--out-dir"])
        .arg(dir.path())
        .arg("--image")
        .arg(dir.path().join("missing.png")));
    let stderr = text(&done.stderr);
    assert!(!done.status.success(), "{stderr}");
    assert!(stderr.contains("missing.png"), "{stderr}");
}

const IMAGE: &str = "550e8400-e29b-41d4-a716-446655440000";
const AUDIO: &str = "661f9511-f3ac-52e5-b827-557766551111";

fn protocol_only(extra: &[&str]) -> Command {
    let mut cmd = example("protocol_only");
    cmd.args(["--image-id", IMAGE, "--audio-id", AUDIO, "--task-id", "t-1"]);
    cmd.args(extra);
    cmd
}

#[test]
fn protocol_only_prints_a_valid_task() {
    let done = run(&mut protocol_only(&["--steps", "6", "--gpu-id", "2"]));
    assert!(done.status.success(), "{}", text(&done.stderr));
    let stdout = text(&done.stdout);
    assert!(stdout.contains("queue: task_queue_gpu_2"), "{stdout}");
    let json = stdout
        .lines()
        .find_map(|l| l.strip_prefix("task: "))
        .unwrap_or_else(|| panic!("no task line: {stdout}"));
    // What the worker will parse.
    let task = echomimic_protocol::Task::from_json(json.as_bytes()).unwrap();
    assert_eq!(
        (
            task.task_id.as_str(),
            task.ref_image_id.as_str(),
            task.steps
        ),
        ("t-1", IMAGE, Some(6))
    );
}

#[test]
fn protocol_only_rejects_an_invalid_task() {
    let done = run(&mut protocol_only(&["--steps", "500"]));
    assert_eq!(done.status.code(), Some(2));
    assert!(
        text(&done.stderr).contains("steps"),
        "{}",
        text(&done.stderr)
    );
    let done = run(example("protocol_only").args([
        "--image-id",
        "http://example.com/face.png",
        "--audio-id",
        AUDIO,
    ]));
    assert_eq!(done.status.code(), Some(2), "{}", text(&done.stderr));
}

#[test]
fn protocol_only_follows_events_to_the_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    // redis-cli --raw noise, another task, both schemas, then the outcome.
    std::fs::write(
        &events,
        [
            "message",
            "task_progress",
            r#"{"task_id":"other","session_id":"s","status":"completed","progress":100.0,"video_file_id":"x"}"#,
            r#"{"task_id":"t-1","session_id":"s","status":"processing","progress":0.0,"message":"claimed"}"#,
            r#"{"task_id":"t-1","session_id":"s","status":"progress","percentage":40,"message":"step 2/6"}"#,
            r#"{"not json"#,
            r#"{"task_id":"t-1","session_id":"s","status":"completed","progress":100.0,"video_file_id":"v-9"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let done = run(protocol_only(&["--events"]).arg(&events));
    let stdout = text(&done.stdout);
    assert!(done.status.success(), "{stdout}");
    assert!(
        stdout.contains("claimed") && stdout.contains("step 2/6"),
        "{stdout}"
    );
    assert!(stdout.contains("video file id: v-9"), "{stdout}");
    assert!(!stdout.contains("video file id: x"), "{stdout}");

    let failed = r#"{"task_id":"t-1","session_id":"s","status":"failed","error":"no face found","code":"no_face"}"#;
    let mut child = protocol_only(&["--events", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{failed}").unwrap();
    let done = child.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(1));
    assert!(
        text(&done.stdout).contains("failed (no_face): no face found"),
        "{}",
        text(&done.stdout)
    );

    std::fs::write(&events, "").unwrap();
    let done = run(protocol_only(&["--events"]).arg(&events));
    assert_eq!(done.status.code(), Some(3));
}
