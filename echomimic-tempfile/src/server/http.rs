//! A small, strict HTTP/1.1 server side: request heads, bodies (Content-Length or chunked, with
//! `Expect: 100-continue`), and responses with a byte, file-range or empty body.
//!
//! Written for this server instead of using tiny_http 0.12, which allocates the *declared*
//! remaining body length in one buffer when a request is dropped unread: a single request
//! claiming `Content-Length: 1000000000000` aborts the whole process.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use super::pace::PacedStream;

/// Longest accepted request line plus headers, in bytes.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most accepted header fields.
const MAX_HEADERS: usize = 100;
/// Longest accepted chunk-size line or trailer line.
const MAX_CHUNK_LINE: usize = 1024;

/// Why a request head could not be read.
#[derive(Debug)]
pub(crate) enum HeadError {
    /// The peer closed (or timed out) before sending anything: not an error.
    Closed,
    /// The socket failed mid-head.
    Io(io::Error),
    /// Malformed; answer 400 and close.
    Bad(&'static str),
    /// Too long; answer 431 and close.
    TooLarge,
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// The path without the query string.
    pub(crate) path: String,
    /// The query string (after `?`, before any `#`), empty when there is none.
    pub(crate) query: String,
    pub(crate) http11: bool,
    /// Header fields with lowercase names, in order.
    headers: Vec<(String, String)>,
    pub(crate) framing: Framing,
    pub(crate) expects_continue: bool,
}

impl Head {
    /// The first value of a header (name in lowercase).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the client allows the connection to stay open after this request.
    pub(crate) fn wants_keep_alive(&self) -> bool {
        let conn = self.header("connection").unwrap_or("").to_ascii_lowercase();
        let has = |t: &str| conn.split(',').any(|p| p.trim() == t);
        if self.http11 {
            !has("close")
        } else {
            has("keep-alive")
        }
    }
}

fn read_line_limited(
    reader: &mut impl BufRead,
    line: &mut Vec<u8>,
    budget: &mut usize,
) -> io::Result<bool> {
    line.clear();
    loop {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Ok(false);
        }
        let take = available.len().min(*budget + 1);
        if let Some(pos) = available[..take].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&available[..pos]);
            reader.consume(pos + 1);
            *budget = budget.saturating_sub(pos + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(true);
        }
        if take > *budget {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        line.extend_from_slice(&available[..take]);
        reader.consume(take);
        *budget -= take;
    }
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads one request head.
pub(crate) fn read_head(reader: &mut impl BufRead) -> Result<Head, HeadError> {
    let mut budget = MAX_HEAD_BYTES;
    let mut line = Vec::new();
    let map_io = |e: io::Error| {
        if e.kind() == io::ErrorKind::InvalidData {
            HeadError::TooLarge
        } else {
            HeadError::Io(e)
        }
    };
    // Request line; tolerate empty lines before it (RFC 9112 §2.2).
    let mut first = true;
    loop {
        match read_line_limited(reader, &mut line, &mut budget) {
            Ok(true) if line.is_empty() => {}
            Ok(true) => break,
            Ok(false) => {
                return Err(if first {
                    HeadError::Closed
                } else {
                    HeadError::Bad("truncated request")
                })
            }
            Err(e)
                if first
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::ConnectionReset
                    ) =>
            {
                return Err(HeadError::Closed)
            }
            Err(e) => return Err(map_io(e)),
        }
        first = false;
    }
    let request_line =
        std::str::from_utf8(&line).map_err(|_| HeadError::Bad("request line is not ASCII"))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Bad("malformed request line"));
    };
    if !is_token(method) {
        return Err(HeadError::Bad("malformed method"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HeadError::Bad("unsupported HTTP version")),
    };
    if !target.starts_with('/') {
        return Err(HeadError::Bad("request target must be a path"));
    }
    let target = target.split('#').next().unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_owned(), query.to_owned());
    let method = method.to_owned();

    let mut headers = Vec::new();
    loop {
        match read_line_limited(reader, &mut line, &mut budget) {
            Ok(true) => {}
            Ok(false) => return Err(HeadError::Bad("truncated headers")),
            Err(e) => return Err(map_io(e)),
        }
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(HeadError::TooLarge);
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(HeadError::Bad("obsolete header line folding"));
        }
        let text = String::from_utf8_lossy(&line);
        let Some((name, value)) = text.split_once(':') else {
            return Err(HeadError::Bad("malformed header line"));
        };
        if !is_token(name) {
            return Err(HeadError::Bad("malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }

    let mut head = Head {
        method,
        path,
        query,
        http11,
        headers,
        framing: Framing::None,
        expects_continue: false,
    };
    let te = head
        .header("transfer-encoding")
        .map(str::to_ascii_lowercase);
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .collect();
    head.framing = match (te, lengths.as_slice()) {
        (Some(_), [_, ..]) => {
            return Err(HeadError::Bad("both Transfer-Encoding and Content-Length"))
        }
        (Some(te), []) if te.trim() == "chunked" => Framing::Chunked,
        (Some(_), []) => return Err(HeadError::Bad("unsupported Transfer-Encoding")),
        (None, []) => Framing::None,
        (None, [first, rest @ ..]) => {
            if rest.iter().any(|v| v != first) {
                return Err(HeadError::Bad("conflicting Content-Length values"));
            }
            if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Bad("malformed Content-Length"));
            }
            let n = first
                .parse::<u64>()
                .map_err(|_| HeadError::Bad("Content-Length too large"))?;
            if n == 0 {
                Framing::None
            } else {
                Framing::Length(n)
            }
        }
    };
    head.expects_continue = head.http11
        && head
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    Ok(head)
}

/// Reads one request body, honouring its framing; sends `100 Continue` before the first read
/// when the client asked for it.
pub(crate) struct Body<'a> {
    reader: &'a mut BufReader<PacedStream>,
    writer: &'a TcpStream,
    framing: Framing,
    /// Bytes left in the body (Length) or in the current chunk (Chunked).
    remaining: u64,
    /// Chunked: the last chunk and trailers were read.
    done: bool,
    send_continue: bool,
    /// Bytes of body data read so far.
    pub(crate) consumed: u64,
}

impl<'a> Body<'a> {
    pub(crate) fn new(
        head: &Head,
        reader: &'a mut BufReader<PacedStream>,
        writer: &'a TcpStream,
    ) -> Self {
        let (remaining, done) = match head.framing {
            Framing::None => (0, true),
            Framing::Length(n) => (n, false),
            Framing::Chunked => (0, false),
        };
        Body {
            reader,
            writer,
            framing: head.framing,
            remaining,
            done,
            send_continue: head.expects_continue && head.framing != Framing::None,
            consumed: 0,
        }
    }

    /// How the body is framed.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// Bytes still to come for a Content-Length body; `None` for chunked ones.
    pub(crate) fn remaining_hint(&self) -> Option<u64> {
        match self.framing {
            Framing::Length(_) => Some(self.remaining),
            Framing::Chunked | Framing::None => None,
        }
    }

    /// True when the whole body has been read (the connection can serve another request).
    pub(crate) fn is_finished(&self) -> bool {
        self.done
    }

    /// True when reading would make the client send a body it is holding back.
    pub(crate) fn is_waiting_for_continue(&self) -> bool {
        self.send_continue
    }

    /// The rest of the body must arrive within `limit` (for draining what is left).
    pub(crate) fn pace_for(&mut self, limit: Duration) {
        self.reader
            .get_mut()
            .set_deadline(std::time::Instant::now() + limit);
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let mut line = Vec::new();
        let mut budget = MAX_CHUNK_LINE;
        if !read_line_limited(self.reader, &mut line, &mut budget)? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let text = std::str::from_utf8(&line).map_err(|_| bad_data("bad chunk size"))?;
        let size_text = text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_text, 16).map_err(|_| bad_data("bad chunk size"))?;
        if size == 0 {
            // Trailers up to the empty line.
            loop {
                let mut budget = MAX_CHUNK_LINE;
                if !read_line_limited(self.reader, &mut line, &mut budget)? {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                if line.is_empty() {
                    break;
                }
            }
            self.done = true;
        }
        self.remaining = size;
        Ok(())
    }

    fn chunk_end(&mut self) -> io::Result<()> {
        let mut crlf = [0u8; 2];
        self.reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad_data("chunk not followed by CRLF"));
        }
        Ok(())
    }
}

fn bad_data(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Read for Body<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.send_continue {
            self.send_continue = false;
            let mut w = self.writer;
            w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            w.flush()?;
        }
        if self.framing == Framing::Chunked && self.remaining == 0 {
            self.next_chunk()?;
            if self.done {
                return Ok(0);
            }
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining -= n as u64;
        self.consumed += n as u64;
        if self.remaining == 0 {
            match self.framing {
                Framing::Length(_) => self.done = true,
                Framing::Chunked => self.chunk_end()?,
                Framing::None => {}
            }
        }
        Ok(n)
    }
}

/// A response body.
pub(crate) enum Payload {
    Bytes(Vec<u8>),
    /// `len` bytes of `file` from `offset`.
    File {
        file: File,
        offset: u64,
        len: u64,
    },
}

/// A response.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(&'static str, String)>,
    pub(crate) payload: Payload,
}

impl Response {
    pub(crate) fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            headers: vec![("Content-Type", "application/json".to_owned())],
            payload: Payload::Bytes(value.to_string().into_bytes()),
        }
    }

    /// `{"success": false, "message": …}`
    pub(crate) fn error(status: u16, message: impl Into<String>) -> Self {
        Response::json(
            status,
            &serde_json::json!({"success": false, "message": message.into()}),
        )
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn len(&self) -> u64 {
        match &self.payload {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    /// Writes the response; the body is left out for HEAD requests.
    pub(crate) fn write_to(
        self,
        out: &mut impl Write,
        head_only: bool,
        keep_alive: bool,
    ) -> io::Result<()> {
        let mut text = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        text.push_str(&format!(
            "Date: {}\r\n",
            httpdate::fmt_http_date(SystemTime::now())
        ));
        text.push_str("Server: echomimic-tempfile\r\n");
        text.push_str(&format!("Content-Length: {}\r\n", self.len()));
        text.push_str(if keep_alive {
            "Connection: keep-alive\r\n"
        } else {
            "Connection: close\r\n"
        });
        for (name, value) in &self.headers {
            // Values are built by this server; strip CR/LF anyway so no header can be injected.
            let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        out.write_all(text.as_bytes())?;
        if !head_only {
            match self.payload {
                Payload::Bytes(b) => out.write_all(&b)?,
                Payload::File {
                    mut file,
                    offset,
                    len,
                } => {
                    file.seek(SeekFrom::Start(offset))?;
                    let copied = io::copy(&mut file.take(len), out)?;
                    if copied != len {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "file shrank while being sent",
                        ));
                    }
                }
            }
        }
        out.flush()
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// A parsed single `Range: bytes=` request, resolved against a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeRequest {
    /// No usable Range header: send everything (multi-range and malformed ones land here too).
    Full,
    /// Send `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// Resolves a `Range` header value for a representation of `len` bytes (RFC 9110 §14).
pub(crate) fn parse_range(value: Option<&str>, len: u64) -> RangeRequest {
    let Some(value) = value else {
        return RangeRequest::Full;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start: len.saturating_sub(n),
                    end: len - 1,
                }
            }
        }
        (false, Some(start), last_num) => {
            if !last.trim().is_empty() && last_num.is_none() {
                return RangeRequest::Full;
            }
            if start >= len {
                return RangeRequest::Unsatisfiable;
            }
            let end = last_num.map_or(len - 1, |e| e.min(len - 1));
            if end < start {
                return RangeRequest::Full;
            }
            RangeRequest::Partial { start, end }
        }
        _ => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(
            parse_range(Some("bytes=0-4"), 10),
            Partial { start: 0, end: 4 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-"), 10),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-3"), 10),
            Partial { start: 7, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=-30"), 10),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=5-100"), 10),
            Partial { start: 5, end: 9 }
        );
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=a-b"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    fn head(text: &str) -> Result<Head, HeadError> {
        read_head(&mut io::Cursor::new(text.as_bytes().to_vec()))
    }

    #[test]
    fn heads() {
        let h = head("\r\nPOST /api/x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nExpect: 100-continue\r\n\r\n").unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/api/x");
        assert_eq!(h.query, "y=1");
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.expects_continue);
        assert!(h.wants_keep_alive());
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!h.wants_keep_alive());
        let h = head("GET / HTTP/1.1\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        assert!(!h.wants_keep_alive());
        assert_eq!(h.framing, Framing::Chunked);
        assert!(matches!(head(""), Err(HeadError::Closed)));
        assert!(matches!(
            head("GET / HTTP/2\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(head("GET /\r\n\r\n"), Err(HeadError::Bad(_))));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        assert!(matches!(
            head("GET / HTTP/1.1\r\n folded\r\n\r\n"),
            Err(HeadError::Bad(_))
        ));
        let huge = format!(
            "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(matches!(head(&huge), Err(HeadError::TooLarge)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: 1\r\n")).collect();
        assert!(matches!(
            head(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::TooLarge)
        ));
    }
}
