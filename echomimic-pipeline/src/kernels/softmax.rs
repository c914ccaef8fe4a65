//! Softmax over the last dimension, with the attention's score scale folded in.
//!
//! The composition scales the scores into a fresh tensor, then candle's softmax calls
//! glibc's `expf` once per element. The CPU kernel copies each row into the output and
//! soft-maxes it there ([`softmax_in_place`], which the attention kernel also runs on its
//! score blocks): scale, subtract the row maximum, exponentiate with the vectorisable
//! [`exp`](super::math::exp) (8 wide with FMA where the CPU has AVX2), sum in 8 f32 lanes,
//! normalise.

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
        dst.copy_from_slice(src);
        softmax_in_place(dst, self.scale);
    }
}

/// `softmax(row · scale)` in place (8 wide with FMA where the CPU has AVX2): the row maximum, `exp` summed in [`LANES`] lanes, one
/// normalising pass.
pub(super) fn softmax_in_place(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::softmax_in_place(row, scale) {
        return;
    }
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *x = exp(*x * scale - max);
            *l += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp(*x * scale - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
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
