//! Down, mid and up blocks of the denoising UNet.
//!
//! Mirrors EchoMimic's `src/models/unet_3d_blocks.py` (BadToBest/EchoMimic @
//! 76cdab1). `CrossAttnDownBlock3D`/`DownBlock3D` are one [`DownBlock3D`]
//! with or without transformers, likewise `CrossAttnUpBlock3D`/`UpBlock3D`
//! as [`UpBlock3D`]; `UNetMidBlock3DCrossAttn` stands alone. Order inside the
//! blocks: `resnet → spatial transformer → motion module` per layer (no
//! transformer in the plain blocks); mid block `resnets.0 → (attentions.i →
//! motion_modules.i → resnets.i+1)*`; up blocks concatenate `[h, skip]` on
//! channels before each resnet.
//!
//! Keys (relative to the block): `resnets.j.*`, `attentions.j.*`,
//! `motion_modules.j.*`, `downsamplers.0.conv.*`, `upsamplers.0.conv.*`.
//! Layout: `[B·F, C, H, W]` with batch-major rows.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::{PreparedBank, TemporalBasicTransformerBlock};
use super::motion_module::VanillaTemporalModule;
use super::resnet::{Downsample2D, ResnetBlock3D, Upsample2D};
use super::transformer_3d::Transformer3DModel;
use super::unet_2d_blocks::{self, cat_skip, upsampler, BlockConfig};
use crate::config::MotionModuleKwargs;

/// Sizes of a 3D block: the 2D sizes plus the video options.
#[derive(Debug, Clone, PartialEq)]
pub struct Block3DConfig {
    /// Channels, layers, heads, ...
    pub block: BlockConfig,
    /// GroupNorm per frame in the resnets.
    pub use_inflated_groupnorm: bool,
    /// Motion-module arguments when the block has motion modules.
    pub motion: Option<MotionModuleKwargs>,
}

/// Everything a block needs besides its input, for one UNet call.
#[derive(Debug, Clone, Copy)]
pub struct Conditioning<'a> {
    /// Time embedding `[1, T]`.
    pub temb: &'a Tensor,
    /// Audio tokens `[B·F, N, D]`.
    pub audio: &'a Tensor,
    /// Reference features.
    pub bank: &'a PreparedBank,
    /// Leading rows that attend without the bank (the CFG unconditional half).
    pub uncond_rows: usize,
    /// Frames per video (F).
    pub frames: usize,
}

fn resnet(
    vb: &VarBuilder<'_>,
    i: usize,
    cfg: &Block3DConfig,
    rcfg: &super::resnet::ResnetBlock2DConfig,
) -> Result<ResnetBlock3D> {
    ResnetBlock3D::new(vb.pp("resnets").pp(i), rcfg, cfg.use_inflated_groupnorm)
}

fn motion_modules(
    vb: &VarBuilder<'_>,
    cfg: &Block3DConfig,
    channels: usize,
    n: usize,
) -> Result<Vec<VanillaTemporalModule>> {
    match &cfg.motion {
        None => Ok(Vec::new()),
        Some(kwargs) => (0..n)
            .map(|i| VanillaTemporalModule::new(vb.pp("motion_modules").pp(i), channels, kwargs))
            .collect(),
    }
}

fn motion(
    modules: &[VanillaTemporalModule],
    i: usize,
    xs: Tensor,
    frames: usize,
) -> Result<Tensor> {
    match modules.get(i) {
        Some(m) => m.forward(&xs, frames),
        None => Ok(xs),
    }
}

fn downsampler(vb: &VarBuilder<'_>, cfg: &BlockConfig) -> Result<Option<Downsample2D>> {
    if cfg.add_sampler && cfg.downsample_padding == 0 {
        // Downsample3D raises NotImplementedError for padding 0.
        candle_core::bail!("downsample_padding 0 is not supported by the 3D UNet");
    }
    unet_2d_blocks::downsampler(vb, cfg)
}

fn reader_blocks(
    attentions: &[Transformer3DModel],
) -> impl Iterator<Item = &TemporalBasicTransformerBlock> {
    attentions.iter().flat_map(|a| a.transformer_blocks())
}

fn attentions(
    vb: &VarBuilder<'_>,
    b: &BlockConfig,
    cross_attention: bool,
) -> Result<Vec<Transformer3DModel>> {
    if !cross_attention {
        return Ok(Vec::new());
    }
    (0..b.num_layers)
        .map(|i| Transformer3DModel::new(vb.pp("attentions").pp(i), &b.transformer(b.out_channels)))
        .collect()
}

/// One layer: `resnet → transformer (if any) → motion module (if any)`.
fn layer(
    resnet: &ResnetBlock3D,
    attention: Option<&Transformer3DModel>,
    motion_module: Option<&VanillaTemporalModule>,
    xs: &Tensor,
    cond: &Conditioning<'_>,
) -> Result<Tensor> {
    let mut h = resnet.forward(xs, cond.temb, cond.frames)?;
    if let Some(attn) = attention {
        h = attn.forward(&h, cond.audio, cond.bank, cond.uncond_rows)?;
    }
    match motion_module {
        Some(m) => m.forward(&h, cond.frames),
        None => Ok(h),
    }
}

/// A down block: `resnet → transformer → motion module` per layer, then a
/// downsampler. With transformers it is the reference's
/// `CrossAttnDownBlock3D`, without them its `DownBlock3D`; the keys are the
/// same but for `attentions.*`.
#[derive(Debug, Clone)]
pub struct DownBlock3D {
    resnets: Vec<ResnetBlock3D>,
    attentions: Vec<Transformer3DModel>,
    motion_modules: Vec<VanillaTemporalModule>,
    downsamplers: Option<Downsample2D>,
}

impl DownBlock3D {
    /// Loads the block at `vb`; `cross_attention` selects `CrossAttnDownBlock3D`.
    pub fn new(vb: VarBuilder<'_>, cfg: &Block3DConfig, cross_attention: bool) -> Result<Self> {
        let b = &cfg.block;
        let resnets = (0..b.num_layers)
            .map(|i| resnet(&vb, i, cfg, &b.down_resnet(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions: attentions(&vb, b, cross_attention)?,
            motion_modules: motion_modules(&vb, cfg, b.out_channels, b.num_layers)?,
            downsamplers: downsampler(&vb, b)?,
        })
    }

    /// The blocks that read the bank (none without transformers).
    pub fn reader_blocks(&self) -> impl Iterator<Item = &TemporalBasicTransformerBlock> {
        reader_blocks(&self.attentions)
    }

    /// Returns the output and the skips it adds.
    pub fn forward(&self, xs: &Tensor, cond: &Conditioning<'_>) -> Result<(Tensor, Vec<Tensor>)> {
        let _span = tracing::trace_span!("down_block_3d").entered();
        let mut h = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            let (attn, motion) = (self.attentions.get(i), self.motion_modules.get(i));
            h = layer(resnet, attn, motion, &h, cond)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `resnets.0 → (attentions.i → motion_modules.i → resnets.i+1)*`.
#[derive(Debug, Clone)]
pub struct UNetMidBlock3DCrossAttn {
    resnets: Vec<ResnetBlock3D>,
    attentions: Vec<Transformer3DModel>,
    motion_modules: Vec<VanillaTemporalModule>,
}

impl UNetMidBlock3DCrossAttn {
    /// Loads the block at `vb` (`block.in_channels` wide).
    pub fn new(vb: VarBuilder<'_>, cfg: &Block3DConfig) -> Result<Self> {
        let b = &cfg.block;
        let c = b.in_channels;
        let resnets = (0..=b.num_layers)
            .map(|i| resnet(&vb, i, cfg, &b.resnet(c, c)))
            .collect::<Result<_>>()?;
        let attentions = (0..b.num_layers)
            .map(|i| Transformer3DModel::new(vb.pp("attentions").pp(i), &b.transformer(c)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions,
            motion_modules: motion_modules(&vb, cfg, c, b.num_layers)?,
        })
    }

    /// The blocks that read the bank.
    pub fn reader_blocks(&self) -> impl Iterator<Item = &TemporalBasicTransformerBlock> {
        reader_blocks(&self.attentions)
    }

    /// `xs`: `[B·F, C, H, W]`.
    pub fn forward(&self, xs: &Tensor, cond: &Conditioning<'_>) -> Result<Tensor> {
        let _span = tracing::trace_span!("mid_block_3d").entered();
        let mut h = self.resnets[0].forward(xs, cond.temb, cond.frames)?;
        for (i, (attn, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            h = attn.forward(&h, cond.audio, cond.bank, cond.uncond_rows)?;
            h = motion(&self.motion_modules, i, h, cond.frames)?;
            h = resnet.forward(&h, cond.temb, cond.frames)?;
        }
        Ok(h)
    }
}

/// An up block: `cat skip → resnet → transformer → motion module` per layer,
/// then an upsampler. With transformers it is the reference's
/// `CrossAttnUpBlock3D`, without them its `UpBlock3D`.
#[derive(Debug, Clone)]
pub struct UpBlock3D {
    resnets: Vec<ResnetBlock3D>,
    attentions: Vec<Transformer3DModel>,
    motion_modules: Vec<VanillaTemporalModule>,
    upsamplers: Option<Upsample2D>,
}

impl UpBlock3D {
    /// Loads the block at `vb`; `cross_attention` selects `CrossAttnUpBlock3D`.
    pub fn new(vb: VarBuilder<'_>, cfg: &Block3DConfig, cross_attention: bool) -> Result<Self> {
        let b = &cfg.block;
        let resnets = (0..b.num_layers)
            .map(|i| resnet(&vb, i, cfg, &b.up_resnet(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions: attentions(&vb, b, cross_attention)?,
            motion_modules: motion_modules(&vb, cfg, b.out_channels, b.num_layers)?,
            upsamplers: upsampler(&vb, b)?,
        })
    }

    /// Number of resnets (= skips consumed).
    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// The blocks that read the bank (none without transformers).
    pub fn reader_blocks(&self) -> impl Iterator<Item = &TemporalBasicTransformerBlock> {
        reader_blocks(&self.attentions)
    }

    /// Pops one skip per resnet from `skips`; `upsample_size` as in [`Upsample2D::forward`].
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        cond: &Conditioning<'_>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("up_block_3d").entered();
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let input = cat_skip(&h, skips)?;
            let (attn, motion) = (self.attentions.get(i), self.motion_modules.get(i));
            h = layer(resnet, attn, motion, &input, cond)?;
        }
        match &self.upsamplers {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
