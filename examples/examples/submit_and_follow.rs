//! Does what the usage guide's Python example (`docs/worker-usage-guide.zh.md` §5.2) does,
//! with the public API of
//! `echomimic-protocol` and `echomimic-tempfile`: upload a portrait and a speech file to the
//! temp-file API, push a task onto the worker's queue, print its progress, and print the
//! download URL of the finished video.
//!
//! ```text
//! cargo run -p echomimic-examples --example submit_and_follow -- \
//!     --image face.jpg --audio speech.wav --steps 6 --cfg 1.0 --seed 42
//! ```
//!
//! Settings come from flags or the guide's environment variables (`REDIS_URL` or
//! `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB`/`REDIS_PASSWORD`, `BASE_URL`, `GPU_ID`,
//! `TASK_QUEUE_NAME`, `PROGRESS_CHANNEL`), plus `TEMPFILE_TOKEN` when the temp-file API
//! requires a token. Exit status: 0 when the video is ready, 1 when the
//! task failed or anything else went wrong, 3 when no result came within `--timeout-secs`.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use clap::Parser;
use echomimic_protocol::client::{self, FollowOptions};
use echomimic_protocol::{keys, ProgressEvent, ProtocolError, Status, Task, WorkerState};
use echomimic_tempfile::{ClientConfig, TempfileClient, Token};

/// Upload a portrait and a speech file, submit an EchoMimic task, and follow it to the end.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Reference portrait (png, jpg, jpeg, gif, webp).
    #[arg(long)]
    image: PathBuf,
    /// Driving speech (mp3, wav, ogg, aac, m4a, flac).
    #[arg(long)]
    audio: PathBuf,
    /// Denoising steps (1..=100); the worker's default when left out.
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance scale (0..=20); the worker's default when left out.
    #[arg(long)]
    cfg: Option<f64>,
    /// Random seed; negative = random.
    #[arg(long, allow_hyphen_values = true)]
    seed: Option<i64>,
    /// Number of frames (1..=7200); derived from the audio when left out.
    #[arg(long)]
    frames_num: Option<u32>,
    /// Task id (default: a new UUID).
    #[arg(long)]
    task_id: Option<String>,
    /// Session id (default: a new UUID).
    #[arg(long)]
    session_id: Option<String>,
    /// Redis URL (`redis://[:password@]host:port/db`); overrides the four REDIS_* settings.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "localhost")]
    redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    redis_port: u16,
    /// Redis database index.
    #[arg(long, env = "REDIS_DB", default_value_t = 0)]
    redis_db: i64,
    /// Redis password (empty = none).
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    redis_password: Option<String>,
    /// Base URL of the temp-file API.
    #[arg(long, env = "BASE_URL", default_value = "http://localhost:3000")]
    base_url: String,
    /// Access token of the temp-file API (when its server runs with tokens).
    #[arg(long, env = "TEMPFILE_TOKEN", hide_env_values = true, value_parser = parse_token)]
    tempfile_token: Option<Token>,
    /// The worker's GPU id (selects the default queue and the status key).
    #[arg(long, env = "GPU_ID", default_value_t = 0)]
    gpu_id: u32,
    /// Task queue (default `task_queue_gpu_{gpu_id}`).
    #[arg(long, env = "TASK_QUEUE_NAME")]
    queue: Option<String>,
    /// Progress channel.
    #[arg(long, env = "PROGRESS_CHANNEL", default_value = keys::DEFAULT_PROGRESS_CHANNEL)]
    channel: String,
    /// Give up after this many seconds without a result.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Also download the finished video to this path.
    #[arg(long)]
    download: Option<PathBuf>,
}

/// The first token of a comma list (the error never shows the token).
fn parse_token(s: &str) -> Result<Token, String> {
    let first = Token::parse_list(s)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next();
    first.ok_or_else(|| "empty token".to_owned())
}

impl Args {
    fn queue(&self) -> String {
        self.queue
            .clone()
            .unwrap_or_else(|| keys::task_queue(self.gpu_id))
    }

    fn redis_client(&self) -> anyhow::Result<redis::Client> {
        let client = match &self.redis_url {
            Some(url) => redis::Client::open(url.as_str()).context("invalid REDIS_URL")?,
            None => redis::Client::open(client::connection_info(
                &self.redis_host,
                self.redis_port,
                self.redis_db,
                self.redis_password.as_deref(),
            )?)?,
        };
        Ok(client)
    }

    /// The task with placeholder file ids, validated before anything is uploaded.
    fn task(&self) -> anyhow::Result<Task> {
        let new_id = || uuid::Uuid::new_v4().to_string();
        let mut task = Task::new(
            self.task_id.clone().unwrap_or_else(new_id),
            self.session_id.clone().unwrap_or_else(new_id),
            "pending-upload",
            "pending-upload",
        );
        task.steps = self.steps;
        task.cfg = self.cfg;
        task.seed = self.seed;
        task.frames_num = self.frames_num;
        task.validate()
            .map_err(|p| anyhow::anyhow!("invalid task: {p}"))?;
        Ok(task)
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// How the run ended.
enum Outcome {
    Completed,
    Failed,
    TimedOut,
}

fn run(args: &Args) -> anyhow::Result<Outcome> {
    let mut task = args.task()?;
    for path in [&args.image, &args.audio] {
        if !path.is_file() {
            bail!("{} is not a readable file", path.display());
        }
    }
    let redis = args.redis_client()?;
    let mut con = redis
        .get_connection_with_timeout(Duration::from_secs(5))
        .context("cannot connect to Redis")?;
    match client::read_worker_state(&mut con, args.gpu_id)? {
        Some(WorkerState::Idle) => println!("worker on GPU {} is idle", args.gpu_id),
        Some(state) => println!(
            "worker on GPU {} is {state}; the task will wait in the queue",
            args.gpu_id
        ),
        None => println!(
            "no worker reports on GPU {} (no {} key); the task will wait in the queue",
            args.gpu_id,
            keys::gpu_status(args.gpu_id)
        ),
    }

    let files = TempfileClient::with_config(
        ClientConfig::new(&args.base_url).with_token(args.tempfile_token.clone()),
    )?;
    let image = files
        .upload_file(&args.image)
        .with_context(|| format!("uploading {}", args.image.display()))?;
    println!("uploaded {} as {}", args.image.display(), image.file_id);
    let audio = files
        .upload_file(&args.audio)
        .with_context(|| format!("uploading {}", args.audio.display()))?;
    println!("uploaded {} as {}", args.audio.display(), audio.file_id);
    task.ref_image_id = image.file_id;
    task.audio_id = audio.file_id;

    let queue = args.queue();
    let len = client::submit_task(&mut con, &queue, &task)?;
    println!(
        "submitted task {} to {queue} (queue length {len})",
        task.task_id
    );

    let opts = FollowOptions {
        channel: args.channel.clone(),
        timeout: Duration::from_secs(args.timeout_secs),
        ..FollowOptions::default()
    };
    let print = |e: &ProgressEvent| {
        let progress = e
            .progress
            .map_or_else(|| "   -  ".to_owned(), |p| format!("{p:5.1}%"));
        println!(
            "[{:<14}] {progress} {}",
            e.status.as_str(),
            e.message.as_deref().unwrap_or("")
        );
    };
    let last = match client::follow_task(&redis, &task.task_id, &opts, print) {
        Ok(last) => last,
        Err(ProtocolError::FollowTimeout { waited, .. }) => {
            println!(
                "no result after {:.0} s; the task may still finish later (see {})",
                waited.as_secs_f64(),
                keys::task_result(&task.task_id)
            );
            return Ok(Outcome::TimedOut);
        }
        Err(e) => return Err(e.into()),
    };
    match last.status {
        Status::Completed => {
            let video = last
                .video_file_id
                .context("completed event without video_file_id")?;
            println!("video file id: {video}");
            // With a token, a signed link (valid for an hour) works without it, e.g. in a browser.
            let url = match &args.tempfile_token {
                Some(_) => files.signed_download_url(&video, SystemTime::now() + HOUR)?,
                None => files.download_url(&video)?,
            };
            println!("download URL: {url}");
            if let Some(dest) = &args.download {
                let got = files.download_to(&video, dest, 4 << 30)?;
                println!("saved {} bytes to {}", got.bytes, dest.display());
            }
            Ok(Outcome::Completed)
        }
        _ => {
            let code = last.code.map_or_else(|| "-".to_owned(), |c| c.to_string());
            println!(
                "task failed ({code}): {}",
                last.error.as_deref().unwrap_or("no error text")
            );
            Ok(Outcome::Failed)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(Outcome::Completed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::TimedOut) => ExitCode::from(3),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "submit_and_follow",
            "--image",
            "face.jpg",
            "--audio",
            "speech.wav",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    #[test]
    fn image_and_audio_are_required() {
        let err = Args::try_parse_from(["submit_and_follow", "--image", "a.png"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn task_options_reach_the_task() {
        let args = parse(&[
            "--steps",
            "30",
            "--cfg",
            "3.0",
            "--seed",
            "-1",
            "--frames-num",
            "240",
            "--task-id",
            "t-1",
            "--session-id",
            "s-1",
        ])
        .unwrap();
        let task = args.task().unwrap();
        assert_eq!(
            (task.steps, task.cfg, task.seed, task.frames_num),
            (Some(30), Some(3.0), Some(-1), Some(240))
        );
        assert_eq!(
            (task.task_id.as_str(), task.session_id.as_str()),
            ("t-1", "s-1")
        );
        let generated = parse(&[]).unwrap().task().unwrap();
        assert!(uuid::Uuid::parse_str(&generated.task_id).is_ok());
        assert_ne!(generated.task_id, generated.session_id);
    }

    #[test]
    fn out_of_range_options_fail_before_any_upload() {
        let err = parse(&["--steps", "0"]).unwrap().task().unwrap_err();
        assert!(err.to_string().contains("`steps` is 0"), "{err}");
        let err = parse(&["--cfg", "50"]).unwrap().task().unwrap_err();
        assert!(err.to_string().contains("`cfg`"), "{err}");
        let err = parse(&["--task-id", "http://x"])
            .unwrap()
            .task()
            .unwrap_err();
        assert!(err.to_string().contains("URL"), "{err}");
        assert_eq!(
            parse(&["--steps", "many"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
    }

    #[test]
    fn missing_files_are_reported_before_connecting() {
        let args = parse(&["--redis-url", "redis://127.0.0.1:1/0"]).unwrap();
        let err = run(&args).err().unwrap();
        assert!(
            err.to_string().contains("face.jpg is not a readable file"),
            "{err}"
        );
    }

    #[test]
    fn queue_and_redis_settings() {
        let args = parse(&[
            "--gpu-id",
            "3",
            "--redis-url",
            "redis://:pw@example.invalid:6390/5",
        ])
        .unwrap();
        assert_eq!(args.queue(), "task_queue_gpu_3");
        let info = args.redis_client().unwrap().get_connection_info().clone();
        assert_eq!(info.redis_settings().db(), 5);
        assert_eq!(info.redis_settings().password(), Some("pw"));
        let args = parse(&["--queue", "my_queue", "--redis-url", "redis://h:1/0"]).unwrap();
        assert_eq!(args.queue(), "my_queue");
        let args = Args::try_parse_from([
            "x",
            "--image",
            "a",
            "--audio",
            "b",
            "--redis-host",
            "10.1.2.3",
            "--redis-port",
            "6380",
            "--redis-db",
            "2",
            "--redis-password",
            "",
        ])
        .unwrap();
        if args.redis_url.is_none() {
            let info = args.redis_client().unwrap().get_connection_info().clone();
            assert_eq!(info.redis_settings().db(), 2);
            assert_eq!(info.redis_settings().password(), None);
            assert_eq!(info.addr().to_string(), "10.1.2.3:6380");
        }
    }

    /// The whole flow against a real Redis (db 11) and an in-process temp-file server, with a
    /// stand-in worker thread that follows the protocol. Skipped when no Redis answers (fails
    /// instead when `ECHOMIMIC_REQUIRE_REDIS` is set).
    #[test]
    fn full_run_against_a_stand_in_worker() {
        use echomimic_protocol::{QueueItem, Stage};
        use redis::Commands;

        let url = std::env::var("ECHOMIMIC_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379/11".into());
        let redis = redis::Client::open(url.as_str()).unwrap();
        let Ok(mut con) = redis.get_connection_with_timeout(Duration::from_secs(2)) else {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
                "ECHOMIMIC_REQUIRE_REDIS is set but no Redis answers at {url}"
            );
            eprintln!("SKIPPED: no Redis answers at {url}");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let token = "example-test-token-0123456789";
        let mut cfg = echomimic_tempfile::ServerConfig::new(dir.path().join("store"));
        cfg.listen = "127.0.0.1:0".into();
        cfg.tokens = vec![Token::new(token).unwrap()];
        let server = echomimic_tempfile::Server::start(cfg).unwrap();
        let image = dir.path().join("face.png");
        std::fs::write(&image, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
        let audio = dir.path().join("speech.wav");
        std::fs::write(&audio, b"RIFF\x24\0\0\0WAVEfmt ").unwrap();
        let tag = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let queue = format!("emtest-queue-{tag}");
        let channel = format!("emtest-chan-{tag}");
        let task_id = format!("emtest-task-{tag}");

        let worker = {
            let (redis, queue, channel, base) = (
                redis.clone(),
                queue.clone(),
                channel.clone(),
                server.base_url(),
            );
            let video = dir.path().join("out.mp4");
            std::thread::spawn(move || {
                let mut con = redis.get_connection().unwrap();
                let popped: Option<(String, Vec<u8>)> = con.blpop(&queue, 20.0).unwrap();
                let (_, raw) = popped.expect("a task arrives");
                let task = QueueItem::parse(&raw).task().unwrap();
                let files = TempfileClient::with_config(
                    ClientConfig::new(base).with_token(Token::new(token).ok()),
                )
                .unwrap();
                let got = dir_download(&files, &task.ref_image_id, &video);
                assert!(got > 0);
                for (stage, p) in [
                    (Stage::Processing, 0.0),
                    (Stage::Inference, 50.0),
                    (Stage::Uploading, 98.0),
                ] {
                    let e =
                        ProgressEvent::stage(&task.task_id, &task.session_id, stage, p, "working");
                    let _: u64 = con.publish(&channel, e.to_json()).unwrap();
                }
                std::fs::write(&video, b"\0\0\0\x20ftypisom\0\0\x02\0").unwrap();
                let up = files.upload_file(&video).unwrap();
                let done =
                    ProgressEvent::completed(&task.task_id, &task.session_id, up.file_id, "done");
                let _: () = con
                    .set_ex(keys::task_result(&task.task_id), done.to_json(), 60)
                    .unwrap();
                let _: u64 = con.publish(&channel, done.to_json()).unwrap();
            })
        };

        let out = dir.path().join("result.mp4");
        let args = Args::try_parse_from([
            "x",
            "--image",
            image.to_str().unwrap(),
            "--audio",
            audio.to_str().unwrap(),
            "--steps",
            "6",
            "--task-id",
            &task_id,
            "--redis-url",
            &url,
            "--base-url",
            &server.base_url(),
            "--tempfile-token",
            token,
            "--queue",
            &queue,
            "--channel",
            &channel,
            "--timeout-secs",
            "30",
            "--download",
            out.to_str().unwrap(),
        ])
        .unwrap();
        let outcome = run(&args).unwrap();
        worker.join().unwrap();
        assert!(matches!(outcome, Outcome::Completed));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"\0\0\0\x20ftypisom\0\0\x02\0"
        );
        let _: () = con.del(&[keys::task_result(&task_id), queue]).unwrap();
    }

    fn dir_download(files: &TempfileClient, id: &str, scratch: &std::path::Path) -> u64 {
        files.download_to(id, scratch, 1 << 20).unwrap().bytes
    }
}
