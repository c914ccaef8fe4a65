//! What a caller asks for ([`GenerateRequest`]) and what it gets back
//! ([`GenerateReport`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use candle_core::Tensor;
use image::RgbImage;

use crate::audio::AudioLimits;
use crate::config::PromptConfig;
use crate::error::{PipelineError, Result};
use crate::face::{FaceCrop, FaceCropOptions, ImageLimits, PixelRect};

/// Output width and height of the released model (`-W`/`-H` of the scripts).
pub const DEFAULT_SIZE: u32 = 512;
/// Most frames generated when the request gives no limit (`-L`).
pub const DEFAULT_MAX_FRAMES: usize = 1200;
/// Seed of the official scripts.
pub const DEFAULT_SEED: i64 = 420;
/// Frames per second of the official scripts (defined with the audio windows
/// it decides, [`crate::audio::DEFAULT_FPS`]).
pub use crate::audio::DEFAULT_FPS;
/// Frames per denoising window (`context_frames`).
pub const DEFAULT_CONTEXT_FRAMES: usize = 12;
/// Frames shared by neighbouring windows (`context_overlap`).
pub const DEFAULT_CONTEXT_OVERLAP: usize = 3;
/// Range a negative seed draws from, as the scripts' `random.randint(100, 1000000)`.
pub const RANDOM_SEED_RANGE: std::ops::RangeInclusive<u64> = 100..=1_000_000;

/// Which weights and which sampler defaults.
///
/// Both variants run the same algorithm (docs/model.md M2); they differ in the UNet
/// weights (`denoising_unet[_acc].pth`, `motion_module[_acc].pth`) and in the
/// defaults of `infer_audio2vid.py` / `infer_audio2vid_acc.py`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Variant {
    /// The released model: 30 DDIM steps, guidance 2.5 (classifier-free guidance on).
    #[default]
    Normal,
    /// The distilled ("acc") model: 6 steps, guidance 1.0 (no CFG batch).
    Accelerated,
}

impl Variant {
    /// Default number of DDIM steps.
    pub const fn default_steps(self) -> usize {
        match self {
            Self::Normal => 30,
            Self::Accelerated => 6,
        }
    }

    /// Default guidance scale (CFG is on iff it is above 1).
    pub const fn default_cfg(self) -> f64 {
        match self {
            Self::Normal => 2.5,
            Self::Accelerated => 1.0,
        }
    }

    /// Suffix of the variant's UNet weight files (`denoising_unet{suffix}.pth`).
    pub const fn file_suffix(self) -> &'static str {
        match self {
            Self::Normal => "",
            Self::Accelerated => "_acc",
        }
    }

    /// The variant a prompt yaml names: accelerated when its denoising UNet
    /// file is an `*_acc.*` file (as in `animation_acc.yaml`), else normal.
    pub fn of_prompt(prompt: &PromptConfig) -> Self {
        let stem = prompt
            .denoising_unet_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if stem.ends_with("_acc") {
            Self::Accelerated
        } else {
            Self::Normal
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Normal => "normal",
            Self::Accelerated => "acc",
        })
    }
}

impl FromStr for Variant {
    type Err = PipelineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "acc" | "accelerated" => Ok(Self::Accelerated),
            other => Err(PipelineError::InvalidInput(format!(
                "unknown variant `{other}` (expected normal or acc)"
            ))),
        }
    }
}

/// The reference portrait.
#[derive(Debug, Clone)]
pub enum ReferenceInput {
    /// A photo file: decoded, face detected, masked and cropped to `W x H`.
    PhotoFile {
        /// The file (PNG, JPEG, WebP, BMP, GIF).
        path: PathBuf,
        /// Mask and crop parameters.
        options: FaceCropOptions,
    },
    /// An already decoded photo (EXIF orientation applied), detected and
    /// cropped like [`ReferenceInput::PhotoFile`].
    Photo {
        /// The photo.
        image: RgbImage,
        /// Mask and crop parameters.
        options: FaceCropOptions,
    },
    /// A face already detected and cropped to exactly `W x H` (the worker
    /// prepares it on another thread while the GPU is busy).
    Crop(Box<FaceCrop>),
}

impl ReferenceInput {
    /// A photo file with the reference's mask and crop parameters.
    pub fn photo_file(path: impl Into<PathBuf>) -> Self {
        Self::PhotoFile {
            path: path.into(),
            options: FaceCropOptions::default(),
        }
    }
}

/// The driving speech.
#[derive(Debug, Clone)]
pub enum SpeechInput {
    /// An audio file (any format [`crate::audio::decode_file`] reads).
    File(PathBuf),
    /// A 16 kHz mono waveform in [-1, 1], e.g. from
    /// [`crate::audio::load_waveform_16k`].
    Waveform16k(Vec<f32>),
}

/// One generation: inputs and sampler settings.
///
/// Build it with [`GenerateRequest::new`] (defaults of the official scripts
/// for a [`Variant`]) and change the public fields as needed.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The portrait.
    pub reference: ReferenceInput,
    /// The speech.
    pub audio: SpeechInput,
    /// Output width in pixels; a multiple of the VAE's down factor (8).
    pub width: u32,
    /// Output height in pixels; a multiple of the VAE's down factor (8).
    pub height: u32,
    /// Most frames to generate (`L`, default 1200). The audio decides the
    /// frame count (about `fps × seconds + 2`); when it asks for more, only
    /// the first `max_frames` are generated and
    /// [`GenerateReport::truncated`] says so.
    pub max_frames: usize,
    /// DDIM steps (at least 1, at most the scheduler's training steps).
    pub steps: usize,
    /// Guidance scale; classifier-free guidance runs iff it is above 1.
    pub cfg: f64,
    /// Seed of the initial noise (`torch.manual_seed` compatible); a negative
    /// value draws one from [`RANDOM_SEED_RANGE`] (reported back).
    pub seed: i64,
    /// Video frame rate; it decides which audio features drive each frame.
    pub fps: f64,
    /// Frames per denoising window (at most the motion module's position
    /// table, 32 for the released model).
    pub context_frames: usize,
    /// Frames shared by neighbouring windows; smaller than `context_frames`.
    pub context_overlap: usize,
    /// Initial noise to use instead of the seeded draw: the raw standard
    /// normal sample `[1, 4, F, H/8, W/8]` *before* the ±1.5 clamp, where `F`
    /// is the frame count ([`GenerateReport::frames`]). For parity tests.
    pub init_noise: Option<Tensor>,
    /// Limits on the audio input.
    pub audio_limits: AudioLimits,
    /// Limits on the photo input.
    pub image_limits: ImageLimits,
}

impl GenerateRequest {
    /// A request with the defaults of the official script for `variant`:
    /// 512 x 512, `L` = 1200, seed 420, 24 fps, windows of 12 frames
    /// overlapping by 3, and [`Variant::default_steps`] /
    /// [`Variant::default_cfg`].
    pub fn new(reference: ReferenceInput, audio: SpeechInput, variant: Variant) -> Self {
        Self {
            reference,
            audio,
            width: DEFAULT_SIZE,
            height: DEFAULT_SIZE,
            max_frames: DEFAULT_MAX_FRAMES,
            steps: variant.default_steps(),
            cfg: variant.default_cfg(),
            seed: DEFAULT_SEED,
            fps: DEFAULT_FPS,
            context_frames: DEFAULT_CONTEXT_FRAMES,
            context_overlap: DEFAULT_CONTEXT_OVERLAP,
            init_noise: None,
            audio_limits: AudioLimits::default(),
            image_limits: ImageLimits::default(),
        }
    }

    /// True when the settings run classifier-free guidance (`cfg > 1`).
    pub fn guidance(&self) -> bool {
        self.cfg > 1.0
    }

    /// Checks everything that does not need the inputs decoded.
    /// `down_factor` is the VAE's spatial down factor.
    pub(crate) fn validate(&self, down_factor: usize) -> Result<()> {
        let invalid = |m: String| Err(PipelineError::InvalidInput(m));
        let f = down_factor as u32;
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(f)
            || !self.height.is_multiple_of(f)
        {
            return invalid(format!(
                "width and height must be positive multiples of {f}, got {}x{}",
                self.width, self.height
            ));
        }
        if self.max_frames == 0 {
            return invalid("max_frames (L) must be at least 1".into());
        }
        if self.steps == 0 {
            return invalid("steps must be at least 1".into());
        }
        if !self.cfg.is_finite() || self.cfg < 0.0 {
            return invalid(format!(
                "cfg must be a finite number >= 0, got {}",
                self.cfg
            ));
        }
        if !(self.fps.is_finite() && self.fps > 0.0 && self.fps <= crate::audio::MAX_FPS) {
            return invalid(format!(
                "fps must be in (0, {}], got {}",
                crate::audio::MAX_FPS,
                self.fps
            ));
        }
        if self.context_frames == 0 {
            return invalid("context_frames must be at least 1".into());
        }
        if self.context_overlap >= self.context_frames {
            return invalid(format!(
                "context_overlap ({}) must be smaller than context_frames ({})",
                self.context_overlap, self.context_frames
            ));
        }
        if let ReferenceInput::Crop(crop) = &self.reference {
            let got = crop.face_rgb.dimensions();
            if got != (self.width, self.height) || crop.mask.dimensions() != got {
                return invalid(format!(
                    "the prepared face crop is {}x{} (mask {}x{}), the request is {}x{}",
                    got.0,
                    got.1,
                    crop.mask.width(),
                    crop.mask.height(),
                    self.width,
                    self.height
                ));
            }
        }
        Ok(())
    }
}

/// Where the face was found, for pasting the frames back into the photo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceGeometry {
    /// Size of the decoded photo `(width, height)`.
    pub image_size: (u32, u32),
    /// The square that was cropped and resized to `W x H`, in photo pixels.
    pub square_rect: PixelRect,
}

/// Wall time of each stage of [`super::EchoMimicPipeline::generate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StageTimings {
    /// Photo decoding, face detection and crop (zero for a prepared crop).
    pub face: Duration,
    /// Audio decoding, log-mel, Whisper encoder and per-frame windows.
    pub audio: Duration,
    /// Initial noise, face locator, VAE encode of the reference, reference
    /// UNet and the bank's K/V.
    pub reference: Duration,
    /// All denoising-UNet calls, window averaging, guidance and DDIM steps.
    pub denoising: Duration,
    /// VAE decode of every frame and hand-off to the frame sink (includes
    /// the sink's own time, e.g. video encoding).
    pub decoding: Duration,
    /// The whole call.
    pub total: Duration,
}

/// The outcome of a generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateReport {
    /// Frames produced and handed to the sink (`min(L, audio_frames)`).
    pub frames: usize,
    /// Frames the audio drives (about `fps × seconds + 2`, docs/model.md M3).
    pub audio_frames: usize,
    /// True when `max_frames` (`L`) cut the video short of the audio.
    pub truncated: bool,
    /// The seed of the initial noise (the drawn one for a negative request
    /// seed). Meaningless when the request injected its own noise.
    pub seed: u64,
    /// True when the request injected the initial noise.
    pub injected_noise: bool,
    /// DDIM steps run.
    pub steps: usize,
    /// Whether classifier-free guidance ran (`cfg > 1`).
    pub guidance: bool,
    /// Context windows per step.
    pub windows: usize,
    /// Denoising-UNet calls made (`steps × windows`).
    pub unet_calls: usize,
    /// Where the face is in the photo.
    pub face: FaceGeometry,
    /// Wall time per stage.
    pub timings: StageTimings,
}

impl GenerateReport {
    /// A sentence for the user when `L` truncated the video, else `None`.
    pub fn truncation_note(&self) -> Option<String> {
        self.truncated.then(|| {
            format!(
                "the audio drives {} frames but the frame limit is {}: only the first {} frames were generated",
                self.audio_frames, self.frames, self.frames
            )
        })
    }
}

/// The seed to use for a request seed: itself when non-negative, else a
/// fresh one from [`RANDOM_SEED_RANGE`].
pub(crate) fn resolve_seed(seed: i64) -> u64 {
    if seed >= 0 {
        return seed as u64;
    }
    use std::hash::{BuildHasher, Hasher};
    // A per-process random key (std's SipHash keys come from the OS) mixed
    // with the clock: enough for picking a sampling seed.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    let span = RANDOM_SEED_RANGE.end() - RANDOM_SEED_RANGE.start() + 1;
    RANDOM_SEED_RANGE.start() + h.finish() % span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_defaults_follow_the_scripts() {
        assert_eq!(Variant::Normal.default_steps(), 30);
        assert_eq!(Variant::Normal.default_cfg(), 2.5);
        assert_eq!(Variant::Accelerated.default_steps(), 6);
        assert_eq!(Variant::Accelerated.default_cfg(), 1.0);
        assert_eq!("acc".parse::<Variant>().unwrap(), Variant::Accelerated);
        assert_eq!(" Normal ".parse::<Variant>().unwrap(), Variant::Normal);
        assert!("fast".parse::<Variant>().is_err());
        for v in [Variant::Normal, Variant::Accelerated] {
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v);
        }
    }

    #[test]
    fn variant_of_prompt_reads_the_file_name() {
        let dir = std::path::Path::new("/w");
        assert_eq!(
            Variant::of_prompt(&PromptConfig::from_weights_dir(dir, true)),
            Variant::Accelerated
        );
        assert_eq!(
            Variant::of_prompt(&PromptConfig::from_weights_dir(dir, false)),
            Variant::Normal
        );
    }

    #[test]
    fn negative_seeds_draw_from_the_reference_range() {
        assert_eq!(resolve_seed(0), 0);
        assert_eq!(resolve_seed(420), 420);
        for _ in 0..100 {
            assert!(RANDOM_SEED_RANGE.contains(&resolve_seed(-1)));
        }
    }

    fn request() -> GenerateRequest {
        GenerateRequest::new(
            ReferenceInput::photo_file("face.png"),
            SpeechInput::File("speech.wav".into()),
            Variant::Normal,
        )
    }

    #[test]
    fn bad_settings_are_invalid_input() {
        let ok = request();
        assert!(ok.validate(8).is_ok());
        let cases: Vec<(&str, GenerateRequest)> = vec![
            (
                "width",
                GenerateRequest {
                    width: 500,
                    ..request()
                },
            ),
            (
                "height",
                GenerateRequest {
                    height: 0,
                    ..request()
                },
            ),
            (
                "steps",
                GenerateRequest {
                    steps: 0,
                    ..request()
                },
            ),
            (
                "max_frames",
                GenerateRequest {
                    max_frames: 0,
                    ..request()
                },
            ),
            (
                "cfg",
                GenerateRequest {
                    cfg: f64::NAN,
                    ..request()
                },
            ),
            (
                "cfg",
                GenerateRequest {
                    cfg: -1.0,
                    ..request()
                },
            ),
            (
                "fps",
                GenerateRequest {
                    fps: 0.0,
                    ..request()
                },
            ),
            (
                "context_frames",
                GenerateRequest {
                    context_frames: 0,
                    context_overlap: 0,
                    ..request()
                },
            ),
            (
                "context_overlap",
                GenerateRequest {
                    context_overlap: 12,
                    ..request()
                },
            ),
        ];
        for (what, req) in cases {
            match req.validate(8) {
                Err(PipelineError::InvalidInput(m)) => assert!(m.contains(what), "{what}: {m}"),
                other => panic!("{what}: expected InvalidInput, got {other:?}"),
            }
        }
        // A multiple of 8 that is not a multiple of 16 is fine with a factor of 8 only.
        assert!(GenerateRequest {
            width: 136,
            ..request()
        }
        .validate(8)
        .is_ok());
        assert!(GenerateRequest {
            width: 136,
            ..request()
        }
        .validate(16)
        .is_err());
    }

    #[test]
    fn truncation_note_only_when_truncated() {
        let mut report = GenerateReport {
            frames: 16,
            audio_frames: 38,
            truncated: true,
            seed: 1,
            injected_noise: false,
            steps: 3,
            guidance: true,
            windows: 4,
            unet_calls: 12,
            face: FaceGeometry {
                image_size: (512, 512),
                square_rect: PixelRect {
                    x0: 0,
                    y0: 0,
                    x1: 10,
                    y1: 10,
                },
            },
            timings: StageTimings::default(),
        };
        let note = report.truncation_note().unwrap();
        assert!(note.contains("38") && note.contains("16"), "{note}");
        report.truncated = false;
        assert!(report.truncation_note().is_none());
    }
}
