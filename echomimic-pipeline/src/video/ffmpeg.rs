//! The ffmpeg backend: raw RGB24 frames piped into an `ffmpeg` child process
//! that encodes H.264 High (libx264, yuv420p) and AAC-LC into a fast-start MP4.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::spec::{fps_rational, SinkSummary, VideoSpec};
use crate::error::{AudioError, PipelineError, Result};

pub use crate::ffmpeg_program::{resolve_ffmpeg, FFMPEG_ENV};

/// How many of ffmpeg's last stderr lines an error message carries.
const STDERR_LINES: usize = 12;

/// What [`probe_ffmpeg`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FfmpegInfo {
    /// The program that was run.
    pub binary: PathBuf,
    /// First line of `ffmpeg -version`, e.g. `ffmpeg version 5.1.6-0+deb12u1`.
    pub version: String,
}

/// Programs that passed [`probe_ffmpeg`] in this process.
static PROBED: Mutex<Vec<FfmpegInfo>> = Mutex::new(Vec::new());

/// Checks that ffmpeg runs and has the `libx264` and `aac` encoders. The worker
/// calls this at startup so a missing or unsuitable ffmpeg is reported before
/// the first task, not after a GPU run.
///
/// A program that passed is not run again for later checks in the same process (the run
/// costs ≈ 0.05 s, and every video writer checks its encoder); a failure is never remembered,
/// so a program installed later is found.
pub fn probe_ffmpeg(binary: Option<&Path>) -> Result<FfmpegInfo> {
    let binary = resolve_ffmpeg(binary);
    let probed = |list: &Vec<FfmpegInfo>| list.iter().find(|i| i.binary == binary).cloned();
    if let Some(info) = probed(&PROBED.lock().unwrap_or_else(PoisonError::into_inner)) {
        return Ok(info);
    }
    let info = run_probe(binary.clone())?;
    let mut list = PROBED.lock().unwrap_or_else(PoisonError::into_inner);
    if probed(&list).is_none() {
        list.push(info.clone());
    }
    Ok(info)
}

/// [`probe_ffmpeg`]'s run of `binary`: `ffmpeg -encoders` lists the encoders on stdout and
/// prints its banner, whose first line is the version, on stderr (one start of a program that
/// loads a few hundred libraries, ≈ 40 ms of CPU, instead of a second for `-version`).
fn run_probe(binary: PathBuf) -> Result<FfmpegInfo> {
    let out = Command::new(&binary)
        .arg("-encoders")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PipelineError::Media(format!(
                    "ffmpeg not found (tried `{}`): install it (Debian/Ubuntu: `apt-get install ffmpeg`) \
                     or set {FFMPEG_ENV} to the program's path",
                    binary.display()
                ))
            } else {
                PipelineError::Media(format!("cannot run ffmpeg `{}`: {e}", binary.display()))
            }
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(PipelineError::Media(format!(
            "`{} -encoders` failed ({}): {}",
            binary.display(),
            out.status,
            stderr.trim()
        )));
    }
    let version = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("ffmpeg (no version banner)")
        .to_string();
    let encoders = String::from_utf8_lossy(&out.stdout);
    // Lines look like " V....D libx264              libx264 H.264 / AVC ...".
    let has = |name: &str| {
        encoders
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(name))
    };
    let missing: Vec<&str> = ["libx264", "aac"].into_iter().filter(|e| !has(e)).collect();
    if !missing.is_empty() {
        return Err(PipelineError::Media(format!(
            "ffmpeg `{}` ({version}) lacks the {} encoder(s); use a build with libx264 \
             (e.g. Debian's `ffmpeg` package) or the built-in encoder",
            binary.display(),
            missing.join(" and ")
        )));
    }
    Ok(FfmpegInfo { binary, version })
}

/// Collects ffmpeg's stderr on a thread (so the pipe never fills and blocks
/// it), keeping the last lines for error messages.
fn drain_stderr(stderr: ChildStderr) -> JoinHandle<VecDeque<String>> {
    std::thread::spawn(move || {
        let mut last = VecDeque::with_capacity(STDERR_LINES);
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim().to_string();
            if line.is_empty() {
                continue;
            }
            tracing::debug!(target: "echomimic_pipeline::video::ffmpeg", "{line}");
            if last.len() == STDERR_LINES {
                last.pop_front();
            }
            last.push_back(line);
        }
        last
    })
}

fn join_lines(handle: Option<JoinHandle<VecDeque<String>>>) -> String {
    let lines = handle.and_then(|h| h.join().ok()).unwrap_or_default();
    if lines.is_empty() {
        "(no output on stderr)".into()
    } else {
        lines.into_iter().collect::<Vec<_>>().join(" | ")
    }
}

/// Decodes an audio file with ffmpeg (48 kHz mono s16) only to count its
/// samples: the exact duration, and proof that the whole file decodes.
fn audio_duration(binary: &Path, file: &Path) -> Result<f64> {
    const RATE: u32 = 48_000;
    let mut child = Command::new(binary)
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-i"])
        .arg(file)
        .args([
            "-map", "0:a:0", "-ac", "1", "-ar", "48000", "-f", "s16le", "pipe:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            PipelineError::Media(format!("cannot run ffmpeg `{}`: {e}", binary.display()))
        })?;
    let stderr = child.stderr.take().map(drain_stderr);
    let mut bytes = 0u64;
    if let Some(mut out) = child.stdout.take() {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(PipelineError::Media(format!(
                        "reading decoded audio from ffmpeg: {e}"
                    )));
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| PipelineError::Media(format!("waiting for ffmpeg: {e}")))?;
    let messages = join_lines(stderr);
    if !status.success() {
        return Err(AudioError::Corrupt(format!(
            "{}: ffmpeg cannot decode it ({status}): {messages}",
            file.display()
        ))
        .into());
    }
    let samples = bytes / 2;
    if samples == 0 {
        return Err(AudioError::Empty.into());
    }
    Ok(samples as f64 / f64::from(RATE))
}

/// A running `ffmpeg` encoding the frames written to its stdin.
pub(crate) struct FfmpegSink {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stderr: Option<JoinHandle<VecDeque<String>>>,
    audio_duration_s: f64,
    video_codec: String,
    audio_codec: String,
    /// The WAV written for ffmpeg when the audio came only as samples.
    _pcm_wav: Option<tempfile::TempPath>,
}

impl FfmpegSink {
    pub(crate) fn spawn(
        out: &Path,
        folder: &Path,
        width: u32,
        height: u32,
        spec: &VideoSpec,
    ) -> Result<Self> {
        let settings = &spec.ffmpeg;
        if settings.crf > 51 {
            return Err(PipelineError::InvalidInput(format!(
                "x264 crf {} is outside 0..=51",
                settings.crf
            )));
        }
        if settings.preset.is_empty() || !settings.preset.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(PipelineError::InvalidInput(format!(
                "x264 preset `{}` is not a preset name",
                settings.preset
            )));
        }
        let binary = resolve_ffmpeg(settings.binary.as_deref());

        let (audio_path, pcm_wav, audio_duration_s) = match (&spec.audio.pcm, &spec.audio.file) {
            (Some(pcm), Some(file)) => (file.clone(), None, pcm.duration_s()),
            (Some(pcm), None) => {
                let wav = write_temp_wav(pcm, folder)?;
                (wav.to_path_buf(), Some(wav), pcm.duration_s())
            }
            (None, Some(file)) => (file.clone(), None, audio_duration(&binary, file)?),
            (None, None) => {
                return Err(PipelineError::InvalidInput("no audio given".into()));
            }
        };

        let (num, den) = fps_rational(spec.fps);
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str| args.push(a.into());
        for a in [
            "-hide_banner",
            "-nostdin",
            "-nostats",
            "-loglevel",
            "warning",
            "-y",
        ] {
            push(a);
        }
        // input 0: raw frames on stdin
        for a in ["-f", "rawvideo", "-pix_fmt", "rgb24", "-video_size"] {
            push(a);
        }
        push(&format!("{width}x{height}"));
        push("-framerate");
        push(&format!("{num}/{den}"));
        push("-i");
        push("pipe:0");
        args.push("-i".into());
        args.push(audio_path.clone().into_os_string());
        let mut push = |a: &str| args.push(a.into());
        for a in [
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-map_metadata",
            "-1",
            "-map_chapters",
            "-1",
            // BT.601 limited range, as swscale does by default, made explicit
            // so the signalled matrix below is guaranteed to match.
            "-vf",
            "scale=out_color_matrix=bt601:out_range=tv,format=yuv420p",
            "-c:v",
            "libx264",
            "-profile:v",
            "high",
            "-pix_fmt",
            "yuv420p",
            "-preset",
        ] {
            push(a);
        }
        push(&settings.preset);
        push("-crf");
        push(&settings.crf.to_string());
        if let Some(max) = spec.max_bytes {
            // Capped CRF: a one-second VBV buffer at the budget's rate keeps the file under
            // the limit (it binds only for very long videos of very large frames).
            let budget = super::spec::size_budget(max, width, height, spec.fps, audio_duration_s)?;
            let kbps = format!("{}k", (budget.video_bps / 1000.0).floor() as u64);
            for a in ["-maxrate", kbps.as_str(), "-bufsize", kbps.as_str()] {
                push(a);
            }
        }
        for a in [
            "-colorspace",
            "smpte170m",
            "-color_primaries",
            "bt709",
            "-color_trc",
            "iec61966-2-1",
            "-color_range",
            "tv",
            // mono or stereo with a standard layout: the aac encoder rejects
            // odd layouts (a WAVE_FORMAT_EXTENSIBLE "1 channels (FL)" file,
            // 5.1 downmixes are also safer for browsers)
            "-af",
            "aformat=channel_layouts=mono|stereo",
            "-c:a",
            "aac",
            "-b:a",
        ] {
            push(a);
        }
        push(&format!("{}k", settings.audio_bitrate_kbps));
        for a in ["-movflags", "+faststart", "-f", "mp4"] {
            push(a);
        }
        args.push(out.as_os_str().to_owned());

        tracing::debug!(ffmpeg = %binary.display(), ?args, "starting ffmpeg");
        let mut child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                PipelineError::Media(format!("cannot start ffmpeg `{}`: {e}", binary.display()))
            })?;
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().map(drain_stderr);
        Ok(Self {
            child: Some(child),
            stdin,
            stderr,
            audio_duration_s,
            video_codec: format!(
                "h264 high (libx264 crf {} {})",
                settings.crf, settings.preset
            ),
            audio_codec: format!("aac-lc {} kbit/s", settings.audio_bitrate_kbps),
            _pcm_wav: pcm_wav,
        })
    }

    pub(crate) fn audio_duration_s(&self) -> f64 {
        self.audio_duration_s
    }

    pub(crate) fn push(&mut self, frame: &[u8]) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            return Err(PipelineError::Media(
                "ffmpeg input is already closed".into(),
            ));
        };
        match stdin.write_all(frame) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failure(&format!("writing a frame to ffmpeg failed ({e})"))),
        }
    }

    pub(crate) fn finish(mut self) -> Result<SinkSummary> {
        drop(self.stdin.take()); // EOF: ffmpeg flushes, muxes, moves moov to the front
        let status = self.wait(None)?;
        let messages = join_lines(self.stderr.take());
        if !status.success() {
            return Err(PipelineError::Media(format!(
                "ffmpeg failed ({status}): {messages}"
            )));
        }
        Ok(SinkSummary {
            video_codec: std::mem::take(&mut self.video_codec),
            audio_codec: std::mem::take(&mut self.audio_codec),
        })
    }

    /// Stops ffmpeg after a failed write and builds an error that carries its
    /// last stderr lines (the real reason: a bad audio file, a full disk ...).
    fn failure(&mut self, what: &str) -> PipelineError {
        drop(self.stdin.take());
        let status = self.wait(Some(Duration::from_secs(10)));
        let messages = join_lines(self.stderr.take());
        match status {
            Ok(s) => PipelineError::Media(format!("{what}; ffmpeg exited ({s}): {messages}")),
            Err(e) => PipelineError::Media(format!("{what}; {e}; ffmpeg said: {messages}")),
        }
    }

    /// Waits for the child; with a limit, kills it when the limit passes.
    fn wait(&mut self, limit: Option<Duration>) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(PipelineError::Media("ffmpeg was already reaped".into()));
        };
        let err = |e: io::Error| PipelineError::Media(format!("waiting for ffmpeg: {e}"));
        if let Some(limit) = limit {
            let start = Instant::now();
            while start.elapsed() < limit {
                if let Some(status) = child.try_wait().map_err(err)? {
                    return Ok(status);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        child.wait().map_err(err)
    }
}

impl Drop for FfmpegSink {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            // Unfinished (an error elsewhere, or the writer was dropped):
            // stop ffmpeg rather than let it finalise a file nobody wants.
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(h) = self.stderr.take() {
            let _ = h.join();
        }
    }
}

/// Writes samples to a float WAV next to the output for ffmpeg to read.
fn write_temp_wav(pcm: &super::spec::Pcm, folder: &Path) -> Result<tempfile::TempPath> {
    let temp = tempfile::Builder::new()
        .prefix(".echomimic-audio.")
        .suffix(".wav")
        .tempfile_in(folder)
        .map_err(|e| PipelineError::io(folder, e))?
        .into_temp_path();
    let spec = hound::WavSpec {
        channels: pcm.channels(),
        sample_rate: pcm.sample_rate(),
        bits_per_sample: 32,
        sample_format: hound::SampleFormat::Float,
    };
    let wav_err =
        |e: hound::Error| PipelineError::Media(format!("writing {}: {e}", temp.display()));
    let mut w = hound::WavWriter::create(&temp, spec).map_err(wav_err)?;
    for &s in pcm.samples() {
        w.write_sample(s).map_err(wav_err)?;
    }
    w.finalize().map_err(wav_err)?;
    Ok(temp)
}
