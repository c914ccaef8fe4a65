//! Client behaviour against scripted fake servers (retries, resume, refusals) and the real one
//! (size cap).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use echomimic_tempfile::{ClientConfig, RetryPolicy, TempfileClient, TempfileError};

/// One scripted answer: raw bytes to write back (the connection is closed afterwards).
type Script = Vec<Vec<u8>>;

/// Request lines and headers the fake server saw.
type Seen = Arc<Mutex<Vec<String>>>;

/// Serves one scripted answer per connection, in order, then stops.
fn fake_server(script: Script) -> (SocketAddr, Seen, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen2 = Arc::clone(&seen);
    let handle = std::thread::spawn(move || {
        for answer in script {
            let (stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let lower = head.to_ascii_lowercase();
            let len: usize = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            let mut w = stream.try_clone().unwrap();
            if lower.contains("expect: 100-continue") {
                w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            seen2.lock().unwrap().push(head);
            let _ = w.write_all(&answer);
            let _ = w.flush();
        }
    });
    (addr, seen, handle)
}

fn reply(status: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

fn fast_client(addr: SocketAddr, attempts: u32) -> TempfileClient {
    let mut cfg = ClientConfig::new(format!("http://{addr}"));
    cfg.retry = RetryPolicy {
        max_attempts: attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        outage: Duration::ZERO,
    };
    cfg.read_timeout = Duration::from_secs(5);
    TempfileClient::with_config(cfg).unwrap()
}

const ID: &str = "550e8400-e29b-41d4-a716-446655440000";

#[test]
fn download_retries_5xx_then_succeeds() -> TestResult {
    let (addr, seen, h) = fake_server(vec![
        reply(
            "503 Service Unavailable",
            "",
            b"{\"success\":false,\"message\":\"busy\"}",
        ),
        reply("500 Internal Server Error", "", b"oops"),
        reply("200 OK", "Content-Type: video/mp4\r\n", b"the video bytes"),
    ]);
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("v.mp4");
    let got = fast_client(addr, 4).download_to(ID, &dest, 1000)?;
    h.join().unwrap();
    assert_eq!(got.bytes, 15);
    assert_eq!(got.content_type.as_deref(), Some("video/mp4"));
    assert_eq!(std::fs::read(&dest)?, b"the video bytes");
    assert_eq!(seen.lock().unwrap().len(), 3);
    Ok(())
}

#[test]
fn retries_stop_at_the_attempt_limit() -> TestResult {
    let (addr, seen, h) = fake_server(vec![reply("502 Bad Gateway", "", b"x"); 3]);
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("v.mp4");
    let err = fast_client(addr, 3)
        .download_to(ID, &dest, 1000)
        .unwrap_err();
    h.join().unwrap();
    assert!(
        matches!(err, TempfileError::Status { status: 502, .. }),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert!(!dest.exists());
    assert!(!dir.path().join(".v.mp4.part").exists());
    Ok(())
}

#[test]
fn not_found_is_not_retried() -> TestResult {
    let (addr, seen, h) = fake_server(vec![reply(
        "404 Not Found",
        "",
        b"{\"success\":false,\"message\":\"file not found\"}",
    )]);
    let dir = tempfile::tempdir()?;
    let err = fast_client(addr, 5)
        .download_to(ID, &dir.path().join("v.mp4"), 1000)
        .unwrap_err();
    h.join().unwrap();
    assert!(
        matches!(err, TempfileError::NotFound { ref file_id } if file_id == ID),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    Ok(())
}

#[test]
fn interrupted_download_resumes_with_a_range_request() -> TestResult {
    let full: Vec<u8> = (0..200u8).collect();
    // First answer promises 200 bytes but the connection drops after 120.
    let mut cut = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", full.len()).into_bytes();
    cut.extend_from_slice(&full[..120]);
    let rest = reply(
        "206 Partial Content",
        &format!("Content-Range: bytes 120-199/{}\r\n", full.len()),
        &full[120..],
    );
    let (addr, seen, h) = fake_server(vec![cut, rest]);
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("v.mp4");
    let got = fast_client(addr, 3).download_to(ID, &dest, 1000)?;
    h.join().unwrap();
    assert_eq!(got.bytes, 200);
    assert_eq!(std::fs::read(&dest)?, full);
    let seen = seen.lock().unwrap();
    assert!(!seen[0].to_ascii_lowercase().contains("range:"));
    assert!(
        seen[1].to_ascii_lowercase().contains("range: bytes=120-"),
        "{}",
        seen[1]
    );
    Ok(())
}

#[test]
fn upload_retries_on_5xx_and_surfaces_refusals() -> TestResult {
    let ok = br#"{"success":true,"file_id":"550e8400-e29b-41d4-a716-446655440000","file_type":"video","original_name":"out.mp4"}"#;
    let (addr, seen, h) = fake_server(vec![
        reply(
            "500 Internal Server Error",
            "",
            b"{\"success\":false,\"message\":\"disk hiccup\"}",
        ),
        reply("200 OK", "Content-Type: application/json\r\n", ok),
        reply(
            "200 OK",
            "",
            b"{\"success\":false,\"message\":\"quota exceeded\"}",
        ),
        reply(
            "400 Bad Request",
            "",
            b"{\"success\":false,\"message\":\"file type not allowed\"}",
        ),
        reply("200 OK", "", b"<html>not json</html>"),
    ]);
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("out.mp4");
    std::fs::write(&src, b"\0\0\0\x20ftypisom")?;
    let c = fast_client(addr, 3);
    let up = c.upload_file(&src)?;
    assert_eq!(up.file_id, ID);
    assert_eq!(up.original_name, "out.mp4");
    match c.upload_file(&src).unwrap_err() {
        e @ TempfileError::Refused { .. } => {
            assert!(e.to_string().contains("quota exceeded"));
            assert!(!e.is_retryable());
        }
        other => panic!("unexpected {other}"),
    }
    match c.upload_file(&src).unwrap_err() {
        TempfileError::Status {
            status: 400,
            message,
            ..
        } => assert_eq!(message, "file type not allowed"),
        other => panic!("unexpected {other}"),
    }
    assert!(matches!(
        c.upload_file(&src).unwrap_err(),
        TempfileError::Decode { .. }
    ));
    h.join().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5);
    assert!(seen[1].contains("multipart/form-data; boundary="));
    Ok(())
}

#[test]
fn connection_refused_is_retried_then_reported() -> TestResult {
    // A port with nobody listening.
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let err = fast_client(addr, 3)
        .download_to(ID, &dir.path().join("x"), 10)
        .unwrap_err();
    assert!(matches!(err, TempfileError::Transport { .. }), "{err}");
    assert!(err.is_retryable());
    // Two pauses of at least 5 ms and 10 ms.
    assert!(started.elapsed() >= Duration::from_millis(15));
    Ok(())
}

#[test]
fn download_size_cap_deletes_the_partial_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(&dir.path().join("s"), |_| {});
    let c = TempfileClient::new(server.base_url())?;
    let src = dir.path().join("a.png");
    std::fs::write(&src, png_bytes(10_000))?;
    let id = c.upload_file(&src)?.file_id;
    let dest = dir.path().join("b.png");
    let err = c.download_to(&id, &dest, 5_000).unwrap_err();
    assert!(
        matches!(err, TempfileError::TooLarge { limit: 5000, .. }),
        "{err}"
    );
    assert!(!dest.exists() && !dir.path().join(".b.png.part").exists());

    // Without a Content-Length the cap is enforced while streaming.
    let mut body = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
    body.extend_from_slice(&[7u8; 20_000]);
    let (addr, _, h) = fake_server(vec![body]);
    let err = fast_client(addr, 1)
        .download_to(ID, &dest, 5_000)
        .unwrap_err();
    h.join().unwrap();
    assert!(matches!(err, TempfileError::TooLarge { .. }), "{err}");
    assert!(!dest.exists() && !dir.path().join(".b.png.part").exists());
    Ok(())
}

#[test]
fn delete_reports_not_found() -> TestResult {
    let (addr, seen, h) = fake_server(vec![
        reply(
            "200 OK",
            "",
            b"{\"success\":true,\"message\":\"file deleted\"}",
        ),
        reply(
            "404 Not Found",
            "",
            b"{\"success\":false,\"message\":\"file not found\"}",
        ),
        reply("200 OK", "", b"{\"success\":true,\"deleted_count\":2}"),
    ]);
    let c = fast_client(addr, 3);
    c.delete(ID)?;
    assert!(matches!(c.delete(ID), Err(TempfileError::NotFound { .. })));
    assert_eq!(c.batch_delete(&[ID, ID])?, 2);
    h.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen[0].starts_with(&format!("DELETE /api/tempfile/delete/{ID} ")));
    assert!(seen[2].starts_with("POST /api/tempfile/batch-delete "));
    assert!(matches!(
        c.delete("../x"),
        Err(TempfileError::InvalidFileId(_))
    ));
    Ok(())
}

/// A download that never ends on its own: one byte every 100 ms.
fn trickling_server() -> SocketAddr {
    echomimic_testkit::peers::stalling_http_peer(Some(Duration::from_millis(100)))
}

#[test]
fn a_trickling_download_ends_at_the_transfer_deadline_and_leaves_no_file() -> TestResult {
    let addr = trickling_server();
    let client = TempfileClient::with_config(ClientConfig {
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
            outage: Duration::ZERO,
        },
        transfer_deadline: Duration::from_millis(1500),
        ..ClientConfig::new(format!("http://{addr}"))
    })?;
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("photo.png");
    let t = Instant::now();
    let err = client
        .download_to("slow.png", &dest, 10_000_000)
        .expect_err("the peer never finishes");
    let took = t.elapsed();
    assert!(
        matches!(
            err,
            TempfileError::DeadlineExceeded {
                what: "download",
                secs: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "took {took:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        0,
        "no partial file is left"
    );
    Ok(())
}

#[test]
fn a_stop_check_cancels_a_running_download_at_the_next_chunk() -> TestResult {
    let addr = trickling_server();
    let client = TempfileClient::new(format!("http://{addr}"))?;
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("photo.png");
    let t = Instant::now();
    let stop = || t.elapsed() >= Duration::from_millis(500);
    let err = client
        .download_to_unless("slow.png", &dest, 10_000_000, &stop)
        .expect_err("cancelled");
    let took = t.elapsed();
    assert!(
        matches!(err, TempfileError::Cancelled { what: "download" }),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        0,
        "no partial file is left"
    );
    // Asked before the first attempt: nothing is requested at all.
    let err = client
        .download_to_unless("slow.png", &dest, 10_000_000, &|| true)
        .expect_err("cancelled");
    assert!(matches!(err, TempfileError::Cancelled { .. }), "{err}");
    Ok(())
}

#[test]
fn an_outage_is_ridden_out_past_the_attempts_until_its_budget() -> TestResult {
    // A port nobody listens on for now.
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let client = |outage: Duration| {
        let mut cfg = ClientConfig::new(format!("http://{addr}"));
        cfg.retry = RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            outage,
        };
        TempfileClient::with_config(cfg).unwrap()
    };
    let dir = tempfile::tempdir()?;
    let dest = dir.path().join("v.mp4");

    // Budget 0.5 s: connection refused until it is spent, then the error.
    let t = Instant::now();
    let err = client(Duration::from_millis(500))
        .download_to(ID, &dest, 1000)
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Budget 30 s: the server comes up after 1.5 s (well past the two attempts) and serves.
    let up = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        let listener = TcpListener::bind(addr).expect("rebind the port");
        let (mut s, _) = listener.accept().expect("accept");
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        while r.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        s.write_all(&reply(
            "200 OK",
            "Content-Type: video/mp4\r\n",
            b"after the outage",
        ))
        .unwrap();
    });
    let t = Instant::now();
    let got = client(Duration::from_secs(30)).download_to(ID, &dest, 1000)?;
    up.join().unwrap();
    assert_eq!(got.bytes, 16);
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    // Without a budget the same outage fails after the two attempts.
    let t = Instant::now();
    assert!(client(Duration::ZERO).download_to(ID, &dest, 1000).is_err());
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    Ok(())
}
