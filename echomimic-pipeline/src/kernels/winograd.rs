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
//! once per call (`[c_out][16][c_in]`).

use super::chunks::for_each_chunk;
use super::matmul::{matmul, View};

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
    u: Vec<f32>,
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
        let mut v = Vec::new();
        let mut m = Vec::new();
        for by0 in (0..bh).step_by(rows_per_band) {
            let by1 = (by0 + rows_per_band).min(bh);
            let blocks = (by1 - by0) * bw;
            // 1. Input blocks, transformed: [c_in][16][blocks].
            v.resize(self.c_in * E * blocks, 0.0);
            let fill = |ci: usize, v: &mut [f32]| {
                input_transform(&padded[ci * plane..(ci + 1) * plane], wp, by0..by1, bw, v)
            };
            for_each_chunk(&mut v, E * blocks, threads, fill);
            // 2. The 16 products: [c_out][16][blocks].
            m.resize(self.c_out * E * blocks, 0.0);
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

/// `G g Gᵀ` of every 3×3 kernel of `weight` (`[c_out, c_in, 3, 3]`), `[c_out][16][c_in]`.
fn weight_transform(weight: &[f32], c_out: usize, c_in: usize, threads: usize) -> Vec<f32> {
    let mut u = vec![0f32; c_out * E * c_in];
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
    for_each_chunk(&mut u, E * c_in, threads, fill);
    u
}

/// `Bᵀ d B` of the 4×4 input blocks of block rows `rows` (`bw` blocks each) of one padded
/// plane, into `v` (`[16][blocks]`).
fn input_transform(
    plane: &[f32],
    wp: usize,
    rows: std::ops::Range<usize>,
    bw: usize,
    v: &mut [f32],
) {
    let blocks = v.len() / E;
    let first = rows.start;
    for by in rows {
        let at = (by - first) * bw;
        let r: [&[f32]; 4] = std::array::from_fn(|i| &plane[(2 * by + i) * wp..][..2 * bw + 2]);
        for bx in 0..bw {
            // d B (each row of the block), then Bᵀ (d B) (each column).
            let mut d = [[0f32; 4]; 4];
            for (i, row) in r.iter().enumerate() {
                let x = &row[2 * bx..2 * bx + 4];
                d[i] = [x[0] - x[2], x[1] + x[2], x[2] - x[1], x[1] - x[3]];
            }
            for b in 0..4 {
                let (d0, d1, d2, d3) = (d[0][b], d[1][b], d[2][b], d[3][b]);
                let col = [d0 - d2, d1 + d2, d2 - d1, d1 - d3];
                for (a, &x) in col.iter().enumerate() {
                    v[(4 * a + b) * blocks + at + bx] = x;
                }
            }
        }
    }
}

/// `Aᵀ m A` of the products of block rows `rows` (`bw` blocks each) of one output channel
/// (`m`: `[16][blocks]`), plus `bias`, into its `oh·ow` plane `out`.
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
    for by in rows {
        let at = (by - first) * bw;
        for bx in 0..bw {
            let k = at + bx;
            let p = |a: usize, b: usize| m[(4 * a + b) * blocks + k];
            // Aᵀ over the block's rows, then over its columns.
            let s: [[f32; 4]; 2] = [
                std::array::from_fn(|b| p(0, b) + p(1, b) + p(2, b)),
                std::array::from_fn(|b| p(1, b) - p(2, b) - p(3, b)),
            ];
            for (i, s) in s.iter().enumerate() {
                let y = (2 * by + i) * ow + 2 * bx;
                out[y] = s[0] + s[1] + s[2] + bias;
                out[y + 1] = s[1] - s[2] - s[3] + bias;
            }
        }
    }
}
