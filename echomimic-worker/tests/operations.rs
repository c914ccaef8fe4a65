//! Operating a fleet: the metrics and probes (`--metrics-listen`), the admin commands
//! (`status`, `dlq`, `cancel`), JSON logs and the deploy files, against a real Redis and a real
//! temp-file server. The service runs in this process with the fake engine, the commands as
//! the real binary.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use echomimic_protocol::{keys, DeadLetter, ErrorCode, ProgressEvent, Stage, Status, Task};
use echomimic_worker::{ShutdownHandle, Worker};
use redis::Commands;

const BIN: &str = env!("CARGO_BIN_EXE_echomimic-worker");

/// `GET path` on `addr`: the status and the body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
}

fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `series` (name with its labels as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `promtool check metrics` on `text`: fails the test on any problem it reports. promtool is
/// required when `ECHOMIMIC_REQUIRE_PROMTOOL` is set (CI).
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_PROMTOOL").is_none(),
                "ECHOMIMIC_REQUIRE_PROMTOOL is set but promtool cannot run: {e}"
            );
            eprintln!("SKIPPED promtool check: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {said}\n{text}"
    );
}

/// A loopback port free now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < end, "{what} not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the worker binary with `args`: exit status, stdout, stderr.
fn run_bin(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("worker binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn metrics_count_what_happened_and_pass_promtool() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let worker = start(
        &world,
        &["--metrics-listen", "127.0.0.1:0", "--geometry", "crop"],
        fake(),
    );
    let addr = worker.metrics_addr().expect("metrics listen");
    assert_eq!(
        get(addr, "/healthz"),
        (200, r#"{"status":"ok"}"#.to_owned())
    );
    assert_eq!(get(addr, "/readyz"), (200, r#"{"status":"ok"}"#.to_owned()));

    let mut good = world.task(&unique("metrics-ok"));
    good.steps = Some(3);
    world.submit(&good);
    assert_eq!(
        rec.wait_terminal(&good.task_id, Duration::from_secs(60))
            .status,
        Status::Completed
    );
    let bad = Task::new(
        unique("metrics-bad"),
        "s",
        "00000000-0000-4000-8000-000000000000",
        &world.audio_id,
    );
    world.submit(&bad);
    let failed = rec.wait_terminal(&bad.task_id, Duration::from_secs(60));
    assert_eq!(failed.code, Some(ErrorCode::InputNotFound), "{failed:?}");
    wait_for("the worker idle", Duration::from_secs(10), || {
        worker.is_idle()
    });

    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200);
    promtool_check(&text);
    let v = |series: &str| sample(&text, series).unwrap_or_else(|| panic!("{series}:\n{text}"));
    assert_eq!(
        v(r#"echomimic_tasks_total{code="none",outcome="completed"}"#),
        1.0
    );
    assert_eq!(
        v(r#"echomimic_tasks_total{code="input_not_found",outcome="failed"}"#),
        1.0
    );
    assert_eq!(v("echomimic_dead_letters_total"), 1.0);
    assert_eq!(v("echomimic_task_retries_total"), 0.0);
    assert_eq!(v("echomimic_claims_in_flight"), 0.0);
    assert_eq!(v("echomimic_redis_up"), 1.0);
    assert_eq!(
        v(&format!(
            r#"echomimic_queue_depth{{queue="{}"}}"#,
            world.queue
        )),
        0.0
    );
    assert_eq!(
        v(&format!(
            r#"echomimic_processing_length{{list="{}"}}"#,
            keys::processing_list(world.gpu_id)
        )),
        0.0
    );
    for stage in [
        "download",
        "face",
        "wait",
        "inference",
        "decode",
        "mux",
        "upload",
    ] {
        assert_eq!(
            v(&format!(
                r#"echomimic_stage_seconds_count{{stage="{stage}"}}"#
            )),
            1.0,
            "{stage}"
        );
    }
    // 3 steps without CFG: UNet calls 2 and 3 are timed from the one before.
    assert!(v("echomimic_unet_call_seconds_count") >= 2.0, "{text}");
    assert!(v("echomimic_model_load_seconds") >= 0.0);
    assert!(
        text.lines().any(|l| l.starts_with("echomimic_build_info{")
            && l.contains(r#"variant="fake""#)
            && l.contains(&format!(r#"version="{}""#, env!("CARGO_PKG_VERSION")))
            && l.ends_with(" 1")),
        "{text}"
    );
    assert_eq!(v(r#"echomimic_up{check="ready"}"#), 1.0);

    // The server is small and strict: unknown paths, other methods, bodies, oversized heads.
    assert_eq!(get(addr, "/nope").0, 404);
    assert_eq!(
        request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    assert_eq!(
        request(
            addr,
            "GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        )
        .0,
        413
    );
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(request(addr, &huge).0, 431);
    // A client that sends nothing is cut off, and others are served meanwhile.
    let silent = TcpStream::connect(addr)?;
    assert_eq!(get(addr, "/healthz").0, 200);
    drop(silent);

    let stats = stop(worker);
    assert_eq!((stats.completed, stats.failed), (1, 1));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the port is closed once the worker stopped"
    );
    Ok(())
}

#[test]
fn readiness_follows_the_model_and_redis() -> TestResult {
    let Some(mut redis) = PrivateRedis::start() else {
        return Ok(());
    };
    let world = World::with_redis(&redis.url());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let config = world.config(&["--metrics-listen", &listen]);
    let addr: SocketAddr = listen.parse()?;
    // The model loads for 2 s: live at once, not ready until it is loaded.
    let starting = std::thread::spawn(move || {
        Worker::start(config, ShutdownHandle::new(), || {
            std::thread::sleep(Duration::from_secs(2));
            Ok(fake())
        })
        .expect("worker starts")
    });
    wait_for("the probes", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok()
    });
    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    let worker = starting.join().expect("start");
    assert_eq!(get(addr, "/readyz").0, 200);

    redis.stop();
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("redis unreachable"), "{body}");
    assert_eq!(
        get(addr, "/healthz").0,
        200,
        "Redis down is not a dead worker"
    );
    let (_, text) = get(addr, "/metrics");
    assert_eq!(sample(&text, "echomimic_redis_up"), Some(0.0), "{text}");

    redis.restart();
    wait_for("ready again", Duration::from_secs(30), || {
        get(addr, "/readyz").0 == 200
    });
    let (_, text) = get(addr, "/metrics");
    assert_eq!(sample(&text, "echomimic_redis_up"), Some(1.0), "{text}");
    // The claimer's link finds its connection gone at its next command (within a second).
    wait_for("a link reconnected", Duration::from_secs(20), || {
        let (_, text) = get(addr, "/metrics");
        sample(&text, "echomimic_redis_reconnects_total").unwrap_or(0.0) >= 1.0
    });
    let rec = world.recorder();
    assert_serves_next(&world, &rec, "after-redis");
    stop(worker);
    Ok(())
}

/// A dead letter of `task` as the worker writes it, given up `age_secs` ago.
fn dead_letter(world: &World, task: &Task, age_secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let item = echomimic_protocol::QueueItem::parse(task.to_json().as_bytes());
    DeadLetter::new(
        &item,
        ErrorCode::Unavailable,
        "the temp-file API was down",
        now - age_secs,
    )
    .with_origin(world.gpu_id, world.queue.clone())
    .to_json()
}

#[test]
fn admin_commands_show_and_repair_the_queues() -> TestResult {
    let Some(redis) = PrivateRedis::start() else {
        return Ok(());
    };
    let world = World::with_redis(&redis.url());
    let url = redis.url();
    let mut con = world.con();
    let gpu = world.gpu_id;
    // A busy worker with one task running, two waiting, and three dead letters.
    let running = world.task("t-running");
    let _: () = con.set(keys::gpu_status(gpu), "busy")?;
    let _: () = con.set_ex(keys::worker_lease(gpu), "host:1:abc", 30)?;
    let _: () = con.set(keys::worker_queue(gpu), &world.queue)?;
    let _: () = con.rpush(keys::processing_list(gpu), running.to_json())?;
    let _: () = con.hset(keys::worker_active(gpu), "claim-1", running.to_json())?;
    let event = ProgressEvent::stage("t-running", "s", Stage::Inference, 42.0, "step 3 of 7");
    let _: () = con.set(keys::latest_event("t-running"), event.to_json())?;
    for id in ["t-wait-1", "t-wait-2"] {
        let _: () = con.rpush(&world.queue, world.task(id).to_json())?;
    }
    let old = world.task("t-old");
    let new = world.task("t-new");
    let other = world.task("t-other");
    let _: () = con.set(keys::task_result("t-new"), "stale")?;
    for (task, age) in [(&old, 10 * 86_400), (&new, 60), (&other, 3600)] {
        let _: () = con.rpush(keys::DEAD_LETTER_LIST, dead_letter(&world, task, age))?;
    }

    let (code, out, err) = run_bin(&["status", "--json", "--redis-url", &url]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["dead_letters"], 3);
    let gpus = report["gpus"].as_array().expect("gpus");
    assert_eq!(gpus.len(), 1, "{out}");
    let g = &gpus[0];
    assert_eq!(g["gpu_id"], gpu);
    assert_eq!(g["status"], "busy");
    assert_eq!(g["lease_holder"], "host:1:abc");
    assert_eq!(g["queue"], world.queue.as_str());
    assert_eq!(
        (g["queue_depth"].clone(), g["processing"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(g["running"][0]["task_id"], "t-running");
    assert_eq!(g["running"][0]["status"], "inference");
    assert_eq!(g["running"][0]["progress"], 42.0);
    let (code, text, _) = run_bin(&["status", "--redis-url", &url]);
    assert_eq!(code, 0);
    assert!(text.contains(&format!("gpu {gpu}: busy")), "{text}");
    assert!(
        text.contains("running t-running: inference 42.0%"),
        "{text}"
    );
    assert!(text.contains("dead letters: 3"), "{text}");

    let (code, out, _) = run_bin(&["dlq", "--redis-url", &url, "list", "--json", "--limit", "2"]);
    assert_eq!(code, 0);
    let listed: Vec<DeadLetter> = serde_json::from_str(&out)?;
    let ids: Vec<_> = listed.iter().map(|d| d.task_id.clone().unwrap()).collect();
    assert_eq!(ids, ["t-new", "t-other"], "the newest two, oldest first");
    let (_, text, _) = run_bin(&["dlq", "--redis-url", &url, "list"]);
    assert!(text.starts_with("3 dead letter(s)"), "{text}");
    assert!(text.contains("t-old  unavailable  10 d ago"), "{text}");

    // Requeue: back on its queue as the client sent it (fresh attempts), stale result gone.
    let (code, text, _) = run_bin(&["dlq", "--redis-url", &url, "requeue", "t-new", "t-nope"]);
    assert_eq!(code, 1, "one id has no dead letter: {text}");
    assert!(
        text.contains(&format!("t-new: requeued on {}", world.queue)),
        "{text}"
    );
    assert!(text.contains("t-nope: no dead letter"), "{text}");
    let queued: Vec<String> = con.lrange(&world.queue, 0, -1)?;
    assert_eq!(
        queued.last().map(String::as_str),
        Some(new.to_json().as_str())
    );
    assert!(!con.exists::<_, bool>(keys::task_result("t-new"))?);
    assert_eq!(con.llen::<_, u64>(keys::DEAD_LETTER_LIST)?, 2);

    // Purge by age, then everything.
    let (code, text, _) = run_bin(&["dlq", "--redis-url", &url, "purge", "--older-than", "1d"]);
    assert_eq!(code, 0);
    assert!(text.contains("1 dead letter(s) removed, 1 left"), "{text}");
    let left: Vec<String> = con.lrange(keys::DEAD_LETTER_LIST, 0, -1)?;
    assert!(left[0].contains("t-other"), "{left:?}");
    let (code, text, _) = run_bin(&["dlq", "--redis-url", &url, "requeue", "--all"]);
    assert_eq!(code, 0, "{text}");
    let (_, text, _) = run_bin(&["dlq", "--redis-url", &url, "purge"]);
    assert!(text.contains("0 dead letter(s) removed, 0 left"), "{text}");

    // Redis down: a clear error and a non-zero status, no hang.
    let (code, _, err) = run_bin(&["status", "--redis-url", "redis://127.0.0.1:1/0"]);
    assert_ne!(code, 0);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    Ok(())
}

#[test]
fn cancel_stops_queued_prepared_and_running_tasks_with_one_event_each() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let url = world.redis_url.clone();
    let rec = world.recorder();
    let cancel_waiting = |id: &str, wait: &str| {
        run_bin(&[
            "cancel",
            id,
            "--redis-url",
            &url,
            "--channel",
            &world.channel,
            "--queue",
            &world.queue,
            "--wait-secs",
            wait,
            "--json",
        ])
    };
    let cancel = |id: &str| cancel_waiting(id, "60");

    // Queued (no worker yet): removed, one failed event at once.
    let queued = world.task(&unique("cancel-queued"));
    world.submit(&queued);
    let (code, out, err) = cancel(&queued.task_id);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["result"], "dequeued", "{out}");
    let ended = rec.wait_terminal(&queued.task_id, Duration::from_secs(10));
    assert_eq!(ended.code, Some(ErrorCode::Cancelled), "{ended:?}");
    assert!(world.queue_items().is_empty());
    assert_eq!(
        world.result(&queued.task_id).map(|r| r.code),
        Some(Some(ErrorCode::Cancelled))
    );

    // Running (0.3 s per UNet call, 30 calls) with another prepared behind it.
    let engine = fake().with_call_delay(Duration::from_millis(300));
    let runs = engine.clone();
    let worker = start(&world, &["--geometry", "crop"], engine);
    let mut running = world.task(&unique("cancel-running"));
    running.steps = Some(30);
    running.cfg = Some(1.0);
    world.submit(&running);
    rec.wait_status(&running.task_id, Status::Inference, Duration::from_secs(30));
    let prepared = world.task(&unique("cancel-prepared"));
    world.submit(&prepared);
    wait_for(
        "the second task prefetched",
        Duration::from_secs(30),
        || world.processing_items().len() == 2,
    );
    // Not waited for: it is answered only when the model is free.
    let (code, out, err) = cancel_waiting(&prepared.task_id, "0");
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.contains(r#""result": "requested""#), "{out}");
    let (code, out, err) = cancel(&running.task_id);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(r#""result": "cancelled""#), "{out}");
    for task in [&running, &prepared] {
        let ended = rec.wait_terminal(&task.task_id, Duration::from_secs(30));
        assert_eq!(ended.code, Some(ErrorCode::Cancelled), "{ended:?}");
        assert!(
            ended
                .error
                .as_deref()
                .unwrap_or("")
                .contains("cancelled on request"),
            "{ended:?}"
        );
    }
    assert_eq!(runs.started_runs(), 1, "the prepared task never ran");
    assert!(
        world
            .dead_letters()
            .iter()
            .all(|d| d.task_id.as_deref() != Some(running.task_id.as_str())),
        "a cancelled task is not dead-lettered"
    );
    assert!(!world
        .con()
        .exists::<_, bool>(keys::task_cancel(&running.task_id))?);

    // The worker serves on; a finished or unknown task is left alone and says so.
    assert_serves_next(&world, &rec, "after-cancel");
    let (code, out, _) = cancel(&running.task_id);
    assert_eq!(code, 1);
    assert!(out.contains(r#""result": "finished""#), "{out}");
    let (code, out, _) = cancel("no-such-task");
    assert_eq!(code, 1);
    assert!(out.contains(r#""result": "unknown""#), "{out}");
    for task in [&queued, &running, &prepared] {
        assert_eq!(
            rec.terminal_count(&task.task_id),
            1,
            "{:?}",
            rec.of(&task.task_id)
        );
    }
    let stats = stop(worker);
    assert_eq!(stats.cancelled, 2);
    Ok(())
}

#[test]
fn json_logs_are_one_object_per_line_with_the_task_id() -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let mut args = vec!["--log-format".to_owned(), "json".to_owned()];
    args.extend(world.args(&["--geometry", "crop"]));
    args.extend(tiny_model_args(64));
    let log = world.dir.path().join("worker.log");
    let mut proc = WorkerProc::spawn(&args, log, world.gpu_id);
    proc.wait_ready(&world, Duration::from_secs(120));
    let mut task = world.task(&unique("json-log"));
    task.steps = Some(2);
    world.submit(&task);
    let done = rec.wait_terminal(&task.task_id, Duration::from_secs(120));
    assert_eq!(done.status, Status::Completed, "{}", proc.log_text());
    proc.signal("TERM");
    assert!(proc.wait_exit(Duration::from_secs(60)).success());
    let text = proc.log_text();
    let mut with_task = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        let in_span = v["span"]["task_id"] == task.task_id.as_str();
        let as_field = v["task_id"] == task.task_id.as_str();
        if in_span || as_field {
            with_task += 1;
        }
    }
    assert!(with_task >= 2, "lines naming the task: {with_task}\n{text}");
    Ok(())
}

/// The variables a deploy environment file sets (`NAME=value` and `# NAME=value` lines).
fn env_names(file: &str) -> Vec<String> {
    file.lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| l.split_once('='))
        .map(|(name, _)| name.to_owned())
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect()
}

#[test]
fn the_deploy_files_name_real_settings_and_stop_after_the_grace_period() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let read = |name: &str| std::fs::read_to_string(deploy.join(name)).expect(name);
    let worker_unit = read("echomimic-worker@.service");
    let tempfile_unit = read("echomimic-tempfile.service");
    // Every variable the environment files set is one the binaries read.
    let (_, serve_help, _) = run_bin(&["serve", "--help"]);
    let (_, top_help, _) = run_bin(&["--help"]);
    for name in env_names(&read("worker.env")) {
        let documented = |help: &str| {
            help.contains(&format!("env: {name}=")) || help.contains(&format!("env: {name}]"))
        };
        let known = name == "RUST_LOG" || documented(&serve_help) || documented(&top_help);
        assert!(
            known,
            "worker.env sets {name}, which the worker does not read"
        );
    }
    let server = std::path::Path::new(BIN).with_file_name("echomimic-tempfile-server");
    if server.exists() {
        let out = Command::new(&server)
            .arg("--help")
            .output()
            .expect("server");
        let help = String::from_utf8_lossy(&out.stdout);
        for name in env_names(&read("tempfile.env")) {
            assert!(
                name == "RUST_LOG"
                    || help.contains(&format!("env: {name}="))
                    || help.contains(&format!("env: {name}]")),
                "tempfile.env sets {name}, which the server does not read"
            );
        }
    }
    // The worker caps its videos to the upload limit the server is given.
    let value = |file: &str, name: &str| -> Option<String> {
        file.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
            .map(str::to_owned)
    };
    assert_eq!(
        value(&read("worker.env"), "ECHOMIMIC_MAX_UPLOAD_BYTES"),
        value(&read("tempfile.env"), "TEMPFILE_MAX_BYTES"),
        "the worker's --max-upload-bytes must be the server's --max-bytes"
    );
    // The stop timeout covers the grace period and the threads' stop timeout, with a margin.
    let timeout: u64 = worker_unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec")
        .parse()
        .expect("seconds");
    let default_of = |flag: &str| -> u64 {
        let at = serve_help.find(flag).expect(flag);
        let rest = &serve_help[at..];
        let d = rest.find("[default: ").expect("default") + "[default: ".len();
        rest[d..]
            .split(']')
            .next()
            .unwrap()
            .parse()
            .expect("number")
    };
    let grace = default_of("--grace-secs");
    let stop_timeout = default_of("--stop-timeout-secs");
    assert!(
        timeout >= grace + stop_timeout + 10,
        "TimeoutStopSec={timeout} < grace {grace} + stop timeout {stop_timeout} + 10"
    );
    for unit in [&worker_unit, &tempfile_unit] {
        assert!(unit.contains("Restart=always"));
        assert!(unit.contains("RestartPreventExitStatus=2"));
        assert!(unit.contains("EnvironmentFile=/etc/echomimic/"));
    }
    assert!(worker_unit.contains("ExecStart=/usr/local/bin/echomimic-worker serve"));
    assert!(tempfile_unit.contains("ExecStart=/usr/local/bin/echomimic-tempfile-server"));
    // systemd's own check, where systemd is installed (its complaints about the absent
    // binaries and user of this machine aside).
    if let Ok(out) = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(deploy.join("echomimic-tempfile.service"))
        .output()
    {
        let said = String::from_utf8_lossy(&out.stderr);
        for line in said.lines() {
            let expected = line.contains("is not executable")
                || line.contains("No such file")
                || line.contains("Failed to resolve")
                || line.contains("ignoring")
                || line.contains("Failed to prepare")
                || line.contains("System has not been booted")
                || line.trim().is_empty();
            assert!(expected, "systemd-analyze verify: {said}");
        }
    }
}
