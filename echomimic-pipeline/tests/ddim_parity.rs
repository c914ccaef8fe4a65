//! DDIM parity against `tensors/ddim.safetensors` of the golden set.
//!
//! The reference side (diffusers 0.24.0, EchoMimic's scheduler kwargs from the
//! set's inference yaml):
//!
//! ```python
//! s = DDIMScheduler(**noise_scheduler_kwargs)
//! s.set_timesteps(n); timesteps_n = s.timesteps
//! alphas_cumprod = s.alphas_cumprod; final_alpha_cumprod = s.final_alpha_cumprod
//! for i, t in enumerate(s.timesteps):   # n = the pipeline's step count
//!     out = s.step(model_output, t, sample, eta=0)   # same inputs every step
//!     step{i}.prev_sample, step{i}.pred_original_sample = out
//! ```
//!
//! Device and dtype (`tests/common`): the β/ᾱ tables, the timestep lists and
//! the per-step scalars (√ᾱ_t, √(1−ᾱ_t), …) are host-side f32 in every run,
//! as diffusers keeps `alphas_cumprod` in float32; those checks do not depend
//! on the run. The step itself is element-wise tensor math in the dtype of
//! the sample, on its device, as in diffusers, where a 0-dim float32 ᾱ times
//! a float16 latent stays float16; so `step` runs on the test device in the
//! test dtype, with the inputs rounded to it first.

mod common;

use common::{assert_exact_i64, assert_parity, get, golden, input, test_dtype};
use echomimic_pipeline::config::InferenceConfig;
use echomimic_pipeline::schedulers::DDIMScheduler;

/// README tolerance of `ddim.step*.prev_sample`.
const STEP_ATOL: f64 = 7e-6;
/// Half precision: tolerance / max|golden|, 4× the 8.26e-4 measured on the
/// CPU in f16 (`docs/cuda.md`, parity tolerances).
const STEP_F16_REL: f64 = 3.4e-3;

fn scheduler() -> anyhow::Result<DDIMScheduler> {
    let prompt = common::prompt()?;
    let inference = match &prompt.inference_config {
        Some(p) => InferenceConfig::from_file(p)?,
        None => InferenceConfig::default(),
    };
    Ok(DDIMScheduler::new(&inference.noise_scheduler_kwargs)?)
}

#[test]
fn ddim_timestep_lists_match_diffusers() -> anyhow::Result<()> {
    let g = golden("ddim")?;
    let mut sched = scheduler()?;
    let mut names: Vec<&String> = g.keys().filter(|k| k.starts_with("timesteps_")).collect();
    names.sort();
    anyhow::ensure!(!names.is_empty(), "no timesteps_* tensor in the golden set");
    for name in names {
        let n: usize = name["timesteps_".len()..].parse()?;
        sched.set_timesteps(n)?;
        let got: Vec<i64> = sched.timesteps().iter().map(|&t| t as i64).collect();
        assert_exact_i64(name, &got, get(&g, name)?)?;
    }
    Ok(())
}

#[test]
fn ddim_alpha_table_matches_diffusers() -> anyhow::Result<()> {
    let g = golden("ddim")?;
    let sched = scheduler()?;
    let want = get(&g, "alphas_cumprod")?.to_vec1::<f32>()?;
    let got = sched.alphas_cumprod();
    anyhow::ensure!(got.len() == want.len(), "{} != {}", got.len(), want.len());
    let max_diff = common::max_diff(
        "alphas_cumprod",
        &candle_core::Tensor::new(got, &candle_core::Device::Cpu)?,
        get(&g, "alphas_cumprod")?,
    )?;
    let (mut max_ulps, mut differ) = (0i64, 0usize);
    for (a, b) in got.iter().zip(&want) {
        let ulps = (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs();
        max_ulps = max_ulps.max(ulps);
        differ += usize::from(ulps != 0);
    }
    eprintln!(
        "alphas_cumprod: max |ours - golden| = {max_diff:.3e}, max {max_ulps} ulp, {differ}/{} entries not bit-equal",
        want.len()
    );
    // The zero-SNR end point and the start are exact; the rest tracks torch's
    // f32 rounding to a few ulp (see the module docs of `schedulers::ddim`).
    anyhow::ensure!(
        got[0] == want[0],
        "alphas_cumprod[0]: {} != {}",
        got[0],
        want[0]
    );
    anyhow::ensure!(
        got[got.len() - 1] == want[want.len() - 1],
        "last alphas_cumprod: {} != {}",
        got[got.len() - 1],
        want[want.len() - 1]
    );
    anyhow::ensure!(max_diff <= 1e-6, "alphas_cumprod max diff {max_diff:.3e}");
    let final_alpha = get(&g, "final_alpha_cumprod")?.to_scalar::<f32>()?;
    anyhow::ensure!(
        sched.final_alpha_cumprod() == final_alpha,
        "final_alpha_cumprod {} != {final_alpha}",
        sched.final_alpha_cumprod()
    );
    Ok(())
}

#[test]
fn ddim_steps_match_diffusers() -> anyhow::Result<()> {
    let g = golden("ddim")?;
    let mut sched = scheduler()?;
    let model_output = &input(get(&g, "step.model_output")?)?;
    let sample = &input(get(&g, "step.sample")?)?;
    let mut n = 0;
    while g.contains_key(&format!("step{n}.timestep")) {
        n += 1;
    }
    anyhow::ensure!(n > 0, "no step*.timestep tensor in the golden set");
    sched.set_timesteps(n)?;
    anyhow::ensure!(sched.timesteps().len() == n);
    for (i, &t) in sched.timesteps().to_vec().iter().enumerate() {
        assert_exact_i64(
            &format!("step{i}.timestep"),
            &[t as i64],
            get(&g, &format!("step{i}.timestep"))?,
        )?;
        assert_exact_i64(
            &format!("step{i}.prev_timestep"),
            &[sched.prev_timestep(t)?],
            get(&g, &format!("step{i}.prev_timestep"))?,
        )?;
        let out = sched.step(model_output, t, sample)?;
        assert_eq!(out.prev_sample.dtype(), test_dtype()?);
        assert_eq!(
            out.prev_sample.device().location(),
            sample.device().location()
        );
        assert_parity(
            &format!("ddim.step{i}.prev_sample"),
            &out.prev_sample,
            get(&g, &format!("step{i}.prev_sample"))?,
            STEP_ATOL,
            STEP_F16_REL,
        )?;
        assert_parity(
            &format!("ddim.step{i}.pred_original_sample"),
            &out.pred_original_sample,
            get(&g, &format!("step{i}.pred_original_sample"))?,
            STEP_ATOL,
            STEP_F16_REL,
        )?;
    }
    Ok(())
}
