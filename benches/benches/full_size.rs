//! Full-size EchoMimic benchmark with random weights in the real shapes
//! (issue 8's table): seconds per denoising-UNet call (acc B=1, CFG B=2),
//! per VAE frame, for the reference UNet (once per video); seconds of compute
//! per second of video for acc (6 steps) and normal (30 steps, CFG) mode;
//! achieved TFLOP/s (analytic counts, `echomimic_benches::flops`); peak memory.
//!
//! ```text
//! ECHOMIMIC_DEVICE=cpu|cuda[:N] ECHOMIMIC_DTYPE=f32|f16|bf16 \
//! cargo bench -p echomimic-benches [--features cuda] --bench full_size -- \
//!     [--parts ref,acc,cfg,vae] [--latent 64] [--frames 12] [--iters 3] [--no-warmup]
//! ```
//!
//! Configs: `UNet2DConditionConfig::default()` (sd-image-variations
//! `unet/config.json`) and `UnetAdditionalKwargs::default()` (inference_v2
//! `unet_additional_kwargs`), `AutoencoderKLConfig::default()` (sd-vae-ft-mse);
//! 50 audio tokens of width 384 per frame. Peak memory: on CPU the process's
//! peak resident set (`VmHWM`, reset before each part); on CUDA the device's
//! "memory used" from `nvidia-smi`, sampled while each part runs (candle's
//! CUDA backend keeps no allocator statistics).
//!
//! Per video-second (`T` = `--video-seconds`, default 10, at `--fps` 24):
//! `F = fps·T` frames, `W = ceil(F / (context − overlap))` = ceil(F/9)
//! windows per step, so `W·steps/T` UNet calls per video-second, plus `fps`
//! VAE frame decodes, plus one reference UNet call per video (÷T).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Duration;

use anyhow::ensure;
use candle_core::{Device, Tensor};
use clap::Parser;
use echomimic_benches::flops::{self, UNetCall};
use echomimic_benches::{
    device_from_env, dtype_from_env, gib, median_time, proc_status_bytes, random_weights,
    reset_peak_rss, time_once, GpuMemorySampler,
};
use echomimic_pipeline::config::{
    AutoencoderKLConfig, UNet2DConditionConfig, UnetAdditionalKwargs,
};
use echomimic_pipeline::models::attention::BankRounding;
use echomimic_pipeline::models::unet_2d_condition::UNet2DConditionModel;
use echomimic_pipeline::models::unet_3d::UNet3DConditionModel;
use echomimic_pipeline::models::vae::AutoencoderKL;
use serde_json::{json, Value};

/// Frames per context window and overlap (uniform context scheduler).
const CONTEXT_FRAMES: usize = 12;
const CONTEXT_OVERLAP: usize = 3;
const ACC_STEPS: usize = 6;
const NORMAL_STEPS: usize = 30;
const AUDIO_TOKENS: usize = 50;

#[derive(Parser, Debug)]
#[command(about = "Full-size EchoMimic UNet/VAE benchmark with random weights")]
struct Args {
    /// Comma list of ref, acc, cfg, vae.
    #[arg(long, default_value = "ref,acc,cfg,vae")]
    parts: String,
    /// Latent height = width (64 = 512² video).
    #[arg(long, default_value_t = 64)]
    latent: usize,
    /// Frames per UNet call (the context window).
    #[arg(long, default_value_t = CONTEXT_FRAMES)]
    frames: usize,
    /// Timed calls per part (median reported).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Skip the untimed warm-up call (CPU runs at full size).
    #[arg(long)]
    no_warmup: bool,
    #[arg(long, default_value_t = 24)]
    fps: usize,
    /// Clip length used for the per-video-second figures.
    #[arg(long, default_value_t = 10)]
    video_seconds: usize,
}

/// Peak-memory probe around one part.
enum Probe {
    Cpu,
    Gpu(usize, Option<u64>, GpuMemorySampler),
}

impl Probe {
    fn start(dev: &Device) -> Self {
        match dev {
            Device::Cuda(_) => {
                let ordinal = cuda_ordinal();
                let before = echomimic_benches::nvidia_smi_used_bytes(ordinal);
                Self::Gpu(
                    ordinal,
                    before,
                    GpuMemorySampler::start(ordinal, Duration::from_millis(20)),
                )
            }
            _ => {
                reset_peak_rss();
                Self::Cpu
            }
        }
    }

    fn finish(self) -> Value {
        match self {
            Self::Cpu => json!({ "kind": "VmHWM", "peak_bytes": proc_status_bytes("VmHWM") }),
            Self::Gpu(ordinal, before, sampler) => json!({
                "kind": "nvidia-smi memory.used (device-wide, sampled every 20 ms)",
                "ordinal": ordinal,
                "before_bytes": before,
                "peak_bytes": sampler.stop(),
            }),
        }
    }
}

fn cuda_ordinal() -> usize {
    std::env::var("ECHOMIMIC_DEVICE")
        .ok()
        .and_then(|d| d.strip_prefix("cuda:").and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn timed<T>(
    a: &Args,
    dev: &Device,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    if a.no_warmup {
        let mut times = Vec::with_capacity(a.iters);
        for _ in 0..a.iters.max(1) {
            times.push(time_once(dev, &mut f)?.0.as_secs_f64());
        }
        let mut s = times.clone();
        s.sort_by(f64::total_cmp);
        Ok((s[s.len() / 2], times))
    } else {
        let (m, t) = median_time(dev, a.iters, f)?;
        Ok((
            m.as_secs_f64(),
            t.iter().map(Duration::as_secs_f64).collect(),
        ))
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse_from(std::env::args().filter(|x| x != "--bench"));
    ensure!(
        a.latent > 0 && a.frames > 0 && a.iters > 0,
        "sizes must be positive"
    );
    let dev = device_from_env()?;
    let dtype = dtype_from_env()?;
    let parts: Vec<&str> = a.parts.split(',').collect();
    let cfg = UNet2DConditionConfig::default();
    let extra = UnetAdditionalKwargs::default();
    let audio_dim = extra.cross_attention_dim.unwrap_or(cfg.cross_attention_dim);
    let (h, w, f) = (a.latent, a.latent, a.frames);
    eprintln!(
        "full_size: {dev:?} {dtype:?}, latent {h}x{w}, {f} frames, {} iterations{}",
        a.iters,
        if a.no_warmup { ", no warm-up" } else { "" }
    );
    let mut results = serde_json::Map::new();

    // 1. Reference UNet once → bank → to_k/to_v of the bank (once per video).
    let ref_latent = Tensor::randn(0f32, 1., (1, 4, h, w), &dev)?.to_dtype(dtype)?;
    let probe = Probe::start(&dev);
    let reference = UNet2DConditionModel::new(random_weights(dtype, &dev), &cfg)?;
    let (t_ref, times) = if parts.contains(&"ref") {
        timed(&a, &dev, || Ok(reference.forward(&ref_latent, 0.0)?))?
    } else {
        (f64::NAN, vec![])
    };
    let (_, bank) = reference.forward(&ref_latent, 0.0)?;
    drop(reference);
    let ref_call = UNetCall::reference(h, w);
    let ref_flops = flops::unet(&cfg, &ref_call);
    results.insert(
        "ref".into(),
        json!({ "seconds": t_ref, "times": times, "flops": ref_flops,
                "tflops_per_s": ref_flops / t_ref / 1e12, "memory": probe.finish() }),
    );
    eprintln!(
        "reference UNet: {t_ref:.3} s ({:.2} TFLOP/s)",
        ref_flops / t_ref / 1e12
    );

    // 2. Denoising UNet, acc (B=1, bank on every row) and CFG (B=2).
    let mut t_call = [f64::NAN; 2];
    if parts.contains(&"acc") || parts.contains(&"cfg") {
        let probe = Probe::start(&dev);
        let unet = UNet3DConditionModel::new(random_weights(dtype, &dev), &cfg, &extra)?;
        let (t_prep, prepared) =
            time_once(&dev, || Ok(unet.prepare_bank(&bank, BankRounding::F16)?))?;
        drop(bank);
        results.insert(
            "prepare_bank".into(),
            json!({
            "seconds": t_prep.as_secs_f64(), "flops": flops::bank_projections(&cfg, h, w),
            "memory": probe.finish() }),
        );
        for (i, (key, b)) in [("acc", 1usize), ("cfg", 2)].into_iter().enumerate() {
            if !parts.contains(&key) {
                continue;
            }
            let cfg_on = b == 2;
            let x = Tensor::randn(0f32, 1., (b, 4, f, h, w), &dev)?.to_dtype(dtype)?;
            let audio =
                Tensor::randn(0f32, 1., (b, f, AUDIO_TOKENS, audio_dim), &dev)?.to_dtype(dtype)?;
            let face = Tensor::randn(0f32, 1., (b, cfg.block_out_channels[0], 1, h, w), &dev)?
                .to_dtype(dtype)?;
            let bank_rows = if cfg_on { f } else { b * f };
            let call = UNetCall::denoising(
                b,
                f,
                (h, w),
                (AUDIO_TOKENS, audio_dim),
                bank_rows,
                Some(extra.clone()),
            );
            let fl = flops::unet(&cfg, &call);
            let probe = Probe::start(&dev);
            let (t, times) = timed(&a, &dev, || {
                Ok(unet.forward(&x, 999.0, &audio, Some(&face), &prepared, cfg_on)?)
            })?;
            t_call[i] = t;
            eprintln!(
                "denoising UNet {key} (B={b}): {t:.3} s/call ({:.2} TFLOP/s)",
                fl / t / 1e12
            );
            results.insert(
                key.into(),
                json!({
                "batch": b, "seconds": t, "times": times, "flops": fl,
                "tflops_per_s": fl / t / 1e12, "memory": probe.finish() }),
            );
        }
    }

    // 3. VAE: decode one frame (and encode the reference image once).
    let mut t_vae = f64::NAN;
    if parts.contains(&"vae") {
        let vcfg = AutoencoderKLConfig::default();
        let probe = Probe::start(&dev);
        let vae = AutoencoderKL::new(random_weights(dtype, &dev), &vcfg)?;
        let z = Tensor::randn(0f32, 1., (1, vcfg.latent_channels, h, w), &dev)?.to_dtype(dtype)?;
        let (t, times) = timed(&a, &dev, || Ok(vae.decode(&z)?))?;
        t_vae = t;
        let fl = flops::vae_decode(&vcfg, h, w);
        eprintln!(
            "VAE decode, 1 frame: {t:.3} s ({:.2} TFLOP/s)",
            fl / t / 1e12
        );
        results.insert(
            "vae_decode".into(),
            json!({
            "seconds": t, "times": times, "flops": fl, "tflops_per_s": fl / t / 1e12,
            "memory": probe.finish() }),
        );
    }

    // 4. Derived: per video-second.
    let frames_total = a.fps * a.video_seconds;
    let windows = frames_total.div_ceil(CONTEXT_FRAMES - CONTEXT_OVERLAP);
    let calls_per_s = |steps: usize| (windows * steps) as f64 / a.video_seconds as f64;
    let per_s = |t_call: f64, steps: usize| {
        calls_per_s(steps) * t_call + a.fps as f64 * t_vae + t_ref / a.video_seconds as f64
    };
    let flops_per_s = |key: &str, steps: usize| -> f64 {
        let get = |k: &str| {
            results
                .get(k)
                .and_then(|v| v["flops"].as_f64())
                .unwrap_or(f64::NAN)
        };
        calls_per_s(steps) * get(key)
            + a.fps as f64 * get("vae_decode")
            + get("ref") / a.video_seconds as f64
    };
    let acc_s = per_s(t_call[0], ACC_STEPS);
    let normal_s = per_s(t_call[1], NORMAL_STEPS);
    let (acc_f, normal_f) = (
        flops_per_s("acc", ACC_STEPS),
        flops_per_s("cfg", NORMAL_STEPS),
    );
    if f != CONTEXT_FRAMES {
        eprintln!(
            "note: calls of {f} frames, not the {CONTEXT_FRAMES}-frame window: the per-video-second \
             figures below are not meaningful"
        );
    }
    eprintln!(
        "per video-second ({} s clip, {frames_total} frames, {windows} windows): \
         acc {acc_s:.2} s ({:.1} calls), normal {normal_s:.2} s ({:.1} calls)",
        a.video_seconds,
        calls_per_s(ACC_STEPS),
        calls_per_s(NORMAL_STEPS)
    );
    // 5. What an unchunked attention would hold at once (f32 scores) in the
    //    largest reference attention of a 12-frame CFG call vs the chunk bound.
    let heads = cfg.heads(0);
    let l = h * w;
    let window = CONTEXT_FRAMES;
    let all_rows_bank = 2 * window * heads * l * 2 * l * 4;
    let cond_only_bank = window * heads * l * 2 * l * 4 + window * heads * l * l * 4;
    let bound = echomimic_pipeline::ops::max_score_elems(&dev) * 4;
    eprintln!(
        "unchunked scores of a {window}-frame CFG call at {h}x{w}: {:.1} GB (all {} rows over 2L keys, \
         as the official code computes), {:.1} GB (bank on the cond half only); our bound {:.3} GB",
        all_rows_bank as f64 / 1e9,
        2 * window,
        cond_only_bank as f64 / 1e9,
        bound as f64 / 1e9
    );
    for (k, v) in &results {
        if let Some(p) = v["memory"]["peak_bytes"].as_u64() {
            eprintln!("peak memory during {k}: {:.2} GiB", gib(p));
        }
    }
    let out = json!({
        "tool": "echomimic-rs full_size",
        "device": format!("{dev:?}"),
        "dtype": format!("{dtype:?}"),
        "latent": h,
        "frames": f,
        "iters": a.iters,
        "warmup": !a.no_warmup,
        "threads": candle_core::utils::get_num_threads(),
        "load_average": echomimic_benches::load_average(),
        "results": results,
        "per_video_second": {
            "valid": f == CONTEXT_FRAMES,
            "clip_seconds": a.video_seconds, "fps": a.fps, "windows": windows,
            "acc": { "steps": ACC_STEPS, "calls": calls_per_s(ACC_STEPS), "seconds": acc_s,
                     "flops": acc_f, "tflops_per_s": acc_f / acc_s / 1e12 },
            "normal": { "steps": NORMAL_STEPS, "calls": calls_per_s(NORMAL_STEPS), "seconds": normal_s,
                        "flops": normal_f, "tflops_per_s": normal_f / normal_s / 1e12 },
        },
        "unchunked_attention_bytes": {
            "window_frames": window,
            "all_rows_with_bank": all_rows_bank, "cond_rows_with_bank": cond_only_bank,
            "chunk_bound": bound,
        },
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
