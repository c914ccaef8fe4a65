//! Benchmarks for the echomimic crates (see `benches/benches/*.rs`), and the
//! helpers they share: analytic FLOP counts, timing, peak memory, and the
//! device/dtype selection from the environment.

pub mod flops;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use echomimic_pipeline::device::{parse_dtype, select_device, DeviceChoice};

/// The worker binary's allocator, for every benchmark: figures are the pipeline as the worker
/// runs it. Benchmarks that compare against another implementation also call
/// [`echomimic_worker::runtime::configure`] first, as the worker's `main` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
/// `cuda:N`), opened through the pipeline's device selection: CUDA needs a
/// build with `echomimic-pipeline/cuda` (this crate's `cuda` feature turns it
/// on), and an explicit CUDA device that does not open is an error.
pub fn device_from_env() -> anyhow::Result<Device> {
    let name = std::env::var("ECHOMIMIC_DEVICE").unwrap_or_else(|_| "cpu".into());
    let choice: DeviceChoice = name
        .parse()
        .with_context(|| format!("ECHOMIMIC_DEVICE=`{name}`"))?;
    if choice == DeviceChoice::Auto {
        bail!("ECHOMIMIC_DEVICE must name a device for a benchmark: cpu, cuda or cuda:N");
    }
    Ok(select_device(choice)?.0)
}

/// The dtype named by `ECHOMIMIC_DTYPE` (`f32` (default), `f16`, `bf16`).
pub fn dtype_from_env() -> anyhow::Result<DType> {
    let name = std::env::var("ECHOMIMIC_DTYPE").unwrap_or_else(|_| "f32".into());
    parse_dtype(&name).with_context(|| format!("ECHOMIMIC_DTYPE=`{name}`"))
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

/// Random weights for a network in its real shapes, made on the target
/// device: `Init::Const` hints (norm scales and shifts) keep their value,
/// every other tensor is `N(0, 1/fan_in)` (fan-in = all dims but the first;
/// 0.02 for vectors), drawn in f32 and cast to the requested dtype (CUDA
/// draws no f16 directly). The scale keeps activations of a deep random UNet
/// finite in f16.
#[derive(Debug, Default, Clone, Copy)]
pub struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        _name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let dims = s.dims();
        let t = match h {
            candle_nn::Init::Const(c) => candle_core::Tensor::full(c as f32, s, dev)?,
            _ => {
                let fan_in: usize = dims.iter().skip(1).product();
                let std = if dims.len() >= 2 {
                    1.0 / (fan_in.max(1) as f32).sqrt()
                } else {
                    0.02
                };
                candle_core::Tensor::randn(0f32, std, s, dev)?
            }
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        candle_core::bail!("RandomWeights cannot make `{name}` without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A [`candle_nn::VarBuilder`] of [`RandomWeights`].
pub fn random_weights(dtype: DType, device: &Device) -> candle_nn::VarBuilder<'static> {
    candle_nn::VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())
}

/// Resets the peak resident set size of this process (`VmHWM`) to the current
/// one, so the next [`proc_status_bytes`]`("VmHWM")` is the peak of what runs
/// in between. Returns false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Polls `nvidia-smi` in a background thread and keeps the largest "memory
/// used" it saw (the whole GPU: note the baseline before the call).
#[derive(Debug)]
pub struct GpuMemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Option<u64>>,
}

impl GpuMemorySampler {
    /// Starts sampling GPU `ordinal` every `period`.
    pub fn start(ordinal: usize, period: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = None;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(used) = nvidia_smi_used_bytes(ordinal) {
                    peak = Some(peak.map_or(used, |p: u64| p.max(used)));
                }
                std::thread::sleep(period);
            }
            peak
        });
        Self { stop, handle }
    }

    /// Stops sampling; the peak in bytes, `None` if `nvidia-smi` never answered.
    pub fn stop(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().ok().flatten()
    }
}
