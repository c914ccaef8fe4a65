//! The input check every CPU kernel starts with, and the row loop of the row-wise kernels
//! (a leaf: it imports nothing of the crate).

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Elements per parallel work item of [`map_rows`] at least (small tensors stay on one
/// thread).
const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// The f32 elements of a contiguous CPU input of the custom op `op`, or an error naming it.
pub(super) fn contiguous_f32<'a>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is implemented");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&data[start..end])
}

/// The f32 elements of a contiguous CPU tensor whose storage `guard` holds (from
/// `t.storage_and_layout()`), for a kernel that reads more tensors than its op's inputs.
pub(super) fn tensor_f32<'a>(t: &Tensor, guard: &'a Storage) -> Result<&'a [f32]> {
    let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
        (guard, t.layout().contiguous_offsets())
    else {
        candle_core::bail!(
            "CPU kernel: {:?} is not a contiguous f32 CPU tensor",
            t.shape()
        );
    };
    Ok(&data[start..end])
}

/// A fresh output of `input`'s size, each `width`-element row written by `row(out, in)`,
/// whole rows split over rayon's pool in pieces of at least 16 Ki elements.
pub(super) fn map_rows(
    input: &[f32],
    width: usize,
    row: impl Fn(&mut [f32], &[f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    if width == 0 || input.is_empty() {
        return out;
    }
    let piece = (MIN_ELEMS_PER_TASK / width).max(1) * width;
    out.par_chunks_mut(piece)
        .zip(input.par_chunks(piece))
        .for_each(|(dst, src)| {
            for (d, s) in dst.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
                row(d, s);
            }
        });
    out
}
