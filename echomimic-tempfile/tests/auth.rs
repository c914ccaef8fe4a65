//! Access tokens and signed download links: the server over a loopback port (raw requests and
//! the client), and the binary's `--token`, `--token-file` and `TEMPFILE_TOKEN`.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use echomimic_tempfile::{
    sign_download, ClientConfig, ManualClock, RetryPolicy, TempfileClient, TempfileError, Token,
};

const OLD: &str = "old-token-0123456789abcdef";
const NEW: &str = "new-token-fedcba9876543210";
const WRONG: &str = "wrong-token-00000000000000";

fn token(s: &str) -> Token {
    Token::new(s).unwrap()
}

fn client(base: &str, t: Option<&str>) -> TempfileClient {
    TempfileClient::with_config(ClientConfig::new(base).with_token(t.map(token))).unwrap()
}

/// One request on a new connection, with `Authorization: Bearer <bearer>` when given.
fn request(addr: SocketAddr, method: &str, target: &str, bearer: Option<&str>) -> RawResponse {
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = if target.ends_with("batch-delete") {
        r#"{"file_ids":[]}"#
    } else {
        ""
    };
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    raw(addr, head.as_bytes())
}

/// An upload as raw bytes, with the bearer header added.
fn upload(addr: SocketAddr, bearer: Option<&str>) -> RawResponse {
    let req = upload_request(b"face.png", &png_bytes(300));
    let req = match bearer {
        Some(t) => {
            // after the request line
            let at = req.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            let header = format!("Authorization: Bearer {t}\r\n");
            [&req[..at], header.as_bytes(), &req[at..]].concat()
        }
        None => req,
    };
    raw(addr, &req)
}

fn assert_refused(r: &RawResponse, what: &str) {
    assert_eq!(r.status, 401, "{what}");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"echomimic-tempfile\""),
        "{what}"
    );
    if what.starts_with("HEAD ") {
        assert!(r.body.is_empty(), "{what}");
        return;
    }
    assert_eq!(r.json()["success"], false, "{what}");
    assert_eq!(
        r.json()["message"],
        "missing or invalid access token",
        "{what}"
    );
}

#[test]
fn every_endpoint_but_health_needs_one_of_the_tokens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |c| c.tokens = vec![token(OLD), token(NEW)]);
    let addr = server.addr();
    let id = upload(addr, Some(OLD)).json()["file_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = uuid::Uuid::new_v4().to_string();
    // (method, target, status once authorised)
    let endpoints = [
        ("GET", format!("/api/tempfile/download/{id}"), 200),
        ("HEAD", format!("/api/tempfile/download/{id}"), 200),
        ("DELETE", format!("/api/tempfile/delete/{other}"), 404),
        ("POST", "/api/tempfile/batch-delete".to_owned(), 200),
        ("GET", "/api/tempfile/upload".to_owned(), 405),
        ("GET", "/no/such/endpoint".to_owned(), 404),
    ];
    for (method, target, authorised) in &endpoints {
        let what = format!("{method} {target}");
        assert_refused(&request(addr, method, target, None), &what);
        assert_refused(&request(addr, method, target, Some(WRONG)), &what);
        // A prefix or an extension of a real token is still wrong.
        assert_refused(&request(addr, method, target, Some(&OLD[..20])), &what);
        assert_refused(
            &request(addr, method, target, Some(&format!("{OLD}x"))),
            &what,
        );
        for t in [OLD, NEW] {
            let r = request(addr, method, target, Some(t));
            assert_eq!(r.status, *authorised, "{what} with an accepted token");
        }
    }
    assert_refused(&upload(addr, None), "upload without token");
    assert_refused(&upload(addr, Some(WRONG)), "upload with a wrong token");
    for t in [OLD, NEW] {
        assert_eq!(upload(addr, Some(t)).status, 200, "upload with {t}");
    }
    // Another scheme is not a bearer token.
    let basic = format!(
        "GET /api/tempfile/download/{id} HTTP/1.1\r\nHost: t\r\nAuthorization: Basic {OLD}\r\nConnection: close\r\n\r\n"
    );
    assert_refused(&raw(addr, basic.as_bytes()), "basic auth");
    // /health stays open (load balancers probe it).
    for bearer in [None, Some(WRONG), Some(OLD)] {
        let r = request(addr, "GET", "/health", bearer);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["files"], 3);
    }
    Ok(())
}

#[test]
fn a_server_without_tokens_stays_open() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(dir.path(), |_| {});
    let r = upload(server.addr(), None);
    assert_eq!(r.status, 200);
    let id = r.json()["file_id"].as_str().unwrap().to_owned();
    let target = format!("/api/tempfile/download/{id}");
    assert_eq!(request(server.addr(), "GET", &target, None).status, 200);
    // A token the open server does not know changes nothing.
    assert_eq!(
        request(server.addr(), "GET", &target, Some(WRONG)).status,
        200
    );
    Ok(())
}

#[test]
fn the_client_sends_its_token_and_a_401_is_not_retried() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = start(&dir.path().join("s"), |c| {
        c.tokens = vec![token(OLD), token(NEW)]
    });
    let src = dir.path().join("face.png");
    std::fs::write(&src, png_bytes(2000))?;
    let dest = dir.path().join("got.png");
    for t in [OLD, NEW] {
        let c = client(&server.base_url(), Some(t));
        let up = c.upload_file(&src)?;
        assert_eq!(c.download_to(&up.file_id, &dest, 10_000)?.bytes, 2000);
        c.delete(&up.file_id)?;
        assert_eq!(c.batch_delete(&[&up.file_id])?, 0);
    }
    let id = client(&server.base_url(), Some(NEW))
        .upload_file(&src)?
        .file_id;
    let dest = dir.path().join("refused.png");
    // Retries that would take seconds if a 401 were retried.
    let slow_retries = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(5),
        outage: Duration::ZERO,
    };
    for t in [None, Some(WRONG)] {
        let mut config = ClientConfig::new(server.base_url()).with_token(t.map(token));
        config.retry = slow_retries.clone();
        let c = TempfileClient::with_config(config)?;
        let started = Instant::now();
        let errors = [
            c.upload_file(&src).map(|_| ()),
            c.download_to(&id, &dest, 10_000).map(|_| ()),
            c.delete(&id),
            c.batch_delete(&[&id]).map(|_| ()),
        ];
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a 401 was retried"
        );
        for e in errors {
            let e = e.unwrap_err();
            assert!(matches!(e, TempfileError::Unauthorized { .. }), "{e:?}");
            assert!(!e.is_retryable());
            let text = e.to_string();
            assert!(
                text.contains("TEMPFILE_TOKEN") && text.contains("401"),
                "{text}"
            );
            assert!(!text.contains(WRONG), "the token leaked into {text}");
        }
    }
    assert!(!dest.exists() && !dir.path().join(".refused.png.part").exists());
    Ok(())
}

#[test]
fn signed_links_work_until_they_expire_and_only_for_their_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(SystemTime::now());
    let server = start(dir.path(), |c| {
        c.tokens = vec![token(OLD), token(NEW)];
        c.clock = clock.clone().into();
    });
    let addr = server.addr();
    let upload_id = |t| {
        upload(addr, Some(t)).json()["file_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (id, other) = (upload_id(OLD), upload_id(NEW));
    let path_of = |url: &str| url[server.base_url().len()..].to_owned();

    // Made by the client crate with either accepted token; no Authorization header needed.
    let expires = clock.now() + Duration::from_secs(600);
    for t in [OLD, NEW] {
        let url = client(&server.base_url(), Some(t)).signed_download_url(&id, expires)?;
        let target = path_of(&url);
        assert!(target.starts_with(&format!("/api/tempfile/download/{id}?exp=")));
        let r = request(addr, "GET", &target, None);
        assert_eq!(r.status, 200, "{target}");
        assert_eq!(r.body.len(), 300);
        assert_eq!(request(addr, "HEAD", &target, None).status, 200);
    }
    let url = client(&server.base_url(), Some(NEW)).signed_download_url(&id, expires)?;
    let target = path_of(&url);
    let exp = expires.duration_since(SystemTime::UNIX_EPOCH)?.as_secs();
    let sig = sign_download(&token(NEW), &id, exp);
    assert_eq!(
        target,
        format!("/api/tempfile/download/{id}?exp={exp}&sig={sig}")
    );

    let forbidden = |target: &str, message: &str| {
        let r = request(addr, "GET", target, None);
        assert_eq!(r.status, 403, "{target}");
        assert_eq!(r.json()["message"], message, "{target}");
    };
    // Tampered: another file's id, a later expiry, a signature by an unknown token.
    forbidden(&target.replace(&id, &other), "invalid download link");
    forbidden(
        &format!("/api/tempfile/download/{id}?exp={}&sig={sig}", exp + 3600),
        "invalid download link",
    );
    let foreign = sign_download(&token(WRONG), &id, exp);
    forbidden(
        &format!("/api/tempfile/download/{id}?exp={exp}&sig={foreign}"),
        "invalid download link",
    );
    // Ambiguous (a repeated parameter): not a link at all.
    assert_refused(
        &request(
            addr,
            "GET",
            &format!("/api/tempfile/download/{id}?exp={exp}&sig={sig}&sig={sig}"),
            None,
        ),
        "a repeated sig",
    );
    // A link signs a download, nothing else.
    assert_refused(
        &request(
            addr,
            "DELETE",
            &format!("/api/tempfile/delete/{id}?exp={exp}&sig={sig}"),
            None,
        ),
        "delete with a link",
    );

    // Valid up to and including `exp`, refused after it.
    clock.advance(Duration::from_secs(599));
    assert_eq!(request(addr, "GET", &target, None).status, 200);
    clock.advance(Duration::from_secs(2));
    forbidden(&target, "download link expired");
    // The bearer token still works for the same file.
    let plain = format!("/api/tempfile/download/{id}");
    assert_eq!(request(addr, "GET", &plain, Some(OLD)).status, 200);

    assert!(matches!(
        client(&server.base_url(), None).signed_download_url(&id, expires),
        Err(TempfileError::InvalidToken(_))
    ));
    Ok(())
}

const BIN: &str = env!("CARGO_BIN_EXE_echomimic-tempfile-server");

/// The binary on a free port with `configure` applied; returns it and its address.
fn spawn(
    store: &std::path::Path,
    configure: impl FnOnce(&mut Command),
) -> (std::process::Child, SocketAddr) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("TEMPFILE_TOKEN")
        .env_remove("TEMPFILE_TOKEN_FILE")
        .env("TEMPFILE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TEMPFILE_DIR", store)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    configure(&mut cmd);
    let child = cmd.spawn().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, addr)
}

/// Stops the binary and returns what it logged, without colour codes.
fn stop(child: std::process::Child) -> String {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let mut plain = String::new();
    let mut rest = log.as_ref();
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = rest[at..].split_once('m').map_or("", |(_, r)| r);
    }
    plain + rest
}

#[test]
fn the_binary_takes_tokens_from_env_flags_and_a_file_and_never_logs_them() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("tokens");
    std::fs::write(&file, format!("{NEW}\n\n"))?;
    // env (a comma list) plus a file
    let (child, addr) = spawn(&dir.path().join("a"), |c| {
        c.env("TEMPFILE_TOKEN", format!("{OLD},{WRONG}x"))
            .arg("--token-file")
            .arg(&file);
    });
    for t in [OLD, NEW, &format!("{WRONG}x")] {
        assert_eq!(upload(addr, Some(t)).status, 200);
    }
    assert_refused(&upload(addr, Some(WRONG)), "wrong token");
    assert_refused(&upload(addr, None), "no token");
    let log = stop(child);
    assert!(log.contains("tokens=3"), "{log}");
    for t in [OLD, NEW, WRONG] {
        assert!(!log.contains(t), "a token is in the log:\n{log}");
    }
    assert!(
        log.contains("request without a valid access token refused"),
        "{log}"
    );

    // a repeated flag; no env
    let (child, addr) = spawn(&dir.path().join("b"), |c| {
        c.args(["--token", OLD, "--token", NEW]);
    });
    assert_eq!(upload(addr, Some(NEW)).status, 200);
    assert_refused(&upload(addr, Some(WRONG)), "wrong token");
    stop(child);

    // a token too short to be safe: refused at start, without echoing it
    let out = Command::new(BIN)
        .env_remove("TEMPFILE_TOKEN")
        .args(["--listen", "127.0.0.1:0", "--dir"])
        .arg(dir.path().join("s"))
        .args(["--token", "hunter2"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("16 to 512 characters") && !err.contains("hunter2"),
        "{err}"
    );

    // --help names the settings but never shows a token from the environment
    let help = Command::new(BIN)
        .env("TEMPFILE_TOKEN", OLD)
        .arg("--help")
        .output()?;
    let help = String::from_utf8(help.stdout)?;
    for needle in ["--token", "TEMPFILE_TOKEN", "--token-file"] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    assert!(!help.contains(OLD));
    Ok(())
}
