//! A linear layer over a few rows on the CPU in f32: the weight streamed once through the
//! narrow product of [`matmul`](super::matmul) instead of candle's `x · Wᵀ`, which has
//! `gemm` pack the whole weight first. The reference UNet's lower levels at small latents
//! run their projections over 16, 4 or 1 positions, where the weight's bytes are the cost.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::Linear;

use super::cpu_input::tensor_f32;
use super::matmul::{matmul, View, NARROW};
use super::switch::use_cpu_kernel;

/// `lin.forward(xs)`: with at most 16 rows (the product of `xs`'s leading
/// dimensions) on the CPU in f32, `W · xᵀ` (the weight as the left factor, read in its own
/// row-major layout) transposed onto the bias; otherwise candle's `Linear`.
pub fn linear(lin: &Linear, xs: &Tensor) -> Result<Tensor> {
    let weight = lin.weight();
    let (out_dim, in_dim) = weight.dims2()?;
    let rows = xs.elem_count() / in_dim.max(1);
    let fits = use_cpu_kernel(xs)
        && weight.dtype() == DType::F32
        && weight.device().is_cpu()
        && xs.dims().last() == Some(&in_dim)
        && (1..=NARROW).contains(&rows);
    if !fits {
        return lin.forward(xs);
    }
    let x = xs.flatten_all()?.to_vec1::<f32>()?;
    let weight = weight.contiguous()?;
    let (guard, _) = weight.storage_and_layout();
    let w = tensor_f32(&weight, &guard)?;
    // the product transposed: [out_dim, rows]
    let mut product = vec![0f32; out_dim * rows];
    matmul(
        &mut product,
        rows,
        View {
            data: w,
            rows: out_dim,
            cols: in_dim,
            row_stride: in_dim,
            col_stride: 1,
        },
        View {
            data: &x,
            rows: in_dim,
            cols: rows,
            row_stride: 1,
            col_stride: in_dim,
        },
        false,
        rayon::current_num_threads(),
    );
    let bias = lin.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
    let mut out = vec![0f32; rows * out_dim];
    for (o, sums) in product.chunks_exact(rows).enumerate() {
        let b = bias.as_ref().map_or(0.0, |b| b[o]);
        for (r, &s) in sums.iter().enumerate() {
            out[r * out_dim + o] = s + b;
        }
    }
    let mut dims = xs.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_dim;
    }
    Tensor::from_vec(out, dims, xs.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn few_rows_equal_candles_linear() -> Result<()> {
        let dev = Device::Cpu;
        for (lead, in_dim, out_dim, bias) in [
            (vec![1, 1], 40, 24, true),
            (vec![2, 3], 100, 33, false),
            (vec![4, 4], 17, 8, true),
            (vec![3, 7], 16, 5, true),
        ] {
            let w = Tensor::randn(0f32, 1.0, (out_dim, in_dim), &dev)?;
            let b = bias
                .then(|| Tensor::randn(0f32, 1.0, out_dim, &dev))
                .transpose()?;
            let lin = Linear::new(w, b);
            let mut shape = lead.clone();
            shape.push(in_dim);
            let xs = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let want = lin.forward(&xs)?;
            let got = linear(&lin, &xs)?;
            let d = crate::ops::max_abs_diff(&got, &want)?;
            assert!(d < 1e-4, "{lead:?} {in_dim}->{out_dim}: max abs diff {d}");
        }
        Ok(())
    }
}
