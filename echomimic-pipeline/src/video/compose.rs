//! Turning generated frames into output frames: even-size cropping and the
//! feathered paste-back into the original photo.

use std::fmt;

use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb, RgbImage};

use crate::error::{PipelineError, Result};

/// Largest accepted output side in pixels.
pub(super) const MAX_SIDE: u32 = 8192;

/// What the output frames look like.
#[derive(Clone, Debug, Default)]
pub enum OutputGeometry {
    /// The generated frames as they are (an odd side loses its last pixel).
    #[default]
    Crop,
    /// Each frame resized into the crop rectangle of the original photo and
    /// blended in with a feathered edge; output = photo size made even.
    PasteBack(PasteBack),
}

/// Pastes generated frames back into the original photo (the EchoMe worker's
/// output, docs/model.md M13), without a visible seam.
///
/// * Each frame is resized to the crop rectangle with a **bicubic**
///   (Catmull-Rom, a = -0.5) filter, which is PIL's `BICUBIC`, the filter the
///   EchoMe worker used; the resize is skipped when the sizes already match.
/// * It is blended into a copy of the photo with a weight that ramps from 0 at
///   the rectangle's edge to 1 over a band of `feather * min(rect_w, rect_h)`
///   pixels (smoothstep ramp, 6 % by default, about 30 px for a 512 px face
///   crop); the two axes multiply, so corners are round. Edges of the
///   rectangle that lie on the photo border are not feathered (there is
///   nothing to blend with there).
/// * The rectangle is `[x0, y0, x1, y1]` in photo pixels, end exclusive (PIL's
///   crop box). Parts of it outside the photo are clipped, as PIL's `paste`
///   does.
/// * The output is the photo size made even by dropping the last column / row
///   when odd.
#[derive(Clone)]
pub struct PasteBack {
    photo: RgbImage,
    rect: [u32; 4],
    feather: f32,
}

impl fmt::Debug for PasteBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PasteBack")
            .field("photo", &self.photo.dimensions())
            .field("rect", &self.rect)
            .field("feather", &self.feather)
            .finish()
    }
}

impl PasteBack {
    /// Default feather band as a fraction of the rectangle's shorter side.
    pub const DEFAULT_FEATHER: f32 = 0.06;

    /// Paste-back into `photo` (RGB, as decoded, before any face crop) at
    /// `rect = [x0, y0, x1, y1]`.
    pub fn new(photo: RgbImage, rect: [u32; 4]) -> Result<Self> {
        let (w, h) = photo.dimensions();
        if w < 2 || h < 2 || w > MAX_SIDE || h > MAX_SIDE {
            return Err(PipelineError::InvalidInput(format!(
                "paste-back photo is {w}x{h}, each side must be in 2..={MAX_SIDE}"
            )));
        }
        let [x0, y0, x1, y1] = rect;
        if x0 >= x1 || y0 >= y1 {
            return Err(PipelineError::InvalidInput(format!(
                "paste-back rectangle {rect:?} is empty (need x0 < x1 and y0 < y1)"
            )));
        }
        let (ew, eh) = (w & !1, h & !1);
        if x0 >= ew || y0 >= eh {
            return Err(PipelineError::InvalidInput(format!(
                "paste-back rectangle {rect:?} lies outside the {ew}x{eh} output"
            )));
        }
        if x1 - x0 > 4 * MAX_SIDE || y1 - y0 > 4 * MAX_SIDE {
            return Err(PipelineError::InvalidInput(format!(
                "paste-back rectangle {rect:?} is unreasonably large"
            )));
        }
        Ok(Self {
            photo,
            rect,
            feather: Self::DEFAULT_FEATHER,
        })
    }

    /// Sets the feather band as a fraction of the rectangle's shorter side
    /// (`0` = hard paste, at most `0.5`).
    pub fn with_feather(mut self, fraction: f32) -> Result<Self> {
        if !(0.0..=0.5).contains(&fraction) {
            return Err(PipelineError::InvalidInput(format!(
                "feather fraction {fraction} is outside [0, 0.5]"
            )));
        }
        self.feather = fraction;
        Ok(self)
    }

    /// The photo.
    pub fn photo(&self) -> &RgbImage {
        &self.photo
    }

    /// The rectangle `[x0, y0, x1, y1]`.
    pub fn rect(&self) -> [u32; 4] {
        self.rect
    }

    /// The feather fraction.
    pub fn feather(&self) -> f32 {
        self.feather
    }

    /// Output `(width, height)`: the photo size made even.
    pub fn output_size(&self) -> (u32, u32) {
        let (w, h) = self.photo.dimensions();
        (w & !1, h & !1)
    }

    /// Composes one `width x height` RGB24 frame into a new image (the writer
    /// reuses its buffers instead; this is for previews and tests).
    pub fn compose(&self, rgb: &[u8], width: u32, height: u32) -> Result<RgbImage> {
        let mut c = Compositor::new(self);
        c.compose(rgb, width, height)?;
        let (w, h) = self.output_size();
        ImageBuffer::from_raw(w, h, c.out)
            .ok_or_else(|| PipelineError::Media("composed frame has the wrong size".into()))
    }
}

/// Per-writer frame shaping state (one output frame buffer, reused).
pub(crate) enum FrameShaper {
    Crop {
        in_w: u32,
        out_w: u32,
        out_h: u32,
        buf: Vec<u8>,
    },
    Paste {
        in_w: u32,
        in_h: u32,
        compositor: Box<Compositor>,
    },
}

impl FrameShaper {
    pub(crate) fn new(in_w: u32, in_h: u32, geometry: &OutputGeometry) -> Result<Self> {
        Ok(match geometry {
            OutputGeometry::Crop => {
                let (out_w, out_h) = (in_w & !1, in_h & !1);
                Self::Crop {
                    in_w,
                    out_w,
                    out_h,
                    buf: vec![0; out_w as usize * out_h as usize * 3],
                }
            }
            OutputGeometry::PasteBack(p) => Self::Paste {
                in_w,
                in_h,
                compositor: Box::new(Compositor::new(p)),
            },
        })
    }

    pub(crate) fn output_size(&self) -> (u32, u32) {
        match self {
            Self::Crop { out_w, out_h, .. } => (*out_w, *out_h),
            Self::Paste { compositor, .. } => (compositor.out_w, compositor.out_h),
        }
    }

    /// Shapes one input frame (already checked to be `in_w * in_h * 3` bytes).
    pub(crate) fn shape(&mut self, rgb: &[u8]) -> Result<&[u8]> {
        match self {
            Self::Crop {
                in_w,
                out_w,
                out_h,
                buf,
            } => {
                let src_row = *in_w as usize * 3;
                let dst_row = *out_w as usize * 3;
                for (dst, src) in buf
                    .chunks_exact_mut(dst_row)
                    .zip(rgb.chunks_exact(src_row))
                    .take(*out_h as usize)
                {
                    dst.copy_from_slice(&src[..dst_row]);
                }
                Ok(buf)
            }
            Self::Paste {
                in_w,
                in_h,
                compositor,
            } => {
                compositor.compose(rgb, *in_w, *in_h)?;
                Ok(&compositor.out)
            }
        }
    }

    /// The most recent output frame.
    pub(crate) fn last_frame(&self) -> &[u8] {
        match self {
            Self::Crop { buf, .. } => buf,
            Self::Paste { compositor, .. } => &compositor.out,
        }
    }
}

/// The photo, the output buffer and the precomputed blend weights.
pub(crate) struct Compositor {
    photo: Vec<u8>,
    out: Vec<u8>,
    out_w: u32,
    out_h: u32,
    /// Full rectangle size: generated frames are resized to this.
    rect_w: u32,
    rect_h: u32,
    /// Rectangle origin in the photo.
    rx0: u32,
    ry0: u32,
    /// Visible (clipped) part of the rectangle, photo coordinates, end exclusive.
    cx1: u32,
    cy1: u32,
    /// Blend weights (0..=256) for the visible columns / rows.
    wx: Vec<u32>,
    wy: Vec<u32>,
}

impl Compositor {
    fn new(p: &PasteBack) -> Self {
        let (out_w, out_h) = p.output_size();
        let (pw, _) = p.photo.dimensions();
        let src_row = pw as usize * 3;
        let dst_row = out_w as usize * 3;
        let mut photo = Vec::with_capacity(dst_row * out_h as usize);
        for row in p.photo.as_raw().chunks_exact(src_row).take(out_h as usize) {
            photo.extend_from_slice(&row[..dst_row]);
        }
        let [rx0, ry0, x1, y1] = p.rect;
        let (rect_w, rect_h) = (x1 - rx0, y1 - ry0);
        let (cx1, cy1) = (x1.min(out_w), y1.min(out_h));
        let band = p.feather * rect_w.min(rect_h) as f32;
        let wx = edge_weights(rect_w, band, rx0 > 0, x1 < out_w, (cx1 - rx0) as usize);
        let wy = edge_weights(rect_h, band, ry0 > 0, y1 < out_h, (cy1 - ry0) as usize);
        Self {
            out: photo.clone(),
            photo,
            out_w,
            out_h,
            rect_w,
            rect_h,
            rx0,
            ry0,
            cx1,
            cy1,
            wx,
            wy,
        }
    }

    fn compose(&mut self, rgb: &[u8], width: u32, height: u32) -> Result<()> {
        if rgb.len() != width as usize * height as usize * 3 {
            return Err(PipelineError::InvalidInput(format!(
                "frame has {} bytes, expected {width}x{height} RGB24",
                rgb.len()
            )));
        }
        let src: ImageBuffer<Rgb<u8>, &[u8]> = ImageBuffer::from_raw(width, height, rgb)
            .ok_or_else(|| PipelineError::InvalidInput("frame buffer too small".into()))?;
        let resized;
        let gen: &[u8] = if (width, height) == (self.rect_w, self.rect_h) {
            rgb
        } else {
            resized = imageops::resize(&src, self.rect_w, self.rect_h, FilterType::CatmullRom);
            resized.as_raw()
        };
        let gen_row = self.rect_w as usize * 3;
        let out_row = self.out_w as usize * 3;
        let (x0, y0) = (self.rx0 as usize, self.ry0 as usize);
        let visible = (self.cx1 - self.rx0) as usize;
        for (j, &ay) in self.wy.iter().enumerate() {
            let y = y0 + j;
            debug_assert!(y < self.cy1 as usize);
            let start = y * out_row + x0 * 3;
            let end = start + visible * 3;
            let photo = &self.photo[start..end];
            let out = &mut self.out[start..end];
            let g = &gen[j * gen_row..j * gen_row + visible * 3];
            for (i, &ax) in self.wx.iter().enumerate() {
                let a = ax * ay; // 0..=65536
                for c in 0..3 {
                    let k = i * 3 + c;
                    let v = u32::from(g[k]) * a + u32::from(photo[k]) * (65536 - a) + 32768;
                    out[k] = (v >> 16) as u8;
                }
            }
        }
        Ok(())
    }
}

/// Weights in `0..=256` for the first `visible` of `len` positions: a
/// smoothstep ramp of `band` pixels at each feathered end, 256 elsewhere.
fn edge_weights(
    len: u32,
    band: f32,
    feather_start: bool,
    feather_end: bool,
    visible: usize,
) -> Vec<u32> {
    let ramp = |d: f32| -> f32 {
        if band < 1.0 {
            return 1.0;
        }
        let t = (d / band).clamp(0.0, 1.0);
        t * t * (3.0 - 2.0 * t)
    };
    (0..visible)
        .map(|i| {
            let mut w: f32 = 1.0;
            if feather_start {
                w = w.min(ramp(i as f32 + 0.5));
            }
            if feather_end {
                w = w.min(ramp(len as f32 - i as f32 - 0.5));
            }
            (w * 256.0).round() as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_ramp_smoothly_and_only_on_interior_edges() {
        let w = edge_weights(100, 10.0, true, true, 100);
        assert!(w[0] < 10, "first weight {}", w[0]);
        assert_eq!(w[50], 256);
        assert!(w[99] < 10);
        assert!(w.windows(2).take(10).all(|p| p[1] >= p[0]));
        let w = edge_weights(100, 10.0, false, true, 100);
        assert_eq!(w[0], 256);
        let hard = edge_weights(100, 0.0, true, true, 100);
        assert!(hard.iter().all(|&v| v == 256));
    }

    #[test]
    fn odd_sizes_are_cropped_to_even() -> Result<()> {
        let mut s = FrameShaper::new(5, 3, &OutputGeometry::Crop)?;
        assert_eq!(s.output_size(), (4, 2));
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|v| v as u8).collect();
        let out = s.shape(&rgb)?.to_vec();
        assert_eq!(out.len(), 4 * 2 * 3);
        assert_eq!(&out[..12], &rgb[..12]);
        assert_eq!(&out[12..24], &rgb[15..27]);
        Ok(())
    }

    #[test]
    fn paste_back_keeps_the_photo_outside_and_the_frame_inside() -> Result<()> {
        let photo = RgbImage::from_pixel(101, 81, Rgb([10, 20, 30]));
        let p = PasteBack::new(photo, [20, 10, 80, 70])?;
        assert_eq!(p.output_size(), (100, 80));
        let frame = vec![200u8; 60 * 60 * 3];
        let img = p.compose(&frame, 60, 60)?;
        assert_eq!(img.dimensions(), (100, 80));
        assert_eq!(img.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(img.get_pixel(19, 40).0, [10, 20, 30]);
        assert_eq!(img.get_pixel(50, 40).0, [200, 200, 200]);
        // the band is 6 % of 60 px = 3.6 px: the first column is mostly photo,
        // the fifth is all frame, and the ramp in between is monotonic
        let ramp: Vec<u8> = (20..25).map(|x| img.get_pixel(x, 40).0[0]).collect();
        assert!(ramp[0] < 40, "edge column {ramp:?}");
        assert_eq!(ramp[4], 200, "{ramp:?}");
        assert!(ramp.windows(2).all(|w| w[1] >= w[0]), "{ramp:?}");
        Ok(())
    }

    #[test]
    fn paste_back_clips_rectangles_past_the_photo() -> Result<()> {
        let photo = RgbImage::from_pixel(32, 32, Rgb([0, 0, 0]));
        let p = PasteBack::new(photo, [16, 16, 48, 48])?;
        let img = p.compose(&[255u8; 8 * 8 * 3], 8, 8)?;
        assert_eq!(img.get_pixel(31, 31).0, [255, 255, 255]);
        assert!(PasteBack::new(RgbImage::new(32, 32), [40, 0, 50, 10]).is_err());
        assert!(PasteBack::new(RgbImage::new(32, 32), [10, 10, 10, 20]).is_err());
        Ok(())
    }
}
