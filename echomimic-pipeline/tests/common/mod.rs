//! Shared helpers for the golden parity tests.
//!
//! The golden vectors live in `testdata/golden/` at the workspace root
//! (committed copies of the reference PyTorch outputs): `public` (tiny, square)
//! and `midsize` (mid-size, non-square shapes that cross kernel tile sizes;
//! component vectors and one seeded video, see its README). A test wrapped in [`for_each_set`]
//! runs against both; the others use `public`. Set `ECHOMIMIC_GOLDEN_DIR` to
//! check one other set with the same layout instead.
//!
//! Every float comparison goes through [`TensorDiff`], which fails on a NaN or
//! infinity in either tensor and reports the worst element. The shape sweep
//! for kernel property tests is [`sweep`].
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

/// The committed golden sets, under `testdata/golden/`.
pub const COMMITTED_SETS: [&str; 2] = ["public", "midsize"];

thread_local! {
    /// The set a [`for_each_set`] closure is running against.
    static CURRENT_SET: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

fn committed_set(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/golden")
        .join(name)
}

/// Root of the golden set under test: the set of the enclosing
/// [`for_each_set`] call, else `ECHOMIMIC_GOLDEN_DIR`, else `public`.
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = CURRENT_SET.with(|c| c.borrow().clone()) {
        return dir;
    }
    match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => committed_set("public"),
    }
}

/// Runs `check` once per golden set: the set named by `ECHOMIMIC_GOLDEN_DIR`
/// alone when it is set, else every committed set ([`COMMITTED_SETS`]).
/// Inside `check`, [`golden_dir`] (and everything built on it) is that set.
/// A failure names the set.
pub fn for_each_set(mut check: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let sets: Vec<PathBuf> = match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => vec![PathBuf::from(p)],
        None => COMMITTED_SETS.iter().map(|n| committed_set(n)).collect(),
    };
    for dir in sets {
        eprintln!("--- golden set {}", dir.display());
        CURRENT_SET.with(|c| *c.borrow_mut() = Some(dir.clone()));
        let result = check();
        CURRENT_SET.with(|c| *c.borrow_mut() = None);
        result.map_err(|e| e.context(format!("golden set {}", dir.display())))?;
    }
    Ok(())
}

/// The set's `manifest.json`.
pub fn manifest() -> anyhow::Result<serde_json::Value> {
    let path = golden_dir().join("manifest.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The f32 absolute tolerance of the golden quantity `key` in the current
/// set. A set whose manifest has an `atol` table (`midsize`: derived by its
/// generator from the reference's own float64 rerun, with the public README's
/// rule) must list `key` there; the public set publishes its tolerances in
/// its README, and `readme_atol` is that value.
pub fn set_atol(key: &str, readme_atol: f64) -> anyhow::Result<f64> {
    let m = manifest()?;
    match m.get("atol") {
        None => Ok(readme_atol),
        Some(table) => table[key].as_f64().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: manifest `atol` has no entry for `{key}`",
                golden_dir().display()
            )
        }),
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

/// Floor of the relative error, as a fraction of max|want|: elements far
/// below the tensor's scale are judged against this instead of their own
/// (near-zero) magnitude, so the relative figure stays meaningful.
pub const REL_FLOOR: f64 = 1e-3;

/// How two float tensors of one shape differ, computed in f64 on the CPU.
///
/// [`TensorDiff::between`] fails on a shape mismatch and on any NaN or
/// infinity in either tensor (with its index): unlike a reduction with
/// candle's `max`, which skips NaNs, nothing non-finite can pass.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorDiff {
    /// Max |got - want|.
    pub max_abs: f64,
    /// Max |got - want| / max(|want|, [`REL_FLOOR`] × max|want|).
    pub max_rel: f64,
    /// Index (per dimension) of the element with the largest absolute difference.
    pub worst_abs_at: Vec<usize>,
    /// Index of the element with the largest relative difference.
    pub worst_rel_at: Vec<usize>,
    /// `(got, want)` at [`Self::worst_abs_at`].
    pub worst_abs_values: (f64, f64),
    /// Max |want|.
    pub max_want: f64,
}

fn unravel(mut flat: usize, dims: &[usize]) -> Vec<usize> {
    let mut index = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate().rev() {
        if d > 0 {
            index[i] = flat % d;
            flat /= d;
        }
    }
    index
}

impl TensorDiff {
    /// Compares `got` with `want` (any float dtypes, any devices).
    pub fn between(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<Self> {
        anyhow::ensure!(
            got.dims() == want.dims(),
            "{what}: shape {:?} != golden {:?}",
            got.dims(),
            want.dims()
        );
        let values = |t: &Tensor| -> anyhow::Result<Vec<f64>> {
            Ok(t.to_device(&Device::Cpu)?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?)
        };
        let (g, w) = (values(got)?, values(want)?);
        let dims = got.dims();
        for (name, v) in [("ours", &g), ("golden", &w)] {
            let bad: Vec<usize> = (0..v.len()).filter(|&i| !v[i].is_finite()).collect();
            if let Some(&first) = bad.first() {
                anyhow::bail!(
                    "{what}: {} non-finite value(s) in {name}, first {} at {:?}",
                    bad.len(),
                    v[first],
                    unravel(first, dims)
                );
            }
        }
        let max_want = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        let floor = (REL_FLOOR * max_want).max(f64::MIN_POSITIVE);
        let (mut abs_i, mut max_abs, mut rel_i, mut max_rel) = (0, 0f64, 0, 0f64);
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            let d = (a - b).abs();
            if d > max_abs {
                (abs_i, max_abs) = (i, d);
            }
            let r = d / b.abs().max(floor);
            if r > max_rel {
                (rel_i, max_rel) = (i, r);
            }
        }
        let pick = |i: usize| if g.is_empty() { 0.0 } else { g[i] };
        let pick_w = |i: usize| if w.is_empty() { 0.0 } else { w[i] };
        Ok(Self {
            max_abs,
            max_rel,
            worst_abs_at: unravel(abs_i, dims),
            worst_rel_at: unravel(rel_i, dims),
            worst_abs_values: (pick(abs_i), pick_w(abs_i)),
            max_want,
        })
    }
}

impl std::fmt::Display for TensorDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max |ours - golden| = {:.3e} at {:?} ({:.6e} vs {:.6e}), max rel {:.3e} at {:?}, max|golden| {:.3e}",
            self.max_abs,
            self.worst_abs_at,
            self.worst_abs_values.0,
            self.worst_abs_values.1,
            self.max_rel,
            self.worst_rel_at,
            self.max_want
        )
    }
}

/// Max |got - want| over all elements ([`TensorDiff`]: fails on shape
/// mismatch and on any non-finite value).
pub fn max_diff(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<f64> {
    Ok(TensorDiff::between(what, got, want)?.max_abs)
}

/// FNV-1a, 64-bit, as hex: the fingerprint the vector scripts (`scripts/make-photo-vectors.py`,
/// `scripts/make-real-input-vectors.py`) write for byte arrays too large to commit.
pub fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Max-abs difference check; prints the measured figures so test logs record them.
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64) -> anyhow::Result<f64> {
    let d = TensorDiff::between(what, got, want)?;
    eprintln!("{what}: {d} (atol {atol:.1e})");
    anyhow::ensure!(
        d.max_abs <= atol,
        "{what}: max abs diff {:.3e} > atol {atol:.1e} ({d})",
        d.max_abs
    );
    Ok(d.max_abs)
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
    let d = TensorDiff::between(&what, got, want)?;
    let (diff, m) = (d.max_abs, d.max_want);
    eprintln!(
        "{what}: {d} (atol {atol:.1e}); ratio to max|golden| {:.2e}",
        diff / m.max(f64::MIN_POSITIVE)
    );
    anyhow::ensure!(
        diff <= atol,
        "{what}: max abs diff {diff:.3e} > atol {atol:.1e} ({d})"
    );
    Ok(diff)
}

/// Exact equality for integer tensors (timesteps, indices, rects).
pub fn assert_exact_i64(what: &str, got: &[i64], want: &Tensor) -> anyhow::Result<()> {
    let w = want.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    anyhow::ensure!(got == w.as_slice(), "{what}: {got:?} != golden {w:?}");
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Kernel property tests: an op against a reference composition over a sweep of shapes
// ------------------------------------------------------------------------------------------

/// Sizes a tiled or blocked kernel tends to get wrong, for one dimension with
/// tile (block, vector) width `tile`: 1, small primes, `tile - 1`, `tile`,
/// `tile + 1` and `2·tile + 3` (a full tile, a partial one and an odd tail).
/// Sorted, without duplicates or zeros.
pub fn sweep_sizes(tile: usize) -> Vec<usize> {
    let mut v = vec![
        1,
        2,
        3,
        7,
        13,
        tile.saturating_sub(1),
        tile,
        tile + 1,
        2 * tile + 3,
    ];
    v.retain(|&n| n > 0);
    v.sort_unstable();
    v.dedup();
    v
}

/// Deterministic inputs for a sweep: values in [-1, 1) from a fixed linear
/// congruential sequence seeded by `seed`, in `dtype` on `device` (the same
/// on every machine, unlike `Tensor::randn`).
pub fn sweep_input(
    shape: &[usize],
    seed: u64,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
}

/// Checks an op against a reference over every `shape` × `dtype`.
///
/// `case(shape, dtype)` builds the inputs (e.g. with [`sweep_input`]) and
/// returns `(ours, reference)`: the op under test in `dtype` and the plain
/// candle composition it replaces (computed in f32 or f64 for a trustworthy
/// reference). Each result is compared with [`TensorDiff`] (NaN/infinity
/// fail) against `rel_tol(dtype) × max|reference|` (at least 1e-30), and a
/// failure names the shape and dtype. Returns the worst relative-to-max
/// error per dtype, for the test log.
///
/// ```ignore
/// let shapes: Vec<Vec<usize>> = common::sweep_sizes(16)
///     .into_iter()
///     .map(|c| vec![2, c, 5, 7])
///     .collect();
/// common::kernel_sweep("group_norm", &shapes, &[DType::F32, DType::F16],
///     |dt| if dt == DType::F32 { 1e-5 } else { 4e-3 },
///     |shape, dtype| {
///         let x = common::sweep_input(shape, 1, dtype, &Device::Cpu)?;
///         Ok((my_kernel(&x)?, plain_candle(&x.to_dtype(DType::F32)?)?))
///     })?;
/// ```
pub fn kernel_sweep(
    what: &str,
    shapes: &[Vec<usize>],
    dtypes: &[DType],
    rel_tol: impl Fn(DType) -> f64,
    mut case: impl FnMut(&[usize], DType) -> anyhow::Result<(Tensor, Tensor)>,
) -> anyhow::Result<Vec<(DType, f64)>> {
    anyhow::ensure!(
        !shapes.is_empty() && !dtypes.is_empty(),
        "{what}: empty sweep"
    );
    let mut worst = Vec::new();
    for &dtype in dtypes {
        let mut worst_ratio = 0f64;
        for shape in shapes {
            let label = format!("{what} {shape:?} {}", dtype_name(dtype));
            let (got, want) = case(shape, dtype).map_err(|e| e.context(label.clone()))?;
            let d = TensorDiff::between(&label, &got, &want)?;
            let atol = (rel_tol(dtype) * d.max_want).max(1e-30);
            anyhow::ensure!(d.max_abs <= atol, "{label}: {d} > atol {atol:.1e}");
            worst_ratio = worst_ratio.max(d.max_abs / d.max_want.max(f64::MIN_POSITIVE));
        }
        eprintln!(
            "{what} [{}]: {} shapes, worst |diff| / max|ref| = {worst_ratio:.2e}",
            dtype_name(dtype),
            shapes.len()
        );
        worst.push((dtype, worst_ratio));
    }
    Ok(worst)
}
