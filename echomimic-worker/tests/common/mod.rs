//! Shared helpers of the worker's integration tests: a real Redis (default
//! `redis://127.0.0.1:6379/12`, override with `ECHOMIMIC_WORKER_TEST_REDIS_URL`), a real temp-file
//! server on a loopback port, unique queue/channel/gpu-id names per test, an event recorder,
//! and ffprobe checks. When no Redis answers, tests print why and return, unless
//! `ECHOMIMIC_REQUIRE_REDIS` is set (CI), in which case they fail.
#![allow(dead_code, unreachable_pub, clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use echomimic_protocol::{keys, DeadLetter, ProgressEvent, QueueItem, Status, Task};
use echomimic_tempfile::{ClientConfig, Server, ServerConfig, TempfileClient, Token};
use echomimic_worker::{ServeArgs, WorkerConfig};
use redis::Commands;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn redis_url() -> String {
    std::env::var("ECHOMIMIC_WORKER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/12".into())
}

/// A client, or `None` (with a message) when no Redis answers.
pub fn redis() -> Option<redis::Client> {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("redis url");
    match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(_) => Some(client),
        Err(e) => {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
                "ECHOMIMIC_REQUIRE_REDIS is set but no Redis answers at {url}: {e}"
            );
            eprintln!("SKIPPED: no Redis answers at {url}: {e}");
            None
        }
    }
}

/// A name unique to this process and call.
pub fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "wt-{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A gpu id unlikely to collide with another test or a real worker.
pub fn unique_gpu() -> u32 {
    1_000_000 + rand::random::<u32>() % 3_000_000_000
}

/// The committed tiny model and inputs (always the public set: these are service tests,
/// not parity tests, so `ECHOMIMIC_GOLDEN_DIR` does not apply).
pub fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public")
}

pub fn photo() -> PathBuf {
    golden().join("inputs/astronaut.png")
}

pub fn speech() -> PathBuf {
    golden().join("inputs/speech.wav")
}

/// One test's world: Redis names, a temp-file server with the inputs uploaded.
pub struct World {
    pub redis_url: String,
    pub client: redis::Client,
    pub gpu_id: u32,
    pub queue: String,
    pub channel: String,
    pub server: Option<Server>,
    pub base_url: String,
    pub http: TempfileClient,
    pub image_id: String,
    pub audio_id: String,
    pub dir: tempfile::TempDir,
    pub extra_keys: Mutex<Vec<String>>,
}

impl World {
    pub fn new() -> Option<World> {
        redis()?;
        Some(World::with_redis(&redis_url()))
    }

    /// A world on the Redis at `url` (which must answer).
    pub fn with_redis(url: &str) -> World {
        World::build(url, &[])
    }

    /// A world whose temp-file server accepts only `tokens`; the world's own client (uploads,
    /// video checks) uses the first.
    pub fn with_tempfile_tokens(tokens: &[&str]) -> Option<World> {
        redis()?;
        Some(World::build(&redis_url(), tokens))
    }

    fn build(url: &str, tokens: &[&str]) -> World {
        let client = redis::Client::open(url).expect("redis url");
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ServerConfig::new(dir.path().join("files"));
        cfg.listen = "127.0.0.1:0".into();
        let tokens: Vec<Token> = tokens
            .iter()
            .map(|t| Token::new(t).expect("token"))
            .collect();
        cfg.tokens = tokens.clone();
        let server = Server::start(cfg).expect("temp-file server");
        let base_url = server.base_url();
        let http = TempfileClient::with_config(
            ClientConfig::new(&base_url).with_token(tokens.first().cloned()),
        )
        .expect("client");
        let image_id = http.upload_file(&photo()).expect("upload photo").file_id;
        let audio_id = http.upload_file(&speech()).expect("upload speech").file_id;
        let gpu_id = unique_gpu();
        World {
            redis_url: url.to_owned(),
            client,
            gpu_id,
            queue: unique("queue"),
            channel: unique("chan"),
            server: Some(server),
            base_url,
            http,
            image_id,
            audio_id,
            dir,
            extra_keys: Mutex::new(Vec::new()),
        }
    }

    pub fn con(&self) -> redis::Connection {
        self.client.get_connection().expect("redis connection")
    }

    /// The worker flags of this world plus `extra`.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "serve".into(),
            "--redis-url".into(),
            self.redis_url.clone(),
            "--base-url".into(),
            self.base_url.clone(),
            "--gpu-id".into(),
            self.gpu_id.to_string(),
            "--queue".into(),
            self.queue.clone(),
            "--channel".into(),
            self.channel.clone(),
            "--weights".into(),
            golden().join("pretrained_weights").display().to_string(),
            "--temp-dir".into(),
            self.dir.path().join("work").display().to_string(),
            "--device".into(),
            "cpu".into(),
            "--http-attempts".into(),
            "3".into(),
            "--http-max-backoff-secs".into(),
            "0.2".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// A worker config of this world plus `extra` flags.
    pub fn config(&self, extra: &[&str]) -> WorkerConfig {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let args = self.args(extra);
        Cli::parse_from(std::iter::once("x".to_owned()).chain(args.into_iter().skip(1)))
            .serve
            .into_config()
            .expect("config")
    }

    pub fn task(&self, id: &str) -> Task {
        Task::new(id, format!("sess-{id}"), &self.image_id, &self.audio_id)
    }

    /// `RPUSH`es a raw payload.
    pub fn push_raw(&self, payload: &[u8]) {
        let _: u64 = self.con().rpush(&self.queue, payload).expect("rpush");
    }

    /// Submits a task like a client (clears its keys, `RPUSH`).
    pub fn submit(&self, task: &Task) {
        self.track_task(&task.task_id);
        echomimic_protocol::client::submit_task(&mut self.con(), &self.queue, task)
            .expect("submit");
    }

    pub fn track_task(&self, task_id: &str) {
        let mut k = self.extra_keys.lock().unwrap();
        k.push(keys::latest_event(task_id));
        k.push(keys::task_result(task_id));
    }

    pub fn queue_items(&self) -> Vec<Vec<u8>> {
        self.con().lrange(&self.queue, 0, -1).expect("lrange")
    }

    pub fn processing_items(&self) -> Vec<Vec<u8>> {
        self.con()
            .lrange(keys::processing_list(self.gpu_id), 0, -1)
            .expect("lrange")
    }

    pub fn status(&self) -> Option<String> {
        self.con()
            .get(keys::gpu_status(self.gpu_id))
            .expect("get status")
    }

    pub fn lease(&self) -> Option<String> {
        self.con()
            .get(keys::worker_lease(self.gpu_id))
            .expect("get lease")
    }

    /// After a stop while `task` ran: no terminal event, the task back in the queue exactly as
    /// submitted (a shutdown is not an attempt), the processing list empty, and the clean exit
    /// has deleted the status key and released the lease.
    pub fn assert_requeued_after_stop(&self, rec: &Recorder, task: &Task) {
        assert_eq!(
            rec.terminal_count(&task.task_id),
            0,
            "{:#?}",
            rec.of(&task.task_id)
        );
        let items = self.queue_items();
        assert_eq!(items.len(), 1);
        let item = QueueItem::parse(&items[0]);
        assert_eq!(item.attempts(), 0, "a shutdown is not an attempt");
        assert_eq!(
            &item.task().expect("the requeued item holds the task"),
            task
        );
        assert!(self.processing_items().is_empty());
        assert_eq!(self.status(), None, "clean exit deletes the status key");
        assert_eq!(self.lease(), None, "clean exit releases the lease");
    }

    /// Dead letters that came from this world's queue.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let all: Vec<Vec<u8>> = self
            .con()
            .lrange(keys::DEAD_LETTER_LIST, 0, -1)
            .expect("lrange");
        all.iter()
            .filter_map(|raw| DeadLetter::from_json(raw).ok())
            .filter(|d| d.queue.as_deref() == Some(self.queue.as_str()))
            .collect()
    }

    pub fn result(&self, task_id: &str) -> Option<ProgressEvent> {
        echomimic_protocol::client::read_result(&mut self.con(), task_id).expect("read result")
    }

    /// Records every event on this world's channel.
    pub fn recorder(&self) -> Recorder {
        Recorder::start(&self.client, &self.channel)
    }

    /// Downloads a video and checks it with ffprobe.
    pub fn fetch_video(&self, file_id: &str) -> Probe {
        let path = self.dir.path().join(format!("{file_id}.mp4"));
        self.http
            .download_to(file_id, &path, 1 << 30)
            .expect("download video");
        probe(&path)
    }

    /// Stops the temp-file server (for outage tests).
    pub fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let Ok(mut con) = self.client.get_connection() else {
            return;
        };
        let mut keys = vec![
            self.queue.clone(),
            keys::processing_list(self.gpu_id),
            keys::gpu_status(self.gpu_id),
            keys::worker_lease(self.gpu_id),
        ];
        keys.extend(
            self.extra_keys
                .lock()
                .map(|k| k.clone())
                .unwrap_or_default(),
        );
        for k in keys {
            let _: Result<(), _> = con.del(k);
        }
        let all: Vec<Vec<u8>> = con
            .lrange(keys::DEAD_LETTER_LIST, 0, -1)
            .unwrap_or_default();
        for raw in all {
            if DeadLetter::from_json(&raw)
                .is_ok_and(|d| d.queue.as_deref() == Some(self.queue.as_str()))
            {
                let _: Result<(), _> = con.lrem(keys::DEAD_LETTER_LIST, 1, raw);
            }
        }
    }
}

/// An event with the time it arrived.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub event: ProgressEvent,
    pub raw: Vec<u8>,
}

/// Subscribes to a channel (before anything is submitted) and keeps every event.
pub struct Recorder {
    events: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Recorder {
    pub fn start(client: &redis::Client, channel: &str) -> Recorder {
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (events, stop, client, channel) = (
                events.clone(),
                stop.clone(),
                client.clone(),
                channel.to_owned(),
            );
            std::thread::spawn(move || {
                let mut ready = Some(ready_tx);
                // Reconnects when Redis goes away (the Redis restart test).
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut con) = client.get_connection() else {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    };
                    let mut ps = con.as_pubsub();
                    if ps.subscribe(&channel).is_err() {
                        continue;
                    }
                    let _ = ps.set_read_timeout(Some(Duration::from_millis(100)));
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                    while !stop.load(Ordering::SeqCst) {
                        match ps.get_message() {
                            Ok(msg) => {
                                let raw = msg.get_payload_bytes().to_vec();
                                if let Ok(event) = ProgressEvent::parse_any(&raw) {
                                    events.lock().unwrap().push(Seen {
                                        at: Instant::now(),
                                        event,
                                        raw,
                                    });
                                }
                            }
                            Err(e) if e.is_timeout() => {}
                            Err(_) => break,
                        }
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        Recorder {
            events,
            stop,
            thread: Some(thread),
        }
    }

    pub fn all(&self) -> Vec<Seen> {
        self.events.lock().unwrap().clone()
    }

    pub fn of(&self, task_id: &str) -> Vec<ProgressEvent> {
        self.all()
            .into_iter()
            .filter(|s| s.event.task_id == task_id)
            .map(|s| s.event)
            .collect()
    }

    pub fn terminal_count(&self, task_id: &str) -> usize {
        self.of(task_id).iter().filter(|e| e.is_terminal()).count()
    }

    /// Waits for the first terminal event of `task_id`.
    pub fn wait_terminal(&self, task_id: &str, timeout: Duration) -> ProgressEvent {
        let end = Instant::now() + timeout;
        loop {
            if let Some(e) = self.of(task_id).into_iter().find(|e| e.is_terminal()) {
                return e;
            }
            assert!(
                Instant::now() < end,
                "no terminal event for {task_id} within {timeout:?}; saw {:#?}",
                self.of(task_id)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for an event of `task_id` with `status`.
    pub fn wait_status(&self, task_id: &str, status: Status, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.of(task_id).iter().any(|e| e.status == status) {
            assert!(
                Instant::now() < end,
                "no {status} event for {task_id} within {timeout:?}; saw {:#?}",
                self.of(task_id)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `n` terminal events (any task) have arrived.
    pub fn wait_terminals(&self, n: usize, timeout: Duration) -> Vec<ProgressEvent> {
        let end = Instant::now() + timeout;
        loop {
            let t: Vec<_> = self
                .all()
                .into_iter()
                .filter(|s| s.event.is_terminal())
                .map(|s| s.event)
                .collect();
            if t.len() >= n {
                return t;
            }
            assert!(
                Instant::now() < end,
                "only {} of {n} terminal events within {timeout:?}",
                t.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What ffprobe says about a file.
#[derive(Debug)]
pub struct Probe {
    pub video_codec: String,
    pub pix_fmt: String,
    pub width: u32,
    pub height: u32,
    pub audio_codec: Option<String>,
    pub duration: f64,
    pub frames: Option<u64>,
}

pub fn probe(path: &Path) -> Probe {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_type,codec_name,pix_fmt,width,height,nb_read_frames:format=duration",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe json");
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .expect("a video stream");
    let audio = streams.iter().find(|s| s["codec_type"] == "audio");
    Probe {
        video_codec: video["codec_name"].as_str().unwrap_or("").into(),
        pix_fmt: video["pix_fmt"].as_str().unwrap_or("").into(),
        width: video["width"].as_u64().unwrap_or(0) as u32,
        height: video["height"].as_u64().unwrap_or(0) as u32,
        audio_codec: audio.and_then(|a| a["codec_name"].as_str().map(str::to_owned)),
        duration: v["format"]["duration"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0.0),
        frames: video["nb_read_frames"]
            .as_str()
            .and_then(|d| d.parse().ok()),
    }
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Checks the order rules of one successful task's events.
pub fn assert_happy_sequence(events: &[ProgressEvent]) {
    let rank = |s: Status| match s {
        Status::Processing => 0,
        Status::Downloading => 1,
        Status::FaceDetecting => 2,
        Status::Inference => 3,
        Status::MergingAudio => 4,
        Status::Uploading => 5,
        Status::Completed => 6,
        other => panic!("unexpected status {other}"),
    };
    assert_eq!(events.first().map(|e| e.status), Some(Status::Processing));
    assert_eq!(events.last().map(|e| e.status), Some(Status::Completed));
    let mut prev_rank = 0;
    let mut prev_p = 0.0f32;
    for e in events {
        let r = rank(e.status);
        assert!(r >= prev_rank, "status went back: {events:#?}");
        let p = e.progress.expect("progress on every event");
        assert!(
            p >= prev_p,
            "progress went back ({prev_p} -> {p}): {events:#?}"
        );
        prev_rank = r;
        prev_p = p;
    }
    for s in [
        Status::Downloading,
        Status::FaceDetecting,
        Status::Inference,
        Status::MergingAudio,
        Status::Uploading,
    ] {
        assert!(events.iter().any(|e| e.status == s), "no {s}: {events:#?}");
    }
    assert_eq!(events.iter().filter(|e| e.is_terminal()).count(), 1);
}

/// Model flags of the tiny random-weight model in the official layout, at a small size.
pub fn tiny_model_args(size: u32) -> Vec<String> {
    vec![
        "--config".into(),
        golden()
            .join("configs/prompts/animation_tiny.yaml")
            .display()
            .to_string(),
        "-W".into(),
        size.to_string(),
        "-H".into(),
        size.to_string(),
    ]
}

/// The worker binary running as a child process, its log in a file.
pub struct WorkerProc {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub gpu_id: u32,
}

impl WorkerProc {
    /// Starts `echomimic-worker` with `args` (the first being the subcommand).
    pub fn spawn(args: &[String], log: PathBuf, gpu_id: u32) -> WorkerProc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("worker starts");
        WorkerProc { child, log, gpu_id }
    }

    /// Starts a worker of `world` with the tiny model and `extra` flags.
    pub fn start(world: &World, extra: &[&str]) -> WorkerProc {
        Self::start_on(world, world.gpu_id, extra)
    }

    /// Like [`WorkerProc::start`] with another gpu id (several workers on one queue).
    pub fn start_on(world: &World, gpu_id: u32, extra: &[&str]) -> WorkerProc {
        let mut args = world.args(&[]);
        if let Some(i) = args.iter().position(|a| a == "--gpu-id") {
            args[i + 1] = gpu_id.to_string();
        }
        args.extend(tiny_model_args(64));
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = world
            .dir
            .path()
            .join(format!("worker-{gpu_id}-{}.log", unique("log")));
        WorkerProc::spawn(&args, log, gpu_id)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the worker reports `idle` (model loaded, serving).
    pub fn wait_ready(&mut self, world: &World, timeout: Duration) {
        let end = Instant::now() + timeout;
        let key = keys::gpu_status(self.gpu_id);
        loop {
            let status: Option<String> = world.con().get(&key).expect("get status");
            if status.as_deref() == Some("idle") || status.as_deref() == Some("busy") {
                return;
            }
            if let Ok(Some(code)) = self.child.try_wait() {
                panic!("worker exited early ({code}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < end,
                "worker not ready within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < end,
                "worker still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A private `redis-server` on a free port with an append-only file in its own folder, which
/// a test may stop and start again (never the shared server).
pub struct PrivateRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` when `redis-server` is not installed.
    pub fn start() -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
                "ECHOMIMIC_REQUIRE_REDIS is set but redis-server is not installed"
            );
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut r = PrivateRedis {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.launch();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("url");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < end, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (its data stays in the append-only file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and folder.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A file uploaded to the world's temp-file server.
pub fn upload(world: &World, name: &str, bytes: &[u8]) -> String {
    let path = world.dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    world.http.upload_file(&path).expect("upload").file_id
}

pub fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn wav(samples: &[i16]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
    for s in samples {
        w.write_sample(*s).unwrap();
    }
    w.finalize().unwrap();
    out.into_inner()
}

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
