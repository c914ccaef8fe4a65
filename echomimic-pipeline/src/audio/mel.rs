//! Whisper's log-mel spectrogram, exactly as OpenAI `whisper.audio.log_mel_spectrogram`
//! computes it (the version vendored by EchoMimic), and the 30 s segmentation
//! of EchoMimic's custom `transcribe`.
//!
//! 1. STFT with `n_fft` 400, hop 160, a periodic Hann window, `center=True`
//!    (reflect padding of 200 samples on both sides), one-sided: 201 bins and
//!    `1 + n / 160` frames.
//! 2. The last frame is dropped, leaving `n / 160` frames (100 per second).
//! 3. Power `|X|²`, then the Slaney mel filter bank (librosa
//!    `filters.mel(sr=16000, n_fft=400, n_mels)`, `htk=False`,
//!    `norm='slaney'`), computed here in f64 and rounded to f32 as the
//!    reference's `mel_filters.npz` stores it.
//! 4. `log10(max(mel, 1e-10))`, clamped below at (global max − 8), then
//!    `(x + 4) / 4`.
//!
//! The arithmetic runs in f64 (the reference runs f32), so results sit within
//! the f32 rounding of the reference. The FFT is `realfft`'s.
//!
//! Segmentation: EchoMimic's `transcribe` cuts the log-mel into 3000-frame
//! (30 s) segments and right-pads the last one with **0.0 in the normalised
//! log-mel domain** (stock Whisper pads the waveform instead).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use rayon::prelude::*;
use realfft::{RealFftPlanner, RealToComplex};

use crate::error::{AudioError, PipelineError, Result};

/// Sample rate the spectrogram is defined for, in Hz.
const SAMPLE_RATE: u32 = 16_000;
/// FFT size (25 ms).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Mel frames per encoder segment (30 s).
pub const SEGMENT_FRAMES: usize = 3000;
/// Fewest 16 kHz samples that give one 50 Hz encoder feature row: two mel
/// frames (20 ms). Shorter inputs fail with [`AudioError::TooShort`].
pub const MIN_SAMPLES: usize = 2 * HOP_LENGTH;
/// Floor applied before `log10`.
const LOG_FLOOR: f64 = 1e-10;
/// Frames per task when the spectrogram's frames are spread over rayon's pool (30 s = 3000
/// frames: 12 tasks).
const FRAMES_PER_TASK: usize = 256;
/// Dynamic range kept below the global maximum, in log10 units.
const DYNAMIC_RANGE: f64 = 8.0;

/// Number of one-sided FFT bins.
pub const N_FREQS: usize = N_FFT / 2 + 1;

/// A log-mel spectrogram, `[n_mels, frames]` row-major, normalised to
/// roughly [−1.5, 1.5].
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    data: Vec<f32>,
    n_mels: usize,
    frames: usize,
}

impl LogMel {
    /// Number of mel bands.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Number of 10 ms frames (`n_samples / 160`).
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// The values, `[n_mels, frames]` row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The spectrogram as an f32 tensor `[n_mels, frames]` on the CPU.
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.data,
            (self.n_mels, self.frames),
            &Device::Cpu,
        )?)
    }

    /// `(start, len)` of each 30 s segment: starts at 0, 3000, 6000, … while
    /// below `frames`; `len` ≤ 3000 is the number of real (unpadded) frames.
    pub fn segments(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.frames)
            .step_by(SEGMENT_FRAMES)
            .map(|start| (start, SEGMENT_FRAMES.min(self.frames - start)))
    }

    /// Segment `[start, start + 3000)` zero-padded on the right, as
    /// `[n_mels, 3000]` row-major.
    pub fn segment_padded(&self, start: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_mels * SEGMENT_FRAMES];
        let len = SEGMENT_FRAMES.min(self.frames.saturating_sub(start));
        for m in 0..self.n_mels {
            let src = &self.data[m * self.frames + start..m * self.frames + start + len];
            out[m * SEGMENT_FRAMES..m * SEGMENT_FRAMES + len].copy_from_slice(src);
        }
        out
    }
}

/// Slaney-scale Hz → mel (librosa `hz_to_mel(htk=False)`).
fn hz_to_mel(hz: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= MIN_LOG_HZ {
        min_log_mel + (hz / MIN_LOG_HZ).ln() / logstep
    } else {
        hz / F_SP
    }
}

/// Slaney-scale mel → Hz (librosa `mel_to_hz(htk=False)`).
fn mel_to_hz(mel: f64) -> f64 {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    let min_log_mel = MIN_LOG_HZ / F_SP;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        MIN_LOG_HZ * (logstep * (mel - min_log_mel)).exp()
    } else {
        F_SP * mel
    }
}

/// The Slaney mel filter bank `[n_mels, 201]` (row-major) for 16 kHz and
/// `n_fft` 400, rounded to f32: librosa `filters.mel(sr=16000, n_fft=400,
/// n_mels=n_mels)`, which is what whisper's `mel_filters.npz` holds
/// (`mel_80`, and `mel_128` for large-v3).
pub fn mel_filters(n_mels: usize) -> Vec<f32> {
    let sr = f64::from(SAMPLE_RATE);
    let fft_freqs: Vec<f64> = (0..N_FREQS)
        .map(|k| k as f64 * (sr / 2.0) / (N_FREQS - 1) as f64)
        .collect();
    let (mel_min, mel_max) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_points: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_min + (mel_max - mel_min) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut out = vec![0f32; n_mels * N_FREQS];
    for m in 0..n_mels {
        let (lo, mid, hi) = (mel_points[m], mel_points[m + 1], mel_points[m + 2]);
        let enorm = 2.0 / (hi - lo);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - lo) / (mid - lo);
            let upper = (hi - f) / (hi - mid);
            out[m * N_FREQS + k] = (lower.min(upper).max(0.0) * enorm) as f32;
        }
    }
    out
}

/// `log10` of every value, for finite positive normal `f64` values (the floored mel
/// energies), in a loop without branches or calls that the compiler vectorises: a third of
/// the log-mel's time went to libm's scalar `log10` (perf, 30 s of speech). `x = 2^e · m`
/// with `m` in [√½, √2), `ln m = 2·atanh(s)` with `s = (m − 1)/(m + 1)`, |s| ≤ 0.172, as
/// its odd series to `s^23` (the next term is below 1e-18 of the sum), and
/// `ln x = e·ln 2 + ln m` with `ln 2` in two parts. Within a few units in the last place of
/// libm's value (`log10_agrees_with_libm`), far below the `f32` the spectrogram is kept in.
fn log10_in_place(xs: &mut [f64]) {
    // ln 2 = LN2_HI + LN2_LO, the high part with its low 21 bits zero (fdlibm's split)
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const MANTISSA: u64 = (1 << 52) - 1;
    const ONE: u64 = 0x3ff << 52;
    /// `2 / (2k + 1)`, k = 0..=11.
    const SERIES: [f64; 12] = {
        let mut c = [0.0; 12];
        let mut k = 0;
        while k < 12 {
            c[k] = 2.0 / (2 * k + 1) as f64;
            k += 1;
        }
        c
    };
    for x in xs {
        let bits = x.to_bits();
        let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
        let m = f64::from_bits((bits & MANTISSA) | ONE);
        let big = m > std::f64::consts::SQRT_2;
        let (m, e) = if big { (m * 0.5, e + 1) } else { (m, e) };
        let s = (m - 1.0) / (m + 1.0);
        let z = s * s;
        // 2·(1 + z/3 + z²/5 + … + z^11/23)
        let mut p = SERIES[11];
        for &c in SERIES[..11].iter().rev() {
            p = p * z + c;
        }
        let e = e as f64;
        let ln = e * LN2_HI + (s * p + e * LN2_LO);
        *x = ln * std::f64::consts::LOG10_E;
    }
}

/// Computes Whisper log-mel spectrograms; holds the filter bank, window and
/// FFT plan.
#[derive(Clone)]
pub struct MelSpectrogram {
    n_mels: usize,
    /// Nonzero span of each filter: (first bin, weights as f64).
    filters: Vec<(usize, Vec<f64>)>,
    window: Vec<f64>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for MelSpectrogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelSpectrogram")
            .field("n_mels", &self.n_mels)
            .finish_non_exhaustive()
    }
}

impl MelSpectrogram {
    /// A spectrogram with `n_mels` bands (80 for every Whisper but large-v3).
    pub fn new(n_mels: usize) -> Self {
        let bank = mel_filters(n_mels);
        let filters = bank
            .chunks_exact(N_FREQS)
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |l| l + 1);
                (
                    first,
                    row[first..last].iter().map(|&w| f64::from(w)).collect(),
                )
            })
            .collect();
        // Periodic Hann window (torch.hann_window(400), periodic=True).
        let window = (0..N_FFT)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos())
            .collect();
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        Self {
            n_mels,
            filters,
            window,
            fft,
        }
    }

    /// Number of mel bands.
    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Log-mel of a 16 kHz mono waveform (see the module docs).
    ///
    /// Fails with [`AudioError::TooShort`] below [`MIN_SAMPLES`] samples.
    pub fn compute(&self, waveform: &[f32]) -> Result<LogMel> {
        let buffers = || {
            (
                self.fft.make_input_vec(),
                self.fft.make_output_vec(),
                self.fft.make_scratch_vec(),
            )
        };
        self.compute_with(
            waveform,
            buffers,
            |(input, spectrum, scratch), windowed, power| {
                input.copy_from_slice(windowed);
                self.fft
                    .process_with_scratch(input, spectrum, scratch)
                    .map_err(|e| PipelineError::InvalidInput(format!("fft: {e}")))?;
                for (p, c) in power.iter_mut().zip(spectrum.iter()) {
                    *p = c.norm_sqr();
                }
                Ok(())
            },
        )
    }

    /// The same spectrogram with a plain O(n_fft²) DFT per frame instead of
    /// the FFT: a reference for tests and the benchmark baseline only.
    #[doc(hidden)]
    pub fn compute_naive_dft(&self, waveform: &[f32]) -> Result<LogMel> {
        let (cos, sin): (Vec<f64>, Vec<f64>) = (0..N_FFT)
            .map(|i| {
                let a = 2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64;
                (a.cos(), a.sin())
            })
            .unzip();
        self.compute_with(
            waveform,
            || (),
            |(), windowed, power| {
                for (k, p) in power.iter_mut().enumerate() {
                    let (mut re, mut im) = (0.0, 0.0);
                    for (i, &x) in windowed.iter().enumerate() {
                        let idx = (k * i) % N_FFT;
                        re += x * cos[idx];
                        im -= x * sin[idx];
                    }
                    *p = re * re + im * im;
                }
                Ok(())
            },
        )
    }

    /// Steps 1–4 of the module docs, with `power_spectrum(buffers, windowed_frame,
    /// power_out)` filling the 201 one-sided |X|² values of one frame. Frames are independent:
    /// blocks of [`FRAMES_PER_TASK`] run on rayon's pool, each with its own `buffers()`, and
    /// every frame's values are the same whichever thread computes them.
    fn compute_with<B>(
        &self,
        waveform: &[f32],
        buffers: impl Fn() -> B + Sync,
        power_spectrum: impl Fn(&mut B, &[f64], &mut [f64]) -> Result<()> + Sync,
    ) -> Result<LogMel> {
        let n = waveform.len();
        if n < MIN_SAMPLES {
            return Err(AudioError::TooShort {
                seconds: n as f64 / f64::from(SAMPLE_RATE),
                min_seconds: MIN_SAMPLES as f64 / f64::from(SAMPLE_RATE),
            }
            .into());
        }
        // 1. Reflect-pad by n_fft/2 on both sides (n > n_fft/2 is guaranteed).
        let pad = N_FFT / 2;
        let mut padded = Vec::with_capacity(n + 2 * pad);
        padded.extend((1..=pad).rev().map(|i| f64::from(waveform[i])));
        padded.extend(waveform.iter().map(|&s| f64::from(s)));
        padded.extend((0..pad).map(|i| f64::from(waveform[n - 2 - i])));

        // 2. Frames 0 .. n/160 (the STFT's last frame is dropped): windowed
        //    power spectrum, mel filter bank, log10 with a floor.
        //    Computed frame-major (`[t][m]`), read out mel-major below.
        let frames = n / HOP_LENGTH;
        let n_mels = self.n_mels;
        let mut by_frame = vec![0f64; n_mels * frames];
        by_frame
            .par_chunks_mut(n_mels * FRAMES_PER_TASK)
            .enumerate()
            .try_for_each(|(block, out)| -> Result<()> {
                let mut bufs = buffers();
                let mut windowed = vec![0f64; N_FFT];
                let mut power = vec![0f64; N_FREQS];
                for (i, mels) in out.chunks_exact_mut(n_mels).enumerate() {
                    let t = block * FRAMES_PER_TASK + i;
                    let frame = &padded[t * HOP_LENGTH..t * HOP_LENGTH + N_FFT];
                    for ((dst, &x), &w) in windowed.iter_mut().zip(frame).zip(&self.window) {
                        *dst = x * w;
                    }
                    power_spectrum(&mut bufs, &windowed, &mut power)?;
                    for (mel, (first, weights)) in mels.iter_mut().zip(&self.filters) {
                        let e: f64 = weights
                            .iter()
                            .zip(&power[*first..])
                            .map(|(w, p)| w * p)
                            .sum();
                        *mel = e.max(LOG_FLOOR);
                    }
                    log10_in_place(mels);
                }
                Ok(())
            })?;
        // 3. Clamp to (global max - 8), then (x + 4) / 4.
        let max = by_frame.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let floor = max - DYNAMIC_RANGE;
        let mut data = vec![0f32; n_mels * frames];
        for (t, mels) in by_frame.chunks_exact(n_mels).enumerate() {
            for (m, &x) in mels.iter().enumerate() {
                data[m * frames + t] = ((x.max(floor) + 4.0) / 4.0) as f32;
            }
        }
        Ok(LogMel {
            data,
            n_mels: self.n_mels,
            frames,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log10_agrees_with_libm() {
        // the floor, tiny and huge energies, powers of ten and two, both sides of √2
        let mut xs: Vec<f64> = vec![LOG_FLOOR, 1e-9, 0.5, 1.0, 2.0, 10.0, 1e3, 1e12, 1.5e5];
        xs.extend((0..4000).map(|i| 1e-10 * 1.0123f64.powi(i)));
        xs.extend([
            std::f64::consts::SQRT_2,
            f64::from_bits(std::f64::consts::SQRT_2.to_bits() + 1),
        ]);
        let mut got = xs.clone();
        log10_in_place(&mut got);
        for (&x, &y) in xs.iter().zip(&got) {
            let want = x.log10();
            let tol = 4.0 * f64::EPSILON * want.abs().max(1.0);
            assert!((y - want).abs() <= tol, "log10({x:e}) = {y}, libm {want}");
        }
    }

    #[test]
    fn filter_bank_shape_and_slaney_norm() {
        let f = mel_filters(80);
        assert_eq!(f.len(), 80 * N_FREQS);
        // The first band rises from 0 Hz, so bin 0 is zero and bin 1 is not.
        assert_eq!(f[0], 0.0);
        assert!(f[1] > 0.0);
        assert!(f.iter().all(|&w| w >= 0.0));
        let f128 = mel_filters(128);
        assert_eq!(f128.len(), 128 * N_FREQS);
    }

    #[test]
    fn frames_and_range() -> Result<()> {
        let mel = MelSpectrogram::new(80);
        let wave: Vec<f32> = (0..16_000 + 77)
            .map(|i| {
                (0.3 * (i as f32 * 0.07).sin()) + 0.01 * ((i * 7919 % 101) as f32 / 101.0 - 0.5)
            })
            .collect();
        let lm = mel.compute(&wave)?;
        assert_eq!(lm.frames(), 100);
        assert_eq!(lm.n_mels(), 80);
        let max = lm.as_slice().iter().copied().fold(f32::MIN, f32::max);
        let min = lm.as_slice().iter().copied().fold(f32::MAX, f32::min);
        assert!((max - min) <= 2.0 + 1e-6, "range {min}..{max}");
        let naive = mel.compute_naive_dft(&wave)?;
        let diff = lm
            .as_slice()
            .iter()
            .zip(naive.as_slice())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "fft vs dft {diff}");
        Ok(())
    }

    #[test]
    fn too_short_and_segments() -> Result<()> {
        let mel = MelSpectrogram::new(80);
        let err = mel.compute(&[0.1; MIN_SAMPLES - 1]).unwrap_err();
        assert!(
            matches!(
                err,
                crate::error::PipelineError::Audio(AudioError::TooShort { .. })
            ),
            "{err}"
        );
        let lm = mel.compute(&[0.1; MIN_SAMPLES])?;
        assert_eq!(lm.frames(), 2);
        let long = LogMel {
            data: vec![1.0; 2 * 6500],
            n_mels: 2,
            frames: 6500,
        };
        let segs: Vec<_> = long.segments().collect();
        assert_eq!(segs, vec![(0, 3000), (3000, 3000), (6000, 500)]);
        let last = long.segment_padded(6000);
        assert_eq!(last.len(), 2 * 3000);
        assert_eq!(last[499], 1.0);
        assert_eq!(last[500], 0.0);
        assert_eq!(last[3000 + 499], 1.0);
        assert_eq!(last[3000 + 500], 0.0);
        Ok(())
    }
}
