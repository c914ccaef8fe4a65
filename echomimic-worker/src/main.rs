//! `echomimic-worker`: the EchoMimic worker service (`serve`, the default), one-shot local
//! generation (`generate`) and the operator's commands (`status`, `dlq`, `cancel`). Everything
//! but argument parsing, logging, signals and exit codes lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use echomimic_worker::admin::{self, CancelArgs, DlqArgs, StatusArgs};
use echomimic_worker::engine::pipeline::PipelineEngine;
use echomimic_worker::generate::{self, GenerateArgs};
use echomimic_worker::{runtime, ServeArgs, ShutdownHandle, ShutdownLevel, Worker, WorkerError};
use signal_hook::consts::{SIGINT, SIGTERM};

/// mimalloc instead of the system allocator: see the workspace's Cargo.toml (its settings:
/// [`runtime`]).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// EchoMimic v1 talking-head worker: consumes tasks from Redis (guide: EchoMimic Worker usage),
/// or generates one video locally.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as text, or as one JSON object per line (with the task id and claim as
    /// fields), for log collectors. Logs go to stderr; RUST_LOG filters them (default info).
    #[arg(
        long,
        global = true,
        env = "ECHOMIMIC_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve tasks from a Redis queue (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Generate one video from a photo and a speech file.
    Generate(Box<GenerateArgs>),
    /// Show every gpu id found in Redis: status, lease, queue, claims, running task, and the
    /// dead-letter count.
    Status(StatusArgs),
    /// List, requeue or purge the dead-letter list.
    Dlq(DlqArgs),
    /// Cancel a task: removed when queued, stopped between two UNet calls when running; one
    /// `failed` event with the code `cancelled` either way.
    Cancel(CancelArgs),
}

/// `serve` is the default subcommand: `echomimic-worker --gpu-id 1` means
/// `echomimic-worker serve --gpu-id 1` (a leading `--log-format F` is skipped when looking).
fn argv() -> Vec<String> {
    let mut args: Vec<String> = std::env::args().collect();
    let mut at = 1;
    while let Some(a) = args.get(at) {
        match a.as_str() {
            "--log-format" => at += 2,
            a if a.starts_with("--log-format=") => at += 1,
            _ => break,
        }
    }
    let explicit = args.get(at).is_some_and(|a| {
        matches!(
            a.as_str(),
            "serve"
                | "generate"
                | "status"
                | "dlq"
                | "cancel"
                | "help"
                | "-h"
                | "--help"
                | "-V"
                | "--version"
        )
    });
    if !explicit {
        args.insert(at.min(args.len()), "serve".into());
    }
    args
}

fn serve(args: ServeArgs) -> Result<(), WorkerError> {
    let config = args.into_config()?;
    tracing::info!(?config, "configuration");
    let shutdown = ShutdownHandle::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| WorkerError::Internal(format!("cannot install signal handlers: {e}")))?;
    let on_signal = shutdown.clone();
    std::thread::spawn(move || {
        for signal in signals.forever() {
            match on_signal.request() {
                ShutdownLevel::Graceful => tracing::warn!(signal, "stopping: no new tasks; the running one may finish within the grace period (signal again to stop it now)"),
                _ => tracing::warn!(signal, "stopping now: the running task is requeued"),
            }
        }
    });
    let model = config.model.clone();
    let gpu_id = config.gpu_id;
    let worker = match Worker::start(config, shutdown, || PipelineEngine::load(&model, gpu_id)) {
        Ok(w) => w,
        // A stop signal while the model was loading: a normal stop.
        Err(WorkerError::Cancelled) => return Ok(()),
        Err(e) => return Err(e),
    };
    let stats = worker.join()?;
    tracing::info!(?stats, "stopped");
    Ok(())
}

/// `generate` with Ctrl-C/SIGTERM handling: the first signal stops between UNet
/// calls (the partial MP4 is removed), a second one exits at once.
fn generate_with_signals(args: &GenerateArgs) -> anyhow::Result<()> {
    let cancel = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&cancel))?;
        signal_hook::flag::register(signal, Arc::clone(&cancel))?;
    }
    generate::run_with_cancel(args, &cancel).map(|_| ())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

/// An operator command's exit status (its errors logged like the service's).
fn admin_exit(result: Result<u8, WorkerError>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn main() -> ExitCode {
    runtime::configure();
    let cli = Cli::parse_from(argv());
    init_logging(cli.log_format);
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Status(args) => admin_exit(admin::status(&args, &mut out)),
        Command::Dlq(args) => admin_exit(admin::dlq(&args, &mut out)),
        Command::Cancel(args) => admin_exit(admin::cancel(&args, &mut out)),
        Command::Serve(args) => match serve(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::Generate(args) => match generate_with_signals(&args) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
