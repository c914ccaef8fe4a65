//! The input check every CPU kernel starts with (a leaf: it imports nothing of the crate).

use candle_core::{CpuStorage, Layout, Result};

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
