//! Motion module: the AnimateDiff "Vanilla" temporal transformer inserted
//! after every resnet / spatial transformer of the denoising UNet.
//!
//! Mirrors EchoMimic's `src/models/motion_module.py`
//! (`VanillaTemporalModule`, `TemporalTransformer3DModel`,
//! `TemporalTransformerBlock`, `VersatileAttention`, `PositionalEncoding`;
//! BadToBest/EchoMimic @ 76cdab1):
//!
//! `GroupNorm(32, eps 1e-6)` per frame → tokens → `proj_in` (Linear) → for
//! each block: for each attention `i`, `h += attn_i(norms[i](h) + pe)` where
//! the attention runs over the frames of each spatial position; then
//! `h += ff(ff_norm(h))` → `proj_out` (Linear) → + input.
//!
//! Keys (relative to `…motion_modules.N`): `temporal_transformer.norm.*`,
//! `.proj_in.*`, `.transformer_blocks.k.attention_blocks.i.{to_q,to_k,to_v,
//! to_out.0}.*`, `.transformer_blocks.k.norms.i.*`, `.transformer_blocks.k.ff.*`,
//! `.transformer_blocks.k.ff_norm.*`, `.proj_out.*`. The `pos_encoder.pe`
//! buffers in the checkpoint are not read: the table is recomputed (it is a
//! fixed function of the width and `temporal_position_encoding_max_len`).
//!
//! Layout: `[B·F, C, H, W]` in and out, batch-major rows `b·F + f`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::attention::{Attention, FeedForward, LayerNorm, LAYER_NORM_EPS};
use crate::config::MotionModuleKwargs;
use crate::kernels::{self, GroupNorm};

/// GroupNorm groups of the motion module: the Python default argument
/// `norm_num_groups=32`, never overridden (independent of the UNet config).
pub const MOTION_NORM_GROUPS: usize = 32;

/// GroupNorm eps of the motion module (hard-coded).
pub const MOTION_NORM_EPS: f64 = 1e-6;

/// The only attention block type of the released configs.
const TEMPORAL_SELF: &str = "Temporal_Self";

/// Rejects motion-module arguments this implementation does not support, or
/// that the reference code cannot build, for a module of `channels` width.
pub fn validate(kwargs: &MotionModuleKwargs, channels: usize) -> Result<()> {
    if let Some(t) = kwargs
        .attention_block_types
        .iter()
        .find(|t| t.as_str() != TEMPORAL_SELF)
    {
        candle_core::bail!(
            "motion module attention block type `{t}` is not supported (only {TEMPORAL_SELF})"
        );
    }
    if kwargs.num_attention_heads == 0 || kwargs.temporal_attention_dim_div == 0 {
        candle_core::bail!("motion module heads and temporal_attention_dim_div must be positive");
    }
    let head_dim = channels / kwargs.num_attention_heads / kwargs.temporal_attention_dim_div;
    if head_dim == 0 {
        candle_core::bail!(
            "motion module of width {channels} cannot have {} heads",
            kwargs.num_attention_heads
        );
    }
    if !channels.is_multiple_of(MOTION_NORM_GROUPS) {
        candle_core::bail!(
            "motion module width {channels} is not divisible by its {MOTION_NORM_GROUPS} GroupNorm groups"
        );
    }
    if kwargs.temporal_position_encoding
        && !(head_dim * kwargs.num_attention_heads).is_multiple_of(2)
    {
        candle_core::bail!("the temporal position encoding needs an even width");
    }
    Ok(())
}

/// Sinusoidal position table `pe[p, 2k] = sin(p·ω_k)`, `pe[p, 2k+1] =
/// cos(p·ω_k)`, `ω_k = exp(2k · (−ln 10000 / d))`, computed in f32 in the
/// reference's order of operations.
#[derive(Debug, Clone)]
pub struct PositionalEncoding {
    pe: Tensor,
}

impl PositionalEncoding {
    /// The `[max_len, d_model]` table as f32 values (row-major).
    pub fn table(d_model: usize, max_len: usize) -> Vec<f32> {
        let c = (-(10_000f64.ln()) / d_model as f64) as f32;
        let mut pe = vec![0f32; max_len * d_model];
        for p in 0..max_len {
            for k in 0..d_model / 2 {
                let arg = p as f32 * ((2 * k) as f32 * c).exp();
                pe[p * d_model + 2 * k] = arg.sin();
                pe[p * d_model + 2 * k + 1] = arg.cos();
            }
        }
        pe
    }

    /// The table `[max_len, d_model]` in `dtype` on `device`.
    pub fn new(d_model: usize, max_len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let pe = Tensor::from_vec(Self::table(d_model, max_len), (max_len, d_model), device)?;
        Ok(Self {
            pe: pe.to_dtype(dtype)?,
        })
    }

    /// `xs`: `[B·F, L, d]` (frame-major) → `xs + pe[f]` on every row of frame `f`.
    pub fn forward_frames(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let (bf, l, d) = xs.dims3()?;
        let pe = self.rows(frames)?.reshape((1, frames, 1, d))?;
        xs.reshape((bf / frames, frames, l, d))?
            .broadcast_add(&pe)?
            .reshape((bf, l, d))
    }

    /// `pe[:frames]`, or an error when the table is shorter.
    fn rows(&self, frames: usize) -> Result<Tensor> {
        let max_len = self.pe.dim(0)?;
        if frames > max_len {
            candle_core::bail!(
                "{frames} frames exceed the motion module's position table of {max_len} \
                 (temporal_position_encoding_max_len)"
            );
        }
        self.pe.narrow(0, 0, frames)
    }
}

/// Self-attention over the frames of every spatial position (`Temporal`
/// mode), with the position encoding added to its input.
#[derive(Debug, Clone)]
pub struct VersatileAttention {
    // `to_q`, `to_k`, `to_v`, `to_out.0` live directly under this module's path.
    attention: Attention,
    pos_encoder: Option<PositionalEncoding>,
}

impl VersatileAttention {
    /// Loads the attention at `vb`; `pe_max_len` = `Some(max_len)` adds the
    /// position encoding.
    pub fn new(
        vb: VarBuilder<'_>,
        dim: usize,
        heads: usize,
        pe_max_len: Option<usize>,
    ) -> Result<Self> {
        let pos_encoder = pe_max_len
            .map(|len| PositionalEncoding::new(dim, len, vb.dtype(), vb.device()))
            .transpose()?;
        Ok(Self {
            attention: Attention::new(vb, dim, None, heads, dim / heads)?,
            pos_encoder,
        })
    }

    /// `xs`: `[B·F, L, d]` → `[B·F, L, d]`, attending over the F frames.
    pub fn forward(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let _span = tracing::trace_span!("motion_attention").entered();
        let bf = xs.dim(0)?;
        if frames == 0 || bf % frames != 0 {
            candle_core::bail!("{bf} rows are not a whole number of {frames}-frame videos");
        }
        // 1. + pe[f] on every row of frame f
        let xs = match &self.pos_encoder {
            Some(pe) => pe.forward_frames(xs, frames)?,
            None => xs.clone(),
        };
        // 2. self-attention over the frames of every position, in the (b·f, l, d) layout
        self.attention.forward_over_frames(&xs, frames)
    }
}

/// Temporal attentions (each pre-normed, residual) then a GEGLU feed-forward.
#[derive(Debug, Clone)]
pub struct TemporalTransformerBlock {
    attention_blocks: Vec<VersatileAttention>,
    norms: Vec<LayerNorm>,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

impl TemporalTransformerBlock {
    /// Loads the block at `vb` (`dim` wide).
    pub fn new(vb: VarBuilder<'_>, dim: usize, kwargs: &MotionModuleKwargs) -> Result<Self> {
        let heads = kwargs.num_attention_heads;
        let pe = kwargs
            .temporal_position_encoding
            .then_some(kwargs.temporal_position_encoding_max_len);
        let n = kwargs.attention_block_types.len();
        let attention_blocks = (0..n)
            .map(|i| VersatileAttention::new(vb.pp("attention_blocks").pp(i), dim, heads, pe))
            .collect::<Result<_>>()?;
        let norms = (0..n)
            .map(|i| LayerNorm::new(vb.pp("norms").pp(i), dim, LAYER_NORM_EPS))
            .collect::<Result<_>>()?;
        Ok(Self {
            attention_blocks,
            norms,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            ff_norm: LayerNorm::new(vb.pp("ff_norm"), dim, LAYER_NORM_EPS)?,
        })
    }

    /// `xs`: `[B·F, L, d]`.
    pub fn forward(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let mut h = xs.clone();
        // 1. h += attn_i(norm_i(h)) (the residual has no position encoding)
        for (attn, norm) in self.attention_blocks.iter().zip(&self.norms) {
            h = (&h + attn.forward(&norm.forward(&h)?, frames)?)?;
        }
        // 2. h += ff(ff_norm(h))
        &h + self.ff.forward(&self.ff_norm.forward(&h)?)?
    }
}

/// `GroupNorm → proj_in → temporal blocks → proj_out → + input`.
#[derive(Debug, Clone)]
pub struct TemporalTransformer3DModel {
    norm: GroupNorm,
    proj_in: Linear,
    transformer_blocks: Vec<TemporalTransformerBlock>,
    proj_out: Linear,
}

impl TemporalTransformer3DModel {
    /// Loads the transformer at `vb` for `channels`-wide features.
    pub fn new(vb: VarBuilder<'_>, channels: usize, kwargs: &MotionModuleKwargs) -> Result<Self> {
        validate(kwargs, channels)?;
        let heads = kwargs.num_attention_heads;
        let inner = heads * (channels / heads / kwargs.temporal_attention_dim_div);
        let transformer_blocks = (0..kwargs.num_transformer_block)
            .map(|i| {
                TemporalTransformerBlock::new(vb.pp("transformer_blocks").pp(i), inner, kwargs)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: kernels::group_norm(
                MOTION_NORM_GROUPS,
                channels,
                MOTION_NORM_EPS,
                vb.pp("norm"),
            )?,
            proj_in: candle_nn::linear(channels, inner, vb.pp("proj_in"))?,
            transformer_blocks,
            proj_out: candle_nn::linear(inner, channels, vb.pp("proj_out"))?,
        })
    }

    /// `xs`: `[B·F, C, H, W]` → `[B·F, C, H, W]`.
    pub fn forward(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let _span = tracing::trace_span!("motion_module").entered();
        let (bf, c, h, w) = xs.dims4()?;
        // 1. GroupNorm per frame, to tokens, proj_in
        let tokens = self
            .norm
            .forward(xs)?
            .permute((0, 2, 3, 1))?
            .reshape((bf, h * w, c))?;
        let mut hs = self.proj_in.forward(&tokens)?;
        // 2. temporal transformer blocks
        for block in &self.transformer_blocks {
            hs = block.forward(&hs, frames)?;
        }
        // 3. proj_out, back to images, residual
        let out = self
            .proj_out
            .forward(&hs)?
            .reshape((bf, h, w, c))?
            .permute((0, 3, 1, 2))?;
        out + xs
    }
}

/// The module inserted in the UNet blocks (`motion_modules.N`).
#[derive(Debug, Clone)]
pub struct VanillaTemporalModule {
    temporal_transformer: TemporalTransformer3DModel,
}

impl VanillaTemporalModule {
    /// Loads the module at `vb` for `channels`-wide features.
    pub fn new(vb: VarBuilder<'_>, channels: usize, kwargs: &MotionModuleKwargs) -> Result<Self> {
        Ok(Self {
            temporal_transformer: TemporalTransformer3DModel::new(
                vb.pp("temporal_transformer"),
                channels,
                kwargs,
            )?,
        })
    }

    /// `xs`: `[B·F, C, H, W]` with batch-major rows; `frames` = F.
    pub fn forward(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        self.temporal_transformer.forward(xs, frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_table_is_interleaved_sin_cos() {
        let t = PositionalEncoding::table(4, 3);
        // p = 0: sin 0, cos 0, ...
        assert_eq!(&t[..4], &[0.0, 1.0, 0.0, 1.0]);
        // p = 2, k = 1: ω = 10000^(-2/4) = 0.01
        assert!((t[2 * 4 + 2] - 0.02f32.sin()).abs() < 1e-7);
        assert!((t[2 * 4 + 3] - 0.02f32.cos()).abs() < 1e-7);
        assert!((t[2 * 4] - 2f32.sin()).abs() < 1e-7);
    }

    #[test]
    fn unsupported_block_types_are_rejected() {
        let kwargs = MotionModuleKwargs {
            attention_block_types: vec!["Temporal_Self".into(), "Temporal_Cross".into()],
            ..Default::default()
        };
        let err = validate(&kwargs, 64).unwrap_err().to_string();
        assert!(err.contains("Temporal_Cross"), "{err}");
        let err = validate(&MotionModuleKwargs::default(), 48)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32"), "{err}");
    }
}
