//! Our side of the component comparison against the reference's own code
//! (`scripts/bench-vs-reference.sh`, request `components`; the reference side
//! is `benches/python/reference_components.py`, same keys).
//!
//! ```text
//! cargo bench -p echomimic-benches --bench components -- \
//!     [--speech SPEECH] [--photo NAME=PATH ...] [--iters 5] > ours.json
//! ```
//!
//! Without `--speech` the audio parts are left out (a profile of the photos alone).
//!
//! Best of `iters` calls after one warm-up call, on the CPU in f32 (threads:
//! `RAYON_NUM_THREADS`), printed as JSON (seconds):
//! * `mtcnn:NAME`: [`FaceDetector::detect`] on the decoded photo (BGR order,
//!   as EchoMimic hands OpenCV's array to facenet);
//! * `log_mel_30s`: the log-mel of 30 s of speech (the file tiled);
//! * `whisper_tiny_30s`: a Whisper-tiny-sized encoder (width 384, 6 heads,
//!   4 layers, random weights) on that 30 s log-mel, with every layer's
//!   output, as the pipeline runs it.
#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device};
use echomimic_benches::random_weights;
use echomimic_pipeline::audio::{self, AudioFeatureExtractor, AudioLimits};
use echomimic_pipeline::face::{self, FaceDetector, ImageLimits};
use echomimic_pipeline::models::whisper::ModelDimensions;

/// Best wall time of `n` calls after one warm-up call.
fn best_of<T>(n: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    std::hint::black_box(f()?);
    let mut best = Duration::MAX;
    for _ in 0..n {
        let t = Instant::now();
        std::hint::black_box(f()?);
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    echomimic_worker::runtime::configure();
    let mut speech = None;
    let mut photos = Vec::new();
    let mut iters = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--speech" => speech = args.next(),
            "--photo" => photos.push(args.next().context("--photo needs NAME=PATH")?),
            "--iters" => iters = args.next().context("--iters needs a count")?.parse()?,
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let device = Device::Cpu;
    let mut out = serde_json::Map::new();
    out.insert("iters".into(), iters.into());

    // 1. MTCNN on each photo
    let detector = FaceDetector::new(&device)?;
    for spec in &photos {
        let (name, path) = spec
            .split_once('=')
            .with_context(|| format!("--photo {spec}: expected NAME=PATH"))?;
        let photo = face::load_image(path, &ImageLimits::default())?;
        let faces = detector.detect(&photo, true)?.len();
        let t = best_of(iters, || Ok(detector.detect(&photo, true)?))?;
        out.insert(format!("mtcnn:{name}"), t.as_secs_f64().into());
        out.insert(format!("mtcnn:{name}:faces"), faces.into());
    }

    // 2. log-mel and the Whisper-tiny-sized encoder on 30 s
    let Some(speech) = speech else {
        println!("{}", serde_json::Value::Object(out));
        return Ok(());
    };
    let clip = audio::load_waveform_16k(&speech, &AudioLimits::default())
        .with_context(|| format!("reading {speech}"))?;
    let wave: Vec<f32> = clip.iter().copied().cycle().take(30 * 16_000).collect();
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
    let extractor =
        AudioFeatureExtractor::from_var_builder(random_weights(DType::F32, &device), &dims)?;
    let t = best_of(iters, || Ok(extractor.log_mel(&wave)?))?;
    out.insert("log_mel_30s".into(), t.as_secs_f64().into());
    let mel = extractor.log_mel(&wave)?;
    let t = best_of(iters, || Ok(extractor.features_from_mel(&mel)?))?;
    out.insert("whisper_tiny_30s".into(), t.as_secs_f64().into());

    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
