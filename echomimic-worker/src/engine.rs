//! The inference boundary: what the worker needs from a model, as two small traits.
//!
//! * [`Preparer`] runs on the fetcher thread, on the CPU, while the previous task is still on
//!   the GPU: decode the photo, find the face, decode and check the audio. Everything that can
//!   reject a task cheaply happens here, before any GPU time is spent.
//! * [`Engine`] owns the model and runs on the inference thread: it turns the prepared data into
//!   frames, reporting progress after every UNet call, checking the cancel flag between calls,
//!   and handing each decoded frame to a sink as soon as it exists (so the video is never held
//!   in memory).
//!
//! [`pipeline::PipelineEngine`] is the real EchoMimic implementation;
//! [`fake::FakeEngine`] is a deterministic stand-in for tests of the service itself.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use image::RgbImage;

use crate::error::WorkerError;
use crate::progress::EngineProgress;

pub mod fake;
pub mod pipeline;

/// Generation settings of one task, after the worker's defaults and the protocol's bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Denoising steps.
    pub steps: u32,
    /// Guidance scale (≤ 1 disables classifier-free guidance).
    pub cfg: f64,
    /// Seed of the initial noise.
    pub seed: u64,
    /// Frames per second.
    pub fps: f64,
    /// Requested frame count (`frames_num`); `None` = as many as the audio needs.
    pub frames_num: Option<u32>,
    /// Longest accepted audio, in seconds.
    pub max_audio_secs: f64,
}

/// The downloaded input files of one task.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The reference photo.
    pub image: &'a Path,
    /// The speech.
    pub audio: &'a Path,
    /// A private folder of this task (removed after the task) for files the preparer writes.
    pub work_dir: &'a Path,
}

/// A task ready for the GPU.
pub struct Prepared<D> {
    /// The decoded original photo (for paste-back), EXIF orientation applied.
    pub photo: RgbImage,
    /// The square face crop in photo pixels, `[x0, y0, x1, y1]`, end exclusive.
    pub crop: [u32; 4],
    /// Audio file to mux into the video (the download, or a cut copy in `work_dir` when
    /// `frames_num` asked for a shorter video).
    pub mux_audio: PathBuf,
    /// Duration of `mux_audio`, in seconds.
    pub audio_secs: f64,
    /// Frames the engine will generate.
    pub frames: u32,
    /// Notes for the user, joined into the `completed` message (e.g. a clamped `frames_num`).
    pub notes: Vec<String>,
    /// What the engine needs (face crop, mask, waveform, ...).
    pub data: D,
}

/// Turns downloaded files into a [`Prepared`] task. Runs on the fetcher thread (CPU only).
pub trait Preparer: Send + 'static {
    /// Engine-specific prepared data.
    type Data: Send + 'static;

    /// Decodes and validates the inputs; an unusable input is a [`WorkerError::Input`].
    fn prepare(
        &self,
        inputs: &Inputs<'_>,
        params: &GenParams,
    ) -> Result<Prepared<Self::Data>, WorkerError>;
}

/// The frame consumer went away (the encoder failed); the engine should stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkClosed;

/// Hooks of one [`Engine::run`].
pub struct RunContext<'a> {
    /// Set when the run must stop; checked between UNet calls. The engine then returns
    /// [`WorkerError::Cancelled`].
    pub cancel: &'a AtomicBool,
    /// Progress after every UNet call and while decoding.
    pub progress: &'a mut dyn FnMut(EngineProgress),
    /// Receives each frame (`W×H×3` RGB24, rows top to bottom) in order.
    pub frame: &'a mut dyn FnMut(Vec<u8>) -> Result<(), SinkClosed>,
}

/// What a run produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunSummary {
    /// Frames handed to the sink.
    pub frames: u64,
    /// UNet calls made.
    pub unet_calls: u64,
}

/// Reads the accelerator's memory in use, in bytes; callable from any thread (the metrics
/// endpoint calls it at scrape time, never the inference thread).
pub type MemoryProbe = Arc<dyn Fn() -> Option<u64> + Send + Sync>;

/// What the model runs on, for the `echomimic_build_info` metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineLabels {
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// `f32`, `f16`, `bf16`.
    pub dtype: String,
    /// `normal`, `acc`, ... (or what a stand-in engine is).
    pub variant: String,
}

/// A loaded model. Owned by the inference thread; never shared.
pub trait Engine: Send + 'static {
    /// Prepared data the engine consumes.
    type Data: Send + 'static;
    /// The CPU-side preparer that goes to the fetcher thread.
    type Preparer: Preparer<Data = Self::Data>;

    /// A preparer for the fetcher thread (called once at start).
    fn preparer(&self) -> Self::Preparer;

    /// Size of the generated frames, `(width, height)`.
    fn frame_size(&self) -> (u32, u32);

    /// One line for the start-up log (weights, variant, device, dtype).
    fn describe(&self) -> String;

    /// Device, dtype and variant, for the metrics.
    fn labels(&self) -> EngineLabels;

    /// A reader of the accelerator's memory in use; `None` (the default) on the CPU.
    fn memory_probe(&self) -> Option<MemoryProbe> {
        None
    }

    /// A tiny forward pass so the first task does not pay for lazy initialisation.
    fn warm_up(&mut self) -> Result<(), WorkerError>;

    /// Generates the frames of one task.
    fn run(
        &mut self,
        data: Self::Data,
        params: &GenParams,
        ctx: &mut RunContext<'_>,
    ) -> Result<RunSummary, WorkerError>;
}

/// How many frames to generate for an audio clip and a requested `frames_num`.
#[derive(Debug, Clone, PartialEq)]
pub struct FramePlan {
    /// Frames to generate.
    pub frames: u32,
    /// Cut the audio to this many seconds (when `frames_num` asked for a shorter video).
    pub keep_secs: Option<f64>,
    /// A note for the user when the request was adjusted.
    pub note: Option<String>,
}

/// The frame count rule of the worker:
///
/// * no `frames_num`: one frame per `1/fps` of audio, `ceil(secs × fps)`;
/// * `frames_num` smaller than that: that many frames, and the audio is cut to
///   `frames_num / fps` seconds (the reference's `-shortest`), said in the result message;
/// * `frames_num` larger: clamped to what the audio needs (more frames would be cut from the
///   video anyway), said in the result message.
pub fn plan_frames(audio_secs: f64, fps: f64, frames_num: Option<u32>) -> FramePlan {
    let needed = ((audio_secs * fps).ceil() as u32).max(1);
    match frames_num {
        Some(n) if n < needed => FramePlan {
            frames: n,
            keep_secs: Some(f64::from(n) / fps),
            note: Some(format!(
                "frames_num {n} is shorter than the audio ({needed} frames): the audio was cut to {:.2} s",
                f64::from(n) / fps
            )),
        },
        Some(n) if n > needed => FramePlan {
            frames: needed,
            keep_secs: None,
            note: Some(format!(
                "frames_num {n} is more than the audio needs: {needed} frames were generated"
            )),
        },
        _ => FramePlan {
            frames: needed,
            keep_secs: None,
            note: None,
        },
    }
}

/// Writes the first `keep_secs` of interleaved `samples` as a 16-bit WAV file.
pub fn write_wav_cut(
    samples: &[f32],
    channels: u16,
    sample_rate: u32,
    keep_secs: f64,
    path: &Path,
) -> Result<(), WorkerError> {
    let io = |e: hound::Error| WorkerError::Io {
        op: "write the cut audio",
        path: path.to_path_buf(),
        source: match e {
            hound::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        },
    };
    let spec = hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let keep_frames = (keep_secs * f64::from(sample_rate)).round() as usize;
    let keep = (keep_frames * usize::from(channels)).min(samples.len());
    let mut w = hound::WavWriter::create(path, spec).map_err(io)?;
    for s in &samples[..keep] {
        let v = (s.clamp(-1.0, 1.0) * 32767.0).round() as i16;
        w.write_sample(v).map_err(io)?;
    }
    w.finalize().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_plan_rules() {
        let p = plan_frames(1.5, 24.0, None);
        assert_eq!((p.frames, p.keep_secs, p.note), (36, None, None));
        let p = plan_frames(1.51, 24.0, None);
        assert_eq!(p.frames, 37);
        let p = plan_frames(1.5, 24.0, Some(12));
        assert_eq!(p.frames, 12);
        assert_eq!(p.keep_secs, Some(0.5));
        assert!(p.note.unwrap().contains("cut"));
        let p = plan_frames(1.5, 24.0, Some(100));
        assert_eq!(p.frames, 36);
        assert_eq!(p.keep_secs, None);
        assert!(p.note.unwrap().contains("36 frames"));
        assert_eq!(plan_frames(0.0001, 24.0, None).frames, 1);
    }

    #[test]
    fn wav_cut_keeps_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.wav");
        let samples: Vec<f32> = (0..16000).map(|i| (i as f32 / 16000.0) - 0.5).collect();
        write_wav_cut(&samples, 1, 16000, 0.25, &path).unwrap();
        let (back, ch, rate) = fake::read_wav(&path).unwrap();
        assert_eq!((ch, rate, back.len()), (1, 16000, 4000));
        assert!((back[100] - samples[100]).abs() < 1e-4);
    }
}
