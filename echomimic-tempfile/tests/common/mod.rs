//! Shared helpers: an in-process server on a loopback port, raw HTTP requests, test files.
#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use echomimic_tempfile::{Server, ServerConfig};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A server on 127.0.0.1:0 storing under `dir`, after `tweak` adjusted its config.
pub fn start(dir: &Path, tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig::new(dir);
    config.listen = "127.0.0.1:0".into();
    config.max_connections = 16;
    // The test machine's disk is not what these tests are about.
    config.min_free_bytes = 0;
    config.io_timeout = Duration::from_secs(10);
    tweak(&mut config);
    Server::start(config).expect("server starts")
}

/// A PNG header followed by every byte value and boundary-like sequences, `len` bytes long.
pub fn png_bytes(len: usize) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let tricky: &[u8] =
        b"\r\n------echomimic0123\r\n--\r\n\r\nContent-Disposition: form-data; name=\"file\"\r\n";
    let mut i = 0u32;
    while v.len() < len {
        v.extend_from_slice(tricky);
        v.extend((0..=255u8).map(|b| b.wrapping_add(i as u8)));
        i += 1;
    }
    v.truncate(len);
    v
}

/// A parsed raw HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// Reads one response (Content-Length framed) from `stream`; `head_only` for HEAD requests.
pub fn read_response(stream: &mut TcpStream, head_only: bool) -> RawResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read head");
        assert!(
            n > 0,
            "connection closed before the response head; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0u8; if head_only { 0 } else { len }];
    stream.read_exact(&mut body).expect("read body");
    RawResponse {
        status,
        headers,
        body,
    }
}

/// Sends `request` on a new connection and reads one response.
pub fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).expect("write request");
    let head_only = request.starts_with(b"HEAD ");
    read_response(&mut stream, head_only)
}

/// A multipart upload request whose `file` part has the raw `filename` parameter bytes.
pub fn upload_request(filename_param: &[u8], content: &[u8]) -> Vec<u8> {
    let boundary = "XBOUNDARYx";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"")
            .as_bytes(),
    );
    body.extend_from_slice(filename_param);
    body.extend_from_slice(b"\"\r\nContent-Type: application/octet-stream\r\n\r\n");
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut req = format!(
        "POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req
}

/// Paths of all files under `dir`, recursively, relative to it.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}
