//! Shared helpers for the golden parity tests.
//!
//! The golden vectors live in `testdata/golden/public` at the workspace root
//! (a committed copy of the reference PyTorch outputs). Set
//! `ECHOMIMIC_GOLDEN_DIR` to check another set with the same layout (for
//! example a set with other sizes).
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// Root of the golden set under test.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public"),
    }
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

/// Max-abs difference check; prints the measured figure so test logs record it.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64) -> anyhow::Result<f64> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "{what}: shape {:?} != golden {:?}",
        got.dims(),
        want.dims()
    );
    let g = got.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let w = want.to_dtype(DType::F64)?;
    let diff = (g - w)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    eprintln!("{what}: max |ours - golden| = {diff:.3e} (atol {atol:.1e})");
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
