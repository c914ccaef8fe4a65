//! Scaled dot-product attention as a composition of candle operations, its scores computed in
//! chunks of bounded size: what [`attention`](super::attention) runs where its CPU kernel does
//! not (other devices, half precision), and the split/merge of heads around it. A leaf of
//! `kernels` besides the softmax and the device switch it uses.

use candle_core::{DType, Device, Result, Tensor};

use super::softmax::softmax_last_dim;
use super::switch::half_precision_scores;

/// Bound on the number of attention scores materialised at once on GPUs
/// (64 Mi elements = 256 MiB in f32): few, large kernels.
pub const DEFAULT_MAX_SCORE_ELEMS: usize = 64 * 1024 * 1024;

/// Bound on the number of attention scores materialised at once on the CPU
/// (1 Mi elements = 4 MiB in f32). Small chunks stay in the caches between
/// the score product, the softmax and the value product, and stay below
/// glibc's mmap threshold (32 MiB at most), so their buffers are reused
/// instead of being page-faulted in afresh for every chunk. Measured at the
/// 64×64 reference attention (8 heads × 4096 × 8192 × 40, 2 cores): 1.65×
/// faster than 64 Mi chunks; see `benches/RESULTS.md`.
pub const CPU_MAX_SCORE_ELEMS: usize = 1024 * 1024;

/// The score bound [`attention`] uses on `device`.
pub fn max_score_elems(device: &Device) -> usize {
    if device.is_cpu() {
        CPU_MAX_SCORE_ELEMS
    } else {
        DEFAULT_MAX_SCORE_ELEMS
    }
}

/// Scaled dot-product attention `softmax(q·kᵀ·scale)·v`.
///
/// Shapes: `q` is `[..., Lq, D]`, `k` is `[..., Lk, D]` and `v` is `[..., Lk, Dv]`
/// with identical leading dimensions; the result is `[..., Lq, Dv]`.
///
/// On the CPU, and in f32 everywhere, the scores are soft-maxed in f32. Half-precision
/// inputs on a GPU keep the scores in their dtype
/// ([`half_precision_scores`](super::half_precision_scores)): the scale is
/// folded into the queries and candle's softmax kernel sums in f32. The scores are computed in chunks so
/// that no more than [`max_score_elems`] exist at any time. At full EchoMimic size the
/// reference attention would otherwise materialise 4096×8192 scores per head
/// and frame (≈26 GB for a CFG call).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_chunked(q, k, v, scale, max_score_elems(q.device()))
}

/// [`attention`] with an explicit bound on the number of live scores.
///
/// A chunk is `rows` queries of `group` leading items (batch × heads), with
/// `group·rows·Lk ≤ max_score_elems` (at least one query of one item): rows
/// first, so that every chunk's matrix products keep a useful height, then
/// as many leading items as still fit.
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_score_elems: usize,
) -> Result<Tensor> {
    let q_dims = q.dims().to_vec();
    let rank = q_dims.len();
    if rank < 2 || k.rank() != rank || v.rank() != rank {
        candle_core::bail!(
            "attention expects q, k, v of equal rank >= 2, got {:?} {:?} {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let lead: usize = q_dims[..rank - 2].iter().product();
    let (lq, d) = (q_dims[rank - 2], q_dims[rank - 1]);
    let lk = k.dim(rank - 2)?;
    let dv = v.dim(rank - 1)?;
    let out_dtype = v.dtype();
    let mut out_dims = q_dims.clone();
    out_dims[rank - 1] = dv;
    if lead == 0 || lq == 0 {
        return Tensor::zeros(out_dims, out_dtype, q.device());
    }
    let q3 = q.reshape((lead, lq, d))?;
    let k3 = k.reshape((lead, lk, d))?;
    let v3 = v.reshape((lead, lk, dv))?;
    // In f32, scale the queries (Lq·D values) rather than the scores (Lq·Lk):
    // one pass less over the largest tensor, same precision. Half-precision
    // inputs keep the scale on the f32 scores on the CPU; on a GPU they stay
    // in half precision end to end (see above).
    let half_scores = half_precision_scores(q);
    let (q3, score_scale) = if q.dtype() == DType::F32 || half_scores {
        ((q3 * scale)?, None)
    } else {
        (q3, Some(scale))
    };
    let kt = k3.t()?;
    let budget = max_score_elems.max(1);
    let rows = (budget / lk.max(1)).clamp(1, lq.max(1));
    let group = (budget / (rows * lk).max(1)).clamp(1, lead.max(1));
    let mut groups = Vec::with_capacity(lead.div_ceil(group));
    for g0 in (0..lead).step_by(group) {
        let g = group.min(lead - g0);
        let (qg, ktg, vg) = (
            q3.narrow(0, g0, g)?,
            kt.narrow(0, g0, g)?,
            v3.narrow(0, g0, g)?,
        );
        let mut parts = Vec::with_capacity(lq.div_ceil(rows));
        for r0 in (0..lq).step_by(rows) {
            let qc = qg.narrow(1, r0, rows.min(lq - r0))?;
            let probs = if half_scores {
                candle_nn::ops::softmax_last_dim(&qc.matmul(&ktg)?)?
            } else {
                let scores = qc.matmul(&ktg)?.to_dtype(DType::F32)?;
                softmax_last_dim(&scores, score_scale)?.to_dtype(out_dtype)?
            };
            parts.push(probs.matmul(&vg)?);
        }
        groups.push(concat(parts, 1)?);
    }
    concat(groups, 0)?.reshape(out_dims)
}

/// `Tensor::cat` that skips the copy for a single part.
fn concat(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        Tensor::cat(&parts, dim)
    }
}

/// Splits `[B, L, H·Dh]` into heads: `[B, H, L, Dh]` (contiguous).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = xs.dims3()?;
    xs.reshape((b, l, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Inverse of [`split_heads`]: `[B, H, L, Dh]` to `[B, L, H·Dh]`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    let (b, h, l, dh) = xs.dims4()?;
    xs.transpose(1, 2)?.contiguous()?.reshape((b, l, h * dh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;

    /// `attention_chunked` at every score limit in `limits` against the unchunked f32
    /// composition (computed from f32 copies of the inputs): same shape and dtype as `q`, and
    /// within `tolerance`.
    fn check_limits(
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        limits: &[usize],
        tolerance: f64,
    ) -> Result<()> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let s = (f32(q)?.matmul(&f32(k)?.t()?)? * 0.35)?;
        let want = candle_nn::ops::softmax_last_dim(&s)?.matmul(&f32(v)?)?;
        for &limit in limits {
            let got = attention_chunked(q, k, v, 0.35, limit)?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(got.dtype(), q.dtype());
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < tolerance, "limit {limit}: diff {diff}");
        }
        Ok(())
    }

    #[test]
    fn chunked_attention_matches_naive() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 53, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 53, 5), &dev)?;
        // 1 score, one query of one item, several rows of one item, several
        // items, everything at once.
        check_limits((&q, &k, &v), &[1, 53, 7 * 53, 53 * 37 * 2, 1 << 30], 1e-5)
    }

    #[test]
    fn half_precision_attention_matches_f32() -> Result<()> {
        let dev = Device::Cpu;
        let half = |shape: (usize, usize, usize)| {
            Tensor::randn(0f32, 1., shape, &dev)?.to_dtype(DType::F16)
        };
        let (q, k, v) = (half((3, 29, 8))?, half((3, 41, 8))?, half((3, 41, 8))?);
        check_limits((&q, &k, &v), &[41 * 5, 1 << 30], 5e-3)
    }

    #[test]
    fn empty_queries_give_an_empty_result() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 0, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
        let v = Tensor::zeros((2, 3, 6), DType::F32, &dev)?;
        assert_eq!(attention(&q, &k, &v, 0.5)?.dims(), &[2, 0, 6]);
        Ok(())
    }

    #[test]
    fn heads_round_trip() -> Result<()> {
        let x = Tensor::arange(0f32, 2. * 5. * 12., &Device::Cpu)?.reshape((2, 5, 12))?;
        let h = split_heads(&x, 3)?;
        assert_eq!(h.dims(), &[2, 3, 5, 4]);
        assert_eq!(max_abs_diff(&merge_heads(&h)?, &x)?, 0.0);
        Ok(())
    }
}
