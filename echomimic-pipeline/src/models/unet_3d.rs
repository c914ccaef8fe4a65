//! The denoising UNet: an SD-1.x UNet inflated to video, with reference
//! attention reading the bank of the reference UNet, audio cross-attention
//! and motion modules.
//!
//! Mirrors EchoMimic's `src/models/unet_3d_echo.py`
//! (`EchoUNet3DConditionModel`, BadToBest/EchoMimic @ 76cdab1) in read mode of
//! `ReferenceAttentionControl` (`fusion_blocks="full"`).
//!
//! Checkpoints: `denoising_unet*.pth` + `motion_module*.pth` (see
//! [`UNet3DConditionModel::load`]). Config: the base
//! `sd-image-variations-diffusers/unet/config.json` plus the inference yaml's
//! `unet_additional_kwargs`.
//!
//! Layout: the API takes and returns `(batch, channels, frames, height,
//! width)`; inside, video tensors are `(batch·frames, C, H, W)` with row
//! `b·F + f`, so inflated convs and GroupNorms are plain 2D ones.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use super::attention::{Bank, BankRounding, PreparedBank, TemporalBasicTransformerBlock};
use super::embeddings::{TimestepEmbedding, Timesteps};
use super::resnet::group_norm_across_frames;
use super::unet_2d_blocks::BlockConfig;
use super::unet_2d_condition::{
    down_block_config, mid_block_config, time_embed_dim, up_block_config, upsample_size,
};
use super::unet_3d_blocks::{
    Block3DConfig, Conditioning, DownBlock3D, UNetMidBlock3DCrossAttn, UpBlock3D,
};
use crate::config::{DownBlockType, UNet2DConditionConfig, UnetAdditionalKwargs, UpBlockType};
use crate::kernels::{self, GroupNorm};

/// The only motion module type of the reference code.
const VANILLA: &str = "Vanilla";

/// Rejects configurations this implementation does not support, with the reason.
pub fn validate(cfg: &UNet2DConditionConfig, extra: &UnetAdditionalKwargs) -> Result<()> {
    super::unet_2d_condition::validate(cfg)?;
    if extra.unet_use_cross_frame_attention {
        candle_core::bail!("unet_use_cross_frame_attention is not supported");
    }
    if extra.unet_use_temporal_attention {
        candle_core::bail!("unet_use_temporal_attention (temporal attention inside the spatial blocks) is not supported");
    }
    if extra.use_motion_module && extra.motion_module_type != VANILLA {
        candle_core::bail!(
            "motion_module_type `{}` is not supported (only {VANILLA})",
            extra.motion_module_type
        );
    }
    Ok(())
}

/// The denoising UNet (Python `EchoUNet3DConditionModel`).
#[derive(Debug, Clone)]
pub struct UNet3DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock3D>,
    mid_block: UNetMidBlock3DCrossAttn,
    up_blocks: Vec<UpBlock3D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
    use_inflated_groupnorm: bool,
    cross_attention_dim: usize,
}

impl UNet3DConditionModel {
    /// Builds the network from `vb` (the combined checkpoint tensors).
    pub fn new(
        vb: VarBuilder<'_>,
        cfg: &UNet2DConditionConfig,
        extra: &UnetAdditionalKwargs,
    ) -> Result<Self> {
        validate(cfg, extra)?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let cross = extra.cross_attention_dim.unwrap_or(cfg.cross_attention_dim);
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = candle_nn::conv2d(cfg.in_channels, boc[0], 3, conv_cfg, vb.pp("conv_in"))?;
        let time_proj = Timesteps::new(boc[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), boc[0], time_embed_dim(cfg))?;
        let block3d = |block: BlockConfig, motion: bool| Block3DConfig {
            block,
            use_inflated_groupnorm: extra.use_inflated_groupnorm,
            motion: (extra.use_motion_module && motion).then(|| extra.motion_module_kwargs.clone()),
        };
        let has_motion = |res: usize| extra.motion_module_resolutions.contains(&res);

        let mut down_blocks = Vec::with_capacity(n);
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            // Down block i works at down factor 2^i.
            let motion = has_motion(1 << i) && !extra.motion_module_decoder_only;
            let bcfg = block3d(down_block_config(cfg, i, cross), motion);
            let vb = vb.pp("down_blocks").pp(i);
            let cross_attention = matches!(ty, DownBlockType::CrossAttnDownBlock);
            down_blocks.push(DownBlock3D::new(vb, &bcfg, cross_attention)?);
        }
        let mid_cfg = block3d(mid_block_config(cfg, cross), extra.motion_module_mid_block);
        let mid_block = UNetMidBlock3DCrossAttn::new(vb.pp("mid_block"), &mid_cfg)?;
        let mut up_blocks = Vec::with_capacity(n);
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            // The reference hard-codes `res = 2 ** (3 - i)` (four levels).
            let motion = i <= 3 && has_motion(1 << (3 - i));
            let bcfg = block3d(up_block_config(cfg, i, cross), motion);
            let vb = vb.pp("up_blocks").pp(i);
            let cross_attention = matches!(ty, UpBlockType::CrossAttnUpBlock);
            up_blocks.push(UpBlock3D::new(vb, &bcfg, cross_attention)?);
        }
        let conv_norm_out = kernels::group_norm(
            cfg.norm_num_groups,
            boc[0],
            cfg.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = candle_nn::conv2d(boc[0], cfg.out_channels, 3, conv_cfg, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            center_input_sample: cfg.center_input_sample,
            use_inflated_groupnorm: extra.use_inflated_groupnorm,
            cross_attention_dim: cross,
        })
    }

    /// Channels after `conv_in` (`block_out_channels[0]`): the width of the
    /// full-resolution stage.
    pub fn base_channels(&self) -> usize {
        self.conv_in.weight().dim(0).unwrap_or(1)
    }

    /// Width of the audio tokens the model expects.
    pub fn cross_attention_dim(&self) -> usize {
        self.cross_attention_dim
    }

    /// Every transformer block that reads the bank, in module order.
    pub fn reader_blocks(&self) -> Vec<&TemporalBasicTransformerBlock> {
        let down = self.down_blocks.iter().flat_map(DownBlock3D::reader_blocks);
        let up = self.up_blocks.iter().flat_map(UpBlock3D::reader_blocks);
        down.chain(self.mid_block.reader_blocks())
            .chain(up)
            .collect()
    }

    /// Precomputes `to_k`/`to_v` of the reference features for every reader
    /// block (once per reference image). Fails when `bank` lacks the entry of
    /// a reader block or holds an entry no reader block reads.
    pub fn prepare_bank(&self, bank: &Bank, rounding: BankRounding) -> Result<PreparedBank> {
        let readers = self.reader_blocks();
        if let Some((path, _)) = bank
            .iter()
            .find(|(p, _)| !readers.iter().any(|r| r.path() == *p))
        {
            candle_core::bail!("bank entry `{path}` has no reader block in the denoising UNet");
        }
        let mut prepared = PreparedBank::empty();
        for block in readers {
            let Some(features) = bank.get(block.path()) else {
                candle_core::bail!("the bank has no entry for reader block `{}`", block.path());
            };
            prepared.insert(
                block.path().to_owned(),
                block.prepare_bank(features, rounding)?,
            );
        }
        Ok(prepared)
    }

    /// One denoising step on a window of frames.
    ///
    /// * `sample`: noisy latents `[B, C_in, F, h, w]`;
    /// * `timestep`: the DDIM timestep, shared by the whole batch;
    /// * `audio`: audio tokens `[B, F, N, D]` (or already flattened `[B·F, N, D]`);
    /// * `face`: face-locator features `[B, C0, 1 or F, h, w]`, added after
    ///   `conv_in` (broadcast over frames), or `None`;
    /// * `bank`: from [`Self::prepare_bank`];
    /// * `do_classifier_free_guidance`: the first half of the batch is the
    ///   unconditional branch and attends without the bank.
    ///
    /// Returns the model output (a v-prediction) `[B, C_out, F, h, w]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        audio: &Tensor,
        face: Option<&Tensor>,
        bank: &PreparedBank,
        do_classifier_free_guidance: bool,
    ) -> Result<Tensor> {
        let (b, _, frames, h, w) = sample.dims5()?;
        let rows = b * frames;
        let uncond_rows = if do_classifier_free_guidance {
            if b % 2 != 0 {
                candle_core::bail!("classifier-free guidance needs an even batch, got {b}");
            }
            rows / 2
        } else {
            0
        };
        let audio = match audio.rank() {
            4 => audio.flatten_to(1)?,
            3 => audio.clone(),
            r => {
                candle_core::bail!("audio tokens must be [B, F, N, D] or [B·F, N, D], got rank {r}")
            }
        };
        if audio.dim(0)? != rows {
            candle_core::bail!(
                "audio tokens have {} rows for {b} × {frames} frames",
                audio.dim(0)?
            );
        }
        let down_factor = 1usize << (self.up_blocks.len() - 1);
        let forward_upsample_size = h % down_factor != 0 || w % down_factor != 0;

        // 0. (b, c, f, h, w) → (b·f, c, h, w); center input
        let mut xs = to_rows(sample)?;
        if self.center_input_sample {
            xs = ((xs * 2.0)? - 1.0)?;
        }
        // 1. time
        let t_emb = self.time_proj.forward(timestep, xs.dtype(), xs.device())?;
        let temb = self.time_embedding.forward(&t_emb)?;
        let cond = Conditioning {
            temb: &temb,
            audio: &audio,
            bank,
            uncond_rows,
            frames,
        };
        // 2. conv_in, + face features (before the first skip)
        let mut xs = kernels::conv2d(&self.conv_in, &xs)?;
        if let Some(face) = face {
            xs = xs.add(&face_rows(face, b, frames)?.to_dtype(xs.dtype())?)?;
        }
        let mut skips = vec![xs.clone()];
        // 3. down
        for block in &self.down_blocks {
            let (out, res) = block.forward(&xs, &cond)?;
            xs = out;
            skips.extend(res);
        }
        // 4. mid
        xs = self.mid_block.forward(&xs, &cond)?;
        // 5. up (each block consumes `layers_per_block + 1` skips)
        let n_up = self.up_blocks.len();
        for (i, block) in self.up_blocks.iter().enumerate() {
            let mut res = skips.split_off(skips.len().saturating_sub(block.num_layers()));
            let size = upsample_size(forward_upsample_size, i + 1 == n_up, &skips)?;
            xs = block.forward(&xs, &mut res, &cond, size)?;
        }
        // 6. post-process: GroupNorm (per frame when inflated), SiLU, conv_out
        let xs = if self.use_inflated_groupnorm {
            self.conv_norm_out.forward_silu(&xs)?
        } else {
            group_norm_across_frames(&self.conv_norm_out, &xs, frames)?.silu()?
        };
        let xs = kernels::conv2d(&self.conv_out, &xs)?;
        from_rows(&xs, b, frames)
    }
}

/// `(b, c, f, h, w)` → `(b·f, c, h, w)`.
fn to_rows(xs: &Tensor) -> Result<Tensor> {
    let (b, c, f, h, w) = xs.dims5()?;
    xs.permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape((b * f, c, h, w))
}

/// `(b·f, c, h, w)` → `(b, c, f, h, w)`.
fn from_rows(xs: &Tensor, b: usize, frames: usize) -> Result<Tensor> {
    let (_, c, h, w) = xs.dims4()?;
    xs.reshape((b, frames, c, h, w))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

/// Face features `[B, C0, 1 or F, h, w]` as `(b·f, C0, h, w)` rows.
fn face_rows(face: &Tensor, b: usize, frames: usize) -> Result<Tensor> {
    let (fb, c, ff, h, w) = face.dims5()?;
    if fb != b || (ff != 1 && ff != frames) {
        candle_core::bail!(
            "face features {:?} do not match a batch of {b} × {frames} frames",
            face.dims()
        );
    }
    face.permute((0, 2, 1, 3, 4))?
        .broadcast_as((b, frames, c, h, w))?
        .contiguous()?
        .reshape((b * frames, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MotionModuleKwargs, PerBlock};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// A two-level config small enough for random-weight smoke tests.
    fn tiny() -> (UNet2DConditionConfig, UnetAdditionalKwargs) {
        let cfg = UNet2DConditionConfig {
            block_out_channels: vec![32, 64],
            down_block_types: vec![DownBlockType::CrossAttnDownBlock, DownBlockType::DownBlock],
            up_block_types: vec![UpBlockType::UpBlock, UpBlockType::CrossAttnUpBlock],
            layers_per_block: 1,
            attention_head_dim: PerBlock::Uniform(2),
            norm_num_groups: 8,
            cross_attention_dim: 24,
            ..Default::default()
        };
        let extra = UnetAdditionalKwargs {
            cross_attention_dim: Some(16),
            motion_module_resolutions: vec![1, 2],
            motion_module_kwargs: MotionModuleKwargs {
                num_attention_heads: 2,
                temporal_position_encoding_max_len: 6,
                ..Default::default()
            },
            ..Default::default()
        };
        (cfg, extra)
    }

    fn random_model(
        cfg: &UNet2DConditionConfig,
        extra: &UnetAdditionalKwargs,
    ) -> Result<UNet3DConditionModel> {
        let vm = VarMap::new();
        UNet3DConditionModel::new(
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
            cfg,
            extra,
        )
    }

    fn inputs(b: usize, f: usize, h: usize, w: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        Ok((
            Tensor::randn(0f32, 1., (b, 4, f, h, w), &dev)?,
            Tensor::randn(0f32, 1., (b, f, 5, 16), &dev)?,
            Tensor::randn(0f32, 1., (b, 32, 1, h, w), &dev)?,
        ))
    }

    #[test]
    fn odd_latent_sizes_and_both_group_norm_scopes_run() -> Result<()> {
        let (cfg, mut extra) = tiny();
        for inflated in [true, false] {
            extra.use_inflated_groupnorm = inflated;
            let unet = random_model(&cfg, &extra)?;
            // 5 × 7 is not a multiple of the down factor 2: the upsampler
            // follows the skip sizes.
            let (x, audio, face) = inputs(2, 3, 5, 7)?;
            let out = unet.forward(&x, 981.0, &audio, Some(&face), &PreparedBank::empty(), true)?;
            assert_eq!(out.dims(), &[2, 4, 3, 5, 7]);
        }
        Ok(())
    }

    #[test]
    fn batch_rows_are_independent_and_bank_reads_follow_cfg() -> Result<()> {
        let (cfg, extra) = tiny();
        let unet = random_model(&cfg, &extra)?;
        let (x, audio, face) = inputs(2, 2, 4, 4)?;
        // A bank of the right shapes: one [1, h_l·w_l, C_l] entry per reader.
        let mut bank = Bank::new();
        for block in unet.reader_blocks() {
            let path = block.path().to_owned();
            let (tokens, width) =
                if path.starts_with("down_blocks.0") || path.starts_with("up_blocks.1") {
                    (16, 32)
                } else {
                    (4, 64)
                };
            bank.insert(
                path,
                Tensor::randn(0f32, 1., (1, tokens, width), &Device::Cpu)?,
            );
        }
        let prepared = unet.prepare_bank(&bank, BankRounding::F16)?;
        let both = unet.forward(&x, 500.0, &audio, Some(&face), &prepared, true)?;
        let row = |t: &Tensor, i| t.narrow(0, i, 1);
        let cond = unet.forward(
            &row(&x, 1)?,
            500.0,
            &row(&audio, 1)?,
            Some(&row(&face, 1)?),
            &prepared,
            false,
        )?;
        let uncond = unet.forward(
            &row(&x, 0)?,
            500.0,
            &row(&audio, 0)?,
            Some(&row(&face, 0)?),
            &PreparedBank::empty(),
            false,
        )?;
        assert!(crate::ops::max_abs_diff(&row(&both, 1)?, &cond)? < 1e-4);
        assert!(crate::ops::max_abs_diff(&row(&both, 0)?, &uncond)? < 1e-4);
        let uncond_bank = unet.forward(
            &row(&x, 0)?,
            500.0,
            &row(&audio, 0)?,
            Some(&row(&face, 0)?),
            &prepared,
            false,
        )?;
        assert!(crate::ops::max_abs_diff(&row(&both, 0)?, &uncond_bank)? > 1e-3);
        Ok(())
    }

    #[test]
    fn bad_inputs_and_configs_are_errors() -> Result<()> {
        let (cfg, extra) = tiny();
        let unet = random_model(&cfg, &extra)?;
        let (x, audio, face) = inputs(1, 7, 4, 4)?;
        // 7 frames exceed the position table of 6.
        let err = unet
            .forward(&x, 1.0, &audio, Some(&face), &PreparedBank::empty(), false)
            .unwrap_err();
        assert!(err.to_string().contains("7 frames"), "{err}");
        // CFG needs an even batch.
        let (x, audio, face) = inputs(1, 2, 4, 4)?;
        assert!(unet
            .forward(&x, 1.0, &audio, Some(&face), &PreparedBank::empty(), true)
            .is_err());
        for bad in [
            UnetAdditionalKwargs {
                unet_use_temporal_attention: true,
                ..extra.clone()
            },
            UnetAdditionalKwargs {
                unet_use_cross_frame_attention: true,
                ..extra.clone()
            },
            UnetAdditionalKwargs {
                motion_module_type: "Conv".into(),
                ..extra.clone()
            },
        ] {
            assert!(validate(&cfg, &bad).is_err());
            assert!(random_model(&cfg, &bad).is_err());
        }
        Ok(())
    }
}
