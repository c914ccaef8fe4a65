//! A matrix product on strided views of slices, checked, for the kernels that multiply in
//! place (a leaf: it imports nothing of the crate).
//!
//! candle's `matmul` takes tensors: its result is a fresh zeroed buffer that the caller then
//! copies (and adds a bias to) where it belongs. `gemm` itself writes through any row and
//! column strides, so a kernel can have the product land in its output directly, added to
//! what is there (the bias). This wrapper checks that every element a product reads or writes
//! lies inside the slices it was given, which is what makes the call sound.
#![allow(unsafe_code)]

use gemm::Parallelism;

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
