//! AVX2 + FMA versions of the kernels' hottest row loops, taken at run time when the CPU has
//! both (a leaf: it imports only [`math`](super::math)'s constants and scalar functions).
//!
//! The crate is built for the baseline x86-64 target (SSE2), so the scalar loops of the
//! kernels vectorise 4 wide without fused multiply-adds; the softmax of the attention scores,
//! the GEGLU gate and GroupNorm's SiLU were the largest items of a tiny-width profile after
//! the matrix products (8, 9 and 9 % of a real request). Here the same algorithms (the same
//! range reduction and polynomials as [`math`](super::math)'s `exp` and `erf`) run 8 wide
//! with FMA; a row's tail of fewer than 8 elements takes the scalar functions. The softmax
//! row maximum is a vector maximum (the scalar fold is a serial dependency chain the
//! compiler may not reorder).
//!
//! It also holds the direct convolution's AVX-512 tile ([`conv_tile`]: 64 output positions
//! × up to 6 output channels in 24 accumulators) and the narrow products' row dots
//! ([`dot_rows`]: 4 rows of a weight against up to 4 positions in 16 accumulators), taken
//! when the CPU has AVX-512F.
//!
//! The one other module with `unsafe` code besides the checked matrix product: the
//! intrinsics need the CPU features, which [`available`] and [`avx512_available`] check
//! once, and the loads and stores take pointers, each within a slice.
#![allow(unsafe_code)]

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::math::{
    exp, gelu_erf, silu, ERF_P, ERF_POLY, EXP_HIGH, EXP_LOW, EXP_POLY, LN2_HI, LN2_LO,
};

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

/// `dst[i] = x[i] · gelu(gate[i])` (the exact, erf GELU), 8 wide; `false` (and `dst`
/// untouched) when the CPU lacks AVX2 or FMA. The three slices have one length.
pub(super) fn geglu_row(dst: &mut [f32], x: &[f32], gate: &[f32]) -> bool {
    if !available() {
        return false;
    }
    assert!(dst.len() == x.len() && x.len() == gate.len());
    // SAFETY: the CPU has AVX2 and FMA (checked just above).
    unsafe { geglu_avx2(dst, x, gate) };
    true
}

/// `dst[i] = (src[i] − mean)·scale + shift`, followed by SiLU when `silu` (GroupNorm's write
/// of one channel), 8 wide; `false` (and `dst` untouched) when the CPU lacks AVX2 or FMA.
pub(super) fn normalise_row(
    dst: &mut [f32],
    src: &[f32],
    mean: f32,
    scale: f32,
    shift: f32,
    with_silu: bool,
) -> bool {
    if !available() {
        return false;
    }
    assert_eq!(dst.len(), src.len());
    // SAFETY: the CPU has AVX2 and FMA (checked just above).
    unsafe { normalise_avx2(dst, src, [mean, scale, shift], with_silu) };
    true
}

#[target_feature(enable = "avx2,fma")]
unsafe fn geglu_avx2(dst: &mut [f32], x: &[f32], gate: &[f32]) {
    let mut d = dst.chunks_exact_mut(LANES);
    let mut xs = x.chunks_exact(LANES);
    let mut gs = gate.chunks_exact(LANES);
    for ((d, x), g) in (&mut d).zip(&mut xs).zip(&mut gs) {
        // SAFETY: each chunk holds 8 f32.
        unsafe {
            let v = _mm256_mul_ps(
                _mm256_loadu_ps(x.as_ptr()),
                gelu8(_mm256_loadu_ps(g.as_ptr())),
            );
            _mm256_storeu_ps(d.as_mut_ptr(), v);
        }
    }
    let tails = d
        .into_remainder()
        .iter_mut()
        .zip(xs.remainder())
        .zip(gs.remainder());
    for ((d, &x), &g) in tails {
        *d = x * gelu_erf(g);
    }
}

/// `dst[i] = gelu(x[i])` (the exact, erf GELU), 8 wide; `false` (and `dst` untouched) when
/// the CPU lacks AVX2 or FMA. The slices have one length.
pub(super) fn gelu_row(dst: &mut [f32], x: &[f32]) -> bool {
    if !available() {
        return false;
    }
    assert_eq!(dst.len(), x.len());
    // SAFETY: the CPU has AVX2 and FMA (checked just above).
    unsafe { gelu_avx2(dst, x) };
    true
}

#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_avx2(dst: &mut [f32], x: &[f32]) {
    let mut d = dst.chunks_exact_mut(LANES);
    let mut xs = x.chunks_exact(LANES);
    for (d, x) in (&mut d).zip(&mut xs) {
        // SAFETY: each chunk holds 8 f32.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), gelu8(_mm256_loadu_ps(x.as_ptr()))) };
    }
    for (d, &x) in d.into_remainder().iter_mut().zip(xs.remainder()) {
        *d = gelu_erf(x);
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn normalise_avx2(
    dst: &mut [f32],
    src: &[f32],
    [mean, scale, shift]: [f32; 3],
    with_silu: bool,
) {
    let (vm, va, vb) = (
        _mm256_set1_ps(mean),
        _mm256_set1_ps(scale),
        _mm256_set1_ps(shift),
    );
    let mut d = dst.chunks_exact_mut(LANES);
    let mut s = src.chunks_exact(LANES);
    for (d, s) in (&mut d).zip(&mut s) {
        // SAFETY: each chunk holds 8 f32.
        unsafe {
            let y = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(s.as_ptr()), vm), va, vb);
            let y = if with_silu { silu8(y) } else { y };
            _mm256_storeu_ps(d.as_mut_ptr(), y);
        }
    }
    for (d, &x) in d.into_remainder().iter_mut().zip(s.remainder()) {
        let y = (x - mean) * scale + shift;
        *d = if with_silu { silu(y) } else { y };
    }
}

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

/// `x·σ(x) = x / (1 + e^{−x})` in 8 lanes.
#[target_feature(enable = "avx2,fma")]
fn silu8(x: __m256) -> __m256 {
    let neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp8(neg)))
}

/// The exact GELU `x/2·(1 + erf(x/√2))` in 8 lanes, with [`math`](super::math)'s `erf`
/// (Abramowitz & Stegun 7.1.26).
#[target_feature(enable = "avx2,fma")]
fn gelu8(x: __m256) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
    let a = _mm256_andnot_ps(sign, z);
    let one = _mm256_set1_ps(1.0);
    let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), a, one));
    let mut poly = _mm256_set1_ps(ERF_POLY[0]);
    for &c in &ERF_POLY[1..] {
        poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(c));
    }
    let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    // 1 − poly·t·e^{−a²}, the sign of z restored
    let y = _mm256_fnmadd_ps(_mm256_mul_ps(poly, t), e, one);
    let erf = _mm256_or_ps(y, _mm256_and_ps(sign, z));
    _mm256_mul_ps(
        _mm256_mul_ps(_mm256_set1_ps(0.5), x),
        _mm256_add_ps(one, erf),
    )
}

/// Whether this CPU runs the AVX-512 convolution tile (checked once).
pub(super) fn avx512_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx512f"))
}

/// Grid positions (four vectors of 16) and most output channels of one convolution tile.
pub(super) const TILE_POSITIONS: usize = 64;
pub(super) const TILE_CHANNELS: usize = 6;

/// What the convolution tiles of one band read: zero-padded input planes `plane` apart,
/// where kernel tap `t` of grid position `q` reads `q + offsets[t]` of each; and the weight
/// rows (`[c_in, taps]` each, `weight_row` apart) from the tiles' first output channel on.
pub(super) struct TileInput<'a> {
    pub(super) input: &'a [f32],
    pub(super) plane: usize,
    pub(super) offsets: &'a [usize],
    pub(super) weight: &'a [f32],
    pub(super) weight_row: usize,
}

/// For grid positions `at..at + 64` and `rows` (1 to 6) output channels `r`:
/// `dst[r·dst_row + q − at] (+)= Σ_{ci ∈ channels, t} weight[r][ci][t] · input[ci][q +
/// offsets[t]]`, summed in AVX-512 registers from `start[r]` (the bias; zero when `None`)
/// when `first`, else from what `dst` holds.
///
/// # Panics
/// When the CPU lacks AVX-512F (callers check [`avx512_available`]), a read or write would
/// leave its slice, or `rows` is not 1 to 6.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_tile(
    src: &TileInput<'_>,
    at: usize,
    channels: std::ops::Range<usize>,
    dst: &mut [f32],
    dst_row: usize,
    rows: usize,
    start: Option<&[f32]>,
    first: bool,
) {
    assert!(avx512_available(), "conv_tile: the CPU lacks AVX-512F");
    let taps = src.offsets.len();
    assert!(
        (1..=TILE_CHANNELS).contains(&rows),
        "conv_tile: {rows} rows"
    );
    assert!(
        start.is_none_or(|b| b.len() >= rows),
        "conv_tile: short bias"
    );
    assert!(
        (rows - 1) * dst_row + TILE_POSITIONS <= dst.len(),
        "conv_tile: the output reaches past its slice"
    );
    if let Some(last_ci) = channels.clone().last() {
        let reach = src.offsets.iter().max().copied().unwrap_or(0);
        assert!(
            last_ci * src.plane + at + reach + TILE_POSITIONS <= src.input.len(),
            "conv_tile: the input reaches past its slice"
        );
        assert!(
            (rows - 1) * src.weight_row + (last_ci + 1) * taps <= src.weight.len(),
            "conv_tile: the weight reaches past its slice"
        );
    }
    // SAFETY: the CPU has AVX-512F, and every index the tile reads or writes lies within
    // the bounds asserted above.
    unsafe {
        match rows {
            6 => conv_tile_avx512::<6>(src, at, channels, dst, dst_row, start, first),
            5 => conv_tile_avx512::<5>(src, at, channels, dst, dst_row, start, first),
            4 => conv_tile_avx512::<4>(src, at, channels, dst, dst_row, start, first),
            3 => conv_tile_avx512::<3>(src, at, channels, dst, dst_row, start, first),
            2 => conv_tile_avx512::<2>(src, at, channels, dst, dst_row, start, first),
            _ => conv_tile_avx512::<1>(src, at, channels, dst, dst_row, start, first),
        }
    }
}

/// [`conv_tile`] for `R` rows: 4·R accumulators, four input vectors and one broadcast
/// weight in 29 of the 32 vector registers.
#[target_feature(enable = "avx512f")]
unsafe fn conv_tile_avx512<const R: usize>(
    src: &TileInput<'_>,
    at: usize,
    channels: std::ops::Range<usize>,
    dst: &mut [f32],
    dst_row: usize,
    start: Option<&[f32]>,
    first: bool,
) {
    const V: usize = TILE_POSITIONS / 16;
    let taps = src.offsets.len();
    let d = dst.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    for (r, acc) in acc.iter_mut().enumerate() {
        for (v, acc) in acc.iter_mut().enumerate() {
            // SAFETY (this and every pointer access below): within the bounds the caller
            // asserted.
            *acc = match (first, start) {
                (true, Some(b)) => _mm512_set1_ps(b[r]),
                (true, None) => _mm512_setzero_ps(),
                (false, _) => unsafe { _mm512_loadu_ps(d.add(r * dst_row + 16 * v)) },
            };
        }
    }
    let (input, weight) = (unsafe { src.input.as_ptr().add(at) }, src.weight.as_ptr());
    for ci in channels {
        let base = unsafe { input.add(ci * src.plane) };
        let w = unsafe { weight.add(ci * taps) };
        for (t, &offset) in src.offsets.iter().enumerate() {
            let b = unsafe { base.add(offset) };
            let mut x = [_mm512_setzero_ps(); V];
            for (v, x) in x.iter_mut().enumerate() {
                *x = unsafe { _mm512_loadu_ps(b.add(16 * v)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(unsafe { *w.add(r * src.weight_row + t) });
                for (acc, &x) in acc.iter_mut().zip(&x) {
                    *acc = _mm512_fmadd_ps(x, wv, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (v, &acc) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(d.add(r * dst_row + 16 * v), acc) };
        }
    }
}

/// Rows of `a` dotted with a few rows of `b`, for products whose other side is narrow (a
/// weight times a handful of positions).
///
/// `out[r·n + j] = Σ_i a[r·k + i] · b[j·k + i]` for every row `r` of `a` (`a.len() / k`
/// rows) and `j < n` (`b` holds `n` rows of `k`), summed in AVX-512 registers: four rows of
/// `a` against up to four of `b` at a time (16 accumulators), each row of `a` read once
/// per four rows of `b`. Each sum runs in one fixed order, whatever the thread.
///
/// # Panics
/// When the CPU lacks AVX-512F (callers check [`avx512_available`]) or the slices do not
/// hold `rows × k`, `n × k` and `rows × n` values.
pub(super) fn dot_rows(a: &[f32], b: &[f32], k: usize, n: usize, out: &mut [f32]) {
    assert!(avx512_available(), "dot_rows: the CPU lacks AVX-512F");
    assert!(k > 0 && a.len().is_multiple_of(k), "dot_rows: ragged rows");
    let rows = a.len() / k;
    assert_eq!(b.len(), n * k, "dot_rows: b is not n × k");
    assert_eq!(out.len(), rows * n, "dot_rows: out is not rows × n");
    for r0 in (0..rows).step_by(4) {
        let r = (rows - r0).min(4);
        for j0 in (0..n).step_by(4) {
            let c = (n - j0).min(4);
            let mut sums = [[0f32; 4]; 4];
            let a = &a[r0 * k..(r0 + r) * k];
            let b = &b[j0 * k..(j0 + c) * k];
            // SAFETY: the CPU has AVX-512F; `a` holds `r` rows and `b` `c` rows of `k`
            // (sliced just above), which is all the tile reads.
            macro_rules! tiles {
                ($(($rr:literal, $cc:literal)),*) => {
                    match (r, c) {
                        $(($rr, $cc) => unsafe { dot_tile::<$rr, $cc>(a, b, k, &mut sums) },)*
                        _ => unreachable!("dot_rows: a tile of {r}x{c}"),
                    }
                };
            }
            tiles!(
                (4, 4),
                (4, 3),
                (4, 2),
                (4, 1),
                (3, 4),
                (3, 3),
                (3, 2),
                (3, 1),
                (2, 4),
                (2, 3),
                (2, 2),
                (2, 1),
                (1, 4),
                (1, 3),
                (1, 2),
                (1, 1)
            );
            for (ri, row) in sums.iter().enumerate().take(r) {
                out[(r0 + ri) * n + j0..][..c].copy_from_slice(&row[..c]);
            }
        }
    }
}

/// [`dot_rows`] for `R` rows of `a` against `C` rows of `b` (`R·C` accumulators), the
/// last `k mod 16` elements through masked loads.
#[target_feature(enable = "avx512f")]
unsafe fn dot_tile<const R: usize, const C: usize>(
    a: &[f32],
    b: &[f32],
    k: usize,
    sums: &mut [[f32; 4]; 4],
) {
    let mut acc = [[_mm512_setzero_ps(); C]; R];
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let full = k / 16 * 16;
    let mut i = 0;
    while i < full {
        let mut bv = [_mm512_setzero_ps(); C];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: row `j` of `b` holds `k` values and `i + 16 <= k`.
            *v = unsafe { _mm512_loadu_ps(pb.add(j * k + i)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row `r` of `a` holds `k` values and `i + 16 <= k`.
            let av = unsafe { _mm512_loadu_ps(pa.add(r * k + i)) };
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(av, bv, *acc);
            }
        }
        i += 16;
    }
    if full < k {
        let mask: __mmask16 = (1u32 << (k - full)).wrapping_sub(1) as __mmask16;
        let mut bv = [_mm512_setzero_ps(); C];
        for (j, v) in bv.iter_mut().enumerate() {
            // SAFETY: the mask covers the `k - full` values left in row `j` of `b`.
            *v = unsafe { _mm512_maskz_loadu_ps(mask, pb.add(j * k + full)) };
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the mask covers the values left in row `r` of `a`.
            let av = unsafe { _mm512_maskz_loadu_ps(mask, pa.add(r * k + full)) };
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_fmadd_ps(av, bv, *acc);
            }
        }
    }
    for (sums, acc) in sums.iter_mut().zip(&acc) {
        for (s, &acc) in sums.iter_mut().zip(acc) {
            *s = _mm512_reduce_add_ps(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs over `[-lo, hi]` of every length 0..=19 (so every tail length), checked
    /// element-wise against the scalar functions.
    fn rows() -> Vec<Vec<f32>> {
        (0..=19)
            .map(|n| {
                (0..n)
                    .map(|i| -12.0 + 24.0 * (i as f32 * 0.618_034).fract())
                    .collect()
            })
            .chain([(0..20_000)
                .map(|i| -30.0 + 60.0 * i as f32 / 20_000.0)
                .collect()])
            .collect()
    }

    #[test]
    fn the_avx2_rows_match_the_scalar_functions() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX2 + FMA");
            return;
        }
        let (mut geglu_err, mut norm_err) = (0f32, 0f32);
        for g in rows() {
            let x: Vec<f32> = g.iter().map(|v| 0.5 - v * 0.25).collect();
            let mut out = vec![f32::NAN; g.len()];
            assert!(geglu_row(&mut out, &x, &g));
            for ((&o, &x), &g) in out.iter().zip(&x).zip(&g) {
                let want = x * gelu_erf(g);
                geglu_err = geglu_err.max((o - want).abs() / want.abs().max(1.0));
            }
            for with_silu in [false, true] {
                let mut out = vec![f32::NAN; g.len()];
                assert!(normalise_row(&mut out, &g, 0.75, 1.5, -0.25, with_silu));
                for (&o, &v) in out.iter().zip(&g) {
                    let y = (v - 0.75) * 1.5 - 0.25;
                    let want = if with_silu { silu(y) } else { y };
                    norm_err = norm_err.max((o - want).abs() / want.abs().max(1.0));
                }
            }
        }
        // NaN (an unwritten element) fails both.
        assert!(geglu_err < 1e-6, "geglu: worst error {geglu_err:e}");
        assert!(norm_err < 1e-6, "normalise: worst error {norm_err:e}");
    }
}
