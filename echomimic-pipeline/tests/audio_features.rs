//! Whisper feature extraction beyond the golden clip: several 30 s segments,
//! checkpoint errors, dtype handling of the windows.

// tests/common/mod.rs (shared, not ours) trips this lint on main.
mod common;

use candle_core::{DType, Device};
use common::golden_dir;
use echomimic_pipeline::audio::{self, AudioFeatureExtractor, AudioLimits};
use echomimic_pipeline::PipelineError;

fn whisper_path() -> std::path::PathBuf {
    golden_dir().join("pretrained_weights/audio_processor/whisper_tiny.pt")
}

/// The golden speech tiled to `samples` samples.
fn speech(samples: usize) -> anyhow::Result<Vec<f32>> {
    let clip = audio::load_waveform_16k(
        golden_dir().join("inputs/speech.wav"),
        &AudioLimits::default(),
    )?;
    Ok(clip.iter().copied().cycle().take(samples).collect())
}

/// Each 30 s segment contributes ⌊its mel frames / 2⌋ rows: 30.5 s gives
/// 1500 + 25 rows, and a trailing single mel frame contributes none.
#[test]
fn long_audio_is_split_into_30_s_segments() -> anyhow::Result<()> {
    let extractor = AudioFeatureExtractor::load(whisper_path(), DType::F32, &Device::Cpu)?;
    let dims = *extractor.dims();
    let layers = dims.n_audio_layer + 1;
    for (samples, rows) in [(30 * 16_000 + 8_000, 1_525), (3_001 * 160, 1_500)] {
        let wave = speech(samples)?;
        let mel = extractor.log_mel(&wave)?;
        let features = extractor.features_from_mel(&mel)?;
        assert_eq!(
            features.dims(),
            &[rows, layers, dims.n_audio_state],
            "{samples} samples"
        );
        // The windows index into both segments.
        let chunks = audio::whisper_chunks(&features, 25.0)?;
        assert_eq!(chunks.dim(0)?, audio::audio_frame_count(rows, 25.0)?);
    }
    Ok(())
}

#[test]
fn windows_keep_dtype_and_reject_bad_fps() -> anyhow::Result<()> {
    let extractor = AudioFeatureExtractor::load(whisper_path(), DType::F16, &Device::Cpu)?;
    let features = extractor.features(&speech(16_000)?)?;
    let chunks = audio::whisper_chunks(&features, 30.0)?;
    assert_eq!(chunks.dtype(), DType::F16);
    assert!(matches!(
        audio::whisper_chunks(&features, 0.0),
        Err(PipelineError::InvalidInput(_))
    ));
    Ok(())
}

#[test]
fn non_whisper_checkpoints_fail_with_named_errors() -> anyhow::Result<()> {
    let face_locator = golden_dir().join("pretrained_weights/face_locator.pth");
    let err = AudioFeatureExtractor::load(&face_locator, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, PipelineError::Weights { .. })
            && msg.contains("dims")
            && msg.contains("face_locator.pth"),
        "{msg}"
    );
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("whisper.pt");
    std::fs::write(&garbage, b"not a checkpoint")?;
    let err = AudioFeatureExtractor::load(&garbage, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("whisper.pt"), "{err}");
    assert!(matches!(
        AudioFeatureExtractor::load(dir.path().join("absent.pt"), DType::F32, &Device::Cpu),
        Err(PipelineError::MissingFile(_))
    ));
    Ok(())
}
