//! Config files of the official release, deserialised as they are.
//!
//! * [`UNet2DConditionConfig`] — `sd-image-variations-diffusers/unet/config.json`
//!   (diffusers `UNet2DConditionModel`), the base config of both UNets.
//! * [`AutoencoderKLConfig`] — `sd-vae-ft-mse/config.json`.
//! * [`InferenceConfig`] — `configs/inference/inference_v2.yaml`
//!   (`unet_additional_kwargs`, `noise_scheduler_kwargs`).
//! * [`PromptConfig`] — `configs/prompts/animation*.yaml` (model paths).
//!
//! Missing keys take the defaults of the Python class that consumes them
//! (diffusers 0.24.0 / EchoMimic `76cdab1`). The `Default` impls of the
//! top-level structs equal the released model's files, so a user with only
//! `pretrained_weights/` needs no yaml.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

fn config_err(path: &Path, message: impl std::fmt::Display) -> PipelineError {
    PipelineError::Config {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Reads and parses a JSON config file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PipelineError::MissingFile(path.to_path_buf()),
        _ => PipelineError::io(path, e),
    })?;
    serde_json::from_str(&text).map_err(|e| config_err(path, e))
}

/// Reads and parses a YAML config file.
pub fn read_yaml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PipelineError::MissingFile(path.to_path_buf()),
        _ => PipelineError::io(path, e),
    })?;
    serde_norway::from_str(&text).map_err(|e| config_err(path, e))
}

fn default_true() -> bool {
    true
}
fn default_false() -> bool {
    false
}

// ------------------------------------------------------------------------------------------
// UNet (diffusers UNet2DConditionModel config.json)
// ------------------------------------------------------------------------------------------

/// A down block type of the UNet config. The 2D names (used in the released
/// `config.json`) and the 3D names (what `from_pretrained_2d` substitutes) are
/// both accepted; the structure is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownBlockType {
    /// Resnets + spatial transformers (+ motion modules in 3D), then a downsampler.
    #[serde(rename = "CrossAttnDownBlock2D", alias = "CrossAttnDownBlock3D")]
    CrossAttnDownBlock,
    /// Resnets only (+ motion modules in 3D).
    #[serde(rename = "DownBlock2D", alias = "DownBlock3D")]
    DownBlock,
}

/// An up block type of the UNet config (2D or 3D spelling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpBlockType {
    /// Resnets + spatial transformers (+ motion modules in 3D), then an upsampler.
    #[serde(rename = "CrossAttnUpBlock2D", alias = "CrossAttnUpBlock3D")]
    CrossAttnUpBlock,
    /// Resnets only (+ motion modules in 3D).
    #[serde(rename = "UpBlock2D", alias = "UpBlock3D")]
    UpBlock,
}

/// The mid block type (only the cross-attention mid block is supported, as in
/// every SD 1.x config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MidBlockType {
    /// resnet → transformer → resnet.
    #[serde(rename = "UNetMidBlock2DCrossAttn", alias = "UNetMidBlock3DCrossAttn")]
    UNetMidBlockCrossAttn,
}

/// A value that diffusers accepts either as one number for every block or as a
/// per-block list (`attention_head_dim`, `transformer_layers_per_block`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// Same value for every block.
    Uniform(usize),
    /// One value per down block (up blocks use the reversed list).
    List(Vec<usize>),
}

impl PerBlock {
    /// Value for down block `i` (`n` blocks in all).
    pub fn get(&self, i: usize) -> usize {
        match self {
            Self::Uniform(v) => *v,
            Self::List(l) => l
                .get(i)
                .copied()
                .unwrap_or_else(|| l.last().copied().unwrap_or(1)),
        }
    }
}

/// `UNet2DConditionModel` config (the keys EchoMimic's UNets read).
///
/// Note diffusers' historical naming: `attention_head_dim` is the **number of
/// heads** of the spatial transformers (8 in SD 1.x), so the head width is
/// `channels / attention_head_dim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    /// Latent channels in (4).
    #[serde(default = "d_four")]
    pub in_channels: usize,
    /// Latent channels out (4).
    #[serde(default = "d_four")]
    pub out_channels: usize,
    /// Output channels of each down block ([320, 640, 1280, 1280]).
    pub block_out_channels: Vec<usize>,
    /// Down block types, one per entry of `block_out_channels`.
    pub down_block_types: Vec<DownBlockType>,
    /// Up block types.
    pub up_block_types: Vec<UpBlockType>,
    /// Mid block type.
    #[serde(default = "d_mid")]
    pub mid_block_type: MidBlockType,
    /// Resnets per down block (up blocks have one more).
    #[serde(default = "d_two")]
    pub layers_per_block: usize,
    /// Number of attention heads (legacy diffusers name), per block or uniform.
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    /// `num_attention_heads` (newer diffusers name); overrides `attention_head_dim` when set.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// GroupNorm groups of resnets and spatial transformers.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// GroupNorm eps of resnets and `conv_norm_out`.
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    /// Width of the cross-attention context (768 in SD; the denoising UNet overrides it).
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    /// Sinusoid order of the timestep embedding ([cos, sin] when true).
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Activation (only `silu` is supported).
    #[serde(default = "d_act")]
    pub act_fn: String,
    /// Padding of the downsampler convs.
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    /// Mid block output scale factor.
    #[serde(default = "d_onef")]
    pub mid_block_scale_factor: f64,
    /// `2x - 1` on the input when true.
    #[serde(default = "default_false")]
    pub center_input_sample: bool,
    /// Linear (true) or 1×1 conv (false) `proj_in`/`proj_out` in spatial transformers.
    #[serde(default = "default_false")]
    pub use_linear_projection: bool,
    /// Upcast attention to f32 (we always accumulate softmax in f32).
    #[serde(default = "default_false")]
    pub upcast_attention: bool,
    /// Transformer layers per spatial transformer (only 1 is supported).
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: PerBlock,
    /// Resnet time-embedding mode (only `default` is supported).
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    /// Native sample size of the latents.
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn d_four() -> usize {
    4
}
fn d_two() -> usize {
    2
}
fn d_one() -> usize {
    1
}
fn d_onef() -> f64 {
    1.0
}
fn d_heads() -> PerBlock {
    PerBlock::Uniform(8)
}
fn d_tlpb() -> PerBlock {
    PerBlock::Uniform(1)
}
fn d_groups() -> usize {
    32
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_act() -> String {
    "silu".into()
}
fn d_shift() -> String {
    "default".into()
}
fn d_mid() -> MidBlockType {
    MidBlockType::UNetMidBlockCrossAttn
}

impl Default for UNet2DConditionConfig {
    /// `lambdalabs/sd-image-variations-diffusers` `unet/config.json`.
    fn default() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: vec![
                CrossAttnDownBlock,
                CrossAttnDownBlock,
                CrossAttnDownBlock,
                DownBlock,
            ],
            up_block_types: vec![
                UpBlock,
                CrossAttnUpBlock,
                CrossAttnUpBlock,
                CrossAttnUpBlock,
            ],
            mid_block_type: MidBlockType::UNetMidBlockCrossAttn,
            layers_per_block: 2,
            attention_head_dim: PerBlock::Uniform(8),
            num_attention_heads: None,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            act_fn: "silu".into(),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            center_input_sample: false,
            use_linear_projection: false,
            upcast_attention: false,
            transformer_layers_per_block: PerBlock::Uniform(1),
            resnet_time_scale_shift: "default".into(),
            sample_size: Some(64),
        }
    }
}

impl UNet2DConditionConfig {
    /// Number of attention heads of down block `i` (up block `j` uses down
    /// block `n - 1 - j`, as diffusers reverses the list).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }

    /// Rejects configs this implementation does not support, with a reason.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} down / {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.act_fn != "silu" {
            return Err(format!(
                "act_fn `{}` is not supported (only silu)",
                self.act_fn
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(format!(
                "resnet_time_scale_shift `{}` is not supported",
                self.resnet_time_scale_shift
            ));
        }
        if (0..n).any(|i| self.transformer_layers_per_block.get(i) != 1) {
            return Err("transformer_layers_per_block != 1 is not supported".into());
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                ));
            }
            let h = self.heads(i);
            if h == 0 || c % h != 0 {
                return Err(format!(
                    "block_out_channels[{i}] = {c} is not divisible by {h} heads"
                ));
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------
// EchoMimic inference yaml
// ------------------------------------------------------------------------------------------

/// `motion_module_kwargs` of the inference yaml (AnimateDiff "Vanilla" temporal module).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MotionModuleKwargs {
    /// Heads of the temporal attentions.
    #[serde(default = "d_heads_usize")]
    pub num_attention_heads: usize,
    /// Temporal transformer blocks per module.
    #[serde(default = "d_one")]
    pub num_transformer_block: usize,
    /// Attention blocks inside each temporal transformer block.
    #[serde(default = "d_attn_types")]
    pub attention_block_types: Vec<String>,
    /// Add the sinusoidal position encoding.
    #[serde(default = "default_false")]
    pub temporal_position_encoding: bool,
    /// Length of the position-encoding table.
    #[serde(default = "d_pe_len")]
    pub temporal_position_encoding_max_len: usize,
    /// Channel divisor of the temporal attention (only 1 is supported).
    #[serde(default = "d_one")]
    pub temporal_attention_dim_div: usize,
}

fn d_heads_usize() -> usize {
    8
}
fn d_pe_len() -> usize {
    24
}
fn d_attn_types() -> Vec<String> {
    vec!["Temporal_Self".into(), "Temporal_Self".into()]
}

impl Default for MotionModuleKwargs {
    /// The values of EchoMimic's `inference_v2.yaml`.
    fn default() -> Self {
        Self {
            num_attention_heads: 8,
            num_transformer_block: 1,
            attention_block_types: d_attn_types(),
            temporal_position_encoding: true,
            temporal_position_encoding_max_len: 32,
            temporal_attention_dim_div: 1,
        }
    }
}

/// `unet_additional_kwargs` of the inference yaml (arguments of
/// `EchoUNet3DConditionModel.from_pretrained_2d`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnetAdditionalKwargs {
    /// GroupNorm per frame (true for the released model).
    #[serde(default = "default_false")]
    pub use_inflated_groupnorm: bool,
    /// Cross-frame attention (unsupported; must be false).
    #[serde(default = "default_false")]
    pub unet_use_cross_frame_attention: bool,
    /// Temporal attention inside spatial blocks (unsupported; must be false).
    #[serde(default = "default_false")]
    pub unet_use_temporal_attention: bool,
    /// Insert motion modules.
    #[serde(default = "default_true")]
    pub use_motion_module: bool,
    /// Width of the audio tokens (overrides the base config's `cross_attention_dim`).
    #[serde(default)]
    pub cross_attention_dim: Option<usize>,
    /// Resolutions (down factors 1, 2, 4, 8) that get motion modules.
    #[serde(default = "d_mm_res")]
    pub motion_module_resolutions: Vec<usize>,
    /// Motion module in the mid block.
    #[serde(default = "default_false")]
    pub motion_module_mid_block: bool,
    /// Motion modules only in the decoder.
    #[serde(default = "default_false")]
    pub motion_module_decoder_only: bool,
    /// Motion module type (only `Vanilla`).
    #[serde(default = "d_mm_type")]
    pub motion_module_type: String,
    /// Motion module arguments.
    #[serde(default)]
    pub motion_module_kwargs: MotionModuleKwargs,
}

fn d_mm_res() -> Vec<usize> {
    vec![1, 2, 4, 8]
}
fn d_mm_type() -> String {
    "Vanilla".into()
}

impl Default for UnetAdditionalKwargs {
    /// The values of EchoMimic's `inference_v2.yaml`.
    fn default() -> Self {
        Self {
            use_inflated_groupnorm: true,
            unet_use_cross_frame_attention: false,
            unet_use_temporal_attention: false,
            use_motion_module: true,
            cross_attention_dim: Some(384),
            motion_module_resolutions: d_mm_res(),
            motion_module_mid_block: true,
            motion_module_decoder_only: false,
            motion_module_type: "Vanilla".into(),
            motion_module_kwargs: MotionModuleKwargs::default(),
        }
    }
}

/// How betas are spaced (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end)` (EchoMimic).
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end))²` (SD 1.x training).
    ScaledLinear,
    /// Cosine schedule (`squaredcos_cap_v2`).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the network predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// The velocity v = √ᾱ·ε − √(1−ᾱ)·x₀ (EchoMimic).
    VPrediction,
    /// The clean sample x₀.
    Sample,
}

/// How inference timesteps are placed (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `arange(0, steps) * ratio + steps_offset`.
    Leading,
    /// `round(arange(T, 0, -T/steps)) - 1` (EchoMimic).
    Trailing,
    /// `round(linspace(0, T-1, steps))`.
    Linspace,
}

/// `noise_scheduler_kwargs` of the inference yaml (diffusers `DDIMScheduler`
/// arguments; absent keys take the diffusers 0.24 defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdimSchedulerConfig {
    /// Training timesteps (1000).
    #[serde(default = "d_train_t")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// Beta spacing.
    #[serde(default = "d_beta_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Clip x₀ to ±`clip_sample_range`.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    /// Range of the x₀ clip.
    #[serde(default = "d_onef")]
    pub clip_sample_range: f64,
    /// ᾱ of the step after the last one is 1 (true) or ᾱ₀ (false).
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// Offset added to leading timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// What the network predicts.
    #[serde(default = "d_pred")]
    pub prediction_type: PredictionType,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    #[serde(default = "default_false")]
    pub rescale_betas_zero_snr: bool,
    /// Timestep placement.
    #[serde(default = "d_spacing")]
    pub timestep_spacing: TimestepSpacing,
    /// Dynamic thresholding (unsupported; must be false).
    #[serde(default = "default_false")]
    pub thresholding: bool,
}

fn d_train_t() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_beta_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn d_pred() -> PredictionType {
    PredictionType::Epsilon
}
fn d_spacing() -> TimestepSpacing {
    TimestepSpacing::Leading
}

impl Default for DdimSchedulerConfig {
    /// The values of EchoMimic's `inference_v2.yaml`.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::Linear,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 1,
            prediction_type: PredictionType::VPrediction,
            rescale_betas_zero_snr: true,
            timestep_spacing: TimestepSpacing::Trailing,
            thresholding: false,
        }
    }
}

/// `configs/inference/inference_v2.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InferenceConfig {
    /// Arguments of the 3D UNet.
    #[serde(default)]
    pub unet_additional_kwargs: UnetAdditionalKwargs,
    /// DDIM arguments.
    #[serde(default)]
    pub noise_scheduler_kwargs: DdimSchedulerConfig,
}

impl InferenceConfig {
    /// Reads an inference yaml.
    pub fn from_file(path: &Path) -> Result<Self> {
        read_yaml(path)
    }
}

// ------------------------------------------------------------------------------------------
// VAE
// ------------------------------------------------------------------------------------------

/// diffusers `AutoencoderKL` config (`sd-vae-ft-mse/config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in (3).
    #[serde(default = "d_three")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "d_three")]
    pub out_channels: usize,
    /// Channels per encoder block (decoder reversed).
    #[serde(default = "d_vae_boc")]
    pub block_out_channels: Vec<usize>,
    /// Encoder block types (only `DownEncoderBlock2D`).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Decoder block types (only `UpDecoderBlock2D`).
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Resnets per encoder block (decoder has one more).
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    /// Activation (only `silu`).
    #[serde(default = "d_act")]
    pub act_fn: String,
    /// Latent channels (4).
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Native image size.
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Latent scaling factor (EchoMimic hard-codes 0.18215 anyway).
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    /// Whether the mid block has attention (diffusers default true).
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn d_three() -> usize {
    3
}
fn d_vae_boc() -> Vec<usize> {
    vec![64]
}
fn d_scaling() -> f64 {
    0.18215
}

impl Default for AutoencoderKLConfig {
    /// `stabilityai/sd-vae-ft-mse` `config.json`.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(256),
            scaling_factor: 0.18215,
            mid_block_add_attention: true,
        }
    }
}

// ------------------------------------------------------------------------------------------
// Prompt yaml (model paths)
// ------------------------------------------------------------------------------------------

/// Weight precision named in the prompt yaml (`weight_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum WeightDtype {
    /// Half precision (the released configs).
    #[serde(rename = "fp16")]
    #[default]
    F16,
    /// bfloat16.
    #[serde(rename = "bf16")]
    BF16,
    /// Single precision.
    #[serde(rename = "fp32")]
    F32,
}

/// `configs/prompts/animation*.yaml` of `infer_audio2vid*.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    /// `sd-image-variations-diffusers/` (only `unet/config.json` is read).
    pub pretrained_base_model_path: PathBuf,
    /// `sd-vae-ft-mse/`.
    pub pretrained_vae_path: PathBuf,
    /// `audio_processor/whisper_tiny.pt`.
    pub audio_model_path: PathBuf,
    /// `denoising_unet.pth` or `denoising_unet_acc.pth`.
    pub denoising_unet_path: PathBuf,
    /// `reference_unet.pth`.
    pub reference_unet_path: PathBuf,
    /// `face_locator.pth`.
    pub face_locator_path: PathBuf,
    /// `motion_module.pth` or `motion_module_acc.pth`.
    pub motion_module_path: PathBuf,
    /// `configs/inference/inference_v2.yaml`; absent = the built-in default.
    #[serde(default)]
    pub inference_config: Option<PathBuf>,
    /// Weight precision.
    #[serde(default)]
    pub weight_dtype: WeightDtype,
}

impl PromptConfig {
    /// Reads a prompt yaml and resolves every relative path.
    ///
    /// The reference script opens the paths relative to the working directory
    /// (`./pretrained_weights/...`); we try that first, then the yaml's folder
    /// and each of its ancestors, and keep the first candidate that exists (so
    /// the file works wherever the command is run from).
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut cfg: Self = read_yaml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| resolve_relative(p, base);
        cfg.pretrained_base_model_path = resolve(&cfg.pretrained_base_model_path);
        cfg.pretrained_vae_path = resolve(&cfg.pretrained_vae_path);
        cfg.audio_model_path = resolve(&cfg.audio_model_path);
        cfg.denoising_unet_path = resolve(&cfg.denoising_unet_path);
        cfg.reference_unet_path = resolve(&cfg.reference_unet_path);
        cfg.face_locator_path = resolve(&cfg.face_locator_path);
        cfg.motion_module_path = resolve(&cfg.motion_module_path);
        cfg.inference_config = cfg.inference_config.as_deref().map(resolve);
        Ok(cfg)
    }

    /// The official layout under a `pretrained_weights/` folder: the normal
    /// (`acc = false`) or accelerated weights.
    pub fn from_weights_dir(dir: &Path, acc: bool) -> Self {
        let suffix = if acc { "_acc" } else { "" };
        Self {
            pretrained_base_model_path: dir.join("sd-image-variations-diffusers"),
            pretrained_vae_path: dir.join("sd-vae-ft-mse"),
            audio_model_path: dir.join("audio_processor").join("whisper_tiny.pt"),
            denoising_unet_path: dir.join(format!("denoising_unet{suffix}.pth")),
            reference_unet_path: dir.join("reference_unet.pth"),
            face_locator_path: dir.join("face_locator.pth"),
            motion_module_path: dir.join(format!("motion_module{suffix}.pth")),
            inference_config: None,
            weight_dtype: WeightDtype::F16,
        }
    }
}

/// Resolves a possibly relative path: as given (relative to the working
/// directory), else under `base` or one of its ancestors; the first existing
/// candidate wins, and when none exists the working-directory reading is kept
/// (so the eventual "missing file" error shows the path the user wrote).
pub fn resolve_relative(p: &Path, base: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        return p.to_path_buf();
    }
    let mut dir = Some(base);
    while let Some(d) = dir {
        let candidate = d.join(p);
        if candidate.exists() {
            return candidate;
        }
        dir = d.parent().filter(|q| !q.as_os_str().is_empty());
    }
    p.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public")
    }

    #[test]
    fn real_base_unet_config_parses_to_the_builtin_default() {
        let text = r#"{
          "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.4.0.dev0",
          "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
          "center_input_sample": false, "cross_attention_dim": 768,
          "down_block_types": ["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
          "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
          "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
          "out_channels": 4, "sample_size": 64,
          "up_block_types": ["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"]
        }"#;
        let cfg: UNet2DConditionConfig = serde_json::from_str(text).unwrap();
        assert_eq!(cfg, UNet2DConditionConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn golden_configs_parse() -> Result<()> {
        let g = golden();
        let unet: UNet2DConditionConfig = read_json(
            &g.join("pretrained_weights/sd-image-variations-diffusers/unet/config.json"),
        )?;
        assert_eq!(unet.block_out_channels, vec![32, 32, 32, 64]);
        assert_eq!(unet.heads(0), 2);
        unet.validate().unwrap();
        let vae: AutoencoderKLConfig =
            read_json(&g.join("pretrained_weights/sd-vae-ft-mse/config.json"))?;
        assert_eq!(vae.norm_num_groups, 4);
        let inf = InferenceConfig::from_file(&g.join("configs/inference/inference_tiny.yaml"))?;
        assert_eq!(inf.unet_additional_kwargs.cross_attention_dim, Some(32));
        assert_eq!(
            inf.unet_additional_kwargs
                .motion_module_kwargs
                .num_attention_heads,
            2
        );
        assert_eq!(
            inf.noise_scheduler_kwargs.prediction_type,
            PredictionType::VPrediction
        );
        assert!(inf.noise_scheduler_kwargs.set_alpha_to_one);
        Ok(())
    }

    #[test]
    fn prompt_yaml_paths_resolve_from_any_working_directory() -> Result<()> {
        let g = golden();
        let p = PromptConfig::from_file(&g.join("configs/prompts/animation_tiny.yaml"))?;
        assert!(
            p.denoising_unet_path.exists(),
            "{:?}",
            p.denoising_unet_path
        );
        assert!(p.audio_model_path.exists());
        assert!(p.inference_config.as_ref().unwrap().exists());
        assert_eq!(p.weight_dtype, WeightDtype::F32);
        Ok(())
    }

    #[test]
    fn unknown_block_type_fails_at_parse_time() {
        let text = r#"{"block_out_channels":[32],"down_block_types":["AttnDownBlock2D"],"up_block_types":["UpBlock2D"]}"#;
        let err = serde_json::from_str::<UNet2DConditionConfig>(text).unwrap_err();
        assert!(err.to_string().contains("AttnDownBlock2D"), "{err}");
    }

    #[test]
    fn missing_config_is_missing_file() {
        let r: Result<InferenceConfig> = read_yaml(Path::new("/nonexistent/x.yaml"));
        assert!(matches!(r, Err(PipelineError::MissingFile(_))));
    }
}
