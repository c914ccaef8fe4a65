//! CUDA smoke probe: runs the tensor operations the EchoMimic networks use on
//! the CPU (float32 reference) and on a second device, and prints one
//! PASS/FAIL line per check with the measured max-abs difference.
//!
//! It is the first thing `scripts/gpu-check.sh` runs on the GPU machine: it
//! proves that the carried binary starts there (driver, cuBLAS, cuRAND and the
//! embedded PTX load) before any model test runs.
//!
//! Usage: `cuda_probe [--device cuda|cuda:N|auto|cpu] [--dtypes f32,f16,bf16]`
//! (defaults: `cuda`, all three). Exit status 0 when every check passes, 1
//! when one fails, 2 when the device cannot be opened.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use echomimic_pipeline::device::{device_label, parse_dtype, select_device, DeviceChoice};
use echomimic_pipeline::ops;
use echomimic_pipeline::rng::torch_randn;

/// One comparison: `f(inputs)` on the CPU in f32 vs on the device in `dtype`.
struct Check {
    name: &'static str,
    /// Input shapes; inputs are N(0, 1) drawn on the CPU (seeded), then rounded to the
    /// dtype under test so that both sides see the same numbers.
    shapes: &'static [&'static [usize]],
    run: fn(&[Tensor]) -> candle_core::Result<Tensor>,
    /// Multiplier on the dtype's tolerance (long half-precision reductions).
    slack: f64,
}

fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "matmul 256x512 @ 512x384 (cuBLAS)",
            shapes: &[&[256, 512], &[512, 384]],
            run: |x| x[0].matmul(&x[1]),
            slack: 1.0,
        },
        Check {
            name: "batched matmul 8x(128x64 @ 64x128)",
            shapes: &[&[8, 128, 64], &[8, 64, 128]],
            run: |x| x[0].matmul(&x[1]),
            slack: 1.0,
        },
        Check {
            name: "conv2d 3x3 pad 1, 8->16 ch, 32x32",
            shapes: &[&[2, 8, 32, 32], &[16, 8, 3, 3]],
            run: |x| x[0].conv2d(&x[1], 1, 1, 1, 1),
            slack: 1.0,
        },
        Check {
            name: "conv2d 3x3 stride 2, 8->8 ch",
            shapes: &[&[1, 8, 33, 33], &[8, 8, 3, 3]],
            run: |x| x[0].conv2d(&x[1], 0, 2, 1, 1),
            slack: 1.0,
        },
        Check {
            name: "group norm 32 groups, eps 1e-5 (f32 statistics)",
            shapes: &[&[2, 64, 16, 16]],
            run: |x| group_norm_f32(&x[0], 32, 1e-5),
            slack: 1.0,
        },
        Check {
            name: "layer norm (candle_nn fused)",
            shapes: &[&[4, 77, 320], &[320], &[320]],
            run: |x| candle_nn::ops::layer_norm(&x[0], &x[1], &x[2], 1e-5),
            slack: 1.0,
        },
        Check {
            name: "softmax last dim (candle_nn fused)",
            shapes: &[&[4, 64, 333]],
            run: |x| candle_nn::ops::softmax_last_dim(&x[0]),
            slack: 1.0,
        },
        Check {
            name: "silu / gelu(erf) / sigmoid",
            shapes: &[&[4096]],
            run: |x| {
                Tensor::cat(
                    &[
                        x[0].silu()?,
                        x[0].gelu_erf()?,
                        candle_nn::ops::sigmoid(&x[0])?,
                    ],
                    0,
                )
            },
            slack: 1.0,
        },
        Check {
            name: "upsample nearest 2x",
            shapes: &[&[1, 4, 9, 7]],
            run: |x| x[0].upsample_nearest2d(18, 14),
            slack: 1.0,
        },
        Check {
            name: "chunked attention (ops::attention, 3 chunks)",
            shapes: &[&[2, 5, 96, 40], &[2, 5, 70, 40], &[2, 5, 70, 40]],
            run: |x| ops::attention_chunked(&x[0], &x[1], &x[2], 40f64.powf(-0.5), 2 * 5 * 70 * 40),
            slack: 1.0,
        },
        Check {
            name: "sum / max / mean reductions",
            shapes: &[&[16, 1000]],
            run: |x| {
                Tensor::cat(
                    &[
                        x[0].sum_keepdim(D::Minus1)?,
                        x[0].max_keepdim(D::Minus1)?,
                        x[0].mean_keepdim(D::Minus1)?,
                    ],
                    1,
                )
            },
            slack: 4.0,
        },
        Check {
            name: "transpose + contiguous + cat + index_select",
            shapes: &[&[3, 17, 29]],
            run: |x| {
                let t = x[0].transpose(1, 2)?.contiguous()?;
                let idx = Tensor::new(&[2u32, 0, 16], x[0].device())?;
                Tensor::cat(&[t.index_select(&idx, 2)?, t.narrow(2, 1, 3)?], 2)
            },
            slack: 1.0,
        },
    ]
}

/// Group norm with the statistics in f32 whatever the input dtype, as
/// PyTorch's CUDA GroupNorm accumulates half inputs in float.
fn group_norm_f32(x: &Tensor, groups: usize, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let (b, c, h, w) = x.dims4()?;
    let g = x
        .to_dtype(DType::F32)?
        .reshape((b, groups, (c / groups) * h * w))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let centered = g.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.reshape((b, c, h, w))?.to_dtype(dtype)
}

/// Relative tolerance (max-abs diff / max |reference|) per dtype. f16 keeps
/// 11 significant bits (unit roundoff 4.9e-4) and bf16 8 bits (3.9e-3); the
/// bounds allow accumulated rounding of the longer reductions above.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 1e-2,
        DType::BF16 => 4e-2,
        _ => 1e-4,
    }
}

fn run_check(check: &Check, dev: &Device, dtype: DType, seed: u64) -> anyhow::Result<(f64, f64)> {
    let cpu = Device::Cpu;
    let mut cpu_in = Vec::new();
    let mut dev_in = Vec::new();
    for (j, shape) in check.shapes.iter().enumerate() {
        let n = shape.iter().product();
        let x = Tensor::from_vec(torch_randn(seed * 16 + j as u64, n), *shape, &cpu)?
            .to_dtype(dtype)?;
        dev_in.push(x.to_device(dev)?);
        cpu_in.push(x.to_dtype(DType::F32)?);
    }
    let want = (check.run)(&cpu_in)?;
    let got = (check.run)(&dev_in)?;
    if got.dtype() != dtype {
        bail!("output dtype {:?}, expected {dtype:?}", got.dtype());
    }
    let got = got.to_device(&cpu)?.to_dtype(DType::F32)?;
    let diff = ops::max_abs_diff(&got, &want)?;
    let scale = want
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .max(1.0) as f64;
    Ok((diff, diff / scale))
}

/// Draws N(0, 1) on the device itself (cuRAND on CUDA) and checks the moments.
fn check_randn(dev: &Device) -> anyhow::Result<(f64, f64)> {
    let x = Tensor::randn(0f32, 1., 1 << 20, dev)?;
    let mean = x.mean_all()?.to_scalar::<f32>()? as f64;
    let var = x.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - mean * mean;
    Ok((mean, var.sqrt()))
}

/// Times square f16/bf16 matmuls on the device (informational).
fn matmul_tflops(dev: &Device, dtype: DType, n: usize) -> anyhow::Result<f64> {
    let a = Tensor::randn(0f32, 1., (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1., (n, n), dev)?.to_dtype(dtype)?;
    a.matmul(&b)?;
    dev.synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    dev.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    Ok(2.0 * (n as f64).powi(3) * reps as f64 / secs / 1e12)
}

fn parse_args() -> anyhow::Result<(DeviceChoice, Vec<DType>)> {
    let mut device = DeviceChoice::Cuda(0);
    let mut dtypes = vec![DType::F32, DType::F16, DType::BF16];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => device = args.next().context("--device needs a value")?.parse()?,
            "--dtypes" => {
                dtypes = args
                    .next()
                    .context("--dtypes needs a value")?
                    .split(',')
                    .map(parse_dtype)
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!(
                    "usage: cuda_probe [--device cuda|cuda:N|auto|cpu] [--dtypes f32,f16,bf16]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok((device, dtypes))
}

fn main() -> ExitCode {
    let (choice, dtypes) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cuda_probe: {e:#}");
            return ExitCode::from(2);
        }
    };
    println!(
        "cuda_probe: build has CUDA support: {}",
        echomimic_pipeline::device::cuda_compiled()
    );
    let dev = match select_device(choice) {
        Ok((dev, note)) => {
            println!("cuda_probe: {note}");
            dev
        }
        Err(e) => {
            let chain: Vec<String> = anyhow::Error::from(e)
                .chain()
                .map(|c| c.to_string())
                .collect();
            println!("cuda_probe: FAIL cannot open device: {}", chain.join(": "));
            return ExitCode::from(2);
        }
    };
    let label = device_label(&dev);
    let mut failed = 0usize;
    let mut total = 0usize;
    for &dtype in &dtypes {
        for (i, check) in checks().iter().enumerate() {
            total += 1;
            let tol = tolerance(dtype) * check.slack;
            match run_check(check, &dev, dtype, 1000 + i as u64) {
                Ok((abs, rel)) if rel <= tol => {
                    println!("PASS {label} {dtype:?} {}: max abs diff {abs:.3e} (rel {rel:.2e} <= {tol:.0e})", check.name)
                }
                Ok((abs, rel)) => {
                    failed += 1;
                    println!("FAIL {label} {dtype:?} {}: max abs diff {abs:.3e} (rel {rel:.2e} > {tol:.0e})", check.name)
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {label} {dtype:?} {}: error: {e:#}", check.name)
                }
            }
        }
    }
    total += 1;
    match check_randn(&dev) {
        Ok((mean, std)) if mean.abs() < 0.01 && (std - 1.0).abs() < 0.01 => {
            println!("PASS {label} randn 2^20 on the device: mean {mean:.2e}, std {std:.4}")
        }
        Ok((mean, std)) => {
            failed += 1;
            println!("FAIL {label} randn 2^20 on the device: mean {mean:.2e}, std {std:.4}")
        }
        Err(e) => {
            failed += 1;
            println!("FAIL {label} randn on the device: error: {e:#}")
        }
    }
    if dev.is_cuda() {
        for dtype in [DType::F16, DType::BF16] {
            match matmul_tflops(&dev, dtype, 4096) {
                Ok(tf) => println!("INFO {label} {dtype:?} matmul 4096^3: {tf:.1} TFLOP/s"),
                Err(e) => {
                    failed += 1;
                    total += 1;
                    println!("FAIL {label} {dtype:?} matmul timing: error: {e:#}")
                }
            }
        }
    }
    println!(
        "cuda_probe: {} of {total} checks passed on {label}{}",
        total - failed,
        if failed == 0 { "" } else { " (FAILURES above)" }
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
