//! Real inputs as the reference sees them: real portraits (JPEGs named `.png`, 1342² and 2840²)
//! and real speech (24 kHz mono WAV, 44.1 kHz stereo MP3), against what the official code
//! made of them once (`scripts/make-real-input-vectors.py`, vectors in
//! `testdata/inputs/real/`): the pixels `cv2.imread` decodes, the face crop and mask
//! `infer_audio2vid.py` makes at two output sizes (equal byte for byte), and the Whisper
//! features `Audio2Feature.audio2feat` computes with the public set's tiny Whisper (within
//! 2e-5 when ffmpeg decodes and resamples, as for the reference; within 6e-3 through the
//! built-in decoders and resampler used without ffmpeg). No Python needed here.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fnv1a64};
use echomimic_pipeline::audio::{self, AudioFeatureExtractor, AudioLimits};
use echomimic_pipeline::face::{self, FaceCropOptions, FaceDetector, ImageLimits};

/// The features' tolerance for real speech decoded and resampled by ffmpeg, as the reference
/// does (measured: 3.8e-6 on both files).
const FEATURE_ATOL: f64 = 2e-5;

/// The same without ffmpeg, through the built-in decoders and resampler: about 3× the largest
/// difference measured on these files (1.8e-3 for the 24 kHz WAV, 8.3e-4 for the 44.1 kHz MP3).
const BUILTIN_FEATURE_ATOL: f64 = 6e-3;

fn inputs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/inputs")
}

fn expected() -> anyhow::Result<serde_json::Value> {
    let path = inputs().join("real/expected.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[test]
fn real_portraits_decode_and_crop_exactly_as_the_reference() -> anyhow::Result<()> {
    let want = expected()?;
    let photos = want["photos"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("expected.json has no photos"))?;
    anyhow::ensure!(photos.len() >= 2, "{} photos", photos.len());
    let detector = FaceDetector::new(&Device::Cpu)?;
    for (name, w) in photos {
        let img = face::load_image(inputs().join(name), &ImageLimits::default())?;
        let shape = [img.height() as u64, img.width() as u64, 3];
        anyhow::ensure!(
            serde_json::json!(shape) == w["shape"],
            "{name}: shape {shape:?} != {}",
            w["shape"]
        );
        anyhow::ensure!(
            fnv1a64(img.as_raw()) == w["rgb_fnv1a64"],
            "{name}: decoded pixels differ from cv2.imread's"
        );
        let crops = w["crops"]
            .as_object()
            .ok_or_else(|| anyhow::anyhow!("{name}: no crops"))?;
        for (size, c) in crops {
            let (cw, ch) = size
                .split_once('x')
                .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("{name}: bad size {size}"))?;
            let crop = detector.crop_face(&img, cw, ch, &FaceCropOptions::default())?;
            anyhow::ensure!(
                fnv1a64(crop.face_rgb.as_raw()) == c["face_fnv1a64"],
                "{name} at {size}: face crop differs from the reference's"
            );
            anyhow::ensure!(
                fnv1a64(crop.mask.as_raw()) == c["mask_fnv1a64"],
                "{name} at {size}: face mask differs from the reference's"
            );
            eprintln!("{name} at {size}: pixels, crop and mask equal the reference's");
        }
    }
    Ok(())
}

#[test]
fn real_speech_gives_the_reference_whisper_features() -> anyhow::Result<()> {
    let want = expected()?;
    let speech = want["speech"]
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("expected.json has no speech"))?;
    anyhow::ensure!(speech.len() >= 2, "{} speech files", speech.len());
    let golden =
        candle_core::safetensors::load(inputs().join("real/features.safetensors"), &Device::Cpu)?;
    let whisper = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/golden/public/pretrained_weights/audio_processor/whisper_tiny.pt");
    let extractor = AudioFeatureExtractor::load(whisper, DType::F32, &Device::Cpu)?;
    let limits = AudioLimits::default();
    for name in speech.keys() {
        let want: &Tensor = golden
            .get(name.as_str())
            .ok_or_else(|| anyhow::anyhow!("{name}: no features in features.safetensors"))?;
        // The default path: ffmpeg decodes and resamples, as for the reference.
        let path = inputs().join(name);
        let ffmpeg = audio::default_ffmpeg();
        let wave = audio::load_waveform_16k_with(&path, &limits, Some(&ffmpeg))?;
        let features = extractor.features(&wave)?;
        assert_close(
            &format!("{name}: features (ffmpeg)"),
            &features,
            want,
            FEATURE_ATOL,
        )?;
        // Without ffmpeg: our decoders and our re-derivation of its resampler, which tracks
        // it within a few int16 steps (src/audio/resample.rs), not bit for bit.
        let wave = audio::load_waveform_16k_with(&path, &limits, None)?;
        let features = extractor.features(&wave)?;
        assert_close(
            &format!("{name}: features (built-in)"),
            &features,
            want,
            BUILTIN_FEATURE_ATOL,
        )?;
    }
    Ok(())
}
