//! Work over the fixed-length chunks of a buffer, on rayon's pool or on the calling thread (a
//! leaf: it imports nothing of the crate).

use rayon::prelude::*;

/// `f(i, chunk)` for every `len`-long chunk `i` of `buf` (the last may be shorter), on
/// rayon's pool when `threads` > 1, else in order on this thread.
pub(super) fn for_each_chunk(
    buf: &mut [f32],
    len: usize,
    threads: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) {
    if threads > 1 {
        buf.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, chunk)| f(i, chunk));
    } else {
        for (i, chunk) in buf.chunks_mut(len).enumerate() {
            f(i, chunk);
        }
    }
}
