//! CPU kernels for the hot operations of the networks, and the one place that
//! decides when they are used.
//!
//! Each kernel is a candle custom op (or a function over the storages of its
//! tensors) with a CPU f32 implementation (one file per kernel); every other
//! device and dtype takes the plain composition of candle ops it replaces. Two
//! choices hold off the CPU kernels: a 1×1 convolution is one matmul
//! ([`conv2d`]), and attention keeps half-precision scores on GPUs
//! ([`half_precision_scores`]). The networks call the functions below instead of
//! `Module::forward` on the layers concerned, and nothing else in the crate looks
//! at the device to pick an implementation.
//!
//! Kernels: multi-head attention read and written in the projections' layout (`attention`,
//! also over the frames of every position and with EchoMimic's shared reference keys),
//! convolutions without a full im2col buffer (`conv2d`, also reading through a
//! nearest 2× upsample; 3×3 stride-1 ones by Winograd's F(2×2, 3×3) in `winograd`; on
//! AVX-512 CPUs other wide stride-1 ones without any patch matrix), GroupNorm with the SiLU after it fused (`group_norm`), LayerNorm
//! with its affine part (`layer_norm`), linear layers over a few rows (`linear`), GEGLU's gate (`geglu`) and the attention softmax with
//! its scale (`softmax`); `chunked` is the candle composition of attention (scores in
//! bounded chunks) the attention kernel falls back to off the CPU (public as `ops::attention`); `math` holds the
//! branch-free `exp`/`erf` they share, so their loops vectorise, `x86` the AVX2 + FMA rows
//! (softmax, GEGLU gate, GroupNorm's write with SiLU) and the AVX-512 convolution tile taken
//! at run time, `pool` the scratch buffers the Winograd convolution keeps between calls, and `matmul` the bounds-checked strided product (candle's
//! `gemm`) the attention and convolution kernels write their results with, and `chunks` the
//! one helper that runs work over a buffer's chunks on the pool or on the caller's thread. `matmul` and
//! `x86` are the crate's only `unsafe` code, each call checked where it is made.
//!
//! Threads: the kernels run on rayon's global pool (the one candle's CPU
//! backend uses), so `RAYON_NUM_THREADS` bounds them like the rest of candle.

mod attention;
pub(crate) mod chunked;
mod chunks;
mod conv2d;
mod cpu_input;
mod geglu;
mod group_norm;
mod layer_norm;
mod linear;
mod math;
mod matmul;
mod pool;
mod softmax;
mod switch;
mod winograd;
#[cfg(target_arch = "x86_64")]
mod x86;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::Conv2d;

pub use attention::{attention, frame_attention, SharedKv};
use conv2d::{BandedConv2d, ConvGeometry};
pub use geglu::{geglu, gelu_erf};
pub use group_norm::{group_norm, GroupNorm};
pub use layer_norm::layer_norm;
pub use linear::linear;
pub use softmax::softmax_last_dim;
use switch::use_cpu_kernel;
pub use switch::{half_precision_scores, set_enabled};

/// `conv.forward(xs)`: on the CPU in f32 through the banded kernel (a 1×1 convolution reads
/// the input as its patch matrix), elsewhere a 1×1 convolution (stride 1, no padding) as a
/// plain matmul (on an H200 in f16 at 24×320×64×64, without the bias: 0.20 ms against
/// 1.78 ms for candle's im2col convolution; a whole UNet call moved by about 1 %;
/// `benches/gpu/`), other kernels through candle's convolution.
pub fn conv2d(conv: &Conv2d, xs: &Tensor) -> Result<Tensor> {
    conv2d_upsampled(conv, xs, 1)
}

/// `conv.forward(xs.upsample_nearest2d(2h, 2w))` without materialising the
/// upsampled input on the CPU in f32 (diffusers `Upsample2D`).
pub fn upsample_nearest2x_conv2d(conv: &Conv2d, xs: &Tensor) -> Result<Tensor> {
    conv2d_upsampled(conv, xs, 2)
}

/// A convolution over plain CPU f32 values, for a network that keeps its activations as
/// vectors (MTCNN's P-Net over each pyramid level): the banded kernel prepared once and
/// written into a buffer the caller reuses, without wrapping the values in a tensor and
/// copying them out again. With the kernels switched off ([`set_enabled`]) it takes
/// candle's convolution through tensors.
#[derive(Debug, Clone)]
pub(crate) struct PlaneConv2d {
    conv: Conv2d,
    op: Option<BandedConv2d>,
}

impl PlaneConv2d {
    /// `conv` on CPU f32 values (its weight must be on the CPU in f32).
    pub(crate) fn new(conv: Conv2d) -> Result<Self> {
        let weight = conv.weight();
        if !weight.device().is_cpu() || weight.dtype() != DType::F32 {
            candle_core::bail!("a plane convolution needs a CPU f32 weight");
        }
        let cfg = conv.config();
        let op = (cfg.groups == 1 && cfg.dilation == 1)
            .then(|| banded(&conv, 1))
            .transpose()?;
        Ok(Self { conv, op })
    }

    /// `(n, c_in, h, w)` values in `x` to `(n, c_out, oh, ow)` ones in `out` (cleared
    /// first); returns `(oh, ow)`.
    pub(crate) fn forward_into(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        out: &mut Vec<f32>,
    ) -> Result<(usize, usize)> {
        let (_, c_in, _, _) = self.conv.weight().dims4()?;
        match &self.op {
            Some(op) if switch::enabled() => op.run(x, (n, c_in, h, w), out),
            _ => {
                let xs = Tensor::from_slice(x, (n, c_in, h, w), &candle_core::Device::Cpu)?;
                let ys = self.conv.forward(&xs)?;
                let (_, _, oh, ow) = ys.dims4()?;
                out.clear();
                out.extend(ys.flatten_all()?.to_vec1::<f32>()?);
                Ok((oh, ow))
            }
        }
    }
}

/// The banded CPU op for `conv` reading its input through a nearest `upsample`.
fn banded(conv: &Conv2d, upsample: usize) -> Result<BandedConv2d> {
    let cfg = conv.config();
    let weight = conv.weight();
    let (c_out, c_in, k_h, k_w) = weight.dims4()?;
    Ok(BandedConv2d {
        geometry: ConvGeometry {
            c_in,
            c_out,
            k_h,
            k_w,
            stride: cfg.stride,
            padding: cfg.padding,
            upsample,
        },
        weight: weight.reshape((c_out, c_in * k_h * k_w))?.contiguous()?,
        bias: conv.bias().map(|b| b.to_vec1::<f32>()).transpose()?,
    })
}

fn conv2d_upsampled(conv: &Conv2d, xs: &Tensor, upsample: usize) -> Result<Tensor> {
    let cfg = conv.config();
    let weight = conv.weight();
    let (c_out, c_in_k, k_h, k_w) = weight.dims4()?;
    let _span = tracing::trace_span!("conv2d", k = k_h, c_in = c_in_k, c_out).entered();
    let (n, c_in, h, w) = xs.dims4()?;
    let fast = use_cpu_kernel(xs) && weight.dtype() == DType::F32;
    if !fast
        && k_h == 1
        && k_w == 1
        && cfg.stride == 1
        && cfg.padding == 0
        && upsample == 1
        && cfg.groups == 1
        && c_in == c_in_k
    {
        // A 1×1 convolution is `[c_out, c_in] · [c_in, h·w]` per image.
        let ys = weight
            .reshape((c_out, c_in_k))?
            .broadcast_matmul(&xs.contiguous()?.reshape((n, c_in, h * w))?)?
            .reshape((n, c_out, h, w))?;
        return match conv.bias() {
            Some(b) => ys.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
            None => Ok(ys),
        };
    }
    if !fast || cfg.groups != 1 || cfg.dilation != 1 {
        let xs = if upsample == 1 {
            xs.clone()
        } else {
            let (_, _, h, w) = xs.dims4()?;
            xs.upsample_nearest2d(h * upsample, w * upsample)?
        };
        return conv.forward(&xs);
    }
    xs.contiguous()?.apply_op1_no_bwd(&banded(conv, upsample)?)
}
