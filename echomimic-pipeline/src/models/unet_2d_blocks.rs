//! Down, mid and up blocks of the reference UNet.
//!
//! Mirrors EchoMimic's `src/models/unet_2d_blocks.py` (diffusers 0.24 blocks
//! with EchoMimic's `Transformer2DModel`; BadToBest/EchoMimic @ 76cdab1).
//! `CrossAttnDownBlock2D`/`DownBlock2D` are one [`DownBlock2D`] with or
//! without transformers, likewise `CrossAttnUpBlock2D`/`UpBlock2D` as
//! [`UpBlock2D`]; `UNetMidBlock2DCrossAttn` stands alone.
//!
//! Keys (relative to `down_blocks.i` / `mid_block` / `up_blocks.i`):
//! `resnets.j.*`, `attentions.j.*`, `downsamplers.0.conv.*`,
//! `upsamplers.0.conv.*`. Layout: `[N, C, H, W]`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::attention::Bank;
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, Upsample2D};
use super::transformer_2d::{Transformer2DModel, TransformerConfig};

/// Sizes of one UNet block (2D or 3D), as diffusers' `get_down_block` /
/// `get_up_block` receive them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockConfig {
    /// Resnets in the block (`layers_per_block`, one more in up blocks).
    pub num_layers: usize,
    /// Input channels (down: of the first resnet; up: the skip width of the last resnet).
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Up blocks: channels of the previous up block's output.
    pub prev_output_channel: usize,
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// GroupNorm groups of resnets and transformers.
    pub resnet_groups: usize,
    /// GroupNorm eps of resnets.
    pub resnet_eps: f64,
    /// Attention heads of the transformers.
    pub heads: usize,
    /// Linear `proj_in`/`proj_out` in the transformers.
    pub use_linear_projection: bool,
    /// Whether a downsampler (down blocks) or upsampler (up blocks) follows.
    pub add_sampler: bool,
    /// Padding of the downsampler conv.
    pub downsample_padding: usize,
    /// Resnet output scale (`mid_block_scale_factor` in the mid block).
    pub output_scale_factor: f64,
    /// Width of the cross-attention context (audio tokens, 3D only).
    pub cross_attention_dim: usize,
}

impl BlockConfig {
    pub(crate) fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.resnet_groups,
            eps: self.resnet_eps,
            output_scale_factor: self.output_scale_factor,
        }
    }

    pub(crate) fn transformer(&self, channels: usize) -> TransformerConfig {
        TransformerConfig {
            channels,
            heads: self.heads,
            groups: self.resnet_groups,
            use_linear_projection: self.use_linear_projection,
            cross_attention_dim: self.cross_attention_dim,
        }
    }

    /// Resnet `i` of a down block: `(in, out)`.
    pub(crate) fn down_resnet(&self, i: usize) -> ResnetBlock2DConfig {
        let c_in = if i == 0 {
            self.in_channels
        } else {
            self.out_channels
        };
        self.resnet(c_in, self.out_channels)
    }

    /// Resnet `i` of an up block: its input is `[h, skip]` on channels.
    pub(crate) fn up_resnet(&self, i: usize) -> ResnetBlock2DConfig {
        let skip = if i + 1 == self.num_layers {
            self.in_channels
        } else {
            self.out_channels
        };
        let h = if i == 0 {
            self.prev_output_channel
        } else {
            self.out_channels
        };
        self.resnet(h + skip, self.out_channels)
    }
}

fn attentions(
    vb: &VarBuilder<'_>,
    cfg: &BlockConfig,
    cross_attention: bool,
) -> Result<Vec<Transformer2DModel>> {
    if !cross_attention {
        return Ok(Vec::new());
    }
    (0..cfg.num_layers)
        .map(|i| {
            Transformer2DModel::new(
                vb.pp("attentions").pp(i),
                &cfg.transformer(cfg.out_channels),
            )
        })
        .collect()
}

/// One layer: `resnet → transformer (if any)`.
fn layer(
    resnet: &ResnetBlock2D,
    attention: Option<&Transformer2DModel>,
    xs: &Tensor,
    temb: &Tensor,
    bank: &mut Bank,
) -> Result<Tensor> {
    let h = resnet.forward(xs, Some(temb))?;
    match attention {
        Some(attn) => attn.forward(&h, bank),
        None => Ok(h),
    }
}

/// A down block: resnets, each followed by a spatial transformer in
/// `CrossAttnDownBlock2D` (none in `DownBlock2D`), then an optional
/// downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsamplers: Option<Downsample2D>,
}

impl DownBlock2D {
    /// Loads the block at `vb`; `cross_attention` selects `CrossAttnDownBlock2D`.
    pub fn new(vb: VarBuilder<'_>, cfg: &BlockConfig, cross_attention: bool) -> Result<Self> {
        let resnets = (0..cfg.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg.down_resnet(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions: attentions(&vb, cfg, cross_attention)?,
            downsamplers: downsampler(&vb, cfg)?,
        })
    }

    /// Returns the output and the skips it adds (one per layer, plus the
    /// downsampled output); the transformers write their entries to `bank`.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        bank: &mut Bank,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let _span = tracing::trace_span!("down_block_2d").entered();
        let mut h = xs.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = layer(resnet, self.attentions.get(i), &h, temb, bank)?;
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsamplers {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `downsamplers.0` when the block has one.
pub(crate) fn downsampler(vb: &VarBuilder<'_>, cfg: &BlockConfig) -> Result<Option<Downsample2D>> {
    cfg.add_sampler
        .then(|| {
            Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                cfg.out_channels,
                cfg.downsample_padding,
            )
        })
        .transpose()
}

/// `upsamplers.0` when the block has one.
pub(crate) fn upsampler(vb: &VarBuilder<'_>, cfg: &BlockConfig) -> Result<Option<Upsample2D>> {
    cfg.add_sampler
        .then(|| Upsample2D::new(vb.pp("upsamplers").pp(0), cfg.out_channels))
        .transpose()
}

/// Pops the next skip (the last pushed) and concatenates `[h, skip]` on channels.
pub(crate) fn cat_skip(h: &Tensor, skips: &mut Vec<Tensor>) -> Result<Tensor> {
    let Some(skip) = skips.pop() else {
        candle_core::bail!("the skip stack is empty");
    };
    Tensor::cat(&[h, &skip], 1)
}

/// `resnets.0 → (attentions.i → resnets.i+1)*` at constant width.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// Loads the block at `vb` (`cfg.in_channels` wide, `cfg.num_layers` transformers).
    pub fn new(vb: VarBuilder<'_>, cfg: &BlockConfig) -> Result<Self> {
        let c = cfg.in_channels;
        let resnets = (0..=cfg.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg.resnet(c, c)))
            .collect::<Result<_>>()?;
        let attentions = (0..cfg.num_layers)
            .map(|i| Transformer2DModel::new(vb.pp("attentions").pp(i), &cfg.transformer(c)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// `xs`: `[N, C, H, W]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, bank: &mut Bank) -> Result<Tensor> {
        let _span = tracing::trace_span!("mid_block_2d").entered();
        let mut h = self.resnets[0].forward(xs, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, bank)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// An up block: resnets on `[h, skip]`, each followed by a spatial
/// transformer in `CrossAttnUpBlock2D` (none in `UpBlock2D`), then an
/// optional upsampler.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsamplers: Option<Upsample2D>,
}

impl UpBlock2D {
    /// Number of resnets (= skips consumed).
    pub fn num_layers(&self) -> usize {
        self.resnets.len()
    }

    /// Loads the block at `vb`; `cross_attention` selects `CrossAttnUpBlock2D`.
    pub fn new(vb: VarBuilder<'_>, cfg: &BlockConfig, cross_attention: bool) -> Result<Self> {
        let resnets = (0..cfg.num_layers)
            .map(|i| ResnetBlock2D::new(vb.pp("resnets").pp(i), &cfg.up_resnet(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            resnets,
            attentions: attentions(&vb, cfg, cross_attention)?,
            upsamplers: upsampler(&vb, cfg)?,
        })
    }

    /// Pops one skip per resnet from `skips`; `upsample_size` as in [`Upsample2D::forward`].
    pub fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        upsample_size: Option<(usize, usize)>,
        bank: &mut Bank,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("up_block_2d").entered();
        let mut h = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = layer(
                resnet,
                self.attentions.get(i),
                &cat_skip(&h, skips)?,
                temb,
                bank,
            )?;
        }
        match &self.upsamplers {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
