//! A 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): every 2×2 block of outputs
//! is `Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A` for its 4×4 input block `d`, so the sums over the input
//! channels become 16 matrix products (one per element of the 4×4 transformed blocks) with
//! 16 multiplications per output block and channel pair instead of 36: 2.25× fewer.
//!
//! The input arrives zero-padded (the caller's copy, as for the direct convolution). Per
//! band of block rows: the input blocks are transformed (`[c_in][16][blocks]`), the 16
//! products `U[e] · V[e]` go through the checked `gemm` product into `[c_out][16][blocks]`,
//! and the output transform writes each 2×2 block with its bias. The weight is transformed
//! once per call (`[c_out][16][c_in]`); it and the bands live in buffers of [`super::pool`],
//! reused from call to call without zeroing.

use super::chunks::for_each_chunk;
use super::matmul::{matmul, View};
use super::pool::Buffer;

/// Transformed input elements per band and per element of the 4×4 block, about (whole
/// block rows).
const BAND_ELEMS: usize = 64 << 10;

/// Transformed elements per block (4×4).
const E: usize = 16;

/// Fewest outputs per image for which the transforms pay (16 × 16).
const MIN_OUTPUTS: usize = 256;

/// Fewest input and output channels for which the transforms pay (the VAE's 128 → 3
/// `conv_out` takes 2.6× the direct convolution's time, and a 16-channel VAE decodes
/// slower this way).
const MIN_CHANNELS: (usize, usize) = (32, 32);

/// One convolution: its channels, output size (even), transformed weight
/// (`[c_out][16][c_in]`), bias.
pub(super) struct Winograd<'a> {
    c_in: usize,
    c_out: usize,
    out_size: (usize, usize),
    u: Buffer,
    bias: Option<&'a [f32]>,
}

impl<'a> Winograd<'a> {
    /// The Winograd convolution of a weight shaped `[c_out, c_in, kh, kw]` with outputs
    /// `out_size`, when it applies and pays: a 3×3 kernel, stride 1, an even output size of
    /// at least 16 × 16 and at least 32 input and output channels. The weight is transformed
    /// here, once for every image of the call (split over `threads`).
    pub(super) fn new(
        [c_out, c_in, k_h, k_w]: [usize; 4],
        stride: usize,
        out_size: (usize, usize),
        weight: &[f32],
        bias: Option<&'a [f32]>,
        threads: usize,
    ) -> Option<Self> {
        let (oh, ow) = out_size;
        let fits = (k_h, k_w, stride) == (3, 3, 1)
            && oh % 2 == 0
            && ow % 2 == 0
            && oh * ow >= MIN_OUTPUTS
            && c_in >= MIN_CHANNELS.0
            && c_out >= MIN_CHANNELS.1;
        fits.then(|| Self {
            c_in,
            c_out,
            out_size,
            u: weight_transform(weight, c_out, c_in, threads),
            bias,
        })
    }

    /// `dst` (`[c_out, oh·ow]`) from `padded` (`c_in` planes `plane` apart, rows `wp` long,
    /// the 3×3 window of output `(y, x)` starting at row `y`, column `x`).
    pub(super) fn image(
        &self,
        padded: &[f32],
        plane: usize,
        wp: usize,
        dst: &mut [f32],
        threads: usize,
    ) {
        let (oh, ow) = self.out_size;
        let (bh, bw) = (oh / 2, ow / 2);
        // Bands whose transformed input per element (`c_in × blocks`) is 256 KiB: one
        // product's right factor and result stay in L2.
        let blocks_per_band = (BAND_ELEMS / self.c_in).clamp(64, 1024);
        let rows_per_band = (blocks_per_band / bw).clamp(1, bh);
        // every element of both is written before it is read
        let mut v_buf = Buffer::default();
        let mut m_buf = Buffer::default();
        for by0 in (0..bh).step_by(rows_per_band) {
            let by1 = (by0 + rows_per_band).min(bh);
            let blocks = (by1 - by0) * bw;
            // 1. Input blocks, transformed: [c_in][16][blocks].
            let v = v_buf.at_least(self.c_in * E * blocks);
            let fill = |ci: usize, v: &mut [f32]| {
                input_transform(&padded[ci * plane..(ci + 1) * plane], wp, by0..by1, bw, v)
            };
            for_each_chunk(v, E * blocks, threads, fill);
            let v = &*v;
            // 2. The 16 products: [c_out][16][blocks].
            let m = m_buf.at_least(self.c_out * E * blocks);
            for e in 0..E {
                let lhs = View {
                    data: &self.u[e * self.c_in..],
                    rows: self.c_out,
                    cols: self.c_in,
                    row_stride: E * self.c_in,
                    col_stride: 1,
                };
                let rhs = View {
                    data: &v[e * blocks..],
                    rows: self.c_in,
                    cols: blocks,
                    row_stride: E * blocks,
                    col_stride: 1,
                };
                matmul(&mut m[e * blocks..], E * blocks, lhs, rhs, false, threads);
            }
            let m = &*m;
            // 3. Output blocks with the bias.
            let write = |co: usize, out: &mut [f32]| {
                let bias = self.bias.map_or(0.0, |b| b[co]);
                output_transform(
                    &m[co * E * blocks..][..E * blocks],
                    by0..by1,
                    bw,
                    ow,
                    bias,
                    out,
                );
            };
            for_each_chunk(dst, oh * ow, threads, write);
        }
    }
}

/// `G g Gᵀ` of every 3×3 kernel of `weight` (`[c_out, c_in, 3, 3]`), `[c_out][16][c_in]`,
/// in a pooled buffer (every element written).
fn weight_transform(weight: &[f32], c_out: usize, c_in: usize, threads: usize) -> Buffer {
    let mut u = Buffer::default();
    let fill = |co: usize, u: &mut [f32]| {
        for ci in 0..c_in {
            let g = &weight[(co * c_in + ci) * 9..][..9];
            // t = G g (4×3), then t Gᵀ (4×4).
            let mut t = [[0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            for (a, t) in t.iter().enumerate() {
                let row = [
                    t[0],
                    0.5 * (t[0] + t[1] + t[2]),
                    0.5 * (t[0] - t[1] + t[2]),
                    t[2],
                ];
                for (b, &x) in row.iter().enumerate() {
                    u[(4 * a + b) * c_in + ci] = x;
                }
            }
        }
    };
    for_each_chunk(u.at_least(c_out * E * c_in), E * c_in, threads, fill);
    u
}

/// `Bᵀ d B` of the 4×4 input blocks of block rows `rows` (`bw` blocks each) of one padded
/// plane, into `v` (`[16][blocks]`).
///
/// Block `k` reads columns `2k..2k + 4` of its four rows: the even and odd columns of each
/// row are split out once, so every step below runs over `k` with unit strides.
fn input_transform(
    plane: &[f32],
    wp: usize,
    rows: std::ops::Range<usize>,
    bw: usize,
    v: &mut [f32],
) {
    let blocks = v.len() / E;
    let first = rows.start;
    let n = bw + 1;
    // even[i·n + k] = row i's column 2k, odd[i·n + k] its column 2k + 1
    let mut split = vec![0f32; 8 * n];
    let (even, odd) = split.split_at_mut(4 * n);
    for by in rows {
        let at = (by - first) * bw;
        for i in 0..4 {
            let row = &plane[(2 * by + i) * wp..][..2 * n];
            let (e, o) = (&mut even[i * n..][..n], &mut odd[i * n..][..n]);
            for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(row.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
        }
        for b in 0..4 {
            // Column b of `d B`, row i: x + sign·y, from a row's (x0, x1, x2, x3) = (even[k],
            // odd[k], even[k + 1], odd[k + 1]): (x0 − x2, x1 + x2, x2 − x1, x1 − x3).
            let sign = if b == 1 { 1.0 } else { -1.0 };
            let [(x0, y0), (x1, y1), (x2, y2), (x3, y3)]: [(&[f32], &[f32]); 4] =
                std::array::from_fn(|i| {
                    let (e0, e1) = (&even[i * n..][..bw], &even[i * n + 1..][..bw]);
                    let (o0, o1) = (&odd[i * n..][..bw], &odd[i * n + 1..][..bw]);
                    match b {
                        0 => (e0, e1),
                        1 => (o0, e1),
                        2 => (e1, o0),
                        _ => (o0, o1),
                    }
                });
            // Bᵀ over the rows: (d0 − d2, d1 + d2, d2 − d1, d1 − d3), elements 4a + b.
            let [v0, v1, v2, v3] = four_rows(v, b, blocks, at, bw);
            for k in 0..bw {
                let d0 = x0[k] + sign * y0[k];
                let d1 = x1[k] + sign * y1[k];
                let d2 = x2[k] + sign * y2[k];
                let d3 = x3[k] + sign * y3[k];
                v0[k] = d0 - d2;
                v1[k] = d1 + d2;
                v2[k] = d2 - d1;
                v3[k] = d1 - d3;
            }
        }
    }
}

/// The `bw`-long runs at `at` of elements `b`, `4 + b`, `8 + b` and `12 + b` of `v`
/// (`[16][blocks]`).
fn four_rows(v: &mut [f32], b: usize, blocks: usize, at: usize, bw: usize) -> [&mut [f32]; 4] {
    let (r0, rest) = v[b * blocks..].split_at_mut(4 * blocks);
    let (r1, rest) = rest.split_at_mut(4 * blocks);
    let (r2, r3) = rest.split_at_mut(4 * blocks);
    [
        &mut r0[at..at + bw],
        &mut r1[at..at + bw],
        &mut r2[at..at + bw],
        &mut r3[at..at + bw],
    ]
}

/// `Aᵀ m A` of the products of block rows `rows` (`bw` blocks each) of one output channel
/// (`m`: `[16][blocks]`), plus `bias`, into its `oh·ow` plane `out`, over `bx` with unit
/// strides as the input transform.
fn output_transform(
    m: &[f32],
    rows: std::ops::Range<usize>,
    bw: usize,
    ow: usize,
    bias: f32,
    out: &mut [f32],
) {
    let blocks = m.len() / E;
    let first = rows.start;
    // Aᵀ over the block's rows: s[i·4 + b][k] for output row i of the block, column b.
    let mut s = vec![0f32; 8 * bw];
    for by in rows {
        let at = (by - first) * bw;
        let p = |e: usize| &m[e * blocks + at..][..bw];
        let (s_top, s_bottom) = s.split_at_mut(4 * bw);
        let columns = s_top
            .chunks_exact_mut(bw)
            .zip(s_bottom.chunks_exact_mut(bw));
        for (b, (s0, s1)) in columns.enumerate() {
            let ins = p(b).iter().zip(p(4 + b)).zip(p(8 + b)).zip(p(12 + b));
            for ((s0, s1), (((&p0, &p1), &p2), &p3)) in s0.iter_mut().zip(s1.iter_mut()).zip(ins) {
                *s0 = p0 + p1 + p2;
                *s1 = p1 - p2 - p3;
            }
        }
        // ... then over its columns, two outputs per block and row.
        let (top, bottom) = out[2 * by * ow..][..2 * ow].split_at_mut(ow);
        for (i, dst) in [top, bottom].into_iter().enumerate() {
            let [r0, r1, r2, r3]: [&[f32]; 4] =
                std::array::from_fn(|b| &s[(4 * i + b) * bw..][..bw]);
            let ins = r0.iter().zip(r1).zip(r2).zip(r3);
            for (pair, (((&c0, &c1), &c2), &c3)) in dst.chunks_exact_mut(2).zip(ins) {
                pair[0] = c0 + c1 + c2 + bias;
                pair[1] = c1 - c2 - c3 + bias;
            }
        }
    }
}
