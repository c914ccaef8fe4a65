//! Our UNets and VAE against diffusers on the same device, config, dtype and
//! batch (the Rust half of `scripts/bench-vs-diffusers.sh`; the Python half is
//! `benches/python/diffusers_baseline.py`).
//!
//! ```text
//! cargo bench -p echomimic-benches --bench unet_vs_diffusers -- \
//!     [--weights DIR] [--latent 32] [--frames 8] [--iters 3] [--parts unet,ref,vae,echo]
//! ```
//!
//! Pairs (like for like):
//! * `unet` / `unet_acc`: our denoising UNet3D **without** motion modules and
//!   with an empty bank is, frame by frame, the SD-1.x `UNet2DConditionModel`
//!   with the audio tokens as cross-attention context — the same network as
//!   diffusers' at batch `B·F` (only the audio branch is weighted by 3.0; with
//!   `--weights` its `to_out.0` is divided by 3 so both compute one function);
//! * `ref`: our reference UNet = diffusers' UNet without `attn2`/`norm2`/
//!   `conv_norm_out`/`conv_out` (the baseline strips them);
//! * `vae_encode` / `vae_decode`: the same AutoencoderKL.
//!
//! `echo_cfg` / `echo_acc` time the real EchoMimic denoising UNet (motion
//! modules at every level, reference bank, CFG batch or acc batch). It does
//! more work than the plain network; the script reports both the raw ratio and
//! the ratio per FLOP (analytic counts, `echomimic_benches::flops`).
//!
//! With `--weights DIR` (the baseline's `--export` folder) the plain networks
//! load diffusers' random weights and the max abs difference of the outputs is
//! reported; without it every network has random weights of its own.
//! Prints one JSON object on stdout and a summary on stderr.
//!
//! Device and dtype: `ECHOMIMIC_DEVICE` (`cpu`, `cuda`, `cuda:N`) and
//! `ECHOMIMIC_DTYPE` (`f32`, `f16`, `bf16`), as `full_size`; pass the same
//! `--device`/`--dtype` to the baseline. Loaded weights and inputs are cast to
//! the dtype; differences are measured in f64. On CUDA the JSON also holds the
//! device's peak "memory used" (`nvidia-smi`, sampled every 20 ms, whole GPU).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Parser;
use echomimic_benches::flops::{self, UNetCall};
use echomimic_benches::{
    device_from_env, dtype_from_env, median_time, nvidia_smi_used_bytes, proc_status_bytes,
    random_weights, GpuMemorySampler,
};
use echomimic_pipeline::config::{
    AutoencoderKLConfig, DownBlockType, MotionModuleKwargs, PerBlock, UNet2DConditionConfig,
    UnetAdditionalKwargs, UpBlockType,
};
use echomimic_pipeline::models::attention::{BankRounding, PreparedBank, AUDIO_FEATURE_RATIO};
use echomimic_pipeline::models::unet_2d_condition::UNet2DConditionModel;
use echomimic_pipeline::models::unet_3d::UNet3DConditionModel;
use echomimic_pipeline::models::vae::AutoencoderKL;
use echomimic_pipeline::ops::max_abs_diff;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "Our UNets/VAE timed like benches/python/diffusers_baseline.py")]
struct Args {
    /// Folder written by `diffusers_baseline.py --export` (same weights, parity check).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Comma list of unet, ref, vae, echo.
    #[arg(long, default_value = "unet,ref,vae,echo")]
    parts: String,
    #[arg(long, default_value = "64,128,256,256")]
    block_out_channels: String,
    #[arg(long, default_value_t = 2)]
    layers_per_block: usize,
    /// Heads of the spatial transformers (legacy `attention_head_dim`).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    #[arg(long, default_value_t = 32)]
    norm_groups: usize,
    #[arg(long, default_value_t = 384)]
    audio_dim: usize,
    #[arg(long, default_value_t = 50)]
    audio_tokens: usize,
    /// Latent height = width.
    #[arg(long, default_value_t = 32)]
    latent: usize,
    #[arg(long, default_value_t = 8)]
    frames: usize,
    #[arg(long, default_value = "128,256,512,512")]
    vae_block_out_channels: String,
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// `echo` parts without motion modules (to attribute their cost).
    #[arg(long)]
    echo_no_motion: bool,
    /// `echo` parts with an empty bank (to attribute its cost).
    #[arg(long)]
    echo_no_bank: bool,
}

fn ints(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.trim()
                .parse()
                .with_context(|| format!("bad integer `{x}`"))
        })
        .collect()
}

fn unet_config(a: &Args) -> anyhow::Result<UNet2DConditionConfig> {
    let boc = ints(&a.block_out_channels)?;
    let n = boc.len();
    ensure!(n >= 2, "at least two UNet blocks");
    let mut down = vec![DownBlockType::CrossAttnDownBlock; n - 1];
    down.push(DownBlockType::DownBlock);
    let mut up = vec![UpBlockType::UpBlock];
    up.extend(vec![UpBlockType::CrossAttnUpBlock; n - 1]);
    Ok(UNet2DConditionConfig {
        block_out_channels: boc,
        down_block_types: down,
        up_block_types: up,
        layers_per_block: a.layers_per_block,
        attention_head_dim: PerBlock::Uniform(a.heads),
        norm_num_groups: a.norm_groups,
        cross_attention_dim: a.audio_dim,
        ..Default::default()
    })
}

/// `unet_additional_kwargs` of the released model, with motion modules on or off.
fn extra(a: &Args, motion: bool) -> UnetAdditionalKwargs {
    UnetAdditionalKwargs {
        use_motion_module: motion,
        cross_attention_dim: Some(a.audio_dim),
        motion_module_kwargs: MotionModuleKwargs::default(),
        ..Default::default()
    }
}

/// Weights from the baseline's export (`name.safetensors`), or `None`.
fn load(
    dir: Option<&Path>,
    name: &str,
    dev: &Device,
) -> anyhow::Result<Option<HashMap<String, Tensor>>> {
    dir.map(|d| {
        let p = d.join(format!("{name}.safetensors"));
        candle_core::safetensors::load(&p, dev).with_context(|| format!("reading {}", p.display()))
    })
    .transpose()
}

/// The loaded weights, else random ones. Never a `VarMap`: its tensors are
/// variables, so candle records the autograd graph of every forward call and
/// keeps all activations alive (10.3 GiB peak instead of 0.8 GiB here).
fn builder(
    weights: Option<HashMap<String, Tensor>>,
    dtype: DType,
    dev: &Device,
) -> VarBuilder<'static> {
    match weights {
        Some(w) => VarBuilder::from_tensors(w, dtype, dev),
        None => random_weights(dtype, dev),
    }
}

/// The largest |x| of a tensor of any dtype.
fn abs_max(t: &Tensor) -> candle_core::Result<f32> {
    t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn entry(median: Duration, times: &[Duration], flops: f64) -> Value {
    json!({
        "seconds": secs(median),
        "times": times.iter().map(|t| secs(*t)).collect::<Vec<_>>(),
        "flops": flops,
    })
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse_from(std::env::args().filter(|x| x != "--bench"));
    ensure!(
        a.iters > 0 && a.latent > 0 && a.frames > 0,
        "sizes must be positive"
    );
    let dev = device_from_env()?;
    let dtype = dtype_from_env()?;
    let gpu = match &dev {
        Device::Cuda(_) => Some((
            nvidia_smi_used_bytes(0),
            GpuMemorySampler::start(0, Duration::from_millis(20)),
        )),
        _ => None,
    };
    eprintln!("unet_vs_diffusers: {dev:?} {dtype:?}");
    let parts: Vec<&str> = a.parts.split(',').collect();
    let cfg = unet_config(&a)?;
    let (h, w, f) = (a.latent, a.latent, a.frames);
    let io = |name: &str| -> anyhow::Result<Option<HashMap<String, Tensor>>> {
        load(a.weights.as_deref(), &format!("{name}_io"), &dev)
    };
    // An input from the export (cast to the dtype), else a random one.
    let input = |t: Option<&HashMap<String, Tensor>>, key: &str, shape: &[usize]| {
        let x = match t {
            Some(t) => t
                .get(key)
                .with_context(|| format!("export: no tensor `{key}`"))?
                .clone(),
            None => Tensor::randn(0f32, 1., shape, &dev)?,
        };
        anyhow::Ok(x.to_dtype(dtype)?)
    };
    let mut results = serde_json::Map::new();
    let mut bank = None;

    if parts.contains(&"ref") || parts.contains(&"echo") {
        let reference = UNet2DConditionModel::new(
            builder(load(a.weights.as_deref(), "ref", &dev)?, dtype, &dev),
            &cfg,
        )?;
        let x = input(io("ref")?.as_ref(), "sample", &[1, 4, h, w])?;
        let (out, b) = reference.forward(&x, 0.0)?;
        bank = Some(b);
        if parts.contains(&"ref") {
            let call = UNetCall::reference(h, w);
            let (med, times) = median_time(&dev, a.iters, || Ok(reference.forward(&x, 0.0)?))?;
            let mut e = entry(med, &times, flops::unet(&cfg, &call));
            if let Some(t) = io("ref")? {
                e["max_abs_diff"] =
                    json!(max_abs_diff(&out, t.get("out").context("ref_io: out")?)?);
                e["out_abs_max"] = json!(abs_max(&out)?);
            }
            results.insert("ref".into(), e);
        }
    }

    if parts.contains(&"unet") {
        // Same network as diffusers: no motion modules, no bank.
        let ex = extra(&a, false);
        let weights = load(a.weights.as_deref(), "unet", &dev)?.map(|mut m| {
            // EchoMimic weights the audio attention by 3.0 (`audio_feature_ratio`),
            // diffusers does not: divide `to_out.0` so both compute one function.
            for (k, v) in m.iter_mut() {
                if k.contains("attn2.to_out.0.") {
                    *v = (&*v / AUDIO_FEATURE_RATIO).expect("scaling a loaded tensor");
                }
            }
            m
        });
        let unet = UNet3DConditionModel::new(builder(weights, dtype, &dev), &cfg, &ex)?;
        let t = io("unet")?;
        let x_rows = input(t.as_ref(), "sample", &[2 * f, 4, h, w])?;
        let ctx = input(t.as_ref(), "context", &[2 * f, a.audio_tokens, a.audio_dim])?;
        let b = x_rows.dim(0)? / f;
        // rows (b·F, c, h, w) → (b, c, F, h, w)
        let video = |rows: &Tensor, b: usize| -> candle_core::Result<Tensor> {
            rows.reshape((b, f, 4, h, w))?
                .permute((0, 2, 1, 3, 4))?
                .contiguous()
        };
        let x = video(&x_rows, b)?;
        let empty = PreparedBank::empty();
        for (key, b) in [("unet", b), ("unet_acc", 1)] {
            let xb = x.narrow(0, 0, b)?;
            let cb = ctx.narrow(0, 0, b * f)?;
            let call = UNetCall::denoising(b, f, (h, w), (a.audio_tokens, a.audio_dim), 0, None);
            let (med, times) = median_time(&dev, a.iters, || {
                Ok(unet.forward(&xb, 999.0, &cb, None, &empty, b == 2)?)
            })?;
            let mut e = entry(med, &times, flops::unet(&cfg, &call));
            e["flops_as_diffusers"] = json!(flops::unet(
                &cfg,
                &UNetCall {
                    temb_rows: b * f,
                    ..call
                }
            ));
            if key == "unet" {
                if let Some(t) = io("unet")? {
                    let out = unet.forward(&xb, 999.0, &cb, None, &empty, b == 2)?;
                    let out_rows = out.permute((0, 2, 1, 3, 4))?.reshape((b * f, 4, h, w))?;
                    e["max_abs_diff"] = json!(max_abs_diff(
                        &out_rows,
                        t.get("out").context("unet_io: out")?
                    )?);
                    e["out_abs_max"] = json!(abs_max(&out_rows)?);
                }
            }
            results.insert(key.into(), e);
        }
    }

    if parts.contains(&"echo") {
        // The real denoising UNet: motion modules everywhere, bank, CFG.
        let ex = extra(&a, !a.echo_no_motion);
        let unet = UNet3DConditionModel::new(random_weights(dtype, &dev), &cfg, &ex)?;
        let bank = bank
            .as_ref()
            .context("the bank comes from the reference UNet")?;
        let prepared = if a.echo_no_bank {
            PreparedBank::empty()
        } else {
            unet.prepare_bank(bank, BankRounding::F16)?
        };
        for (key, b) in [("echo_cfg", 2usize), ("echo_acc", 1)] {
            let x = input(None, "", &[b, 4, f, h, w])?;
            let audio = input(None, "", &[b, f, a.audio_tokens, a.audio_dim])?;
            let face = input(None, "", &[b, cfg.block_out_channels[0], 1, h, w])?;
            let cfg_on = b == 2;
            let bank_rows = match (a.echo_no_bank, cfg_on) {
                (true, _) => 0,
                (false, true) => f,
                (false, false) => b * f,
            };
            let context = (a.audio_tokens, a.audio_dim);
            let call = UNetCall::denoising(b, f, (h, w), context, bank_rows, Some(ex.clone()));
            let (med, times) = median_time(&dev, a.iters, || {
                Ok(unet.forward(&x, 999.0, &audio, Some(&face), &prepared, cfg_on)?)
            })?;
            results.insert(key.into(), entry(med, &times, flops::unet(&cfg, &call)));
        }
    }

    if parts.contains(&"vae") {
        let vcfg = AutoencoderKLConfig {
            block_out_channels: ints(&a.vae_block_out_channels)?,
            ..Default::default()
        };
        let vae = AutoencoderKL::new(
            builder(load(a.weights.as_deref(), "vae", &dev)?, dtype, &dev),
            &vcfg,
        )?;
        let side = h << (vcfg.block_out_channels.len() - 1);
        let t = io("vae")?;
        let img = input(t.as_ref(), "image", &[1, 3, side, side])?;
        let z = input(t.as_ref(), "z", &[1, vcfg.latent_channels, h, w])?;
        let (me, te) = median_time(&dev, a.iters, || Ok(vae.encode(&img)?.mean))?;
        let (md, td) = median_time(&dev, a.iters, || Ok(vae.decode(&z)?))?;
        let mut enc = entry(me, &te, f64::NAN);
        let mut dec = entry(md, &td, flops::vae_decode(&vcfg, h, w));
        if let Some(t) = &t {
            enc["max_abs_diff"] = json!(max_abs_diff(
                &vae.encode(&img)?.mean,
                t.get("mean").context("vae_io: mean")?
            )?);
            dec["max_abs_diff"] = json!(max_abs_diff(
                &vae.decode(&z)?,
                t.get("out").context("vae_io: out")?
            )?);
        }
        results.insert("vae_encode".into(), enc);
        results.insert("vae_decode".into(), dec);
    }

    let gpu_memory = gpu.map(|(before, sampler)| {
        json!({
            "kind": "nvidia-smi memory.used (whole GPU, sampled every 20 ms)",
            "before_bytes": before,
            "peak_bytes": sampler.stop(),
        })
    });
    let out = json!({
        "tool": "echomimic-rs",
        "device": std::env::var("ECHOMIMIC_DEVICE").unwrap_or_else(|_| "cpu".into()),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "gpu_memory": gpu_memory,
        "threads": candle_core::utils::get_num_threads(),
        "iters": a.iters,
        "latent": a.latent,
        "frames": a.frames,
        "vm_hwm_bytes": proc_status_bytes("VmHWM"),
        "load_average": echomimic_benches::load_average(),
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
