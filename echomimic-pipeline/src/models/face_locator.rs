//! Face locator: a small per-frame conv net that turns the face-region mask
//! into features added to the denoising UNet's `conv_in` output.
//!
//! Mirrors `FaceLocator` of BadToBest/EchoMimic `src/models/face_locator.py`
//! (commit `76cdab1`). Checkpoint: `face_locator.pth`, keys `conv_in.*`,
//! `blocks.{0..2n-1}.*`, `conv_out.*`, loaded strictly.
//!
//! The reference script hard-codes `FaceLocator(320, conditioning_channels=1,
//! block_out_channels=(16, 32, 96, 256))`; here every size is read from the
//! checkpoint shapes ([`FaceLocatorConfig::from_checkpoint`]), so other widths
//! load too.
//!
//! Layout: input `(batch, channels, frames, height, width)`, every 3×3 conv
//! applied to each frame independently (InflatedConv3d, frames folded into the
//! batch as row `b·F + f`); output `(batch, C, frames, ⌈H/2ⁿ⌉, ⌈W/2ⁿ⌉)` with
//! n = number of block pairs (3 for EchoMimic: H/8).

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::kernels;

use crate::error::{PipelineError, Result};
use crate::weights::Checkpoint;

/// Sizes of a [`FaceLocator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaceLocatorConfig {
    /// Output channels (the UNet's `block_out_channels[0]`, 320).
    pub conditioning_embedding_channels: usize,
    /// Mask channels in (1).
    pub conditioning_channels: usize,
    /// Widths of the conv stages (16, 32, 96, 256).
    pub block_out_channels: Vec<usize>,
}

impl Default for FaceLocatorConfig {
    /// The sizes `infer_audio2vid.py` hard-codes for the released model.
    fn default() -> Self {
        Self {
            conditioning_embedding_channels: 320,
            conditioning_channels: 1,
            block_out_channels: vec![16, 32, 96, 256],
        }
    }
}

impl FaceLocatorConfig {
    /// Reads the sizes from the tensor shapes of a face-locator checkpoint.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let conv_weight = |key: &str| -> Result<[usize; 4]> {
            let t = ck
                .tensor(key)
                .ok_or_else(|| ck_err(ck, key, "tensor not found"))?;
            match *t.dims() {
                [o, i, 3, 3] => Ok([o, i, 3, 3]),
                ref d => Err(ck_err(
                    ck,
                    key,
                    format!("expected a 3x3 conv weight [out, in, 3, 3], got {d:?}"),
                )),
            }
        };
        let [c0, conditioning_channels, ..] = conv_weight("conv_in.weight")?;
        let mut n_blocks = 0;
        while ck.contains(&format!("blocks.{n_blocks}.weight")) {
            n_blocks += 1;
        }
        if n_blocks % 2 != 0 {
            return Err(ck_err(
                ck,
                &format!("blocks.{n_blocks}.weight"),
                format!("found {n_blocks} blocks; they come in pairs (stride 1, stride 2)"),
            ));
        }
        let mut block_out_channels = vec![c0];
        for pair in 0..n_blocks / 2 {
            let [out, ..] = conv_weight(&format!("blocks.{}.weight", 2 * pair + 1))?;
            block_out_channels.push(out);
        }
        let [conditioning_embedding_channels, ..] = conv_weight("conv_out.weight")?;
        Ok(Self {
            conditioning_embedding_channels,
            conditioning_channels,
            block_out_channels,
        })
    }
}

fn ck_err(ck: &Checkpoint, key: &str, message: impl Into<String>) -> PipelineError {
    PipelineError::Weights {
        path: ck
            .source_of(key)
            .or_else(|| ck.files().first().map(|p| p.as_path()))
            .map(Path::to_path_buf)
            .unwrap_or_default(),
        key: Some(key.to_owned()),
        message: message.into(),
    }
}

/// EchoMimic's `FaceLocator`.
#[derive(Debug, Clone)]
pub struct FaceLocator {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
    span: tracing::Span,
}

fn conv3x3(
    vb: VarBuilder<'_>,
    c_in: usize,
    c_out: usize,
    stride: usize,
) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, 3, cfg, vb)
}

impl FaceLocator {
    /// Builds the network from `vb` (keys `conv_in`, `blocks.N`, `conv_out`).
    pub fn new(vb: VarBuilder<'_>, cfg: &FaceLocatorConfig) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        if boc.is_empty() {
            candle_core::bail!("face locator: block_out_channels is empty");
        }
        let conv_in = conv3x3(vb.pp("conv_in"), cfg.conditioning_channels, boc[0], 1)?;
        let mut blocks = Vec::with_capacity(2 * (boc.len() - 1));
        for (i, w) in boc.windows(2).enumerate() {
            blocks.push(conv3x3(vb.pp("blocks").pp(2 * i), w[0], w[0], 1)?);
            blocks.push(conv3x3(vb.pp("blocks").pp(2 * i + 1), w[0], w[1], 2)?);
        }
        let conv_out = conv3x3(
            vb.pp("conv_out"),
            boc[boc.len() - 1],
            cfg.conditioning_embedding_channels,
            1,
        )?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
            span: tracing::span!(tracing::Level::TRACE, "face_locator"),
        })
    }

    /// Builds the network from a checkpoint, strictly: every key the network
    /// needs must be present and no other key may be.
    pub fn from_checkpoint(ck: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = FaceLocatorConfig::from_checkpoint(ck)?;
        let model = Self::new(ck.var_builder(dtype, device), &cfg)?;
        ck.check_complete()?;
        if let Some(key) = ck.unused_keys().first() {
            return Err(ck_err(
                ck,
                key,
                "unexpected tensor in a face-locator checkpoint (loaded strictly)",
            ));
        }
        Ok(model)
    }

    /// Loads `face_locator.pth` (any float dtype on disk; cast to `dtype`).
    pub fn load(path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(path)?, dtype, device)
    }
}

impl Module for FaceLocator {
    /// `conditioning`: `(batch, channels, frames, height, width)`.
    fn forward(&self, conditioning: &Tensor) -> candle_core::Result<Tensor> {
        let _enter = self.span.enter();
        let (b, c, f, h, w) = conditioning.dims5()?;
        // 0. inflate: (b, c, f, h, w) -> (b*f, c, h, w).
        let xs = conditioning
            .permute((0, 2, 1, 3, 4))?
            .reshape((b * f, c, h, w))?;
        // 1. conv_in -> SiLU.
        let mut xs = kernels::conv2d(&self.conv_in, &xs)?.silu()?;
        // 2. blocks, each followed by SiLU.
        for block in &self.blocks {
            xs = kernels::conv2d(block, &xs)?.silu()?;
        }
        // 3. conv_out, no activation.
        let xs = kernels::conv2d(&self.conv_out, &xs)?;
        // 4. deflate: (b*f, c', h', w') -> (b, c', f, h', w').
        let (_, c2, h2, w2) = xs.dims4()?;
        xs.reshape((b, f, c2, h2, w2))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn random_checkpoint(cfg: &FaceLocatorConfig) -> candle_core::Result<Checkpoint> {
        let dev = Device::Cpu;
        let mut map = HashMap::new();
        let mut add = |name: String, o: usize, i: usize| -> candle_core::Result<()> {
            map.insert(
                format!("{name}.weight"),
                Tensor::randn(0f32, 0.2, (o, i, 3, 3), &dev)?,
            );
            map.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.05, o, &dev)?);
            Ok(())
        };
        let boc = &cfg.block_out_channels;
        add("conv_in".into(), boc[0], cfg.conditioning_channels)?;
        for (i, w) in boc.windows(2).enumerate() {
            add(format!("blocks.{}", 2 * i), w[0], w[0])?;
            add(format!("blocks.{}", 2 * i + 1), w[1], w[0])?;
        }
        add(
            "conv_out".into(),
            cfg.conditioning_embedding_channels,
            boc[boc.len() - 1],
        )?;
        Ok(Checkpoint::from_tensors(map, "face_locator.pth"))
    }

    #[test]
    fn sizes_come_from_the_checkpoint_and_frames_stay_independent() -> Result<()> {
        let cfg = FaceLocatorConfig {
            conditioning_embedding_channels: 6,
            conditioning_channels: 2,
            block_out_channels: vec![3, 5],
        };
        let ck = random_checkpoint(&cfg)?;
        assert_eq!(FaceLocatorConfig::from_checkpoint(&ck)?, cfg);
        let net = FaceLocator::from_checkpoint(&ck, DType::F32, &Device::Cpu)?;
        // W != H, odd sizes, 3 frames, batch 2.
        let x = Tensor::randn(0f32, 1., (2, 2, 3, 9, 14), &Device::Cpu)?;
        let y = net.forward(&x)?;
        assert_eq!(y.dims(), &[2, 6, 3, 5, 7]);
        // Frame 1 of batch 1 alone gives the same features.
        let single = net.forward(&x.narrow(0, 1, 1)?.narrow(2, 1, 1)?.contiguous()?)?;
        let part = y.narrow(0, 1, 1)?.narrow(2, 1, 1)?;
        assert!(crate::ops::max_abs_diff(&single, &part)? < 1e-6);
        Ok(())
    }

    #[test]
    fn rejects_odd_blocks_and_unexpected_keys() -> Result<()> {
        let cfg = FaceLocatorConfig {
            conditioning_embedding_channels: 4,
            conditioning_channels: 1,
            block_out_channels: vec![2, 3],
        };
        let ck = random_checkpoint(&cfg)?;
        let odd = ck.filtered(|k| !k.starts_with("blocks.1."));
        let err = FaceLocatorConfig::from_checkpoint(&odd)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pairs"), "{err}");

        let mut extra: HashMap<String, Tensor> = ck
            .keys()
            .into_iter()
            .filter_map(|k| ck.tensor(&k).map(|t| (k.clone(), t.clone())))
            .collect();
        extra.insert(
            "module.stray".into(),
            Tensor::zeros(1, DType::F32, &Device::Cpu)?,
        );
        let ck = Checkpoint::from_tensors(extra, "face_locator.pth");
        let err = FaceLocator::from_checkpoint(&ck, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("module.stray") && err.contains("face_locator.pth"),
            "{err}"
        );
        Ok(())
    }
}
