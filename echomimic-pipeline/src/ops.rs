//! Numerical building blocks shared by several networks: the chunked attention composition
//! (kept in `kernels`, whose attention kernel falls back to it, and named here) and a
//! NaN-aware tensor comparison.

use candle_core::{DType, Result, Tensor};

pub use crate::kernels::chunked::{
    attention, attention_chunked, max_score_elems, merge_heads, split_heads, CPU_MAX_SCORE_ELEMS,
    DEFAULT_MAX_SCORE_ELEMS,
};

/// Maximum absolute difference between two tensors of the same shape (as f64).
///
/// A NaN or infinity in either tensor is an error, never a number: candle's
/// `max` skips NaNs, so a reduction over `|a - b|` would let a NaN anywhere
/// but in the first element pass as "close". The tests' richer comparison
/// (`tests/common`, `TensorDiff`) adds the relative error and the worst index.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!(
            "max_abs_diff: shapes {:?} and {:?} differ",
            a.dims(),
            b.dims()
        );
    }
    let values = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (x, y) = (values(a)?, values(b)?);
    let mut max = 0f64;
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        if !p.is_finite() || !q.is_finite() {
            candle_core::bail!("max_abs_diff: non-finite value at flat index {i} ({p} vs {q})");
        }
        max = max.max((p - q).abs());
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_abs_diff_rejects_non_finite_values_anywhere() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, 2., 3., 4.], &dev)?;
        assert_eq!(max_abs_diff(&a, &a)?, 0.0);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for i in 0..4 {
                let mut v = vec![1f32, 2., 3., 4.];
                v[i] = bad;
                let b = Tensor::new(v.as_slice(), &dev)?;
                assert!(max_abs_diff(&a, &b).is_err(), "{bad} at {i} in the second");
                assert!(max_abs_diff(&b, &a).is_err(), "{bad} at {i} in the first");
            }
        }
        let c = Tensor::new(&[1f32, 2., 3.5, 4.], &dev)?;
        assert_eq!(max_abs_diff(&a, &c)?, 0.5);
        assert!(max_abs_diff(&a, &a.reshape((2, 2))?).is_err());
        Ok(())
    }
}
