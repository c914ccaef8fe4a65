//! UNet benchmark: one denoising-UNet call (and the once-per-video reference
//! UNet + bank preparation) on CPU with a mid-size random-weight config, plus
//! the cost of chunking the attention.
//!
//! Run: `cargo bench -p echomimic-benches --bench unet` (add `-- <iterations>`
//! to change the count, default 3).
//!
//! Config: SD-1.x block structure with block_out_channels [64, 128, 256, 256],
//! 2 layers per block, 8 heads, 32 groups, audio width 384 (50 tokens per
//! frame), motion modules everywhere; latents 16×16, 8 frames, CFG batch of 2.
//! Figures are absolute seconds on this machine; the attention figure is a
//! ratio (chunked / unchunked) measured in the same run.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use echomimic_pipeline::config::{MotionModuleKwargs, UNet2DConditionConfig, UnetAdditionalKwargs};
use echomimic_pipeline::models::attention::BankRounding;
use echomimic_pipeline::models::unet_2d_condition::UNet2DConditionModel;
use echomimic_pipeline::models::unet_3d::UNet3DConditionModel;
use echomimic_pipeline::ops;

const FRAMES: usize = 8;
const LATENT: usize = 16;
const AUDIO_TOKENS: usize = 50;

/// Runs `f` `n` times after one warm-up call; returns the mean duration.
fn time<T>(n: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    black_box(f()?);
    let t = Instant::now();
    for _ in 0..n {
        black_box(f()?);
    }
    Ok(t.elapsed() / n as u32)
}

fn configs() -> (UNet2DConditionConfig, UnetAdditionalKwargs) {
    let cfg = UNet2DConditionConfig {
        block_out_channels: vec![64, 128, 256, 256],
        ..Default::default()
    };
    let extra = UnetAdditionalKwargs {
        motion_module_kwargs: MotionModuleKwargs::default(),
        ..Default::default()
    };
    (cfg, extra)
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(3);
    let dev = Device::Cpu;
    let (cfg, extra) = configs();
    let audio_dim = extra.cross_attention_dim.unwrap_or(cfg.cross_attention_dim);

    let vm = VarMap::new();
    let reference =
        UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)?;
    let vm = VarMap::new();
    let denoising =
        UNet3DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg, &extra)?;

    let ref_latent = Tensor::randn(0f32, 1., (1, 4, LATENT, LATENT), &dev)?;
    let t_ref = time(iters, || Ok(reference.forward(&ref_latent, 0.0)?))?;
    let (_, bank) = reference.forward(&ref_latent, 0.0)?;
    let t_prep = time(iters, || {
        Ok(denoising.prepare_bank(&bank, BankRounding::F16)?)
    })?;
    let prepared = denoising.prepare_bank(&bank, BankRounding::F16)?;

    let sample = Tensor::randn(0f32, 1., (2, 4, FRAMES, LATENT, LATENT), &dev)?;
    let audio = Tensor::randn(0f32, 1., (2, FRAMES, AUDIO_TOKENS, audio_dim), &dev)?;
    let face = Tensor::randn(
        0f32,
        1.,
        (2, cfg.block_out_channels[0], 1, LATENT, LATENT),
        &dev,
    )?;
    let t_cfg = time(iters, || {
        Ok(denoising.forward(&sample, 999.0, &audio, Some(&face), &prepared, true)?)
    })?;
    let one = |t: &Tensor| t.narrow(0, 1, 1);
    let (s1, a1, f1) = (one(&sample)?, one(&audio)?, one(&face)?);
    let t_one = time(iters, || {
        Ok(denoising.forward(&s1, 999.0, &a1, Some(&f1), &prepared, false)?)
    })?;

    // Reference attention shaped like the first level of a 512² run, at a
    // quarter of the tokens: 8 heads, 2048 queries over 2048 own + 2048 bank
    // keys, head dim 40 (64 Mi scores when unchunked).
    let q = Tensor::randn(0f32, 1., (1, 8, 2048, 40), &dev)?;
    let k = Tensor::randn(0f32, 1., (1, 8, 4096, 40), &dev)?;
    let v = Tensor::randn(0f32, 1., (1, 8, 4096, 40), &dev)?;
    let scale = 1.0 / 40f64.sqrt();
    let t_whole = time(iters, || {
        Ok(ops::attention_chunked(&q, &k, &v, scale, usize::MAX)?)
    })?;
    let chunk = 8 * 4096 * 256; // 256 query rows per chunk
    let t_chunked = time(iters, || {
        Ok(ops::attention_chunked(&q, &k, &v, scale, chunk)?)
    })?;

    let s = |d: Duration| d.as_secs_f64();
    println!(
        "unet bench (CPU f32, {iters} iterations, latents {LATENT}x{LATENT}, {FRAMES} frames)"
    );
    println!(
        "  reference UNet, 1 image          : {:.3} s/call",
        s(t_ref)
    );
    println!("  prepare_bank (to_k/to_v of bank) : {:.3} s", s(t_prep));
    println!(
        "  denoising UNet, B=2 (CFG)        : {:.3} s/call",
        s(t_cfg)
    );
    println!(
        "  denoising UNet, B=1 (no CFG)     : {:.3} s/call",
        s(t_one)
    );
    println!(
        "  attention 8x2048x4096: whole {:.3} s, chunked by 256 rows {:.3} s, ratio {:.2}",
        s(t_whole),
        s(t_chunked),
        s(t_chunked) / s(t_whole)
    );
    Ok(())
}
