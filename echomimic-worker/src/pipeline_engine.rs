//! The real engine: EchoMimic v1 from `echomimic-pipeline`.
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

use echomimic_pipeline::audio::{self, AudioLimits};
use echomimic_pipeline::face::{self, FaceCrop, FaceCropOptions, FaceDetector, FaceQuirks, ImageLimits};
use echomimic_pipeline::PipelineError;

use crate::engine::{plan_frames, write_wav_cut, GenParams, Inputs, Prepared, Preparer};
use crate::error::{InputKind, WorkerError};

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
        let decoded =
            audio::decode_file(inputs.audio, &limits).map_err(input(InputKind::Audio))?;
        let waveform_16k = audio::to_whisper_waveform(&decoded, &limits)
            .map_err(|e| input(InputKind::Audio)(e.into()))?;
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
        assert!(x1 > x0 && y1 > y0 && x1 - x0 == y1 - y0, "{:?}", prepared.crop);
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
