//! One test's world: Redis names, a temp-file server with the inputs uploaded, helpers to
//! submit tasks and read the keys, and the committed inputs.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clap::Parser;
use echomimic_protocol::{keys, DeadLetter, ProgressEvent, QueueItem, Task};
use echomimic_tempfile::{ClientConfig, Server, ServerConfig, TempfileClient, Token};
use echomimic_worker::{ServeArgs, WorkerConfig};
use redis::Commands;

use super::media::{probe, Probe};
use super::recorder::Recorder;
use super::redis_server::{redis, redis_url, unique, unique_gpu};

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

    /// A world on the Redis at `url`, reached by the test through `client` (e.g. one that
    /// trusts a private CA).
    pub fn with_client(url: &str, client: redis::Client) -> World {
        World::build_with(url, client, &[])
    }

    /// A world whose temp-file server accepts only `tokens`; the world's own client (uploads,
    /// video checks) uses the first.
    pub fn with_tempfile_tokens(tokens: &[&str]) -> Option<World> {
        redis()?;
        Some(World::build(&redis_url(), tokens))
    }

    fn build(url: &str, tokens: &[&str]) -> World {
        World::build_with(url, redis::Client::open(url).expect("redis url"), tokens)
    }

    fn build_with(url: &str, client: redis::Client, tokens: &[&str]) -> World {
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
    /// The tasks put aside in this world's queue's delayed set.
    pub fn delayed_items(&self) -> Vec<Vec<u8>> {
        self.con()
            .zrange(keys::task_delayed(&self.queue), 0, -1)
            .expect("zrange")
    }

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

    /// Stops the temp-file server (for outage tests); its files stay on disk.
    pub fn stop_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }

    /// Starts the temp-file server again on the same address and storage (the end of an
    /// outage: the ids uploaded before are served again). Only for worlds without tokens.
    pub fn restart_server(&mut self) {
        self.stop_server();
        let mut cfg = ServerConfig::new(self.dir.path().join("files"));
        cfg.listen = self
            .base_url
            .strip_prefix("http://")
            .expect("http base url")
            .to_owned();
        self.server = Some(Server::start(cfg).expect("temp-file server restarts"));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let Ok(mut con) = self.client.get_connection() else {
            return;
        };
        let mut keys = vec![
            self.queue.clone(),
            keys::task_delayed(&self.queue),
            keys::processing_list(self.gpu_id),
            keys::gpu_status(self.gpu_id),
            keys::worker_lease(self.gpu_id),
            keys::worker_active(self.gpu_id),
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
