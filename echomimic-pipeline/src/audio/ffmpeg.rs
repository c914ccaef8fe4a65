//! Audio through the `ffmpeg` program: the reference's own decoder and resampler.
//!
//! The reference loads speech with `ffmpeg -nostdin -threads 0 -i FILE -f s16le -acodec
//! pcm_s16le -ac 1 -ar 16000 -` and divides the int16 samples by 32768.
//! [`ffmpeg_waveform_16k`] runs exactly that, so with ffmpeg installed our 16 kHz waveform
//! equals the reference's bit for bit for every format and input rate (`tests/audio_decode.rs`,
//! `ffmpeg_path_equals_the_reference_command`). [`ffmpeg_decode_native`] decodes at the file's
//! own rate and channel count (32-bit float WAV on a pipe), which is how formats the built-in
//! decoders lack (Opus in Ogg or WebM, AMR, WMA, the audio of MKV/AVI/…) are read.
//!
//! Both stream ffmpeg's output and stop it as soon as [`AudioLimits::max_seconds`] is passed,
//! so a huge file does not fill memory.

use std::io::{self, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::decode::AudioLimits;
use super::decode::{DecodedAudio, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};
use super::resample::WHISPER_SAMPLE_RATE;
use crate::error::AudioError;

/// Why an ffmpeg run gave no audio.
#[derive(Debug)]
pub(crate) enum FfmpegFailure {
    /// The program could not be started (not installed, not executable).
    NotRunnable(io::Error),
    /// ffmpeg ran and could not decode the input: its last stderr line.
    Failed(String),
    /// The input passed a limit (too long) or gave an unusable stream.
    Audio(AudioError),
}

impl FfmpegFailure {
    fn describe(&self) -> String {
        match self {
            FfmpegFailure::NotRunnable(e) => format!("ffmpeg could not be run ({e})"),
            FfmpegFailure::Failed(m) => format!("ffmpeg: {m}"),
            FfmpegFailure::Audio(e) => e.to_string(),
        }
    }

    /// The typed error when the built-in decoders gave `builtin` and ffmpeg this failure.
    pub(crate) fn combine(self, builtin: AudioError) -> AudioError {
        match (self, builtin) {
            (FfmpegFailure::Audio(e), _) => e,
            (FfmpegFailure::NotRunnable(_), AudioError::Unsupported(m)) => {
                AudioError::Unsupported(format!(
                    "{m} (formats beyond WAV, MP3, AAC/M4A, ALAC, FLAC and Ogg Vorbis, such as \
                     Opus voice notes, AMR, WMA or WebM, need ffmpeg installed)"
                ))
            }
            (f @ FfmpegFailure::Failed(_), AudioError::Unsupported(m)) => {
                AudioError::Unsupported(format!("{m}; {}", f.describe()))
            }
            (_, other) => other,
        }
    }
}

fn spawn(ffmpeg: &Path, input: &Path, output_args: &[&str]) -> Result<Child, FfmpegFailure> {
    Command::new(ffmpeg)
        .args([
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-threads",
            "0",
            "-i",
        ])
        .arg(input)
        .args(output_args)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(FfmpegFailure::NotRunnable)
}

/// Reads the child's stderr on a thread (so a chatty ffmpeg cannot block on a full pipe).
fn stderr_reader(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.take(64 * 1024).read_to_string(&mut s);
            let _ = io::copy(e, &mut io::sink());
        }
        s
    })
}

/// Kills and reaps the child; used when a limit stops the read.
fn stop(mut child: Child, stderr: std::thread::JoinHandle<String>) {
    let _ = child.kill();
    let _ = child.wait();
    let _ = stderr.join();
}

/// Waits for the child; `Err` with ffmpeg's last stderr line when it failed, where the input's
/// path is cut to its file name (the message may reach a client: it must not reveal the
/// caller's folders).
fn finish(
    mut child: Child,
    stderr: std::thread::JoinHandle<String>,
    input: &Path,
) -> Result<(), FfmpegFailure> {
    let status = child
        .wait()
        .map_err(|e| FfmpegFailure::Failed(format!("waiting for ffmpeg: {e}")))?;
    let text = stderr.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("no message");
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "input".into());
    let last = last.replace(&input.display().to_string(), &name);
    Err(FfmpegFailure::Failed(format!("{last} ({status})")))
}

/// Fills `buf` as far as the stream allows; the count read (short only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The reference's call: mono 16 kHz int16 from ffmpeg, divided by 32768. Not validated
/// beyond [`AudioLimits::max_seconds`] (see [`super::validate_waveform`]).
pub(crate) fn ffmpeg_waveform_16k(
    ffmpeg: &Path,
    input: &Path,
    limits: &AudioLimits,
) -> Result<Vec<f32>, FfmpegFailure> {
    let mut child = spawn(
        ffmpeg,
        input,
        &[
            "-f",
            "s16le",
            "-acodec",
            "pcm_s16le",
            "-ac",
            "1",
            "-ar",
            "16000",
        ],
    )?;
    let stderr = stderr_reader(&mut child);
    let max_samples = (limits.max_seconds * f64::from(WHISPER_SAMPLE_RATE)).ceil() as usize;
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut wave = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut carry: Option<u8> = None;
    loop {
        let n = match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                stop(child, stderr);
                return Err(FfmpegFailure::Failed(format!(
                    "reading ffmpeg's output: {e}"
                )));
            }
        };
        let mut bytes = &buf[..n];
        if let Some(lo) = carry.take() {
            wave.push(f32::from(i16::from_le_bytes([lo, bytes[0]])) / 32768.0);
            bytes = &bytes[1..];
        }
        let pairs = bytes.chunks_exact(2);
        carry = pairs.remainder().first().copied();
        wave.extend(pairs.map(|p| f32::from(i16::from_le_bytes([p[0], p[1]])) / 32768.0));
        if wave.len() > max_samples {
            stop(child, stderr);
            return Err(FfmpegFailure::Audio(AudioError::TooLong {
                seconds: wave.len() as f64 / f64::from(WHISPER_SAMPLE_RATE),
                max_seconds: limits.max_seconds,
            }));
        }
    }
    drop(out);
    finish(child, stderr, input)?;
    Ok(wave)
}

/// Decodes at the input's own rate and channel count, as interleaved `f32` (ffmpeg's
/// `pcm_f32le` WAV on a pipe).
pub(crate) fn ffmpeg_decode_native(
    ffmpeg: &Path,
    input: &Path,
    limits: &AudioLimits,
) -> Result<DecodedAudio, FfmpegFailure> {
    let mut child = spawn(
        ffmpeg,
        input,
        &["-vn", "-sn", "-dn", "-f", "wav", "-acodec", "pcm_f32le"],
    )?;
    let stderr = stderr_reader(&mut child);
    let mut out = child.stdout.take().expect("stdout is piped");
    let result = read_f32_wav_stream(&mut out, limits);
    drop(out);
    match result {
        Ok(audio) => {
            finish(child, stderr, input)?;
            Ok(audio)
        }
        Err(e) => {
            // A stream that ended early is ffmpeg's failure: report its message.
            let ended = matches!(e, FfmpegFailure::Failed(_));
            if ended {
                finish(child, stderr, input)?;
            } else {
                stop(child, stderr);
            }
            Err(e)
        }
    }
}

/// Parses a streamed 32-bit float WAV (sizes in the header are ignored: on a pipe ffmpeg
/// cannot fill them in) up to the end of the stream.
fn read_f32_wav_stream(
    r: &mut impl Read,
    limits: &AudioLimits,
) -> Result<DecodedAudio, FfmpegFailure> {
    let broken = |what: &str| FfmpegFailure::Failed(format!("no WAV stream from ffmpeg ({what})"));
    let mut head = [0u8; 12];
    if read_full(r, &mut head).map_err(|e| broken(&e.to_string()))? < 12
        || &head[..4] != b"RIFF"
        || &head[8..12] != b"WAVE"
    {
        return Err(broken("no RIFF header"));
    }
    let mut format: Option<(usize, u32)> = None;
    loop {
        let mut chunk = [0u8; 8];
        if read_full(r, &mut chunk).map_err(|e| broken(&e.to_string()))? < 8 {
            return Err(broken("no data chunk"));
        }
        let len = u32::from_le_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]) as usize;
        if &chunk[..4] == b"data" {
            break;
        }
        if len > 1 << 20 {
            return Err(broken("oversized header chunk"));
        }
        let mut body = vec![0u8; len + (len & 1)];
        if read_full(r, &mut body).map_err(|e| broken(&e.to_string()))? < body.len() {
            return Err(broken("truncated header"));
        }
        if &chunk[..4] == b"fmt " && len >= 16 {
            let channels = usize::from(u16::from_le_bytes([body[2], body[3]]));
            let rate = u32::from_le_bytes([body[4], body[5], body[6], body[7]]);
            let bits = u16::from_le_bytes([body[14], body[15]]);
            if bits != 32 {
                return Err(broken("not 32-bit samples"));
            }
            format = Some((channels, rate));
        }
    }
    let (channels, sample_rate) = format.ok_or_else(|| broken("no fmt chunk"))?;
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(FfmpegFailure::Audio(AudioError::Unsupported(format!(
            "{channels} channels (at most {MAX_CHANNELS})"
        ))));
    }
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&sample_rate) {
        return Err(FfmpegFailure::Audio(AudioError::Unsupported(format!(
            "sample rate {sample_rate} Hz (accepted: {MIN_SAMPLE_RATE}..={MAX_SAMPLE_RATE})"
        ))));
    }
    let max_frames = (limits.max_seconds * f64::from(sample_rate)).ceil() as usize;
    let mut samples: Vec<f32> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(broken(&e.to_string())),
        };
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / 4 * 4;
        samples.extend(
            pending[..whole]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        pending.drain(..whole);
        if samples.len() / channels > max_frames {
            return Err(FfmpegFailure::Audio(AudioError::TooLong {
                seconds: (samples.len() / channels) as f64 / f64::from(sample_rate),
                max_seconds: limits.max_seconds,
            }));
        }
    }
    samples.truncate(samples.len() / channels * channels);
    if samples.is_empty() {
        return Err(FfmpegFailure::Audio(AudioError::Empty));
    }
    Ok(DecodedAudio {
        samples,
        channels,
        sample_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_stream(channels: u16, rate: u32, samples: &[f32], extra_chunk: bool) -> Vec<u8> {
        let mut v = b"RIFF\xff\xff\xff\xffWAVE".to_vec();
        if extra_chunk {
            v.extend_from_slice(b"LIST\x05\0\0\0INFOx\0");
        }
        v.extend_from_slice(b"fmt \x10\0\0\0\x03\0");
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * 4 * u32::from(channels)).to_le_bytes());
        v.extend_from_slice(&(4 * channels).to_le_bytes());
        v.extend_from_slice(&32u16.to_le_bytes());
        v.extend_from_slice(b"data\xff\xff\xff\xff");
        for s in samples {
            v.extend_from_slice(&s.to_le_bytes());
        }
        v
    }

    #[test]
    fn streamed_float_wav_is_parsed_and_limited() {
        let samples: Vec<f32> = (0..8000).map(|i| (i as f32 / 8000.0) - 0.5).collect();
        let limits = AudioLimits::default();
        let bytes = wav_stream(2, 8000, &samples, true);
        let got = read_f32_wav_stream(&mut bytes.as_slice(), &limits).unwrap();
        assert_eq!((got.channels, got.sample_rate), (2, 8000));
        assert_eq!(got.samples, samples);
        let strict = AudioLimits {
            max_seconds: 0.25,
            ..limits
        };
        assert!(matches!(
            read_f32_wav_stream(&mut bytes.as_slice(), &strict),
            Err(FfmpegFailure::Audio(AudioError::TooLong { .. }))
        ));
        let bad_rate = wav_stream(1, 1000, &samples, false);
        assert!(matches!(
            read_f32_wav_stream(&mut bad_rate.as_slice(), &limits),
            Err(FfmpegFailure::Audio(AudioError::Unsupported(_)))
        ));
        assert!(matches!(
            read_f32_wav_stream(&mut &b"OggS"[..], &limits),
            Err(FfmpegFailure::Failed(_))
        ));
    }

    #[test]
    fn an_ffmpeg_failure_names_the_file_but_not_its_folder() {
        let ffmpeg = super::super::default_ffmpeg();
        if std::process::Command::new(&ffmpeg)
            .arg("-version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED: ffmpeg is not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join("audio.bin");
        std::fs::write(&page, b"<!doctype html><html><body>Sign in</body></html>").unwrap();
        let err = match ffmpeg_waveform_16k(&ffmpeg, &page, &AudioLimits::default()) {
            Err(FfmpegFailure::Failed(m)) => m,
            other => panic!("{:?}", other.map(|w| w.len())),
        };
        let folder = dir.path().display().to_string();
        assert!(!err.contains(&folder), "{err}");
        assert!(err.contains("audio.bin"), "{err}");
    }
}
