//! The `echomimic-tempfile-server` binary: flags, environment, clean shutdown on SIGTERM.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_echomimic-tempfile-server");

#[test]
fn help_names_every_setting_and_its_variable() -> TestResult {
    let out = Command::new(BIN).arg("--help").output()?;
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout)?;
    for needle in [
        "--listen",
        "TEMPFILE_LISTEN",
        "127.0.0.1:3000",
        "--dir",
        "TEMPFILE_DIR",
        "--max-bytes",
        "TEMPFILE_MAX_BYTES",
        "209715200",
        "--expiry-hours",
        "TEMP_FILE_EXPIRY",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
    Ok(())
}

#[test]
fn bad_settings_exit_with_an_error() -> TestResult {
    let out = Command::new(BIN).args(["--expiry-hours", "0"]).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive"));
    let dir = tempfile::tempdir()?;
    let out = Command::new(BIN)
        .args(["--listen", "256.1.1.1:80", "--dir"])
        .arg(dir.path())
        .env("RUST_LOG", "error")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    Ok(())
}

#[test]
fn serves_from_env_settings_and_stops_on_sigterm() -> TestResult {
    let dir = tempfile::tempdir()?;
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut child = Command::new(BIN)
        .env("TEMPFILE_LISTEN", format!("127.0.0.1:{port}"))
        .env("TEMPFILE_DIR", dir.path())
        .env("TEMPFILE_MAX_BYTES", "1000")
        .env("TEMP_FILE_EXPIRY", "0.5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = raw(addr, &upload_request(b"a.png", &png_bytes(500)));
    assert_eq!(r.status, 200);
    // Expiry of half an hour, from TEMP_FILE_EXPIRY.
    let expires = r.json()["expires_at"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    assert!(
        (1790..=1810).contains(&(expires - now)),
        "{}",
        expires - now
    );
    // Size limit from TEMPFILE_MAX_BYTES.
    assert_eq!(
        raw(addr, &upload_request(b"b.png", &png_bytes(2000))).status,
        413
    );
    assert_eq!(files_under(dir.path()).len(), 2);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        assert!(Instant::now() < deadline, "server ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    Ok(())
}
