//! Softmax over the last dimension, with the attention's score scale folded in.
//!
//! The composition scales the scores into a fresh tensor, then candle's softmax calls
//! glibc's `expf` once per element. The CPU kernel scales, subtracts the row maximum,
//! exponentiates with the vectorisable [`exp`](super::math::exp), sums in 8 f32 lanes and
//! normalises, one row at a time, writing each element once.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

use super::cpu_input::{contiguous_f32, map_rows};
use super::math::exp;

/// Lanes of the row sums.
const LANES: usize = 8;

/// `softmax(xs · scale)` over the last dimension (`scale` 1 when `None`), as
/// `candle_nn::ops::softmax_last_dim((xs * scale)?)`.
pub fn softmax_last_dim(xs: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    if super::switch::use_cpu_kernel(xs) && xs.dim(D::Minus1)? > 0 {
        let op = ScaledSoftmax {
            scale: scale.unwrap_or(1.0) as f32,
        };
        return xs.contiguous()?.apply_op1_no_bwd(&op);
    }
    let xs = match scale {
        Some(s) => (xs * s)?,
        None => xs.clone(),
    };
    candle_nn::ops::softmax_last_dim(&xs)
}

struct ScaledSoftmax {
    scale: f32,
}

impl ScaledSoftmax {
    fn row(&self, dst: &mut [f32], src: &[f32]) {
        let s = self.scale;
        let max = src.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * s));
        let mut lanes = [0f32; LANES];
        let mut d = dst.chunks_exact_mut(LANES);
        let mut x = src.chunks_exact(LANES);
        for (d, x) in (&mut d).zip(&mut x) {
            for ((d, &x), l) in d.iter_mut().zip(x).zip(lanes.iter_mut()) {
                *d = exp(x * s - max);
                *l += *d;
            }
        }
        let mut sum: f32 = lanes.iter().sum();
        for (d, &x) in d.into_remainder().iter_mut().zip(x.remainder()) {
            *d = exp(x * s - max);
            sum += *d;
        }
        let inv = 1.0 / sum;
        for d in dst.iter_mut() {
            *d *= inv;
        }
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let width = layout.shape().dims().last().copied().unwrap_or(0);
        let out = map_rows(input, width, |d, s| self.row(d, s));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
