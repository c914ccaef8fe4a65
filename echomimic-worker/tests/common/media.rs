//! What ffprobe says about a video, and a process's memory.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use std::path::Path;
use std::process::Command;

/// What ffprobe says about a file.
#[derive(Debug)]
pub struct Probe {
    pub video_codec: String,
    pub pix_fmt: String,
    pub width: u32,
    pub height: u32,
    pub audio_codec: Option<String>,
    pub duration: f64,
    pub frames: Option<u64>,
}

pub fn probe(path: &Path) -> Probe {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_entries",
            "stream=codec_type,codec_name,pix_fmt,width,height,nb_read_frames:format=duration",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs");
    assert!(
        out.status.success(),
        "ffprobe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe json");
    let streams = v["streams"].as_array().cloned().unwrap_or_default();
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .expect("a video stream");
    let audio = streams.iter().find(|s| s["codec_type"] == "audio");
    Probe {
        video_codec: video["codec_name"].as_str().unwrap_or("").into(),
        pix_fmt: video["pix_fmt"].as_str().unwrap_or("").into(),
        width: video["width"].as_u64().unwrap_or(0) as u32,
        height: video["height"].as_u64().unwrap_or(0) as u32,
        audio_codec: audio.and_then(|a| a["codec_name"].as_str().map(str::to_owned)),
        duration: v["format"]["duration"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0.0),
        frames: video["nb_read_frames"]
            .as_str()
            .and_then(|d| d.parse().ok()),
    }
}

/// Resident memory of a process in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
