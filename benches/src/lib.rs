//! Benchmarks for the echomimic crates (see `benches/benches/*.rs`), and the
//! helpers they share: analytic FLOP counts, timing, peak memory, and the
//! device/dtype selection from the environment.

pub mod flops;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// One warm-up call, then the median wall time of `iterations` calls (the
/// device is synchronised after every call). Returns the median and all times.
pub fn median_time<T>(
    device: &Device,
    iterations: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    std::hint::black_box(f()?);
    device.synchronize()?;
    let mut times = Vec::with_capacity(iterations);
    for _ in 0..iterations.max(1) {
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        times.push(start.elapsed());
        drop(std::hint::black_box(out));
    }
    let mut sorted = times.clone();
    sorted.sort();
    Ok((sorted[sorted.len() / 2], times))
}

/// Times one call (no warm-up), synchronising the device.
pub fn time_once<T>(
    device: &Device,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(Duration, T)> {
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    Ok((start.elapsed(), out))
}

/// A field of `/proc/self/status` in bytes (`VmHWM` = peak resident set,
/// `VmRSS` = current). `None` where procfs is unavailable.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// The device named by `ECHOMIMIC_DEVICE` (`cpu` (default), `cuda` or
/// `cuda:N`). CUDA needs the `cuda` feature of this crate.
pub fn device_from_env() -> anyhow::Result<Device> {
    let name = std::env::var("ECHOMIMIC_DEVICE").unwrap_or_else(|_| "cpu".into());
    match name.as_str() {
        "cpu" => Ok(Device::Cpu),
        cuda if cuda == "cuda" || cuda.starts_with("cuda:") => {
            let ordinal: usize = match cuda.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .with_context(|| format!("bad CUDA ordinal in `{cuda}`"))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => bail!("ECHOMIMIC_DEVICE must be cpu, cuda or cuda:N, got `{other}`"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> anyhow::Result<Device> {
    Device::new_cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> anyhow::Result<Device> {
    bail!("this benchmark was built without CUDA: rebuild with `--features cuda`")
}

/// The dtype named by `ECHOMIMIC_DTYPE` (`f32` (default), `f16`, `bf16`).
pub fn dtype_from_env() -> anyhow::Result<DType> {
    match std::env::var("ECHOMIMIC_DTYPE").as_deref().unwrap_or("f32") {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("ECHOMIMIC_DTYPE must be f32, f16 or bf16, got `{other}`"),
    }
}

/// Used GPU memory in bytes as `nvidia-smi` reports it for `ordinal` (the
/// whole device, all processes; candle's CUDA backend has no allocator
/// statistics). `None` without a GPU or without `nvidia-smi`.
pub fn nvidia_smi_used_bytes(ordinal: usize) -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used",
            "--format=csv,noheader,nounits",
            &format!("--id={ordinal}"),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}

/// Bytes as GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The 1-min load average (from `/proc/loadavg`), to print next to timings
/// taken on a shared machine.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
