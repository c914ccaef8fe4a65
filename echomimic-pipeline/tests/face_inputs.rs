//! Photo decoding and bad-input handling of the face stage.

mod common;

use std::io::Cursor;

use candle_core::Device;
use candle_nn::VarBuilder;
use echomimic_pipeline::face::{self, FaceCropOptions, FaceDetector, ImageLimits};
use echomimic_pipeline::models::mtcnn::{ImageHwc, Mtcnn, MtcnnConfig, MtcnnTrace};
use echomimic_pipeline::PipelineError;
use image::codecs::jpeg::JpegEncoder;
use image::{
    DynamicImage, GrayImage, ImageBuffer, ImageEncoder, ImageFormat, Luma, Rgb, RgbImage, Rgba,
    RgbaImage,
};

fn encode(img: &DynamicImage, format: ImageFormat) -> anyhow::Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format)?;
    Ok(out.into_inner())
}

/// A big-endian TIFF block with one IFD entry: Orientation (0x0112) = `value`.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut t = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    t.extend_from_slice(&1u16.to_be_bytes()); // one entry
    t.extend_from_slice(&0x0112u16.to_be_bytes()); // tag
    t.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    t.extend_from_slice(&1u32.to_be_bytes()); // count
    t.extend_from_slice(&value.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    t
}

fn is_bad_image(r: Result<impl std::fmt::Debug, PipelineError>, needle: &str) {
    match r {
        Err(PipelineError::Image(m)) => {
            assert!(m.contains(needle), "message {m:?} lacks {needle:?}")
        }
        other => panic!("expected PipelineError::Image({needle}..), got {other:?}"),
    }
}

#[test]
fn jpeg_exif_orientation_is_applied() -> anyhow::Result<()> {
    // 16x8 landscape: left half red, right half blue. Orientation 6 = rotate 90 deg
    // clockwise to display, so the decoded photo is 8x16 with red on top.
    let img = RgbImage::from_fn(16, 8, |x, _| {
        if x < 8 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut bytes = Vec::new();
    let mut enc = JpegEncoder::new_with_quality(&mut bytes, 95);
    enc.set_exif_metadata(exif_orientation(6))?;
    enc.write_image(img.as_raw(), 16, 8, image::ExtendedColorType::Rgb8)?;

    let out = face::decode_image(&bytes, &ImageLimits::default())?;
    assert_eq!(out.dimensions(), (8, 16));
    let top = out.get_pixel(4, 2).0;
    let bottom = out.get_pixel(4, 13).0;
    assert!(top[0] > 200 && top[2] < 60, "top {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "bottom {bottom:?}");

    // Without the tag the same pixels keep their layout.
    let mut plain = Vec::new();
    JpegEncoder::new_with_quality(&mut plain, 95).write_image(
        img.as_raw(),
        16,
        8,
        image::ExtendedColorType::Rgb8,
    )?;
    assert_eq!(
        face::decode_image(&plain, &ImageLimits::default())?.dimensions(),
        (16, 8)
    );
    Ok(())
}

#[test]
fn alpha_grey_and_16_bit_are_converted_like_cv2_imread() -> anyhow::Result<()> {
    // RGBA: alpha dropped without compositing.
    let rgba = RgbaImage::from_pixel(3, 2, Rgba([10, 20, 30, 0]));
    let out = face::decode_image(
        &encode(&rgba.into(), ImageFormat::Png)?,
        &ImageLimits::default(),
    )?;
    assert!(out.pixels().all(|p| p.0 == [10, 20, 30]));
    // Grey: replicated.
    let grey = GrayImage::from_pixel(3, 2, Luma([77]));
    let out = face::decode_image(
        &encode(&grey.into(), ImageFormat::Png)?,
        &ImageLimits::default(),
    )?;
    assert!(out.pixels().all(|p| p.0 == [77, 77, 77]));
    // 16-bit: high byte (png_set_strip_16), 0x12ff -> 0x12, not rounded to 0x13.
    let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(2, 2, Rgb([0x12ff, 0xff00, 0x0080]));
    let out = face::decode_image(
        &encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png)?,
        &ImageLimits::default(),
    )?;
    assert!(out.pixels().all(|p| p.0 == [0x12, 0xff, 0x00]));
    Ok(())
}

#[test]
fn gif_decodes_its_first_frame_and_bmp_webp_work() -> anyhow::Result<()> {
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 3, Rgb([0, 255, 0])));
    for format in [ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::WebP] {
        let out = face::decode_image(&encode(&img, format)?, &ImageLimits::default())?;
        assert_eq!(out.dimensions(), (4, 3), "{format:?}");
        assert!(
            out.pixels().all(|p| p.0[1] > 200 && p.0[0] < 30),
            "{format:?}"
        );
    }
    Ok(())
}

#[test]
fn corrupt_empty_unknown_and_huge_images_are_typed_errors() -> anyhow::Result<()> {
    let limits = ImageLimits::default();
    is_bad_image(face::decode_image(&[], &limits), "empty");
    is_bad_image(
        face::decode_image(b"definitely not an image", &limits),
        "unrecognised",
    );
    // a PNG cut short after its header
    let png = encode(
        &DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 64, Rgb([1, 2, 3]))),
        ImageFormat::Png,
    )?;
    is_bad_image(face::decode_image(&png[..60], &limits), "cannot decode");
    // a JPEG whose entropy-coded data is garbage
    let mut jpeg = Vec::new();
    JpegEncoder::new(&mut jpeg).write_image(&[9u8; 48], 4, 4, image::ExtendedColorType::Rgb8)?;
    let cut = jpeg.len() / 2;
    is_bad_image(face::decode_image(&jpeg[..cut], &limits), "cannot decode");
    // over the size limits, refused before decoding
    let small = ImageLimits {
        max_side: 32,
        max_pixels: 1_000_000,
    };
    is_bad_image(face::decode_image(&png, &small), "over the limit");
    let few = ImageLimits {
        max_side: 1000,
        max_pixels: 4000,
    };
    is_bad_image(face::decode_image(&png, &few), "over the limit");
    // a missing file is an I/O error naming the path
    match face::load_image("/no/such/photo.png", &limits) {
        Err(PipelineError::Io { path, .. }) => assert!(path.ends_with("photo.png")),
        other => panic!("expected Io error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn blank_and_tiny_photos_have_no_face() -> anyhow::Result<()> {
    let det = FaceDetector::new(&Device::Cpu)?;
    let opts = FaceCropOptions::default();
    for img in [
        RgbImage::from_pixel(256, 192, Rgb([128, 128, 128])),
        RgbImage::from_pixel(12, 40, Rgb([200, 180, 160])),
    ] {
        match det.crop_face(&img, 64, 48, &opts) {
            Err(e @ PipelineError::NoFace { .. }) => assert!(e.is_bad_input()),
            other => panic!("expected NoFace, got {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn invalid_options_and_sizes_are_rejected() -> anyhow::Result<()> {
    let det = FaceDetector::new(&Device::Cpu)?;
    let img = RgbImage::from_pixel(64, 64, Rgb([0, 0, 0]));
    let bad = FaceCropOptions {
        crop_dilation: f64::NAN,
        ..FaceCropOptions::default()
    };
    assert!(matches!(
        det.crop_face(&img, 64, 64, &bad),
        Err(PipelineError::InvalidInput(_))
    ));
    assert!(matches!(
        det.crop_face(&img, 0, 64, &FaceCropOptions::default()),
        Err(PipelineError::InvalidInput(_))
    ));
    Ok(())
}

#[test]
fn weights_load_from_a_file_and_are_checked_strictly() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("echomimic-mtcnn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("mtcnn.safetensors");
    std::fs::write(&path, face::MTCNN_WEIGHTS)?;
    let from_file = FaceDetector::from_file(&path, &Device::Cpu);
    // a file missing the O-Net is refused with the key named
    let mut tensors = candle_core::safetensors::load_buffer(face::MTCNN_WEIGHTS, &Device::Cpu)?;
    tensors.retain(|k, _| !k.starts_with("onet."));
    let partial = dir.join("partial.safetensors");
    candle_core::safetensors::save(&tensors, &partial)?;
    let err = FaceDetector::from_file(&partial, &Device::Cpu);
    std::fs::remove_dir_all(&dir)?;
    from_file?;
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        msg.contains("onet.") && msg.contains("partial.safetensors"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn pnet_strips_give_the_same_detections() -> anyhow::Result<()> {
    let photo = face::load_image(
        common::golden_dir().join("inputs/astronaut.png"),
        &ImageLimits::default(),
    )?;
    let bgr = face::rgb_to_bgr_bytes(&photo);
    let (w, h) = photo.dimensions();
    let view = ImageHwc::new(&bgr, h as usize, w as usize)?;
    let vb = VarBuilder::from_slice_safetensors(
        face::MTCNN_WEIGHTS,
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let whole = Mtcnn::new(vb, &MtcnnConfig::default())?;
    // every P-Net level above 20k pixels runs in strips of about 27 output rows
    let strips = whole.clone().with_pnet_strip_pixels(20_000);
    let (mut ta, mut tb) = (MtcnnTrace::default(), MtcnnTrace::default());
    let a = whole.detect_traced(&view, &mut ta)?;
    let b = strips.detect_traced(&view, &mut tb)?;
    assert_eq!(ta.pnet_candidates, tb.pnet_candidates);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for i in 0..4 {
            assert!((x.bbox[i] - y.bbox[i]).abs() < 1e-3, "{x:?} vs {y:?}");
        }
        assert!((x.prob - y.prob).abs() < 1e-5);
    }
    Ok(())
}
