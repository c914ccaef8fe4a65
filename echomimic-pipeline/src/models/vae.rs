//! The image autoencoder (diffusers `AutoencoderKL`, `sd-vae-ft-mse`).
//!
//! Mirrors diffusers v0.24.0 `models/autoencoder_kl.py` (`AutoencoderKL`),
//! `models/vae.py` (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`),
//! `models/unet_2d_blocks.py` (`DownEncoderBlock2D`, `UpDecoderBlock2D`,
//! `UNetMidBlock2D`), `models/resnet.py` (`ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`) and the VAE use of `models/attention_processor.py`
//! (`Attention` with `group_norm`, one head).
//!
//! Checkpoint: `sd-vae-ft-mse/diffusion_pytorch_model.{safetensors,bin}` with
//! its `config.json`; keys `encoder.*`, `decoder.*`, `quant_conv.*`,
//! `post_quant_conv.*`. The mid-block attention may use the legacy names
//! `query/key/value/proj_attn` (the real upload) or `to_q/to_k/to_v/to_out.0`;
//! which one is decided once, when the network is built.
//!
//! Layout: images `(batch, channels, height, width)` in [−1, 1]; latents
//! `(batch, latent_channels, height/2ⁿ, width/2ⁿ)` (n = blocks − 1), unscaled
//! (EchoMimic multiplies by 0.18215 itself).
//!
//! Every size comes from the config. GroupNorm eps is 1e-6 throughout (diffusers
//! hard-codes it for the VAE); GroupNorm statistics and the attention run in
//! f32 when the weights are f16/bf16.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use crate::config::{read_json, AutoencoderKLConfig};
use crate::error::{PipelineError, Result};
use crate::kernels::{self, GroupNorm};
use crate::weights::Checkpoint;

/// GroupNorm epsilon of every VAE norm (`resnet_eps=1e-6` in `vae.py`).
const VAE_NORM_EPS: f64 = 1e-6;
/// diffusers clamps the log-variance of the latent distribution to this range.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);
/// The block types the VAE supports (the only ones `AutoencoderKL` ships with).
const DOWN_BLOCK: &str = "DownEncoderBlock2D";
const UP_BLOCK: &str = "UpDecoderBlock2D";

/// Checks the parts of a VAE config this implementation relies on.
pub fn validate_config(cfg: &AutoencoderKLConfig) -> std::result::Result<(), String> {
    let n = cfg.block_out_channels.len();
    if n == 0 {
        return Err("block_out_channels is empty".into());
    }
    for (name, types, want) in [
        ("down_block_types", &cfg.down_block_types, DOWN_BLOCK),
        ("up_block_types", &cfg.up_block_types, UP_BLOCK),
    ] {
        if !types.is_empty() && types.len() != n {
            return Err(format!(
                "{name} has {} entries but block_out_channels has {n}",
                types.len()
            ));
        }
        if let Some(t) = types.iter().find(|t| t.as_str() != want) {
            return Err(format!("unsupported {name} entry {t:?} (only {want})"));
        }
    }
    if cfg.act_fn != "silu" {
        return Err(format!("unsupported act_fn {:?} (only silu)", cfg.act_fn));
    }
    if cfg.norm_num_groups == 0 {
        return Err("norm_num_groups must be positive".into());
    }
    if let Some(c) = cfg
        .block_out_channels
        .iter()
        .find(|&&c| c == 0 || c % cfg.norm_num_groups != 0)
    {
        return Err(format!(
            "block_out_channels entry {c} is not a positive multiple of norm_num_groups {}",
            cfg.norm_num_groups
        ));
    }
    if cfg.layers_per_block == 0 || cfg.latent_channels == 0 || cfg.in_channels == 0 {
        return Err("layers_per_block, latent_channels and in_channels must be positive".into());
    }
    Ok(())
}

fn conv(
    vb: VarBuilder<'_>,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, k, cfg, vb)
}

fn group_norm(
    vb: VarBuilder<'_>,
    groups: usize,
    channels: usize,
) -> candle_core::Result<GroupNorm> {
    kernels::group_norm(groups, channels, VAE_NORM_EPS, vb)
}

/// `ResnetBlock2D` without a time embedding (`temb_channels=None`), eps 1e-6.
fn resnet(
    vb: VarBuilder<'_>,
    in_channels: usize,
    out_channels: usize,
    groups: usize,
) -> candle_core::Result<ResnetBlock2D> {
    let cfg = ResnetBlock2DConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: VAE_NORM_EPS,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(vb, &cfg)
}

#[derive(Debug, Clone)]
struct Attention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder<'_>, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let lin = |name: &str| candle_nn::linear(channels, channels, vb.pp(name));
        // The checkpoint spelling is decided here, once: the legacy names when
        // the checkpoint has them, the current diffusers names otherwise (so a
        // checkpoint with neither fails naming `to_q.weight`).
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (to_q, to_k, to_v, to_out) = if legacy {
            (lin("query")?, lin("key")?, lin("value")?, lin("proj_attn")?)
        } else {
            (lin("to_q")?, lin("to_k")?, lin("to_v")?, lin("to_out.0")?)
        };
        Ok(Self {
            group_norm: group_norm(vb.pp("group_norm"), groups, channels)?,
            to_q,
            to_k,
            to_v,
            to_out,
            // heads = 1, dim_head = channels.
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }
}

impl Module for Attention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let _span = tracing::trace_span!("vae_attention").entered();
        let (b, c, h, w) = xs.dims4()?;
        // 1. group norm, then (b, c, h, w) -> (b, h*w, c).
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // 2. projections; one head over all channels. Half precision runs in
        //    f32 here: unscaled 512-wide dot products can overflow f16.
        let dtype = xs.dtype();
        let work = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let q = self.to_q.forward(&tokens)?.to_dtype(work)?;
        let k = self.to_k.forward(&tokens)?.to_dtype(work)?;
        let v = self.to_v.forward(&tokens)?.to_dtype(work)?;
        // 3. softmax(q·kᵀ/√c)·v, chunked over the queries.
        let attn = crate::kernels::attention(&q, &k, &v, None, 1, self.scale)?.to_dtype(dtype)?;
        // 4. output projection, back to (b, c, h, w), residual.
        let out = self
            .to_out
            .forward(&attn)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// `DownEncoderBlock2D`: resnets, then (except the last block) a downsampler.
#[derive(Debug, Clone)]
struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsamplers: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(
        vb: VarBuilder<'_>,
        c_in: usize,
        c_out: usize,
        add_downsample: bool,
        cfg: &AutoencoderKLConfig,
    ) -> candle_core::Result<Self> {
        let resnets = (0..cfg.layers_per_block)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                resnet(vb.pp("resnets").pp(i), c, c_out, cfg.norm_num_groups)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // `Downsample2D(padding=0)`: pad right/bottom by one, then a stride-2 conv.
        let downsamplers = add_downsample
            .then(|| Downsample2D::new(vb.pp("downsamplers").pp(0), c_out, 0))
            .transpose()?;
        Ok(Self {
            resnets,
            downsamplers,
        })
    }
}

impl Module for DownEncoderBlock2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.downsamplers {
            Some(d) => d.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// `UpDecoderBlock2D`: `layers_per_block + 1` resnets, then (except the last
/// block) an upsampler.
#[derive(Debug, Clone)]
struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsamplers: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn new(
        vb: VarBuilder<'_>,
        c_in: usize,
        c_out: usize,
        add_upsample: bool,
        cfg: &AutoencoderKLConfig,
    ) -> candle_core::Result<Self> {
        let resnets = (0..cfg.layers_per_block + 1)
            .map(|i| {
                let c = if i == 0 { c_in } else { c_out };
                resnet(vb.pp("resnets").pp(i), c, c_out, cfg.norm_num_groups)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let upsamplers = add_upsample
            .then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), c_out))
            .transpose()?;
        Ok(Self {
            resnets,
            upsamplers,
        })
    }
}

impl Module for UpDecoderBlock2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsamplers {
            Some(u) => u.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// `UNetMidBlock2D` (one layer, no time embedding): resnet → attention → resnet.
#[derive(Debug, Clone)]
struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
}

impl UNetMidBlock2D {
    fn new(
        vb: VarBuilder<'_>,
        channels: usize,
        cfg: &AutoencoderKLConfig,
    ) -> candle_core::Result<Self> {
        let groups = cfg.norm_num_groups;
        let resnets = (0..2)
            .map(|i| resnet(vb.pp("resnets").pp(i), channels, channels, groups))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let attentions = if cfg.mid_block_add_attention {
            vec![Attention::new(vb.pp("attentions").pp(0), channels, groups)?]
        } else {
            Vec::new()
        };
        Ok(Self {
            resnets,
            attentions,
        })
    }
}

impl Module for UNetMidBlock2D {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // 1. first resnet.
        let mut xs = self.resnets[0].forward(xs, None)?;
        // 2. (attention) -> second resnet.
        if let Some(attn) = self.attentions.first() {
            xs = attn.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}

/// `Encoder` (`double_z=True`): image → 2·latent channels.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder<'_>, cfg: &AutoencoderKLConfig) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let conv_in = conv(vb.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1)?;
        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            down_blocks.push(DownEncoderBlock2D::new(
                vb.pp("down_blocks").pp(i),
                c_in,
                c_out,
                i + 1 < n,
                cfg,
            )?);
        }
        let last = boc[n - 1];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: UNetMidBlock2D::new(vb.pp("mid_block"), last, cfg)?,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), cfg.norm_num_groups, last)?,
            conv_out: conv(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        // 1. conv_in.
        let mut xs = kernels::conv2d(&self.conv_in, xs)?;
        // 2. down blocks.
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        // 3. mid block.
        let xs = self.mid_block.forward(&xs)?;
        // 4. post-process: norm -> SiLU -> conv_out.
        kernels::conv2d(&self.conv_out, &self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// `Decoder`: latent → image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder<'_>, cfg: &AutoencoderKLConfig) -> candle_core::Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let n = reversed.len();
        let conv_in = conv(vb.pp("conv_in"), cfg.latent_channels, reversed[0], 3, 1, 1)?;
        let mid_block = UNetMidBlock2D::new(vb.pp("mid_block"), reversed[0], cfg)?;
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = reversed[0];
        for (i, &c) in reversed.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            up_blocks.push(UpDecoderBlock2D::new(
                vb.pp("up_blocks").pp(i),
                c_in,
                c_out,
                i + 1 < n,
                cfg,
            )?);
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(vb.pp("conv_norm_out"), cfg.norm_num_groups, first)?,
            conv_out: conv(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        // 1. conv_in.
        let xs = kernels::conv2d(&self.conv_in, z)?;
        // 2. mid block.
        let mut xs = self.mid_block.forward(&xs)?;
        // 3. up blocks.
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        // 4. post-process: norm -> SiLU -> conv_out.
        kernels::conv2d(&self.conv_out, &self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// The latent distribution `encode` returns (diffusers
/// `DiagonalGaussianDistribution`); EchoMimic uses its `mean`.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution {
    /// Mean, `(batch, latent_channels, h, w)`.
    pub mean: Tensor,
    /// Log-variance, clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussianDistribution {
    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    config: AutoencoderKLConfig,
    dtype: DType,
    span_encode: tracing::Span,
    span_decode: tracing::Span,
}

impl AutoencoderKL {
    /// Builds the network from `vb` (weights cast to `vb`'s dtype).
    pub fn new(vb: VarBuilder<'_>, cfg: &AutoencoderKLConfig) -> candle_core::Result<Self> {
        if let Err(e) = validate_config(cfg) {
            candle_core::bail!("VAE config: {e}");
        }
        let lc2 = 2 * cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: conv(vb.pp("quant_conv"), lc2, lc2, 1, 1, 0)?,
            post_quant_conv: conv(
                vb.pp("post_quant_conv"),
                cfg.latent_channels,
                cfg.latent_channels,
                1,
                1,
                0,
            )?,
            config: cfg.clone(),
            dtype: vb.dtype(),
            span_encode: tracing::span!(tracing::Level::TRACE, "vae_encode"),
            span_decode: tracing::span!(tracing::Level::TRACE, "vae_decode"),
        })
    }

    /// Builds the network from a checkpoint, failing with the list of missing
    /// keys if any is absent. Extra keys are ignored (as diffusers does), with
    /// a warning.
    pub fn from_checkpoint(
        ck: &Checkpoint,
        cfg: &AutoencoderKLConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model = Self::new(ck.var_builder(dtype, device), cfg).map_err(|e| {
            // Missing/mis-shaped keys already name file and key; keep them typed.
            match ck.check_complete() {
                Err(missing) => missing,
                Ok(()) => PipelineError::Candle(e),
            }
        })?;
        ck.check_complete()?;
        let unused = ck.unused_keys();
        if !unused.is_empty() {
            tracing::warn!(
                count = unused.len(),
                first = %unused[0],
                "VAE checkpoint holds tensors the model does not use"
            );
        }
        Ok(model)
    }

    /// Loads a diffusers model folder (`sd-vae-ft-mse/`): `config.json` plus
    /// `diffusion_pytorch_model.safetensors` (preferred) or `.bin`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("config.json");
        let cfg: AutoencoderKLConfig = read_json(&config_path)?;
        validate_config(&cfg).map_err(|message| PipelineError::Config {
            path: config_path.clone(),
            message,
        })?;
        let ck = Checkpoint::load(diffusers_weights_file(dir)?)?;
        Self::from_checkpoint(&ck, &cfg, dtype, device)
    }

    /// The config the network was built from.
    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// dtype of the weights (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `encode(x).latent_dist`: image `(b, in_channels, H, W)` to the latent
    /// distribution `(b, latent_channels, h, w)` (unscaled).
    pub fn encode(&self, xs: &Tensor) -> candle_core::Result<DiagonalGaussianDistribution> {
        let _enter = self.span_encode.enter();
        let (_, c, _, _) = xs.dims4()?;
        if c != self.config.in_channels {
            candle_core::bail!(
                "VAE encode expects {} input channels, got {c}",
                self.config.in_channels
            );
        }
        // 1. encoder, 2. quant_conv.
        let h = self.encoder.forward(&xs.to_dtype(self.dtype)?)?;
        let moments = kernels::conv2d(&self.quant_conv, &h)?;
        // 3. split into mean and log-variance (clamped).
        let lc = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lc)?.contiguous()?;
        let logvar = moments
            .narrow(1, lc, lc)?
            .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?
            .contiguous()?;
        Ok(DiagonalGaussianDistribution { mean, logvar })
    }

    /// `decode(z).sample`: latent `(b, latent_channels, h, w)` (unscaled) to
    /// the image `(b, out_channels, H, W)`, not clamped.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span_decode.enter();
        let (_, c, _, _) = z.dims4()?;
        if c != self.config.latent_channels {
            candle_core::bail!(
                "VAE decode expects {} latent channels, got {c}",
                self.config.latent_channels
            );
        }
        // 1. post_quant_conv, 2. decoder.
        let z = kernels::conv2d(&self.post_quant_conv, &z.to_dtype(self.dtype)?)?;
        self.decoder.forward(&z)
    }
}

/// The weights file of a diffusers model folder.
fn diffusers_weights_file(dir: &Path) -> Result<PathBuf> {
    let safetensors = dir.join("diffusion_pytorch_model.safetensors");
    if safetensors.is_file() {
        return Ok(safetensors);
    }
    let bin = dir.join("diffusion_pytorch_model.bin");
    if bin.is_file() {
        return Ok(bin);
    }
    Err(PipelineError::MissingFile(safetensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> AutoencoderKLConfig {
        AutoencoderKLConfig {
            block_out_channels: vec![4, 8],
            down_block_types: vec![DOWN_BLOCK.into(); 2],
            up_block_types: vec![UP_BLOCK.into(); 2],
            layers_per_block: 1,
            norm_num_groups: 2,
            latent_channels: 3,
            ..AutoencoderKLConfig::default()
        }
    }

    #[test]
    fn shapes_follow_the_config() -> candle_core::Result<()> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let vae = AutoencoderKL::new(vb, &tiny())?;
        // Odd, non-square input: the asymmetric pad gives ceil(H/2).
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 14), &Device::Cpu)?;
        let d = vae.encode(&x)?;
        assert_eq!(d.mean.dims(), &[2, 3, 4, 7]);
        assert_eq!(d.logvar.dims(), &[2, 3, 4, 7]);
        let y = vae.decode(&d.mean)?;
        assert_eq!(y.dims(), &[2, 3, 8, 14]);
        let wrong = Tensor::zeros((1, 5, 4, 4), DType::F32, &Device::Cpu)?;
        assert!(vae.decode(&wrong).is_err());
        assert!(vae.encode(&wrong).is_err());
        Ok(())
    }

    #[test]
    fn rejects_unsupported_configs() {
        let mut cfg = tiny();
        cfg.norm_num_groups = 3;
        assert!(validate_config(&cfg)
            .unwrap_err()
            .contains("norm_num_groups"));
        let mut cfg = tiny();
        cfg.up_block_types[1] = "AttnUpDecoderBlock2D".into();
        assert!(validate_config(&cfg)
            .unwrap_err()
            .contains("AttnUpDecoderBlock2D"));
        let mut cfg = tiny();
        cfg.act_fn = "gelu".into();
        assert!(validate_config(&cfg).is_err());
        let mut cfg = tiny();
        cfg.down_block_types.pop();
        assert!(validate_config(&cfg).is_err());
        assert!(validate_config(&tiny()).is_ok());
        assert!(validate_config(&AutoencoderKLConfig::default()).is_ok());
    }
}
