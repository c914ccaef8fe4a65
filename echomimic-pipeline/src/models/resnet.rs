//! Resnet blocks, down- and upsamplers of both UNets.
//!
//! Mirrors diffusers 0.24 `models/resnet.py` (`ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, used by the reference UNet) and EchoMimic's
//! `src/models/resnet.py` (`ResnetBlock3D`, `InflatedConv3d`,
//! `InflatedGroupNorm`, `Downsample3D`, `Upsample3D`; BadToBest/EchoMimic @
//! 76cdab1).
//!
//! Keys (relative to the block): `norm1.*`, `conv1.*`, `time_emb_proj.*`,
//! `norm2.*`, `conv2.*`, `conv_shortcut.*` (1×1, only when the channel count
//! changes); `conv.*` for the samplers.
//!
//! Layout: video tensors are kept as `(batch·frames, C, H, W)` with row
//! `b·F + f` (batch-major), so an "inflated" conv is a plain 2D conv and the
//! 3D samplers are the 2D ones.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use crate::kernels::{self, GroupNorm};

/// Sizes of a resnet block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels (a 1×1 `conv_shortcut` exists when they differ from the input).
    pub out_channels: usize,
    /// Width of the time embedding; `None` for a block without one (the VAE's,
    /// diffusers `temb_channels=None`: no `time_emb_proj`).
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (`norm_num_groups`).
    pub groups: usize,
    /// GroupNorm eps (`norm_eps`).
    pub eps: f64,
    /// The output is divided by this (`mid_block_scale_factor` in the mid block, else 1).
    pub output_scale_factor: f64,
}

/// `GN → SiLU → conv1 → + time_emb_proj(SiLU(temb)) → GN → SiLU → conv2`,
/// plus the (projected) input (diffusers `ResnetBlock2D`, "default" time
/// embedding norm).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

fn conv3x3(
    vb: VarBuilder<'_>,
    c_in: usize,
    c_out: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    candle_nn::conv2d(c_in, c_out, 3, cfg, vb)
}

impl ResnetBlock2D {
    /// Loads the block at `vb`.
    pub fn new(vb: VarBuilder<'_>, cfg: &ResnetBlock2DConfig) -> Result<Self> {
        let (c_in, c_out) = (cfg.in_channels, cfg.out_channels);
        let conv_shortcut = if c_in != c_out {
            Some(candle_nn::conv2d(
                c_in,
                c_out,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: kernels::group_norm(cfg.groups, c_in, cfg.eps, vb.pp("norm1"))?,
            conv1: conv3x3(vb.pp("conv1"), c_in, c_out, 1, 1)?,
            time_emb_proj: cfg
                .temb_channels
                .map(|t| candle_nn::linear(t, c_out, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: kernels::group_norm(cfg.groups, c_out, cfg.eps, vb.pp("norm2"))?,
            conv2: conv3x3(vb.pp("conv2"), c_out, c_out, 1, 1)?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs`: `[N, C_in, H, W]`; `temb`: `[1, T]` (one timestep for every row)
    /// or `[N, T]`, and `None` exactly when the block has no `time_emb_proj`.
    /// Returns `[N, C_out, H, W]`.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_norm(xs, temb, &|gn: &GroupNorm, x: &Tensor| gn.forward_silu(x))
    }

    fn forward_with_norm(
        &self,
        xs: &Tensor,
        temb: Option<&Tensor>,
        norm_silu: &dyn Fn(&GroupNorm, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("resnet").entered();
        // 1. norm1 → SiLU → conv1
        let mut h = kernels::conv2d(&self.conv1, &norm_silu(&self.norm1, xs)?)?;
        // 2. + time_emb_proj(SiLU(temb)), broadcast over rows and space
        match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&temb.silu()?)?;
                let (n_t, c_t) = t.dims2()?;
                h = h.broadcast_add(&t.reshape((n_t, c_t, 1, 1))?)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("this resnet block needs a time embedding"),
            (None, Some(_)) => candle_core::bail!("this resnet block has no time embedding"),
        }
        // 3. norm2 → SiLU → (dropout) → conv2
        let h = kernels::conv2d(&self.conv2, &norm_silu(&self.norm2, &h)?)?;
        // 4. residual (1×1 shortcut when the width changes), output scale
        let residual = match &self.conv_shortcut {
            Some(conv) => kernels::conv2d(conv, xs)?,
            None => xs.clone(),
        };
        let out = (residual + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// GroupNorm over all frames of each video at once (what `nn.GroupNorm` does on
/// a 5D `(b, c, f, h, w)` tensor): `xs` is `(b·f, C, H, W)`.
pub fn group_norm_across_frames(gn: &GroupNorm, xs: &Tensor, frames: usize) -> Result<Tensor> {
    let (bf, c, h, w) = xs.dims4()?;
    if frames == 0 || bf % frames != 0 {
        candle_core::bail!("{bf} rows are not a whole number of {frames}-frame videos");
    }
    let b = bf / frames;
    let video = xs
        .reshape((b, frames, c, h * w))?
        .transpose(1, 2)?
        .contiguous()?;
    gn.forward(&video)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((bf, c, h, w))
}

/// EchoMimic `ResnetBlock3D`: the 2D block applied per frame. With
/// `use_inflated_groupnorm` (the released model) every GroupNorm is per frame
/// too; otherwise the GroupNorm statistics span all frames of a video, as
/// `nn.GroupNorm` on the 5D tensor computes them.
#[derive(Debug, Clone)]
pub struct ResnetBlock3D {
    // Same keys as the 2D block (`norm1`, `conv1`, ...): no extra path segment.
    block: ResnetBlock2D,
    use_inflated_groupnorm: bool,
}

impl ResnetBlock3D {
    /// Loads the block at `vb`.
    pub fn new(
        vb: VarBuilder<'_>,
        cfg: &ResnetBlock2DConfig,
        use_inflated_groupnorm: bool,
    ) -> Result<Self> {
        Ok(Self {
            block: ResnetBlock2D::new(vb, cfg)?,
            use_inflated_groupnorm,
        })
    }

    /// `xs`: `[B·F, C_in, H, W]` (batch-major rows); `temb`: `[1, T]`.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, frames: usize) -> Result<Tensor> {
        if self.use_inflated_groupnorm {
            self.block.forward(xs, Some(temb))
        } else {
            self.block
                .forward_with_norm(xs, Some(temb), &|gn: &GroupNorm, x: &Tensor| {
                    group_norm_across_frames(gn, x, frames)?.silu()
                })
        }
    }
}

/// 3×3 stride-2 conv (diffusers `Downsample2D` with `use_conv`); also
/// EchoMimic's `Downsample3D` applied per frame. Key: `conv.*`.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// `channels → channels`; `padding` is the config's `downsample_padding`
    /// (0 means the asymmetric right/bottom pad of diffusers).
    pub fn new(vb: VarBuilder<'_>, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels, 2, padding)?,
            padding,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("downsample").entered();
        if self.padding == 0 {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            kernels::conv2d(&self.conv, &xs)
        } else {
            kernels::conv2d(&self.conv, xs)
        }
    }
}

/// Nearest 2× (or to a given size) upsampling then a 3×3 conv (diffusers
/// `Upsample2D` with `use_conv`; EchoMimic's `Upsample3D` per frame, never in
/// time). Key: `conv.*`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// `channels → channels`.
    pub fn new(vb: VarBuilder<'_>, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels, 1, 1)?,
        })
    }

    /// `xs`: `[N, C, H, W]`. `output_size` is `(H', W')` when the UNet input
    /// is not a multiple of the total down factor (the skip's size), else 2×.
    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let _span = tracing::trace_span!("upsample").entered();
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = output_size.unwrap_or((2 * h, 2 * w));
        if (oh, ow) == (2 * h, 2 * w) {
            kernels::upsample_nearest2x_conv2d(&self.conv, xs)
        } else {
            kernels::conv2d(&self.conv, &xs.upsample_nearest2d(oh, ow)?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn group_norm_scope_per_frame_or_across_frames() -> Result<()> {
        let dev = Device::Cpu;
        let gn = GroupNorm::new(
            Tensor::ones(4, DType::F32, &dev)?,
            Tensor::zeros(4, DType::F32, &dev)?,
            2,
            1e-6,
        )?;
        // One video of two frames; frame 1 = frame 0 + 10.
        let f0 = Tensor::randn(0f32, 1., (1, 4, 3, 3), &dev)?;
        let xs = Tensor::cat(&[&f0, &(&f0 + 10.0)?], 0)?;
        // Per frame, the offset is normalised away.
        let per_frame = gn.forward(&xs)?;
        let d = crate::ops::max_abs_diff(&per_frame.get(0)?, &per_frame.get(1)?)?;
        assert!(d < 1e-4, "{d}");
        // Across frames, the statistics are shared: frame 1 sits above frame 0.
        let across = group_norm_across_frames(&gn, &xs, 2)?;
        let gap = (across.get(1)? - across.get(0)?)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!(gap > 1.5, "{gap}");
        // With one frame per video both scopes agree.
        let one = group_norm_across_frames(&gn, &xs, 1)?;
        assert!(crate::ops::max_abs_diff(&one, &per_frame)? < 1e-6);
        assert!(group_norm_across_frames(&gn, &xs, 3).is_err());
        Ok(())
    }
}
