//! Our CPU kernels against the plain candle composition, in one process and
//! back to back (`echomimic_pipeline::kernels::set_enabled`), at the released
//! widths with random weights: VAE decode of one frame, the reference UNet
//! (one image) and a denoising UNet call (CFG or acc).
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo bench -p echomimic-benches --bench kernels -- \
//!     [--parts vae,ref,cfg,acc] [--latents 8,16,64] [--frames 12] [--rounds 3]
//! ```
//!
//! Each round times the composition then the kernels (one call each, after
//! one untimed warm-up call of each unless `--no-warmup`); the figures are the best of the rounds
//! and `ratio` = kernels / composition. A JSON line per part goes to stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use echomimic_benches::random_weights;
use echomimic_pipeline::config::{
    AutoencoderKLConfig, UNet2DConditionConfig, UnetAdditionalKwargs,
};
use echomimic_pipeline::kernels;
use echomimic_pipeline::models::attention::BankRounding;
use echomimic_pipeline::models::unet_2d_condition::UNet2DConditionModel;
use echomimic_pipeline::models::unet_3d::UNet3DConditionModel;
use echomimic_pipeline::models::vae::AutoencoderKL;
use serde_json::json;

const AUDIO_TOKENS: usize = 50;

#[derive(Parser, Debug)]
#[command(about = "CPU kernels vs candle composition, back to back")]
struct Args {
    /// Comma list of vae, ref, cfg, acc.
    #[arg(long, default_value = "vae")]
    parts: String,
    /// Comma list of latent sizes (8 = a 64² image, 64 = 512²).
    #[arg(long, default_value = "8,16")]
    latents: String,
    /// Frames per denoising call.
    #[arg(long, default_value_t = 12)]
    frames: usize,
    /// Rounds of (composition, kernels).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only one side (`off` = the candle composition, `on` = the
    /// kernels), e.g. under a profiler.
    #[arg(long)]
    only: Option<Side>,
    /// Skip the untimed warm-up round (the 512² VAE decode, full-size UNets).
    #[arg(long)]
    no_warmup: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Side {
    Off,
    On,
}

/// Best-of-`rounds` seconds of `f` with the kernels off and on, alternating.
fn compare(
    a: &Args,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<(f64, f64, f32)> {
    let mut best = [f64::INFINITY; 2];
    let mut outs: [Option<Tensor>; 2] = [None, None];
    let first = usize::from(a.no_warmup);
    for round in first..=a.rounds {
        for (i, on) in [false, true].into_iter().enumerate() {
            if a.only.is_some_and(|s| (s == Side::On) != on) {
                continue;
            }
            kernels::set_enabled(on);
            let start = Instant::now();
            let out = f()?;
            let t = start.elapsed().as_secs_f64();
            if round > 0 {
                best[i] = best[i].min(t);
            }
            outs[i] = Some(out);
        }
    }
    kernels::set_enabled(true);
    let diff = match (&outs[0], &outs[1]) {
        (Some(x), Some(y)) => (x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?,
        _ => f32::NAN,
    };
    Ok((best[0], best[1], diff))
}

fn report(part: &str, latent: usize, (candle, ours, diff): (f64, f64, f32)) {
    eprintln!(
        "{part} latent {latent}: composition {candle:.3} s, kernels {ours:.3} s, ratio {:.3}, max abs diff {diff:.2e}",
        ours / candle
    );
    println!(
        "{}",
        json!({ "part": part, "latent": latent, "composition_s": candle, "kernels_s": ours,
                "ratio": ours / candle, "max_abs_diff": diff,
                "threads": candle_core::utils::get_num_threads(),
                "load_average": echomimic_benches::load_average() })
    );
}

fn main() -> anyhow::Result<()> {
    echomimic_worker::runtime::configure();
    let a = Args::parse_from(std::env::args().filter(|x| x != "--bench"));
    eprintln!(
        "kernels bench: {} threads, load average {:?}",
        candle_core::utils::get_num_threads(),
        echomimic_benches::load_average()
    );
    let dev = Device::Cpu;
    let parts: Vec<&str> = a.parts.split(',').collect();
    let latents: Vec<usize> = a
        .latents
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if parts.contains(&"vae") {
        let vcfg = AutoencoderKLConfig::default();
        let vae = AutoencoderKL::new(random_weights(DType::F32, &dev), &vcfg)?;
        for &l in &latents {
            let z = Tensor::randn(0f32, 1., (1, vcfg.latent_channels, l, l), &dev)?;
            report("vae_decode", l, compare(&a, || Ok(vae.decode(&z)?))?);
        }
    }
    let wants_unet = ["ref", "cfg", "acc"].iter().any(|p| parts.contains(p));
    if !wants_unet {
        return Ok(());
    }
    let cfg = UNet2DConditionConfig::default();
    let extra = UnetAdditionalKwargs::default();
    let audio_dim = extra.cross_attention_dim.unwrap_or(cfg.cross_attention_dim);
    for &l in &latents {
        let ref_latent = Tensor::randn(0f32, 1., (1, 4, l, l), &dev)?;
        let reference = UNet2DConditionModel::new(random_weights(DType::F32, &dev), &cfg)?;
        if parts.contains(&"ref") {
            report(
                "reference_unet",
                l,
                compare(&a, || Ok(reference.forward(&ref_latent, 0.0)?.0))?,
            );
        }
        let (_, bank) = reference.forward(&ref_latent, 0.0)?;
        drop(reference);
        if !(parts.contains(&"cfg") || parts.contains(&"acc")) {
            continue;
        }
        let unet = UNet3DConditionModel::new(random_weights(DType::F32, &dev), &cfg, &extra)?;
        let prepared = unet.prepare_bank(&bank, BankRounding::F16)?;
        for (key, b) in [("acc", 1usize), ("cfg", 2)] {
            if !parts.contains(&key) {
                continue;
            }
            let f = a.frames;
            let x = Tensor::randn(0f32, 1., (b, 4, f, l, l), &dev)?;
            let audio = Tensor::randn(0f32, 1., (b, f, AUDIO_TOKENS, audio_dim), &dev)?;
            let face = Tensor::randn(0f32, 1., (b, cfg.block_out_channels[0], 1, l, l), &dev)?;
            report(
                &format!("denoising_unet_{key}_{f}frames"),
                l,
                compare(&a, || {
                    Ok(unet.forward(&x, 999.0, &audio, Some(&face), &prepared, b == 2)?)
                })?,
            );
        }
    }
    Ok(())
}
