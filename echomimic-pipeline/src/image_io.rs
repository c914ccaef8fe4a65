//! JPEG decoding with libjpeg-turbo, the library behind the reference's `cv2.imread`.
//!
//! OpenCV decodes JPEG with libjpeg-turbo's defaults: the accurate integer IDCT
//! (`JDCT_ISLOW`) and "fancy" (triangle-filter) chroma upsampling. The `turbojpeg` crate
//! builds the same library from source (cmake; nasm for its SIMD code, which gives the same
//! pixels as its C code) and its defaults are those, so the pixels equal OpenCV 4.11's bit for
//! bit on baseline and progressive, 4:2:0, 4:2:2 and 4:4:4, grey, CMYK and EXIF-rotated photos
//! (`tests/photo_opencv.rs`). Other decoders (`zune-jpeg`, behind the `image` crate) round
//! differently and land a unit or a few away on some pixels.
//!
//! CMYK and YCCK JPEGs (rare outside print workflows) are decoded to libjpeg-turbo's CMYK
//! output and converted with OpenCV's own CMYK → BGR formula (`c' = k − ((255 − c)·k >> 8)`,
//! per channel).

use image::RgbImage;
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};

/// Decodes JPEG bytes to 8-bit RGB exactly as `cv2.imread(path, IMREAD_COLOR)` does (then
/// swapped to RGB). The EXIF orientation is not applied here. `Err` carries libjpeg-turbo's
/// message.
pub fn decode_jpeg_like_opencv(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut d = Decompressor::new().map_err(|e| e.to_string())?;
    let header = d.read_header(bytes).map_err(|e| e.to_string())?;
    let (w, h) = (header.width, header.height);
    let cmyk = matches!(header.colorspace, Colorspace::CMYK | Colorspace::YCCK);
    let format = if cmyk {
        PixelFormat::CMYK
    } else {
        PixelFormat::RGB
    };
    let size = format.size();
    let mut pixels = vec![0u8; w * h * size];
    d.decompress(
        bytes,
        Image {
            pixels: pixels.as_mut_slice(),
            width: w,
            pitch: w * size,
            height: h,
            format,
        },
    )
    .map_err(|e| e.to_string())?;
    let rgb = if cmyk {
        pixels
            .chunks_exact(4)
            .flat_map(|p| {
                let k = u32::from(p[3]);
                let ch = |v: u8| (k - (((255 - u32::from(v)) * k) >> 8)) as u8;
                [ch(p[0]), ch(p[1]), ch(p[2])]
            })
            .collect()
    } else {
        pixels
    };
    let (w, h) = (
        u32::try_from(w).map_err(|_| "image too wide".to_owned())?,
        u32::try_from(h).map_err(|_| "image too tall".to_owned())?,
    );
    RgbImage::from_raw(w, h, rgb).ok_or_else(|| "decoded buffer has the wrong size".to_owned())
}
