//! Shared helpers for the golden parity tests.
//!
//! The golden vectors live in `testdata/golden/public` at the workspace root
//! (a committed copy of the reference PyTorch outputs). Set
//! `ECHOMIMIC_GOLDEN_DIR` to check another set with the same layout (for
//! example a set with other sizes).
//!
//! Device and dtype of a run (both optional; `scripts/gpu-check.sh` sets them):
//!
//! * `ECHOMIMIC_DEVICE`: `cpu` (default), `cuda`, `cuda:N` or `auto`, parsed by
//!   [`echomimic_pipeline::device::DeviceChoice`]. An explicit CUDA device that
//!   cannot be opened fails the test; it never falls back to the CPU.
//! * `ECHOMIMIC_DTYPE`: `f32` (default), `f16` or `bf16`
//!   ([`echomimic_pipeline::device::parse_dtype`]): the dtype the networks are
//!   loaded in.
//!
//! With the defaults every test runs exactly as it always did: on the CPU in
//! f32 against the golden README's absolute tolerances. In half precision the
//! tolerances of [`atol`] apply; `docs/cuda.md` ("Parity tolerances in half
//! precision") lists them with the measurements behind them.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use echomimic_pipeline::device::{self, DeviceChoice};

/// Root of the golden set under test.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public"),
    }
}

/// The prompt yaml of the set: the first `configs/prompts/*.yaml` by name
/// (`animation_tiny.yaml` in the public set).
pub fn prompt_yaml() -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let dir = golden_dir().join("configs/prompts");
    let mut yamls: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| dir.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    yamls.sort();
    yamls
        .into_iter()
        .next()
        .with_context(|| format!("no prompt yaml in {}", dir.display()))
}

/// The set's prompt yaml, parsed as `infer_audio2vid.py` reads it.
pub fn prompt() -> anyhow::Result<echomimic_pipeline::config::PromptConfig> {
    Ok(echomimic_pipeline::config::PromptConfig::from_file(
        &prompt_yaml()?,
    )?)
}

/// Loads `tensors/<name>.safetensors` of the golden set.
pub fn golden(name: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = golden_dir()
        .join("tensors")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Fetches one tensor from a loaded golden file, with a clear error.
pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> anyhow::Result<&'a Tensor> {
    map.get(key)
        .ok_or_else(|| anyhow::anyhow!("golden tensor `{key}` not found"))
}

// ------------------------------------------------------------------------------------------
// Device and dtype of the run
// ------------------------------------------------------------------------------------------

/// The device named by `ECHOMIMIC_DEVICE` (default `cpu`).
///
/// Opened once per test binary and shared: candle tensors on two separately
/// opened CUDA devices cannot be combined, even with the same ordinal.
pub fn test_device() -> anyhow::Result<Device> {
    static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let choice = match std::env::var("ECHOMIMIC_DEVICE") {
                Ok(s) if !s.trim().is_empty() => {
                    s.parse::<DeviceChoice>().map_err(|e| e.to_string())?
                }
                Ok(_) | Err(std::env::VarError::NotPresent) => DeviceChoice::Cpu,
                Err(e) => return Err(format!("ECHOMIMIC_DEVICE: {e}")),
            };
            let (device, note) = device::select_device(choice)
                .map_err(|e| format!("ECHOMIMIC_DEVICE={choice}: {e}"))?;
            let dtype = match dtype_from_env() {
                Ok(d) => dtype_name(d).to_owned(),
                Err(e) => e,
            };
            eprintln!("parity tests: {note}, dtype {dtype}");
            Ok(device)
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn dtype_from_env() -> Result<DType, String> {
    match std::env::var("ECHOMIMIC_DTYPE") {
        Ok(s) if !s.trim().is_empty() => {
            device::parse_dtype(&s).map_err(|e| format!("ECHOMIMIC_DTYPE: {e}"))
        }
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(DType::F32),
        Err(e) => Err(format!("ECHOMIMIC_DTYPE: {e}")),
    }
}

/// The working dtype named by `ECHOMIMIC_DTYPE` (default f32).
pub fn test_dtype() -> anyhow::Result<DType> {
    dtype_from_env().map_err(anyhow::Error::msg)
}

/// `t` on the test device in the test dtype: a golden input as the networks
/// under test take it.
pub fn input(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_device(&test_device()?)?.to_dtype(test_dtype()?)?)
}

/// `t` on the test device, dtype unchanged.
pub fn on_device(t: &Tensor) -> anyhow::Result<Tensor> {
    Ok(t.to_device(&test_device()?)?)
}

/// Short label of the run for messages: `cpu/f32`, `cuda:0/f16`.
pub fn run_label() -> anyhow::Result<String> {
    Ok(format!(
        "{}/{}",
        device::device_label(&test_device()?),
        dtype_name(test_dtype()?)
    ))
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// Whether 2-D convolutions run in `dtype` on `dev`.
///
/// candle 0.11's CPU backend has no bf16 `conv2d` (its tiled kernel calls an
/// inner matmul without bf16: "unsupported dtype BF16 for op matmul"), while
/// bf16 matmul, conv1d and the element-wise ops work. Probed with a 1×1
/// convolution rather than assumed, so a candle that adds the kernel runs
/// the tests. On a GPU the answer is always yes: a failing CUDA kernel must
/// fail the test, not skip it.
pub fn conv2d_supported(dev: &Device, dtype: DType) -> bool {
    if !dev.is_cpu() {
        return true;
    }
    let probe = || -> candle_core::Result<Tensor> {
        let x = Tensor::ones((1, 1, 2, 2), dtype, dev)?;
        let k = Tensor::ones((1, 1, 1, 1), dtype, dev)?;
        x.conv2d(&k, 0, 1, 1, 1)
    };
    probe().is_ok()
}

/// Prints a SKIP line and returns true when `what` (a network with 2-D
/// convolutions) cannot run in the test dtype on the test device, which
/// happens only for bf16 on the CPU ([`conv2d_supported`]). Call it first
/// and return `Ok(())` when it says so.
pub fn skip_without_conv2d(what: &str) -> anyhow::Result<bool> {
    let (dev, dtype) = (test_device()?, test_dtype()?);
    if conv2d_supported(&dev, dtype) {
        return Ok(false);
    }
    eprintln!(
        "SKIP {what} on {}: candle's CPU backend has no {} conv2d (this test runs on CUDA)",
        run_label()?,
        dtype_name(dtype)
    );
    Ok(true)
}

// ------------------------------------------------------------------------------------------
// Tolerances
// ------------------------------------------------------------------------------------------

/// bf16 keeps 8 significant bits, fp16 11: its unit roundoff (2^-8) is 8×
/// fp16's (2^-11), and so is every rounding-error bound built from it.
pub const BF16_OVER_F16: f64 = 8.0;

/// Largest |value| of a tensor (0 for an empty one).
pub fn max_abs(t: &Tensor) -> anyhow::Result<f64> {
    if t.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// The absolute tolerance of a golden tensor `want` for a run in `dtype`:
///
/// * f32: `f32_atol`, the golden README's value (unchanged on every device);
/// * f16: `f16_rel × max|want|`, never below `f32_atol`. `f16_rel` is chosen
///   per tensor from the error measured on the CPU in f16 (about 4× headroom,
///   see `docs/cuda.md`); being relative to the tensor's magnitude it carries
///   over to golden sets with other weights and sizes;
/// * bf16: the f16 bound × [`BF16_OVER_F16`].
pub fn atol_for(dtype: DType, want: &Tensor, f32_atol: f64, f16_rel: f64) -> anyhow::Result<f64> {
    let half = |factor: f64| -> anyhow::Result<f64> {
        Ok((factor * f16_rel * max_abs(want)?).max(f32_atol))
    };
    match dtype {
        DType::F32 => Ok(f32_atol),
        DType::F16 => half(1.0),
        DType::BF16 => half(BF16_OVER_F16),
        other => anyhow::bail!("no parity tolerance for dtype {other:?}"),
    }
}

/// [`atol_for`] the test dtype.
pub fn atol(want: &Tensor, f32_atol: f64, f16_rel: f64) -> anyhow::Result<f64> {
    atol_for(test_dtype()?, want, f32_atol, f16_rel)
}

/// Max |got - want| over all elements, computed in f64 on the CPU, after
/// checking the shapes agree.
pub fn max_diff(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<f64> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "{what}: shape {:?} != golden {:?}",
        got.dims(),
        want.dims()
    );
    if want.elem_count() == 0 {
        return Ok(0.0);
    }
    Ok(echomimic_pipeline::ops::max_abs_diff(
        &got.to_device(&Device::Cpu)?,
        &want.to_device(&Device::Cpu)?,
    )?)
}

/// Max-abs difference check; prints the measured figure so test logs record it.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64) -> anyhow::Result<f64> {
    let diff = max_diff(what, got, want)?;
    eprintln!("{what}: max |ours - golden| = {diff:.3e} (atol {atol:.1e})");
    anyhow::ensure!(
        diff <= atol,
        "{what}: max abs diff {diff:.3e} > atol {atol:.1e}"
    );
    Ok(diff)
}

/// [`assert_close`] with the tolerance of the run's dtype ([`atol`]).
pub fn assert_parity(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    f32_atol: f64,
    f16_rel: f64,
) -> anyhow::Result<f64> {
    assert_parity_in(test_dtype()?, what, got, want, f32_atol, f16_rel)
}

/// [`assert_parity`] for a run in `dtype` (for tests that pick the dtype
/// themselves). In f32 it is [`assert_close`] with `f32_atol`, message
/// included; in half precision the line also gives max|golden| and the
/// ratio of the two, the figures of the tolerance table in `docs/cuda.md`.
pub fn assert_parity_in(
    dtype: DType,
    what: &str,
    got: &Tensor,
    want: &Tensor,
    f32_atol: f64,
    f16_rel: f64,
) -> anyhow::Result<f64> {
    let atol = atol_for(dtype, want, f32_atol, f16_rel)?;
    if dtype == DType::F32 {
        return assert_close(what, got, want, atol);
    }
    let what = format!("{what} [{}]", dtype_name(dtype));
    let diff = max_diff(&what, got, want)?;
    let m = max_abs(want)?;
    eprintln!(
        "{what}: max |ours - golden| = {diff:.3e} (atol {atol:.1e}); max|golden| = {m:.3e}, ratio {:.2e}",
        diff / m.max(f64::MIN_POSITIVE)
    );
    anyhow::ensure!(
        diff <= atol,
        "{what}: max abs diff {diff:.3e} > atol {atol:.1e}"
    );
    Ok(diff)
}

/// Exact equality for integer tensors (timesteps, indices, rects).
pub fn assert_exact_i64(what: &str, got: &[i64], want: &Tensor) -> anyhow::Result<()> {
    let w = want.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    anyhow::ensure!(got == w.as_slice(), "{what}: {got:?} != golden {w:?}");
    Ok(())
}
