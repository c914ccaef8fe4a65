//! Shared helpers for the `video_*` tests: synthetic frames and audio, and
//! ffprobe / ffmpeg wrappers used to inspect what the writer produced.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use echomimic_pipeline::video::{
    AudioInput, EncoderBackend, Pcm, VideoReport, VideoSpec, VideoWriter,
};
use serde_json::Value;

/// Both backends, for tests that run each.
pub const BACKENDS: [EncoderBackend; 2] = [EncoderBackend::Ffmpeg, EncoderBackend::Builtin];

/// The speech clip of the golden set under test (`ECHOMIMIC_GOLDEN_DIR` or
/// the committed public set).
pub fn speech_wav() -> PathBuf {
    let root = match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public"),
    };
    root.join("inputs/speech.wav")
}

/// A moving colour gradient with a bright square that slides across it:
/// frame `i` of a `w x h` RGB24 clip.
pub fn moving_gradient(w: u32, h: u32, i: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    let t = i as f32;
    let side = (w.min(h) / 4).max(2);
    let sx = (i as u32 * 3) % w.saturating_sub(side).max(1);
    for y in 0..h {
        for x in 0..w {
            let in_square = x >= sx && x < sx + side && y >= h / 3 && y < h / 3 + side;
            if in_square {
                out.extend_from_slice(&[250, 250, 40]);
            } else {
                let r = ((x as f32 * 255.0 / w as f32) + t * 4.0) % 256.0;
                let g = ((y as f32 * 255.0 / h as f32) + t * 2.0) % 256.0;
                let b = 128.0 + 100.0 * ((x + y) as f32 * 0.05 + t * 0.2).sin();
                out.extend_from_slice(&[r as u8, g as u8, b as u8]);
            }
        }
    }
    out
}

/// A 440 Hz + 660 Hz tone with a slow amplitude wobble.
pub fn tone(seconds: f64, rate: u32, channels: u16) -> Pcm {
    let n = (seconds * f64::from(rate)).round() as usize;
    let mut samples = Vec::with_capacity(n * usize::from(channels));
    for i in 0..n {
        let t = i as f32 / rate as f32;
        let env = 0.6 + 0.4 * (2.0 * std::f32::consts::PI * 1.5 * t).sin();
        let s = env
            * 0.3
            * ((2.0 * std::f32::consts::PI * 440.0 * t).sin()
                + 0.5 * (2.0 * std::f32::consts::PI * 660.0 * t).sin());
        for c in 0..channels {
            samples.push(if c == 0 { s } else { s * 0.8 });
        }
    }
    Pcm::new(samples, channels, rate).expect("valid tone")
}

/// Writes `pcm` as a 16-bit WAV.
pub fn write_wav(path: &Path, pcm: &Pcm) -> anyhow::Result<()> {
    let spec = hound::WavSpec {
        channels: pcm.channels(),
        sample_rate: pcm.sample_rate(),
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec)?;
    for &s in pcm.samples() {
        w.write_sample((s * 32767.0).round() as i16)?;
    }
    w.finalize()?;
    Ok(())
}

/// Encodes `frames` synthetic frames with `spec` into `path`.
pub fn encode(path: &Path, spec: &VideoSpec, frames: u64) -> anyhow::Result<VideoReport> {
    let mut writer = VideoWriter::create(path, spec)?;
    for i in 0..frames {
        writer.write_frame(&moving_gradient(spec.width, spec.height, i))?;
    }
    Ok(writer.finish()?)
}

/// A spec over the public speech clip.
pub fn speech_spec(w: u32, h: u32, backend: EncoderBackend) -> VideoSpec {
    VideoSpec::new(w, h, AudioInput::file(speech_wav())).with_backend(backend)
}

/// Audio of a spec as PCM (reads the WAV when given as a file).
pub fn spec_pcm(spec: &VideoSpec) -> anyhow::Result<Pcm> {
    match (&spec.audio.pcm, &spec.audio.file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) => Ok(Pcm::read_wav(f)?),
        _ => bail!("spec has no audio"),
    }
}

fn tool(name: &str) -> anyhow::Result<()> {
    let ok = Command::new(name)
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ensure!(
        ok,
        "`{name}` is required by this test and was not found: install it with `apt-get install ffmpeg`"
    );
    Ok(())
}

/// `ffprobe -show_streams -show_format -count_frames` as JSON.
pub fn ffprobe(path: &Path) -> anyhow::Result<Value> {
    tool("ffprobe")?;
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_streams",
            "-show_format",
            "-count_frames",
        ])
        .arg(path)
        .output()
        .context("running ffprobe")?;
    ensure!(
        out.status.success(),
        "ffprobe failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The first stream of a type (`video` / `audio`) in ffprobe's JSON.
pub fn stream<'a>(probe: &'a Value, kind: &str) -> anyhow::Result<&'a Value> {
    probe["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["codec_type"] == kind))
        .with_context(|| format!("no {kind} stream in {probe}"))
}

/// A numeric ffprobe field that is printed as a string.
pub fn num(v: &Value, key: &str) -> anyhow::Result<f64> {
    match &v[key] {
        Value::String(s) => s.parse().with_context(|| format!("`{key}` = {s}")),
        Value::Number(n) => n.as_f64().context("number"),
        other => bail!("field `{key}` missing or odd: {other}"),
    }
}

/// Decodes the first audio stream of a file to mono f32 at `rate`.
pub fn decode_audio(path: &Path, rate: u32) -> anyhow::Result<Vec<f32>> {
    tool("ffmpeg")?;
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args([
            "-map",
            "0:a:0",
            "-ac",
            "1",
            "-ar",
            &rate.to_string(),
            "-f",
            "f32le",
            "pipe:1",
        ])
        .output()
        .context("running ffmpeg")?;
    ensure!(
        out.status.success(),
        "ffmpeg decode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out
        .stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Decodes frame `index` of a file's video to RGB24.
pub fn decode_frame(path: &Path, index: u64) -> anyhow::Result<image::RgbImage> {
    tool("ffmpeg")?;
    let dir = tempfile::tempdir()?;
    let png = dir.path().join("frame.png");
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-nostdin", "-i"])
        .arg(path)
        .args([
            "-vf",
            &format!("select=eq(n\\,{index})"),
            "-frames:v",
            "1",
            "-y",
        ])
        .arg(&png)
        .output()
        .context("running ffmpeg")?;
    ensure!(
        out.status.success(),
        "ffmpeg frame decode failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(image::open(&png)?.to_rgb8())
}

/// Mono mix of a PCM clip resampled (linear) to `rate`, for comparisons.
pub fn mono_at(pcm: &Pcm, rate: u32) -> Vec<f32> {
    let ch = usize::from(pcm.channels());
    let mono: Vec<f32> = pcm
        .samples()
        .chunks_exact(ch)
        .map(|f| f.iter().sum::<f32>() / ch as f32)
        .collect();
    let ratio = f64::from(pcm.sample_rate()) / f64::from(rate);
    let n = (mono.len() as f64 / ratio).round() as usize;
    (0..n)
        .map(|i| {
            let x = i as f64 * ratio;
            let k = x.floor() as usize;
            let f = (x - k as f64) as f32;
            let a = mono[k.min(mono.len() - 1)];
            let b = mono[(k + 1).min(mono.len() - 1)];
            a + (b - a) * f
        })
        .collect()
}

/// Best normalised cross-correlation of `got` against `want` over lags in
/// `-max_lag..=max_lag`, returning `(correlation, lag)`.
pub fn best_correlation(want: &[f32], got: &[f32], max_lag: i64) -> (f64, i64) {
    let mut best = (f64::MIN, 0);
    for lag in -max_lag..=max_lag {
        let (mut dot, mut ew, mut eg) = (0f64, 0f64, 0f64);
        for (i, &w) in want.iter().enumerate() {
            let j = i as i64 + lag;
            if j < 0 || j as usize >= got.len() {
                continue;
            }
            let g = got[j as usize];
            dot += f64::from(w) * f64::from(g);
            ew += f64::from(w) * f64::from(w);
            eg += f64::from(g) * f64::from(g);
        }
        let c = dot / (ew.sqrt() * eg.sqrt()).max(1e-12);
        if c > best.0 {
            best = (c, lag);
        }
    }
    best
}

/// Names of the entries of a folder (to prove nothing was left behind).
pub fn folder_entries(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    Ok(names)
}
