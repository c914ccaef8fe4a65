//! The denoising UNet's spatial transformer (`attentions.N` of its blocks),
//! applied per frame.
//!
//! Mirrors EchoMimic's `src/models/transformer_3d.py` (`Transformer3DModel`),
//! BadToBest/EchoMimic @ 76cdab1: the same wrapper as
//! [`super::transformer_2d::Transformer2DModel`] (and its helpers), around a
//! reader block that also attends to the reference bank and the audio.
//!
//! Keys: `norm.*`, `proj_in.*`, `transformer_blocks.0.*`, `proj_out.*`.
//! Layout: `[B·F, C, H, W]` in and out.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::GroupNorm;

use super::attention::{PreparedBank, TemporalBasicTransformerBlock};
use super::transformer_2d::{group_norm, tokens_in, tokens_out, Projection, TransformerConfig};

/// Denoising-UNet spatial transformer (read mode), per frame.
#[derive(Debug, Clone)]
pub struct Transformer3DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<TemporalBasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer3DModel {
    /// Loads the transformer at `vb` (one transformer block).
    pub fn new(vb: VarBuilder<'_>, cfg: &TransformerConfig) -> Result<Self> {
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm: group_norm(&vb, cfg)?,
            proj_in: Projection::new(vb.pp("proj_in"), cfg.channels, linear)?,
            transformer_blocks: vec![TemporalBasicTransformerBlock::new(
                vb.pp("transformer_blocks").pp(0),
                cfg.channels,
                cfg.heads,
                cfg.cross_attention_dim,
            )?],
            proj_out: Projection::new(vb.pp("proj_out"), cfg.channels, linear)?,
        })
    }

    /// The reader blocks (for bank preparation).
    pub fn transformer_blocks(&self) -> &[TemporalBasicTransformerBlock] {
        &self.transformer_blocks
    }

    /// `xs`: `[B·F, C, H, W]`; `audio`: `[B·F, N, D]`; the first `uncond_rows`
    /// rows attend without the bank.
    pub fn forward(
        &self,
        xs: &Tensor,
        audio: &Tensor,
        bank: &PreparedBank,
        uncond_rows: usize,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("transformer_3d").entered();
        let mut h = tokens_in(&self.norm, &self.proj_in, xs)?;
        for block in &self.transformer_blocks {
            h = block.forward(&h, audio, bank, uncond_rows)?;
        }
        tokens_out(&self.proj_out, &h, xs)
    }
}
