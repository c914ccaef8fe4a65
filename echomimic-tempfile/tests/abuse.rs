//! The server under abuse: slow clients (slowloris heads, trickled bodies), more connections
//! than its cap, and uploads past its storage quota or free-space floor.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{files_under, png_bytes, raw, read_response, start, upload_request, TestResult};

/// Opens a connection that has sent the start of a request head and nothing more.
fn slow_socket(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\n")
        .expect("write");
    s
}

/// True once the server has closed `s` (EOF, reset, or a final response and then EOF).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn upload_and_download(addr: SocketAddr, content: &[u8]) -> Result<(), String> {
    let resp = raw(addr, &upload_request(b"face.png", content));
    if resp.status != 200 {
        return Err(format!("upload: {} {:?}", resp.status, resp.json()));
    }
    let id = resp.json()["file_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let got = raw(
        addr,
        format!("GET /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    if got.status != 200 || got.body != content {
        return Err(format!(
            "download: {} ({} bytes)",
            got.status,
            got.body.len()
        ));
    }
    Ok(())
}

#[test]
fn hundreds_of_slow_sockets_leave_honest_clients_served_and_are_cut_at_the_head_deadline(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let header_timeout = Duration::from_secs(3);
    let server = start(dir.path(), |c| {
        c.max_connections = 512;
        c.header_timeout = header_timeout;
    });
    let addr = server.addr();
    let opened = Instant::now();
    let mut slow: Vec<TcpStream> = (0..256).map(|_| slow_socket(addr)).collect();
    // Keep every slow socket alive with one header byte each 100 ms, round-robin.
    let stop = Arc::new(AtomicBool::new(false));
    let drip = {
        let stop = Arc::clone(&stop);
        let mut socks: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &mut socks {
                    let _ = s.write_all(b"x");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Honest clients, while every slow socket is open and dripping.
    let content = png_bytes(200_000);
    for i in 0..5 {
        let t = Instant::now();
        upload_and_download(addr, &content).map_err(|e| format!("honest client {i}: {e}"))?;
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "honest client {i} took {:?} beside 256 slow sockets",
            t.elapsed()
        );
    }
    assert!(
        opened.elapsed() < header_timeout,
        "the honest clients must have run while the slow sockets were all open"
    );
    // Past the head deadline every slow socket is closed by the server although it still sends.
    let wait = header_timeout + Duration::from_secs(2);
    let mut open_left = slow.len();
    while opened.elapsed() < wait + Duration::from_secs(5) {
        open_left = slow
            .iter_mut()
            .map(closed_by_server)
            .filter(|closed| !closed)
            .count();
        if open_left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    drip.join().unwrap();
    assert_eq!(
        open_left,
        0,
        "slow sockets still open {:?} after they connected (head deadline {header_timeout:?})",
        opened.elapsed()
    );
    Ok(())
}

#[test]
fn a_connection_over_the_cap_is_answered_503_at_once_and_served_when_one_frees() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |c| c.max_connections = 4);
    let addr = server.addr();
    let idle: Vec<TcpStream> = (0..4).map(|_| slow_socket(addr)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let resp = raw(addr, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(resp.status, 503, "{:?}", resp.json());
    assert_eq!(resp.header("retry-after"), Some("1"));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    drop(idle);
    // The freed slots are served again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let resp = raw(
            addr,
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        if resp.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after the idle sockets closed",
            resp.status
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn an_upload_trickled_below_the_minimum_rate_gets_408_and_leaves_no_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |c| {
        c.min_body_rate = 50_000;
        c.body_grace = Duration::from_millis(500);
    });
    let request = upload_request(b"face.png", &png_bytes(1_000_000));
    let split = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end")
        + 4;
    let mut s = TcpStream::connect(server.addr())?;
    s.write_all(&request[..split])?;
    let mut writer = s.try_clone()?;
    let body = request[split..].to_vec();
    let trickle = std::thread::spawn(move || {
        // 100 bytes every 50 ms: 2 kB/s against 50 kB/s required.
        for chunk in body.chunks(100).take(200) {
            if writer.write_all(chunk).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let t = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let resp = read_response(&mut s, false);
    assert_eq!(resp.status, 408, "{:?}", resp.json());
    assert!(
        resp.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("50000 bytes/s"),
        "{:?}",
        resp.json()
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(s);
    trickle.join().unwrap();
    assert_eq!(files_under(dir.path()), Vec::<String>::new());
    Ok(())
}

/// A chunked upload of `content` (no declared length); returns the response.
fn chunked_upload(addr: SocketAddr, content: &[u8]) -> common::RawResponse {
    let full = upload_request(b"face.png", content);
    let split = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &full[split..];
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = "POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\n\
                Content-Type: multipart/form-data; boundary=XBOUNDARYx\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let mut out = head.as_bytes().to_vec();
    for chunk in body.chunks(16 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    // The server may answer (and stop reading) before the whole body is sent.
    let _ = s.write_all(&out);
    read_response(&mut s, false)
}

fn leftovers(dir: &Path) -> Vec<String> {
    files_under(&dir.join("tmp"))
}

#[test]
fn uploads_past_the_quota_get_507_and_leave_no_partial_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let quota = 1_000_000;
    let start_server = || start(dir.path(), |c| c.quota_bytes = Some(quota));
    let server = start_server();
    let addr = server.addr();
    let content = png_bytes(600_000);
    let first = raw(addr, &upload_request(b"a.png", &content));
    assert_eq!(first.status, 200);
    let first_id = first.json()["file_id"].as_str().unwrap().to_owned();

    // Declared length: refused before the body is read.
    let refused = raw(addr, &upload_request(b"b.png", &content));
    assert_eq!(refused.status, 507, "{:?}", refused.json());
    let message = refused.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("quota"), "{message}");
    // No declared length: refused as it passes the quota, the partial file removed.
    let refused = chunked_upload(addr, &content);
    assert_eq!(refused.status, 507, "{:?}", refused.json());
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    assert_eq!(files_under(&dir.path().join("files")).len(), 1);

    // The stored bytes are counted again after a restart.
    drop(server);
    let server = start_server();
    let addr = server.addr();
    assert_eq!(raw(addr, &upload_request(b"c.png", &content)).status, 507);

    // Deleting frees the space.
    let del = raw(
        addr,
        format!("DELETE /api/tempfile/delete/{first_id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(del.status, 200);
    let again = chunked_upload(addr, &content);
    assert_eq!(again.status, 200, "{:?}", again.json());
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    Ok(())
}

#[test]
fn the_free_space_floor_refuses_uploads_with_507() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |c| c.min_free_bytes = u64::MAX / 4);
    let resp = raw(server.addr(), &upload_request(b"a.png", &png_bytes(10_000)));
    assert_eq!(resp.status, 507, "{:?}", resp.json());
    let message = resp.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("disk is full"), "{message}");
    let resp = chunked_upload(server.addr(), &png_bytes(10_000));
    assert_eq!(resp.status, 507, "{:?}", resp.json());
    assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    // Downloads and health are unaffected.
    assert_eq!(
        raw(
            server.addr(),
            b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .status,
        200
    );
    Ok(())
}
