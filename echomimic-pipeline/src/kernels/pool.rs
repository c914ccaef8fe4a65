//! Large scratch buffers kept from call to call (a leaf: it imports nothing of the crate).
//!
//! A Winograd convolution transforms its weight into a buffer 16/9 of the weight's size
//! (16 MB at 512 channels) and its input bands into a few MB more, on every call. Fresh
//! each time, every such buffer was zeroed by the allocator before being overwritten in
//! full, and its pages faulted in: a tenth of a 64² VAE decode (perf). Buffers returned
//! here are handed out again with whatever values they hold.

use std::sync::{Mutex, PoisonError};

/// Buffers kept at most (the largest are dropped first when more come back).
const KEEP: usize = 8;

static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values taken from the pool; its values are unspecified (left from an
/// earlier use, or zero), so its user writes every element before reading it. It goes back
/// to the pool when dropped.
pub(super) struct Scratch {
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    /// A buffer of `len` values: the smallest free one that holds them, else the largest,
    /// grown (new elements zero), else a new one.
    pub(super) fn take(len: usize) -> Self {
        let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
        let fits = (0..free.len())
            .filter(|&i| free[i].len() >= len)
            .min_by_key(|&i| free[i].len());
        let largest = (0..free.len()).max_by_key(|&i| free[i].len());
        let mut buf = fits
            .or(largest)
            .map_or_else(Vec::new, |i| free.swap_remove(i));
        drop(free);
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Self { buf, len }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
        free.push(std::mem::take(&mut self.buf));
        if free.len() > KEEP {
            if let Some(i) = (0..free.len()).max_by_key(|&i| free[i].len()) {
                free.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_with_their_values_and_the_asked_length() {
        let mut a = Scratch::take(1000);
        assert_eq!(a.len(), 1000);
        a.fill(7.0);
        drop(a);
        // another test may take it in between; when this one gets it back, it is unzeroed
        let b = Scratch::take(10);
        assert_eq!(b.len(), 10);
        let c = Scratch::take(3000);
        assert_eq!(c.len(), 3000);
        assert!(
            c[1000..].iter().all(|&v| v == 0.0),
            "grown elements are zero"
        );
    }
}
