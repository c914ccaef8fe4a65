//! The temp-file server over a loopback port, through the client and through raw requests.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use common::*;
use echomimic_tempfile::{FileType, ManualClock, TempfileClient, TempfileError};

fn client(server: &echomimic_tempfile::Server) -> TempfileClient {
    TempfileClient::new(server.base_url()).expect("client")
}

#[test]
fn upload_download_round_trip_is_byte_exact() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(&dir.path().join("store"), |_| {});
    let c = client(&server);
    let data = png_bytes(1_500_000);
    let src = dir.path().join("face.png");
    std::fs::write(&src, &data)?;

    let up = c.upload_file(&src)?;
    assert_eq!(up.file_type, FileType::Image);
    assert_eq!(up.original_name, "face.png");
    assert_eq!(up.size, Some(data.len() as u64));
    assert_eq!(up.file_id.len(), 36);
    assert_eq!(uuid::Uuid::parse_str(&up.file_id)?.get_version_num(), 4);

    let dest = dir.path().join("out.png");
    let got = c.download_to(&up.file_id, &dest, 10_000_000)?;
    assert_eq!(got.bytes, data.len() as u64);
    assert_eq!(got.content_type.as_deref(), Some("image/png"));
    assert_eq!(std::fs::read(&dest)?, data);
    assert!(!dir.path().join(".out.png.part").exists());
    Ok(())
}

#[test]
fn download_headers_and_non_ascii_names() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    let src = dir.path().join("in.wav");
    std::fs::write(&src, b"RIFF\x24\0\0\0WAVEfmt \x10\0\0\0")?;
    let up = client(&server).upload_file_as(&src, "语音 1.wav")?;
    assert_eq!(up.original_name, "语音 1.wav");
    assert_eq!(up.file_type, FileType::Audio);
    let r = raw(
        server.addr(),
        format!(
            "GET /api/tempfile/download/{} HTTP/1.1\r\nHost: t\r\n\r\n",
            up.file_id
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("audio/wav"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"__ 1.wav\"; filename*=UTF-8''%E8%AF%AD%E9%9F%B3%201.wav")
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.body.len(), 20);
    Ok(())
}

#[test]
fn range_requests() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    let data = png_bytes(1000);
    let src = dir.path().join("a.png");
    std::fs::write(&src, &data)?;
    let id = client(&server).upload_file(&src)?.file_id;
    let get = |range: &str| {
        raw(
            server.addr(),
            format!(
                "GET /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\nRange: {range}\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    let r = get("bytes=2-5");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 2-5/1000"));
    assert_eq!(r.body, &data[2..=5]);
    let r = get("bytes=990-");
    assert_eq!((r.status, r.body.as_slice()), (206, &data[990..]));
    let r = get("bytes=-10");
    assert_eq!((r.status, r.body.as_slice()), (206, &data[990..]));
    let r = get("bytes=1000-");
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));
    assert_eq!(r.json()["success"], false);
    let r = get("bytes=0-1,5-6");
    assert_eq!((r.status, r.body.len()), (200, 1000));
    let r = raw(
        server.addr(),
        format!("HEAD /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert!(r.body.is_empty());
    Ok(())
}

#[test]
fn unknown_ids_are_404_json() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    for path in [
        format!("/api/tempfile/download/{}", uuid::Uuid::new_v4()),
        "/api/tempfile/download/not-a-uuid".into(),
        "/api/tempfile/download/..%2f..%2fetc%2fpasswd".into(),
        "/api/tempfile/download/../../etc/passwd".into(),
        "/api/tempfile/download/".into(),
    ] {
        let r = raw(
            server.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        );
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.json()["success"], false);
        assert!(r.json()["message"].is_string());
    }
    let dest = dir.path().join("x.png");
    let err = client(&server)
        .download_to(&uuid::Uuid::new_v4().to_string(), &dest, 1000)
        .unwrap_err();
    assert!(matches!(err, TempfileError::NotFound { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(!dest.exists());
    Ok(())
}

#[test]
fn bad_extension_and_content_mismatch_are_400() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(&dir.path().join("s"), |_| {});
    let jpeg = b"\xff\xd8\xff\xe0\0\x10JFIF\0".to_vec();
    let cases: &[(&[u8], &[u8], &str)] = &[
        (b"evil.exe", b"MZ\x90\0", "not allowed"),
        (b"page.html", b"<html>", "not allowed"),
        (b"noext", &jpeg, "no extension"),
        (b"photo.png", b"plain text, not an image", "not a .png file"),
        (
            b"speech.wav",
            b"MZ\x90\0\x03\0\0\0\x04\0",
            "not a .wav file",
        ),
        (b"speech.mp3", &jpeg, "not an accepted audio format"),
        (b"clip.mp4", &jpeg, "not a .mp4 file"),
        (
            b"iphone.jpg",
            b"\0\0\0\x18ftypheic\0\0\0\0mif1heic",
            "HEIC/HEIF photo",
        ),
        (
            b"photo.png",
            b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf",
            "AVIF photo, which is not accepted: convert it to JPEG or PNG",
        ),
        (b"empty.png", b"", "empty"),
    ];
    for (name, content, needle) in cases {
        let r = raw(server.addr(), &upload_request(name, content));
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(name));
        let msg = r.json()["message"].as_str().unwrap_or("").to_owned();
        assert!(
            msg.contains(needle),
            "{}: {msg}",
            String::from_utf8_lossy(name)
        );
    }
    // Nothing was kept, not even temporary files.
    assert_eq!(files_under(&dir.path().join("s")), Vec::<String>::new());
    // The client surfaces the server's message.
    let src = dir.path().join("fake.png");
    std::fs::write(&src, b"plain text")?;
    match client(&server).upload_file(&src).unwrap_err() {
        TempfileError::Status {
            status: 400,
            message,
            ..
        } => assert!(message.contains("not a .png file")),
        other => panic!("unexpected {other}"),
    }
    Ok(())
}

/// A file whose content is another accepted format of the kind its name says is stored and
/// served under its true type, with the name kept as sent. `echomimic_a.png` is the
/// reference's own sample photo, a JPEG named `.png`.
#[test]
fn misnamed_files_are_served_under_their_true_type() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(&dir.path().join("s"), |_| {});
    let c = client(&server);
    let photo = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/inputs/echomimic_a.png"),
    )?;
    let wav = b"RIFF\x24\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0".to_vec();
    let cases: &[(&str, &[u8], FileType, &str)] = &[
        ("a.png", &photo, FileType::Image, "image/jpeg"),
        ("speech.mp3", &wav, FileType::Audio, "audio/wav"),
        ("voice.ogg", &wav, FileType::Audio, "audio/wav"),
    ];
    for (name, content, file_type, content_type) in cases {
        let src = dir.path().join("upload.bin");
        std::fs::write(&src, content)?;
        let up = c.upload_file_as(&src, name)?;
        assert_eq!(up.original_name, *name);
        assert_eq!(up.file_type, *file_type);
        let r = raw(
            server.addr(),
            format!(
                "GET /api/tempfile/download/{} HTTP/1.1\r\nHost: t\r\n\r\n",
                up.file_id
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "{name}");
        assert_eq!(r.header("content-type"), Some(*content_type), "{name}");
        assert_eq!(
            r.header("content-disposition"),
            Some(format!("attachment; filename=\"{name}\"").as_str())
        );
        assert_eq!(r.body, *content, "{name}");
    }
    Ok(())
}

#[test]
fn oversize_uploads_are_413_and_leave_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("s");
    let server = start(&store, |c| c.max_upload_bytes = 100_000);
    // Through the client (declared length over the limit: refused before the body is sent).
    let src = dir.path().join("big.png");
    std::fs::write(&src, png_bytes(300_000))?;
    match client(&server).upload_file(&src).unwrap_err() {
        e @ TempfileError::Status { status: 413, .. } => assert!(!e.is_retryable()),
        other => panic!("unexpected {other}"),
    }
    // Chunked, so the size is only known while streaming.
    let content = png_bytes(150_000);
    let plain = upload_request(b"big.png", &content);
    let split = plain.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &plain[split..];
    let mut req = b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=XBOUNDARYx\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.chunks(7000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let r = raw(server.addr(), &req);
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["success"], false);
    // Exactly at the limit is fine.
    let ok = raw(
        server.addr(),
        &upload_request(b"ok.png", &png_bytes(100_000)),
    );
    assert_eq!(ok.status, 200, "{:?}", ok.json());
    assert_eq!(files_under(&store).len(), 2, "{:?}", files_under(&store)); // one data file + its metadata
    Ok(())
}

#[test]
fn absurd_content_length_does_not_hurt_the_server() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    for req in [
        "GET /nothing HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\nabc",
        "POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000000000\r\n\r\n--b\r\n",
        "POST /api/tempfile/batch-delete HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n{",
    ] {
        let r = raw(server.addr(), req.as_bytes());
        assert!(r.status == 404 || r.status == 413, "{req}: {}", r.status);
    }
    let r = raw(server.addr(), b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    Ok(())
}

#[test]
fn traversal_attempts_in_names_stay_inside_the_store() -> TestResult {
    let root = tempfile::tempdir()?;
    let store = root.path().join("store");
    let server = start(&store, |_| {});
    let png = png_bytes(64);
    let cases: &[(&[u8], &str)] = &[
        (b"../../etc/passwd.png", "passwd.png"),
        (b"/etc/passwd.png", "passwd.png"),
        (b"..\\\\..\\\\windows\\\\system.png", "system.png"),
        (b"C:\\\\temp\\\\x.png", "x.png"),
        (b"a\0b.png", "ab.png"),
        (b"..png", "png"), // no extension left: refused below
    ];
    for (name, expected) in cases {
        let r = raw(server.addr(), &upload_request(name, &png));
        if *expected == "png" {
            assert_eq!(r.status, 400);
            continue;
        }
        assert_eq!(
            r.status,
            200,
            "{}: {:?}",
            String::from_utf8_lossy(name),
            r.json()
        );
        assert_eq!(r.json()["original_name"], *expected);
        let id = r.json()["file_id"].as_str().unwrap().to_owned();
        let d = raw(
            server.addr(),
            format!("GET /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
        );
        assert_eq!(d.body, png);
    }
    // Only UUID-named files under the store, nothing next to it.
    for f in files_under(&store) {
        let name = f.rsplit('/').next().unwrap().trim_end_matches(".json");
        assert!(uuid::Uuid::parse_str(name).is_ok(), "{f}");
    }
    assert_eq!(files_under(root.path()).len(), files_under(&store).len());
    Ok(())
}

#[test]
fn restart_keeps_ids_valid() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("s");
    let data = png_bytes(5000);
    let src = dir.path().join("a.png");
    std::fs::write(&src, &data)?;
    let server = start(&store, |_| {});
    let id = client(&server).upload_file(&src)?.file_id;
    server.shutdown();
    // Debris of an interrupted upload is cleaned at start-up.
    std::fs::write(store.join("tmp").join("junk.part"), b"x")?;
    std::fs::write(
        store.join("files").join(uuid::Uuid::new_v4().to_string()),
        b"orphan",
    )?;

    let server = start(&store, |_| {});
    let dest = dir.path().join("b.png");
    client(&server).download_to(&id, &dest, 1 << 20)?;
    assert_eq!(std::fs::read(&dest)?, data);
    assert_eq!(files_under(&store).len(), 2, "{:?}", files_under(&store));
    Ok(())
}

#[test]
fn expired_files_are_404_and_swept() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("s");
    let clock = ManualClock::new(SystemTime::now());
    let server = start(&store, |c| c.clock = clock.clone().into());
    let c = client(&server);
    let src = dir.path().join("a.png");
    std::fs::write(&src, png_bytes(100))?;
    let first = c.upload_file(&src)?.file_id;
    let second = c.upload_file(&src)?.file_id;
    clock.advance(Duration::from_secs(23 * 3600));
    let third = c.upload_file(&src)?.file_id;
    let dest = dir.path().join("o.png");
    c.download_to(&first, &dest, 1000)?;

    clock.advance(Duration::from_secs(3600));
    // Expiry on access.
    assert!(matches!(
        c.download_to(&first, &dest, 1000),
        Err(TempfileError::NotFound { .. })
    ));
    // The sweep removes the other expired one from disk; the young one stays.
    assert_eq!(server.sweep_now(), 1);
    assert!(matches!(
        c.download_to(&second, &dest, 1000),
        Err(TempfileError::NotFound { .. })
    ));
    c.download_to(&third, &dest, 1000)?;
    assert_eq!(files_under(&store).len(), 2);
    server.shutdown();

    // An expired file is dropped at start-up too.
    clock.advance(Duration::from_secs(24 * 3600));
    let server = start(&store, |c| c.clock = clock.clone().into());
    assert!(files_under(&store).is_empty());
    assert!(matches!(
        client(&server).download_to(&third, &dest, 1000),
        Err(TempfileError::NotFound { .. })
    ));
    Ok(())
}

#[test]
fn delete_and_batch_delete() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("s");
    let server = start(&store, |_| {});
    let c = client(&server);
    let src = dir.path().join("a.png");
    std::fs::write(&src, png_bytes(100))?;
    let ids: Vec<String> = (0..3)
        .map(|_| c.upload_file(&src).map(|u| u.file_id))
        .collect::<Result<_, _>>()?;
    c.delete(&ids[0])?;
    assert!(matches!(
        c.delete(&ids[0]),
        Err(TempfileError::NotFound { .. })
    ));
    let dest = dir.path().join("o.png");
    assert!(matches!(
        c.download_to(&ids[0], &dest, 1000),
        Err(TempfileError::NotFound { .. })
    ));
    let unknown = uuid::Uuid::new_v4().to_string();
    let n = c.batch_delete(&[&ids[0], &ids[1], &ids[2], &unknown, "not-a-uuid"])?;
    assert_eq!(n, 2);
    assert!(files_under(&store).is_empty());
    let r = raw(server.addr(), b"POST /api/tempfile/batch-delete HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{\"ids\":1}");
    assert_eq!(r.status, 400);
    Ok(())
}

#[test]
fn chunked_upload_with_other_fields_and_keep_alive() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    let content = png_bytes(20_000);
    let mut body =
        b"--BB\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n".to_vec();
    body.extend_from_slice(
        b"--BB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n\r\n",
    );
    body.extend_from_slice(&content);
    body.extend_from_slice(b"\r\n--BB--\r\n");
    let mut req = b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=BB\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.chunks(999) {
        req.extend_from_slice(format!("{:X};ext=1\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\nX-Trailer: 1\r\n\r\n");
    let mut stream = TcpStream::connect(server.addr())?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&req)?;
    let r = read_response(&mut stream, false);
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.header("connection"), Some("keep-alive"));
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    // Second request on the same connection.
    stream.write_all(
        format!("GET /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
    )?;
    let d = read_response(&mut stream, false);
    assert_eq!(d.body, content);
    Ok(())
}

#[test]
fn malformed_requests() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    let cases: &[(&[u8], u16)] = &[
        (b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 400),
        (b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 44\r\n\r\n--b\r\nContent-Disposition: form-data; name=x\r\n", 400),
        (b"POST /api/tempfile/upload HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 51\r\n\r\n--b\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n--b--", 400),
        (b"GET /api/tempfile/upload HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        (b"PUT /api/tempfile/delete/x HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        (b"GET /elsewhere HTTP/1.1\r\nHost: t\r\n\r\n", 404),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    ];
    for (req, status) in cases {
        let r = raw(server.addr(), req);
        assert_eq!(r.status, *status, "{}", String::from_utf8_lossy(req));
        assert_eq!(r.json()["success"], false);
    }
    let r = raw(
        server.addr(),
        b"GET /api/tempfile/upload HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(r.header("allow"), Some("POST"));
    Ok(())
}

#[test]
fn interrupted_upload_leaves_no_temporary_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("s");
    let server = start(&store, |_| {});
    let full = upload_request(b"a.png", &png_bytes(100_000));
    {
        let mut s = TcpStream::connect(server.addr())?;
        s.write_all(&full[..full.len() / 2])?;
    } // closed mid-body
      // The server handles the connection on its own thread, so the partial file may not exist
      // yet when the client has closed: the store must be found empty and stay empty for a
      // while (a left-over file would be seen within that time and fail the test).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut empty_since: Option<std::time::Instant> = None;
    while std::time::Instant::now() < deadline {
        if files_under(&store).is_empty() {
            let since = *empty_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= Duration::from_millis(500) {
                break;
            }
        } else {
            empty_since = None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(files_under(&store).is_empty(), "{:?}", files_under(&store));
    // And the server still works.
    assert_eq!(raw(server.addr(), &full).status, 200);
    Ok(())
}

#[test]
fn invalid_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = echomimic_tempfile::ServerConfig::new(dir.path());
    cfg.listen = "127.0.0.1:0".into();
    cfg.max_upload_bytes = 0;
    assert!(matches!(
        echomimic_tempfile::Server::start(cfg),
        Err(TempfileError::Config(_))
    ));
    let mut cfg = echomimic_tempfile::ServerConfig::new(dir.path());
    cfg.listen = "256.0.0.1:1".into();
    assert!(matches!(
        echomimic_tempfile::Server::start(cfg),
        Err(TempfileError::Bind { .. })
    ));
}
