//! The error type of the crate.

use std::io;
use std::path::PathBuf;

/// Errors of the temp-file client and server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TempfileError {
    /// The base URL is not an `http://` or `https://` URL.
    #[error("invalid base url {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file id that cannot be a temp-file id (empty, too long, or with characters outside
    /// `[A-Za-z0-9._-]`); it is never put into a URL.
    #[error("invalid file id {0:?}")]
    InvalidFileId(String),
    /// The request did not complete: connection refused or reset, DNS, timeout, TLS, protocol.
    #[error("{method} {url}: {source}")]
    Transport {
        /// HTTP method.
        method: &'static str,
        /// Request URL.
        url: String,
        /// The transport error.
        #[source]
        source: Box<ureq::Error>,
    },
    /// The file id is unknown or expired (HTTP 404). Permanent.
    #[error("file {file_id} not found (unknown or expired)")]
    NotFound {
        /// The id asked for.
        file_id: String,
    },
    /// The server answered with an error status; `message` is its JSON `message` or the start
    /// of its body.
    #[error("{method} {url}: http {status}: {message}")]
    Status {
        /// HTTP method.
        method: &'static str,
        /// Request URL.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// The server answered 2xx with `"success": false`.
    #[error("{method} {url}: server refused: {message}")]
    Refused {
        /// HTTP method.
        method: &'static str,
        /// Request URL.
        url: String,
        /// The server's `message`.
        message: String,
    },
    /// The response body is not the expected JSON.
    #[error("{method} {url}: unexpected response body {body:?}: {source}")]
    Decode {
        /// HTTP method.
        method: &'static str,
        /// Request URL.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
        /// The start of the body.
        body: String,
    },
    /// A download is larger than the caller's limit; the partial file was deleted.
    #[error("file {file_id} is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The id asked for.
        file_id: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A local file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "open", "write".
        op: &'static str,
        /// The local path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The server could not listen on its address.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A server setting is out of range.
    #[error("invalid server config: {0}")]
    Config(String),
    /// The server refused the access token (HTTP 401): none was sent, or it is not one of the
    /// server's. A configuration error, never retried: set
    /// [`TOKEN_ENV`](crate::auth::TOKEN_ENV) to one of the server's tokens.
    #[error(
        "{method} {url}: the temp-file API refused the access token (http 401: {message}); \
         set TEMPFILE_TOKEN to one of the server's tokens"
    )]
    Unauthorized {
        /// HTTP method.
        method: &'static str,
        /// Request URL.
        url: String,
        /// The server's message.
        message: String,
    },
    /// An access token is malformed, or a signed link was asked for without a token. The text
    /// never contains the token.
    #[error("invalid access token: {0}")]
    InvalidToken(String),
    /// A call (all its attempts and the pauses between them) did not finish within the
    /// client's [`transfer_deadline`](crate::ClientConfig::transfer_deadline). Not retried.
    #[error("{what} did not finish within {secs} s (the transfer deadline); last error: {last}")]
    DeadlineExceeded {
        /// The call, e.g. "download".
        what: &'static str,
        /// The deadline in seconds.
        secs: u64,
        /// The last attempt's error.
        last: String,
    },
    /// The caller's stop check asked the transfer to stop (a worker shutting down); a partial
    /// download was deleted. Not retried.
    #[error("{what} cancelled")]
    Cancelled {
        /// The call, e.g. "download".
        what: &'static str,
    },
}

impl TempfileError {
    /// True for errors that may succeed when retried: connection failures, timeouts, resets,
    /// DNS failures, HTTP 408, 429 and 5xx. False for everything else (404, 4xx, bad input,
    /// local I/O, size limit).
    pub fn is_retryable(&self) -> bool {
        match self {
            TempfileError::Transport { source, .. } => matches!(
                **source,
                ureq::Error::Io(_)
                    | ureq::Error::Timeout(_)
                    | ureq::Error::ConnectionFailed
                    | ureq::Error::HostNotFound
            ),
            TempfileError::Status { status, .. } => {
                *status == 408 || *status == 429 || (500..=599).contains(status)
            }
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TempfileError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> TempfileError {
        TempfileError::Status {
            method: "GET",
            url: "http://x".into(),
            status: code,
            message: String::new(),
        }
    }

    #[test]
    fn retry_classification() {
        assert!(status(500).is_retryable());
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(status(408).is_retryable());
        assert!(!status(400).is_retryable());
        assert!(!TempfileError::Unauthorized {
            method: "GET",
            url: "http://x".into(),
            message: String::new(),
        }
        .is_retryable());
        assert!(!status(413).is_retryable());
        assert!(!TempfileError::NotFound {
            file_id: "x".into()
        }
        .is_retryable());
        let transport = |e| TempfileError::Transport {
            method: "GET",
            url: "http://x".into(),
            source: Box::new(e),
        };
        assert!(transport(ureq::Error::ConnectionFailed).is_retryable());
        assert!(transport(ureq::Error::Io(io::Error::from(
            io::ErrorKind::ConnectionReset
        )))
        .is_retryable());
        assert!(!transport(ureq::Error::BadUri("x".into())).is_retryable());
    }
}
