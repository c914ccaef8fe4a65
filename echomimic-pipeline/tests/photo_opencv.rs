//! Photos decode to exactly the pixels the reference's `cv2.imread(path, IMREAD_COLOR)` gives.
//!
//! `testdata/inputs/photos/` holds JPEG and PNG variants cut from a real portrait (baseline and
//! progressive, 4:2:0 / 4:2:2 / 4:4:4, grey, CMYK, EXIF-rotated, odd sizes; PNG 16-bit, alpha,
//! palette, grey) and, in
//! `expected.json`, a fingerprint of OpenCV 4.11's decode of each, made once by
//! `scripts/make-photo-vectors.py`; the reference's own sample `echomimic_a.png` (a JPEG) is
//! checked too. No Python needed here.

mod common;

use std::path::{Path, PathBuf};

use common::fnv1a64;
use echomimic_pipeline::face::{self, ImageLimits};

fn inputs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/inputs")
}

#[test]
fn photo_pixels_equal_opencv_imread() -> anyhow::Result<()> {
    let dir = inputs().join("photos");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let images = expected["images"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("expected.json has no images"))?;
    anyhow::ensure!(images.len() >= 15, "{} images", images.len());
    let mut failures = Vec::new();
    for (name, want) in images {
        let img = face::load_image(dir.join(name), &ImageLimits::default())?;
        let got = (
            u64::from(img.height()),
            u64::from(img.width()),
            fnv1a64(img.as_raw()),
        );
        let want = (
            want["height"].as_u64().unwrap_or(0),
            want["width"].as_u64().unwrap_or(0),
            want["fnv1a64_rgb"].as_str().unwrap_or("").to_owned(),
        );
        eprintln!("{name}: ours {got:?}, OpenCV {want:?}");
        if got != want {
            failures.push(name.clone());
        }
    }
    anyhow::ensure!(failures.is_empty(), "differ from OpenCV: {failures:?}");
    Ok(())
}
