//! Decoding an audio file to interleaved `f32` PCM at its native rate.
//!
//! * WAV (`RIFF`/`WAVE`) is read with `hound` (PCM 8/16/24/32-bit and IEEE
//!   float). WAV files hound rejects (μ-law, A-law, streamed headers with a
//!   bogus length, ...) fall back to symphonia.
//! * Everything else goes through symphonia 0.5: MP3, AAC (ADTS or in MP4/M4A),
//!   Apple Lossless (ALAC in MP4/M4A), Ogg Vorbis, FLAC, and PCM in WAV. Opus
//!   (symphonia 0.5 has no Opus decoder), AMR, WMA and video containers other
//!   than MP4 are not built in: [`super::decode_file`] reads them through
//!   ffmpeg (`super::ffmpeg`) when it is installed, else they fail with
//!   [`AudioError::Unsupported`].
//!
//! Nothing here panics on hostile input: decoder errors become [`AudioError`]s,
//! and as a last line of defence a panic inside a third-party decoder is caught
//! and reported as [`AudioError::Corrupt`].

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::Path;

use symphonia::core::audio::{AudioBufferRef, SampleBuffer, SignalSpec};
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use crate::error::{AudioError, PipelineError, Result};

/// Limits applied to audio inputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AudioLimits {
    /// Longest accepted input in seconds (default 600 s = 10 min). Decoding
    /// stops as soon as it is exceeded.
    pub max_seconds: f64,
    /// An input whose 16 kHz int16 waveform peaks at or below this amplitude
    /// (full scale 1.0) is rejected as silent. Default 1e-3, i.e. −60 dBFS or
    /// 32 int16 steps: far below any usable speech recording, above dither
    /// and codec noise on digital silence.
    pub silence_peak: f32,
}

impl AudioLimits {
    /// Default [`max_seconds`](Self::max_seconds).
    pub const DEFAULT_MAX_SECONDS: f64 = 600.0;
    /// Default [`silence_peak`](Self::silence_peak).
    pub const DEFAULT_SILENCE_PEAK: f32 = 1e-3;
}

impl Default for AudioLimits {
    fn default() -> Self {
        Self {
            max_seconds: Self::DEFAULT_MAX_SECONDS,
            silence_peak: Self::DEFAULT_SILENCE_PEAK,
        }
    }
}

/// Lowest native sample rate accepted, in Hz.
pub const MIN_SAMPLE_RATE: u32 = 4_000;
/// Highest native sample rate accepted, in Hz.
pub const MAX_SAMPLE_RATE: u32 = 768_000;
/// Most channels accepted (7.1 plus headroom).
pub const MAX_CHANNELS: usize = 32;

/// Decoded PCM at the file's own sample rate.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedAudio {
    /// Interleaved samples, full scale = ±1.0 (integer PCM is divided by
    /// 2^(bits−1), so 16-bit values are exactly `i16 / 32768`).
    pub samples: Vec<f32>,
    /// Number of interleaved channels (≥ 1).
    pub channels: usize,
    /// Samples per second per channel.
    pub sample_rate: u32,
}

impl DecodedAudio {
    /// Number of frames (samples per channel).
    pub fn frames(&self) -> usize {
        self.samples.len() / self.channels.max(1)
    }

    /// Duration in seconds.
    pub fn duration_seconds(&self) -> f64 {
        self.frames() as f64 / f64::from(self.sample_rate.max(1))
    }

    /// Down-mix to mono by averaging the channels.
    ///
    /// For mono and stereo this is what ffmpeg's `-ac 1` does ((L+R)/2); for
    /// more channels ffmpeg applies an ITU-style matrix (centre at full level,
    /// LFE dropped), which this plain average does not reproduce.
    pub fn to_mono(&self) -> Vec<f32> {
        match self.channels {
            0 => Vec::new(),
            1 => self.samples.clone(),
            c => {
                let scale = 1.0 / c as f64;
                self.samples
                    .chunks_exact(c)
                    .map(|frame| (frame.iter().map(|&s| f64::from(s)).sum::<f64>() * scale) as f32)
                    .collect()
            }
        }
    }
}

/// Decodes an audio file at its native rate with the built-in decoders only (see
/// [`super::decode_file`] for the ffmpeg fallback).
///
/// Fails with [`PipelineError::Io`] when the file cannot be opened, and with
/// [`PipelineError::Audio`] when its content is unusable (see [`decode_bytes`]).
pub(crate) fn decode_file_builtin(path: &Path, limits: &AudioLimits) -> Result<DecodedAudio> {
    let mut file = File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut head = [0u8; 12];
    let n = read_head(&mut file, &mut head).map_err(|e| PipelineError::io(path, e))?;
    if n == 0 {
        return Err(AudioError::Empty.into());
    }
    file.rewind().map_err(|e| PipelineError::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str());
    if is_riff_wave(&head[..n]) {
        match guarded(|| decode_wav_hound(std::io::BufReader::new(&mut file), limits)) {
            Ok(audio) => return Ok(audio),
            Err(e @ (AudioError::TooLong { .. } | AudioError::Empty)) => return Err(e.into()),
            Err(hound_err) => {
                file.rewind().map_err(|e| PipelineError::io(path, e))?;
                return decode_symphonia(Box::new(file), ext, limits)
                    .map_err(|sym_err| prefer_wav_error(hound_err, sym_err).into());
            }
        }
    }
    let priming = if is_mp4(&head[..n]) {
        let skip = mp4_priming(&mut std::io::BufReader::new(&mut file));
        file.rewind().map_err(|e| PipelineError::io(path, e))?;
        skip
    } else {
        None
    };
    Ok(decode_symphonia(Box::new(file), ext, limits)
        .and_then(|audio| trim_priming(audio, priming))?)
}

/// Decodes an in-memory audio file at its native rate.
///
/// `ext_hint` is the file extension without the dot (`"mp3"`, `"m4a"`, ...),
/// if known; the format is detected from the content either way.
///
/// Errors: [`AudioError::Empty`] (no samples), [`AudioError::Unsupported`]
/// (unknown container, codec without a decoder, odd sample rate or channel
/// count), [`AudioError::Corrupt`] (undecodable data), [`AudioError::TooLong`]
/// (longer than `limits.max_seconds`; decoding stops as soon as the limit is
/// passed, so a huge file does not fill memory).
pub fn decode_bytes(
    bytes: &[u8],
    ext_hint: Option<&str>,
    limits: &AudioLimits,
) -> Result<DecodedAudio, AudioError> {
    if bytes.is_empty() {
        return Err(AudioError::Empty);
    }
    if is_riff_wave(bytes) {
        match guarded(|| decode_wav_hound(Cursor::new(bytes), limits)) {
            Ok(audio) => return Ok(audio),
            Err(e @ (AudioError::TooLong { .. } | AudioError::Empty)) => return Err(e),
            Err(hound_err) => {
                return decode_symphonia(Box::new(Cursor::new(bytes.to_vec())), ext_hint, limits)
                    .map_err(|sym_err| prefer_wav_error(hound_err, sym_err));
            }
        }
    }
    let priming = if is_mp4(bytes) {
        mp4_priming(&mut Cursor::new(bytes))
    } else {
        None
    };
    decode_symphonia(Box::new(Cursor::new(bytes.to_vec())), ext_hint, limits)
        .and_then(|audio| trim_priming(audio, priming))
}

fn read_head(file: &mut File, head: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read(&mut head[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

fn is_riff_wave(head: &[u8]) -> bool {
    head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE"
}

fn is_mp4(head: &[u8]) -> bool {
    head.len() >= 8 && &head[4..8] == b"ftyp"
}

/// Encoder priming of an MP4 audio track: the `media_time` of the first
/// non-empty edit of the first sound track's edit list, with the track's
/// media timescale. ffmpeg skips these samples (AAC encoders put 1024–2112
/// priming samples first); symphonia 0.5 parses the edit list but ignores
/// it, so the decoded audio would otherwise start late.
///
/// Best effort: any parse problem gives `None` (no trimming).
fn mp4_priming<R: Read + Seek>(reader: &mut R) -> Option<Mp4Priming> {
    let end = reader.seek(std::io::SeekFrom::End(0)).ok()?;
    let moov = mp4_find(reader, 0, end, b"moov")?;
    let mut pos = moov.0;
    while let Some((trak, trak_end)) = mp4_find(reader, pos, moov.1, b"trak") {
        pos = trak_end;
        let Some(mdia) = mp4_find(reader, trak, trak_end, b"mdia") else {
            continue;
        };
        let Some(hdlr) = mp4_find(reader, mdia.0, mdia.1, b"hdlr") else {
            continue;
        };
        // hdlr: version/flags (4), pre_defined (4), handler_type (4).
        let handler = mp4_read(reader, hdlr.0 + 8, 4)?;
        if handler != b"soun" {
            continue;
        }
        let mdhd = mp4_find(reader, mdia.0, mdia.1, b"mdhd")?;
        let version = mp4_read(reader, mdhd.0, 1)?[0];
        let timescale_at = if version == 1 {
            mdhd.0 + 4 + 16
        } else {
            mdhd.0 + 4 + 8
        };
        let timescale = u32::from_be_bytes(mp4_read(reader, timescale_at, 4)?.try_into().ok()?);
        let edts = mp4_find(reader, trak, trak_end, b"edts")?;
        let elst = mp4_find(reader, edts.0, edts.1, b"elst")?;
        let header = mp4_read(reader, elst.0, 8)?;
        let version = header[0];
        let entries = u32::from_be_bytes(header[4..8].try_into().ok()?);
        let entry_len = if version == 1 { 20 } else { 12 };
        for i in 0..u64::from(entries.min(64)) {
            let e = mp4_read(reader, elst.0 + 8 + i * entry_len, entry_len as usize)?;
            let media_time = if version == 1 {
                i64::from_be_bytes(e[8..16].try_into().ok()?)
            } else {
                i64::from(i32::from_be_bytes(e[4..8].try_into().ok()?))
            };
            // media_time −1 marks an empty edit (a delay); skip it.
            if media_time >= 0 {
                return (timescale > 0).then_some(Mp4Priming {
                    media_time: media_time as u64,
                    timescale,
                });
            }
        }
        return None;
    }
    None
}

#[derive(Debug, Clone, Copy)]
struct Mp4Priming {
    media_time: u64,
    timescale: u32,
}

/// Finds the first box of type `kind` among the boxes in `[start, end)` and
/// returns its payload range.
fn mp4_find<R: Read + Seek>(
    reader: &mut R,
    start: u64,
    end: u64,
    kind: &[u8; 4],
) -> Option<(u64, u64)> {
    let mut pos = start;
    while pos + 8 <= end {
        let head = mp4_read(reader, pos, 8)?;
        let size32 = u32::from_be_bytes(head[..4].try_into().ok()?);
        let (size, header) = match size32 {
            0 => (end - pos, 8),
            1 => (
                u64::from_be_bytes(mp4_read(reader, pos + 8, 8)?.try_into().ok()?),
                16,
            ),
            n => (u64::from(n), 8),
        };
        if size < header || pos.checked_add(size)? > end {
            return None;
        }
        if &head[4..8] == kind {
            return Some((pos + header, pos + size));
        }
        pos += size;
    }
    None
}

fn mp4_read<R: Read + Seek>(reader: &mut R, at: u64, len: usize) -> Option<Vec<u8>> {
    reader.seek(std::io::SeekFrom::Start(at)).ok()?;
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).ok()?;
    Some(buf)
}

/// Drops the MP4 priming samples from the start, as ffmpeg does.
fn trim_priming(
    mut audio: DecodedAudio,
    priming: Option<Mp4Priming>,
) -> Result<DecodedAudio, AudioError> {
    if let Some(p) = priming {
        let frames =
            u128::from(p.media_time) * u128::from(audio.sample_rate) / u128::from(p.timescale);
        let drop = usize::try_from(frames)
            .unwrap_or(usize::MAX)
            .saturating_mul(audio.channels)
            .min(audio.samples.len());
        audio.samples.drain(..drop);
        if audio.samples.is_empty() {
            return Err(AudioError::Empty);
        }
    }
    Ok(audio)
}

/// When both WAV readers fail, report the more telling of the two errors.
fn prefer_wav_error(hound_err: AudioError, sym_err: AudioError) -> AudioError {
    match sym_err {
        AudioError::TooLong { .. } | AudioError::Empty => sym_err,
        _ => hound_err,
    }
}

/// Runs a decoder, turning a panic inside third-party code into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, AudioError>) -> Result<T, AudioError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(AudioError::Corrupt(format!("decoder failed: {what}")))
    })
}

fn check_rate_and_channels(sample_rate: u32, channels: usize) -> Result<(), AudioError> {
    if channels == 0 || channels > MAX_CHANNELS {
        return Err(AudioError::Unsupported(format!(
            "{channels} channels (1 to {MAX_CHANNELS} are supported)"
        )));
    }
    if !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&sample_rate) {
        return Err(AudioError::Unsupported(format!(
            "sample rate {sample_rate} Hz ({MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz are supported)"
        )));
    }
    Ok(())
}

fn too_long(frames: u64, sample_rate: u32, limits: &AudioLimits) -> Option<AudioError> {
    let seconds = frames as f64 / f64::from(sample_rate);
    (seconds > limits.max_seconds).then_some(AudioError::TooLong {
        seconds,
        max_seconds: limits.max_seconds,
    })
}

fn decode_wav_hound<R: Read>(reader: R, limits: &AudioLimits) -> Result<DecodedAudio, AudioError> {
    let mut wav = hound::WavReader::new(reader).map_err(hound_error)?;
    let spec = wav.spec();
    let channels = usize::from(spec.channels);
    check_rate_and_channels(spec.sample_rate, channels)?;
    if let Some(e) = too_long(u64::from(wav.duration()), spec.sample_rate, limits) {
        return Err(e);
    }
    let len = wav.len() as usize;
    let samples: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => wav
            .samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(hound_error)?,
        (hound::SampleFormat::Int, bits @ 1..=32) => {
            let scale = 1.0 / f64::from(1u32 << (bits - 1));
            let mut out = Vec::with_capacity(len);
            for s in wav.samples::<i32>() {
                out.push((f64::from(s.map_err(hound_error)?) * scale) as f32);
            }
            out
        }
        (format, bits) => {
            return Err(AudioError::Unsupported(format!(
                "{bits}-bit {format:?} WAV samples"
            )))
        }
    };
    if samples.is_empty() {
        return Err(AudioError::Empty);
    }
    Ok(DecodedAudio {
        samples,
        channels,
        sample_rate: spec.sample_rate,
    })
}

fn hound_error(e: hound::Error) -> AudioError {
    match e {
        hound::Error::Unsupported => AudioError::Unsupported("WAV sample encoding".to_owned()),
        hound::Error::IoError(io) => AudioError::Corrupt(format!("WAV data: {io}")),
        other => AudioError::Corrupt(format!("WAV: {other}")),
    }
}

fn decode_symphonia(
    source: Box<dyn MediaSource>,
    ext_hint: Option<&str>,
    limits: &AudioLimits,
) -> Result<DecodedAudio, AudioError> {
    guarded(|| decode_symphonia_inner(source, ext_hint, limits))
}

fn decode_symphonia_inner(
    source: Box<dyn MediaSource>,
    ext_hint: Option<&str>,
    limits: &AudioLimits,
) -> Result<DecodedAudio, AudioError> {
    let mss = MediaSourceStream::new(source, Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = ext_hint {
        hint.with_extension(ext);
    }
    // Gapless: drop encoder delay and padding (LAME/iTunes info, MP4 edit
    // lists) as ffmpeg does.
    let format_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &format_opts, &MetadataOptions::default())
        .map_err(|e| match e {
            SymphoniaError::Unsupported(_) => {
                AudioError::Unsupported("not a recognised audio container or codec".to_owned())
            }
            other => AudioError::Corrupt(format!("cannot read the container: {other}")),
        })?;
    let mut format = probed.format;
    let track = format
        .default_track()
        .filter(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .or_else(|| {
            format
                .tracks()
                .iter()
                .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        })
        .ok_or_else(|| AudioError::Unsupported("the file has no audio track".to_owned()))?;
    let track_id = track.id;
    let params = track.codec_params.clone();
    if let (Some(n_frames), Some(rate)) = (params.n_frames, params.sample_rate) {
        if rate > 0 {
            if let Some(e) = too_long(n_frames, rate, limits) {
                return Err(e);
            }
        }
    }
    let mut decoder = symphonia::default::get_codecs()
        .make(&params, &DecoderOptions::default())
        .map_err(|e| AudioError::Unsupported(format!("no decoder for this codec ({e})")))?;

    let mut samples: Vec<f32> = Vec::new();
    let mut spec: Option<SignalSpec> = None;
    let mut buffer: Option<SampleBuffer<f32>> = None;
    let mut bad_packets = 0usize;
    let mut first_error: Option<String> = None;
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::ResetRequired) => break,
            Err(e) => {
                // A damaged tail: keep what decoded (ffmpeg does the same),
                // unless nothing did.
                if samples.is_empty() {
                    return Err(AudioError::Corrupt(format!("cannot demux: {e}")));
                }
                tracing::warn!("audio demuxing stopped early: {e}");
                break;
            }
        };
        if packet.track_id() != track_id {
            continue;
        }
        let decoded = match decoder.decode(&packet) {
            Ok(d) => d,
            Err(SymphoniaError::DecodeError(msg)) => {
                bad_packets += 1;
                first_error.get_or_insert_with(|| msg.to_owned());
                continue;
            }
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::Unsupported(what)) => {
                return Err(AudioError::Unsupported(format!("codec feature: {what}")))
            }
            Err(e) => return Err(AudioError::Corrupt(format!("cannot decode: {e}"))),
        };
        append_decoded(&decoded, &mut spec, &mut buffer, &mut samples)?;
        if let Some(s) = spec {
            let frames = (samples.len() / s.channels.count().max(1)) as u64;
            if let Some(e) = too_long(frames, s.rate, limits) {
                return Err(e);
            }
        }
    }
    if bad_packets > 0 {
        tracing::warn!(
            "{bad_packets} undecodable audio packet(s) skipped: {}",
            first_error.as_deref().unwrap_or("")
        );
    }
    let Some(spec) = spec else {
        return Err(match first_error {
            Some(msg) => AudioError::Corrupt(format!("no packet could be decoded: {msg}")),
            None => AudioError::Empty,
        });
    };
    if samples.is_empty() {
        return Err(AudioError::Empty);
    }
    Ok(DecodedAudio {
        samples,
        channels: spec.channels.count(),
        sample_rate: spec.rate,
    })
}

/// Appends one decoded packet. The channel count comes from the decoded
/// buffer: for AAC in MP4, `codec_params.channels` is often `None`.
fn append_decoded(
    decoded: &AudioBufferRef<'_>,
    spec: &mut Option<SignalSpec>,
    buffer: &mut Option<SampleBuffer<f32>>,
    samples: &mut Vec<f32>,
) -> Result<(), AudioError> {
    let this = *decoded.spec();
    match spec {
        None => {
            check_rate_and_channels(this.rate, this.channels.count())?;
            *spec = Some(this);
        }
        Some(first) if first.rate != this.rate || first.channels != this.channels => {
            return Err(AudioError::Unsupported(format!(
                "the stream changes from {} Hz / {} channel(s) to {} Hz / {} channel(s) midway",
                first.rate,
                first.channels.count(),
                this.rate,
                this.channels.count()
            )));
        }
        Some(_) => {}
    }
    if decoded.frames() == 0 {
        return Ok(());
    }
    let needed = decoded.capacity() as u64;
    if buffer
        .as_ref()
        .is_none_or(|b| (b.capacity() as u64) < needed)
    {
        *buffer = Some(SampleBuffer::<f32>::new(needed, this));
    }
    if let Some(buf) = buffer.as_mut() {
        buf.copy_interleaved_ref(decoded.clone());
        samples.extend_from_slice(buf.samples());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_bytes(spec: hound::WavSpec, samples: &[i32]) -> Vec<u8> {
        let mut cursor = Cursor::new(Vec::new());
        {
            let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
            for &s in samples {
                w.write_sample(s).unwrap();
            }
            w.finalize().unwrap();
        }
        cursor.into_inner()
    }

    #[test]
    fn wav_int_scaling_is_exact() {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 22_050,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let bytes = wav_bytes(spec, &[-32768, 32767, 1, -1]);
        let a = decode_bytes(&bytes, Some("wav"), &AudioLimits::default()).unwrap();
        assert_eq!(a.channels, 2);
        assert_eq!(a.sample_rate, 22_050);
        assert_eq!(
            a.samples,
            vec![-1.0, 32767.0 / 32768.0, 1.0 / 32768.0, -1.0 / 32768.0]
        );
        assert_eq!(a.to_mono(), vec![-1.0 / 65536.0, 0.0]);
    }

    #[test]
    fn wav_24_bit_and_limits() {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 8_000,
            bits_per_sample: 24,
            sample_format: hound::SampleFormat::Int,
        };
        let bytes = wav_bytes(spec, &vec![1 << 22; 8_000 * 3]);
        let a = decode_bytes(&bytes, None, &AudioLimits::default()).unwrap();
        assert_eq!(a.frames(), 24_000);
        assert_eq!(a.samples[0], 0.5);
        let short = AudioLimits {
            max_seconds: 2.0,
            ..AudioLimits::default()
        };
        let err = decode_bytes(&bytes, None, &short).unwrap_err();
        assert!(
            matches!(err, AudioError::TooLong { seconds, .. } if (seconds - 3.0).abs() < 1e-9),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_empty_garbage_and_odd_rates() {
        assert!(matches!(
            decode_bytes(&[], None, &AudioLimits::default()),
            Err(AudioError::Empty)
        ));
        let err = decode_bytes(
            b"definitely not audio at all",
            Some("mp3"),
            &AudioLimits::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, AudioError::Unsupported(_) | AudioError::Corrupt(_)),
            "{err:?}"
        );
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 1_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let err =
            decode_bytes(&wav_bytes(spec, &[0; 100]), None, &AudioLimits::default()).unwrap_err();
        assert!(err.to_string().contains("1000 Hz"), "{err}");
        let spec = hound::WavSpec {
            sample_rate: 16_000,
            ..spec
        };
        assert!(matches!(
            decode_bytes(&wav_bytes(spec, &[]), None, &AudioLimits::default()),
            Err(AudioError::Empty)
        ));
    }
}
