//! Numerical building blocks shared by several networks.

use candle_core::{DType, Result, Tensor, D};

/// Default bound on the number of attention scores materialised at once
/// (64 Mi elements = 256 MiB in f32).
pub const DEFAULT_MAX_SCORE_ELEMS: usize = 64 * 1024 * 1024;

/// Scaled dot-product attention `softmax(q·kᵀ·scale)·v`.
///
/// Shapes: `q` is `[..., Lq, D]`, `k` is `[..., Lk, D]` and `v` is `[..., Lk, Dv]`
/// with identical leading dimensions; the result is `[..., Lq, Dv]`.
///
/// The scores are computed and soft-maxed in f32 whatever the input dtype (as
/// PyTorch does inside SDPA), and the queries are processed in chunks so that
/// no more than [`DEFAULT_MAX_SCORE_ELEMS`] scores exist at any time. At full
/// EchoMimic size the reference attention would otherwise materialise
/// 4096×8192 scores per head and frame.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_chunked(q, k, v, scale, DEFAULT_MAX_SCORE_ELEMS)
}

/// [`attention`] with an explicit bound on the number of live scores.
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
    let q3 = q.reshape((lead, lq, d))?;
    let k3 = k.reshape((lead, lk, d))?;
    let v3 = v.reshape((lead, lk, dv))?;
    let kt = k3.t()?;
    let rows = (max_score_elems / (lead * lk).max(1)).max(1);
    let out_dtype = v.dtype();
    let mut outs = Vec::with_capacity(lq.div_ceil(rows));
    let mut start = 0;
    while start < lq {
        let len = rows.min(lq - start);
        let qc = q3.narrow(1, start, len)?;
        let scores = (qc.matmul(&kt)?.to_dtype(DType::F32)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(probs.to_dtype(out_dtype)?.matmul(&v3)?);
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.pop().expect("one chunk")
    } else {
        Tensor::cat(&outs, 1)?
    };
    let mut out_dims = q_dims;
    out_dims[rank - 1] = dv;
    out.reshape(out_dims)
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

/// Maximum absolute difference between two tensors of the same shape (as f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    d.flatten_all()?.max(D::Minus1)?.to_scalar::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let s = (q.matmul(&k.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(v)
    }

    #[test]
    fn chunked_attention_matches_naive() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1., (2, 3, 53, 8), &dev)?;
        let v = Tensor::randn(0f32, 1., (2, 3, 53, 5), &dev)?;
        let want = naive(&q, &k, &v, 0.35)?;
        for limit in [1, 7 * 53 * 6, 1 << 30] {
            let got = attention_chunked(&q, &k, &v, 0.35, limit)?;
            assert_eq!(got.dims(), &[2, 3, 37, 5]);
            let diff = max_abs_diff(&got, &want)?;
            assert!(diff < 1e-5, "limit {limit}: diff {diff}");
        }
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
