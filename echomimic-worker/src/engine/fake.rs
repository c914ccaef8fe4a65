//! A deterministic stand-in for the EchoMimic model, for tests of the service.
//!
//! It validates its inputs like the real engine does, at the same stages and with the same
//! error types (undecodable image → `bad_input`, uniform image → `no_face`, non-WAV, empty,
//! silent or too long audio → `bad_input`), "denoises" with a configurable pause per UNet call
//! (checking the cancel flag between calls), and emits frames made from the face crop. Test
//! hooks: [`FakeEngine::with_call_delay`], [`FakeEngine::fail_next_runs`],
//! [`FakeEngine::panic_in_next_prepares`], [`FakeEngine::hang_in_next_runs`].

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use echomimic_pipeline::{AudioError, PipelineError};
use image::{imageops, RgbImage};

use super::{
    plan_frames, write_wav_cut, Engine, EngineLabels, GenParams, Inputs, Prepared, Preparer,
    RunContext, RunSummary,
};
use crate::error::{InputKind, WorkerError};
use crate::progress::EngineProgress;

/// Frames per context window of the fake sampler.
const CONTEXT: u32 = 12;

/// The fake engine.
#[derive(Debug, Clone)]
pub struct FakeEngine {
    width: u32,
    height: u32,
    call_delay: Duration,
    failing_runs: Arc<AtomicU32>,
    panicking_prepares: Arc<AtomicU32>,
    hanging_runs: Arc<AtomicU32>,
    started_runs: Arc<AtomicU32>,
}

/// How long a hung fake run blocks (it ignores the cancel flag, like a stuck kernel).
const HANG: Duration = Duration::from_secs(120);

impl FakeEngine {
    /// Frames of `width × height`, no pause per UNet call.
    pub fn new(width: u32, height: u32) -> Self {
        FakeEngine {
            width,
            height,
            call_delay: Duration::ZERO,
            failing_runs: Arc::new(AtomicU32::new(0)),
            panicking_prepares: Arc::new(AtomicU32::new(0)),
            hanging_runs: Arc::new(AtomicU32::new(0)),
            started_runs: Arc::new(AtomicU32::new(0)),
        }
    }

    /// How many runs (model calls for a task) have started (shared by clones).
    pub fn started_runs(&self) -> u32 {
        self.started_runs.load(Ordering::SeqCst)
    }

    /// Makes the next `n` runs hang after their first UNet call: no progress, the cancel flag
    /// ignored, for two minutes (a stand-in for a stuck kernel or driver; shared by clones).
    pub fn hang_in_next_runs(&self, n: u32) {
        self.hanging_runs.store(n, Ordering::SeqCst);
    }

    /// Sleeps this long per UNet call (to make inference take time).
    pub fn with_call_delay(mut self, d: Duration) -> Self {
        self.call_delay = d;
        self
    }

    /// Makes the next `n` runs fail with a model error (shared by clones).
    pub fn fail_next_runs(&self, n: u32) {
        self.failing_runs.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` preparations panic, killing the thread that prepares (shared by
    /// clones and preparers): a stand-in for a bug in a decoder.
    pub fn panic_in_next_prepares(&self, n: u32) {
        self.panicking_prepares.store(n, Ordering::SeqCst);
    }
}

/// Prepared data of the fake engine.
#[derive(Debug)]
pub struct FakeData {
    face: RgbImage,
    frames: u32,
}

/// The fake preparer.
#[derive(Debug, Clone)]
pub struct FakePreparer {
    width: u32,
    height: u32,
    panicking: Arc<AtomicU32>,
}

fn image_error(e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Input {
        input: InputKind::Image,
        source: PipelineError::Image(e.to_string()),
    }
}

fn audio_error(e: AudioError) -> WorkerError {
    WorkerError::Input {
        input: InputKind::Audio,
        source: PipelineError::Audio(e),
    }
}

/// Reads a WAV file: interleaved samples in [-1, 1], channels, sample rate.
pub(crate) fn read_wav(path: &Path) -> Result<(Vec<f32>, u16, u32), AudioError> {
    let reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::FormatError(m) => AudioError::Unsupported(format!("not a WAV file ({m})")),
        other => AudioError::Corrupt(other.to_string()),
    })?;
    let spec = reader.spec();
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| AudioError::Corrupt(e.to_string()))?,
        hound::SampleFormat::Int => {
            let scale = (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 / scale))
                .collect::<Result<_, _>>()
                .map_err(|e| AudioError::Corrupt(e.to_string()))?
        }
    };
    Ok((samples, spec.channels, spec.sample_rate))
}

impl Preparer for FakePreparer {
    type Data = FakeData;

    fn prepare(
        &self,
        inputs: &Inputs<'_>,
        params: &GenParams,
    ) -> Result<Prepared<FakeData>, WorkerError> {
        let panic_now = self
            .panicking
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        assert!(!panic_now, "injected panic (fake preparer)");
        // 1. photo
        let mut reader = image::ImageReader::open(inputs.image)
            .and_then(|r| r.with_guessed_format())
            .map_err(image_error)?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(8192);
        limits.max_image_height = Some(8192);
        reader.limits(limits);
        let photo = reader.decode().map_err(image_error)?.to_rgb8();
        let (w, h) = photo.dimensions();
        if w < 16 || h < 16 {
            return Err(image_error(format!(
                "photo is {w}x{h}, at least 16x16 needed"
            )));
        }
        // 2. "face": anything that is not a uniform picture; a centred square.
        let first = *photo.get_pixel(0, 0);
        let uniform = photo
            .pixels()
            .all(|p| p.0.iter().zip(first.0).all(|(a, b)| a.abs_diff(b) < 8));
        if uniform {
            return Err(WorkerError::Input {
                input: InputKind::Image,
                source: PipelineError::NoFace { best: None },
            });
        }
        let side = (w.min(h) * 3 / 5).max(2);
        let (x0, y0) = ((w - side) / 2, (h - side) / 2);
        let crop = [x0, y0, x0 + side, y0 + side];
        let face = imageops::resize(
            &imageops::crop_imm(&photo, x0, y0, side, side).to_image(),
            self.width,
            self.height,
            imageops::FilterType::Triangle,
        );
        // 3. audio
        let (samples, channels, rate) = read_wav(inputs.audio).map_err(audio_error)?;
        let frames_in = samples.len() / usize::from(channels.max(1));
        if frames_in == 0 || rate == 0 {
            return Err(audio_error(AudioError::Empty));
        }
        let secs = frames_in as f64 / f64::from(rate);
        if secs > params.max_audio_secs {
            return Err(audio_error(AudioError::TooLong {
                seconds: secs,
                max_seconds: params.max_audio_secs,
            }));
        }
        let peak = samples.iter().fold(0.0f32, |m, s| m.max(s.abs()));
        if peak < 1e-4 {
            return Err(audio_error(AudioError::Silent { peak }));
        }
        let plan = plan_frames(secs, params.fps, params.frames_num);
        let (mux_audio, audio_secs) = match plan.keep_secs {
            Some(keep) => {
                let path = inputs.work_dir.join("audio-cut.wav");
                write_wav_cut(&samples, channels, rate, keep, &path)?;
                (path, keep)
            }
            None => (inputs.audio.to_path_buf(), secs),
        };
        Ok(Prepared {
            photo,
            crop,
            mux_audio,
            audio_secs,
            frames: plan.frames,
            notes: plan.note.into_iter().collect(),
            data: FakeData {
                face,
                frames: plan.frames,
            },
        })
    }
}

impl Engine for FakeEngine {
    type Data = FakeData;
    type Preparer = FakePreparer;

    fn preparer(&self) -> FakePreparer {
        FakePreparer {
            width: self.width,
            height: self.height,
            panicking: self.panicking_prepares.clone(),
        }
    }

    fn frame_size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn labels(&self) -> EngineLabels {
        EngineLabels {
            device: "cpu".to_owned(),
            dtype: "f32".to_owned(),
            variant: "fake".to_owned(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "fake engine {}x{}, {} ms per UNet call",
            self.width,
            self.height,
            self.call_delay.as_millis()
        )
    }

    fn warm_up(&mut self) -> Result<(), WorkerError> {
        Ok(())
    }

    fn run(
        &mut self,
        data: FakeData,
        params: &GenParams,
        ctx: &mut RunContext<'_>,
    ) -> Result<RunSummary, WorkerError> {
        self.started_runs.fetch_add(1, Ordering::SeqCst);
        let windows = data.frames.div_ceil(CONTEXT).max(1);
        let total = u64::from(params.steps) * u64::from(windows);
        let mut done = 0;
        let take = |n: &AtomicU32| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        };
        let fail = take(&self.failing_runs);
        let hang = take(&self.hanging_runs);
        for step in 1..=params.steps {
            for window in 1..=windows {
                if ctx.cancel.load(Ordering::SeqCst) {
                    return Err(WorkerError::Cancelled);
                }
                std::thread::sleep(self.call_delay);
                done += 1;
                (ctx.progress)(EngineProgress::Unet {
                    done,
                    total,
                    step,
                    steps: params.steps,
                    window,
                    windows,
                });
                if hang {
                    std::thread::sleep(HANG);
                }
                if fail && done * 2 >= total {
                    return Err(WorkerError::Inference(PipelineError::Candle(
                        candle_core::Error::Msg("injected model failure (fake engine)".into()),
                    )));
                }
            }
        }
        let n = u64::from(data.frames);
        for i in 0..data.frames {
            if ctx.cancel.load(Ordering::SeqCst) {
                return Err(WorkerError::Cancelled);
            }
            let mut frame = data.face.clone();
            let shift = (i * 7 % 64) as u8;
            for p in frame.pixels_mut() {
                p.0[0] = p.0[0].wrapping_add(shift);
            }
            if (ctx.frame)(frame.into_raw()).is_err() {
                return Err(WorkerError::Internal(
                    "the video encoder stopped taking frames".into(),
                ));
            }
            (ctx.progress)(EngineProgress::Decoded {
                done: u64::from(i) + 1,
                total: n,
            });
        }
        Ok(RunSummary {
            frames: n,
            unet_calls: done,
        })
    }
}
