//! `exp` and `erf` for f32 without branches or library calls, so that the loops of the
//! kernels that use them compile to SIMD instructions (glibc's `expf` and the `libm` crate's
//! `erff` are called once per element: 9 % and 5 % of a tiny-width denoising call). A leaf:
//! it imports nothing of the crate.
//!
//! * [`exp`]: range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, and the degree-7 minimax
//!   polynomial of Cephes' `expf` for `e^r`, scaled by `2^n` through the exponent bits;
//!   relative error below 2e-7 (two ulps) on `[-87, 88]`; inputs outside are clamped there
//!   (`exp(-87) ≈ 1.6e-38`, `exp(88) ≈ 1.7e38`).
//! * [`erf`]: Abramowitz & Stegun 7.1.26, `1 − (a₁t + … + a₅t⁵)·e^{−x²}` with
//!   `t = 1 / (1 + p·|x|)`, the sign restored after: the formula's bound is 1.5e-7, its f32
//!   evaluation stays below 1e-6 absolute (tested against candle's f64 `erf`).

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in a part exact in f32 and the rest (Cody–Waite reduction).
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
/// The range [`exp`] clamps its input to.
pub(super) const EXP_LOW: f32 = -87.0;
pub(super) const EXP_HIGH: f32 = 88.0;
/// Coefficients of the polynomial `p(r)` with `e^r ≈ p(r)·r² + r + 1`, highest degree first.
pub(super) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `p` of Abramowitz & Stegun 7.1.26: `t = 1 / (1 + p·|x|)`.
pub(super) const ERF_P: f32 = 0.327_591_1;
/// `a₅ … a₁` of Abramowitz & Stegun 7.1.26, highest degree first: the polynomial is
/// `(((a₅t + a₄)t + a₃)t + a₂)t + a₁`, times `t`.
pub(super) const ERF_POLY: [f32; 5] = [
    1.061_405_4,
    -1.453_152_1,
    1.421_413_7,
    -0.284_496_74,
    0.254_829_6,
];

/// `e^x` (see the module docs for its accuracy).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_LOW, EXP_HIGH);
    // Round to nearest through a truncating conversion (vectorises without SSE4.1).
    let t = x * LOG2_E;
    let n = (t + 0.5f32.copysign(t)) as i32;
    let nf = n as f32;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let er = p * r * r + r + 1.0;
    // n is in [-126, 127]: 2^n is a normal f32.
    er * f32::from_bits(((n + 127) as u32) << 23)
}

/// The error function (see the module docs for its accuracy).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + ERF_P * a);
    let mut poly = ERF_POLY[0];
    for c in &ERF_POLY[1..] {
        poly = poly * t + c;
    }
    let y = 1.0 - poly * t * exp(-a * a);
    y.copysign(x)
}

/// The exact (erf) GELU, `x·Φ(x) = x/2·(1 + erf(x/√2))`.
#[inline(always)]
pub(crate) fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// SiLU, `x·σ(x) = x / (1 + e^{−x})`.
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::cpu::erf::erf_f64;

    /// Every 997th positive f32 bit pattern, with both signs, that lies in `[lo, hi]`, and
    /// the ends.
    fn sweep(lo: f32, hi: f32) -> Vec<f32> {
        let mut xs: Vec<f32> = (0..(1u32 << 31) / 997)
            .map(|i| f32::from_bits(i * 997))
            .flat_map(|x| [x, -x])
            .filter(|x| *x >= lo && *x <= hi)
            .collect();
        xs.extend([lo, hi]);
        assert!(xs.len() > 1_000_000, "{} points", xs.len());
        xs
    }

    #[test]
    fn exp_is_within_two_ulps_over_its_range() {
        let (mut worst, mut at) = (0f64, 0f32);
        for x in sweep(-87.0, 88.0) {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            // NaN counts as the worst
            if rel.is_nan() || rel > worst {
                (worst, at) = (rel, x);
            }
        }
        assert!(worst < 2.4e-7, "worst relative error {worst:e} at {at:e}");
        assert_eq!(exp(0.0), 1.0);
        // Clamped outside the range, never inf or NaN.
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 2e-38);
        assert!(exp(1000.0).is_finite());
        assert_eq!(exp(f32::NEG_INFINITY), exp(-87.0));
    }

    #[test]
    fn erf_gelu_and_silu_match_the_library_functions() {
        let (mut e, mut g, mut s) = (0f64, 0f64, 0f64);
        for x in sweep(-30.0, 30.0) {
            let xd = x as f64;
            e = e.max((erf(x) as f64 - erf_f64(xd)).abs());
            let gelu = 0.5 * xd * (1.0 + erf_f64(xd / std::f64::consts::SQRT_2));
            g = g.max((gelu_erf(x) as f64 - gelu).abs() / xd.abs().max(1.0));
            let sl = xd / (1.0 + (-xd).exp());
            s = s.max((silu(x) as f64 - sl).abs() / xd.abs().max(1.0));
        }
        assert!(e < 1e-6, "erf: worst absolute error {e:e}");
        assert!(g < 2e-7, "gelu: worst error {g:e} (relative above |x| = 1)");
        assert!(s < 3e-7, "silu: worst error {s:e} (relative above |x| = 1)");
        assert!(erf(0.0).abs() < 2e-7);
        assert_eq!(erf(-3.0), -erf(3.0));
    }
}
