//! A blocking client for the temp-file API (ureq 3).
//!
//! Every call retries transient failures (connection errors, timeouts, resets, DNS, HTTP 408,
//! 429 and 5xx) with capped exponential backoff and jitter ([`RetryPolicy`]); a 404 is
//! reported at once as [`TempfileError::NotFound`]. Downloads stream to a temporary sibling of
//! the destination, resume with a `Range` request after a transient failure, are stopped and
//! deleted when they pass the caller's size limit, and are renamed into place only when complete.
//! Uploads are not idempotent: a retry after a lost response may leave an orphan file on the
//! server, which expires like any other. Every call, its retries and pauses included, ends by
//! [`ClientConfig::transfer_deadline`] ([`TempfileError::DeadlineExceeded`]), and a download
//! given a stop check ([`TempfileClient::download_to_unless`]) ends at the next chunk once it
//! says stop ([`TempfileError::Cancelled`]).
//!
//! With [`ClientConfig::token`] set, every request carries `Authorization: Bearer <token>`; a
//! `401` is [`TempfileError::Unauthorized`], a configuration error that is never retried.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde::Deserialize;
use ureq::http::{Response, StatusCode};
use ureq::{Body, SendBody};

use crate::auth::{sign_download, Token};
use crate::error::TempfileError;
use crate::types::{content_type_for_extension, extension_of, filename_params, UploadedFile};

/// Largest JSON response body the client reads.
const MAX_JSON_RESPONSE: u64 = 1024 * 1024;

/// When and how often to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first included (at least 1).
    pub max_attempts: u32,
    /// Backoff before the first retry.
    pub initial_backoff: Duration,
    /// Cap of the backoff.
    pub max_backoff: Duration,
    /// An outage ridden out: transient failures are retried past `max_attempts` (pausing
    /// `max_backoff`) until this long after the call's first failure. Zero (the default) =
    /// `max_attempts` only. The transfer deadline bounds the call either way.
    pub outage: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts, backoff 0.5 s doubling up to 8 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            outage: Duration::ZERO,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retries.
    pub fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause before retry number `retry` (1 = first retry): the capped exponential value
    /// `min(max_backoff, initial_backoff * 2^(retry-1))`, of which a random half is kept
    /// ("equal jitter"), so concurrent clients spread out but never retry at once.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let capped = exp.min(self.max_backoff);
        let half = capped / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the API, e.g. `http://localhost:3000` (`BASE_URL`).
    pub base_url: String,
    /// Limit for establishing a connection (default 10 s).
    pub connect_timeout: Duration,
    /// Limit for each read from the socket, i.e. the longest silence tolerated mid-transfer
    /// (default 60 s).
    pub read_timeout: Duration,
    /// Limit for each write to the socket (default 60 s).
    pub write_timeout: Duration,
    /// Limit for the server to start answering once the request is sent (default 120 s).
    pub response_timeout: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// The longest one call may take in all, its retries and the pauses between them included
    /// (default 10 minutes): a peer that trickles bytes, or answers every attempt slowly,
    /// ends in [`TempfileError::DeadlineExceeded`] instead of holding the caller forever.
    pub transfer_deadline: Duration,
    /// Access token sent with every request (`None`: an open server). See [`crate::auth`];
    /// [`Token::from_env`] reads `TEMPFILE_TOKEN`.
    pub token: Option<Token>,
}

impl ClientConfig {
    /// Defaults for `base_url`.
    pub fn new(base_url: impl Into<String>) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            transfer_deadline: Duration::from_secs(600),
            token: None,
        }
    }

    /// Sets the access token.
    pub fn with_token(mut self, token: Option<Token>) -> Self {
        self.token = token;
        self
    }
}

/// What [`TempfileClient::download_to`] fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    /// Size of the file written, in bytes.
    pub bytes: u64,
    /// The server's `Content-Type`, if any.
    pub content_type: Option<String>,
}

/// A temp-file API client. Cheap to clone (the connection pool is shared).
#[derive(Debug, Clone)]
pub struct TempfileClient {
    base: String,
    agent: ureq::Agent,
    retry: RetryPolicy,
    transfer_deadline: Duration,
    token: Option<Token>,
}

/// What every attempt of one download shares.
#[derive(Clone, Copy)]
struct DownloadJob<'a> {
    file_id: &'a str,
    url: &'a str,
    /// The partial file the bytes go to.
    part: &'a Path,
    max_bytes: u64,
    stop: &'a dyn Fn() -> bool,
}

/// The end of one call's time ([`ClientConfig::transfer_deadline`]).
#[derive(Debug, Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }
}

/// Checks a file id before it goes into a URL path: 1–128 of `[A-Za-z0-9._-]`, starting with a
/// letter or digit.
fn check_file_id(id: &str) -> Result<(), TempfileError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_alphanumeric() || (i > 0 && matches!(b, b'.' | b'_' | b'-')));
    if ok {
        Ok(())
    } else {
        Err(TempfileError::InvalidFileId(id.to_owned()))
    }
}

#[derive(Deserialize)]
struct ServerReply {
    #[serde(default)]
    success: Option<bool>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    deleted_count: Option<u64>,
}

impl TempfileClient {
    /// A client with default settings.
    pub fn new(base_url: impl Into<String>) -> Result<Self, TempfileError> {
        TempfileClient::with_config(ClientConfig::new(base_url))
    }

    /// A client with the given settings.
    pub fn with_config(config: ClientConfig) -> Result<Self, TempfileError> {
        let url = config.base_url.trim();
        let invalid = |reason| TempfileError::InvalidBaseUrl {
            url: config.base_url.clone(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| invalid("must start with http:// or https://"))?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(invalid("has no host"));
        }
        if url.contains(['?', '#']) || url.chars().any(char::is_whitespace) {
            return Err(invalid("must not contain a query, a fragment or spaces"));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_per_read(Some(config.read_timeout))
            .timeout_per_write(Some(config.write_timeout))
            .timeout_recv_response(Some(config.response_timeout))
            .user_agent(concat!("echomimic-tempfile/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(TempfileClient {
            base: url.trim_end_matches('/').to_owned(),
            agent,
            retry: RetryPolicy {
                max_attempts: config.retry.max_attempts.max(1),
                ..config.retry
            },
            transfer_deadline: config.transfer_deadline,
            token: config.token,
        })
    }

    /// `Authorization: Bearer <token>` on a request when a token is set, and the time left of
    /// the call as the request's overall timeout.
    fn authorized<B>(
        &self,
        req: ureq::RequestBuilder<B>,
        deadline: Deadline,
    ) -> ureq::RequestBuilder<B> {
        let req = req
            .config()
            .timeout_global(Some(deadline.remaining().max(Duration::from_millis(1))))
            .build();
        match &self.token {
            Some(t) => req.header("Authorization", format!("Bearer {}", t.expose())),
            None => req,
        }
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `{base}/api/tempfile/download/{file_id}`.
    pub fn download_url(&self, file_id: &str) -> Result<String, TempfileError> {
        check_file_id(file_id)?;
        Ok(format!("{}/api/tempfile/download/{file_id}", self.base))
    }

    /// A link that downloads `file_id` without the token until `expires` (a browser can use it;
    /// see [`crate::auth`]): `{base}/api/tempfile/download/{file_id}?exp=…&sig=…`. Needs the
    /// client's token ([`TempfileError::InvalidToken`] without one).
    pub fn signed_download_url(
        &self,
        file_id: &str,
        expires: SystemTime,
    ) -> Result<String, TempfileError> {
        let url = self.download_url(file_id)?;
        let token = self.token.as_ref().ok_or_else(|| {
            TempfileError::InvalidToken("a signed link needs the client's token".into())
        })?;
        let exp = expires
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(format!(
            "{url}?exp={exp}&sig={}",
            sign_download(token, file_id, exp)
        ))
    }

    /// Runs `op` (one attempt, given the call's deadline) until it succeeds, fails for good,
    /// runs out of attempts or of time, or `stop` says so (checked between attempts and
    /// every 100 ms of a pause).
    fn with_retries<T>(
        &self,
        what: &'static str,
        stop: &dyn Fn() -> bool,
        mut op: impl FnMut(Deadline) -> Result<T, TempfileError>,
    ) -> Result<T, TempfileError> {
        let deadline = Deadline(Instant::now() + self.transfer_deadline);
        let out_of_time = |e: &TempfileError| TempfileError::DeadlineExceeded {
            what,
            secs: self.transfer_deadline.as_secs(),
            last: e.to_string(),
        };
        let mut attempt = 1;
        let mut first_failure: Option<Instant> = None;
        // Past its attempts a transient failure is retried while the outage budget lasts.
        let mut retry_more = |attempt: u32| {
            let since = *first_failure.get_or_insert_with(Instant::now);
            attempt < self.retry.max_attempts || since.elapsed() < self.retry.outage
        };
        loop {
            if stop() {
                return Err(TempfileError::Cancelled { what });
            }
            match op(deadline) {
                Err(e) if stop() && e.is_retryable() => {
                    return Err(TempfileError::Cancelled { what })
                }
                Err(e) if e.is_retryable() && deadline.remaining().is_zero() => {
                    return Err(out_of_time(&e))
                }
                Err(e) if e.is_retryable() && retry_more(attempt) => {
                    let pause = self.retry.backoff(attempt);
                    if pause >= deadline.remaining() {
                        return Err(out_of_time(&e));
                    }
                    tracing::warn!(error = %e, attempt, pause_ms = pause.as_millis() as u64, "{what} failed, retrying");
                    let until = Instant::now() + pause;
                    while Instant::now() < until {
                        if stop() {
                            return Err(TempfileError::Cancelled { what });
                        }
                        std::thread::sleep(
                            until
                                .saturating_duration_since(Instant::now())
                                .min(Duration::from_millis(100)),
                        );
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Uploads a local file under its own file name. Returns the server's record.
    pub fn upload_file(&self, path: &Path) -> Result<UploadedFile, TempfileError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                TempfileError::io(
                    "upload",
                    path,
                    io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
                )
            })?;
        self.upload_file_as(path, &name)
    }

    /// Uploads a local file as multipart field `file` named `file_name` (sent ASCII-safe in
    /// `filename`, plus `filename*` when it is not ASCII).
    pub fn upload_file_as(
        &self,
        path: &Path,
        file_name: &str,
    ) -> Result<UploadedFile, TempfileError> {
        self.upload_file_as_unless(path, file_name, &never)
    }

    /// [`upload_file_as`](Self::upload_file_as) that gives up with
    /// [`TempfileError::Cancelled`] as soon as `stop` returns true, asked before each attempt
    /// and during the pauses between attempts.
    pub fn upload_file_as_unless(
        &self,
        path: &Path,
        file_name: &str,
        stop: &dyn Fn() -> bool,
    ) -> Result<UploadedFile, TempfileError> {
        let size = fs::metadata(path)
            .map_err(|e| TempfileError::io("stat", path, e))?
            .len();
        let url = format!("{}/api/tempfile/upload", self.base);
        let boundary = format!("----echomimic{:032x}", rand::rng().random::<u128>());
        let content_type = extension_of(file_name).map_or("application/octet-stream", |e| {
            content_type_for_extension(&e)
        });
        let preamble = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; {}\r\nContent-Type: {content_type}\r\n\r\n",
            filename_params(file_name)
        );
        let epilogue = format!("\r\n--{boundary}--\r\n");
        let total = preamble.len() as u64 + size + epilogue.len() as u64;
        self.with_retries("upload", stop, |deadline| {
            let file = File::open(path).map_err(|e| TempfileError::io("open", path, e))?;
            let body = io::Cursor::new(preamble.clone().into_bytes())
                .chain(file.take(size))
                .chain(io::Cursor::new(epilogue.clone().into_bytes()));
            let resp = self
                .authorized(self.agent.post(&url), deadline)
                .header(
                    "Content-Type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .header("Content-Length", total.to_string())
                .header("Expect", "100-continue")
                .send(SendBody::from_owned_reader(body))
                .map_err(|e| transport("POST", &url, e))?;
            let (status, text) = read_small_body("POST", &url, resp)?;
            if !status.is_success() {
                return Err(status_error("POST", &url, status, &text));
            }
            let decoded: UploadReply =
                serde_json::from_str(&text).map_err(|source| TempfileError::Decode {
                    method: "POST",
                    url: url.clone(),
                    source,
                    body: snippet(&text),
                })?;
            match decoded {
                UploadReply {
                    success: true,
                    file: Some(file),
                    ..
                } => Ok(file),
                UploadReply { message, .. } => Err(TempfileError::Refused {
                    method: "POST",
                    url: url.clone(),
                    message: message
                        .unwrap_or_else(|| "upload refused without a message".to_owned()),
                }),
            }
        })
    }

    /// Downloads a file to `dest`, refusing more than `max_bytes`. The bytes go to a hidden
    /// `.{name}.part` sibling first and are renamed onto `dest` only when complete.
    pub fn download_to(
        &self,
        file_id: &str,
        dest: &Path,
        max_bytes: u64,
    ) -> Result<Download, TempfileError> {
        self.download_to_unless(file_id, dest, max_bytes, &never)
    }

    /// [`download_to`](Self::download_to) that gives up with [`TempfileError::Cancelled`] as
    /// soon as `stop` returns true: it is asked before each attempt, after every chunk read
    /// and during the pauses between attempts (a silent peer is still bounded by the read
    /// timeout and the transfer deadline).
    pub fn download_to_unless(
        &self,
        file_id: &str,
        dest: &Path,
        max_bytes: u64,
        stop: &dyn Fn() -> bool,
    ) -> Result<Download, TempfileError> {
        let url = self.download_url(file_id)?;
        let part = part_path(dest)?;
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&part)
            .map_err(|e| TempfileError::io("create", &part, e))?;
        let job = DownloadJob {
            file_id,
            url: &url,
            part: &part,
            max_bytes,
            stop,
        };
        let result = self.with_retries("download", stop, |deadline| {
            self.download_attempt(&job, &mut out, deadline)
        });
        match result {
            Ok(download) => {
                out.sync_all()
                    .map_err(|e| TempfileError::io("sync", &part, e))?;
                drop(out);
                fs::rename(&part, dest).map_err(|e| TempfileError::io("rename", dest, e))?;
                Ok(download)
            }
            Err(e) => {
                drop(out);
                let _ = fs::remove_file(&part);
                Err(e)
            }
        }
    }

    fn download_attempt(
        &self,
        job: &DownloadJob<'_>,
        out: &mut File,
        deadline: Deadline,
    ) -> Result<Download, TempfileError> {
        let DownloadJob {
            file_id,
            url,
            part,
            max_bytes,
            stop,
        } = *job;
        let have = out
            .metadata()
            .map_err(|e| TempfileError::io("stat", part, e))?
            .len();
        let mut req = self.authorized(self.agent.get(url), deadline);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let resp = req.call().map_err(|e| transport("GET", url, e))?;
        let status = resp.status();
        let too_large = || TempfileError::TooLarge {
            file_id: file_id.to_owned(),
            limit: max_bytes,
        };
        let mut written = match status.as_u16() {
            200 => {
                reset(out, part)?;
                0
            }
            206 if content_range_start(&resp) == Some(have) => have,
            206 | 416 => {
                // The server does not continue where we stopped: start over.
                reset(out, part)?;
                return Err(TempfileError::Status {
                    method: "GET",
                    url: url.to_owned(),
                    status: 503,
                    message: "resumed download did not line up; restarting".to_owned(),
                });
            }
            404 => {
                return Err(TempfileError::NotFound {
                    file_id: file_id.to_owned(),
                })
            }
            _ => {
                let (status, text) = read_small_body("GET", url, resp)?;
                return Err(status_error("GET", url, status, &text));
            }
        };
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(len) = resp.body().content_length() {
            if written.saturating_add(len) > max_bytes {
                return Err(too_large());
            }
        }
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(transport("GET", url, ureq::Error::Io(e))),
            };
            written += n as u64;
            if written > max_bytes {
                return Err(too_large());
            }
            if stop() {
                return Err(TempfileError::Cancelled { what: "download" });
            }
            out.write_all(&buf[..n])
                .map_err(|e| TempfileError::io("write", part, e))?;
        }
        Ok(Download {
            bytes: written,
            content_type,
        })
    }

    /// Deletes a file. [`TempfileError::NotFound`] when it does not exist.
    pub fn delete(&self, file_id: &str) -> Result<(), TempfileError> {
        check_file_id(file_id)?;
        let url = format!("{}/api/tempfile/delete/{file_id}", self.base);
        self.with_retries("delete", &never, |deadline| {
            let resp = self
                .authorized(self.agent.delete(&url), deadline)
                .call()
                .map_err(|e| transport("DELETE", &url, e))?;
            let (status, text) = read_small_body("DELETE", &url, resp)?;
            if status == StatusCode::NOT_FOUND {
                return Err(TempfileError::NotFound {
                    file_id: file_id.to_owned(),
                });
            }
            if !status.is_success() {
                return Err(status_error("DELETE", &url, status, &text));
            }
            refused_unless_success("DELETE", &url, &text).map(|_| ())
        })
    }

    /// Deletes several files; returns how many existed and were deleted.
    pub fn batch_delete(&self, file_ids: &[&str]) -> Result<u64, TempfileError> {
        for id in file_ids {
            check_file_id(id)?;
        }
        let url = format!("{}/api/tempfile/batch-delete", self.base);
        let body = serde_json::json!({ "file_ids": file_ids }).to_string();
        self.with_retries("batch delete", &never, |deadline| {
            let resp = self
                .authorized(self.agent.post(&url), deadline)
                .header("Content-Type", "application/json")
                .send(body.as_str())
                .map_err(|e| transport("POST", &url, e))?;
            let (status, text) = read_small_body("POST", &url, resp)?;
            if !status.is_success() {
                return Err(status_error("POST", &url, status, &text));
            }
            let reply = refused_unless_success("POST", &url, &text)?;
            Ok(reply.deleted_count.unwrap_or(0))
        })
    }
}

#[derive(Deserialize)]
struct UploadReply {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    message: Option<String>,
    #[serde(flatten)]
    file: Option<UploadedFile>,
}

/// A stop check that never stops.
fn never() -> bool {
    false
}

fn transport(method: &'static str, url: &str, e: ureq::Error) -> TempfileError {
    TempfileError::Transport {
        method,
        url: url.to_owned(),
        source: Box::new(e),
    }
}

fn snippet(text: &str) -> String {
    let mut end = text.len().min(300);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

fn read_small_body(
    method: &'static str,
    url: &str,
    mut resp: Response<Body>,
) -> Result<(StatusCode, String), TempfileError> {
    let status = resp.status();
    let text = resp
        .body_mut()
        .with_config()
        .limit(MAX_JSON_RESPONSE)
        .read_to_string()
        .map_err(|e| transport(method, url, e))?;
    Ok((status, text))
}

fn status_error(method: &'static str, url: &str, status: StatusCode, text: &str) -> TempfileError {
    let message = serde_json::from_str::<ServerReply>(text)
        .ok()
        .and_then(|r| r.message)
        .unwrap_or_else(|| snippet(text));
    if status == StatusCode::UNAUTHORIZED {
        return TempfileError::Unauthorized {
            method,
            url: url.to_owned(),
            message,
        };
    }
    TempfileError::Status {
        method,
        url: url.to_owned(),
        status: status.as_u16(),
        message,
    }
}

fn refused_unless_success(
    method: &'static str,
    url: &str,
    text: &str,
) -> Result<ServerReply, TempfileError> {
    let reply: ServerReply =
        serde_json::from_str(text).map_err(|source| TempfileError::Decode {
            method,
            url: url.to_owned(),
            source,
            body: snippet(text),
        })?;
    if reply.success == Some(false) {
        return Err(TempfileError::Refused {
            method,
            url: url.to_owned(),
            message: reply
                .message
                .unwrap_or_else(|| "refused without a message".to_owned()),
        });
    }
    Ok(reply)
}

fn content_range_start(resp: &Response<Body>) -> Option<u64> {
    let v = resp.headers().get("content-range")?.to_str().ok()?;
    let range = v.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn reset(out: &mut File, part: &Path) -> Result<(), TempfileError> {
    use std::io::Seek;
    out.set_len(0)
        .map_err(|e| TempfileError::io("truncate", part, e))?;
    out.seek(io::SeekFrom::Start(0))
        .map_err(|e| TempfileError::io("seek", part, e))?;
    Ok(())
}

fn part_path(dest: &Path) -> Result<PathBuf, TempfileError> {
    let name = dest.file_name().ok_or_else(|| {
        TempfileError::io(
            "download to",
            dest,
            io::Error::new(io::ErrorKind::InvalidInput, "destination has no file name"),
        )
    })?;
    Ok(dest.with_file_name(format!(".{}.part", name.to_string_lossy())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            outage: Duration::ZERO,
        };
        for retry in 1..=12 {
            let expected = (100u64 << (retry - 1).min(20)).min(1000);
            for _ in 0..20 {
                let b = p.backoff(retry).as_millis() as u64;
                assert!(
                    b >= expected / 2 && b <= expected,
                    "retry {retry}: {b} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            TempfileClient::new("http://localhost:3000/")
                .unwrap()
                .base_url(),
            "http://localhost:3000"
        );
        assert!(matches!(
            TempfileClient::new("localhost:3000"),
            Err(TempfileError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            TempfileClient::new("ftp://x"),
            Err(TempfileError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            TempfileClient::new("http://"),
            Err(TempfileError::InvalidBaseUrl { .. })
        ));
        assert!(matches!(
            TempfileClient::new("http://x/?a"),
            Err(TempfileError::InvalidBaseUrl { .. })
        ));
    }

    #[test]
    fn file_ids_are_checked_before_use() {
        let c = TempfileClient::new("http://localhost:3000").unwrap();
        assert_eq!(
            c.download_url("550e8400-e29b-41d4-a716-446655440000")
                .unwrap(),
            "http://localhost:3000/api/tempfile/download/550e8400-e29b-41d4-a716-446655440000"
        );
        for bad in ["", "..", "../x", "a/b", "a?b", "http://x", "a b"] {
            assert!(
                matches!(c.download_url(bad), Err(TempfileError::InvalidFileId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn filename_parameters() {
        assert_eq!(filename_params("face.jpg"), "filename=\"face.jpg\"");
        assert_eq!(filename_params("my face.jpg"), "filename=\"my face.jpg\"");
        assert_eq!(
            filename_params("头像.png"),
            "filename=\"__.png\"; filename*=UTF-8''%E5%A4%B4%E5%83%8F.png"
        );
        assert_eq!(
            filename_params("a\"b.png"),
            "filename=\"a_b.png\"; filename*=UTF-8''a%22b.png"
        );
    }
}
