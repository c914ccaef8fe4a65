//! Spatial transformer wrappers (`attentions.N` of the UNet blocks), and the
//! parts they share with [`super::transformer_3d`].
//!
//! Mirrors EchoMimic's `src/models/transformer_2d.py` (`Transformer2DModel`,
//! reference UNet), BadToBest/EchoMimic @ 76cdab1:
//! `GroupNorm(groups, eps 1e-6) → proj_in → transformer block → proj_out →
//! + input`. `proj_in`/`proj_out` are 1×1 convs, or linears when the config
//! says `use_linear_projection`.
//!
//! Keys: `norm.*`, `proj_in.*`, `transformer_blocks.0.*`, `proj_out.*`.
//! Layout: `[N, C, H, W]` in and out (`N = B·F` in 3D); tokens are
//! row-major `(y, x)`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::kernels::{self, GroupNorm};

use super::attention::{Bank, BasicTransformerBlock};

/// GroupNorm eps of the spatial transformers (hard-coded in the reference).
pub const TRANSFORMER_NORM_EPS: f64 = 1e-6;

/// Sizes of a spatial transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Channels in and out (also the inner width).
    pub channels: usize,
    /// Attention heads (legacy `attention_head_dim`).
    pub heads: usize,
    /// GroupNorm groups (`norm_num_groups`).
    pub groups: usize,
    /// Linear (true) or 1×1 conv (false) projections.
    pub use_linear_projection: bool,
    /// Width of the audio tokens (3D only).
    pub cross_attention_dim: usize,
}

/// `proj_in` / `proj_out`: a 1×1 conv on the image or a linear on the tokens.
#[derive(Debug, Clone)]
pub(super) enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    pub(super) fn new(vb: VarBuilder<'_>, channels: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(candle_nn::linear(channels, channels, vb)?)
        } else {
            Self::Conv(candle_nn::conv2d(
                channels,
                channels,
                1,
                Conv2dConfig::default(),
                vb,
            )?)
        })
    }
}

pub(super) fn group_norm(vb: &VarBuilder<'_>, cfg: &TransformerConfig) -> Result<GroupNorm> {
    kernels::group_norm(
        cfg.groups,
        cfg.channels,
        TRANSFORMER_NORM_EPS,
        vb.pp("norm"),
    )
}

/// `[N, C, H, W]` → normalised, projected tokens `[N, H·W, C]`.
pub(super) fn tokens_in(norm: &GroupNorm, proj_in: &Projection, xs: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = xs.dims4()?;
    let xs = norm.forward(xs)?;
    let to_tokens = |t: &Tensor| t.permute((0, 2, 3, 1))?.reshape((n, h * w, c));
    match proj_in {
        Projection::Conv(conv) => to_tokens(&kernels::conv2d(conv, &xs)?),
        Projection::Linear(lin) => lin.forward(&to_tokens(&xs)?),
    }
}

/// Tokens `[N, H·W, C]` → projected image `[N, C, H, W]` plus `residual`.
pub(super) fn tokens_out(
    proj_out: &Projection,
    tokens: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    let (n, c, h, w) = residual.dims4()?;
    let to_image = |t: &Tensor| t.reshape((n, h, w, c))?.permute((0, 3, 1, 2))?.contiguous();
    let out = match proj_out {
        Projection::Conv(conv) => kernels::conv2d(conv, &to_image(tokens)?)?,
        Projection::Linear(lin) => to_image(&lin.forward(tokens)?)?,
    };
    out + residual
}

/// Reference-UNet spatial transformer (write mode).
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Loads the transformer at `vb` (one transformer block).
    pub fn new(vb: VarBuilder<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm: group_norm(&vb, cfg)?,
            proj_in: Projection::new(vb.pp("proj_in"), cfg.channels, linear)?,
            transformer_blocks: vec![BasicTransformerBlock::new(
                vb.pp("transformer_blocks").pp(0),
                cfg.channels,
                cfg.heads,
            )?],
            proj_out: Projection::new(vb.pp("proj_out"), cfg.channels, linear)?,
        })
    }

    /// `xs`: `[N, C, H, W]`; every block records its `norm1` output in `bank`.
    pub fn forward(&self, xs: &Tensor, bank: &mut Bank) -> Result<Tensor> {
        let _span = tracing::trace_span!("transformer_2d").entered();
        let mut h = tokens_in(&self.norm, &self.proj_in, xs)?;
        for block in &self.transformer_blocks {
            h = block.forward(&h, bank)?;
        }
        tokens_out(&self.proj_out, &h, xs)
    }
}
