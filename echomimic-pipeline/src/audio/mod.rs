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
//! Decoders: with the `ffmpeg` program installed ([`crate::video::FFMPEG_ENV`] or `ffmpeg` on
//! `PATH`), [`load_waveform_16k`] runs the reference's own ffmpeg call, so the 16 kHz waveform
//! equals the reference's bit for bit for every format and input rate, and [`decode_file`] falls
//! back to ffmpeg for what the built-in decoders lack (Opus voice notes in Ogg or WebM, AMR, WMA,
//! the audio track of MKV/AVI/…). Without ffmpeg the built-in decoders (hound, symphonia) and
//! [`resample_to_16k`] are used: 16 kHz mono 16-bit input is still bit-exact, other rates and
//! lossy codecs then differ slightly from the reference (a few int16 steps, see
//! [`resample_to_16k`]), and formats beyond the built-in ones are [`AudioError::Unsupported`].
//!
//! Validation is typed ([`AudioError`]): empty, corrupt, unsupported, longer
//! than [`AudioLimits::max_seconds`], shorter than 20 ms (no feature row), or
//! silent (peak at or below [`AudioLimits::silence_peak`]).

mod chunks;
mod decode;
mod features;
mod ffmpeg;
mod mel;
mod resample;

pub use chunks::{
    audio_frame_count, chunk_feature_indices, whisper_chunks, whisper_chunks_up_to, DEFAULT_FPS,
    FEATURE_RATE, MAX_FPS, ROWS_PER_FRAME,
};
pub use decode::{
    decode_bytes, AudioLimits, DecodedAudio, MAX_CHANNELS, MAX_SAMPLE_RATE, MIN_SAMPLE_RATE,
};
pub use features::{read_model_dimensions, AudioFeatureExtractor};
pub use mel::{
    mel_filters, LogMel, MelSpectrogram, HOP_LENGTH, MIN_SAMPLES, N_FFT, N_FREQS, SEGMENT_FRAMES,
};
pub use resample::{quantize_s16, resample_to_16k, resampled_len, WHISPER_SAMPLE_RATE};

use std::path::Path;

use crate::error::{AudioError, PipelineError, Result};
use ffmpeg::FfmpegFailure;

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
    validate_waveform(wave, limits)
}

/// The checks every 16 kHz waveform passes, whichever decoder made it: too short, silent.
fn validate_waveform(wave: Vec<f32>, limits: &AudioLimits) -> Result<Vec<f32>, AudioError> {
    if wave.is_empty() {
        return Err(AudioError::Empty);
    }
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

/// The ffmpeg program used by [`decode_file`] and [`load_waveform_16k`]:
/// [`crate::video::FFMPEG_ENV`] if set, else `ffmpeg` on `PATH` (absent = built-in decoders).
pub fn default_ffmpeg() -> std::path::PathBuf {
    crate::ffmpeg_program::resolve_ffmpeg(None)
}

/// Decodes an audio file at its native rate: the built-in decoders, and ffmpeg
/// ([`default_ffmpeg`]) for the formats they do not support. See [`decode_file_with`].
pub fn decode_file(path: impl AsRef<Path>, limits: &AudioLimits) -> Result<DecodedAudio> {
    decode_file_with(path, limits, Some(&default_ffmpeg()))
}

/// Decodes an audio file at its native rate with the built-in decoders (WAV, MP3, AAC/M4A,
/// ALAC, FLAC, Ogg Vorbis); when they report [`AudioError::Unsupported`] or
/// [`AudioError::Corrupt`] and `ffmpeg` is given and runs, with ffmpeg (anything it decodes: Opus, AMR, WMA, WebM, the audio track of a
/// video, ...). Limits and errors are the same on both paths ([`AudioError::TooLong`] stops the
/// decode early); when ffmpeg fails too the built-in error is returned, and without a runnable
/// ffmpeg an unsupported error says that ffmpeg would read the format.
pub fn decode_file_with(
    path: impl AsRef<Path>,
    limits: &AudioLimits,
    ffmpeg: Option<&Path>,
) -> Result<DecodedAudio> {
    let path = path.as_ref();
    match decode::decode_file_builtin(path, limits) {
        Err(PipelineError::Audio(
            builtin @ (AudioError::Unsupported(_) | AudioError::Corrupt(_)),
        )) => {
            let failure = match ffmpeg {
                Some(program) => match ffmpeg::ffmpeg_decode_native(program, path, limits) {
                    Ok(audio) => return Ok(audio),
                    Err(f) => f,
                },
                None => FfmpegFailure::NotRunnable(std::io::ErrorKind::NotFound.into()),
            };
            Err(failure.combine(builtin).into())
        }
        other => other,
    }
}

/// Decodes a file and returns its validated 16 kHz mono waveform, as the reference does: with
/// ffmpeg ([`default_ffmpeg`]) when it runs, else the built-in path. See
/// [`load_waveform_16k_with`].
pub fn load_waveform_16k(path: impl AsRef<Path>, limits: &AudioLimits) -> Result<Vec<f32>> {
    load_waveform_16k_with(path, limits, Some(&default_ffmpeg()))
}

/// Decodes a file and returns its validated 16 kHz mono waveform.
///
/// With `ffmpeg` given and runnable this is the reference's own call (`ffmpeg -i FILE -f s16le
/// -ac 1 -ar 16000 -`, int16 / 32768), bit-exact for every format and rate. Without it (or when
/// ffmpeg fails on the file) [`decode_file_with`] then [`to_whisper_waveform`]: bit-exact for
/// 16 kHz mono 16-bit, within a few int16 steps otherwise. Both paths give the same typed
/// errors (too long, too short, silent, corrupt, unsupported).
pub fn load_waveform_16k_with(
    path: impl AsRef<Path>,
    limits: &AudioLimits,
    ffmpeg: Option<&Path>,
) -> Result<Vec<f32>> {
    let path = path.as_ref();
    let failure = match ffmpeg {
        Some(program) => match ffmpeg::ffmpeg_waveform_16k(program, path, limits) {
            Ok(wave) => return Ok(validate_waveform(wave, limits)?),
            Err(FfmpegFailure::Audio(e)) => return Err(e.into()),
            Err(f) => Some(f),
        },
        None => None,
    };
    // ffmpeg absent, or it could not read the file: the built-in decoders give the typed
    // error (or, rarely, read what ffmpeg refused).
    let decoded = match decode::decode_file_builtin(path, limits) {
        Ok(d) => d,
        Err(PipelineError::Audio(e)) => {
            let f = failure
                .unwrap_or_else(|| FfmpegFailure::NotRunnable(std::io::ErrorKind::NotFound.into()));
            return Err(f.combine(e).into());
        }
        Err(e) => return Err(e),
    };
    Ok(to_whisper_waveform(&decoded, limits)?)
}

/// Decodes in-memory file bytes with the built-in decoders and returns the validated 16 kHz
/// mono waveform ([`decode_bytes`] then [`to_whisper_waveform`]; no ffmpeg: write the bytes to
/// a file and use [`load_waveform_16k`] for the reference's exact path).
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
