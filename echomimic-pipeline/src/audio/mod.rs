//! The audio front end: decode speech, bring it to 16 kHz mono int16 like the
//! reference's ffmpeg call, compute Whisper's log-mel, run the Whisper encoder
//! and cut per-video-frame windows of its features.
//!
//! ```text
//! file / bytes ──decode──▶ DecodedAudio (native rate, interleaved)
//!      ──to_whisper_waveform──▶ Vec<f32> 16 kHz mono, int16 grid
//!      ──AudioFeatureExtractor::features──▶ [N, L+1, D]  (50 rows/s)
//!      ──whisper_chunks(fps)──▶ [frames, 10·(L+1), D]
//! ```
//!
//! Validation is typed ([`AudioError`]): empty, corrupt, unsupported, longer
//! than [`AudioLimits::max_seconds`], shorter than 20 ms (no feature row), or
//! silent (peak at or below [`AudioLimits::silence_peak`]).

mod chunks;
mod decode;
mod features;
mod mel;
mod resample;

pub use chunks::{
    audio_frame_count, chunk_feature_indices, whisper_chunks, whisper_chunks_up_to, DEFAULT_FPS,
    FEATURE_RATE, MAX_FPS, ROWS_PER_FRAME,
};
pub use decode::{
    decode_bytes, decode_file, AudioLimits, DecodedAudio, MAX_CHANNELS, MAX_SAMPLE_RATE,
    MIN_SAMPLE_RATE,
};
pub use features::{read_model_dimensions, AudioFeatureExtractor};
pub use mel::{
    mel_filters, LogMel, MelSpectrogram, HOP_LENGTH, MIN_SAMPLES, N_FFT, N_FREQS, SEGMENT_FRAMES,
};
pub use resample::{quantize_s16, resample_to_16k, resampled_len, WHISPER_SAMPLE_RATE};

use std::path::Path;

use crate::error::{AudioError, Result};

/// Down-mixes, resamples to 16 kHz and quantises to the int16 grid, as the
/// reference's `ffmpeg -f s16le -ac 1 -ar 16000` plus `/ 32768` does, then
/// validates the result.
///
/// A 16 kHz mono 16-bit input comes out bit-exact. Other rates go through
/// [`resample_to_16k`] (ffmpeg's filter design; measured within a few int16
/// steps of ffmpeg, see its docs).
///
/// Errors: [`AudioError::TooShort`] below [`MIN_SAMPLES`] samples at 16 kHz,
/// [`AudioError::Silent`] when the peak is at or below
/// `limits.silence_peak`, [`AudioError::TooLong`] above `limits.max_seconds`.
pub fn to_whisper_waveform(
    decoded: &DecodedAudio,
    limits: &AudioLimits,
) -> Result<Vec<f32>, AudioError> {
    if decoded.samples.is_empty() || decoded.channels == 0 {
        return Err(AudioError::Empty);
    }
    let seconds = decoded.duration_seconds();
    if seconds > limits.max_seconds {
        return Err(AudioError::TooLong {
            seconds,
            max_seconds: limits.max_seconds,
        });
    }
    let mono = decoded.to_mono();
    let mut wave = resample_to_16k(&mono, decoded.sample_rate)?;
    quantize_s16(&mut wave);
    if wave.len() < MIN_SAMPLES {
        return Err(AudioError::TooShort {
            seconds: wave.len() as f64 / f64::from(WHISPER_SAMPLE_RATE),
            min_seconds: MIN_SAMPLES as f64 / f64::from(WHISPER_SAMPLE_RATE),
        });
    }
    let peak = wave.iter().fold(0f32, |m, &s| m.max(s.abs()));
    if peak <= limits.silence_peak {
        return Err(AudioError::Silent { peak });
    }
    Ok(wave)
}

/// Decodes a file and returns its validated 16 kHz mono waveform
/// ([`decode_file`] then [`to_whisper_waveform`]).
pub fn load_waveform_16k(path: impl AsRef<Path>, limits: &AudioLimits) -> Result<Vec<f32>> {
    let decoded = decode_file(path, limits)?;
    Ok(to_whisper_waveform(&decoded, limits)?)
}

/// Decodes in-memory file bytes and returns the validated 16 kHz mono
/// waveform ([`decode_bytes`] then [`to_whisper_waveform`]).
pub fn waveform_16k_from_bytes(
    bytes: &[u8],
    ext_hint: Option<&str>,
    limits: &AudioLimits,
) -> Result<Vec<f32>, AudioError> {
    let decoded = decode_bytes(bytes, ext_hint, limits)?;
    to_whisper_waveform(&decoded, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(samples: Vec<f32>, channels: usize, sample_rate: u32) -> DecodedAudio {
        DecodedAudio {
            samples,
            channels,
            sample_rate,
        }
    }

    #[test]
    fn validation_errors_are_typed() {
        let limits = AudioLimits::default();
        assert!(matches!(
            to_whisper_waveform(&decoded(vec![], 1, 16_000), &limits),
            Err(AudioError::Empty)
        ));
        assert!(matches!(
            to_whisper_waveform(&decoded(vec![0.5; 319], 1, 16_000), &limits),
            Err(AudioError::TooShort { .. })
        ));
        // 10 LSB of noise-free "silence" with a DC offset below the threshold.
        assert!(matches!(
            to_whisper_waveform(&decoded(vec![10.0 / 32768.0; 16_000], 1, 16_000), &limits),
            Err(AudioError::Silent { .. })
        ));
        let long = decoded(vec![0.1; 2 * 8_000 * 3], 2, 8_000);
        let strict = AudioLimits {
            max_seconds: 2.5,
            ..limits
        };
        assert!(matches!(
            to_whisper_waveform(&long, &strict),
            Err(AudioError::TooLong { .. })
        ));
        let ok = to_whisper_waveform(&long, &limits).unwrap();
        assert_eq!(ok.len(), 48_000);
    }

    #[test]
    fn sixteen_khz_int16_passes_through_exactly() {
        let samples: Vec<f32> = (0..4_000)
            .map(|i| ((i * 37 % 2001) as f32 - 1000.0) / 32768.0)
            .collect();
        let out = to_whisper_waveform(
            &decoded(samples.clone(), 1, 16_000),
            &AudioLimits::default(),
        )
        .unwrap();
        assert_eq!(out, samples);
    }
}
