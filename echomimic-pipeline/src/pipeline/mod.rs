//! The EchoMimic v1 audio-to-video pipeline (`Audio2VideoPipeline` of
//! BadToBest/EchoMimic @ 76cdab1, `infer_audio2vid.py` and
//! `infer_audio2vid_acc.py`; docs/model.md M1-M7).
//!
//! [`EchoMimicPipeline`] loads every network once (from an official
//! `pretrained_weights/` folder or a prompt yaml) and then serves any number
//! of [`GenerateRequest`]s:
//!
//! 1. **face**: detect, mask and crop the portrait to `W x H` (or take a
//!    prepared [`FaceCrop`]);
//! 2. **audio**: Whisper features of the speech and one window of audio
//!    tokens per video frame; `F = min(L, audio frames)`;
//! 3. **reference**: seeded (torch-compatible) or injected initial noise,
//!    clamped to ±1.5; face locator on the mask; VAE encode of the crop
//!    (`mean × 0.18215`); the reference UNet once at t = 0 writes the bank,
//!    whose K/V are computed once for all steps and windows;
//! 4. **denoising**: for every DDIM step, closed-loop context windows rotated
//!    by 2 frames per step, predictions averaged per frame *before*
//!    classifier-free guidance, DDIM update ([`Denoiser`]);
//! 5. **decoding**: each frame is VAE-decoded on its own, mapped to
//!    `clamp(x / 2 + 0.5, 0, 1)`, truncated to `u8` and handed to a
//!    [`FrameSink`] at once: memory does not grow with the video beyond the
//!    latents and the audio tokens.
//!
//! Deviations from the reference, on purpose:
//!
//! * the normal pipeline with `cfg <= 1` sums overlapping window predictions
//!   without dividing by their count (a bug, docs/model.md M8); here they are
//!   always averaged, as the acc pipeline does;
//! * the acc pipeline's v → x̂₀ → v round trip is an exact identity and is
//!   skipped (docs/model.md M9);
//! * with f16/bf16 weights the seeded noise is drawn in f32 and cast (the
//!   exact f16 stream of torch 2.2 is unverified, docs/model.md M10); f32 noise
//!   matches `torch.randn` to 4e-7.
//!
//! The frame count comes from the audio (about `fps × seconds + 2`,
//! docs/model.md M3). When `L` is smaller, the video is cut and
//! [`GenerateReport::truncated`] says so.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//!
//! use candle_core::Device;
//! use echomimic_pipeline::pipeline::{
//!     EchoMimicPipeline, GenerateRequest, ModelSource, Progress, ReferenceInput, SpeechInput,
//! };
//!
//! # fn main() -> echomimic_pipeline::Result<()> {
//! // Load once: the acc weights when present, f32 on the CPU.
//! let source = ModelSource::WeightsDir { dir: "pretrained_weights".into(), variant: None };
//! let pipeline = EchoMimicPipeline::load(&source, &Device::Cpu, None)?;
//!
//! // One request with the official defaults of the loaded variant.
//! let mut request = pipeline.request(
//!     ReferenceInput::photo_file("portrait.jpg"),
//!     SpeechInput::File("speech.wav".into()),
//! );
//! request.max_frames = 240; // at most 10 s at 24 fps
//!
//! let cancel = AtomicBool::new(false); // set from another thread to stop
//! let mut frames = 0;
//! let report = pipeline.generate(
//!     &request,
//!     &mut |p: Progress| {
//!         if let Some((done, total)) = p.counts() {
//!             eprint!("\r{done}/{total}");
//!         }
//!     },
//!     &cancel,
//!     &mut |_index: usize, rgb: &[u8]| {
//!         frames += 1; // e.g. `VideoWriter::write_frame(rgb)`
//!         let _ = rgb;
//!         Ok(())
//!     },
//! )?;
//! if let Some(note) = report.truncation_note() {
//!     eprintln!("{note}");
//! }
//! println!("{} frames, seed {}", report.frames, report.seed);
//! # Ok(()) }
//! ```

mod denoise;
mod dump;
mod hooks;
mod progress;
mod request;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};

use crate::audio::{self, AudioFeatureExtractor};
use crate::config::{PromptConfig, WeightDtype};
use crate::context::uniform_windows;
use crate::error::{PipelineError, Result};
use crate::face::{self, FaceCrop, FaceDetector};
use crate::models::attention::{Bank, BankRounding};
use crate::models::face_locator::FaceLocator;
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::models::unet_3d::UNet3DConditionModel;
use crate::models::vae::AutoencoderKL;
use crate::schedulers::ddim::DDIMScheduler;
use crate::unet_loading::{base_unet_config, inference_config};

use denoise::{scale, side_by_side};
pub use denoise::{Conditioning, DenoiseObserver, Denoiser, StepOutput, UnetCall};
#[cfg(feature = "test-support")]
pub use dump::FrameDiff;
pub use dump::{TensorDump, VIDEO_FRAME_PREFIX};
use hooks::RunHooks;
pub use hooks::TensorHook;
pub use progress::{FrameSink, Progress, Stage};
pub use request::{
    FaceGeometry, GenerateReport, GenerateRequest, ReferenceInput, SpeechInput, StageTimings,
    Variant, DEFAULT_CONTEXT_FRAMES, DEFAULT_CONTEXT_OVERLAP, DEFAULT_FPS, DEFAULT_MAX_FRAMES,
    DEFAULT_SEED, DEFAULT_SIZE, RANDOM_SEED_RANGE,
};

/// The latent scale the pipeline hard-codes (`* 0.18215` after encoding,
/// `/ 0.18215` before decoding), whatever the VAE config says.
pub const LATENT_SCALE: f64 = 0.18215;

/// The initial noise is clamped to `[-INIT_NOISE_CLAMP, INIT_NOISE_CLAMP]`.
pub const INIT_NOISE_CLAMP: f64 = 1.5;

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An official `pretrained_weights/` folder (layout of the
    /// `BadToBest/EchoMimic` release). `variant: None` picks
    /// [`Variant::Accelerated`] when `denoising_unet_acc.pth` and
    /// `motion_module_acc.pth` are both present (the EchoMe worker's
    /// choice, about 10x less compute), else [`Variant::Normal`].
    WeightsDir {
        /// The folder.
        dir: PathBuf,
        /// Which UNet weights; `None` = detect.
        variant: Option<Variant>,
    },
    /// A prompt yaml (`configs/prompts/animation*.yaml`) naming every file;
    /// the variant follows the denoising UNet's file name
    /// ([`Variant::of_prompt`]).
    PromptYaml(PathBuf),
}

impl ModelSource {
    /// The variant these weights are: the one named, else the one detected
    /// ([`ModelSource::detect_variant`] for a folder, [`Variant::of_prompt`]
    /// for a prompt yaml, which is read). The one place the variant of a set of
    /// weights is decided; [`EchoMimicPipeline::load`] and the worker use it.
    pub fn variant(&self) -> Result<Variant> {
        match self {
            Self::WeightsDir {
                variant: Some(v), ..
            } => Ok(*v),
            Self::WeightsDir { dir, variant: None } => Ok(Self::detect_variant(dir)),
            Self::PromptYaml(path) => Ok(Variant::of_prompt(&PromptConfig::from_file(path)?)),
        }
    }

    /// The variant [`ModelSource::WeightsDir`] with `variant: None` loads
    /// from `dir`.
    pub fn detect_variant(dir: &Path) -> Variant {
        let acc = PromptConfig::from_weights_dir(dir, true);
        if acc.denoising_unet_path.is_file() && acc.motion_module_path.is_file() {
            Variant::Accelerated
        } else {
            Variant::Normal
        }
    }
}

/// Latents of the reference image.
#[derive(Debug, Clone)]
pub struct ReferenceLatents {
    /// `vae.encode(image).latent_dist.mean`, `[1, 4, h, w]`.
    pub unscaled: Tensor,
    /// `unscaled × 0.18215`: the reference UNet's input.
    pub scaled: Tensor,
}

/// Audio tokens of the frames to generate.
#[derive(Debug, Clone)]
pub struct AudioTokens {
    /// `[1, F, 10·(layers+1), D]` in the model dtype (`audio_fea_final`).
    pub tokens: Tensor,
    /// Frames the whole audio drives (before the `L` cut).
    pub audio_frames: usize,
}

impl AudioTokens {
    /// Frames to generate (`F`).
    pub fn frames(&self) -> usize {
        self.tokens.dims().get(1).copied().unwrap_or(0)
    }
}

/// Activation memory the VAE decode calls in flight may take (see
/// [`EchoMimicPipeline::decode_plan`]).
pub const DECODE_BATCH_BYTES: usize = 512 << 20;

/// Most frames decoded in one VAE call.
pub const MAX_DECODE_BATCH: usize = 8;

/// Activation memory the denoising-UNet calls in flight may take (see
/// [`EchoMimicPipeline::call_plan`]).
pub const WINDOW_BATCH_BYTES: usize = 1 << 30;

/// Most context windows in one denoising-UNet call.
pub const MAX_WINDOWS_PER_CALL: usize = 8;

/// How the frames are decoded ([`EchoMimicPipeline::decode_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    /// Frames batched into one VAE call.
    pub frames_per_call: usize,
    /// VAE calls run side by side.
    pub concurrent_calls: usize,
}

/// How the windows of a denoising step are run ([`EchoMimicPipeline::call_plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPlan {
    /// Windows batched into one UNet call.
    pub windows_per_call: usize,
    /// UNet calls run side by side.
    pub concurrent_calls: usize,
}

impl CallPlan {
    /// The plan for windows of `per_window` activation bytes, `windows` per step, up to
    /// `threads` calls side by side: as many windows in flight as fit
    /// [`WINDOW_BATCH_BYTES`] (at least one), spread evenly over the calls, at most
    /// [`MAX_WINDOWS_PER_CALL`] per call.
    pub fn new(per_window: usize, windows: usize, threads: usize) -> Self {
        let in_flight = (WINDOW_BATCH_BYTES / per_window.max(1)).max(1);
        let windows = windows.max(1);
        let concurrent_calls = threads.min(in_flight).min(windows).max(1);
        CallPlan {
            windows_per_call: (in_flight / concurrent_calls)
                .min(windows.div_ceil(concurrent_calls))
                .clamp(1, MAX_WINDOWS_PER_CALL),
            concurrent_calls,
        }
    }
}

impl DecodePlan {
    /// The plan for frames of `per_frame` activation bytes, up to `threads` calls side by
    /// side: as many frames in flight as fit [`DECODE_BATCH_BYTES`] (at least one), at most
    /// [`MAX_DECODE_BATCH`] per call.
    pub fn new(per_frame: usize, threads: usize) -> Self {
        let in_flight = (DECODE_BATCH_BYTES / per_frame.max(1)).max(1);
        let concurrent_calls = threads.min(in_flight).max(1);
        DecodePlan {
            frames_per_call: (in_flight / concurrent_calls).clamp(1, MAX_DECODE_BATCH),
            concurrent_calls,
        }
    }
}

/// The loaded EchoMimic v1 model: every network, ready for any number of
/// requests. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct EchoMimicPipeline {
    vae: AutoencoderKL,
    reference_unet: UNet2DConditionModel,
    denoising_unet: UNet3DConditionModel,
    face_locator: FaceLocator,
    audio: AudioFeatureExtractor,
    face_detector: FaceDetector,
    scheduler: DDIMScheduler,
    variant: Variant,
    device: Device,
    dtype: DType,
    latent_channels: usize,
    vae_scale_factor: usize,
    max_window_frames: Option<usize>,
}

impl EchoMimicPipeline {
    /// Loads every network from `source` onto `device`.
    ///
    /// `dtype: None` is f32 on the CPU; on other devices it is the prompt
    /// yaml's `weight_dtype` (f16 for a weights folder, as the official
    /// scripts run). Missing files fail with [`PipelineError::MissingFile`]
    /// before anything is read.
    pub fn load(source: &ModelSource, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let (prompt, variant) = match source {
            ModelSource::WeightsDir { dir, .. } => {
                if !dir.is_dir() {
                    return Err(PipelineError::MissingFile(dir.clone()));
                }
                let variant = source.variant()?;
                (
                    PromptConfig::from_weights_dir(dir, variant == Variant::Accelerated),
                    variant,
                )
            }
            ModelSource::PromptYaml(path) => {
                let prompt = PromptConfig::from_file(path)?;
                let variant = Variant::of_prompt(&prompt);
                (prompt, variant)
            }
        };
        let dtype = dtype.unwrap_or(if device.is_cpu() {
            DType::F32
        } else {
            match prompt.weight_dtype {
                WeightDtype::F16 => DType::F16,
                WeightDtype::BF16 => DType::BF16,
                WeightDtype::F32 => DType::F32,
            }
        });
        Self::from_prompt_config(&prompt, variant, device, dtype)
    }

    /// Loads the files named by `prompt` (paths already resolved), weights
    /// cast to `dtype`. `variant` only sets the request defaults
    /// ([`Self::request`]).
    pub fn from_prompt_config(
        prompt: &PromptConfig,
        variant: Variant,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        // 0. every required file, before any (slow) read
        let required = [
            prompt.pretrained_vae_path.join("config.json"),
            prompt.audio_model_path.clone(),
            prompt.denoising_unet_path.clone(),
            prompt.motion_module_path.clone(),
            prompt.reference_unet_path.clone(),
            prompt.face_locator_path.clone(),
        ];
        if let Some(missing) = required.iter().find(|p| !p.is_file()) {
            return Err(PipelineError::MissingFile(missing.clone()));
        }
        if let Some(inference) = prompt.inference_config.as_ref().filter(|p| !p.is_file()) {
            return Err(PipelineError::MissingFile(inference.clone()));
        }
        let unet_cfg = base_unet_config(prompt)?;
        let inference = inference_config(prompt)?;
        let mm = &inference.unet_additional_kwargs;
        let max_window_frames = (mm.use_motion_module
            && mm.motion_module_kwargs.temporal_position_encoding)
            .then_some(mm.motion_module_kwargs.temporal_position_encoding_max_len);
        let scheduler = DDIMScheduler::new(&inference.noise_scheduler_kwargs)?;

        // 1. networks
        let vae = AutoencoderKL::load(&prompt.pretrained_vae_path, dtype, device)?;
        let vae_scale_factor = 1usize << (vae.config().block_out_channels.len().max(1) - 1);
        let reference_unet = UNet2DConditionModel::from_prompt(prompt, dtype, device)?;
        let denoising_unet = UNet3DConditionModel::from_prompt(prompt, dtype, device)?;
        let face_locator = FaceLocator::load(&prompt.face_locator_path, dtype, device)?;
        let audio = AudioFeatureExtractor::load(&prompt.audio_model_path, dtype, device)?;
        // The detector is small and was validated bit-exact on the CPU in f32.
        let face_detector = FaceDetector::new(&Device::Cpu)?;
        tracing::info!(
            %variant,
            ?dtype,
            device = ?device,
            denoising_unet = %prompt.denoising_unet_path.display(),
            "EchoMimic pipeline loaded"
        );
        Ok(Self {
            vae,
            reference_unet,
            denoising_unet,
            face_locator,
            audio,
            face_detector,
            scheduler,
            variant,
            device: device.clone(),
            dtype,
            latent_channels: unet_cfg.in_channels,
            vae_scale_factor,
            max_window_frames,
        })
    }

    /// The weights variant (sets the defaults of [`Self::request`]).
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// The device the networks run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of weights, latents and accumulators.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The VAE's spatial down factor (8): `W` and `H` must be multiples of it.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_scale_factor
    }

    /// The face detector (MTCNN with the reference's parameters, on the CPU),
    /// for callers that prepare [`ReferenceInput::Crop`] themselves.
    pub fn face_detector(&self) -> &FaceDetector {
        &self.face_detector
    }

    /// A request with the official defaults of this pipeline's variant.
    pub fn request(&self, reference: ReferenceInput, audio: SpeechInput) -> GenerateRequest {
        GenerateRequest::new(reference, audio, self.variant)
    }

    /// Generates the video of `request`, handing each frame to `frames` as
    /// soon as it is decoded.
    ///
    /// `progress` receives a [`Progress::Stage`] event when each stage starts,
    /// one [`Progress::Plan`] once the frame count is known, one
    /// [`Progress::UnetCall`] after every denoising-UNet call and one
    /// [`Progress::Frame`] after every frame. `cancel` is checked between
    /// stages, before every UNet call and before every frame decode; once it
    /// is set the call returns [`PipelineError::Cancelled`].
    pub fn generate(
        &self,
        request: &GenerateRequest,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        frames: &mut dyn FrameSink,
    ) -> Result<GenerateReport> {
        self.run(request, &mut RunHooks::new(progress, cancel, None), frames)
    }

    /// [`Self::generate`], also handing every intermediate tensor to `dump`
    /// under the names of the golden `pipeline.safetensors` (see
    /// [`TensorDump`]; the per-window UNet outputs of step 0 only, like the
    /// golden file, and each decoded frame as `video.frame{i}`).
    pub fn generate_with_dump(
        &self,
        request: &GenerateRequest,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        frames: &mut dyn FrameSink,
        dump: TensorHook<'_>,
    ) -> Result<GenerateReport> {
        self.run(
            request,
            &mut RunHooks::new(progress, cancel, Some(dump)),
            frames,
        )
    }

    /// The algorithm, top-down. Progress, cancellation and the optional tensor dump are
    /// [`RunHooks`] around its stages, never statements inside them.
    fn run(
        &self,
        request: &GenerateRequest,
        hooks: &mut RunHooks<'_, '_>,
        sink: &mut dyn FrameSink,
    ) -> Result<GenerateReport> {
        let start = Instant::now();
        let mut timings = StageTimings::default();
        request.validate(self.vae_scale_factor)?;

        // 1. face: detect, mask, crop
        let crop = hooks.stage(Stage::Face, &mut timings.face, |_| self.face_crop(request))?;
        let face_geometry = FaceGeometry {
            image_size: crop.image_size,
            square_rect: crop.square_rect,
        };

        // 2. audio: features and per-frame windows, F = min(L, audio frames)
        let (tokens, windows) = hooks.stage(Stage::AudioFeatures, &mut timings.audio, |hooks| {
            let tokens = self.request_audio_tokens(request)?;
            let frames = tokens.frames();
            self.check_window(request.context_frames.min(frames))?;
            let windows = uniform_windows(frames, request.context_frames, request.context_overlap)
                .map_err(PipelineError::InvalidInput)?
                .len();
            hooks.planned(&tokens.tokens, tokens.audio_frames, windows * request.steps)?;
            Ok((tokens, windows))
        })?;
        let (frames, audio_frames) = (tokens.frames(), tokens.audio_frames);

        // 3. reference: initial latents, face features, reference latents and bank
        let seed = request::resolve_seed(request.seed);
        let (latents, cond) = hooks.stage(Stage::Reference, &mut timings.reference, |hooks| {
            self.prepare_sampling(request, seed, &crop, tokens.tokens, hooks)
        })?;
        drop(crop);

        // 4. denoising
        let (latents, unet_calls) =
            hooks.stage(Stage::Denoising, &mut timings.denoising, |hooks| {
                let denoiser = self.denoiser(
                    &cond,
                    request.steps,
                    request.context_frames,
                    request.context_overlap,
                )?;
                debug_assert_eq!(windows, denoiser.windows_per_step());
                hooks.sampling(&denoiser)?;
                let latents = denoiser.run(latents, hooks)?;
                Ok((latents, denoiser.unet_calls()))
            })?;
        drop(cond);

        // 5. decoding, a few frames per VAE call, calls side by side on the CPU (streamed
        //    out one by one, in order)
        let plan = self.decode_plan(request.width, request.height);
        hooks.stage(Stage::Decoding, &mut timings.decoding, |hooks| {
            let mut next = 0;
            while next < frames {
                hooks.before_frame()?;
                let mut calls = Vec::with_capacity(plan.concurrent_calls);
                let mut start = next;
                while calls.len() < plan.concurrent_calls && start < frames {
                    let n = plan.frames_per_call.min(frames - start);
                    calls.push((start, n));
                    start += n;
                }
                let decode = |&(start, n): &(usize, usize)| {
                    // (1, C, n, h, w) -> (n, C, h, w)
                    let z = latents.narrow(2, start, n)?.squeeze(0)?.transpose(0, 1)?;
                    self.decode_frame(&z)
                };
                let decoded = side_by_side(&calls, decode);
                for (&(start, n), decoded) in calls.iter().zip(decoded) {
                    let decoded = decoded?;
                    for j in 0..n {
                        let i = start + j;
                        if i > next {
                            hooks.before_frame()?;
                        }
                        let frame = decoded.narrow(0, j, 1)?;
                        hooks.frame_decoded(i, &frame)?;
                        sink.frame(i, &frame_to_rgb8(&frame)?)?;
                        hooks.frame_done(i + 1, frames);
                    }
                }
                next = start;
            }
            Ok(())
        })?;
        timings.total = start.elapsed();

        Ok(GenerateReport {
            frames,
            audio_frames,
            truncated: frames < audio_frames,
            seed,
            injected_noise: request.init_noise.is_some(),
            steps: request.steps,
            guidance: request.guidance(),
            windows,
            unet_calls,
            face: face_geometry,
            timings,
        })
    }

    /// Stage 2 for a request: its speech (a file is decoded here) to audio tokens.
    fn request_audio_tokens(&self, request: &GenerateRequest) -> Result<AudioTokens> {
        let wave: Cow<'_, [f32]> = match &request.audio {
            SpeechInput::File(path) => {
                Cow::Owned(audio::load_waveform_16k(path, &request.audio_limits)?)
            }
            SpeechInput::Waveform16k(w) => Cow::Borrowed(w),
        };
        self.audio_tokens(&wave, request.fps, request.max_frames)
    }

    /// Stage 3 for a request: the initial latents and everything the denoising UNet is
    /// conditioned on. Each intermediate is shown to the hooks once made and dropped as soon
    /// as it is used.
    fn prepare_sampling(
        &self,
        request: &GenerateRequest,
        seed: u64,
        crop: &FaceCrop,
        audio_tokens: Tensor,
        hooks: &mut RunHooks<'_, '_>,
    ) -> Result<(Tensor, Conditioning)> {
        let (w, h) = (request.width, request.height);
        let frames = audio_tokens.dims().get(1).copied().unwrap_or(0);
        let noise = match &request.init_noise {
            Some(noise) => noise.clone(),
            None => self.seeded_noise(seed, frames, w, h)?,
        };
        let latents = self.initial_latents(&noise, frames, w, h)?;
        hooks.tensors(&[("latents_randn", &noise), ("latents_init", &latents)])?;
        drop(noise);
        let mask = crop.mask_tensor(self.dtype, &self.device)?;
        let face = self.face_features(&mask)?;
        let image = crop.reference_image_tensor(self.dtype, &self.device)?;
        let reference = self.reference_latents(&image)?;
        hooks.tensors(&[
            ("face_mask_tensor", &mask),
            ("face_locator_out", &face),
            ("ref_image_tensor", &image),
            ("ref_image_latents_unscaled", &reference.unscaled),
            ("ref_image_latents", &reference.scaled),
        ])?;
        hooks.check_cancel()?;
        let bank = self.reference_bank(&reference.scaled)?;
        hooks.bank(&bank)?;
        let cond = self.conditioning(&bank, &face, &audio_tokens, request.cfg)?;
        Ok((latents, cond))
    }

    /// Stage 1: the face crop of the request (detected, or the prepared one).
    pub fn face_crop<'r>(&self, request: &'r GenerateRequest) -> Result<Cow<'r, FaceCrop>> {
        let (w, h) = (request.width, request.height);
        Ok(match &request.reference {
            ReferenceInput::Crop(crop) => Cow::Borrowed(crop.as_ref()),
            ReferenceInput::Photo { image, options } => {
                Cow::Owned(self.face_detector.crop_face(image, w, h, options)?)
            }
            ReferenceInput::PhotoFile { path, options } => {
                let image = face::load_image(path, &request.image_limits)?;
                Cow::Owned(self.face_detector.crop_face(&image, w, h, options)?)
            }
        })
    }

    /// Stage 2: audio tokens of the first `min(max_frames, audio frames)`
    /// video frames at `fps`, from a 16 kHz mono waveform.
    pub fn audio_tokens(
        &self,
        waveform_16k: &[f32],
        fps: f64,
        max_frames: usize,
    ) -> Result<AudioTokens> {
        let features = self.audio.features(waveform_16k)?;
        let audio_frames = audio::audio_frame_count(features.dim(0)?, fps)?;
        let tokens = audio::whisper_chunks_up_to(&features, fps, max_frames)?
            .unsqueeze(0)?
            .to_dtype(self.dtype)?;
        Ok(AudioTokens {
            tokens,
            audio_frames,
        })
    }

    /// `torch.randn([1, C, F, H/8, W/8], generator=torch.manual_seed(seed))`
    /// (drawn in f32, cast to the model dtype).
    pub fn seeded_noise(
        &self,
        seed: u64,
        frames: usize,
        width: u32,
        height: u32,
    ) -> Result<Tensor> {
        let shape = self.latent_shape(frames, width, height);
        let n = shape.iter().product();
        let values = crate::rng::torch_randn(seed, n);
        Ok(Tensor::from_vec(values, shape.to_vec(), &self.device)?.to_dtype(self.dtype)?)
    }

    /// Step 0 latents from raw noise `[1, C, F, H/8, W/8]`:
    /// `clamp(noise, -1.5, 1.5) × init_noise_sigma`, in the model dtype.
    pub fn initial_latents(
        &self,
        noise: &Tensor,
        frames: usize,
        width: u32,
        height: u32,
    ) -> Result<Tensor> {
        let shape = self.latent_shape(frames, width, height);
        if noise.dims() != shape {
            return Err(PipelineError::InvalidInput(format!(
                "initial noise has shape {:?}, expected {shape:?} ([1, C, F, H/{f}, W/{f}])",
                noise.dims(),
                f = self.vae_scale_factor
            )));
        }
        let sigma = self.scheduler.init_noise_sigma();
        let latents = noise
            .to_device(&self.device)?
            .to_dtype(self.dtype)?
            .clamp(-INIT_NOISE_CLAMP, INIT_NOISE_CLAMP)?;
        scale(&latents, sigma)
    }

    /// Face-locator features of the mask `[1, 1, 1, H, W]`: `[1, C0, 1, h, w]`.
    pub fn face_features(&self, mask: &Tensor) -> Result<Tensor> {
        Ok(self
            .face_locator
            .forward(&mask.to_device(&self.device)?.to_dtype(self.dtype)?)?)
    }

    /// VAE-encodes the reference image `[1, 3, H, W]` in [-1, 1] and scales
    /// the latent mean by 0.18215.
    pub fn reference_latents(&self, image: &Tensor) -> Result<ReferenceLatents> {
        let unscaled = self.vae.encode(&image.to_device(&self.device)?)?.mean;
        let scaled = scale(&unscaled, LATENT_SCALE)?;
        Ok(ReferenceLatents { unscaled, scaled })
    }

    /// Runs the reference UNet once at timestep 0 on the scaled reference
    /// latents and returns its bank (`norm1` outputs, unrounded).
    pub fn reference_bank(&self, scaled_latents: &Tensor) -> Result<Bank> {
        let (_, bank) = self.reference_unet.forward(scaled_latents, 0.0)?;
        Ok(bank)
    }

    /// Everything the denoising UNet is conditioned on: the bank's K/V (its
    /// features rounded to f16 first, as the reference's
    /// `ReferenceAttentionControl.update` does even in f32 runs), the face
    /// features (`[zeros; c]` with guidance) and the audio tokens
    /// `[1, F, N, D]`.
    pub fn conditioning(
        &self,
        bank: &Bank,
        face_features: &Tensor,
        audio_tokens: &Tensor,
        cfg: f64,
    ) -> Result<Conditioning> {
        if !cfg.is_finite() || cfg < 0.0 {
            return Err(PipelineError::InvalidInput(format!(
                "cfg must be a finite number >= 0, got {cfg}"
            )));
        }
        let (b, frames, _, width) = audio_tokens.dims4()?;
        if b != 1 || frames == 0 || width != self.denoising_unet.cross_attention_dim() {
            return Err(PipelineError::InvalidInput(format!(
                "audio tokens {:?} are not [1, F, N, {}]",
                audio_tokens.dims(),
                self.denoising_unet.cross_attention_dim()
            )));
        }
        let bank = self
            .denoising_unet
            .prepare_bank(bank, BankRounding::F16)
            .map_err(|e| PipelineError::InvalidInput(format!("reference bank: {e}")))?;
        let face = face_features
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let face = if cfg > 1.0 {
            Tensor::cat(&[&face.zeros_like()?, &face], 0)?
        } else {
            face
        };
        Ok(Conditioning {
            bank,
            face,
            audio: audio_tokens.to_device(&self.device)?.to_dtype(self.dtype)?,
            cfg,
        })
    }

    /// The sampler for `cond`: `steps` DDIM timesteps and uniform
    /// closed-loop windows of `context_frames` overlapping by
    /// `context_overlap`.
    pub fn denoiser<'a>(
        &'a self,
        cond: &'a Conditioning,
        steps: usize,
        context_frames: usize,
        context_overlap: usize,
    ) -> Result<Denoiser<'a>> {
        if context_frames > 0 && context_overlap >= context_frames {
            return Err(PipelineError::InvalidInput(format!(
                "context_overlap ({context_overlap}) must be smaller than context_frames ({context_frames})"
            )));
        }
        self.check_window(context_frames.min(cond.frames()))?;
        let denoiser = Denoiser::new(
            &self.denoising_unet,
            cond,
            self.scheduler.clone(),
            steps,
            context_frames,
            context_overlap,
        )?;
        let plan = self.call_plan(cond, context_frames, denoiser.windows_per_step());
        Ok(denoiser
            .with_windows_per_call(plan.windows_per_call)
            .with_concurrent_calls(plan.concurrent_calls))
    }

    /// How the context windows of a step go through the denoising UNet: the windows in
    /// flight at once are as many as keep their activations within [`WINDOW_BATCH_BYTES`]
    /// (24 live tensors of the full-resolution stage per window and branch: skips,
    /// attention, the feed-forward's 8× inner width, the bank; `F·h·w·c0` values each).
    /// On the CPU they are spread over up to one call per thread of rayon's pool, run side
    /// by side (at small sizes one call's operations are too small to keep the cores
    /// busy); elsewhere one call at a time. At most [`MAX_WINDOWS_PER_CALL`] per call. With
    /// the released widths at 512² it is one window, one call at a time, as the reference
    /// runs.
    pub fn call_plan(
        &self,
        cond: &Conditioning,
        context_frames: usize,
        windows_per_step: usize,
    ) -> CallPlan {
        let (h, w) = cond.latent_size();
        let branches = if cond.guidance() { 2 } else { 1 };
        let per_window = branches
            * context_frames.min(cond.frames()).max(1)
            * h.max(1)
            * w.max(1)
            * self.denoising_unet.base_channels()
            * self.dtype.size_in_bytes()
            * 24;
        CallPlan::new(per_window, windows_per_step, self.side_by_side())
    }

    /// Calls that may run side by side: one per thread of rayon's pool on the CPU, one on
    /// an accelerator (its operations queue on one stream anyway).
    fn side_by_side(&self) -> usize {
        if self.device.is_cpu() {
            rayon::current_num_threads()
        } else {
            1
        }
    }

    /// Decodes frames of sampler latents `[b, C, h, w]`:
    /// `clamp(vae.decode(z / 0.18215) / 2 + 0.5, 0, 1)` as f32 `[b, 3, H, W]`.
    /// The VAE decodes every frame on its own (no operation mixes the batch),
    /// so a batch gives each frame's values as a call of its own would.
    pub fn decode_frame(&self, latents: &Tensor) -> Result<Tensor> {
        let z = scale(&latents.contiguous()?, 1.0 / LATENT_SCALE)?;
        let x = self.vae.decode(&z)?;
        // (x / 2 + 0.5).clamp(0, 1) in the model dtype, then f32 (as the
        // reference); x / 2 is exact, so x * 0.5 + 0.5 rounds the same way.
        Ok(x.affine(0.5, 0.5)?
            .clamp(0f32, 1f32)?
            .to_dtype(DType::F32)?)
    }

    /// How the frames of a `width x height` video go through the VAE decoder: the frames
    /// in flight at once are as many as keep the decoder's activations within
    /// [`DECODE_BATCH_BYTES`] (four live tensors of the widest full-resolution stage: the
    /// second-to-last up block's upsampler and the last block's first resnet run at full
    /// resolution with `c1` channels; `H·W·max(c0, c1)` values each); on the CPU spread
    /// over up to one call per thread of rayon's pool, run side by side; at most
    /// [`MAX_DECODE_BATCH`] per call. Small frames gain most; at 512² with the released
    /// widths it is one frame at a time.
    pub fn decode_plan(&self, width: u32, height: u32) -> DecodePlan {
        let widths = &self.vae.config().block_out_channels;
        let c0 = widths.first().copied().unwrap_or(1);
        let c1 = widths.get(1).copied().unwrap_or(c0);
        let per_frame =
            width as usize * height as usize * c0.max(c1).max(1) * self.dtype.size_in_bytes() * 4;
        DecodePlan::new(per_frame, self.side_by_side())
    }

    fn latent_shape(&self, frames: usize, width: u32, height: u32) -> [usize; 5] {
        let f = self.vae_scale_factor;
        [
            1,
            self.latent_channels,
            frames,
            height as usize / f,
            width as usize / f,
        ]
    }

    fn check_window(&self, window_frames: usize) -> Result<()> {
        match self.max_window_frames {
            Some(max) if window_frames > max => Err(PipelineError::InvalidInput(format!(
                "windows of {window_frames} frames exceed the motion module's position table of {max} frames: lower context_frames"
            ))),
            _ => Ok(()),
        }
    }
}

/// `[1, 3, H, W]` values in [0, 1] to `H × W × 3` RGB24 bytes by truncation
/// (`(x · 255).astype(uint8)` of the reference's `save_videos_grid`).
pub fn frame_to_rgb8(frame: &Tensor) -> Result<Vec<u8>> {
    let (b, c, h, w) = frame.dims4()?;
    if b != 1 || c != 3 {
        return Err(PipelineError::InvalidInput(format!(
            "a frame must be [1, 3, H, W], got {:?}",
            frame.dims()
        )));
    }
    // (1, 3, H, W) -> (H, W, 3)
    let hwc = frame
        .squeeze(0)?
        .permute((1, 2, 0))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    debug_assert_eq!(hwc.len(), h * w * 3);
    // `as` truncates toward zero and saturates, like numpy's cast of [0, 255].
    Ok(hwc.into_iter().map(|v| (v * 255.0) as u8).collect())
}

#[cfg(test)]
mod plan_tests {
    use super::*;

    /// `CallPlan` for `frames`-frame windows of `h x w` latents at `c0` channels, CFG, f32/f16.
    fn unet(
        frames: usize,
        side: usize,
        c0: usize,
        dtype_bytes: usize,
        windows: usize,
        threads: usize,
    ) -> CallPlan {
        CallPlan::new(
            2 * frames * side * side * c0 * dtype_bytes * 24,
            windows,
            threads,
        )
    }

    #[test]
    fn the_released_model_at_512_runs_one_window_and_one_frame_at_a_time() {
        // 12-frame windows of 64² latents, c0 = 320: 3 GB (f32), 1.5 GB (f16) per window.
        let one = CallPlan {
            windows_per_call: 1,
            concurrent_calls: 1,
        };
        assert_eq!(unet(12, 64, 320, 4, 15, 2), one);
        assert_eq!(unet(12, 64, 320, 2, 15, 1), one);
        // VAE at 512², c1 = 256: 1 GiB (f32) per frame.
        let frame = DecodePlan::new(512 * 512 * 256 * 4 * 4, 2);
        assert_eq!((frame.frames_per_call, frame.concurrent_calls), (1, 1));
    }

    #[test]
    fn small_sizes_batch_windows_and_frames_and_use_every_thread() {
        // The bench's tiny model at 128² (16² latents, c0 = 32): 15 windows, 2 threads.
        assert_eq!(
            unet(12, 16, 32, 4, 15, 2),
            CallPlan {
                windows_per_call: 8,
                concurrent_calls: 2
            }
        );
        // 4 windows spread over the two threads.
        assert_eq!(
            unet(8, 16, 32, 4, 4, 2),
            CallPlan {
                windows_per_call: 2,
                concurrent_calls: 2
            }
        );
        // One thread (or an accelerator): one call with all it may take.
        assert_eq!(unet(12, 16, 32, 4, 15, 1).concurrent_calls, 1);
        // 128² frames of the released VAE (c1 = 256): 64 MiB each, 8 in flight.
        let frames = DecodePlan::new(128 * 128 * 256 * 4 * 4, 2);
        assert_eq!((frames.frames_per_call, frames.concurrent_calls), (4, 2));
    }
}
