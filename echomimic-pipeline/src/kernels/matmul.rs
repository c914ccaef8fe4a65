//! A matrix product on strided views of slices, checked, for the kernels that multiply in
//! place (it imports only the AVX-512 row dots of [`x86`](super::x86)).
//!
//! candle's `matmul` takes tensors: its result is a fresh zeroed buffer that the caller then
//! copies (and adds a bias to) where it belongs. `gemm` itself writes through any row and
//! column strides, so a kernel can have the product land in its output directly, added to
//! what is there (the bias). This wrapper checks that every element a product reads or writes
//! lies inside the slices it was given, which is what makes the call sound.
#![allow(unsafe_code)]

use gemm::Parallelism;
use rayon::prelude::*;

/// Most result columns of a product that takes the narrow path (see [`matmul`]).
pub(super) const NARROW: usize = 16;

/// A `rows × cols` matrix read from `data` at `r·row_stride + c·col_stride`.
#[derive(Debug, Clone, Copy)]
pub(super) struct View<'a> {
    pub(super) data: &'a [f32],
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) row_stride: usize,
    pub(super) col_stride: usize,
}

impl View<'_> {
    /// Index of the last element, `None` for an empty matrix.
    fn last(&self) -> Option<usize> {
        (self.rows > 0 && self.cols > 0)
            .then(|| (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride)
    }
}

/// `dst[i·dst_row_stride + j] (+)= Σ_k lhs[i, k]·rhs[k, j]`: overwritten, or added to when
/// `accumulate`. `threads` > 1 splits the product over rayon's pool.
///
/// A product with at most [`NARROW`] result columns and a row-major left factor (a
/// weight times the few positions of a UNet's lowest levels) is a stream over the left
/// factor: on CPUs with AVX-512F its rows are dotted straight with the right factor's
/// columns ([`x86::dot_rows`](super::x86::dot_rows)), read once from memory, where
/// `gemm` first packs them (a reference-UNet call at 8² latents spent 46 % of its time in
/// `gemm`'s packing; a 1280 × 11520 weight times 4 columns ran at 15.5 GB/s against
/// torch's 24 on the same box).
///
/// # Panics
/// When the shapes do not chain or a view reaches outside its slice.
pub(super) fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: usize,
) {
    assert_eq!(lhs.cols, rhs.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    if m == 0 || n == 0 {
        return;
    }
    let dst_last = (m - 1) * dst_row_stride + (n - 1);
    assert!(
        dst_last < dst.len(),
        "matmul: the output reaches past its slice"
    );
    if k > 0 {
        for v in [&lhs, &rhs] {
            let last = v.last().unwrap_or(0);
            assert!(
                last < v.data.len(),
                "matmul: an input reaches past its slice"
            );
        }
    } else if !accumulate {
        // An empty sum: gemm would leave `dst` as it is.
        for row in 0..m {
            dst[row * dst_row_stride..row * dst_row_stride + n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if n <= NARROW
        && k >= 16
        && lhs.col_stride == 1
        && lhs.row_stride == k
        && dst_row_stride >= n
        && super::x86::avx512_available()
    {
        narrow(
            &mut dst[..=dst_last],
            dst_row_stride,
            lhs,
            rhs,
            accumulate,
            threads,
        );
        return;
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: every index `gemm` touches is `i·rs + j·cs` for `i`, `j` within the shapes
    // checked above, so it lies inside the slices; `dst` is borrowed mutably and the inputs
    // immutably, so they do not overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// [`matmul`]'s narrow path: the right factor's `n` columns copied as rows, then blocks
/// of the left factor's rows (one block per task, `threads` > 1 on rayon's pool) dotted
/// with them and written (or added) to `dst`.
#[cfg(target_arch = "x86_64")]
fn narrow(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View<'_>,
    rhs: View<'_>,
    accumulate: bool,
    threads: usize,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    let mut columns = vec![0f32; n * k];
    for (j, col) in columns.chunks_exact_mut(k).enumerate() {
        for (i, v) in col.iter_mut().enumerate() {
            *v = rhs.data[i * rhs.row_stride + j * rhs.col_stride];
        }
    }
    let block = if threads > 1 {
        m.div_ceil(4 * threads).next_multiple_of(4)
    } else {
        m
    };
    let a = &lhs.data[..m * k];
    let run = |(b, dst): (usize, &mut [f32])| {
        let rows = block.min(m - b * block);
        let mut sums = vec![0f32; rows * n];
        super::x86::dot_rows(&a[b * block * k..][..rows * k], &columns, k, n, &mut sums);
        for (r, sums) in sums.chunks_exact(n).enumerate() {
            let out = &mut dst[r * dst_row_stride..][..n];
            if accumulate {
                for (o, s) in out.iter_mut().zip(sums) {
                    *o += s;
                }
            } else {
                out.copy_from_slice(sums);
            }
        }
    };
    let chunk = block * dst_row_stride;
    if threads > 1 {
        dst.par_chunks_mut(chunk).enumerate().for_each(run);
    } else {
        dst.chunks_mut(chunk).enumerate().for_each(run);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random value in [-1, 1).
    fn value(i: usize) -> f32 {
        let x = (i as u32).wrapping_mul(2_654_435_761).rotate_left(13) ^ 0x9e37_79b9;
        (x % 2001) as f32 / 1000.0 - 1.0
    }

    #[test]
    fn narrow_and_wide_products_equal_the_plain_sums() {
        // narrow shapes (ragged rows, k not a multiple of 16, one to sixteen columns) and a
        // wide one; the right factor read transposed, the output with a wider row stride
        for (m, n, k) in [
            (37, 1, 100),
            (64, 3, 1153),
            (5, 16, 17),
            (8, 7, 16),
            (9, 20, 40),
        ] {
            let lhs: Vec<f32> = (0..m * k).map(value).collect();
            let rhs: Vec<f32> = (0..n * k).map(|i| value(i + 7)).collect();
            let rhs = View {
                data: &rhs,
                rows: k,
                cols: n,
                row_stride: 1,
                col_stride: k,
            };
            let lhs = View {
                data: &lhs,
                rows: m,
                cols: k,
                row_stride: k,
                col_stride: 1,
            };
            let stride = n + 3;
            for (accumulate, threads) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
                let mut dst = vec![0.5f32; m * stride];
                matmul(&mut dst, stride, lhs, rhs, accumulate, threads);
                for i in 0..m {
                    for j in 0..stride {
                        let got = dst[i * stride + j];
                        if j >= n {
                            assert_eq!(got, 0.5, "({m},{n},{k}): a padding column was written");
                            continue;
                        }
                        let sum: f64 = (0..k)
                            .map(|p| {
                                f64::from(lhs.data[i * k + p]) * f64::from(rhs.data[j * k + p])
                            })
                            .sum();
                        let want = sum + if accumulate { 0.5 } else { 0.0 };
                        assert!(
                            (f64::from(got) - want).abs() <= 1e-5 * (k as f64).sqrt() * 4.0,
                            "({m},{n},{k}) acc {accumulate} threads {threads} [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
