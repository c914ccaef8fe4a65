//! 2-D convolution on the CPU without a full im2col buffer.
//!
//! candle's CPU convolution converts the whole input to NHWC on one thread,
//! gathers 512-pixel im2col tiles with scattered writes and scatters the gemm
//! result back pixel by pixel. Here the patch matrix is built for a band of
//! whole output rows at a time, in the weight's own `(c_in, ky, kx)` order (so
//! the `[c_out, c_in, kh, kw]` weight is used as a `[c_out, K]` matrix without
//! reordering): each patch-matrix row is filled by contiguous copies from one
//! input row, in parallel over rows, and the `[c_out, rows·W]` product lands
//! in the output as `c_out` contiguous runs. The band is sized to stay within a
//! few MiB, so a 3×3 conv over 512² × 128 channels needs ≈ 8 MiB of patches
//! instead of 1.2 GB.
//!
//! The op can also read its input through a nearest-neighbour upsampling by an
//! integer factor (diffusers' `Upsample2D`: `interpolate(scale 2)` then a 3×3
//! conv) without materialising the upsampled tensor.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_input::contiguous_f32;

/// Elements of the patch matrix built per band (2 Mi f32 = 8 MiB at most;
/// at least one output row per band).
const BAND_ELEMS: usize = 2 << 20;

/// Geometry of one convolution (square stride and padding, dilation 1, one
/// group), with the input optionally upsampled (nearest) by `upsample` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) k_h: usize,
    pub(crate) k_w: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) upsample: usize,
}

impl ConvGeometry {
    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (ih, iw) = (h * self.upsample, w * self.upsample);
        let (ph, pw) = (ih + 2 * self.padding, iw + 2 * self.padding);
        if ph < self.k_h || pw < self.k_w || self.stride == 0 {
            candle_core::bail!(
                "conv2d: input {ih}x{iw} with padding {} is smaller than the {}x{} kernel",
                self.padding,
                self.k_h,
                self.k_w
            );
        }
        Ok((
            (ph - self.k_h) / self.stride + 1,
            (pw - self.k_w) / self.stride + 1,
        ))
    }
}

/// The CPU f32 convolution as a candle op on the input; it holds the weight as
/// a contiguous `[c_out, c_in·kh·kw]` matrix and the bias values.
pub(crate) struct BandedConv2d {
    pub(crate) geometry: ConvGeometry,
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Vec<f32>>,
}

impl CustomOp1 for BandedConv2d {
    fn name(&self) -> &'static str {
        "banded-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let g = self.geometry;
        if c != g.c_in {
            candle_core::bail!(
                "banded-conv2d: input has {c} channels, the kernel {}",
                g.c_in
            );
        }
        let (oh, ow) = g.out_size(h, w)?;
        let k = g.c_in * g.k_h * g.k_w;
        let rows_per_band = (BAND_ELEMS / (k * ow)).clamp(1, oh);
        let plane_out = oh * ow;
        let mut out = vec![0f32; n * g.c_out * plane_out];
        for (image, dst) in input
            .chunks_exact(c * h * w)
            .zip(out.chunks_exact_mut(g.c_out * plane_out))
        {
            for y0 in (0..oh).step_by(rows_per_band) {
                let y1 = (y0 + rows_per_band).min(oh);
                let cols = (y1 - y0) * ow;
                let mut patches = vec![0f32; k * cols];
                patches
                    .par_chunks_mut(cols)
                    .enumerate()
                    .for_each(|(row, patch)| fill_patch_row(&g, image, (h, w), ow, y0, row, patch));
                let patches = Tensor::from_vec(patches, (k, cols), &Device::Cpu)?;
                let product = self
                    .weight
                    .matmul(&patches)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                for (co, (src, plane)) in product
                    .chunks_exact(cols)
                    .zip(dst.chunks_exact_mut(plane_out))
                    .enumerate()
                {
                    let band = &mut plane[y0 * ow..y1 * ow];
                    match &self.bias {
                        Some(bias) => {
                            let b = bias[co];
                            band.iter_mut().zip(src).for_each(|(d, s)| *d = s + b);
                        }
                        None => band.copy_from_slice(src),
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, g.c_out, oh, ow))))
    }
}

/// Fills one row of the patch matrix (`row` = `(ci, ky, kx)`) for output rows
/// `y0..y0 + patch.len() / ow`. Padding positions are left at zero.
fn fill_patch_row(
    g: &ConvGeometry,
    image: &[f32],
    (h, w): (usize, usize),
    ow: usize,
    y0: usize,
    row: usize,
    patch: &mut [f32],
) {
    let ci = row / (g.k_h * g.k_w);
    let ky = (row / g.k_w) % g.k_h;
    let kx = row % g.k_w;
    let plane = &image[ci * h * w..(ci + 1) * h * w];
    let (ih, iw) = (h * g.upsample, w * g.upsample);
    // Output columns whose input column `ox·s + kx − p` lies inside [0, iw).
    let ox_lo = g.padding.saturating_sub(kx).div_ceil(g.stride);
    let ox_hi = if iw + g.padding > kx {
        ((iw + g.padding - kx - 1) / g.stride + 1).min(ow)
    } else {
        0
    };
    for (j, dst) in patch.chunks_exact_mut(ow).enumerate() {
        let iy = (y0 + j) * g.stride + ky;
        if iy < g.padding || iy - g.padding >= ih || ox_lo >= ox_hi {
            continue;
        }
        let sy = (iy - g.padding) / g.upsample;
        let src = &plane[sy * w..(sy + 1) * w];
        let x0 = ox_lo * g.stride + kx - g.padding;
        if g.stride == 1 && g.upsample == 1 {
            dst[ox_lo..ox_hi].copy_from_slice(&src[x0..x0 + (ox_hi - ox_lo)]);
        } else {
            for (i, d) in dst[ox_lo..ox_hi].iter_mut().enumerate() {
                *d = src[(x0 + i * g.stride) / g.upsample];
            }
        }
    }
}
