//! What a video is asked to be ([`VideoSpec`] and its parts) and the small
//! types the writer and its two backends share. A leaf of `video`: the writer
//! (`mod.rs`) and the backends (`ffmpeg.rs`, `builtin.rs`) use it, it uses
//! neither.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::compose::OutputGeometry;
use crate::audio::DEFAULT_FPS;
use crate::error::{AudioError, PipelineError, Result};

/// Decoded audio samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Pcm {
    samples: Vec<f32>,
    channels: u16,
    sample_rate: u32,
}

impl Pcm {
    /// Interleaved `f32` samples in `[-1, 1]`, `channels` per frame, at
    /// `sample_rate` Hz.
    pub fn new(samples: Vec<f32>, channels: u16, sample_rate: u32) -> Result<Self> {
        if channels == 0 {
            return Err(PipelineError::InvalidInput(
                "pcm audio needs at least one channel".into(),
            ));
        }
        if sample_rate == 0 {
            return Err(PipelineError::InvalidInput(
                "pcm audio sample rate must be positive".into(),
            ));
        }
        if !samples.len().is_multiple_of(usize::from(channels)) {
            return Err(PipelineError::InvalidInput(format!(
                "pcm audio has {} samples, not a multiple of its {channels} channels",
                samples.len()
            )));
        }
        if samples.is_empty() {
            return Err(AudioError::Empty.into());
        }
        if let Some(bad) = samples.iter().find(|s| !s.is_finite()) {
            return Err(AudioError::Corrupt(format!(
                "pcm audio holds a non-finite sample ({bad})"
            ))
            .into());
        }
        Ok(Self {
            samples,
            channels,
            sample_rate,
        })
    }

    /// Reads a WAV file (any integer or float sample format hound knows).
    pub fn read_wav(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(PipelineError::MissingFile(path.to_path_buf()));
        }
        let corrupt = |e: hound::Error| {
            PipelineError::Audio(AudioError::Corrupt(format!("{}: {e}", path.display())))
        };
        let mut reader = hound::WavReader::open(path).map_err(corrupt)?;
        let spec = reader.spec();
        let samples: Vec<f32> = match spec.sample_format {
            hound::SampleFormat::Float => reader
                .samples::<f32>()
                .collect::<std::result::Result<_, _>>()
                .map_err(corrupt)?,
            hound::SampleFormat::Int => {
                let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
                reader
                    .samples::<i32>()
                    .map(|s| s.map(|v| v as f32 * scale))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(corrupt)?
            }
        };
        Self::new(samples, spec.channels, spec.sample_rate)
    }

    /// Interleaved samples.
    pub fn samples(&self) -> &[f32] {
        &self.samples
    }

    /// Channel count.
    pub fn channels(&self) -> u16 {
        self.channels
    }

    /// Sample rate in Hz.
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// Samples per channel.
    pub fn frames(&self) -> usize {
        self.samples.len() / usize::from(self.channels)
    }

    /// Duration in seconds.
    pub fn duration_s(&self) -> f64 {
        self.frames() as f64 / f64::from(self.sample_rate)
    }
}

/// The speech to mux in: a file, its decoded samples, or both.
///
/// * The ffmpeg backend reads `file` itself (any format ffmpeg knows, at its
///   native quality); with only `pcm` it writes a temporary WAV for ffmpeg.
/// * The built-in backend encodes `pcm`; with only `file` it can read WAV
///   files itself (other formats must be decoded by the caller).
/// * The duration that decides the frame count comes from `pcm` when present,
///   otherwise from decoding `file`.
#[derive(Clone, Debug, Default)]
pub struct AudioInput {
    /// Audio file path.
    pub file: Option<PathBuf>,
    /// Decoded samples at their native rate.
    pub pcm: Option<Pcm>,
}

impl AudioInput {
    /// Audio from a file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            file: Some(path.into()),
            pcm: None,
        }
    }

    /// Audio from decoded samples.
    pub fn pcm(pcm: Pcm) -> Self {
        Self {
            file: None,
            pcm: Some(pcm),
        }
    }

    /// Adds the decoded samples of the same audio.
    pub fn with_pcm(mut self, pcm: Pcm) -> Self {
        self.pcm = Some(pcm);
        self
    }

    /// Adds the file the samples came from.
    pub fn with_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }
}

/// Which encoder to use (configuration value: `auto`, `ffmpeg`, `builtin`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EncoderBackend {
    /// ffmpeg when it probes OK, otherwise the built-in encoder.
    #[default]
    Auto,
    /// The `ffmpeg` program (H.264 High + AAC-LC); an error when it is absent.
    Ffmpeg,
    /// The built-in encoder (H.264 Constrained Baseline + Opus).
    Builtin,
}

impl FromStr for EncoderBackend {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "ffmpeg" => Ok(Self::Ffmpeg),
            "builtin" | "built-in" => Ok(Self::Builtin),
            other => Err(PipelineError::InvalidInput(format!(
                "unknown encoder backend `{other}` (expected auto, ffmpeg or builtin)"
            ))),
        }
    }
}

impl fmt::Display for EncoderBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Ffmpeg => "ffmpeg",
            Self::Builtin => "builtin",
        })
    }
}

impl From<EncoderKind> for EncoderBackend {
    /// The explicit choice of an encoder already resolved.
    fn from(kind: EncoderKind) -> Self {
        match kind {
            EncoderKind::Ffmpeg => Self::Ffmpeg,
            EncoderKind::Builtin => Self::Builtin,
        }
    }
}

/// The encoder that actually wrote a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncoderKind {
    /// The `ffmpeg` program: libx264 + AAC.
    Ffmpeg,
    /// OpenH264 + Opus + muxide.
    Builtin,
}

impl fmt::Display for EncoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ffmpeg => "ffmpeg",
            Self::Builtin => "builtin",
        })
    }
}

/// Output geometry as a configuration value (`crop` or `paste-back`).
///
/// The default is [`GeometryMode::PasteBack`]: users see their own photo with
/// the face animated, as the EchoMe worker delivered it. `Crop` is EchoMimic's
/// own output (the square face crop).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum GeometryMode {
    /// The generated `W x H` crop.
    Crop,
    /// The generated frames pasted back into the original photo.
    #[default]
    PasteBack,
}

impl FromStr for GeometryMode {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "crop" => Ok(Self::Crop),
            "paste-back" | "paste_back" | "pasteback" => Ok(Self::PasteBack),
            other => Err(PipelineError::InvalidInput(format!(
                "unknown output geometry `{other}` (expected crop or paste-back)"
            ))),
        }
    }
}

impl fmt::Display for GeometryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Crop => "crop",
            Self::PasteBack => "paste-back",
        })
    }
}

/// ffmpeg backend settings.
#[derive(Clone, Debug, PartialEq)]
pub struct FfmpegSettings {
    /// The program; `None` = [`FFMPEG_ENV`](super::FFMPEG_ENV) or `ffmpeg` on `PATH`.
    pub binary: Option<PathBuf>,
    /// libx264 constant rate factor (0-51, lower is better; 18 is visually
    /// near-lossless, the PyAV default the reference used is 23).
    pub crf: u8,
    /// libx264 preset (`ultrafast` ... `veryslow`).
    pub preset: String,
    /// AAC bit rate in kbit/s.
    pub audio_bitrate_kbps: u32,
}

impl Default for FfmpegSettings {
    fn default() -> Self {
        Self {
            binary: None,
            crf: 18,
            preset: "medium".into(),
            audio_bitrate_kbps: 128,
        }
    }
}

/// Built-in backend settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltinSettings {
    /// Target video bit rate as bits per pixel per frame (the bit rate is
    /// `bits_per_pixel * width * height * fps`).
    pub bits_per_pixel: f32,
    /// Seconds between key frames (seeking granularity).
    pub keyframe_interval_s: f64,
    /// Opus bit rate per channel in kbit/s.
    pub audio_bitrate_kbps_per_channel: u32,
}

impl Default for BuiltinSettings {
    fn default() -> Self {
        Self {
            bits_per_pixel: 0.2,
            keyframe_interval_s: 2.0,
            audio_bitrate_kbps_per_channel: 64,
        }
    }
}

/// Everything [`VideoWriter::create`](super::VideoWriter::create) needs.
#[derive(Clone, Debug)]
pub struct VideoSpec {
    /// Width of the frames given to [`VideoWriter::write_frame`](super::VideoWriter::write_frame).
    pub width: u32,
    /// Height of the frames given to [`VideoWriter::write_frame`](super::VideoWriter::write_frame).
    pub height: u32,
    /// Frames per second (fractional rates such as 30000/1001 are fine).
    pub fps: f64,
    /// The speech to mux in (required: silent videos are not produced).
    pub audio: AudioInput,
    /// Encoder choice.
    pub backend: EncoderBackend,
    /// Output geometry.
    pub geometry: OutputGeometry,
    /// ffmpeg settings.
    pub ffmpeg: FfmpegSettings,
    /// Built-in encoder settings.
    pub builtin: BuiltinSettings,
    /// Largest file allowed, in bytes (an upload limit): the video bit rate is capped from
    /// [`size_budget`] so that the file fits, and [`VideoWriter::create`](super::VideoWriter::create)
    /// refuses a video that could not fit at a watchable rate. `None`: no limit.
    pub max_bytes: Option<u64>,
}

/// Bits per pixel per frame below which a video is not worth making: H.264 at this rate
/// turns a face into blocks. [`size_budget`] refuses a limit that leaves less.
pub const MIN_BITS_PER_PIXEL: f64 = 0.02;

/// The audio track's share of a size limit, in bits per second: the larger of the two
/// backends' rates (AAC 128 kbit/s; Opus 64 kbit/s per channel, at most two channels) with
/// half again as margin.
const AUDIO_ALLOWANCE_BPS: f64 = 192_000.0;

/// How an MP4 of a given length stays under a byte limit: the video bit rate cap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeBudget {
    /// The limit, in bytes.
    pub max_bytes: u64,
    /// Largest video bit rate, bits per second, with a one-second rate buffer: over the
    /// whole file the video track stays under `video_bps * (duration + 1 s)`.
    pub video_bps: f64,
    /// `video_bps` per pixel per frame.
    pub bits_per_pixel: f64,
}

/// The video bit rate that keeps a `duration_s` MP4 of `width x height` frames at `fps`
/// under `max_bytes`: the limit less the container's index (32 KiB plus 24 bytes per video
/// and audio sample) and 192 kbit/s of audio, spread over the duration plus
/// one second of rate buffer. An error ([`PipelineError::InvalidInput`], a bad input) when
/// that leaves less than [`MIN_BITS_PER_PIXEL`]: the request asks for more video than the
/// limit can carry.
pub fn size_budget(
    max_bytes: u64,
    width: u32,
    height: u32,
    fps: f64,
    duration_s: f64,
) -> Result<SizeBudget> {
    let duration = duration_s.max(0.0);
    let index = 32.0 * 1024.0 + duration * (fps + 50.0) * 24.0;
    let audio = AUDIO_ALLOWANCE_BPS * duration / 8.0;
    let video_bits = (max_bytes as f64 - index - audio) * 8.0;
    let video_bps = video_bits.max(0.0) / (duration + 1.0);
    let bits_per_pixel = video_bps / (f64::from(width) * f64::from(height) * fps);
    if bits_per_pixel < MIN_BITS_PER_PIXEL {
        return Err(PipelineError::InvalidInput(format!(
            "a {duration:.1} s video of {width}x{height} at {fps} fps cannot fit the upload \
             limit of {max_bytes} bytes: that leaves {bits_per_pixel:.4} bit per pixel, below \
             the {MIN_BITS_PER_PIXEL} a watchable picture needs; send shorter audio or a \
             smaller photo"
        )));
    }
    Ok(SizeBudget {
        max_bytes,
        video_bps,
        bits_per_pixel,
    })
}

impl VideoSpec {
    /// `width x height` frames at [`DEFAULT_FPS`], automatic backend, crop
    /// geometry.
    pub fn new(width: u32, height: u32, audio: AudioInput) -> Self {
        Self {
            width,
            height,
            fps: DEFAULT_FPS,
            audio,
            backend: EncoderBackend::Auto,
            geometry: OutputGeometry::Crop,
            ffmpeg: FfmpegSettings::default(),
            builtin: BuiltinSettings::default(),
            max_bytes: None,
        }
    }

    /// Sets the largest file allowed (see [`VideoSpec::max_bytes`]).
    pub fn with_max_bytes(mut self, max_bytes: Option<u64>) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Sets the frame rate.
    pub fn with_fps(mut self, fps: f64) -> Self {
        self.fps = fps;
        self
    }

    /// Sets the encoder choice.
    pub fn with_backend(mut self, backend: EncoderBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Sets the output geometry.
    pub fn with_geometry(mut self, geometry: OutputGeometry) -> Self {
        self.geometry = geometry;
        self
    }

    /// Sets the ffmpeg settings.
    pub fn with_ffmpeg(mut self, ffmpeg: FfmpegSettings) -> Self {
        self.ffmpeg = ffmpeg;
        self
    }

    /// Sets the built-in encoder settings.
    pub fn with_builtin(mut self, builtin: BuiltinSettings) -> Self {
        self.builtin = builtin;
        self
    }
}

/// What a backend reports once its file is complete.
pub(super) struct SinkSummary {
    pub(super) video_codec: String,
    pub(super) audio_codec: String,
}

/// `(numerator, denominator)` of a frame rate: exact for integer rates and the
/// NTSC family (`N*1000/1001`), otherwise to 1/1000 fps.
pub(crate) fn fps_rational(fps: f64) -> (u64, u64) {
    for den in [1u64, 1001, 100, 1000] {
        let num = fps * den as f64;
        if (num - num.round()).abs() < 1e-4 {
            return (num.round() as u64, den);
        }
    }
    ((fps * 1000.0).round() as u64, 1000)
}
