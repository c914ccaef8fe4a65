//! The real engine: EchoMimic v1 from `echomimic-pipeline`.
//!
//! [`PipelineEngine`] loads every network once ([`EchoMimicPipeline::load`]) on the chosen
//! device, warms up with a one-frame, one-step generation, and then serves one
//! [`GenerateRequest`] per task from a prepared face crop and waveform, reporting every UNet
//! call and every decoded frame.
//!
//! [`PipelinePreparer`] runs on the fetcher thread, always on the CPU: decode the photo (EXIF
//! orientation applied), detect the face with MTCNN and build the mask and the square crop,
//! decode the speech and bring it to Whisper's 16 kHz mono waveform, checking it is neither
//! empty, too short, too long nor silent.
//!
//! Face handling follows the EchoMe worker (MTCNN sees OpenCV's BGR order, the crop's bottom
//! edge uses the row pad) with one more fix: the mask rectangle of a face touching the top or
//! left border is clamped instead of wrapping around (the reference's negative-slice bug, which
//! leaves such faces without a mask).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use echomimic_pipeline::audio::{self, AudioLimits};
use echomimic_pipeline::face::{
    self, FaceCrop, FaceCropOptions, FaceDetector, FaceQuirks, ImageLimits,
};
use echomimic_pipeline::models::mtcnn::Detection;
use echomimic_pipeline::pipeline::{
    EchoMimicPipeline, GenerateRequest, Progress, ReferenceInput, SpeechInput, Stage,
};
use echomimic_pipeline::PipelineError;

use super::{
    plan_frames, write_wav_cut, Engine, EngineLabels, GenParams, Inputs, MemoryProbe, Prepared,
    Preparer, RunContext, RunSummary,
};
use crate::config::ModelArgs;
use crate::error::{InputKind, WorkerError};
use crate::progress::EngineProgress;

/// The face quirks of the service (see the [module docs](self)).
pub const SERVICE_FACE_QUIRKS: FaceQuirks = FaceQuirks {
    bgr_detector_input: true,
    mask_negative_index_wrap: false,
    crop_bottom_uses_column_pad: false,
};

/// What the fetcher prepares for the model.
#[derive(Debug)]
pub struct PipelineData {
    /// The face crop and mask at the model's size.
    pub face: FaceCrop,
    /// 16 kHz mono waveform on the int16 grid (the Whisper input).
    pub waveform_16k: Vec<f32>,
    /// Frame limit `L` for the model: `Some` when `frames_num` asked for a shorter video,
    /// `None` = as many frames as the audio gives (the writer trims the model's ≈ 2 extra).
    pub max_frames: Option<u32>,
}

/// The CPU-side preparer of the real engine.
#[derive(Debug, Clone)]
pub struct PipelinePreparer {
    detector: FaceDetector,
    width: u32,
    height: u32,
    face_options: FaceCropOptions,
}

impl PipelinePreparer {
    /// MTCNN on the CPU with its embedded weights; crops resized to `width × height`.
    pub fn new(width: u32, height: u32) -> Result<Self, WorkerError> {
        let detector =
            FaceDetector::new(&candle_core::Device::Cpu).map_err(WorkerError::ModelLoad)?;
        Ok(PipelinePreparer {
            detector,
            width,
            height,
            face_options: FaceCropOptions {
                quirks: SERVICE_FACE_QUIRKS,
                ..FaceCropOptions::default()
            },
        })
    }
}

fn input(input: InputKind) -> impl Fn(PipelineError) -> WorkerError {
    move |source| WorkerError::Input { input, source }
}

impl Preparer for PipelinePreparer {
    type Data = PipelineData;

    fn prepare(
        &self,
        inputs: &Inputs<'_>,
        params: &GenParams,
    ) -> Result<Prepared<PipelineData>, WorkerError> {
        // 1. photo → face crop and mask (NoFace when MTCNN finds nothing above 0.8)
        let photo = face::load_image(inputs.image, &ImageLimits::default())
            .map_err(input(InputKind::Image))?;
        let crop = self
            .detector
            .crop_face(&photo, self.width, self.height, &self.face_options)
            .map_err(input(InputKind::Image))?;
        let [x0, y0, x1, y1] = crop.square_rect.to_xyxy();
        let to_u32 = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        let rect = [to_u32(x0), to_u32(y0), to_u32(x1), to_u32(y1)];
        // 2. speech → validated 16 kHz waveform
        let limits = AudioLimits {
            max_seconds: params.max_audio_secs,
            ..AudioLimits::default()
        };
        let decoded = audio::decode_file(inputs.audio, &limits).map_err(input(InputKind::Audio))?;
        // The model's waveform through the reference's own ffmpeg call when ffmpeg runs.
        let waveform_16k =
            audio::load_waveform_16k(inputs.audio, &limits).map_err(input(InputKind::Audio))?;
        let secs = decoded.duration_seconds();
        // 3. frames, and the audio that goes into the video
        let plan = plan_frames(secs, params.fps, params.frames_num);
        let (mux_audio, audio_secs): (PathBuf, f64) = match plan.keep_secs {
            Some(keep) => {
                let path = inputs.work_dir.join("audio-cut.wav");
                let channels = u16::try_from(decoded.channels).unwrap_or(u16::MAX);
                write_wav_cut(&decoded.samples, channels, decoded.sample_rate, keep, &path)?;
                (path, keep)
            }
            None => (inputs.audio.to_path_buf(), secs),
        };
        Ok(Prepared {
            photo,
            crop: rect,
            mux_audio,
            audio_secs,
            frames: plan.frames,
            notes: plan.note.into_iter().collect(),
            data: PipelineData {
                face: crop,
                waveform_16k,
                max_frames: plan.keep_secs.map(|_| plan.frames),
            },
        })
    }
}

/// Loads the pipeline described by the model options; bare `cuda` and `auto` mean CUDA device
/// `gpu_id`.
pub fn load_pipeline(model: &ModelArgs, gpu_id: u32) -> Result<EchoMimicPipeline, WorkerError> {
    let device = model.open_device(gpu_id as usize)?;
    EchoMimicPipeline::load(&model.source(), &device, model.dtype).map_err(WorkerError::ModelLoad)
}

/// The EchoMimic model behind the worker's [`Engine`] trait.
pub struct PipelineEngine {
    pipeline: EchoMimicPipeline,
    preparer: PipelinePreparer,
    width: u32,
    height: u32,
    context_frames: usize,
    context_overlap: usize,
}

impl std::fmt::Debug for PipelineEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl PipelineEngine {
    /// Loads the model (see [`load_pipeline`]) and the CPU face detector of the preparer.
    pub fn load(model: &ModelArgs, gpu_id: u32) -> Result<Self, WorkerError> {
        let pipeline = load_pipeline(model, gpu_id)?;
        let preparer = PipelinePreparer::new(model.width, model.height)?;
        Ok(PipelineEngine {
            pipeline,
            preparer,
            width: model.width,
            height: model.height,
            context_frames: model.context_frames,
            context_overlap: model.context_overlap,
        })
    }

    fn request(&self, data: PipelineData, params: &GenParams) -> GenerateRequest {
        let mut req = self.pipeline.request(
            ReferenceInput::Crop(Box::new(data.face)),
            SpeechInput::Waveform16k(data.waveform_16k),
        );
        req.width = self.width;
        req.height = self.height;
        req.steps = params.steps as usize;
        req.cfg = params.cfg;
        req.seed = i64::try_from(params.seed).unwrap_or(i64::MAX);
        req.fps = params.fps;
        req.context_frames = self.context_frames;
        req.context_overlap = self.context_overlap;
        // No silent truncation: the audio length is bounded by --max-audio-secs instead.
        req.max_frames = data.max_frames.map_or(usize::MAX, |n| n as usize);
        req.audio_limits.max_seconds = params.max_audio_secs;
        req
    }
}

/// A synthetic face crop for the warm-up: a grey photo with a face box in the middle.
fn warm_up_crop(width: u32, height: u32) -> Result<FaceCrop, WorkerError> {
    let side = 256u32;
    let mut photo = image::RgbImage::from_pixel(side, side, image::Rgb([128, 128, 128]));
    for (x, y, p) in photo.enumerate_pixels_mut() {
        p.0 = [(x % 256) as u8, (y % 256) as u8, 100];
    }
    let det = Detection {
        bbox: [96.0, 80.0, 160.0, 176.0],
        prob: 0.99,
        landmarks: [[0.0; 2]; 5],
    };
    face::crop_from_detections(&photo, &[det], width, height, &FaceCropOptions::default())
        .map_err(WorkerError::ModelLoad)
}

impl Engine for PipelineEngine {
    type Data = PipelineData;
    type Preparer = PipelinePreparer;

    fn preparer(&self) -> PipelinePreparer {
        self.preparer.clone()
    }

    fn frame_size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn labels(&self) -> EngineLabels {
        EngineLabels {
            device: echomimic_pipeline::device::device_label(self.pipeline.device()),
            dtype: self.pipeline.dtype().as_str().to_owned(),
            variant: self.pipeline.variant().to_string(),
        }
    }

    fn memory_probe(&self) -> Option<MemoryProbe> {
        let device = self.pipeline.device().clone();
        device.is_cuda().then(|| {
            Arc::new(move || echomimic_pipeline::device::memory_in_use(&device)) as MemoryProbe
        })
    }

    fn describe(&self) -> String {
        format!(
            "EchoMimic v1 {:?}, {}x{}, context {}/{}, {:?} on {}",
            self.pipeline.variant(),
            self.width,
            self.height,
            self.context_frames,
            self.context_overlap,
            self.pipeline.dtype(),
            echomimic_pipeline::device::device_label(self.pipeline.device())
        )
    }

    /// One frame, one step, at the served size: every network runs once.
    fn warm_up(&mut self) -> Result<(), WorkerError> {
        let face = warm_up_crop(self.width, self.height)?;
        let waveform_16k: Vec<f32> = (0..8000)
            .map(|i| 0.3 * (i as f32 * 2.0 * std::f32::consts::PI * 220.0 / 16000.0).sin())
            .collect();
        let data = PipelineData {
            face,
            waveform_16k,
            max_frames: Some(1),
        };
        let params = GenParams {
            steps: 1,
            cfg: self.pipeline.variant().default_cfg(),
            seed: 0,
            fps: 24.0,
            frames_num: Some(1),
            max_audio_secs: 10.0,
        };
        let mut req = self.request(data, &params);
        req.context_frames = 1;
        req.context_overlap = 0;
        let cancel = AtomicBool::new(false);
        self.pipeline
            .generate(&req, &mut |_| {}, &cancel, &mut |_: usize, _: &[u8]| Ok(()))
            .map(|_| ())
            .map_err(WorkerError::ModelLoad)
    }

    fn run(
        &mut self,
        data: PipelineData,
        params: &GenParams,
        ctx: &mut RunContext<'_>,
    ) -> Result<RunSummary, WorkerError> {
        let req = self.request(data, params);
        let RunContext {
            cancel,
            progress,
            frame,
        } = ctx;
        let mut on_progress = |p: Progress| match p {
            Progress::UnetCall {
                step,
                steps,
                window,
                windows,
                done,
                total,
            } => progress(EngineProgress::Unet {
                done: done as u64,
                total: total as u64,
                step: step as u32 + 1,
                steps: steps as u32,
                window: window as u32 + 1,
                windows: windows as u32,
            }),
            Progress::Frame { done, total } => progress(EngineProgress::Decoded {
                done: done as u64,
                total: total as u64,
            }),
            Progress::Stage(Stage::AudioFeatures) => {
                progress(EngineProgress::Phase("computing the audio features"))
            }
            Progress::Stage(Stage::Reference) => progress(EngineProgress::Phase(
                "encoding the reference image and running the reference UNet",
            )),
            _ => {}
        };
        let mut sink = |_: usize, rgb: &[u8]| {
            frame(rgb.to_vec())
                .map_err(|_| PipelineError::Media("the video encoder stopped taking frames".into()))
        };
        let report = self
            .pipeline
            .generate(&req, &mut on_progress, cancel, &mut sink)
            .map_err(|e| match e {
                PipelineError::Cancelled => WorkerError::Cancelled,
                e => WorkerError::Inference(e),
            })?;
        Ok(RunSummary {
            frames: report.frames as u64,
            unet_calls: report.unet_calls as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Failure;
    use echomimic_protocol::ErrorCode;
    use std::path::Path;

    fn golden(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/golden/public")
            .join(p)
    }

    fn params() -> GenParams {
        GenParams {
            steps: 2,
            cfg: 1.0,
            seed: 1,
            fps: 24.0,
            frames_num: None,
            max_audio_secs: 60.0,
        }
    }

    fn code(e: &WorkerError) -> ErrorCode {
        let Failure { code, .. } = e.failure();
        code
    }

    #[test]
    fn device_names() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            model: ModelArgs,
        }
        let model = |device: &str| Cli::try_parse_from(["x", "--device", device]).map(|c| c.model);
        assert!(model("cpu").unwrap().open_device(3).unwrap().is_cpu());
        assert!(model("auto").unwrap().open_device(0).is_ok());
        for bad in ["tpu", "cuda:x"] {
            let e = model(bad).err().unwrap().to_string();
            assert!(e.contains("--device"), "{e}");
        }
        if !echomimic_pipeline::device::cuda_compiled() {
            assert!(model("auto").unwrap().open_device(5).unwrap().is_cpu());
            let e = model("cuda")
                .unwrap()
                .open_device(5)
                .unwrap_err()
                .to_string();
            assert!(e.contains("cuda:5") && e.contains("CUDA support"), "{e}");
        }
    }

    #[test]
    fn prepares_the_bundled_photo_and_speech() {
        let dir = tempfile::tempdir().unwrap();
        let p = PipelinePreparer::new(128, 128).unwrap();
        let image = golden("inputs/astronaut.png");
        let audio = golden("inputs/speech.wav");
        let t = std::time::Instant::now();
        let prepared = p
            .prepare(
                &Inputs {
                    image: &image,
                    audio: &audio,
                    work_dir: dir.path(),
                },
                &params(),
            )
            .unwrap();
        eprintln!("prepare took {:?}", t.elapsed());
        assert_eq!(prepared.data.face.face_rgb.dimensions(), (128, 128));
        let [x0, y0, x1, y1] = prepared.crop;
        assert!(
            x1 > x0 && y1 > y0 && x1 - x0 == y1 - y0,
            "{:?}",
            prepared.crop
        );
        assert_eq!(prepared.frames, 36);
        assert_eq!(prepared.mux_audio, audio);
        assert_eq!(prepared.data.waveform_16k.len(), 24_000);
        assert_eq!(prepared.data.max_frames, None);

        let mut short = params();
        short.frames_num = Some(12);
        let prepared = p
            .prepare(
                &Inputs {
                    image: &image,
                    audio: &audio,
                    work_dir: dir.path(),
                },
                &short,
            )
            .unwrap();
        assert_eq!(prepared.data.max_frames, Some(12));
        assert!((prepared.audio_secs - 0.5).abs() < 1e-9);
        assert!(prepared.mux_audio.starts_with(dir.path()));
    }

    #[test]
    fn rejects_blank_photos_and_silent_or_non_audio_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = PipelinePreparer::new(128, 128).unwrap();
        let blank = dir.path().join("blank.png");
        image::RgbImage::from_pixel(200, 200, image::Rgb([90, 90, 90]))
            .save(&blank)
            .unwrap();
        let audio = golden("inputs/speech.wav");
        let image = golden("inputs/astronaut.png");
        let run = |image: &Path, audio: &Path| {
            p.prepare(
                &Inputs {
                    image,
                    audio,
                    work_dir: dir.path(),
                },
                &params(),
            )
            .map(|_| ())
            .unwrap_err()
        };
        assert_eq!(code(&run(&blank, &audio)), ErrorCode::NoFace);
        assert_eq!(code(&run(&audio, &audio)), ErrorCode::BadInput);
        assert_eq!(code(&run(&image, &image)), ErrorCode::BadInput);
        let silent = dir.path().join("silent.wav");
        crate::engine::write_wav_cut(&vec![0.0; 16_000], 1, 16_000, 1.0, &silent).unwrap();
        let e = run(&image, &silent);
        assert_eq!(code(&e), ErrorCode::BadInput);
        assert!(e.to_string().contains("silent"), "{e}");
    }
}
