//! 2-D convolution on the CPU without a full im2col buffer.
//!
//! candle's CPU convolution converts the whole input to NHWC on one thread,
//! gathers 512-pixel im2col tiles with scattered writes and scatters the gemm
//! result back pixel by pixel. Here the patch matrix is built for a band of
//! whole output rows at a time, in the weight's own `(c_in, ky, kx)` order (so
//! the `[c_out, c_in, kh, kw]` weight is used as a `[c_out, K]` matrix without
//! reordering): each patch-matrix row is filled by contiguous copies from one
//! input row (for a stride-1 convolution as wide as its input, one copy for the
//! whole band), and the `[c_out, rows·W]` product is added straight onto the bias
//! in the output (`c_out` runs, one plane apart): no product buffer, no copy.
//! Large images run one band at a time with the fill and the product split over the
//! threads. The band is sized to stay within a few MiB, so a 3×3 conv over 512² × 128
//! channels needs ≈ 8 MiB of patches instead of 1.2 GB. Small images (the UNet's low
//! levels: 24 frames of 2×2 or 1×1 at the released widths) are put side by side in one patch
//! matrix, as many as a band holds, so the weight (up to 59 MB at 1280 channels) is read
//! once per group instead of once per image; that product goes to a scratch matrix and is
//! copied out image by image. Groups run on one thread each when there are enough of them
//! to share evenly, otherwise one at a time with the product split.
//!
//! A 3×3 stride-1 convolution with an even output of 16 × 16 or more and 32+ input and
//! output channels (nearly all of the VAE decoder's, the UNet's at 16² latents and up) goes
//! to Winograd's F(2×2, 3×3) ([`super::winograd`]), 2.25× fewer multiplications, image by
//! image. Of the rest, on CPUs with AVX-512F, a stride-1 convolution over images wide enough (the VAE
//! decoder's 32² to 512² levels, the UNet's 64² level at 512² output) skips the patch matrix
//! and the matrix product altogether: [`Direct`] sums each tile of 64 output positions × 6
//! output channels in registers straight from a zero-padded copy of the input (faster than
//! the banded product on the bench box for those sizes: `benches/RESULTS.md`).
//!
//! The op can also read its input through a nearest-neighbour upsampling by an
//! integer factor (diffusers' `Upsample2D`: `interpolate(scale 2)` then a 3×3
//! conv) without materialising the upsampled tensor.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::chunks::for_each_chunk;
use super::cpu_input::{contiguous_f32, tensor_f32};
use super::matmul::{matmul, View};
use super::pool::Buffer;
use super::winograd::Winograd;

/// Elements of the patch matrix built per band (2 Mi f32 = 8 MiB at most;
/// at least one output row per band).
const BAND_ELEMS: usize = 2 << 20;

/// Geometry of one convolution (square stride and padding, dilation 1, one
/// group), with the input optionally upsampled (nearest) by `upsample` first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) k_h: usize,
    pub(crate) k_w: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    pub(crate) upsample: usize,
}

impl ConvGeometry {
    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (ih, iw) = (h * self.upsample, w * self.upsample);
        let (ph, pw) = (ih + 2 * self.padding, iw + 2 * self.padding);
        if ph < self.k_h || pw < self.k_w || self.stride == 0 {
            candle_core::bail!(
                "conv2d: input {ih}x{iw} with padding {} is smaller than the {}x{} kernel",
                self.padding,
                self.k_h,
                self.k_w
            );
        }
        Ok((
            (ph - self.k_h) / self.stride + 1,
            (pw - self.k_w) / self.stride + 1,
        ))
    }
}

/// The CPU f32 convolution as a candle op on the input; it holds the weight as
/// a contiguous `[c_out, c_in·kh·kw]` matrix and the bias values.
#[derive(Debug, Clone)]
pub(crate) struct BandedConv2d {
    pub(crate) geometry: ConvGeometry,
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Vec<f32>>,
}

impl CustomOp1 for BandedConv2d {
    fn name(&self) -> &'static str {
        "banded-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let mut out = Vec::new();
        let (oh, ow) = self.run(input, (n, c, h, w), &mut out)?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((n, self.geometry.c_out, oh, ow)),
        ))
    }
}

impl BandedConv2d {
    /// The convolution of the `(n, c, h, w)` contiguous images in `input`, into `out`
    /// (cleared and resized to their `(n, c_out, oh, ow)` outputs, so a caller can reuse
    /// one buffer from call to call). Returns `(oh, ow)`.
    pub(crate) fn run(
        &self,
        input: &[f32],
        (n, c, h, w): (usize, usize, usize, usize),
        out: &mut Vec<f32>,
    ) -> Result<(usize, usize)> {
        if input.len() != n * c * h * w {
            candle_core::bail!(
                "banded-conv2d: {} input values for {n}x{c}x{h}x{w}",
                input.len()
            );
        }
        let g = self.geometry;
        if c != g.c_in {
            candle_core::bail!(
                "banded-conv2d: input has {c} channels, the kernel {}",
                g.c_in
            );
        }
        let (oh, ow) = g.out_size(h, w)?;
        let (weight_storage, _) = self.weight.storage_and_layout();
        let weight = tensor_f32(&self.weight, &weight_storage)?;
        let image_in = c * h * w;
        let image_out = g.c_out * oh * ow;
        let threads = rayon::current_num_threads();
        let parallel = images_in_parallel(n, threads);
        out.clear();
        out.resize(n * image_out, 0.0);
        let out = &mut out[..];
        let shape = [g.c_out, g.c_in, g.k_h, g.k_w];
        if let Some(wino) = Winograd::new(
            shape,
            g.stride,
            (oh, ow),
            weight,
            self.bias.as_deref(),
            threads,
        ) {
            // Every image alone, whatever their number, so that a batch gives what each
            // image gives by itself (the threads split a product without changing its sums).
            let wp = w * g.upsample + 2 * g.padding;
            let plane = (h * g.upsample + 2 * g.padding) * wp;
            by_chunks(
                input,
                out,
                (image_in, image_out),
                parallel,
                threads,
                |image, dst, threads, padded: &mut Buffer| {
                    let padded = padded.at_least(g.c_in * plane);
                    pad_planes(&g, (h, w), image, padded, plane, threads);
                    wino.image(padded, plane, wp, dst, threads);
                },
            );
            return Ok((oh, ow));
        }
        let k = g.c_in * g.k_h * g.k_w;
        let rows_per_band = (BAND_ELEMS / (k * ow)).clamp(1, oh);
        let plane_out = oh * ow;
        let conv = Bands {
            g,
            weight,
            bias: self.bias.as_deref(),
            k,
            in_size: (h, w),
            out_size: (oh, ow),
            rows_per_band,
        };
        let per_group = images_per_group(n, k * plane_out, rows_per_band == oh, threads);
        if per_group == 1 {
            // Large images: the direct convolution where it applies, else one band at a
            // time; one image per thread when they keep every thread busy, else each split.
            #[cfg(target_arch = "x86_64")]
            let direct = Direct::new(&conv, if parallel { 1 } else { threads }, parallel);
            by_chunks(
                input,
                out,
                (image_in, image_out),
                parallel,
                threads,
                |image, dst, t, scratch| {
                    #[cfg(target_arch = "x86_64")]
                    if let Some(direct) = &direct {
                        direct.image(image, dst, t, scratch);
                        return;
                    }
                    for y0 in (0..oh).step_by(rows_per_band) {
                        conv.band(image, dst, y0, t, &mut scratch.patches);
                    }
                },
            );
        } else {
            // Groups of small images in one product: each group on one thread when there
            // are enough to share evenly, else one at a time, split.
            let chunks = (per_group * image_in, per_group * image_out);
            let even = n.div_ceil(per_group).is_multiple_of(threads);
            by_chunks(
                input,
                out,
                chunks,
                even,
                threads,
                |images, dst, t, scratch| conv.images(images, dst, t, scratch),
            );
        }
        Ok((oh, ow))
    }
}

/// Whether `n` large images keep `threads` busy one image per thread (an even share each,
/// or enough that the last round matters little).
fn images_in_parallel(n: usize, threads: usize) -> bool {
    n >= threads && (n.is_multiple_of(threads) || n >= 4 * threads)
}

/// `run(inputs, outputs, threads, scratch)` for every pair of `chunks.0` input and `chunks.1`
/// output elements (whole images): each on one thread of rayon's pool with a scratch of its
/// own when `parallel`, else one after the other, each split over `threads`.
fn by_chunks<S: Default + Send>(
    input: &[f32],
    out: &mut [f32],
    chunks: (usize, usize),
    parallel: bool,
    threads: usize,
    run: impl Fn(&[f32], &mut [f32], usize, &mut S) + Sync,
) {
    if parallel {
        out.par_chunks_mut(chunks.1)
            .zip(input.par_chunks(chunks.0))
            .for_each_init(S::default, |scratch, (dst, src)| run(src, dst, 1, scratch));
    } else {
        let mut scratch = S::default();
        for (dst, src) in out.chunks_mut(chunks.1).zip(input.chunks(chunks.0)) {
            run(src, dst, threads, &mut scratch);
        }
    }
}

/// How many whole images share one patch matrix: 1 when an image's patches
/// (`image_patches` elements) do not fit in a band (`fits`) or only one fits, otherwise as
/// many as a band holds, evened out so that every group is about the same size and, where
/// there are images enough, their number is a multiple of `threads`.
fn images_per_group(n: usize, image_patches: usize, fits: bool, threads: usize) -> usize {
    let most = if fits {
        (BAND_ELEMS / image_patches.max(1)).clamp(1, n.max(1))
    } else {
        1
    };
    if most == 1 {
        return 1;
    }
    let mut groups = n.div_ceil(most);
    if groups > 1 && n >= groups.next_multiple_of(threads) {
        groups = groups.next_multiple_of(threads);
    }
    n.div_ceil(groups)
}

/// A thread's buffers, from the pool and reused without zeroing (every element used is
/// written first).
#[derive(Default)]
struct Scratch {
    /// The patch matrix.
    patches: Buffer,
    /// The `[c_out, images·plane]` product of a group of images.
    product: Buffer,
}

/// One convolution over one image, band by band.
struct Bands<'a> {
    g: ConvGeometry,
    /// `[c_out, K]`, row-major.
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    /// `c_in·kh·kw`.
    k: usize,
    in_size: (usize, usize),
    out_size: (usize, usize),
    rows_per_band: usize,
}

impl Bands<'_> {
    /// Every output of the whole images in `input` (`dst`: their `[c_out, oh·ow]` outputs,
    /// one after the other) with one product: their patch matrices side by side, `weight ·
    /// patches` onto the bias in `scratch.product`, then copied out image by image.
    /// `threads` > 1 splits the fill and the product.
    fn images(&self, input: &[f32], dst: &mut [f32], threads: usize, scratch: &mut Scratch) {
        let (h, w) = self.in_size;
        let (oh, ow) = self.out_size;
        let plane = oh * ow;
        let image_in = self.g.c_in * h * w;
        let count = input.len() / image_in;
        let cols = count * plane;
        let patches = scratch.patches.at_least(self.k * cols);
        for_each_chunk(patches, cols, threads, |row, patch| {
            for (image, part) in input
                .chunks_exact(image_in)
                .zip(patch.chunks_exact_mut(plane))
            {
                fill_patch_row(&self.g, image, self.in_size, ow, 0, row, part);
            }
        });
        let c_out = self.g.c_out;
        let product = scratch.product.at_least(c_out * cols);
        self.bias_rows(product, cols, cols);
        let patches = View {
            data: &scratch.patches[..self.k * cols],
            rows: self.k,
            cols,
            row_stride: cols,
            col_stride: 1,
        };
        matmul(
            product,
            cols,
            self.weight_view(),
            patches,
            self.bias.is_some(),
            threads,
        );
        for (j, out) in dst.chunks_exact_mut(c_out * plane).enumerate() {
            for (co, out) in out.chunks_exact_mut(plane).enumerate() {
                out.copy_from_slice(&product[co * cols + j * plane..][..plane]);
            }
        }
    }

    /// The first `cols` elements of each of the `c_out` rows of `dst` (`row_stride` apart) set
    /// to the channel's bias, for a product to be added onto; nothing without a bias (the
    /// product then overwrites).
    fn bias_rows(&self, dst: &mut [f32], row_stride: usize, cols: usize) {
        if let Some(bias) = self.bias {
            for (co, &b) in bias.iter().enumerate() {
                dst[co * row_stride..][..cols].fill(b);
            }
        }
    }

    /// The weight as the `[c_out, K]` left factor of every product.
    fn weight_view(&self) -> View<'_> {
        View {
            data: self.weight,
            rows: self.g.c_out,
            cols: self.k,
            row_stride: self.k,
            col_stride: 1,
        }
    }

    /// Output rows `y0..y0 + rows_per_band` of every channel of `dst` (the image's
    /// `[c_out, oh·ow]` output): the patch matrix of the band, then `weight · patches`
    /// added onto the bias where it belongs in `dst`. `threads` > 1 splits both.
    /// `scratch` holds the patch matrix; every element of it is written, so it is reused
    /// from band to band without zeroing.
    fn band(
        &self,
        image: &[f32],
        dst: &mut [f32],
        y0: usize,
        threads: usize,
        scratch: &mut Buffer,
    ) {
        let (oh, ow) = self.out_size;
        let y1 = (y0 + self.rows_per_band).min(oh);
        let cols = (y1 - y0) * ow;
        let g = &self.g;
        let pointwise =
            g.k_h == 1 && g.k_w == 1 && g.stride == 1 && g.padding == 0 && g.upsample == 1;
        let patches = if pointwise {
            // A 1×1 convolution's patch matrix is the input itself.
            View {
                data: &image[y0 * ow..],
                rows: self.k,
                cols,
                row_stride: oh * ow,
                col_stride: 1,
            }
        } else {
            let patches = scratch.at_least(self.k * cols);
            for_each_chunk(patches, cols, threads, |row, patch| {
                fill_patch_row(g, image, self.in_size, ow, y0, row, patch)
            });
            View {
                data: patches,
                rows: self.k,
                cols,
                row_stride: cols,
                col_stride: 1,
            }
        };
        let plane = oh * ow;
        let dst = &mut dst[y0 * ow..];
        self.bias_rows(dst, plane, cols);
        matmul(
            dst,
            plane,
            self.weight_view(),
            patches,
            self.bias.is_some(),
            threads,
        );
    }
}

/// Outputs per thread per band of the direct convolution (256 KiB: the band's outputs stay
/// in L2 between the passes over the input channels).
#[cfg(target_arch = "x86_64")]
const DIRECT_BAND_ELEMS: usize = 64 << 10;

/// Grid positions per band of the direct convolution, at most.
#[cfg(target_arch = "x86_64")]
const DIRECT_BAND_MAX: usize = 2048;

/// Input channels summed per pass over a band (between passes the tiles' sums wait in the
/// band's outputs).
#[cfg(target_arch = "x86_64")]
const DIRECT_CHANNELS: usize = 128;

/// A stride-1 convolution computed directly in AVX-512 registers from a zero-padded copy
/// of the input, without a patch matrix or a matrix product.
///
/// Output pixel `(y, x)` is grid position `q = y·wp + x` of the padded width `wp`, and
/// kernel tap `(ky, kx)` of every position reads the padded plane at `q + ky·wp + kx`: the
/// same offset for all, so a tile of 64 consecutive positions × 6 output channels loads
/// four vectors per tap and input channel and broadcasts six weights (the weight is used in
/// its own `[c_out, c_in, kh, kw]` layout). The `kw − 1` positions at the end of each grid
/// row are computed and dropped. The grid is cut into bands; each thread takes an even
/// share of the output channels through every band, so both read one band's input at a
/// time, and collects a band's outputs in a block of its own (`[channels][band]`, sized
/// by [`DIRECT_BAND_ELEMS`]) that is copied out when the band is done.
#[cfg(target_arch = "x86_64")]
struct Direct<'a, 'b> {
    bands: &'b Bands<'a>,
    /// Padded (and upsampled) input width: the grid's row length.
    wp: usize,
    /// Length of one padded plane, with the zeros the last tiles read past the last row.
    plane: usize,
    /// Grid positions per band (a multiple of 64), and bands.
    band: usize,
    count: usize,
    /// Grid positions with an output (`oh·wp`).
    positions: usize,
    /// Output channels per thread.
    per: usize,
    /// `ky·wp + kx` for each tap, in the weight's `(ky, kx)` order.
    offsets: Vec<usize>,
}

#[cfg(target_arch = "x86_64")]
impl<'a, 'b> Direct<'a, 'b> {
    /// The direct convolution for `bands`' geometry, when this CPU has AVX-512F, the
    /// convolution has stride 1 and a kernel larger than 1×1 (a 1×1 one reads its input as
    /// the patch matrix already), and its image is wide enough: the positions it computes
    /// (whole tiles, `kw − 1` dropped per row) must be within 1/8 of the outputs it keeps,
    /// within 1/32 for a `batch` of images run one per thread (`threads` is then 1: the
    /// threads each image is split over). At the low
    /// levels' small images (16 × 18 positions for 16 × 16 outputs, in 5 tiles of 64) the
    /// banded product is faster, and for 24 frames of 32 × 32 about as fast (2-thread
    /// AVX-512 timings, `benches/RESULTS.md`).
    fn new(bands: &'b Bands<'a>, threads: usize, batch: bool) -> Option<Self> {
        use super::x86::{avx512_available, TILE_CHANNELS, TILE_POSITIONS};
        let g = &bands.g;
        let (oh, ow) = bands.out_size;
        let (hp, wp) = (
            bands.in_size.0 * g.upsample + 2 * g.padding,
            bands.in_size.1 * g.upsample + 2 * g.padding,
        );
        let positions = oh * wp;
        let computed = positions.next_multiple_of(TILE_POSITIONS);
        let slack = if batch { 32 } else { 8 };
        if g.stride != 1 || g.k_h * g.k_w == 1 || slack * computed > (slack + 1) * oh * ow {
            return None;
        }
        if !avx512_available() {
            return None;
        }
        let per = g.c_out.div_ceil(threads).max(TILE_CHANNELS);
        let band = (DIRECT_BAND_ELEMS / per)
            .clamp(2 * TILE_POSITIONS, DIRECT_BAND_MAX)
            .min(computed)
            / TILE_POSITIONS
            * TILE_POSITIONS;
        let count = positions.div_ceil(band);
        let offsets: Vec<usize> = (0..g.k_h)
            .flat_map(|ky| (0..g.k_w).map(move |kx| ky * wp + kx))
            .collect();
        let reach = offsets.last().copied().unwrap_or(0);
        let plane = (count * band + reach + TILE_POSITIONS).max(hp * wp);
        Some(Self {
            bands,
            wp,
            plane,
            band,
            count,
            positions,
            per,
            offsets,
        })
    }

    /// Every output of one image (`dst`: its `[c_out, oh·ow]` output), band by band, each
    /// band's output channels shared by the threads.
    fn image(&self, image: &[f32], dst: &mut [f32], threads: usize, scratch: &mut Scratch) {
        let b = self.bands;
        let padded = scratch.patches.at_least(b.g.c_in * self.plane);
        pad_planes(&b.g, b.in_size, image, padded, self.plane, threads);
        let padded = &scratch.patches[..b.g.c_in * self.plane];
        let plane_out = b.out_size.0 * b.out_size.1;
        let chunk = self.per * plane_out;
        let mut blocks: Vec<Buffer> = (0..dst.len().div_ceil(chunk))
            .map(|_| Buffer::default())
            .collect();
        for i in 0..self.count {
            let run = |(j, (dst, block)): (usize, (&mut [f32], &mut Buffer))| {
                let block = block.at_least(dst.len() / plane_out * self.band);
                self.piece(padded, i, j * self.per, block);
                self.copy_out(i, block, dst);
            };
            if threads > 1 {
                dst.par_chunks_mut(chunk)
                    .zip(blocks.par_iter_mut())
                    .enumerate()
                    .for_each(run);
            } else {
                dst.chunks_mut(chunk)
                    .zip(blocks.iter_mut())
                    .enumerate()
                    .for_each(run);
            }
        }
    }

    /// Band `i`'s outputs from `block` (`[rows][band]`) to their places in `dst` (`rows`
    /// output channels, `oh·ow` each), dropping the positions past each row's end.
    fn copy_out(&self, i: usize, block: &[f32], dst: &mut [f32]) {
        let (oh, ow) = self.bands.out_size;
        let (start, end) = (i * self.band, ((i + 1) * self.band).min(self.positions));
        let rows = (start / self.wp)..end.div_ceil(self.wp).min(oh);
        for (block, dst) in block
            .chunks_exact(self.band)
            .zip(dst.chunks_exact_mut(oh * ow))
        {
            for y in rows.clone() {
                let lo = (y * self.wp).max(start);
                let hi = (y * self.wp + ow).min(end);
                if lo < hi {
                    let x = lo - y * self.wp;
                    dst[y * ow + x..y * ow + x + (hi - lo)]
                        .copy_from_slice(&block[lo - start..hi - start]);
                }
            }
        }
    }

    /// Band `i` of output channels `co0..` into `block` (their rows of the band, `band`
    /// long each): the input channels in passes of [`DIRECT_CHANNELS`], each pass tile by
    /// tile (a tile's weights stay in L1 across the band).
    fn piece(&self, padded: &[f32], i: usize, co0: usize, block: &mut [f32]) {
        use super::x86::{conv_tile, TileInput, TILE_POSITIONS};
        let b = self.bands;
        let c_in = b.g.c_in;
        let end = (self.positions - i * self.band).min(self.band);
        let starts = tile_starts(block.len() / self.band);
        for ci in (0..c_in).step_by(DIRECT_CHANNELS) {
            let channels = ci..(ci + DIRECT_CHANNELS).min(c_in);
            for rows in starts.windows(2) {
                let co = co0 + rows[0];
                let src = TileInput {
                    input: &padded[i * self.band..],
                    plane: self.plane,
                    offsets: &self.offsets,
                    weight: &b.weight[co * b.k..],
                    weight_row: b.k,
                };
                for q in (0..end).step_by(TILE_POSITIONS) {
                    conv_tile(
                        &src,
                        q,
                        channels.clone(),
                        &mut block[rows[0] * self.band + q..],
                        self.band,
                        rows[1] - rows[0],
                        b.bias.map(|bias| &bias[co..]),
                        ci == 0,
                    );
                }
            }
        }
    }
}

/// The zero-padded (and nearest-upsampled) planes of `image` (`c_in` planes of `h × w`) into
/// `padded`, one per `plane` elements, rows `w·upsample + 2·padding` long; everything past
/// the last padded row is zeroed too.
fn pad_planes(
    g: &ConvGeometry,
    (h, w): (usize, usize),
    image: &[f32],
    padded: &mut [f32],
    plane: usize,
    threads: usize,
) {
    let (p, u) = (g.padding, g.upsample);
    let (ih, iw) = (h * u, w * u);
    let wp = iw + 2 * p;
    let fill = |ci: usize, dst: &mut [f32]| {
        let src = &image[ci * h * w..(ci + 1) * h * w];
        dst[..p * wp].fill(0.0);
        dst[(p + ih) * wp..].fill(0.0);
        for (y, row) in dst[p * wp..(p + ih) * wp].chunks_exact_mut(wp).enumerate() {
            row[..p].fill(0.0);
            row[p + iw..].fill(0.0);
            let s = &src[(y / u) * w..][..w];
            let inner = &mut row[p..p + iw];
            if u == 1 {
                inner.copy_from_slice(s);
            } else {
                for (d, &v) in inner.chunks_exact_mut(u).zip(s) {
                    d.fill(v);
                }
            }
        }
    };
    for_each_chunk(padded, plane, threads, fill);
}

/// Where the tiles of `rows` output channels start, and `rows` last: tiles of 6, except
/// that a remainder of 1 to 3 channels joins the last 6 in two tiles of 3 to 5 (a tile of 1
/// to 3 channels spends more on its loads than on its sums).
#[cfg(target_arch = "x86_64")]
fn tile_starts(rows: usize) -> Vec<usize> {
    use super::x86::TILE_CHANNELS as T;
    let (full, rem) = (rows / T, rows % T);
    let mut starts: Vec<usize> = (0..full).map(|i| i * T).collect();
    if (1..=3).contains(&rem) && full > 0 {
        let last = starts.pop().unwrap_or(0);
        let sum = T + rem;
        starts.extend([last, last + sum / 2]);
    } else if rem > 0 {
        starts.push(full * T);
    }
    starts.push(rows);
    starts
}

/// Fills one row of the patch matrix (`row` = `(ci, ky, kx)`) for output rows
/// `y0..y0 + patch.len() / ow`, padding positions with zeros (every element is written).
fn fill_patch_row(
    g: &ConvGeometry,
    image: &[f32],
    (h, w): (usize, usize),
    ow: usize,
    y0: usize,
    row: usize,
    patch: &mut [f32],
) {
    let ci = row / (g.k_h * g.k_w);
    let ky = (row / g.k_w) % g.k_h;
    let kx = row % g.k_w;
    let plane = &image[ci * h * w..(ci + 1) * h * w];
    let (ih, iw) = (h * g.upsample, w * g.upsample);
    // Output columns whose input column `ox·s + kx − p` lies inside [0, iw).
    let ox_lo = g.padding.saturating_sub(kx).div_ceil(g.stride).min(ow);
    let ox_hi = if iw + g.padding > kx {
        ((iw + g.padding - kx - 1) / g.stride + 1).min(ow)
    } else {
        0
    }
    .max(ox_lo);
    if g.stride == 1 && g.upsample == 1 && ow == w && ox_lo < ox_hi {
        // Output rows lie in the patch row back to back like input rows in the plane, so
        // the valid rows are one contiguous copy of the plane shifted by the kernel offset;
        // what wrapped around the row ends (the padding columns) is zeroed after.
        let rows = patch.len() / ow;
        let (top, p) = (y0 + ky, g.padding);
        let j_lo = p.saturating_sub(top).min(rows);
        let j_hi = (h + p).saturating_sub(top).min(rows).max(j_lo);
        patch[..j_lo * ow].fill(0.0);
        patch[j_hi * ow..].fill(0.0);
        if j_lo < j_hi {
            let (start, end) = (j_lo * ow + ox_lo, (j_hi - 1) * ow + ox_hi);
            let from = (top + j_lo - p) * w + ox_lo + kx - p;
            patch[start..end].copy_from_slice(&plane[from..from + (end - start)]);
            for row in patch[j_lo * ow..j_hi * ow].chunks_exact_mut(ow) {
                row[..ox_lo].fill(0.0);
                row[ox_hi..].fill(0.0);
            }
        }
        return;
    }
    for (j, dst) in patch.chunks_exact_mut(ow).enumerate() {
        let iy = (y0 + j) * g.stride + ky;
        if iy < g.padding || iy - g.padding >= ih || ox_lo == ox_hi {
            dst.fill(0.0);
            continue;
        }
        dst[..ox_lo].fill(0.0);
        dst[ox_hi..].fill(0.0);
        let sy = (iy - g.padding) / g.upsample;
        let src = &plane[sy * w..(sy + 1) * w];
        let x0 = ox_lo * g.stride + kx - g.padding;
        let dst = &mut dst[ox_lo..ox_hi];
        match (g.stride, g.upsample) {
            (1, 1) => dst.copy_from_slice(&src[x0..x0 + dst.len()]),
            (s, 1) => {
                for (d, &v) in dst.iter_mut().zip(src[x0..].iter().step_by(s)) {
                    *d = v;
                }
            }
            (1, u) => {
                // Each input pixel `u` times; the first may be cut short.
                let lead = ((u - x0 % u) % u).min(dst.len());
                let (head, rest) = dst.split_at_mut(lead);
                head.fill(src[x0 / u]);
                let sx = (x0 + lead) / u;
                if u == 2 {
                    // (The generic loop below calls `fill` on two-element slices.)
                    let half = rest.len() / 2;
                    let mut pairs = rest.chunks_exact_mut(2);
                    for (d, &v) in (&mut pairs).zip(&src[sx..]) {
                        d[0] = v;
                        d[1] = v;
                    }
                    if let Some(last) = pairs.into_remainder().first_mut() {
                        *last = src[sx + half];
                    }
                } else {
                    for (d, &v) in rest.chunks_mut(u).zip(&src[sx..]) {
                        d.fill(v);
                    }
                }
            }
            (s, u) => {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = src[(x0 + i * s) / u];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles_take_six_channels_and_no_tile_fewer_than_three_when_it_can() {
        assert_eq!(tile_starts(12), [0, 6, 12]);
        assert_eq!(tile_starts(4), [0, 4]);
        // 6 + 2: two tiles of 4; 6 + 1: 3 and 4; 6 + 3: 4 and 5; 6 + 4: as is.
        assert_eq!(tile_starts(8), [0, 4, 8]);
        assert_eq!(tile_starts(13), [0, 6, 9, 13]);
        assert_eq!(tile_starts(9), [0, 4, 9]);
        assert_eq!(tile_starts(10), [0, 6, 10]);
        assert_eq!(tile_starts(1), [0, 1]);
    }

    #[test]
    fn small_images_share_a_product_in_even_groups() {
        // 1280 channels, 3×3, 2×2 images: 24 frames fit one band.
        assert_eq!(images_per_group(24, 11_520 * 4, true, 2), 24);
        // 7 fit a band: 4 groups of 6 (a multiple of the threads) rather than 7, 7, 7, 3.
        assert_eq!(images_per_group(24, 294_912, true, 2), 6);
        // 13 images, 7 fit: 2 groups (7 + 6).
        assert_eq!(images_per_group(13, 294_912, true, 2), 7);
        // 9 images, 4 fit a band, 3 threads: 3 groups of 3.
        assert_eq!(images_per_group(9, BAND_ELEMS / 4, true, 3), 3);
        // One image, an image that fills half a band or more, or one larger than a band.
        assert_eq!(images_per_group(1, 10, true, 2), 1);
        assert_eq!(images_per_group(24, BAND_ELEMS / 2 + 1, true, 2), 1);
        assert_eq!(images_per_group(24, 3 * BAND_ELEMS, false, 2), 1);
    }
}
