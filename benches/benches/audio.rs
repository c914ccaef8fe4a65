//! Audio front-end benchmark: log-mel + Whisper encoder for 10 s of speech.
//!
//! Run with `cargo bench -p echomimic-benches --bench audio` (about 30 s on a
//! 2-core machine). Every figure is a ratio against a baseline measured in the
//! same run:
//!
//! * mel + encoder for 10 s of audio, as milliseconds and as the real-time
//!   factor (compute seconds per second of audio; the baseline is the audio
//!   duration), for the golden tiny Whisper checkpoint (width 32, loaded
//!   through the real OpenAI-format loader) and for a Whisper-tiny-sized model
//!   (width 384, 6 heads, 4 layers) with random weights built in memory;
//! * the log-mel alone for one 30 s segment with `realfft` against a naive
//!   O(n²) DFT of the same frames.
//!
//! Timings are medians of a few runs after one warm-up run. The encoder always
//! processes a full 30 s window (EchoMimic pads the log-mel to 3000 frames),
//! so 10 s and 30 s of audio cost the same encoder time.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use echomimic_pipeline::audio::{self, AudioFeatureExtractor, AudioLimits, MelSpectrogram};
use echomimic_pipeline::models::whisper::ModelDimensions;

const AUDIO_SECONDS: f64 = 10.0;
const SAMPLE_RATE: usize = 16_000;

fn golden_dir() -> PathBuf {
    std::env::var_os("ECHOMIMIC_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public")
        })
}

/// Median wall time of `runs` calls after one warm-up call.
fn time<T>(
    runs: usize,
    device: &Device,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Duration> {
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        std::hint::black_box(f()?);
        device.synchronize()?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(times[runs / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The golden speech (1.5 s) tiled to `seconds`.
fn speech(seconds: f64) -> anyhow::Result<Vec<f32>> {
    let path = golden_dir().join("inputs/speech.wav");
    let clip = audio::load_waveform_16k(&path, &AudioLimits::default())
        .with_context(|| path.display().to_string())?;
    let n = (seconds * SAMPLE_RATE as f64) as usize;
    Ok(clip.iter().copied().cycle().take(n).collect())
}

fn report(
    name: &str,
    extractor: &AudioFeatureExtractor,
    wave: &[f32],
    runs: usize,
) -> anyhow::Result<()> {
    let device = extractor.device().clone();
    let mel = extractor.log_mel(wave)?;
    let t_mel = time(runs, &device, || Ok(extractor.log_mel(wave)?))?;
    let t_enc = time(runs, &device, || Ok(extractor.features_from_mel(&mel)?))?;
    let t_all = time(runs, &device, || Ok(extractor.features(wave)?))?;
    let dims = extractor.dims();
    let seconds = wave.len() as f64 / SAMPLE_RATE as f64;
    println!(
        "{name} (width {}, {} heads, {} layers): mel {:.1} ms + encoder {:.1} ms; mel+encoder {:.1} ms \
         for {seconds:.0} s of audio = real-time factor {:.4} ({:.0}x faster than real time)",
        dims.n_audio_state,
        dims.n_audio_head,
        dims.n_audio_layer,
        ms(t_mel),
        ms(t_enc),
        ms(t_all),
        t_all.as_secs_f64() / seconds,
        seconds / t_all.as_secs_f64(),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let device = Device::Cpu;
    let wave = speech(AUDIO_SECONDS)?;

    // 1. Golden tiny whisper through the real checkpoint loader.
    let golden = AudioFeatureExtractor::load(
        golden_dir().join("pretrained_weights/audio_processor/whisper_tiny.pt"),
        DType::F32,
        &device,
    )?;
    report("golden tiny whisper", &golden, &wave, 5)?;

    // 2. Whisper-tiny-sized encoder with random weights.
    let dims = ModelDimensions {
        n_mels: 80,
        n_audio_ctx: 1500,
        n_audio_state: 384,
        n_audio_head: 6,
        n_audio_layer: 4,
        n_vocab: 51865,
        n_text_ctx: 448,
        n_text_state: 384,
        n_text_head: 6,
        n_text_layer: 4,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let tiny = AudioFeatureExtractor::from_var_builder(vb, &dims)?;
    report("whisper-tiny-sized (random)", &tiny, &wave, 3)?;

    // 3. Log-mel of one 30 s segment: realfft against a naive DFT.
    let segment = speech(30.0)?;
    let mel = MelSpectrogram::new(80);
    let t_fft = time(5, &device, || Ok(mel.compute(&segment)?))?;
    let t_dft = time(1, &device, || Ok(mel.compute_naive_dft(&segment)?))?;
    println!(
        "log-mel of one 30 s segment (3000 frames): realfft {:.1} ms, naive DFT {:.1} ms -> {:.1}x faster",
        ms(t_fft),
        ms(t_dft),
        t_dft.as_secs_f64() / t_fft.as_secs_f64()
    );
    Ok(())
}
