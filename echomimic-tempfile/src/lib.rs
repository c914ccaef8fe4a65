//! Client and compatible server for the temp-file HTTP API used by the EchoMimic worker.
//!
//! The worker downloads its inputs and uploads its output video through this API (usage guide
//! §4, `docs/worker-usage-guide.zh.md`):
//! `POST /api/tempfile/upload` (multipart field `file`) answers
//! `{"success":true,"file_id","file_type","original_name"}`, and
//! `GET /api/tempfile/download/{file_id}` returns the bytes.
//!
//! * [`TempfileClient`]: upload, streaming download with a size cap, delete; timeouts and
//!   retries with backoff ([`RetryPolicy`]); errors as [`TempfileError`] with
//!   [`TempfileError::is_retryable`].
//! * [`Server`]: a thread-based server of the same API (binary `echomimic-tempfile-server`)
//!   with persistence, expiry, size limits and content checks, so the worker can run without
//!   the original web app.
//! * [`auth`]: optional access control — shared bearer tokens ([`Token`], env `TEMPFILE_TOKEN`)
//!   and time-limited signed download links for browsers.
#![deny(missing_docs)]

pub mod auth;
pub mod client;
pub mod error;
pub mod server;
pub mod types;

pub use auth::{sign_download, Token, TOKEN_ENV};
pub use client::{ClientConfig, Download, RetryPolicy, TempfileClient};
pub use error::TempfileError;
pub use server::{Clock, ManualClock, Server, ServerConfig};
pub use types::{FileType, UploadedFile};
