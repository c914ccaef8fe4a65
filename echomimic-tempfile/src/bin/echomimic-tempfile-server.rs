//! `echomimic-tempfile-server`: serves the temp-file API from a local folder.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use echomimic_tempfile::server::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_MIN_FREE_BYTES,
};
use echomimic_tempfile::{Server, ServerConfig, Token};

/// Temp-file API server for the EchoMimic worker (upload, download, delete; files expire).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "TEMPFILE_LISTEN", default_value = "127.0.0.1:3000")]
    listen: String,
    /// Storage folder (created if missing; files survive restarts).
    #[arg(long, env = "TEMPFILE_DIR", default_value = "tempfile-data")]
    dir: PathBuf,
    /// Largest accepted upload in bytes (default 200 MiB).
    #[arg(long, env = "TEMPFILE_MAX_BYTES", default_value_t = DEFAULT_MAX_UPLOAD_BYTES)]
    max_bytes: u64,
    /// Hours a file lives after its upload (fractions allowed).
    #[arg(long, env = "TEMP_FILE_EXPIRY", default_value_t = 24.0, value_parser = positive_hours)]
    expiry_hours: f64,
    /// Seconds between sweeps of expired files.
    #[arg(long, env = "TEMPFILE_SWEEP_SECS", default_value_t = 60)]
    sweep_secs: u64,
    /// Connections served at once, one thread each (the thread count); one more is answered
    /// 503. `--threads` is the old name.
    #[arg(long, alias = "threads", env = "TEMPFILE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a request head may take to arrive whole (slow clients get 408).
    #[arg(long, env = "TEMPFILE_HEADER_TIMEOUT_SECS", default_value_t = 10.0, value_parser = positive_secs)]
    header_timeout_secs: f64,
    /// Least average upload rate in bytes/s, after --body-grace-secs (0 = none; slower: 408).
    #[arg(long, env = "TEMPFILE_MIN_BODY_RATE", default_value_t = 1024)]
    min_body_rate: u64,
    /// Seconds an upload may take before --min-body-rate applies.
    #[arg(long, env = "TEMPFILE_BODY_GRACE_SECS", default_value_t = 10.0, value_parser = positive_secs)]
    body_grace_secs: f64,
    /// Most bytes stored plus being uploaded (unset = no quota); past it uploads get 507.
    #[arg(long, env = "TEMPFILE_QUOTA_BYTES")]
    quota_bytes: Option<u64>,
    /// Free bytes every upload must leave on the storage's disk (default 256 MiB); below it
    /// uploads get 507.
    #[arg(long, env = "TEMPFILE_MIN_FREE_BYTES", default_value_t = DEFAULT_MIN_FREE_BYTES)]
    min_free_bytes: u64,
    /// Access token: when set, every endpoint but /health needs `Authorization: Bearer <token>`.
    /// Repeat the flag or give a comma list to accept several (rotation). Prefer the env
    /// variable or --token-file: a flag is visible in the process list.
    #[arg(
        long,
        env = "TEMPFILE_TOKEN",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    token: Vec<String>,
    /// File holding access tokens (commas or one a line), e.g. a mounted secret; adds to --token.
    #[arg(long, env = "TEMPFILE_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
}

impl Args {
    fn tokens(&self) -> Result<Vec<Token>, echomimic_tempfile::TempfileError> {
        let mut tokens = Token::parse_list(&self.token.join(","))?;
        if let Some(path) = &self.token_file {
            tokens.extend(Token::from_file(path)?);
        }
        Ok(tokens)
    }
}

fn positive_hours(s: &str) -> Result<f64, String> {
    let h: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if h.is_finite() && h > 0.0 && h <= 24.0 * 365.0 {
        Ok(h)
    } else {
        Err("must be a positive number of hours, at most one year".into())
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= 24.0 * 3600.0 {
        Ok(v)
    } else {
        Err("must be a positive number of seconds, at most a day".into())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut config = ServerConfig::new(&args.dir);
    config.tokens = match args.tokens() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(2);
        }
    };
    config.listen = args.listen;
    config.max_upload_bytes = args.max_bytes;
    config.expiry = Duration::from_secs_f64(args.expiry_hours * 3600.0);
    config.sweep_interval = Duration::from_secs(args.sweep_secs);
    config.max_connections = args.max_connections;
    config.header_timeout = Duration::from_secs_f64(args.header_timeout_secs);
    config.min_body_rate = args.min_body_rate;
    config.body_grace = Duration::from_secs_f64(args.body_grace_secs);
    config.quota_bytes = args.quota_bytes;
    config.min_free_bytes = args.min_free_bytes;

    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    if let Some(sig) = signals.forever().next() {
        tracing::info!(signal = sig, "shutting down");
    }
    server.shutdown();
    ExitCode::SUCCESS
}
