//! Writing the generated frames and the input speech into a browser-playable MP4.
//!
//! [`VideoWriter`] is a streaming writer: frames are pushed one at a time as the
//! VAE decodes them ([`VideoWriter::write_frame`], `W*H*3` RGB24 bytes) and the
//! whole video is never held in memory. [`VideoWriter::finish`] muxes the audio
//! in, checks the result and only then moves it to the requested path.
//!
//! # Backends
//!
//! | | [`EncoderKind::Ffmpeg`] (production choice) | [`EncoderKind::Builtin`] (no external program) |
//! |---|---|---|
//! | how | raw RGB24 piped into an `ffmpeg` child process | OpenH264 (bundled C++ source) + pure-Rust Opus + `muxide` MP4 |
//! | video | H.264 **High**, libx264 CRF 18 `medium` | H.264 **Constrained Baseline** (no B-frames, CAVLC) |
//! | audio | **AAC-LC** 128 kbit/s at the input rate | **Opus** 48 kHz, 64 kbit/s per channel |
//! | plays in | every browser and device | Chromium (tested here), Chrome, Edge, Firefox; Safari plays Opus in MP4 only in recent versions (not verified here) |
//! | licence | GPL ffmpeg used as a separate program: our code is unaffected | BSD-2 OpenH264 compiled from source: Cisco's H.264 patent licence covers only Cisco's own binaries, so whoever ships this build carries the patent question |
//! | quality | better at the same size (x264's rate-distortion, B-frames, CABAC) | about 3x the bits for the same look; the bit rate is sized from the frame area |
//! | measured | 512² 24 fps moving crop of a photo, 4 s: 218 KiB, RGB PSNR 37.7 dB | same clip at 0.2 bit/pixel: 631 KiB, 37.2 dB (0.1: 337 KiB, 35.5 dB) |
//! | length | audio track = input audio (AAC priming hidden by an edit list) | audio track up to 26 ms longer (Opus pre-skip and last-packet padding; muxide writes no edit list) |
//! | needs | `ffmpeg` with libx264 and aac at run time | nothing; OpenH264 prints one rate-control warning on stderr per video |
//!
//! [`EncoderBackend::Auto`] uses ffmpeg when [`probe_ffmpeg`] succeeds and
//! otherwise the built-in path (cargo feature `builtin-encoder`, on by default),
//! and logs which one it took. Both produce yuv420p with BT.601 limited-range
//! conversion and the same colour signalling (matrix BT.601 / SMPTE 170M,
//! primaries BT.709 = sRGB, transfer sRGB, limited range), `moov` before `mdat`
//! (fast start), even dimensions.
//!
//! # Length
//!
//! The model yields a couple of frames more than the audio lasts (docs/model.md M11).
//! The writer keeps exactly `ceil(audio_duration * fps)` frames: the extra
//! trailing frames are dropped as they arrive (counted in
//! [`VideoReport::frames_dropped_for_trim`]) and speech is never cut. If fewer
//! frames arrive than the audio needs, the last frame is repeated until the
//! audio ends ([`VideoReport::frames_repeated`], logged as a warning): the full
//! speech is always kept, and the video track ends within one frame after the
//! audio in both cases. A video without its audio is never produced: if the
//! audio cannot be read, encoded or muxed, `finish` fails with
//! [`PipelineError::Media`] or [`PipelineError::Audio`] and nothing is left at
//! the output path (the file is written under a temporary name in the same
//! folder and renamed on success).
//!
//! # Geometry
//!
//! [`OutputGeometry::Crop`] writes the `W x H` generated crop as is (what
//! EchoMimic's own script does). [`OutputGeometry::PasteBack`] pastes every
//! frame back into the original photo at the face crop rectangle with a
//! feathered edge (what the EchoMe worker did, docs/model.md M13); the worker's default
//! is paste-back ([`GeometryMode::default`]). Odd output sizes are made even by
//! **cropping** the last column and/or row (no invented pixels; the rest of the
//! picture keeps its exact position).

mod compose;
mod ffmpeg;
mod probe;
mod spec;

#[cfg(feature = "builtin-encoder")]
mod builtin;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

pub use compose::{OutputGeometry, PasteBack};
pub use ffmpeg::{probe_ffmpeg, resolve_ffmpeg, FfmpegInfo, FFMPEG_ENV};
pub use probe::{probe_mp4, Mp4Info, Mp4Track, TrackKind};
pub use spec::{
    size_budget, AudioInput, BuiltinSettings, EncoderBackend, EncoderKind, FfmpegSettings,
    GeometryMode, Pcm, SizeBudget, VideoSpec, MIN_BITS_PER_PIXEL,
};

use compose::{FrameShaper, MAX_SIDE};
use spec::SinkSummary;

/// Frame rate used when the request does not give one (defined with the audio
/// windows it decides, [`crate::audio::DEFAULT_FPS`]).
pub use crate::audio::DEFAULT_FPS;

/// Largest accepted frame rate.
const MAX_FPS: f64 = 240.0;

/// What [`VideoWriter::finish`] produced.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoReport {
    /// The final file.
    pub path: PathBuf,
    /// Size of the file in bytes.
    pub bytes: u64,
    /// The encoder used.
    pub backend: EncoderKind,
    /// Video codec description, e.g. `h264 high (libx264)`.
    pub video_codec: String,
    /// Audio codec description, e.g. `aac-lc 128 kbit/s`.
    pub audio_codec: String,
    /// Output width (even).
    pub width: u32,
    /// Output height (even).
    pub height: u32,
    /// Frames per second.
    pub fps: f64,
    /// Frames handed to [`VideoWriter::write_frame`].
    pub frames_received: u64,
    /// Frames in the file.
    pub frames_written: u64,
    /// Trailing frames dropped because the audio had already ended.
    pub frames_dropped_for_trim: u64,
    /// Copies of the last frame appended because the audio lasted longer than
    /// the frames received.
    pub frames_repeated: u64,
    /// Video duration in seconds (`frames_written / fps`).
    pub duration_s: f64,
    /// Duration of the input audio in seconds.
    pub audio_duration_s: f64,
}

/// Streaming MP4 writer; see the [module docs](self).
pub struct VideoWriter {
    /// Declared before `temp` so that, when a writer is dropped unfinished,
    /// the ffmpeg child is stopped before its partial file is deleted.
    sink: Sink,
    out_path: PathBuf,
    /// The partial file; dropping it (on any error) deletes it.
    temp: tempfile::TempPath,
    fps: f64,
    in_width: u32,
    in_height: u32,
    shaper: FrameShaper,
    audio_duration_s: f64,
    frames_needed: u64,
    frames_received: u64,
    frames_written: u64,
    /// The size limit the backends' bit rate was capped for, checked again at the end.
    max_bytes: Option<u64>,
}

enum Sink {
    Ffmpeg(ffmpeg::FfmpegSink),
    #[cfg(feature = "builtin-encoder")]
    Builtin(Box<builtin::BuiltinSink>),
}

impl Sink {
    fn push(&mut self, frame: &[u8]) -> Result<()> {
        match self {
            Self::Ffmpeg(s) => s.push(frame),
            #[cfg(feature = "builtin-encoder")]
            Self::Builtin(s) => s.push(frame),
        }
    }

    fn finish(self) -> Result<SinkSummary> {
        match self {
            Self::Ffmpeg(s) => s.finish(),
            #[cfg(feature = "builtin-encoder")]
            Self::Builtin(s) => s.finish(),
        }
    }

    fn kind(&self) -> EncoderKind {
        match self {
            Self::Ffmpeg(_) => EncoderKind::Ffmpeg,
            #[cfg(feature = "builtin-encoder")]
            Self::Builtin(_) => EncoderKind::Builtin,
        }
    }
}

impl fmt::Debug for VideoWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VideoWriter")
            .field("out_path", &self.out_path)
            .field("backend", &self.sink.kind())
            .field("fps", &self.fps)
            .field("input", &(self.in_width, self.in_height))
            .field("output", &self.shaper.output_size())
            .field("frames_needed", &self.frames_needed)
            .field("frames_received", &self.frames_received)
            .finish_non_exhaustive()
    }
}

impl VideoWriter {
    /// Starts a video at `out_path` (written under a temporary name in the
    /// same folder until [`finish`](Self::finish) succeeds).
    ///
    /// Reads (or decodes) the audio first, so a missing or corrupt audio input
    /// fails here, before any frame is encoded.
    pub fn create(out_path: impl AsRef<Path>, spec: &VideoSpec) -> Result<Self> {
        let out_path = out_path.as_ref().to_path_buf();
        validate_spec(spec)?;
        let shaper = FrameShaper::new(spec.width, spec.height, &spec.geometry)?;
        let (out_w, out_h) = shaper.output_size();

        let folder = match out_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !folder.is_dir() {
            return Err(PipelineError::Media(format!(
                "output folder {} does not exist",
                folder.display()
            )));
        }
        if out_path.is_dir() {
            return Err(PipelineError::Media(format!(
                "output path {} is a folder",
                out_path.display()
            )));
        }
        let file_name = out_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "video".into());
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{file_name}."))
            .suffix(".partial")
            .tempfile_in(&folder)
            .map_err(|e| PipelineError::io(&folder, e))?
            .into_temp_path();

        let kind = choose_backend(spec)?;
        let (sink, audio_duration_s) = match kind {
            EncoderKind::Ffmpeg => {
                let s = ffmpeg::FfmpegSink::spawn(&temp, &folder, out_w, out_h, spec)?;
                let d = s.audio_duration_s();
                (Sink::Ffmpeg(s), d)
            }
            #[cfg(feature = "builtin-encoder")]
            EncoderKind::Builtin => {
                let s = builtin::BuiltinSink::create(&temp, out_w, out_h, spec)?;
                let d = s.audio_duration_s();
                (Sink::Builtin(Box::new(s)), d)
            }
            #[cfg(not(feature = "builtin-encoder"))]
            EncoderKind::Builtin => return Err(no_builtin()),
        };
        let frames_needed = frames_for_audio(audio_duration_s, spec.fps);
        tracing::debug!(
            path = %out_path.display(),
            backend = %kind,
            width = out_w,
            height = out_h,
            fps = spec.fps,
            audio_duration_s,
            frames_needed,
            "video writer started"
        );
        Ok(Self {
            out_path,
            temp,
            fps: spec.fps,
            in_width: spec.width,
            in_height: spec.height,
            shaper,
            sink,
            audio_duration_s,
            frames_needed,
            frames_received: 0,
            frames_written: 0,
            max_bytes: spec.max_bytes,
        })
    }

    /// Number of frames the audio needs (`ceil(audio_duration * fps)`); frames
    /// pushed after that many are dropped.
    pub fn frames_needed(&self) -> u64 {
        self.frames_needed
    }

    /// Output `(width, height)`.
    pub fn output_size(&self) -> (u32, u32) {
        self.shaper.output_size()
    }

    /// The encoder in use.
    pub fn backend(&self) -> EncoderKind {
        self.sink.kind()
    }

    /// Pushes the next frame: `width * height * 3` bytes of RGB24, rows top to
    /// bottom.
    pub fn write_frame(&mut self, rgb: &[u8]) -> Result<()> {
        let expected = self.in_width as usize * self.in_height as usize * 3;
        if rgb.len() != expected {
            return Err(PipelineError::InvalidInput(format!(
                "frame {} has {} bytes, expected {expected} ({}x{} RGB24)",
                self.frames_received,
                rgb.len(),
                self.in_width,
                self.in_height
            )));
        }
        self.frames_received += 1;
        if self.frames_written >= self.frames_needed {
            return Ok(());
        }
        let frame = self.shaper.shape(rgb)?;
        self.sink.push(frame)?;
        self.frames_written += 1;
        Ok(())
    }

    /// Completes the file: repeats the last frame if the audio is longer than
    /// the frames received, muxes the audio, verifies the container (video
    /// frame count, audio track present and long enough, `moov` before
    /// `mdat`) and renames it to the output path.
    pub fn finish(mut self) -> Result<VideoReport> {
        if self.frames_received == 0 {
            return Err(PipelineError::InvalidInput(
                "no frames were written to the video".into(),
            ));
        }
        let mut frames_repeated = 0;
        if self.frames_written < self.frames_needed {
            let missing = self.frames_needed - self.frames_written;
            tracing::warn!(
                frames_received = self.frames_received,
                frames_needed = self.frames_needed,
                "fewer frames than the audio lasts: repeating the last frame {missing} time(s) so no speech is cut"
            );
            while self.frames_written < self.frames_needed {
                let frame = self.shaper.last_frame();
                self.sink.push(frame)?;
                self.frames_written += 1;
                frames_repeated += 1;
            }
        }
        let Self {
            out_path,
            temp,
            fps,
            shaper,
            sink,
            audio_duration_s,
            frames_received,
            frames_written,
            max_bytes,
            ..
        } = self;
        let backend = sink.kind();
        // The sink is finished (ffmpeg has exited, the muxer has flushed)
        // before the file is inspected; on any error `temp` is dropped here,
        // which deletes the partial file.
        let summary = sink.finish()?;
        verify_output(&temp, frames_written, fps, audio_duration_s, backend)?;
        let bytes = fs::metadata(&temp)
            .map_err(|e| PipelineError::io(temp.to_path_buf(), e))?
            .len();
        if let Some(max) = max_bytes.filter(|max| bytes > *max) {
            return Err(PipelineError::Media(format!(
                "the {backend} encoder made a {bytes}-byte video, over the limit of {max} bytes"
            )));
        }
        temp.persist(&out_path).map_err(|e| {
            PipelineError::Media(format!(
                "moving the finished video to {}: {}",
                out_path.display(),
                e.error
            ))
        })?;
        let (width, height) = shaper.output_size();
        let report = VideoReport {
            path: out_path,
            bytes,
            backend,
            video_codec: summary.video_codec,
            audio_codec: summary.audio_codec,
            width,
            height,
            fps,
            frames_received,
            frames_written,
            frames_dropped_for_trim: frames_received - (frames_written - frames_repeated),
            frames_repeated,
            duration_s: frames_written as f64 / fps,
            audio_duration_s,
        };
        tracing::info!(
            path = %report.path.display(),
            backend = %report.backend,
            frames = report.frames_written,
            dropped = report.frames_dropped_for_trim,
            repeated = report.frames_repeated,
            bytes = report.bytes,
            "video written"
        );
        Ok(report)
    }
}

fn validate_spec(spec: &VideoSpec) -> Result<()> {
    if !(spec.fps.is_finite() && spec.fps > 0.0 && spec.fps <= MAX_FPS) {
        return Err(PipelineError::InvalidInput(format!(
            "frame rate {} is outside (0, {MAX_FPS}]",
            spec.fps
        )));
    }
    if spec.width < 2 || spec.height < 2 || spec.width > MAX_SIDE || spec.height > MAX_SIDE {
        return Err(PipelineError::InvalidInput(format!(
            "frame size {}x{} is outside 2..={MAX_SIDE} per side",
            spec.width, spec.height
        )));
    }
    if spec.audio.file.is_none() && spec.audio.pcm.is_none() {
        return Err(PipelineError::InvalidInput(
            "a video needs its audio: neither an audio file nor samples were given".into(),
        ));
    }
    if let Some(file) = &spec.audio.file {
        if !file.is_file() {
            return Err(PipelineError::MissingFile(file.clone()));
        }
    }
    Ok(())
}

fn choose_backend(spec: &VideoSpec) -> Result<EncoderKind> {
    resolve_backend(spec.backend, spec.ffmpeg.binary.as_deref())
}

/// The encoder `choice` comes to on this machine: the one place where `auto` is
/// decided (ffmpeg when it probes OK, else the built-in encoder, with a
/// warning). `ffmpeg` is the binary to probe (`None`: [`resolve_ffmpeg`]'s
/// search). Errors when the chosen encoder is not usable. A caller that writes
/// many videos (the worker) resolves once at start and passes the result on.
pub fn resolve_backend(choice: EncoderBackend, ffmpeg: Option<&Path>) -> Result<EncoderKind> {
    match choice {
        EncoderBackend::Ffmpeg => {
            probe_ffmpeg(ffmpeg)?;
            Ok(EncoderKind::Ffmpeg)
        }
        EncoderBackend::Builtin => builtin_available().map(|()| EncoderKind::Builtin),
        EncoderBackend::Auto => match probe_ffmpeg(ffmpeg) {
            Ok(info) => {
                tracing::info!(ffmpeg = %info.binary.display(), version = %info.version, "video backend: ffmpeg");
                Ok(EncoderKind::Ffmpeg)
            }
            Err(e) => {
                if builtin_available().is_err() {
                    return Err(e);
                }
                tracing::warn!(
                    "ffmpeg is not usable ({e}): videos are encoded with the built-in encoder (H.264 Constrained Baseline + Opus audio); install ffmpeg for H.264 High + AAC"
                );
                Ok(EncoderKind::Builtin)
            }
        },
    }
}

fn builtin_available() -> Result<()> {
    if cfg!(feature = "builtin-encoder") {
        Ok(())
    } else {
        Err(no_builtin())
    }
}

fn no_builtin() -> PipelineError {
    PipelineError::Media(
        "this build has no built-in encoder (cargo feature `builtin-encoder` is off)".into(),
    )
}

/// `ceil(duration * fps)`, treating values within 1e-6 of an integer as that
/// integer so float noise does not add a frame; at least one frame.
pub(crate) fn frames_for_audio(duration_s: f64, fps: f64) -> u64 {
    let x = duration_s * fps;
    let r = x.round();
    let n = if (x - r).abs() < 1e-6 { r } else { x.ceil() };
    (n as u64).max(1)
}

/// Checks the finished container before it is handed out: moov before mdat,
/// one H.264 track with exactly the frames written, one audio track that lasts
/// at least as long as the input audio (within one frame).
fn verify_output(
    path: &Path,
    frames: u64,
    fps: f64,
    audio_s: f64,
    backend: EncoderKind,
) -> Result<()> {
    let info = probe_mp4(path)?;
    let fail = |what: String| {
        Err(PipelineError::Media(format!(
            "{backend} produced a bad file: {what}"
        )))
    };
    if !info.moov_before_mdat {
        return fail("the moov box is not before mdat (no fast start)".into());
    }
    let Some(video) = info.track(TrackKind::Video) else {
        return fail("no video track".into());
    };
    if video.codec != "avc1" {
        return fail(format!("video codec is `{}`, expected avc1", video.codec));
    }
    if video.sample_count != frames {
        return fail(format!(
            "{} video frames in the file, {frames} written",
            video.sample_count
        ));
    }
    let Some(audio) = info.track(TrackKind::Audio) else {
        return fail("no audio track: refusing to deliver a silent video".into());
    };
    let frame_s = 1.0 / fps;
    if audio.sample_count == 0 || audio.duration_s() + frame_s < audio_s {
        return fail(format!(
            "audio track lasts {:.3} s, the input audio {audio_s:.3} s",
            audio.duration_s()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::spec::fps_rational;
    use super::*;

    #[test]
    fn frame_count_covers_the_audio_without_float_noise() {
        assert_eq!(frames_for_audio(2.0, 24.0), 48);
        assert_eq!(frames_for_audio(1.5, 24.0), 36);
        assert_eq!(frames_for_audio(1.51, 24.0), 37);
        assert_eq!(frames_for_audio(0.1 * 3.0, 10.0), 3);
        assert_eq!(
            frames_for_audio(1001.0 / 30000.0 * 10.0, 30000.0 / 1001.0),
            10
        );
        assert_eq!(frames_for_audio(0.0001, 24.0), 1);
    }

    #[test]
    fn frame_rates_become_exact_rationals() {
        assert_eq!(fps_rational(24.0), (24, 1));
        assert_eq!(fps_rational(30000.0 / 1001.0), (30000, 1001));
        assert_eq!(fps_rational(29.97), (2997, 100));
        assert_eq!(fps_rational(12.5), (1250, 100));
    }

    #[test]
    fn config_values_parse() -> Result<()> {
        assert_eq!("auto".parse::<EncoderBackend>()?, EncoderBackend::Auto);
        assert_eq!("FFmpeg".parse::<EncoderBackend>()?, EncoderBackend::Ffmpeg);
        assert_eq!(
            "builtin".parse::<EncoderBackend>()?,
            EncoderBackend::Builtin
        );
        assert!("x264".parse::<EncoderBackend>().is_err());
        assert_eq!(
            "paste-back".parse::<GeometryMode>()?,
            GeometryMode::PasteBack
        );
        assert_eq!("crop".parse::<GeometryMode>()?, GeometryMode::Crop);
        assert_eq!(GeometryMode::default(), GeometryMode::PasteBack);
        Ok(())
    }

    #[test]
    fn the_writer_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<VideoWriter>();
    }

    #[test]
    fn pcm_rejects_bad_shapes() {
        assert!(Pcm::new(vec![0.0; 3], 2, 16000).is_err());
        assert!(Pcm::new(vec![], 1, 16000).is_err());
        assert!(Pcm::new(vec![0.0; 4], 0, 16000).is_err());
        assert!(Pcm::new(vec![f32::NAN; 4], 1, 16000).is_err());
        let pcm = Pcm::new(vec![0.0; 32000], 2, 16000).map_err(|e| e.to_string());
        assert_eq!(pcm.map(|p| p.duration_s()), Ok(1.0));
    }
}
