//! End-to-end pipeline benchmark on the CPU with the tiny golden model
//! (`testdata/golden/public`, or `ECHOMIMIC_GOLDEN_DIR`): the golden request
//! (photo, speech, sizes, steps, cfg, windows of `manifest.json`), timed per
//! stage, with the peak resident memory.
//!
//! Run: `cargo bench -p echomimic-benches --bench pipeline` (add
//! `-- <iterations>` to change the count, default 3; `-- <iterations>
//! long[=SECONDS]` also runs the speech repeated to SECONDS (default 10) with
//! every frame and 1 step, to show that memory does not grow with the video).
//!
//! Baseline (same run, alternated with the generations so that load from
//! other processes hits both alike): the sampler of the same request run on
//! its own, with the denoising-UNet calls timed inside its hooks. Reported:
//! the sampler's steps over its UNet calls (window gathering, averaging,
//! guidance, DDIM), and the generation's denoising stage and end-to-end time
//! over the same UNet sum. Memory: `VmRSS` / `VmHWM` of `/proc/self/status`.
//!
//! Measured on the 2-core development machine (load average about 4, `-- 3
//! long=10`): golden request (16 frames, 12 UNet calls) 3.86 s end to end,
//! UNet calls 2.14 s, sampler overhead x1.000, end to end / UNet x1.80; peak
//! RSS 77 MiB, the same after 254 frames (10.5 s of speech), so memory does
//! not grow with the video. Later runs on another machine: `benches/RESULTS.md`,
//! section 6.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use echomimic_pipeline::pipeline::{
    Conditioning, DenoiseObserver, EchoMimicPipeline, GenerateReport, GenerateRequest, ModelSource,
    ReferenceInput, SpeechInput, StageTimings, UnetCall,
};

fn golden_dir() -> PathBuf {
    match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public"),
    }
}

/// `VmHWM` / `VmRSS` of this process in MiB (Linux), `None` elsewhere.
fn memory_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mem() -> String {
    match (memory_mib("VmRSS:"), memory_mib("VmHWM:")) {
        (Some(rss), Some(hwm)) => format!("RSS {rss:.0} MiB, peak {hwm:.0} MiB"),
        _ => "memory figures unavailable".into(),
    }
}

/// The golden request of `manifest.json` and the prompt yaml's test case.
fn golden_request(pipeline: &EchoMimicPipeline) -> anyhow::Result<GenerateRequest> {
    let dir = golden_dir();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json"))?)?;
    let c = &m["config"];
    let num = |k: &str| {
        c[k].as_f64()
            .ok_or_else(|| anyhow::anyhow!("manifest config.{k} missing"))
    };
    let photo = dir.join("inputs").join(
        c["photo"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("manifest config.photo missing"))?,
    );
    let speech = std::fs::read_dir(dir.join("inputs"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "wav"))
        .ok_or_else(|| anyhow::anyhow!("no speech .wav under inputs/"))?;
    let mut r = pipeline.request(ReferenceInput::photo_file(photo), SpeechInput::File(speech));
    r.width = num("W")? as u32;
    r.height = num("H")? as u32;
    r.max_frames = num("L")? as usize;
    r.steps = num("steps")? as usize;
    r.cfg = num("cfg")?;
    r.fps = num("fps")?;
    r.context_frames = num("context_frames")? as usize;
    r.context_overlap = num("context_overlap")? as usize;
    r.seed = num("pipe_seed")? as i64;
    Ok(r)
}

fn generate(
    pipeline: &EchoMimicPipeline,
    request: &GenerateRequest,
) -> anyhow::Result<GenerateReport> {
    let mut frames = 0usize;
    let report = pipeline.generate(
        request,
        &mut |_| {},
        &AtomicBool::new(false),
        &mut |_: usize, rgb: &[u8]| {
            frames += std::hint::black_box(rgb).len().min(1);
            Ok(())
        },
    )?;
    anyhow::ensure!(frames == report.frames, "sink got {frames} frames");
    Ok(report)
}

/// Sums the wall time of the UNet calls alone.
#[derive(Default)]
struct UnetTimer {
    started: Option<Instant>,
    total: Duration,
    calls: usize,
}

impl DenoiseObserver for UnetTimer {
    fn before_unet(&mut self, _: &UnetCall<'_>) -> echomimic_pipeline::Result<()> {
        self.started = Some(Instant::now());
        Ok(())
    }

    fn after_unet(&mut self, _: &UnetCall<'_>, out: &Tensor) -> echomimic_pipeline::Result<()> {
        // the output is materialised on the CPU; nothing to synchronise
        std::hint::black_box(out);
        if let Some(t) = self.started.take() {
            self.total += t.elapsed();
            self.calls += 1;
        }
        Ok(())
    }
}

/// The sampler of a request, prepared once (face, audio, bank).
struct Sampler {
    cond: Conditioning,
    latents: Tensor,
    steps: usize,
    context_frames: usize,
    context_overlap: usize,
}

/// Times of one sampling run: the UNet calls alone, and the whole steps.
#[derive(Debug, Clone, Copy, Default)]
struct SamplerTiming {
    unet: Duration,
    steps: Duration,
    calls: usize,
}

impl Sampler {
    fn new(pipeline: &EchoMimicPipeline, request: &GenerateRequest) -> anyhow::Result<Self> {
        let crop = pipeline.face_crop(request)?;
        let wave = match &request.audio {
            SpeechInput::File(path) => {
                echomimic_pipeline::audio::load_waveform_16k(path, &request.audio_limits)?
            }
            SpeechInput::Waveform16k(w) => w.clone(),
        };
        let tokens = pipeline.audio_tokens(&wave, request.fps, request.max_frames)?;
        let (dtype, dev) = (pipeline.dtype(), pipeline.device());
        let face = pipeline.face_features(&crop.mask_tensor(dtype, dev)?)?;
        let reference = pipeline.reference_latents(&crop.reference_image_tensor(dtype, dev)?)?;
        let bank = pipeline.reference_bank(&reference.scaled)?;
        let frames = tokens.frames();
        let noise = pipeline.seeded_noise(0, frames, request.width, request.height)?;
        Ok(Self {
            cond: pipeline.conditioning(&bank, &face, &tokens.tokens, request.cfg)?,
            latents: pipeline.initial_latents(&noise, frames, request.width, request.height)?,
            steps: request.steps,
            context_frames: request.context_frames,
            context_overlap: request.context_overlap,
        })
    }

    fn run(&self, pipeline: &EchoMimicPipeline) -> anyhow::Result<SamplerTiming> {
        let denoiser = pipeline.denoiser(
            &self.cond,
            self.steps,
            self.context_frames,
            self.context_overlap,
        )?;
        let mut timer = UnetTimer::default();
        let mut latents = self.latents.clone();
        let t = Instant::now();
        for step in 0..denoiser.steps() {
            latents = denoiser.step(step, &latents, &mut timer)?.latents;
        }
        std::hint::black_box(latents);
        Ok(SamplerTiming {
            unet: timer.total,
            steps: t.elapsed(),
            calls: timer.calls,
        })
    }
}

fn mean_timings(runs: &[StageTimings]) -> StageTimings {
    let n = runs.len().max(1) as u32;
    let sum = |f: fn(&StageTimings) -> Duration| runs.iter().map(f).sum::<Duration>() / n;
    StageTimings {
        face: sum(|t| t.face),
        audio: sum(|t| t.audio),
        reference: sum(|t| t.reference),
        denoising: sum(|t| t.denoising),
        decoding: sum(|t| t.decoding),
        total: sum(|t| t.total),
    }
}

/// Runs `generate` and the sampler baseline alternately (so that load from
/// other processes hits both alike) after one warm-up of each, and prints.
fn measure(
    label: &str,
    pipeline: &EchoMimicPipeline,
    request: &GenerateRequest,
    iters: usize,
) -> anyhow::Result<()> {
    let sampler = Sampler::new(pipeline, request)?;
    sampler.run(pipeline)?;
    let mut report = generate(pipeline, request)?;
    let mut runs = Vec::with_capacity(iters);
    let mut base = Vec::with_capacity(iters);
    for _ in 0..iters {
        base.push(sampler.run(pipeline)?);
        report = generate(pipeline, request)?;
        runs.push(report.timings);
    }
    let t = mean_timings(&runs);
    let s = |d: Duration| d.as_secs_f64();
    let n = iters as f64;
    let unet = base.iter().map(|b| s(b.unet)).sum::<f64>() / n;
    let steps = base.iter().map(|b| s(b.steps)).sum::<f64>() / n;
    let calls = base[0].calls;
    anyhow::ensure!(calls == report.unet_calls, "baseline made {calls} calls");
    println!("{label}, mean of {iters}");
    println!(
        "  frames {} (audio drives {}), {} steps x {} windows = {} UNet calls, CFG {}",
        report.frames,
        report.audio_frames,
        report.steps,
        report.windows,
        report.unet_calls,
        if report.guidance { "on" } else { "off" }
    );
    println!(
        "  stages: face {:.3} s, audio {:.3} s, reference {:.3} s, denoising {:.3} s, decoding {:.3} s ({:.3} s/frame)",
        s(t.face),
        s(t.audio),
        s(t.reference),
        s(t.denoising),
        s(t.decoding),
        s(t.decoding) / report.frames.max(1) as f64
    );
    println!("  end to end: {:.3} s", s(t.total));
    println!(
        "  baseline: UNet calls alone {unet:.3} s ({:.4} s/call); sampler steps {steps:.3} s (x{:.3} of its UNet calls)",
        unet / calls as f64,
        steps / unet
    );
    println!(
        "  ratios: denoising stage / UNet calls x{:.3}, end to end / UNet calls x{:.2}",
        s(t.denoising) / unet,
        s(t.total) / unet
    );
    println!("  memory: {}", mem());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let iters: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(3).max(1);
    // `long` or `long=SECONDS` (default 10 s of speech)
    let long: Option<f64> = args.iter().find_map(|a| {
        let rest = a.strip_prefix("long")?;
        match rest.strip_prefix('=') {
            Some(secs) => secs.parse().ok(),
            None => rest.is_empty().then_some(10.0),
        }
    });
    let prompt = golden_dir().join("configs/prompts/animation_tiny.yaml");

    println!(
        "pipeline bench (CPU f32, tiny golden model {}), {iters} iterations",
        golden_dir().display()
    );
    println!("  start: {}", mem());
    let t = Instant::now();
    let pipeline = EchoMimicPipeline::load(&ModelSource::PromptYaml(prompt), &Device::Cpu, None)?;
    println!("  load: {:.3} s; {}", t.elapsed().as_secs_f64(), mem());

    let request = golden_request(&pipeline)?;
    measure(
        &format!("golden request {}x{}", request.width, request.height),
        &pipeline,
        &request,
        iters,
    )?;

    if let Some(seconds) = long {
        // The speech repeated to `seconds`, every frame generated, one step:
        // many more frames, the same per-frame state.
        let SpeechInput::File(speech) = &request.audio else {
            anyhow::bail!("expected a speech file");
        };
        let wave = echomimic_pipeline::audio::load_waveform_16k(speech, &Default::default())?;
        let repeats = (seconds * 16_000.0 / wave.len() as f64).ceil().max(1.0) as usize;
        let long_wave: Vec<f32> = std::iter::repeat_n(wave.as_slice(), repeats)
            .flatten()
            .copied()
            .collect();
        let long_req = GenerateRequest {
            audio: SpeechInput::Waveform16k(long_wave),
            max_frames: usize::MAX,
            steps: 1,
            ..request.clone()
        };
        measure(
            &format!(
                "{:.1} s of speech, every frame, 1 step",
                (repeats * wave.len()) as f64 / 16_000.0
            ),
            &pipeline,
            &long_req,
            1,
        )?;
    }
    Ok(())
}
