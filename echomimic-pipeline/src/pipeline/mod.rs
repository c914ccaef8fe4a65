//! The EchoMimic v1 audio-to-video pipeline (`Audio2VideoPipeline` of
//! BadToBest/EchoMimic @ 76cdab1, `infer_audio2vid.py` and
//! `infer_audio2vid_acc.py`; spec §7).
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
//!   without dividing by their count (a bug, spec §9.20); here they are
//!   always averaged, as the acc pipeline does;
//! * the acc pipeline's v → x̂₀ → v round trip is an exact identity and is
//!   skipped (spec §9.21);
//! * with f16/bf16 weights the seeded noise is drawn in f32 and cast (the
//!   exact f16 stream of torch 2.2 is unverified, spec §9.15); f32 noise
//!   matches `torch.randn` to 4e-7.
//!
//! The frame count comes from the audio (about `fps × seconds + 2`, spec
//! §5.3). When `L` is smaller, the video is cut and
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
mod progress;
mod request;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
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

pub use denoise::{Conditioning, DenoiseObserver, Denoiser, StepOutput, UnetCall};
#[cfg(feature = "test-support")]
pub use dump::FrameDiff;
pub use dump::{TensorDump, VIDEO_FRAME_PREFIX};
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

/// A hook receiving named intermediate tensors (see [`TensorDump`]).
pub type TensorHook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

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
            ModelSource::WeightsDir { dir, variant } => {
                if !dir.is_dir() {
                    return Err(PipelineError::MissingFile(dir.clone()));
                }
                let variant = variant.unwrap_or_else(|| ModelSource::detect_variant(dir));
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
        self.run(request, progress, cancel, frames, Dumper(None))
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
        self.run(request, progress, cancel, frames, Dumper(Some(dump)))
    }

    fn run(
        &self,
        request: &GenerateRequest,
        progress: &mut dyn FnMut(Progress),
        cancel: &AtomicBool,
        sink: &mut dyn FrameSink,
        mut dump: Dumper<'_>,
    ) -> Result<GenerateReport> {
        let start = Instant::now();
        let mut timings = StageTimings::default();
        request.validate(self.vae_scale_factor)?;
        check_cancel(cancel)?;

        // 1. face: detect, mask, crop
        progress(Progress::Stage(Stage::Face));
        let t = Instant::now();
        let crop = self.face_crop(request)?;
        let face_geometry = FaceGeometry {
            image_size: crop.image_size,
            square_rect: crop.square_rect,
        };
        timings.face = t.elapsed();
        check_cancel(cancel)?;

        // 2. audio: features and per-frame windows, F = min(L, audio frames)
        progress(Progress::Stage(Stage::AudioFeatures));
        let t = Instant::now();
        let tokens = {
            let wave: Cow<'_, [f32]> = match &request.audio {
                SpeechInput::File(path) => {
                    Cow::Owned(audio::load_waveform_16k(path, &request.audio_limits)?)
                }
                SpeechInput::Waveform16k(w) => Cow::Borrowed(w),
            };
            self.audio_tokens(&wave, request.fps, request.max_frames)?
        };
        let frames = tokens.frames();
        self.check_window(request.context_frames.min(frames))?;
        let windows = uniform_windows(frames, request.context_frames, request.context_overlap)
            .map_err(PipelineError::InvalidInput)?
            .len();
        progress(Progress::Plan {
            frames,
            audio_frames: tokens.audio_frames,
            unet_calls: windows * request.steps,
        });
        dump.emit("video_length", || {
            Ok(Tensor::new(frames as i64, &Device::Cpu)?)
        })?;
        dump.emit("audio_fea_final", || Ok(tokens.tokens.clone()))?;
        timings.audio = t.elapsed();
        check_cancel(cancel)?;

        // 3. reference: noise, face features, reference latents and bank
        progress(Progress::Stage(Stage::Reference));
        let t = Instant::now();
        let seed = request::resolve_seed(request.seed);
        let noise = match &request.init_noise {
            Some(noise) => noise.clone(),
            None => self.seeded_noise(seed, frames, request.width, request.height)?,
        };
        let latents = self.initial_latents(&noise, frames, request.width, request.height)?;
        dump.emit("latents_randn", || Ok(noise.clone()))?;
        dump.emit("latents_init", || Ok(latents.clone()))?;
        drop(noise);
        let mask = crop.mask_tensor(self.dtype, &self.device)?;
        let face = self.face_features(&mask)?;
        dump.emit("face_mask_tensor", || Ok(mask.clone()))?;
        dump.emit("face_locator_out", || Ok(face.clone()))?;
        let image = crop.reference_image_tensor(self.dtype, &self.device)?;
        let reference = self.reference_latents(&image)?;
        dump.emit("ref_image_tensor", || Ok(image.clone()))?;
        dump.emit("ref_image_latents_unscaled", || {
            Ok(reference.unscaled.clone())
        })?;
        dump.emit("ref_image_latents", || Ok(reference.scaled.clone()))?;
        check_cancel(cancel)?;
        let bank = self.reference_bank(&reference.scaled)?;
        for (path, features) in bank.iter() {
            dump.emit_named(|| format!("ref_bank.{path}"), || Ok(features.clone()))?;
        }
        let cond = self.conditioning(&bank, &face, &tokens.tokens, request.cfg)?;
        drop((bank, tokens.tokens, crop));
        timings.reference = t.elapsed();
        check_cancel(cancel)?;

        // 4. denoising
        progress(Progress::Stage(Stage::Denoising));
        let t = Instant::now();
        let denoiser = self.denoiser(
            &cond,
            request.steps,
            request.context_frames,
            request.context_overlap,
        )?;
        let timesteps: Vec<i64> = denoiser.timesteps().iter().map(|&t| t as i64).collect();
        dump.emit("timesteps", || {
            Ok(Tensor::from_vec(
                timesteps.clone(),
                timesteps.len(),
                &Device::Cpu,
            )?)
        })?;
        let mut observer = RunObserver {
            progress: &mut *progress,
            cancel,
            dump: &mut dump,
            done: 0,
            total: denoiser.unet_calls(),
            steps: denoiser.steps(),
        };
        let mut latents = latents;
        for step in 0..denoiser.steps() {
            let out = denoiser.step(step, &latents, &mut observer)?;
            let dump = &mut *observer.dump;
            dump.emit_named(
                || format!("step{step}.contexts"),
                || windows_tensor(&out.windows),
            )?;
            dump.emit_named(
                || format!("step{step}.noise_pred_cfg"),
                || Ok(out.noise_pred.clone()),
            )?;
            dump.emit_named(
                || format!("step{step}.latents_out"),
                || Ok(out.latents.clone()),
            )?;
            latents = out.latents;
        }
        let unet_calls = denoiser.unet_calls();
        debug_assert_eq!(windows, denoiser.windows_per_step());
        drop(denoiser);
        drop(cond);
        timings.denoising = t.elapsed();

        // 5. decoding, one frame at a time
        progress(Progress::Stage(Stage::Decoding));
        let t = Instant::now();
        for i in 0..frames {
            check_cancel(cancel)?;
            let frame = self.decode_frame(&latents.narrow(2, i, 1)?.squeeze(2)?)?;
            dump.emit_named(|| format!("{VIDEO_FRAME_PREFIX}{i}"), || Ok(frame.clone()))?;
            let rgb = frame_to_rgb8(&frame)?;
            sink.frame(i, &rgb)?;
            progress(Progress::Frame {
                done: i + 1,
                total: frames,
            });
        }
        timings.decoding = t.elapsed();
        timings.total = start.elapsed();

        Ok(GenerateReport {
            frames,
            audio_frames: tokens.audio_frames,
            truncated: frames < tokens.audio_frames,
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
        Denoiser::new(
            &self.denoising_unet,
            cond,
            self.scheduler.clone(),
            steps,
            context_frames,
            context_overlap,
        )
    }

    /// Decodes one frame of sampler latents `[1, C, h, w]`:
    /// `clamp(vae.decode(z / 0.18215) / 2 + 0.5, 0, 1)` as f32 `[1, 3, H, W]`.
    pub fn decode_frame(&self, latents: &Tensor) -> Result<Tensor> {
        let z = scale(&latents.contiguous()?, 1.0 / LATENT_SCALE)?;
        let x = self.vae.decode(&z)?;
        // (x / 2 + 0.5).clamp(0, 1) in the model dtype, then f32 (as the
        // reference); x / 2 is exact, so x * 0.5 + 0.5 rounds the same way.
        Ok(x.affine(0.5, 0.5)?
            .clamp(0f32, 1f32)?
            .to_dtype(DType::F32)?)
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

/// `xs × s` with one rounding per element: half-precision tensors are
/// scaled in f32 (PyTorch's "opmath") instead of with an f16-rounded factor.
pub(super) fn scale(xs: &Tensor, s: f64) -> Result<Tensor> {
    Ok(match xs.dtype() {
        DType::F16 | DType::BF16 => xs
            .to_dtype(DType::F32)?
            .affine(s, 0.0)?
            .to_dtype(xs.dtype())?,
        _ => xs.affine(s, 0.0)?,
    })
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(PipelineError::Cancelled)
    } else {
        Ok(())
    }
}

/// `[windows, frames]` frame indices as i64 (golden `step{i}.contexts`).
fn windows_tensor(windows: &[Vec<usize>]) -> Result<Tensor> {
    let n = windows.len();
    let len = windows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = windows.iter().flatten().map(|&i| i as i64).collect();
    Ok(Tensor::from_vec(flat, (n, len), &Device::Cpu)?)
}

/// The optional tensor hook; tensors and names are only built when it is set.
struct Dumper<'a>(Option<TensorHook<'a>>);

impl Dumper<'_> {
    fn emit(&mut self, name: &str, tensor: impl FnOnce() -> Result<Tensor>) -> Result<()> {
        match self.0.as_mut() {
            Some(hook) => hook(name, &tensor()?),
            None => Ok(()),
        }
    }

    fn emit_named(
        &mut self,
        name: impl FnOnce() -> String,
        tensor: impl FnOnce() -> Result<Tensor>,
    ) -> Result<()> {
        match self.0.as_mut() {
            Some(hook) => hook(&name(), &tensor()?),
            None => Ok(()),
        }
    }
}

/// Progress, cancellation and the step-0 window dump around UNet calls.
struct RunObserver<'a, 'd> {
    progress: &'a mut dyn FnMut(Progress),
    cancel: &'a AtomicBool,
    dump: &'a mut Dumper<'d>,
    done: usize,
    total: usize,
    steps: usize,
}

impl DenoiseObserver for RunObserver<'_, '_> {
    fn before_unet(&mut self, _call: &UnetCall<'_>) -> Result<()> {
        check_cancel(self.cancel)
    }

    fn after_unet(&mut self, call: &UnetCall<'_>, output: &Tensor) -> Result<()> {
        if call.step == 0 {
            self.dump.emit_named(
                || format!("step0.window{}.unet_out", call.window),
                || Ok(output.clone()),
            )?;
        }
        self.done += 1;
        (self.progress)(Progress::UnetCall {
            step: call.step,
            steps: self.steps,
            window: call.window,
            windows: call.windows,
            done: self.done,
            total: self.total,
        });
        Ok(())
    }
}
