//! GEGLU's gate in one pass: `x · gelu(gate)` for `[x | gate] = proj(h)`; and the exact
//! GELU alone ([`gelu_erf`], Whisper's MLP and front-end convolutions), whose candle op
//! calls libm's scalar `erff` per element (a tenth of a Whisper-tiny encoder call, perf).
//!
//! The composition narrows the projection twice, runs the exact GELU (one `erff` call per
//! element) into a fresh tensor and multiplies into another. The CPU kernel reads each row
//! of the projection once and writes the half-width result once, with the vectorisable
//! [`gelu_erf`](super::math::gelu_erf).

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::cpu_input::{contiguous_f32, map_rows};
use super::math::gelu_erf as gelu1;

/// Rows per parallel work item at least (small tensors stay on one thread).
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// `h[..., :n] · gelu_erf(h[..., n:])` for `h` of last dimension `2n` (diffusers `GEGLU`
/// after its projection).
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let width = h.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: the last dimension {width} is odd");
    }
    let inner = width / 2;
    if super::switch::use_cpu_kernel(h) {
        return h.contiguous()?.apply_op1_no_bwd(&GeGluGate);
    }
    let x = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?;
    x * gate.gelu_erf()?
}

struct GeGluGate;

/// `xs.gelu_erf()`: on the CPU in f32 one vectorised pass (8 wide with FMA where the CPU
/// has AVX2); elsewhere candle's op.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if super::switch::use_cpu_kernel(xs) {
        return xs.contiguous()?.apply_op1_no_bwd(&Gelu);
    }
    xs.gelu_erf()
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        // any row width: the function is element-wise
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let out = map_rows(input, width, |d, x| {
            #[cfg(target_arch = "x86_64")]
            if super::x86::gelu_row(d, x) {
                return;
            }
            for (d, &x) in d.iter_mut().zip(x) {
                *d = gelu1(x);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// `d[i] = x[i] · gelu(gate[i])` (8 wide with FMA where the CPU has AVX2).
fn geglu_row(d: &mut [f32], x: &[f32], gate: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::geglu_row(d, x, gate) {
        return;
    }
    for ((d, &x), &g) in d.iter_mut().zip(x).zip(gate) {
        *d = x * gelu1(g);
    }
}

impl CustomOp1 for GeGluGate {
    fn name(&self) -> &'static str {
        "geglu-gate"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let mut dims = layout.shape().dims().to_vec();
        let width = *dims.last().unwrap_or(&0);
        let inner = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        let mut out = vec![0f32; input.len() / 2];
        if inner == 0 {
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        let rows_per_task = (MIN_ELEMS_PER_TASK / width).max(1);
        out.par_chunks_mut(rows_per_task * inner)
            .zip(input.par_chunks(rows_per_task * width))
            .for_each(|(dst, src)| {
                for (d, row) in dst.chunks_exact_mut(inner).zip(src.chunks_exact(width)) {
                    let (x, gate) = row.split_at(inner);
                    geglu_row(d, x, gate);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
