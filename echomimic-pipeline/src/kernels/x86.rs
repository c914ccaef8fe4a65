//! AVX2 + FMA versions of the kernels' hottest row loops, taken at run time when the CPU has
//! both (a leaf: it imports only [`math`](super::math)'s constants and scalar `exp`).
//!
//! The crate is built for the baseline x86-64 target (SSE2), so the scalar loops of the
//! kernels vectorise 4 wide without fused multiply-adds; the softmax of the attention scores
//! was the largest single item of a tiny-width profile after the matrix products. Here the
//! same algorithm (the same range reduction and polynomial as [`math::exp`](super::math))
//! runs 8 wide with FMA. The row maximum is a vector maximum (the scalar fold is a serial
//! dependency chain the compiler may not reorder).
//!
//! The one other module with `unsafe` code besides the checked matrix product: the
//! intrinsics need the CPU features, which [`available`] checks once, and the loads and
//! stores take pointers, each within a slice.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::math::{exp, EXP_HIGH, EXP_LOW, EXP_POLY, LN2_HI, LN2_LO};

/// Whether this CPU runs the AVX2 + FMA loops (checked once).
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// `softmax(row · scale)` in place, 8 wide; `false` (and the row untouched) when the CPU
/// lacks AVX2 or FMA.
pub(super) fn softmax_in_place(row: &mut [f32], scale: f32) -> bool {
    if !available() {
        return false;
    }
    // SAFETY: the CPU has AVX2 and FMA (checked just above).
    unsafe { softmax_avx2(row, scale) };
    true
}

const LANES: usize = 8;

#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(row: &mut [f32], scale: f32) {
    let vscale = _mm256_set1_ps(scale);
    let split = row.len() / LANES * LANES;
    let (body, tail) = row.split_at_mut(split);
    // 1. the maximum of row · scale
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in body.chunks_exact(LANES) {
        // SAFETY: `c` holds 8 f32.
        let x = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        vmax = _mm256_max_ps(vmax, _mm256_mul_ps(x, vscale));
    }
    let mut max = horizontal(vmax, f32::max);
    for &x in tail.iter() {
        max = max.max(x * scale);
    }
    // 2. e^(x·scale − max), summed
    let vmax = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    for c in body.chunks_exact_mut(LANES) {
        // SAFETY: `c` holds 8 f32, read then written in place.
        unsafe {
            let x = _mm256_fmsub_ps(_mm256_loadu_ps(c.as_ptr()), vscale, vmax);
            let e = exp8(x);
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            vsum = _mm256_add_ps(vsum, e);
        }
    }
    let mut sum = horizontal(vsum, |a, b| a + b);
    for x in tail.iter_mut() {
        *x = exp(*x * scale - max);
        sum += *x;
    }
    // 3. normalise
    let inv = 1.0 / sum;
    let vinv = _mm256_set1_ps(inv);
    for c in body.chunks_exact_mut(LANES) {
        // SAFETY: `c` holds 8 f32.
        unsafe {
            _mm256_storeu_ps(
                c.as_mut_ptr(),
                _mm256_mul_ps(_mm256_loadu_ps(c.as_ptr()), vinv),
            )
        };
    }
    for x in tail.iter_mut() {
        *x *= inv;
    }
}

/// The 8 lanes of `v` folded with `f`.
#[target_feature(enable = "avx2,fma")]
fn horizontal(v: __m256, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.into_iter().reduce(f).unwrap_or(0.0)
}

/// `e^x` in 8 lanes: [`math::exp`](super::math)'s reduction and polynomial with fused
/// multiply-adds, rounding `x·log₂e` to nearest even.
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_LOW)),
        _mm256_set1_ps(EXP_HIGH),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // p·r² + r + 1
    let er = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n through the exponent bits; n is in [-126, 127]
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(er, _mm256_castsi256_ps(bits))
}
