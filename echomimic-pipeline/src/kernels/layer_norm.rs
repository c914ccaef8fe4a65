//! LayerNorm over the last dimension with its affine parameters, in one op.
//!
//! The composition is nine candle ops (mean, subtract, square, mean, add, square root,
//! divide, scale, shift), each a pass over the tensor into a fresh buffer; a transformer
//! block runs three of them and the motion modules more. The CPU kernel reads each row
//! twice (its mean, then the variance of the centred values, both summed in 8 f32 lanes, as
//! the two-pass statistics of PyTorch and of the composition) and writes it once:
//! `(x − mean) · (weight / √(var + eps)) + bias`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::cpu_input::{contiguous_f32, map_rows};

/// Lanes of the row sums.
const LANES: usize = 8;

/// LayerNorm of `xs` over its last dimension, `weight` and `bias` of that width (f32), as
/// `((xs − mean) / √(var + eps)) · weight + bias` with the statistics in f32; `xs` of
/// another dtype is computed in f32 and cast back.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let width = xs.dim(D::Minus1)?;
    if super::switch::use_cpu_kernel(xs) && width > 0 {
        let op = LayerNormOp {
            weight: weight.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            bias: bias.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?,
            eps: eps as f32,
        };
        if op.weight.len() != width || op.bias.len() != width {
            candle_core::bail!(
                "layer norm: weight {} and bias {} for rows of {width}",
                op.weight.len(),
                op.bias.len()
            );
        }
        return xs.contiguous()?.apply_op1_no_bwd(&op);
    }
    let dtype = xs.dtype();
    let x = xs.to_dtype(candle_core::DType::F32)?;
    let x = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?
        .to_dtype(dtype)
}

struct LayerNormOp {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

/// Σ `f(x)` over `row` in [`LANES`] f32 lanes.
fn lane_sum(row: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f(x);
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for &x in chunks.remainder() {
        sum += f(x);
    }
    sum
}

impl LayerNormOp {
    fn row(&self, dst: &mut [f32], src: &[f32]) {
        let n = src.len() as f32;
        let mean = lane_sum(src, |x| x) / n;
        let var = lane_sum(src, |x| (x - mean) * (x - mean)) / n;
        let rstd = 1.0 / (var + self.eps).sqrt();
        for (((d, &x), &w), &b) in dst.iter_mut().zip(src).zip(&self.weight).zip(&self.bias) {
            *d = (x - mean) * (w * rstd) + b;
        }
    }
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let out = map_rows(input, self.weight.len(), |d, s| self.row(d, s));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
