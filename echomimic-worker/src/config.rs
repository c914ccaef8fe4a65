//! Settings of the worker: command-line flags with environment fallbacks (the usage guide's
//! variable names where it has one), validated into one [`WorkerConfig`].
//!
//! Every flag is documented in `echomimic-worker serve --help`. Secrets (the Redis password, a
//! password inside `REDIS_URL`) never appear in `Debug` output or logs.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use echomimic_pipeline::device::DeviceChoice;
use echomimic_pipeline::pipeline::{
    DEFAULT_CONTEXT_FRAMES, DEFAULT_CONTEXT_OVERLAP, DEFAULT_FPS, DEFAULT_SIZE,
};
use echomimic_pipeline::PipelineError;
use echomimic_protocol::{keys, Schema};
use echomimic_tempfile::{RetryPolicy, Token};

use crate::error::WorkerError;

/// Default of `--max-item-bytes`: 1 MiB, thousands of times a real task.
pub const DEFAULT_MAX_ITEM_BYTES: usize = 1024 * 1024;

pub use echomimic_pipeline::pipeline::{ModelSource, Variant};
pub use echomimic_pipeline::video::{EncoderBackend, GeometryMode};

/// Denoising steps a served task gets when neither the task nor `--steps` names them: 25 for the
/// normal weights, 6 for the accelerated ones.
///
/// This is the one place where `serve` and `generate` differ on purpose. `generate` and the
/// library ([`Variant::default_steps`]) follow the official scripts, 30 steps, so that a local
/// run reproduces the reference. The service follows the usage guide ("usually 25"): tasks wait
/// in a queue for one GPU, and 25 DDIM steps cost a sixth less GPU time than 30 for a change that
/// is hard to see. The guidance scale (2.5 / 1.0) is the same for both
/// ([`Variant::default_cfg`]).
pub fn serve_default_steps(variant: Variant) -> u32 {
    match variant {
        Variant::Normal => 25,
        Variant::Accelerated => 6,
    }
}

/// A clap value parser for the library's option types (they parse with [`std::str::FromStr`]
/// and name the accepted values in their error).
fn parse<T: std::str::FromStr<Err = PipelineError>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: PipelineError| e.to_string())
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    echomimic_pipeline::device::parse_dtype(s).map_err(|e| e.to_string())
}

/// Model options shared by `serve` and `generate`: the one definition of each flag, its default
/// and its parsing (the values themselves are the library's types).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Prompt yaml naming the weight files (e.g. `configs/prompts/animation_acc.yaml`);
    /// relative paths inside it are resolved from the working directory, then from the
    /// yaml's folder and its parents. Takes precedence over `--weights`.
    #[arg(long, value_name = "PROMPT.yaml")]
    pub config: Option<PathBuf>,
    /// Folder in the official EchoMimic layout (Hugging Face `BadToBest/EchoMimic`)
    /// [default: pretrained_weights].
    #[arg(long, env = "PRETRAINED_WEIGHTS_DIR", value_name = "DIR")]
    pub weights: Option<PathBuf>,
    /// Width of the generated frames in pixels (a multiple of 8).
    #[arg(short = 'W', long, default_value_t = DEFAULT_SIZE)]
    pub width: u32,
    /// Height of the generated frames in pixels (a multiple of 8).
    #[arg(short = 'H', long, default_value_t = DEFAULT_SIZE)]
    pub height: u32,
    /// Frames per second of the video (the audio is cut into one window per frame).
    #[arg(long, default_value_t = DEFAULT_FPS)]
    pub fps: f64,
    /// Frames per context window of the sampler.
    #[arg(long, default_value_t = DEFAULT_CONTEXT_FRAMES)]
    pub context_frames: usize,
    /// Frames shared by neighbouring context windows.
    #[arg(long, default_value_t = DEFAULT_CONTEXT_OVERLAP)]
    pub context_overlap: usize,
    /// `normal` (CFG) or `acc` (accelerated: 6 steps, cfg 1.0) weights. Default: the
    /// accelerated ones when the prompt yaml names `denoising_unet_acc.pth` or the weights
    /// folder has `denoising_unet_acc.pth` and `motion_module_acc.pth`, else normal. With
    /// `--config` the yaml names the files; `--variant` then only sets the step/cfg defaults.
    #[arg(long, value_parser = parse::<Variant>)]
    pub variant: Option<Variant>,
    /// Compute device: `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when this build and machine can
    /// use it, else the CPU). Bare `cuda` and `auto` mean CUDA device 0 for `generate` and
    /// `cuda:GPU_ID` for `serve`.
    #[arg(long, default_value = "auto", value_parser = parse::<DeviceChoice>)]
    pub device: DeviceChoice,
    /// Compute precision: `f32`, `f16` or `bf16`. Default: f32 on the CPU; on CUDA the prompt
    /// yaml's `weight_dtype` (f16 for a weights folder, as the official scripts run).
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<DType>,
}

impl ModelArgs {
    /// The weights folder: `--weights`, else `pretrained_weights`.
    pub fn weights_dir(&self) -> PathBuf {
        self.weights
            .clone()
            .unwrap_or_else(|| PathBuf::from("pretrained_weights"))
    }

    /// Where the weights come from (`--config` wins over `--weights`).
    pub fn source(&self) -> ModelSource {
        match &self.config {
            Some(p) => ModelSource::PromptYaml(p.clone()),
            None => ModelSource::WeightsDir {
                dir: self.weights_dir(),
                variant: self.variant,
            },
        }
    }

    /// The variant whose defaults apply: `--variant`, else the one the weights are
    /// ([`ModelSource::variant`]).
    pub fn variant(&self) -> Result<Variant, WorkerError> {
        match self.variant {
            Some(v) => Ok(v),
            None => self
                .source()
                .variant()
                .map_err(|e| WorkerError::Config(format!("cannot tell the model variant: {e}"))),
        }
    }

    /// Opens the device (`--device`; bare `cuda` and `auto` mean CUDA device `default_cuda`)
    /// and logs the choice.
    pub fn open_device(&self, default_cuda: usize) -> Result<Device, WorkerError> {
        let (device, note) =
            echomimic_pipeline::device::select_device_for(self.device, default_cuda)
                .map_err(|e| WorkerError::Config(format!("--device {}: {e}", self.device)))?;
        tracing::info!("{note}");
        Ok(device)
    }

    /// Checks sizes and rates.
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: String| Err(WorkerError::Config(m));
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if v == 0 || !v.is_multiple_of(8) || v > 4096 {
                return bad(format!("--{name} {v}: must be a multiple of 8 in 8..=4096"));
            }
        }
        if !(self.fps.is_finite() && self.fps > 0.0 && self.fps <= 120.0) {
            return bad(format!("--fps {}: must be in (0, 120]", self.fps));
        }
        if self.context_frames == 0 {
            return bad("--context-frames must be at least 1".into());
        }
        if self.context_overlap >= self.context_frames {
            return bad(format!(
                "--context-overlap {} must be smaller than --context-frames {}",
                self.context_overlap, self.context_frames
            ));
        }
        match self.source() {
            ModelSource::PromptYaml(p) if !p.is_file() => {
                bad(format!("--config {}: no such file", p.display()))
            }
            ModelSource::WeightsDir { dir: d, .. } if !d.is_dir() => bad(format!(
                "weights folder {} does not exist; download the official weights with \
                 `huggingface-cli download BadToBest/EchoMimic --local-dir pretrained_weights` \
                 or pass --weights DIR / --config PROMPT.yaml",
                d.display()
            )),
            _ => Ok(()),
        }
    }
}

/// Progress event schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, Default)]
pub enum EventSchema {
    /// The events of the usage guide (`docs/worker-usage-guide.zh.md` §3.2): `status`,
    /// `progress`, `failed` + `code`.
    #[default]
    Default,
    /// The EchoMe webapp's events (`status: "progress"` + integer `percentage`, `error`), plus
    /// `SREM all_task_ids <task_id>` after every outcome.
    Legacy,
}

impl From<EventSchema> for Schema {
    fn from(s: EventSchema) -> Schema {
        match s {
            EventSchema::Default => Schema::Default,
            EventSchema::Legacy => Schema::Legacy,
        }
    }
}

/// Redis connection flags.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL, `redis://[user:password@]host:port/db` or `rediss://…` (TLS); overrides the
    /// REDIS_* settings below (but for --redis-ca-file).
    #[arg(long, env = "REDIS_URL", hide_env_values = true, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis host.
    #[arg(long, env = "REDIS_HOST", default_value = "localhost")]
    pub redis_host: String,
    /// Redis port.
    #[arg(long, env = "REDIS_PORT", default_value_t = 6379)]
    pub redis_port: u16,
    /// Redis database index.
    #[arg(long, env = "REDIS_DB", default_value_t = 0)]
    pub redis_db: i64,
    /// Redis password (empty = none). Never logged.
    #[arg(long, env = "REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Redis ACL user (Redis 6+; empty = the default user), with --redis-password.
    #[arg(long, env = "REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Connect to Redis with TLS (like a `rediss://` URL). In the environment: 1/true/yes/on.
    #[arg(long, env = "REDIS_TLS", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub redis_tls: bool,
    /// PEM file of the CA that signed the Redis server's certificate, instead of the system's
    /// roots (a private CA); needs TLS.
    #[arg(long, env = "REDIS_CA_FILE", value_name = "PATH")]
    pub redis_ca_file: Option<PathBuf>,
}

impl fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisArgs")
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_host", &self.redis_host)
            .field("redis_port", &self.redis_port)
            .field("redis_db", &self.redis_db)
            .field(
                "redis_password",
                &self.redis_password.as_ref().map(|_| "<redacted>"),
            )
            .field("redis_username", &self.redis_username)
            .field("redis_tls", &self.redis_tls)
            .field("redis_ca_file", &self.redis_ca_file)
            .finish()
    }
}

/// `redis://user:secret@host/0` → `redis://user:<redacted>@host/0`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split(':').next().unwrap_or("");
    format!(
        "{}{}:<redacted>@{}",
        &url[..scheme_end + 3],
        user,
        &rest[at + 1..]
    )
}

impl RedisArgs {
    /// A client for these settings (no connection is made yet).
    pub fn client(&self) -> Result<redis::Client, WorkerError> {
        use redis::IntoConnectionInfo;
        let info = match &self.redis_url {
            Some(url) => url
                .as_str()
                .into_connection_info()
                .map_err(|e| WorkerError::Config(format!("REDIS_URL {}: {e}", redact_url(url))))?,
            None => echomimic_protocol::client::RedisSettings {
                host: &self.redis_host,
                port: self.redis_port,
                db: self.redis_db,
                username: self.redis_username.as_deref(),
                password: self.redis_password.as_deref(),
                tls: self.redis_tls,
            }
            .connection_info()
            .map_err(|e| WorkerError::Config(format!("redis settings: {e}")))?,
        };
        let Some(ca) = &self.redis_ca_file else {
            return redis::Client::open(info)
                .map_err(|e| WorkerError::Config(format!("redis settings: {e}")));
        };
        if !matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            return Err(WorkerError::Config(format!(
                "--redis-ca-file {}: needs TLS (a rediss:// URL or --redis-tls)",
                ca.display()
            )));
        }
        let pem = std::fs::read(ca)
            .map_err(|e| WorkerError::Config(format!("--redis-ca-file {}: {e}", ca.display())))?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        redis::Client::build_with_tls(info, certs)
            .map_err(|e| WorkerError::Config(format!("--redis-ca-file {}: {e}", ca.display())))
    }

    /// `host:port/db` (or the redacted URL), for logs.
    pub fn describe(&self) -> String {
        match &self.redis_url {
            Some(url) => redact_url(url),
            None => format!(
                "{}://{}{}:{}/{}",
                if self.redis_tls { "rediss" } else { "redis" },
                self.redis_username
                    .as_deref()
                    .filter(|u| !u.is_empty())
                    .map(|u| format!("{u}@"))
                    .unwrap_or_default(),
                self.redis_host,
                self.redis_port,
                self.redis_db
            ),
        }
    }
}

/// Flags of `echomimic-worker serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub redis: RedisArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// Base URL of the temp-file API (inputs are downloaded from it, the video uploaded to it).
    #[arg(long, env = "BASE_URL", default_value = "http://localhost:3000")]
    pub base_url: String,
    /// Access token of the temp-file API, sent as `Authorization: Bearer` (needed when its
    /// server runs with tokens; of a comma list the first is used). A refused token fails the
    /// task with `tempfile_unauthorized`.
    #[arg(
        long,
        env = "TEMPFILE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        value_parser = parse_token
    )]
    pub tempfile_token: Option<Token>,
    /// GPU index: the CUDA device used and the `{gpu_id}` in `gpu_status:{gpu_id}`,
    /// `task_processing:{gpu_id}`, `worker_lease:{gpu_id}` and the default queue name.
    #[arg(long, env = "GPU_ID", default_value_t = 0)]
    pub gpu_id: u32,
    /// Task queue to consume (default `task_queue_gpu_{gpu_id}`). Several workers may share one.
    #[arg(long = "queue", env = "TASK_QUEUE_NAME", value_name = "NAME")]
    pub queue: Option<String>,
    /// Pub/Sub channel of progress events.
    #[arg(long = "channel", env = "PROGRESS_CHANNEL", default_value = keys::DEFAULT_PROGRESS_CHANNEL)]
    pub channel: String,
    /// Default denoising steps for tasks without `steps` (default: 25 normal, 6 acc; see
    /// [`serve_default_steps`] for why not 30 as in `generate`).
    #[arg(long, env = "ECHOMIMIC_STEPS")]
    pub steps: Option<u32>,
    /// Default guidance scale for tasks without `cfg` (default: 2.5 normal, 1.0 acc).
    #[arg(long, env = "ECHOMIMIC_CFG")]
    pub cfg: Option<f64>,
    /// Default seed for tasks without `seed` (the reference scripts use 420); negative = random.
    #[arg(
        long,
        env = "ECHOMIMIC_SEED",
        default_value_t = 420,
        allow_hyphen_values = true
    )]
    pub seed: i64,
    /// Attempts per task in total. An attempt ends early when the worker crashes or the model
    /// fails; such a task is requeued (with the count kept in the queue item) until this many
    /// attempts were started, then dead-lettered. 2 = one retry: GPU time is precious and a task
    /// that crashed a worker twice is likely to do it again.
    #[arg(long, env = "ECHOMIMIC_MAX_ATTEMPTS", default_value_t = 2)]
    pub max_attempts: u32,
    /// Progress event schema: `default` (the guide's) or `legacy` (the EchoMe webapp's; also
    /// removes the task id from the `all_task_ids` set after every outcome).
    #[arg(long, env = "ECHOMIMIC_EVENT_SCHEMA", value_enum, default_value_t)]
    pub schema: EventSchema,
    /// Output geometry: `paste-back` (the face animated inside the original photo, as the EchoMe
    /// worker delivered it) or `crop` (the W×H face crop).
    #[arg(long, env = "ECHOMIMIC_OUTPUT_GEOMETRY", default_value_t, value_parser = parse::<GeometryMode>)]
    pub geometry: GeometryMode,
    /// Video encoder: `auto` (ffmpeg if installed, else built-in), `ffmpeg` or `builtin`.
    #[arg(long, env = "ECHOMIMIC_ENCODER", default_value_t, value_parser = parse::<EncoderBackend>)]
    pub encoder: EncoderBackend,
    /// Seconds `task_progress:{task_id}` (the latest event) is kept.
    #[arg(long, default_value_t = keys::EVENT_TTL_SECS)]
    pub event_ttl_secs: u64,
    /// Seconds `task_result:{task_id}` (the terminal event) is kept.
    #[arg(long, default_value_t = keys::RESULT_TTL_SECS)]
    pub result_ttl_secs: u64,
    /// Seconds `gpu_status:{gpu_id}` lives without a heartbeat (refreshed every third of it).
    #[arg(long, default_value_t = keys::GPU_STATUS_TTL_SECS)]
    pub status_ttl_secs: u64,
    /// Seconds `worker_lease:{gpu_id}` lives without a heartbeat; a crashed worker's gpu id can
    /// be taken over after this long.
    #[arg(long, default_value_t = keys::LEASE_TTL_SECS)]
    pub lease_ttl_secs: u64,
    /// On SIGTERM/SIGINT, seconds the running task may take to finish before it is stopped
    /// between two UNet calls and requeued (a second signal stops it at once).
    #[arg(long, env = "ECHOMIMIC_GRACE_SECS", default_value_t = 25)]
    pub grace_secs: u64,
    /// Folder for per-task temporary files (each task gets its own subfolder, always removed).
    /// Default: the system temp folder.
    #[arg(long, env = "TEMP_DIR")]
    pub temp_dir: Option<PathBuf>,
    /// Largest accepted input file in bytes.
    #[arg(long, default_value_t = 100 * 1024 * 1024)]
    pub max_download_bytes: u64,
    /// Largest accepted queue item in bytes. A larger item is dead-lettered (`invalid_task`)
    /// without being parsed; a task is a few hundred bytes of JSON.
    #[arg(long, env = "ECHOMIMIC_MAX_ITEM_BYTES", default_value_t = DEFAULT_MAX_ITEM_BYTES)]
    pub max_item_bytes: usize,
    /// Longest accepted speech in seconds (longer audio fails with `bad_input`, never silently
    /// truncated).
    #[arg(long, env = "ECHOMIMIC_MAX_AUDIO_SECS", default_value_t = 120.0)]
    pub max_audio_secs: f64,
    /// Attempts of each temp-file HTTP request (transient errors: connection, timeout, 5xx),
    /// with capped exponential backoff between them.
    #[arg(long, default_value_t = 5)]
    pub http_attempts: u32,
    /// Cap of the backoff between temp-file HTTP attempts, in seconds.
    #[arg(long, default_value_t = 8.0)]
    pub http_max_backoff_secs: f64,
    /// Connect timeout of temp-file HTTP requests, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub http_connect_timeout_secs: f64,
    /// Claim and prepare (download, face detection, audio decoding) the next task while the
    /// current one runs on the GPU. `--prefetch false` claims only when idle.
    #[arg(long, env = "ECHOMIMIC_PREFETCH", default_value_t = true, action = clap::ArgAction::Set)]
    pub prefetch: bool,
    /// Seconds between two sweeps for orphaned claims: items in this worker's processing list
    /// that it never received (a claim reply lost), and the processing lists of dead workers
    /// (lease expired) that served the same queue. 0 turns the sweep off.
    #[arg(long, env = "ECHOMIMIC_SWEEP_SECS", default_value_t = 30)]
    pub sweep_secs: u64,
    /// Seconds the threads get to end after the running task was cancelled (grace period
    /// over, a second signal, a fatal error). Past it the worker requeues what they still
    /// hold (a download from a peer that trickles bytes, an upload, a stuck model call) and
    /// stops without them.
    #[arg(long, env = "ECHOMIMIC_STOP_TIMEOUT_SECS", default_value_t = 10)]
    pub stop_timeout_secs: u64,
    /// Seconds the model may go without progress (one UNet call, one decoded frame) before
    /// the task is requeued (once; failed if it hangs again) and the worker exits with
    /// status 5 for its supervisor to restart it. 0 turns the watchdog off. Size it above
    /// the slowest UNet call of the largest request (CPU runs at full size: minutes).
    #[arg(long, env = "ECHOMIMIC_WATCHDOG_SECS", default_value_t = 600)]
    pub watchdog_secs: u64,
    /// Longest time one temp-file transfer may take, retries and pauses included, in seconds.
    #[arg(long, env = "ECHOMIMIC_HTTP_DEADLINE_SECS", default_value_t = 600.0)]
    pub http_deadline_secs: f64,
    /// Seconds an outage of the temp-file API is ridden out: a download or upload that still
    /// fails for a transient reason after its --http-attempts is tried again (pausing
    /// --http-max-backoff-secs) until this long after its first failure (a finished video
    /// waits on disk, no second GPU run). Past it a download puts the task aside for
    /// --outage-delay-secs (see --outage-total-secs) and an upload requeues it, its video
    /// kept on local disk for the next attempt on this machine (no second GPU run there
    /// either). 0 = --http-attempts only. --http-deadline-secs still bounds each transfer.
    #[arg(long, env = "ECHOMIMIC_OUTAGE_SECS", default_value_t = 300)]
    pub outage_secs: u64,
    /// Seconds a task whose download met an outage longer than --outage-secs waits in the
    /// queue's delayed set (`task_delayed:{queue}`, attempts not counted) before it is tried
    /// again; the worker serves other tasks meanwhile.
    #[arg(long, env = "ECHOMIMIC_OUTAGE_DELAY_SECS", default_value_t = 60)]
    pub outage_delay_secs: u64,
    /// Seconds a task may go on meeting a temp-file outage, counted from the first time it
    /// was put aside, before it fails (`unavailable`). With the defaults a task fails after
    /// about 5 + 30 minutes of outage. 0 = never put aside: it fails after --outage-secs.
    #[arg(long, env = "ECHOMIMIC_OUTAGE_TOTAL_SECS", default_value_t = 1800)]
    pub outage_total_secs: u64,
    /// Largest paste-back output frame in pixels (width × height of the photo; default
    /// 4096 × 4096). A larger photo fails before the GPU run (`bad_input`, saying to send a
    /// smaller photo) instead of making a video that the encoder or the upload may refuse
    /// after the whole run. `--geometry crop` output is not bounded by it.
    #[arg(long, env = "ECHOMIMIC_MAX_OUTPUT_PIXELS", default_value_t = DEFAULT_MAX_OUTPUT_PIXELS)]
    pub max_output_pixels: u64,
    /// Largest MP4 the temp-file API accepts, in bytes (its `--max-bytes`; the default is the
    /// bundled server's). The encoder's bit rate is capped so that the video always fits, and
    /// a request whose video could not fit at a watchable bit rate (very long audio into a
    /// very large paste-back frame) fails before the GPU run (`bad_input`). 0 = no limit.
    #[arg(long, env = "ECHOMIMIC_MAX_UPLOAD_BYTES", default_value_t = echomimic_tempfile::server::DEFAULT_MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,
    /// Serve `GET /metrics` (Prometheus text format), `GET /healthz` (liveness: every thread
    /// alive) and `GET /readyz` (model loaded, Redis reachable, lease held) on this address,
    /// e.g. `0.0.0.0:9400` or `127.0.0.1:0`. Off when unset.
    #[arg(long, env = "METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// Default of `--max-output-pixels`: 4096 × 4096.
pub const DEFAULT_MAX_OUTPUT_PIXELS: u64 = 4096 * 4096;

/// The validated worker configuration (built with [`ServeArgs::into_config`]).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Redis settings (the client is built from them).
    pub redis: RedisArgs,
    /// Model options.
    pub model: ModelArgs,
    /// Temp-file API base URL.
    pub base_url: String,
    /// Temp-file API access token (`Debug` redacts it).
    pub tempfile_token: Option<Token>,
    /// GPU id.
    pub gpu_id: u32,
    /// Queue consumed.
    pub queue: String,
    /// Progress channel.
    pub channel: String,
    /// Variant served.
    pub variant: Variant,
    /// Task defaults.
    pub defaults: TaskDefaults,
    /// Total attempts per task (≥ 1).
    pub max_attempts: u32,
    /// Event schema.
    pub schema: Schema,
    /// Output geometry.
    pub geometry: GeometryMode,
    /// Encoder choice.
    pub encoder: EncoderBackend,
    /// TTL of `task_progress:{id}`.
    pub event_ttl: Duration,
    /// TTL of `task_result:{id}`.
    pub result_ttl: Duration,
    /// TTL of `gpu_status:{gpu}`.
    pub status_ttl: Duration,
    /// TTL of `worker_lease:{gpu}`.
    pub lease_ttl: Duration,
    /// Grace period after the first stop signal.
    pub grace: Duration,
    /// Parent of the per-task temp folders.
    pub temp_dir: PathBuf,
    /// Download size cap.
    pub max_download_bytes: u64,
    /// Queue items longer than this are dead-lettered unparsed.
    pub max_item_bytes: usize,
    /// Longest accepted audio.
    pub max_audio_secs: f64,
    /// Retry policy of temp-file HTTP requests.
    pub http_retry: RetryPolicy,
    /// How long a task whose download met an outage waits in the delayed set.
    pub outage_delay: Duration,
    /// How long a task may meet outages, from its first deferral, before it fails.
    pub outage_total: Duration,
    /// Largest MP4 the temp-file API accepts (`None`: no limit).
    pub max_upload_bytes: Option<u64>,
    /// Connect timeout of temp-file HTTP requests.
    pub http_connect_timeout: Duration,
    /// Whether the next task is prepared during inference.
    pub prefetch: bool,
    /// Interval of the orphan sweep (`None`: off).
    pub sweep_interval: Option<Duration>,
    /// How long threads get to end after the running task was cancelled.
    pub stop_timeout: Duration,
    /// Longest time without model progress (`None`: no watchdog).
    pub watchdog: Option<Duration>,
    /// Overall deadline of one temp-file transfer.
    pub http_deadline: Duration,
    /// Largest paste-back output frame, in pixels.
    pub max_output_pixels: u64,
    /// Address of the metrics and health endpoints (`None`: off).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `BLMOVE` timeout: how long one claim attempt blocks (and so how fast a stop request is
    /// noticed while idle).
    pub claim_timeout: Duration,
}

/// What a task gets when it leaves an option out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskDefaults {
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale.
    pub cfg: f64,
    /// Seed; negative = random.
    pub seed: i64,
    /// Frames per second.
    pub fps: f64,
}

/// `--tempfile-token`: the first token of a comma list (the error never shows the token).
fn parse_token(s: &str) -> Result<Token, String> {
    match Token::parse_list(s) {
        Ok(tokens) => tokens
            .into_iter()
            .next()
            .ok_or_else(|| "empty token".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--metrics-listen`: `host:port` (a name is resolved once, at start).
fn parse_listen(addr: &str) -> Result<std::net::SocketAddr, WorkerError> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            WorkerError::Config(format!(
                "--metrics-listen {addr}: not an address to listen on (expected host:port, \
                 e.g. 0.0.0.0:9400)"
            ))
        })
}

fn secs(what: &str, v: u64, min: u64) -> Result<Duration, WorkerError> {
    if v < min {
        return Err(WorkerError::Config(format!(
            "--{what} {v}: must be at least {min}"
        )));
    }
    Ok(Duration::from_secs(v))
}

fn fsecs(what: &str, v: f64) -> Result<Duration, WorkerError> {
    if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
        return Err(WorkerError::Config(format!(
            "--{what} {v}: must be a positive number of seconds, at most 3600"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

impl ServeArgs {
    /// Validates the flags into a [`WorkerConfig`]; `Err(Config)` names the flag at fault.
    pub fn into_config(self) -> Result<WorkerConfig, WorkerError> {
        self.model.validate()?;
        let variant = self.model.variant()?;
        let steps = self.steps.unwrap_or_else(|| serve_default_steps(variant));
        if !echomimic_protocol::task::STEPS_RANGE.contains(&steps) {
            return Err(WorkerError::Config(format!(
                "--steps {steps}: must be in 1..=100"
            )));
        }
        let cfg = self.cfg.unwrap_or_else(|| variant.default_cfg());
        if !(cfg.is_finite() && echomimic_protocol::task::CFG_RANGE.contains(&cfg)) {
            return Err(WorkerError::Config(format!(
                "--cfg {cfg}: must be in 0..=20"
            )));
        }
        if self.max_attempts == 0 {
            return Err(WorkerError::Config(
                "--max-attempts must be at least 1".into(),
            ));
        }
        if self.http_attempts == 0 {
            return Err(WorkerError::Config(
                "--http-attempts must be at least 1".into(),
            ));
        }
        if !(self.max_audio_secs.is_finite() && self.max_audio_secs > 0.0) {
            return Err(WorkerError::Config(format!(
                "--max-audio-secs {}: must be positive",
                self.max_audio_secs
            )));
        }
        if self.max_item_bytes < 256 {
            return Err(WorkerError::Config(
                "--max-item-bytes must be at least 256".into(),
            ));
        }
        if self.max_download_bytes == 0 {
            return Err(WorkerError::Config(
                "--max-download-bytes must be positive".into(),
            ));
        }
        let queue = self.queue.unwrap_or_else(|| keys::task_queue(self.gpu_id));
        if queue.is_empty() || self.channel.is_empty() {
            return Err(WorkerError::Config(
                "queue and channel names must not be empty".into(),
            ));
        }
        let max_backoff = fsecs("http-max-backoff-secs", self.http_max_backoff_secs)?;
        let metrics_listen = match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(parse_listen(addr)?),
        };
        Ok(WorkerConfig {
            redis: self.redis,
            base_url: self.base_url,
            tempfile_token: self.tempfile_token,
            gpu_id: self.gpu_id,
            queue,
            channel: self.channel,
            variant,
            defaults: TaskDefaults {
                steps,
                cfg,
                seed: self.seed,
                fps: self.model.fps,
            },
            model: self.model,
            max_attempts: self.max_attempts,
            schema: self.schema.into(),
            geometry: self.geometry,
            encoder: self.encoder,
            event_ttl: secs("event-ttl-secs", self.event_ttl_secs, 1)?,
            result_ttl: secs("result-ttl-secs", self.result_ttl_secs, 1)?,
            status_ttl: secs("status-ttl-secs", self.status_ttl_secs, 3)?,
            lease_ttl: secs("lease-ttl-secs", self.lease_ttl_secs, 3)?,
            grace: Duration::from_secs(self.grace_secs),
            temp_dir: self.temp_dir.unwrap_or_else(std::env::temp_dir),
            max_download_bytes: self.max_download_bytes,
            max_item_bytes: self.max_item_bytes,
            max_audio_secs: self.max_audio_secs,
            http_retry: RetryPolicy {
                max_attempts: self.http_attempts,
                initial_backoff: Duration::from_millis(500).min(max_backoff),
                max_backoff,
                outage: Duration::from_secs(self.outage_secs),
            },
            outage_delay: Duration::from_secs(self.outage_delay_secs),
            outage_total: Duration::from_secs(self.outage_total_secs),
            max_upload_bytes: (self.max_upload_bytes > 0).then_some(self.max_upload_bytes),
            http_connect_timeout: fsecs(
                "http-connect-timeout-secs",
                self.http_connect_timeout_secs,
            )?,
            prefetch: self.prefetch,
            sweep_interval: (self.sweep_secs > 0).then(|| Duration::from_secs(self.sweep_secs)),
            stop_timeout: Duration::from_secs(self.stop_timeout_secs),
            watchdog: (self.watchdog_secs > 0).then(|| Duration::from_secs(self.watchdog_secs)),
            http_deadline: fsecs("http-deadline-secs", self.http_deadline_secs)?,
            max_output_pixels: self.max_output_pixels,
            metrics_listen,
            claim_timeout: Duration::from_secs(1),
        })
    }
}

impl WorkerConfig {
    /// How often the heartbeat refreshes the status key and the lease: a third of the shorter TTL.
    pub fn heartbeat_interval(&self) -> Duration {
        self.status_ttl.min(self.lease_ttl) / 3
    }

    /// The per-task temp folder parent, created if missing.
    pub fn ensure_temp_dir(&self) -> Result<&Path, WorkerError> {
        std::fs::create_dir_all(&self.temp_dir).map_err(|source| WorkerError::Io {
            op: "create temp folder",
            path: self.temp_dir.clone(),
            source,
        })?;
        Ok(&self.temp_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn weights_dir() -> String {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/golden/public/pretrained_weights"
        )
        .into()
    }

    #[test]
    fn password_never_shows_in_debug() {
        let cli = Cli::parse_from([
            "x",
            "--redis-password",
            "hunter2",
            "--redis-url",
            "redis://:s3cret@host:6380/2",
            "--weights",
            &weights_dir(),
        ]);
        let text = format!("{:?}", cli.serve);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("<redacted>"));
        let cfg = cli.serve.into_config().unwrap();
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2") && !text.contains("s3cret"));
        assert_eq!(cfg.redis.describe(), "redis://:<redacted>@host:6380/2");
    }

    #[test]
    fn redact_url_keeps_user_and_host() {
        assert_eq!(
            redact_url("redis://alice:pw@h:1/0"),
            "redis://alice:<redacted>@h:1/0"
        );
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn defaults_follow_the_guide_and_the_variant() {
        let cli = Cli::parse_from(["x", "--weights", &weights_dir(), "--gpu-id", "3"]);
        let cfg = cli.serve.into_config().unwrap();
        assert_eq!(cfg.queue, "task_queue_gpu_3");
        assert_eq!(cfg.channel, "task_progress");
        assert_eq!(cfg.variant, Variant::Normal);
        assert_eq!(cfg.defaults.steps, 25);
        assert_eq!(cfg.defaults.cfg, 2.5);
        assert_eq!(cfg.defaults.seed, 420);
        assert_eq!((cfg.model.width, cfg.model.height), (512, 512));
        assert_eq!(cfg.defaults.fps, 24.0);
        assert_eq!(cfg.max_attempts, 2);
        assert_eq!(cfg.geometry, GeometryMode::PasteBack);
        assert_eq!(cfg.heartbeat_interval(), Duration::from_secs(10));

        let cli = Cli::parse_from(["x", "--weights", &weights_dir(), "--variant", "acc"]);
        let cfg = cli.serve.into_config().unwrap();
        assert_eq!((cfg.defaults.steps, cfg.defaults.cfg), (6, 1.0));
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (flag, value, needle) in [
            ("--width", "100", "--width"),
            ("--context-overlap", "12", "--context-overlap"),
            ("--max-attempts", "0", "--max-attempts"),
            ("--steps", "0", "--steps"),
            ("--cfg", "30", "--cfg"),
            ("--status-ttl-secs", "1", "--status-ttl-secs"),
            ("--metrics-listen", "nowhere", "--metrics-listen"),
        ] {
            let cli = Cli::parse_from(["x", "--weights", &weights_dir(), flag, value]);
            let err = cli.serve.into_config().unwrap_err().to_string();
            assert!(err.contains(needle), "{flag}: {err}");
        }
        let cli = Cli::parse_from(["x", "--weights", "/nonexistent/weights"]);
        let err = cli.serve.into_config().unwrap_err().to_string();
        assert!(
            err.contains("huggingface-cli download BadToBest/EchoMimic"),
            "{err}"
        );
    }

    #[test]
    fn variant_detection() {
        let dir = tempfile::tempdir().unwrap();
        let args = |extra: &[&str]| {
            let mut argv = vec!["x", "--weights", dir.path().to_str().unwrap()];
            argv.extend_from_slice(extra);
            Cli::parse_from(argv).serve.model
        };
        assert_eq!(args(&[]).variant().unwrap(), Variant::Normal);
        std::fs::write(dir.path().join("denoising_unet.pth"), b"x").unwrap();
        std::fs::write(dir.path().join("denoising_unet_acc.pth"), b"x").unwrap();
        assert_eq!(args(&[]).variant().unwrap(), Variant::Normal);
        std::fs::write(dir.path().join("motion_module_acc.pth"), b"x").unwrap();
        assert_eq!(args(&[]).variant().unwrap(), Variant::Accelerated);
        assert_eq!(
            args(&["--variant", "normal"]).variant().unwrap(),
            Variant::Normal
        );
        let yaml = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../testdata/golden/public/configs/prompts/animation_tiny.yaml"
        );
        let from_yaml = Cli::parse_from(["x", "--config", yaml]).serve.model;
        assert_eq!(from_yaml.variant().unwrap(), Variant::Normal);
    }

    #[test]
    fn serve_and_generate_differ_only_in_the_normal_step_count() {
        assert_eq!(serve_default_steps(Variant::Normal), 25);
        assert_eq!(Variant::Normal.default_steps(), 30);
        assert_eq!(
            serve_default_steps(Variant::Accelerated) as usize,
            Variant::Accelerated.default_steps()
        );
    }
}
