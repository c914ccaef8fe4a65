//! The reference UNet: a 2D SD-1.x UNet whose transformer blocks record
//! their `norm1` outputs (the reference "bank") for the denoising UNet.
//!
//! Mirrors EchoMimic's `src/models/unet_2d_condition.py`
//! (`UNet2DConditionModel`, BadToBest/EchoMimic @ 76cdab1) in write mode of
//! `ReferenceAttentionControl`: transformer blocks have no `attn2`/`norm2`,
//! and `conv_norm_out`/`conv_out` are removed, so the output is that of the
//! last up block (unused by the pipeline).
//!
//! Checkpoint: `reference_unet.pth`, loaded strictly (see
//! [`UNet2DConditionModel::load`]). Config:
//! `sd-image-variations-diffusers/unet/config.json`.
//! Layout: latents `[N, in_channels, h, w]`; the pipeline runs it once on the
//! reference latent (`N = 1`) at timestep 0.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::attention::Bank;
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::unet_2d_blocks::{BlockConfig, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D};
use crate::config::{DownBlockType, UNet2DConditionConfig, UpBlockType};

/// Width of the time embedding: `4 × block_out_channels[0]`.
pub(crate) fn time_embed_dim(cfg: &UNet2DConditionConfig) -> usize {
    4 * cfg.block_out_channels[0]
}

/// Sizes of down block `i` (diffusers `UNet2DConditionModel.__init__`).
pub(crate) fn down_block_config(
    cfg: &UNet2DConditionConfig,
    i: usize,
    cross_attention_dim: usize,
) -> BlockConfig {
    let boc = &cfg.block_out_channels;
    BlockConfig {
        num_layers: cfg.layers_per_block,
        in_channels: if i == 0 { boc[0] } else { boc[i - 1] },
        out_channels: boc[i],
        prev_output_channel: 0,
        temb_channels: time_embed_dim(cfg),
        resnet_groups: cfg.norm_num_groups,
        resnet_eps: cfg.norm_eps,
        heads: cfg.heads(i),
        use_linear_projection: cfg.use_linear_projection,
        add_sampler: i + 1 != boc.len(),
        downsample_padding: cfg.downsample_padding,
        output_scale_factor: 1.0,
        cross_attention_dim,
    }
}

/// Sizes of the mid block (one transformer, width `block_out_channels[-1]`).
pub(crate) fn mid_block_config(
    cfg: &UNet2DConditionConfig,
    cross_attention_dim: usize,
) -> BlockConfig {
    let n = cfg.block_out_channels.len();
    let c = cfg.block_out_channels[n - 1];
    BlockConfig {
        num_layers: 1,
        in_channels: c,
        out_channels: c,
        prev_output_channel: 0,
        temb_channels: time_embed_dim(cfg),
        resnet_groups: cfg.norm_num_groups,
        resnet_eps: cfg.norm_eps,
        heads: cfg.heads(n - 1),
        use_linear_projection: cfg.use_linear_projection,
        add_sampler: false,
        downsample_padding: cfg.downsample_padding,
        output_scale_factor: cfg.mid_block_scale_factor,
        cross_attention_dim,
    }
}

/// Sizes of up block `i` (channels and heads reversed, one more layer).
pub(crate) fn up_block_config(
    cfg: &UNet2DConditionConfig,
    i: usize,
    cross_attention_dim: usize,
) -> BlockConfig {
    let n = cfg.block_out_channels.len();
    let rev = |j: usize| cfg.block_out_channels[n - 1 - j];
    BlockConfig {
        num_layers: cfg.layers_per_block + 1,
        in_channels: rev((i + 1).min(n - 1)),
        out_channels: rev(i),
        prev_output_channel: if i == 0 { rev(0) } else { rev(i - 1) },
        temb_channels: time_embed_dim(cfg),
        resnet_groups: cfg.norm_num_groups,
        resnet_eps: cfg.norm_eps,
        heads: cfg.heads(n - 1 - i),
        use_linear_projection: cfg.use_linear_projection,
        add_sampler: i + 1 != n,
        downsample_padding: cfg.downsample_padding,
        output_scale_factor: 1.0,
        cross_attention_dim,
    }
}

/// The `upsample_size` of every up block when the latent size is not a
/// multiple of the total down factor (diffusers `forward_upsample_size`):
/// the spatial size of the next skip, else `None` (plain 2×).
pub(crate) fn upsample_size(
    forward_upsample_size: bool,
    is_final: bool,
    skips: &[Tensor],
) -> Result<Option<(usize, usize)>> {
    if !forward_upsample_size || is_final {
        return Ok(None);
    }
    match skips.last() {
        Some(s) => {
            let (_, _, h, w) = s.dims4()?;
            Ok(Some((h, w)))
        }
        None => candle_core::bail!("the skip stack is empty"),
    }
}

/// Validates the base config (plus the 2D-only constraints).
pub(crate) fn validate(cfg: &UNet2DConditionConfig) -> Result<()> {
    cfg.validate().map_err(candle_core::Error::msg)?;
    if cfg.block_out_channels.len() < 2 {
        candle_core::bail!("at least two UNet blocks are required");
    }
    Ok(())
}

/// The reference UNet (write mode).
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock2D>,
    mid_block: UNetMidBlock2DCrossAttn,
    up_blocks: Vec<UpBlock2D>,
    center_input_sample: bool,
}

impl UNet2DConditionModel {
    /// Builds the network from `vb` (the `reference_unet.pth` tensors).
    pub fn new(vb: VarBuilder<'_>, cfg: &UNet2DConditionConfig) -> Result<Self> {
        validate(cfg)?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = candle_nn::conv2d(cfg.in_channels, boc[0], 3, conv_cfg, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], time_embed_dim(cfg))?;
        // The reference blocks have no cross-attention, so the context width is unused.
        let ctx = cfg.cross_attention_dim;
        let mut down_blocks = Vec::with_capacity(n);
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let bcfg = down_block_config(cfg, i, ctx);
            let vb = vb.pp("down_blocks").pp(i);
            let cross_attention = matches!(ty, DownBlockType::CrossAttnDownBlock);
            down_blocks.push(DownBlock2D::new(vb, &bcfg, cross_attention)?);
        }
        let mid_block =
            UNetMidBlock2DCrossAttn::new(vb.pp("mid_block"), &mid_block_config(cfg, ctx))?;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let bcfg = up_block_config(cfg, i, ctx);
            let vb = vb.pp("up_blocks").pp(i);
            let cross_attention = matches!(ty, UpBlockType::CrossAttnUpBlock);
            up_blocks.push(UpBlock2D::new(vb, &bcfg, cross_attention)?);
        }
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            center_input_sample: cfg.center_input_sample,
        })
    }

    /// `sample`: latents `[N, C_in, h, w]`; `timestep`: one value for every
    /// row (0 in the pipeline).
    ///
    /// Returns the output of the last up block `[N, block_out_channels[0],
    /// h, w]` and the bank: the `norm1` output `[N, h_l·w_l, C_l]` of every
    /// transformer block, keyed by block path.
    pub fn forward(&self, sample: &Tensor, timestep: f64) -> Result<(Tensor, Bank)> {
        let (_, _, h, w) = sample.dims4()?;
        let down_factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = h % down_factor != 0 || w % down_factor != 0;
        let mut bank = Bank::new();

        // 0. center input
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        // 1. time
        let t_emb = self
            .time_proj
            .forward(timestep, sample.dtype(), sample.device())?;
        let emb = self.time_embedding.forward(&t_emb)?;
        // 2. pre-process
        let mut h = crate::kernels::conv2d(&self.conv_in, &sample)?;
        let mut skips = vec![h.clone()];
        // 3. down
        for block in &self.down_blocks {
            let (out, res) = block.forward(&h, &emb, &mut bank)?;
            h = out;
            skips.extend(res);
        }
        // 4. mid
        h = self.mid_block.forward(&h, &emb, &mut bank)?;
        // 5. up
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let keep = skips.len().saturating_sub(block.num_layers());
            let mut res = skips.split_off(keep);
            let size = upsample_size(forward_upsample_size, i + 1 == n_up, &skips)?;
            h = block.forward(&h, &mut res, &emb, size, &mut bank)?;
        }
        // 6. no post-process: conv_norm_out / conv_out were removed
        Ok((h, bank))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PerBlock;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn linear_projection_and_odd_sizes_write_every_bank_entry() -> Result<()> {
        let cfg = UNet2DConditionConfig {
            block_out_channels: vec![16, 32, 32],
            down_block_types: vec![
                DownBlockType::CrossAttnDownBlock,
                DownBlockType::CrossAttnDownBlock,
                DownBlockType::DownBlock,
            ],
            up_block_types: vec![
                UpBlockType::UpBlock,
                UpBlockType::CrossAttnUpBlock,
                UpBlockType::CrossAttnUpBlock,
            ],
            layers_per_block: 1,
            attention_head_dim: PerBlock::List(vec![2, 4, 4]),
            norm_num_groups: 8,
            use_linear_projection: true,
            ..Default::default()
        };
        let vm = VarMap::new();
        let unet = UNet2DConditionModel::new(
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            &cfg,
        )?;
        let x = Tensor::randn(0f32, 1., (1, 4, 7, 5), &Device::Cpu)?;
        let (out, bank) = unet.forward(&x, 0.0)?;
        assert_eq!(out.dims(), &[1, 16, 7, 5]);
        // 2 down + 1 mid + 2·2 up transformer blocks.
        assert_eq!(bank.len(), 7);
        let b = bank
            .get("up_blocks.2.attentions.1.transformer_blocks.0")
            .expect("entry");
        assert_eq!(b.dims(), &[1, 35, 16]);
        let b = bank
            .get("mid_block.attentions.0.transformer_blocks.0")
            .expect("entry");
        // 7×5 → 4×3 → 2×2 at the mid block.
        assert_eq!(b.dims(), &[1, 4, 32]);
        Ok(())
    }
}
