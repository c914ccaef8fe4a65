//! Reference-photo preparation: decode, detect the face, build the face mask, crop
//! and resize (EchoMimic v1 `infer_audio2vid.py`, "face musk prepare" block).
//!
//! The steps, all reproduced from the reference code (docs/model.md M4, M12):
//!
//! 1. **Decode** ([`load_image`], [`decode_image`]): PNG, JPEG, WebP, BMP, and the first
//!    frame of a GIF. The EXIF orientation is applied, as `cv2.imread` does. Like
//!    `cv2.imread(path)` (`IMREAD_COLOR`), alpha is dropped without compositing, grey is
//!    replicated to three channels and 16-bit samples keep their high byte
//!    (libpng `png_set_strip_16`). JPEG is decoded by libjpeg-turbo with OpenCV's settings
//!    ([`crate::image_io`]), so JPEG and PNG pixels are bit-exact. (Standard
//!    OpenCV builds cannot read GIF at all; decoding the first frame is our choice.)
//! 2. **Detect** with [`Mtcnn`] and the reference's parameters. EchoMimic hands the
//!    OpenCV **BGR** array to facenet, which expects RGB; the detector therefore sees
//!    swapped colour channels. [`FaceQuirks::bgr_detector_input`] reproduces this (the
//!    default, needed for identical boxes).
//! 3. **Select** the boxes with `prob > 0.8` and keep the largest area. None left ->
//!    [`PipelineError::NoFace`], before any heavy work (the reference only crashed after
//!    the whole diffusion run).
//! 4. **Round** the box with `np.round` (half to even) to `rb, re, cb, ce` (y1, y2, x1, x2).
//! 5. **Mask** at the photo size: rows `rb - r_pad .. re + r_pad`, columns
//!    `cb - c_pad .. ce + c_pad` set to 255, pads `int(size * 0.1)`. The reference slices a
//!    numpy array, so a negative start *wraps* to the end of the axis and the mask of a
//!    face touching the top or left border becomes a thin strip or nothing
//!    ([`FaceQuirks::mask_negative_index_wrap`], default on; off clamps to the image).
//! 6. **Crop rectangle** with pads `int(size * 0.5)`: `[max(0, cb - cp), max(0, rb - rp),
//!    min(ce + cp, W), min(re + ?, H)]` where the reference uses the *column* pad `cp`
//!    for the bottom edge ([`FaceQuirks::crop_bottom_uses_column_pad`], default on; the
//!    EchoMe worker and the corrected mode use the row pad `rp`).
//! 7. **Square** it with `crop_and_pad` (which does not pad) and crop image and mask.
//! 8. **Resize** both to `(W, H)` with [`resize_bilinear_opencv`], a bit-exact port of
//!    `cv2.resize(..., INTER_LINEAR)` on `uint8` (fixed-point weights, SIMD rounding).
//!
//! The reference image given to the pipeline is the RGB version of the resized crop;
//! [`FaceCrop::reference_image_tensor`] and [`FaceCrop::mask_tensor`] build the tensors
//! the pipeline consumes. The square crop rectangle stays in photo coordinates so the
//! generated frames can be pasted back.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::error::{PipelineError, Result};
use crate::models::mtcnn::{self, Detection, ImageHwc, Mtcnn, MtcnnConfig, MtcnnTrace};
use crate::weights::Checkpoint;

/// The real facenet-pytorch MTCNN weights (MIT), embedded so the detector needs no
/// external file. Keys `pnet.*`, `rnet.*`, `onet.*`, `f32`.
pub const MTCNN_WEIGHTS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/mtcnn/mtcnn.safetensors"
));

/// Name used in error messages for the embedded weights.
const EMBEDDED_NAME: &str = "<embedded>/assets/mtcnn/mtcnn.safetensors";

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Size limits applied before a photo is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Longest accepted side, in pixels.
    pub max_side: u32,
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_side: 8192,
            max_pixels: 40_000_000,
        }
    }
}

fn image_err(message: impl Into<String>) -> PipelineError {
    PipelineError::Image(message.into())
}

/// Reads and decodes a photo file (see [`decode_image`]).
pub fn load_image(path: impl AsRef<Path>, limits: &ImageLimits) -> Result<RgbImage> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| PipelineError::io(path, e))?;
    decode_image(&bytes, limits).map_err(|e| match e {
        PipelineError::Image(m) => image_err(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Decodes PNG / JPEG / WebP / BMP / GIF (first frame) bytes to 8-bit RGB the way
/// `cv2.imread` would see them: EXIF orientation applied, alpha dropped, grey
/// replicated, 16-bit samples reduced to their high byte.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(image_err("the image file is empty"));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_err(format!("cannot read the image: {e}")))?;
    let format = reader.format().ok_or_else(|| {
        image_err("unrecognised image format (expected PNG, JPEG, WebP, BMP or GIF)")
    })?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::WebP
            | ImageFormat::Bmp
            | ImageFormat::Gif
    ) {
        return Err(image_err(format!(
            "unsupported image format {format:?} (expected PNG, JPEG, WebP, BMP or GIF)"
        )));
    }
    let mut decoder_limits = image::Limits::default();
    let budget = limits.max_pixels.saturating_mul(8).saturating_add(64 << 20);
    decoder_limits.max_alloc = Some(budget.max(512 << 20));
    reader.limits(decoder_limits);
    let corrupt =
        |e: image::ImageError| image_err(format!("cannot decode the {format:?} image: {e}"));
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(image_err(format!("the image has no pixels ({w}x{h})")));
    }
    if w.max(h) > limits.max_side || u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(image_err(format!(
            "the image is {w}x{h}, over the limit of {} px per side and {} pixels",
            limits.max_side, limits.max_pixels
        )));
    }
    // A malformed EXIF block does not make the photo unusable; OpenCV ignores it too.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = if format == ImageFormat::Jpeg {
        // libjpeg-turbo, as OpenCV (see `crate::image_io`).
        drop(decoder);
        DynamicImage::ImageRgb8(
            crate::image_io::decode_jpeg_like_opencv(bytes)
                .map_err(|e| image_err(format!("cannot decode the {format:?} image: {e}")))?,
        )
    } else {
        DynamicImage::from_decoder(decoder).map_err(corrupt)?
    };
    img.apply_orientation(orientation);
    Ok(to_rgb8_like_opencv(img))
}

/// 8-bit RGB as `cv2.imread(IMREAD_COLOR)` produces it (then swapped to BGR by OpenCV).
fn to_rgb8_like_opencv(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_)
        | DynamicImage::ImageRgb16(_)
        | DynamicImage::ImageRgba16(_) => {
            let rgb16 = img.to_rgb16();
            RgbImage::from_fn(rgb16.width(), rgb16.height(), |x, y| {
                image::Rgb(rgb16.get_pixel(x, y).0.map(|v| (v >> 8) as u8))
            })
        }
        other => other.to_rgb8(),
    }
}

/// `r, g, b` -> `b, g, r` bytes (what OpenCV holds in memory).
pub fn rgb_to_bgr_bytes(img: &RgbImage) -> Vec<u8> {
    let mut out = img.as_raw().clone();
    for px in out.chunks_exact_mut(3) {
        px.swap(0, 2);
    }
    out
}

// ---------------------------------------------------------------------------------------
// OpenCV-exact bilinear resize
// ---------------------------------------------------------------------------------------

/// `INTER_RESIZE_COEF_BITS` of OpenCV: interpolation weights are 11-bit fixed point.
const COEF_BITS: u32 = 11;
const COEF_SCALE: i32 = 1 << COEF_BITS;
/// 8-bit lanes of OpenCV's 128-bit universal intrinsics (SSE/NEON baseline build).
const SIMD_U8_LANES: usize = 16;
const SIMD_I16_LANES: usize = 8;

/// `saturate_cast<short>(float)`: round half to even, clamp.
fn saturate_i16(v: f32) -> i32 {
    v.round_ties_even()
        .clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i32
}

/// Per destination index: source index and the two fixed-point weights.
fn linear_taps(
    src: usize,
    dst: usize,
    scale: f64,
    clamp_x: bool,
) -> (Vec<i64>, Vec<[i32; 2]>, usize) {
    let mut ofs = Vec::with_capacity(dst);
    let mut w = Vec::with_capacity(dst);
    let mut xmax = dst;
    for d in 0..dst {
        let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
        let mut s = f.floor() as i64;
        let mut f = f - s as f32;
        if clamp_x {
            if s < 0 {
                f = 0.0;
                s = 0;
            }
            if s + 1 >= src as i64 {
                xmax = xmax.min(d);
                if s >= src as i64 - 1 {
                    f = 0.0;
                    s = src as i64 - 1;
                }
            }
        }
        ofs.push(s);
        w.push([
            saturate_i16((1.0 - f) * COEF_SCALE as f32),
            saturate_i16(f * COEF_SCALE as f32),
        ]);
    }
    (ofs, w, xmax)
}

/// `cv2.resize(src, (dst_w, dst_h), interpolation=cv2.INTER_LINEAR)` for interleaved
/// 8-bit images with `channels` channels, bit for bit as OpenCV 4.11 computes it on x86
/// and ARM builds (128-bit SIMD):
///
/// * equal sizes copy; an exact 2x downscale on both axes takes OpenCV's `INTER_AREA`
///   fast path (rounded 2x2 mean);
/// * otherwise half-pixel centres `(d + 0.5) * scale - 0.5` with `scale = 1 / (dst/src)`
///   in `f64`, cast to `f32`, weights `saturate_cast<short>(w * 2048)`, columns clamped
///   to the border, rows clamped when fetched;
/// * horizontal pass in exact integers; vertical pass as OpenCV's SIMD kernel for the
///   first `16 k (+ 8)` outputs of a row (`((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16)`,
///   then `(v + 2) >> 2`) and as its scalar tail for the rest (`(S0 b0 + S1 b1 + 2^21) >> 22`).
///
/// Returns `dst_h * dst_w * channels` bytes. Fails when a size is zero or `src` does not
/// hold `src_h * src_w * channels` bytes.
pub fn resize_bilinear_opencv(
    src: &[u8],
    src_w: usize,
    src_h: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
) -> Result<Vec<u8>> {
    let cn = channels;
    if src_w == 0 || src_h == 0 || dst_w == 0 || dst_h == 0 || cn == 0 {
        return Err(PipelineError::InvalidInput(format!(
            "cannot resize {src_w}x{src_h}x{cn} to {dst_w}x{dst_h}: empty size"
        )));
    }
    if Some(src.len()) != src_w.checked_mul(src_h).and_then(|n| n.checked_mul(cn)) {
        return Err(PipelineError::InvalidInput(format!(
            "resize source holds {} bytes, not {src_w}x{src_h}x{cn}",
            src.len()
        )));
    }
    if (src_w, src_h) == (dst_w, dst_h) {
        return Ok(src.to_vec());
    }
    let inv_scale_x = dst_w as f64 / src_w as f64;
    let inv_scale_y = dst_h as f64 / src_h as f64;
    let scale_x = 1.0 / inv_scale_x;
    let scale_y = 1.0 / inv_scale_y;
    let src_stride = src_w * cn;

    // INTER_LINEAR on an exact 2x downscale is served by INTER_AREA's fast path (its
    // vector kernel covers 1, 3 and 4 channels, the only layouts used here).
    let is_int = |s: f64| (s - s.round_ties_even()).abs() < f64::EPSILON;
    if is_int(scale_x)
        && is_int(scale_y)
        && scale_x.round_ties_even() == 2.0
        && scale_y.round_ties_even() == 2.0
        && matches!(cn, 1 | 3 | 4)
    {
        let mut out = vec![0u8; dst_w * dst_h * cn];
        for dy in 0..dst_h {
            let r0 = &src[2 * dy * src_stride..][..src_stride];
            let r1 = &src[(2 * dy + 1) * src_stride..][..src_stride];
            for dx in 0..dst_w {
                for k in 0..cn {
                    let i = 2 * dx * cn + k;
                    let s = u32::from(r0[i])
                        + u32::from(r0[i + cn])
                        + u32::from(r1[i])
                        + u32::from(r1[i + cn]);
                    out[(dy * dst_w + dx) * cn + k] = ((s + 2) >> 2) as u8;
                }
            }
        }
        return Ok(out);
    }

    let (xofs, alpha, xmax) = linear_taps(src_w, dst_w, scale_x, true);
    let (yofs, beta, _) = linear_taps(src_h, dst_h, scale_y, false);
    let width = dst_w * cn;

    // Horizontal pass of one source row into `width` fixed-point sums.
    let hresize = |row: usize, out: &mut [i32]| {
        let s = &src[row * src_stride..][..src_stride];
        for dx in 0..dst_w {
            let sx = xofs[dx] as usize * cn;
            let [a0, a1] = alpha[dx];
            for k in 0..cn {
                out[dx * cn + k] = if dx < xmax {
                    i32::from(s[sx + k]) * a0 + i32::from(s[sx + k + cn]) * a1
                } else {
                    i32::from(s[sx + k]) * COEF_SCALE
                };
            }
        }
    };

    // Where OpenCV's SIMD vertical kernel stops and the scalar loop takes over.
    let mut simd_end = 0usize;
    while simd_end + SIMD_U8_LANES <= width {
        simd_end += SIMD_U8_LANES;
    }
    while (simd_end as i64) < width as i64 - SIMD_I16_LANES as i64 {
        simd_end += SIMD_I16_LANES;
    }

    let clip_row = |r: i64| r.clamp(0, src_h as i64 - 1) as usize;
    let mut out = vec![0u8; width * dst_h];
    let mut rows: [(usize, Vec<i32>); 2] =
        [(usize::MAX, vec![0; width]), (usize::MAX, vec![0; width])];
    for dy in 0..dst_h {
        let want = [clip_row(yofs[dy]), clip_row(yofs[dy] + 1)];
        for (k, &r) in want.iter().enumerate() {
            if rows[k].0 != r {
                if let Some(j) = (0..2).find(|&j| rows[j].0 == r) {
                    let copy = rows[j].1.clone();
                    rows[k] = (r, copy);
                } else {
                    hresize(r, &mut rows[k].1);
                    rows[k].0 = r;
                }
            }
        }
        let (s0, s1) = (&rows[0].1, &rows[1].1);
        let [b0, b1] = beta[dy];
        let dst = &mut out[dy * width..][..width];
        for x in 0..width {
            dst[x] = if x < simd_end {
                // v_pack(S >> 4) saturates to i16, v_mul_hi keeps the high 16 bits,
                // v_add saturates, v_rshr_pack_u<2> rounds, shifts and clamps to u8.
                let pack = |v: i32| (v >> 4).clamp(i32::from(i16::MIN), i32::from(i16::MAX));
                let t0 = (pack(s0[x]) * b0) >> 16;
                let t1 = (pack(s1[x]) * b1) >> 16;
                let sum = (t0 + t1).clamp(i32::from(i16::MIN), i32::from(i16::MAX));
                let r = ((sum + 2).min(i32::from(i16::MAX))) >> 2;
                r.clamp(0, 255) as u8
            } else {
                let v = (s0[x] * b0 + s1[x] * b1 + (1 << (2 * COEF_BITS - 1))) >> (2 * COEF_BITS);
                v.clamp(0, 255) as u8
            };
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Mask and crop geometry
// ---------------------------------------------------------------------------------------

/// Which of the reference's known bugs to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceQuirks {
    /// Feed the detector B, G, R instead of R, G, B (EchoMimic and the EchoMe worker
    /// pass OpenCV's BGR array to facenet). Needed for the reference's exact boxes.
    pub bgr_detector_input: bool,
    /// Python slice semantics for the mask rectangle: a negative start index wraps to
    /// the end of the axis. When off, the rectangle is clamped to the image.
    pub mask_negative_index_wrap: bool,
    /// The bottom of the crop rectangle uses the column pad (`infer_audio2vid.py`).
    /// When off, the row pad is used, as the EchoMe worker does.
    pub crop_bottom_uses_column_pad: bool,
}

impl FaceQuirks {
    /// `infer_audio2vid.py` exactly (the golden vectors).
    pub const REFERENCE: Self = Self {
        bgr_detector_input: true,
        mask_negative_index_wrap: true,
        crop_bottom_uses_column_pad: true,
    };
    /// The EchoMe worker: the crop-bottom bug fixed, the other two kept.
    pub const ECHOME_WORKER: Self = Self {
        bgr_detector_input: true,
        mask_negative_index_wrap: true,
        crop_bottom_uses_column_pad: false,
    };
    /// All three fixed: RGB detector input, clamped mask, row pad for the crop bottom.
    pub const CORRECTED: Self = Self {
        bgr_detector_input: false,
        mask_negative_index_wrap: false,
        crop_bottom_uses_column_pad: false,
    };
}

impl Default for FaceQuirks {
    fn default() -> Self {
        Self::REFERENCE
    }
}

/// Parameters of the face mask and crop (`infer_audio2vid.py` arguments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaceCropOptions {
    /// `facemusk_dilation_ratio`: mask pad as a fraction of the box size (0.1).
    pub mask_dilation: f64,
    /// `facecrop_dilation_ratio`: crop pad as a fraction of the box size (0.5).
    pub crop_dilation: f64,
    /// Minimum detection probability (`select_face`: `prob > 0.8`).
    pub min_prob: f32,
    /// Reference bugs to reproduce.
    pub quirks: FaceQuirks,
}

impl Default for FaceCropOptions {
    fn default() -> Self {
        Self {
            mask_dilation: 0.1,
            crop_dilation: 0.5,
            min_prob: 0.8,
            quirks: FaceQuirks::REFERENCE,
        }
    }
}

impl FaceCropOptions {
    fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.mask_dilation) || !ok(self.crop_dilation) {
            return Err(PipelineError::InvalidInput(format!(
                "face dilation ratios must be finite and >= 0 (mask {}, crop {})",
                self.mask_dilation, self.crop_dilation
            )));
        }
        if !(0.0..=1.0).contains(&self.min_prob) {
            return Err(PipelineError::InvalidInput(format!(
                "face min_prob {} is outside [0, 1]",
                self.min_prob
            )));
        }
        Ok(())
    }
}

/// A pixel rectangle `[x0, x1) x [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelRect {
    /// Left column (inclusive).
    pub x0: i64,
    /// Top row (inclusive).
    pub y0: i64,
    /// Right column (exclusive).
    pub x1: i64,
    /// Bottom row (exclusive).
    pub y1: i64,
}

impl PixelRect {
    /// `x1 - x0`.
    pub fn width(&self) -> i64 {
        self.x1 - self.x0
    }

    /// `y1 - y0`.
    pub fn height(&self) -> i64 {
        self.y1 - self.y0
    }

    /// `[x0, y0, x1, y1]`, the layout of the reference's `crop_rect`.
    pub fn to_xyxy(&self) -> [i64; 4] {
        [self.x0, self.y0, self.x1, self.y1]
    }

    fn is_empty(&self) -> bool {
        self.x1 <= self.x0 || self.y1 <= self.y0
    }

    fn contains(&self, x: i64, y: i64) -> bool {
        (self.x0..self.x1).contains(&x) && (self.y0..self.y1).contains(&y)
    }
}

/// `np.round` of a `float32` box coordinate (round half to even), as `int64`.
pub fn round_half_even(v: f32) -> i64 {
    v.round_ties_even() as i64
}

/// Python's `int(x)` of a float: truncation toward zero.
fn py_int(v: f64) -> i64 {
    v.trunc() as i64
}

/// Resolves one slice bound against an axis of length `len`: Python semantics
/// (negative indices count from the end) when `wrap`, a plain clamp otherwise.
fn slice_bound(i: i64, len: i64, wrap: bool) -> i64 {
    if wrap && i < 0 {
        (i + len).max(0)
    } else {
        i.clamp(0, len)
    }
}

/// The image rows/columns `a[start:stop]` selects on an axis of length `len`.
fn slice_range(start: i64, stop: i64, len: i64, wrap: bool) -> (i64, i64) {
    let s = slice_bound(start, len, wrap);
    let e = slice_bound(stop, len, wrap);
    (s, e.max(s))
}

/// The mask slice `[r0, r1, c0, c1]` as `infer_audio2vid.py` writes it, from the rounded
/// box `[x1, y1, x2, y2]` (before any index normalisation).
pub fn mask_slice(rounded: [i64; 4], dilation: f64) -> [i64; 4] {
    let [cb, rb, ce, re] = rounded;
    let r_pad = py_int((re - rb) as f64 * dilation);
    let c_pad = py_int((ce - cb) as f64 * dilation);
    [rb - r_pad, re + r_pad, cb - c_pad, ce + c_pad]
}

/// The region a mask slice actually fills in a `width x height` image (`None` if empty).
pub fn mask_region(slice: [i64; 4], width: i64, height: i64, wrap: bool) -> Option<PixelRect> {
    let [r0, r1, c0, c1] = slice;
    let (y0, y1) = slice_range(r0, r1, height, wrap);
    let (x0, x1) = slice_range(c0, c1, width, wrap);
    let rect = PixelRect { x0, y0, x1, y1 };
    (!rect.is_empty()).then_some(rect)
}

/// The crop rectangle of `infer_audio2vid.py` (`crop_rect`), from the rounded box.
pub fn crop_rect(
    rounded: [i64; 4],
    dilation: f64,
    width: i64,
    height: i64,
    bottom_uses_column_pad: bool,
) -> PixelRect {
    let [cb, rb, ce, re] = rounded;
    let r_pad = py_int((re - rb) as f64 * dilation);
    let c_pad = py_int((ce - cb) as f64 * dilation);
    let bottom_pad = if bottom_uses_column_pad { c_pad } else { r_pad };
    PixelRect {
        x0: (cb - c_pad).max(0),
        y0: (rb - r_pad).max(0),
        x1: (ce + c_pad).min(width),
        y1: (re + bottom_pad).min(height),
    }
}

/// EchoMimic's `crop_and_pad` square (it does not pad): clamp the rectangle, take the
/// shorter side, centre on the integer midpoint, clamp again and shrink to a square.
pub fn crop_and_pad_rect(rect: PixelRect, width: i64, height: i64) -> PixelRect {
    let x0 = rect.x0.max(0);
    let y0 = rect.y0.max(0);
    let x1 = rect.x1.min(width);
    let y1 = rect.y1.min(height);
    let side = (x1 - x0).min(y1 - y0);
    let cx = (x0 + x1).div_euclid(2);
    let cy = (y0 + y1).div_euclid(2);
    let nx0 = (cx - side.div_euclid(2)).max(0);
    let ny0 = (cy - side.div_euclid(2)).max(0);
    let mut nx1 = width.min(nx0 + side);
    let mut ny1 = height.min(ny0 + side);
    if nx1 - nx0 != ny1 - ny0 {
        let side = (nx1 - nx0).min(ny1 - ny0);
        nx1 = nx0 + side;
        ny1 = ny0 + side;
    }
    PixelRect {
        x0: nx0,
        y0: ny0,
        x1: nx1,
        y1: ny1,
    }
}

/// EchoMimic's `select_face`: boxes with `prob > min_prob` (compared in `f32`, as numpy
/// does), the largest `(y2 - y1) * (x2 - x1)`, first one on ties.
pub fn select_face(dets: &[Detection], min_prob: f32) -> Option<&Detection> {
    let area = |d: &Detection| (d.bbox[3] - d.bbox[1]) * (d.bbox[2] - d.bbox[0]);
    dets.iter()
        .filter(|d| d.prob > min_prob)
        .fold(None, |best: Option<&Detection>, d| match best {
            Some(b) if area(b) >= area(d) => Some(b),
            _ => Some(d),
        })
}

// ---------------------------------------------------------------------------------------
// Detector and crop
// ---------------------------------------------------------------------------------------

/// The prepared reference face: detection, geometry, and the resized crop and mask.
#[derive(Debug, Clone)]
pub struct FaceCrop {
    /// Size of the decoded photo `(width, height)`.
    pub image_size: (u32, u32),
    /// The selected detection (box in photo pixels, probability, landmarks).
    pub detection: Detection,
    /// `np.round(box)` as `[x1, y1, x2, y2]` (= `[cb, rb, ce, re]`).
    pub rounded_box: [i64; 4],
    /// The mask slice `[r0, r1, c0, c1]` the reference writes (before Python's index
    /// normalisation; negative values wrap when the quirk is on).
    pub mask_slice: [i64; 4],
    /// The region of the photo-size mask that is 255 (`None`: the mask is empty).
    pub mask_region: Option<PixelRect>,
    /// The crop rectangle before squaring (`crop_rect`).
    pub crop_rect: PixelRect,
    /// The square actually cropped, in coordinates of the decoded (EXIF-oriented) photo:
    /// where generated frames are pasted back.
    pub square_rect: PixelRect,
    /// The crop resized to `(W, H)`, RGB (the pipeline's reference image).
    pub face_rgb: RgbImage,
    /// The mask crop resized to `(W, H)` (soft edges from the bilinear resize).
    pub mask: GrayImage,
}

impl FaceCrop {
    /// The resized crop as OpenCV holds it (`face_img` of the reference, BGR bytes).
    pub fn face_bgr(&self) -> Vec<u8> {
        rgb_to_bgr_bytes(&self.face_rgb)
    }

    /// `mask / 255` as `(1, 1, 1, H, W)` (batch, channel, frame, height, width),
    /// computed in `f32` and cast to `dtype`.
    pub fn mask_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (w, h) = self.mask.dimensions();
        let data: Vec<f32> = self
            .mask
            .as_raw()
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect();
        Ok(Tensor::from_vec(data, (1, 1, 1, h as usize, w as usize), device)?.to_dtype(dtype)?)
    }

    /// The reference image as diffusers' `VaeImageProcessor` prepares it: RGB `/ 255`,
    /// `* 2 - 1`, `(1, 3, H, W)`, in `f32` then cast to `dtype`. (Its Lanczos resize to
    /// `(W, H)` is a no-op because the crop already has that size.)
    pub fn reference_image_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let (w, h) = self.face_rgb.dimensions();
        let (w, h) = (w as usize, h as usize);
        let raw = self.face_rgb.as_raw();
        let mut data = vec![0f32; 3 * h * w];
        for (i, px) in raw.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = 2.0 * (f32::from(px[c]) / 255.0) - 1.0;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), device)?.to_dtype(dtype)?)
    }
}

/// MTCNN with the real weights, plus EchoMimic's selection, mask and crop.
#[derive(Debug, Clone)]
pub struct FaceDetector {
    mtcnn: Mtcnn,
}

impl FaceDetector {
    /// The detector with the embedded weights and EchoMimic's parameters.
    pub fn new(device: &Device) -> Result<Self> {
        let tensors =
            candle_core::safetensors::load_buffer(MTCNN_WEIGHTS, &Device::Cpu).map_err(|e| {
                PipelineError::Weights {
                    path: EMBEDDED_NAME.into(),
                    key: None,
                    message: format!("cannot read embedded safetensors: {e}"),
                }
            })?;
        Self::from_checkpoint(
            &Checkpoint::from_tensors(tensors, EMBEDDED_NAME),
            &MtcnnConfig::default(),
            device,
        )
    }

    /// The detector with weights from a file (`.safetensors` or torch zip `.pt`, keys
    /// `pnet.*`, `rnet.*`, `onet.*`).
    pub fn from_file(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::from_checkpoint(&Checkpoint::load(path)?, &MtcnnConfig::default(), device)
    }

    /// The detector from loaded weights and explicit hyper-parameters. Loading is strict:
    /// missing and unexpected tensors are errors, as `load_state_dict` would report.
    pub fn from_checkpoint(ck: &Checkpoint, cfg: &MtcnnConfig, device: &Device) -> Result<Self> {
        let net = Mtcnn::new(ck.var_builder(mtcnn::DTYPE, device), cfg)?;
        ck.check_complete()?;
        let unused = ck.unused_keys();
        if !unused.is_empty() {
            return Err(PipelineError::Weights {
                path: ck.files().first().cloned().unwrap_or_default(),
                key: unused.first().cloned(),
                message: format!(
                    "{} unexpected tensor(s) for MTCNN: {}",
                    unused.len(),
                    unused.join(", ")
                ),
            });
        }
        Ok(Self { mtcnn: net })
    }

    /// The underlying cascade.
    pub fn mtcnn(&self) -> &Mtcnn {
        &self.mtcnn
    }

    /// All faces, largest first. With `bgr_input` the detector sees B, G, R (reference).
    pub fn detect(&self, image: &RgbImage, bgr_input: bool) -> Result<Vec<Detection>> {
        self.detect_inner(image, bgr_input, None)
    }

    /// Like [`FaceDetector::detect`], recording the cascade's intermediate values.
    pub fn detect_traced(
        &self,
        image: &RgbImage,
        bgr_input: bool,
        trace: &mut MtcnnTrace,
    ) -> Result<Vec<Detection>> {
        self.detect_inner(image, bgr_input, Some(trace))
    }

    fn detect_inner(
        &self,
        image: &RgbImage,
        bgr_input: bool,
        trace: Option<&mut MtcnnTrace>,
    ) -> Result<Vec<Detection>> {
        let (w, h) = image.dimensions();
        let bgr;
        let data: &[u8] = if bgr_input {
            bgr = rgb_to_bgr_bytes(image);
            &bgr
        } else {
            image.as_raw()
        };
        let view = ImageHwc::new(data, h as usize, w as usize)?;
        Ok(match trace {
            Some(t) => self.mtcnn.detect_traced(&view, t)?,
            None => self.mtcnn.detect(&view)?,
        })
    }

    /// Detects, selects, masks, crops and resizes the face to `width x height`.
    ///
    /// Fails with [`PipelineError::NoFace`] when no detection has `prob > min_prob`.
    pub fn crop_face(
        &self,
        image: &RgbImage,
        width: u32,
        height: u32,
        opts: &FaceCropOptions,
    ) -> Result<FaceCrop> {
        opts.validate()?;
        if width == 0 || height == 0 {
            return Err(PipelineError::InvalidInput(format!(
                "output size {width}x{height} is empty"
            )));
        }
        let dets = self.detect(image, opts.quirks.bgr_detector_input)?;
        crop_from_detections(image, &dets, width, height, opts)
    }
}

/// The selection, mask, crop and resize of [`FaceDetector::crop_face`] on given detections.
pub fn crop_from_detections(
    image: &RgbImage,
    dets: &[Detection],
    width: u32,
    height: u32,
    opts: &FaceCropOptions,
) -> Result<FaceCrop> {
    opts.validate()?;
    let (iw, ih) = image.dimensions();
    let (iw64, ih64) = (i64::from(iw), i64::from(ih));
    let det = *select_face(dets, opts.min_prob).ok_or_else(|| PipelineError::NoFace {
        best: dets.iter().map(|d| d.prob).reduce(f32::max),
    })?;
    let rounded = det.bbox.map(round_half_even);
    let mslice = mask_slice(rounded, opts.mask_dilation);
    let region = mask_region(mslice, iw64, ih64, opts.quirks.mask_negative_index_wrap);
    let crop = crop_rect(
        rounded,
        opts.crop_dilation,
        iw64,
        ih64,
        opts.quirks.crop_bottom_uses_column_pad,
    );
    let square = crop_and_pad_rect(crop, iw64, ih64);
    if square.is_empty() {
        return Err(image_err(format!(
            "the face crop {:?} is empty for a {iw}x{ih} photo (face box {:?})",
            square.to_xyxy(),
            det.bbox
        )));
    }
    // The square lies inside the image: crop_and_pad clamps every side.
    let (sw, sh) = (square.width() as usize, square.height() as usize);
    let stride = iw as usize * 3;
    let mut face = Vec::with_capacity(sw * sh * 3);
    let mut mask = Vec::with_capacity(sw * sh);
    for y in square.y0..square.y1 {
        let row = y as usize * stride;
        face.extend_from_slice(
            &image.as_raw()[row + square.x0 as usize * 3..row + square.x1 as usize * 3],
        );
        mask.extend((square.x0..square.x1).map(|x| match region {
            Some(r) if r.contains(x, y) => 255u8,
            _ => 0u8,
        }));
    }
    let (w, h) = (width as usize, height as usize);
    let face = resize_bilinear_opencv(&face, sw, sh, 3, w, h)?;
    let mask = resize_bilinear_opencv(&mask, sw, sh, 1, w, h)?;
    let face_rgb = RgbImage::from_raw(width, height, face)
        .ok_or_else(|| image_err("internal: resized face has the wrong size"))?;
    let mask = GrayImage::from_raw(width, height, mask)
        .ok_or_else(|| image_err("internal: resized mask has the wrong size"))?;
    Ok(FaceCrop {
        image_size: (iw, ih),
        detection: det,
        rounded_box: rounded,
        mask_slice: mslice,
        mask_region: region,
        crop_rect: crop,
        square_rect: square,
        face_rgb,
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn np_round_is_half_to_even() {
        assert_eq!(round_half_even(62.5), 62);
        assert_eq!(round_half_even(63.5), 64);
        assert_eq!(round_half_even(-0.5), 0);
        assert_eq!(round_half_even(-1.5), -2);
        assert_eq!(round_half_even(182.877), 183);
    }

    #[test]
    fn mask_wraps_a_negative_start_like_numpy() {
        // face touching the top-left corner: box [x1, y1, x2, y2]
        let rounded = [2, 3, 52, 103];
        let slice = mask_slice(rounded, 0.1);
        assert_eq!(slice, [3 - 10, 103 + 10, 2 - 5, 52 + 5]);
        // numpy: rows -7:113 of a 200-row image -> 193:113 -> empty
        assert_eq!(mask_region(slice, 300, 200, true), None);
        // clamped: rows 0..113, cols 0..57
        assert_eq!(
            mask_region(slice, 300, 200, false),
            Some(PixelRect {
                x0: 0,
                y0: 0,
                x1: 57,
                y1: 113
            })
        );
        // start wraps to a position still before the stop: a strip remains
        let slice = [-7, 198, 10, 20];
        assert_eq!(
            mask_region(slice, 300, 200, true),
            Some(PixelRect {
                x0: 10,
                y0: 193,
                x1: 20,
                y1: 198
            })
        );
        // a start more negative than the axis clamps to 0 after wrapping
        assert_eq!(slice_range(-500, 10, 200, true), (0, 10));
        // a stop past the end clamps in both modes
        assert_eq!(slice_range(5, 900, 200, true), (5, 200));
    }

    #[test]
    fn crop_bottom_quirk_uses_the_column_pad() {
        // golden case: box (183, 63, 269, 173) in a 512x512 photo
        let rounded = [183, 63, 269, 173];
        let reference = crop_rect(rounded, 0.5, 512, 512, true);
        assert_eq!(reference.to_xyxy(), [140, 8, 312, 216]);
        let fixed = crop_rect(rounded, 0.5, 512, 512, false);
        assert_eq!(fixed.to_xyxy(), [140, 8, 312, 228]);
        assert_eq!(
            crop_and_pad_rect(reference, 512, 512).to_xyxy(),
            [140, 26, 312, 198]
        );
        assert_eq!(mask_slice(rounded, 0.1), [52, 184, 175, 277]);
    }

    #[test]
    fn crop_and_pad_squares_at_the_border() {
        // tall rectangle hugging the right edge of a 100x80 image
        let r = PixelRect {
            x0: 70,
            y0: -5,
            x1: 130,
            y1: 90,
        };
        // clamp -> (70,0,100,80): side 30, centre (85, 40) -> x0 70, y0 25
        assert_eq!(crop_and_pad_rect(r, 100, 80).to_xyxy(), [70, 25, 100, 55]);
        // wide rectangle at the bottom: centre forces a clamp then a shrink
        let r = PixelRect {
            x0: 0,
            y0: 60,
            x1: 100,
            y1: 80,
        };
        assert_eq!(crop_and_pad_rect(r, 100, 80).to_xyxy(), [40, 60, 60, 80]);
    }

    #[test]
    fn select_face_keeps_the_largest_confident_box() {
        let d = |bbox: [f32; 4], prob| Detection {
            bbox,
            prob,
            landmarks: [[0.0; 2]; 5],
        };
        let dets = [
            d([0., 0., 50., 50.], 0.79),
            d([0., 0., 20., 20.], 0.95),
            d([0., 0., 30., 30.], 0.81),
            d([5., 5., 35., 35.], 0.99),
        ];
        // 0.79 is rejected; 30x30 twice -> first one wins
        assert_eq!(select_face(&dets, 0.8).map(|x| x.prob), Some(0.81));
        assert!(select_face(&dets[..1], 0.8).is_none());
        // f32 comparison: prob == f32(0.8) is not > 0.8
        assert!(select_face(&[d([0., 0., 9., 9.], 0.8)], 0.8).is_none());
    }

    #[test]
    fn opencv_bilinear_upscales_with_clamped_borders() -> Result<()> {
        // 2x1 -> 4x1: weights (2048,0), (1536,512), (512,1536), border
        let out = resize_bilinear_opencv(&[0, 100], 2, 1, 1, 4, 1)?;
        assert_eq!(out, [0, 25, 75, 100]);
        // 1x2 -> 1x4 vertically: rows clamped, same weights
        let out = resize_bilinear_opencv(&[0, 100], 1, 2, 1, 1, 4)?;
        assert_eq!(out, [0, 25, 75, 100]);
        // same size is a copy
        assert_eq!(
            resize_bilinear_opencv(&[1, 2, 3], 1, 1, 3, 1, 1)?,
            [1, 2, 3]
        );
        assert!(resize_bilinear_opencv(&[1, 2], 1, 1, 3, 1, 1).is_err());
        assert!(resize_bilinear_opencv(&[], 0, 1, 3, 1, 1).is_err());
        Ok(())
    }

    #[test]
    fn opencv_bilinear_exact_2x_downscale_is_a_rounded_mean() -> Result<()> {
        // 4x2 -> 2x1: means of 2x2 blocks, (s + 2) >> 2
        let src = [0, 1, 10, 10, 1, 1, 10, 11];
        assert_eq!(resize_bilinear_opencv(&src, 4, 2, 1, 2, 1)?, [1, 10]);
        Ok(())
    }

    #[test]
    fn opencv_bilinear_rounds_like_simd_then_scalar_tail() -> Result<()> {
        // 24 columns (horizontal identity), rows [1; 24] and [6; 24], 2 -> 5 rows.
        // Output row 1 samples fy = 0.1 between source rows 0 and 1: weights
        // b = (round(0.9 * 2048), round(0.1 * 2048)) = (1843, 205).
        //   OpenCV SIMD lanes: ((2048 >> 4) * 1843 >> 16) + ((12288 >> 4) * 205 >> 16)
        //                      = 3 + 2 = 5, (5 + 2) >> 2 = 1
        //   OpenCV scalar:     (2048 * 1843 + 12288 * 205 + 2^21) >> 22 = 2
        // With 24 outputs per row the 16-lane loop covers x < 16 and, since the 8-lane
        // loop requires x < 24 - 8, the last 8 go through the scalar formula.
        let w = 24;
        let src: Vec<u8> = [vec![1u8; w], vec![6u8; w]].concat();
        let out = resize_bilinear_opencv(&src, w, 2, 1, w, 5)?;
        let row1 = &out[w..2 * w];
        assert_eq!(&row1[..16], &[1u8; 16]);
        assert_eq!(&row1[16..], &[2u8; 8]);
        // Row 0 (fy = -0.3 -> both taps on row 0, weights 614 + 1434) stays 1 everywhere.
        assert_eq!(&out[..w], &[1u8; 24]);
        // Row 2 samples half-way (b = 1024, 1024): 3.5 rounds up in both formulas.
        assert_eq!(&out[2 * w..3 * w], &[4u8; 24]);
        Ok(())
    }
}
