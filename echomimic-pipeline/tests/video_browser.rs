//! Each backend's file plays to the end in headless Chromium, with a picture
//! and an audio track.
//!
//! The test serves a page and the MP4s from a loopback HTTP server (with Range
//! support, as browsers use for media); the page plays the videos (muted,
//! autoplay allowed by flag) and POSTs what the `<video>` elements saw back to
//! the same server. Needs Debian's `chromium` (`apt-get install -y chromium`);
//! set `CHROMIUM` to use another binary.

mod video_common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use echomimic_pipeline::video::VideoReport;
use serde_json::Value;
use video_common::*;

const PAGE: &str = r#"<!doctype html>
<html><body>
<script>
const files = FILES;
const results = {};
let remaining = files.length;
let reported = false;
function report() {
  if (reported) return;
  reported = true;
  fetch("/report", {method: "POST", body: JSON.stringify(results)});
}
for (const f of files) {
  const v = document.createElement("video");
  v.muted = true;
  v.autoplay = true;
  v.preload = "auto";
  const r = results[f] = {events: []};
  const snap = () => {
    r.videoWidth = v.videoWidth;
    r.videoHeight = v.videoHeight;
    r.duration = v.duration;
    r.audioTracks = v.audioTracks ? v.audioTracks.length : -1;
    r.audioDecodedBytes = v.webkitAudioDecodedByteCount;
    r.videoDecodedBytes = v.webkitVideoDecodedByteCount;
    r.error = v.error ? (v.error.code + " " + v.error.message) : null;
  };
  for (const ev of ["loadedmetadata", "playing", "ended", "error"]) {
    v.addEventListener(ev, () => {
      r.events.push(ev);
      snap();
      if (ev === "ended" || ev === "error") {
        if (--remaining === 0) report();
      }
    });
  }
  v.src = f;
  document.body.appendChild(v);
}
setTimeout(report, 45000);
</script>
</body></html>
"#;

/// A tiny HTTP/1.1 server: GET with optional `Range: bytes=a-b`, and
/// `POST /report` whose body is handed to the test.
fn serve(
    files: Arc<HashMap<String, Vec<u8>>>,
    listener: TcpListener,
    reports: mpsc::Sender<String>,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let files = Arc::clone(&files);
        let reports = reports.clone();
        std::thread::spawn(move || {
            let _ = handle(stream, &files, &reports);
        });
    }
}

fn handle(
    mut stream: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    reports: &mpsc::Sender<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    if method == "POST" {
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let _ = reports.send(String::from_utf8_lossy(&body).into_owned());
        return stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
    }
    let name = target.trim_start_matches('/');
    let name = if name.is_empty() { "index.html" } else { name };
    let Some(body) = files.get(name) else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let kind = if name.ends_with(".html") {
        "text/html"
    } else {
        "video/mp4"
    };
    let total = body.len();
    let range = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| {
            let start: usize = a.parse().ok()?;
            let end: usize = if b.is_empty() {
                total - 1
            } else {
                b.parse().ok()?
            };
            (start <= end && start < total).then_some((start, end.min(total - 1)))
        });
    let (status, slice, extra) = match range {
        Some((a, b)) => (
            "206 Partial Content",
            &body[a..=b],
            format!("Content-Range: bytes {a}-{b}/{total}\r\n"),
        ),
        None => ("200 OK", &body[..], String::new()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{extra}Connection: close\r\n\r\n",
        slice.len()
    );
    stream.write_all(head.as_bytes())?;
    if method != "HEAD" {
        stream.write_all(slice)?;
    }
    Ok(())
}

fn chromium() -> anyhow::Result<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("CHROMIUM") {
        Some(p) => vec![PathBuf::from(p)],
        None => ["chromium", "chromium-browser", "google-chrome"]
            .iter()
            .map(PathBuf::from)
            .collect(),
    };
    for c in &candidates {
        let ok = Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Ok(c.clone());
        }
    }
    bail!(
        "headless Chromium is required by this test and none was found (tried {candidates:?}): \
         install it with `apt-get install -y chromium` or set CHROMIUM to a Chrome/Chromium binary"
    )
}

/// Plays the files in headless Chromium and returns what each `<video>` saw.
fn play_in_chromium(files: &[(&str, &Path)]) -> anyhow::Result<Value> {
    let browser = chromium()?;
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    let mut served = HashMap::new();
    served.insert(
        "index.html".to_string(),
        PAGE.replace("FILES", &serde_json::to_string(&names)?)
            .into_bytes(),
    );
    for (name, path) in files {
        served.insert(name.to_string(), std::fs::read(path)?);
    }
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = mpsc::channel();
    let served = Arc::new(served);
    std::thread::spawn(move || serve(served, listener, tx));

    let profile = tempfile::tempdir()?;
    let mut cmd = Command::new(&browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        "--enable-blink-features=AudioVideoTracks",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("http://127.0.0.1:{port}/index.html"))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", browser.display()))?;
    let report = rx.recv_timeout(Duration::from_secs(90));
    // Stop the browser process this test started (its helpers exit with it).
    let _ = child.kill();
    let _ = child.wait();
    let report = report.context("Chromium did not report back within 90 s")?;
    Ok(serde_json::from_str(&report)?)
}

#[test]
fn both_backends_play_to_the_end_in_chromium_with_audio() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut reports: Vec<(String, VideoReport)> = Vec::new();
    for backend in BACKENDS {
        let spec = speech_spec(128, 96, backend);
        let name = format!("{backend}.mp4");
        let report = encode(&dir.path().join(&name), &spec, 60)?;
        reports.push((name, report));
    }
    let files: Vec<(&str, &Path)> = reports
        .iter()
        .map(|(n, r)| (n.as_str(), r.path.as_path()))
        .collect();
    let seen = play_in_chromium(&files)?;
    eprintln!("{seen:#}");
    for (name, report) in &reports {
        let r = &seen[name.as_str()];
        let events: Vec<&str> = r["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        ensure!(r["error"].is_null(), "{name}: media error {}", r["error"]);
        ensure!(
            events.contains(&"ended"),
            "{name}: never reached `ended` (events {events:?})"
        );
        ensure!(
            r["videoWidth"].as_u64() == Some(u64::from(report.width)),
            "{name}: videoWidth {}",
            r["videoWidth"]
        );
        ensure!(
            r["videoHeight"].as_u64() == Some(u64::from(report.height)),
            "{name}: videoHeight {}",
            r["videoHeight"]
        );
        ensure!(
            r["audioTracks"].as_i64().unwrap_or(0) >= 1,
            "{name}: audioTracks {}",
            r["audioTracks"]
        );
        ensure!(
            r["audioDecodedBytes"].as_u64().unwrap_or(0) > 0,
            "{name}: no audio decoded"
        );
        ensure!(
            r["videoDecodedBytes"].as_u64().unwrap_or(0) > 0,
            "{name}: no video decoded"
        );
        let duration = r["duration"].as_f64().unwrap_or(0.0);
        ensure!(
            (duration - report.audio_duration_s).abs() < 1.0 / report.fps,
            "{name}: browser duration {duration} vs audio {}",
            report.audio_duration_s
        );
    }
    Ok(())
}
