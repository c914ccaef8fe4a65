//! The convolution kernels' scratch buffers, kept from call to call (a leaf: it imports
//! nothing of the crate).
//!
//! A Winograd convolution transforms its weight into a buffer 16/9 of the weight's size
//! (16 MB at 512 channels) and its input bands into a few MB more; the other convolutions
//! fill patch matrices and padded copies. Fresh on every call, each such buffer was zeroed by
//! the allocator and its pages faulted in before being overwritten in full (`memset` alone
//! 5.7 % of a 64² VAE decode, perf). A [`Buffer`] takes its storage from a process-wide pool
//! and gives it back when dropped; its values are whatever the last user left.

use std::sync::{Mutex, PoisonError};

/// Storages kept at most (the largest are dropped first when more come back).
const KEEP: usize = 8;

static FREE: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A scratch buffer whose storage comes from the pool and goes back to it when dropped.
/// Its values are unspecified (left from an earlier use, or zero): its user writes every
/// element before reading it.
#[derive(Default)]
pub(super) struct Buffer {
    buf: Vec<f32>,
}

impl Buffer {
    /// Its first `len` values; when it holds fewer, its storage is exchanged for the
    /// smallest pooled one that holds them, else the largest, grown (new elements zero).
    pub(super) fn at_least(&mut self, len: usize) -> &mut [f32] {
        if self.buf.len() < len {
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
            give_back(std::mem::replace(&mut self.buf, buf));
        }
        &mut self.buf[..len]
    }
}

/// Every value the buffer holds (at least the last `at_least` length).
impl std::ops::Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.buf));
    }
}

/// `buf` into the pool (nothing for an empty one).
fn give_back(buf: Vec<f32>) {
    if buf.is_empty() {
        return;
    }
    let mut free = FREE.lock().unwrap_or_else(PoisonError::into_inner);
    free.push(buf);
    if free.len() > KEEP {
        if let Some(i) = (0..free.len()).max_by_key(|&i| free[i].len()) {
            free.swap_remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_grow_to_the_asked_length_and_zero_only_what_is_new() {
        let mut a = Buffer::default();
        assert_eq!(a.at_least(1000).len(), 1000);
        a.at_least(1000).fill(7.0);
        // a shorter request keeps the storage and its values
        assert!(a.at_least(10).iter().all(|&v| v == 7.0));
        drop(a);
        // a longer one takes other storage (pooled, or new with zeros) of that length
        let mut c = Buffer::default();
        assert_eq!(c.at_least(3000).len(), 3000);
        assert!(c.len() >= 3000);
    }
}
