//! Resampling to 16 kHz the way the reference's `ffmpeg -ar 16000` does.
//!
//! The reference loads audio with the ffmpeg CLI, whose default resampler is
//! libswresample: a polyphase windowed-sinc filter with `filter_size` 32
//! (`⌈32 / cutoff_ratio⌉` taps at the input rate, rounded up to even),
//! `cutoff` 0.97, a Kaiser window with β = 9, one filter phase per distinct
//! output position when the rate ratio needs at most 1024 of them ("exact
//! rational"), otherwise 1024 phases with linear interpolation between them,
//! and reflected input at both ends. These are the documented swr defaults;
//! the design is re-derived here, not copied.
//!
//! The filtering loop is rubato's [`SincFixedIn`], fed a custom
//! [`SincInterpolator`] that holds this filter bank, so the output samples sit
//! at exactly `j · in_rate / 16000` input samples, like ffmpeg's.
//!
//! Measured agreement with `ffmpeg -ar 16000` (ffmpeg 5.1.9, both outputs
//! quantised to int16; `tests/audio_decode.rs`, `resampler_tracks_ffmpeg`),
//! in int16 steps (LSB), for s16 WAV input:
//!
//! | input rate | speech (+ faint pink floor) | pink noise | white noise |
//! |---|---|---|---|
//! | 8 kHz (up) | 0.26 rms, 2 max, 80.6 dB | 0.37 rms, 2 max, 73.8 dB | 0.37 rms, 2 max, 83.6 dB |
//! | 22.05 kHz | 0.31 rms, 2 max, 79.2 dB | 0.29 rms, 1 max, 76.2 dB | 0.52 rms, 2 max, 79.0 dB |
//! | 32 kHz | 0.27 rms, 1 max, 80.2 dB | 0.25 rms, 1 max, 77.2 dB | 0.53 rms, 2 max, 77.4 dB |
//! | 44.1 kHz | 0.38 rms, 2 max, 77.5 dB | 0.35 rms, 1 max, 74.2 dB | 0.63 rms, 2 max, 74.5 dB |
//! | 48 kHz | 0.49 rms, 3 max, 75.1 dB | 0.55 rms, 2 max, 70.1 dB | 0.64 rms, 2 max, 74.0 dB |
//!
//! (dB = signal power over difference power.) For float sources (MP3, Vorbis,
//! AAC, f32 WAV at 16–48 kHz) the difference is ≤ 1 LSB everywhere and
//! ≤ 0.03 LSB rms (`common_formats_decode_like_ffmpeg`); the ~0.3 LSB rms
//! left for s16 sources is ffmpeg's 16-bit fixed-point filtering on that path.
//!
//! Output lengths are `round(n · 16000 / in_rate)`;
//! ffmpeg's flush sometimes emits one sample more (when the fractional part
//! is above ≈ 0.3), which moves the mel frame count only when that sample
//! crosses a multiple of 160.

use rubato::sinc_interpolator::SincInterpolator;
use rubato::{Resampler, SincFixedIn, SincInterpolationType};

use crate::error::AudioError;

/// Sample rate of the Whisper front end, in Hz.
pub const WHISPER_SAMPLE_RATE: u32 = 16_000;

/// swr default `filter_size` (taps at the output rate).
const SWR_FILTER_SIZE: f64 = 32.0;
/// swr default `cutoff`, relative to the lower Nyquist frequency.
const SWR_CUTOFF: f64 = 0.97;
/// swr default Kaiser window β.
const SWR_KAISER_BETA: f64 = 9.0;
/// swr default number of phases (`1 << phase_shift`, phase_shift 10).
const SWR_MAX_PHASES: usize = 1024;
/// Input frames handed to rubato per call.
const CHUNK_FRAMES: usize = 8192;

/// Number of samples the 16 kHz waveform of `frames` input frames has:
/// `round(frames · 16000 / sample_rate)`.
pub fn resampled_len(frames: usize, sample_rate: u32) -> usize {
    if sample_rate == WHISPER_SAMPLE_RATE {
        return frames;
    }
    ((frames as f64) * f64::from(WHISPER_SAMPLE_RATE) / f64::from(sample_rate)).round() as usize
}

/// Resamples a mono signal to 16 kHz (no quantisation; see [`quantize_s16`]).
///
/// Returns the input unchanged when it already is at 16 kHz.
pub fn resample_to_16k(mono: &[f32], sample_rate: u32) -> Result<Vec<f32>, AudioError> {
    if sample_rate == WHISPER_SAMPLE_RATE || mono.is_empty() {
        return Ok(mono.to_vec());
    }
    if sample_rate == 0 {
        return Err(AudioError::Unsupported("sample rate 0 Hz".to_owned()));
    }
    SwrLikeResampler::new(sample_rate as usize, WHISPER_SAMPLE_RATE as usize).process(mono)
}

/// Rounds every sample to the int16 grid and back (`⌊x · 32768 + ½⌋ / 32768`,
/// clipped to [−32768, 32767]), as ffmpeg's conversion to s16 followed by
/// whisper's `/ 32768` does.
///
/// Ties round up: that is ffmpeg's fixed-point rounding on its 16-bit paths
/// (measured: a 16 kHz stereo s16 file down-mixed by `-ac 1` equals
/// `(L + R + 1) >> 1` on every sample, which this reproduces exactly). Its
/// float path rounds ties to even instead, but exact ties are vanishingly rare
/// for float data.
pub fn quantize_s16(samples: &mut [f32]) {
    for s in samples {
        let q = (f64::from(*s) * 32768.0 + 0.5)
            .floor()
            .clamp(-32768.0, 32767.0);
        *s = (q / 32768.0) as f32;
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Modified Bessel function of the first kind, order 0 (power series).
fn bessel_i0(x: f64) -> f64 {
    let q = x * x / 4.0;
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..500 {
        let k = k as f64;
        term *= q / (k * k);
        sum += term;
        if term <= sum * 1e-17 {
            break;
        }
    }
    sum
}

/// Geometry of the swr-style filter for one rate pair.
#[derive(Debug, Clone, Copy)]
struct FilterDesign {
    /// Input samples per output sample.
    step: f64,
    /// Cutoff relative to the input Nyquist frequency (≤ 1).
    factor: f64,
    /// Number of taps actually used per output sample.
    taps: usize,
    /// Index of the centre tap (the tap at or just before the output time).
    center: usize,
}

impl FilterDesign {
    fn new(in_rate: usize, out_rate: usize) -> Self {
        let step = in_rate as f64 / out_rate as f64;
        let factor = (SWR_CUTOFF / step).min(1.0);
        // `ceil(filter_size / factor)` taps, rounded up to even: ffmpeg 5.1
        // measurably behaves so (at 44.1 kHz, 92 rather than 91 taps takes the
        // white-noise difference from 3.5 to 0.6 LSB rms; even counts such as
        // 46 at 22.05 kHz are already exact).
        let taps = ((SWR_FILTER_SIZE / factor).ceil() as usize)
            .max(2)
            .next_multiple_of(2);
        Self {
            step,
            factor,
            taps,
            center: (taps - 1) / 2,
        }
    }

    /// Filter weight for an input sample `x` input samples after the output time.
    fn weight(&self, x: f64) -> f64 {
        let a = std::f64::consts::PI * x * self.factor;
        let sinc = if a == 0.0 { 1.0 } else { a.sin() / a };
        let w = 2.0 * x / self.taps as f64;
        sinc * bessel_i0(SWR_KAISER_BETA * (1.0 - w * w).max(0.0).sqrt())
    }
}

/// The swr filter bank in the shape rubato's `SincFixedIn` expects.
///
/// rubato calls `get_sinc_interpolated(wave, index, phase)` for the output
/// whose running position is `idx = index + phase / phases`, and places the
/// first output at `idx = −len/2 + step`. A tap vector for `phase` therefore
/// serves the output time `t = index + phase / phases + len/2 − step`, which
/// makes output `j` land on input time `j · step`. Each phase holds the swr
/// taps `t − center … t − center + taps − 1` (relative to `⌊t⌋`), normalised
/// to unit DC gain like swr's, and zeros elsewhere.
struct SwrKaiserBank {
    phases: Vec<Vec<f64>>,
    len: usize,
}

impl SwrKaiserBank {
    fn new(design: &FilterDesign, n_phases: usize) -> Self {
        // Room for the taps on both sides of the shifted centre.
        let span = design.taps + 2 * design.step.ceil() as usize + 2;
        let len = 8 * span.div_ceil(8);
        let half = (len / 2) as f64;
        let phases = (0..n_phases)
            .map(|phase| {
                let tau = phase as f64 / n_phases as f64 + half - design.step;
                let first = tau.floor() as isize - design.center as isize;
                let mut taps = vec![0.0; len];
                let mut norm = 0.0;
                for i in 0..design.taps {
                    let p = first + i as isize;
                    // `span` guarantees 0 <= p < len; skip defensively.
                    let Ok(p) = usize::try_from(p) else { continue };
                    if p >= len {
                        continue;
                    }
                    let w = design.weight(p as f64 - tau);
                    taps[p] = w;
                    norm += w;
                }
                if norm != 0.0 {
                    taps.iter_mut().for_each(|t| *t /= norm);
                }
                taps
            })
            .collect();
        Self { phases, len }
    }
}

impl SincInterpolator<f64> for SwrKaiserBank {
    fn get_sinc_interpolated(&self, wave: &[f64], index: usize, subindex: usize) -> f64 {
        let taps = &self.phases[subindex];
        wave[index..index + self.len]
            .iter()
            .zip(taps)
            .map(|(a, b)| a * b)
            .sum()
    }

    fn len(&self) -> usize {
        self.len
    }

    fn nbr_sincs(&self) -> usize {
        self.phases.len()
    }
}

/// One-shot resampler of a whole mono signal.
struct SwrLikeResampler {
    in_rate: usize,
    out_rate: usize,
    design: FilterDesign,
}

impl SwrLikeResampler {
    fn new(in_rate: usize, out_rate: usize) -> Self {
        Self {
            in_rate,
            out_rate,
            design: FilterDesign::new(in_rate, out_rate),
        }
    }

    fn process(&self, mono: &[f32]) -> Result<Vec<f32>, AudioError> {
        let n = mono.len();
        let g = gcd(self.in_rate, self.out_rate);
        let (unit_in, unit_out) = (self.in_rate / g, self.out_rate / g);
        let (n_phases, interpolation) = if unit_out <= SWR_MAX_PHASES {
            (unit_out, SincInterpolationType::Nearest)
        } else {
            (SWR_MAX_PHASES, SincInterpolationType::Linear)
        };
        let bank = SwrKaiserBank::new(&self.design, n_phases);
        let bank_len = bank.len;

        // 1. Pad the start by a whole number of rate units so that dropping
        //    the matching number of outputs keeps the output grid at
        //    `j · step`. The padding mirrors the signal around its first
        //    sample (x[−j] = x[j]) and the end mirrors around the half-sample
        //    after the last one (x[n−1+j] = x[n−j]), as swr does.
        let reach = self.design.taps + 1;
        let pad_units = reach.div_ceil(unit_in);
        let pad_in = pad_units * unit_in;
        let skip_out = pad_units * unit_out;
        let want = resampled_len(n, self.in_rate as u32);
        let mut input = Vec::with_capacity(pad_in + n + reach);
        input.extend(
            (1..=pad_in)
                .rev()
                .map(|j| if j < n { f64::from(mono[j]) } else { 0.0 }),
        );
        input.extend(mono.iter().map(|&s| f64::from(s)));
        input.extend((0..reach.min(n)).map(|j| f64::from(mono[n - 1 - j])));

        // 2. Run rubato over the padded signal, then over silence until the
        //    outputs cover the whole input.
        let chunk = CHUNK_FRAMES.max(4 * bank_len);
        let ratio = self.out_rate as f64 / self.in_rate as f64;
        let mut resampler = SincFixedIn::<f64>::new_with_interpolator(
            ratio,
            1.0,
            interpolation,
            Box::new(bank),
            chunk,
            1,
        )
        .map_err(|e| AudioError::Unsupported(format!("resampler: {e}")))?;
        let total = skip_out + want;
        let mut out: Vec<f64> = Vec::with_capacity(total + resampler.output_frames_max());
        let mut out_buf = vec![vec![0.0f64; resampler.output_frames_max()]; 1];
        let mut in_buf = vec![vec![0.0f64; chunk]; 1];
        let mut pos = 0;
        // Every chunk yields at least chunk·ratio − 1 outputs once the history
        // is primed; the bound only guards against an accounting error.
        let max_rounds = (input.len() + total * (unit_in.div_ceil(unit_out) + 1)) / chunk + 16;
        for _ in 0..max_rounds {
            if out.len() >= total {
                break;
            }
            let take = chunk.min(input.len().saturating_sub(pos));
            in_buf[0][..take].copy_from_slice(&input[pos..pos + take]);
            in_buf[0][take..].fill(0.0);
            pos += take;
            let (_, produced) = resampler
                .process_into_buffer(&in_buf, &mut out_buf, None)
                .map_err(|e| AudioError::Unsupported(format!("resampler: {e}")))?;
            out.extend_from_slice(&out_buf[0][..produced]);
        }
        if out.len() < total {
            return Err(AudioError::Unsupported(format!(
                "resampler produced {} of {total} samples",
                out.len()
            )));
        }
        Ok(out[skip_out..total].iter().map(|&v| v as f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A band-limited tone resampled from several rates lands on the analytic
    /// values at the 16 kHz sample times: checks the filter and the timing.
    #[test]
    fn tone_lands_on_the_output_grid() {
        for rate in [
            8_000u32, 11_025, 22_050, 32_000, 44_100, 48_000, 96_000, 44_099,
        ] {
            let n = rate as usize / 2;
            let f = 1_234.5f64;
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    (0.5 * (2.0 * std::f64::consts::PI * f * i as f64 / f64::from(rate)).sin())
                        as f32
                })
                .collect();
            let y = resample_to_16k(&x, rate).unwrap();
            assert_eq!(y.len(), resampled_len(n, rate), "rate {rate}");
            // Away from the edges the output is the tone at t = j / 16000.
            let err = y
                .iter()
                .enumerate()
                .skip(64)
                .take(y.len() - 128)
                .map(|(j, &v)| {
                    let want = 0.5 * (2.0 * std::f64::consts::PI * f * j as f64 / 16_000.0).sin();
                    (f64::from(v) - want).abs()
                })
                .fold(0.0, f64::max);
            assert!(err < 2e-4, "rate {rate}: max error {err}");
        }
    }

    #[test]
    fn lengths_and_quantisation() {
        assert_eq!(resampled_len(44_100, 44_100), 16_000);
        assert_eq!(resampled_len(44_101, 44_100), 16_000);
        assert_eq!(resampled_len(12_345, 32_000), 6_173);
        assert_eq!(resampled_len(24_000, 16_000), 24_000);
        let mut v = vec![
            0.5 / 32768.0,
            1.5 / 32768.0,
            -1.5 / 32768.0,
            0.4 / 32768.0,
            2.0,
            -2.0,
        ];
        quantize_s16(&mut v);
        assert_eq!(
            v,
            vec![
                1.0 / 32768.0,
                2.0 / 32768.0,
                -1.0 / 32768.0,
                0.0,
                32767.0 / 32768.0,
                -1.0
            ]
        );
        // Tiny inputs do not break the padding logic.
        for n in 1..5 {
            let y = resample_to_16k(&vec![0.25; n], 44_100).unwrap();
            assert_eq!(y.len(), resampled_len(n, 44_100));
        }
    }

    #[test]
    fn kaiser_bank_has_unit_dc_gain() {
        let design = FilterDesign::new(44_100, 16_000);
        assert_eq!(design.taps, 92);
        let bank = SwrKaiserBank::new(&design, 160);
        for taps in &bank.phases {
            let s: f64 = taps.iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
        }
    }
}
