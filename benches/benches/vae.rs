//! VAE encode/decode timing at the released `sd-vae-ft-mse` sizes (random
//! weights), reported in absolute time and as a ratio to a 1024³ f32 matmul
//! measured in the same run (so numbers from different machines compare).
//!
//! `cargo bench -p echomimic-benches --bench vae -- [latent_size] [iterations]`
//! (defaults 16 → a 128×128 image, 3 iterations; 64 is EchoMimic's 512×512).

use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use echomimic_pipeline::config::AutoencoderKLConfig;
use echomimic_pipeline::models::vae::AutoencoderKL;

fn median_time(
    device: &Device,
    iterations: usize,
    mut f: impl FnMut() -> anyhow::Result<Tensor>,
) -> anyhow::Result<Duration> {
    // Warm-up (allocations, kernel caches).
    f()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(start.elapsed());
        drop(out);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let latent: usize = args
        .first()
        .map_or(Ok(16), |a| a.parse())
        .context("latent size")?;
    let iterations: usize = args
        .get(1)
        .map_or(Ok(3), |a| a.parse())
        .context("iterations")?;
    anyhow::ensure!(latent > 0 && iterations > 0, "sizes must be positive");

    let device = Device::Cpu;
    let cfg = AutoencoderKLConfig::default();
    let varmap = VarMap::new();
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &cfg)?;
    let scale = 2usize.pow(cfg.block_out_channels.len() as u32 - 1);
    let image = Tensor::randn(
        0f32,
        1.,
        (1, cfg.in_channels, latent * scale, latent * scale),
        &device,
    )?;
    let z = Tensor::randn(0f32, 1., (1, cfg.latent_channels, latent, latent), &device)?;

    let a = Tensor::randn(0f32, 1., (1024, 1024), &device)?;
    let baseline = median_time(&device, iterations.max(5), || Ok(a.matmul(&a)?))?;
    let encode = median_time(&device, iterations, || Ok(vae.encode(&image)?.mean))?;
    let decode = median_time(&device, iterations, || Ok(vae.decode(&z)?))?;

    let ratio = |d: Duration| d.as_secs_f64() / baseline.as_secs_f64();
    let side = latent * scale;
    eprintln!("device {device:?}, f32, latent {latent}x{latent} (image {side}x{side}), median of {iterations}");
    eprintln!("baseline matmul 1024^3: {baseline:?}");
    eprintln!("vae encode: {encode:?} ({:.1}x baseline)", ratio(encode));
    eprintln!("vae decode: {decode:?} ({:.1}x baseline)", ratio(decode));
    Ok(())
}
