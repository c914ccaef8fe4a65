//! DDIM sampler ([Song et al. 2020](https://arxiv.org/abs/2010.02502)) with the
//! semantics of diffusers 0.24.0 `DDIMScheduler` (`schedulers/scheduling_ddim.py`),
//! the version EchoMimic pins.
//!
//! EchoMimic builds it from `noise_scheduler_kwargs` of `inference_v2.yaml`:
//! linear betas 0.00085 → 0.012, zero-terminal-SNR rescale, v-prediction,
//! "trailing" timesteps, η = 0. Every branch of the diffusers constructor that a
//! config can reach is implemented (linear / scaled_linear / squaredcos_cap_v2,
//! leading / trailing / linspace, epsilon / v / sample prediction, `clip_sample`);
//! dynamic thresholding and η > 0 are not (EchoMimic uses neither).
//!
//! The β/ᾱ table is computed in f32 following PyTorch's CPU kernels (two-sided
//! `linspace`, element-wise f32 arithmetic, `cumprod` accumulated in f64 and
//! rounded per element). Against the golden diffusers table it agrees to
//! 3.6e-7 absolute (ᾱ₀ and the zero-SNR ᾱ_{T−1} = 0 exactly) but is not
//! bit-identical everywhere: the source of the remaining last-bit differences
//! was not found. Two diffusers quirks are kept on purpose:
//!
//! * `step()` uses `prev = t − T // steps`, which is *not* always the next entry
//!   of the timestep list (30 trailing steps: 966 → 933 while the list has 932);
//! * with `set_alpha_to_one`, ᾱ_prev = 1 only when `prev < 0`; otherwise it is
//!   read from the table (6 trailing steps end on `ᾱ[0]`, not 1).
//!
//! One quirk is *not* kept: for some step counts (61, 103, 121, …) NumPy's
//! float `arange` behind "trailing" spacing yields one element too many, which
//! becomes timestep −1 (diffusers would then index ᾱ[−1] = ᾱ[T−1] and run a
//! meaningless extra step). Negative timesteps are dropped here.

use candle_core::{DType, Tensor};

use crate::config::{BetaSchedule, DdimSchedulerConfig, PredictionType, TimestepSpacing};
use crate::error::{PipelineError, Result};

/// Output of [`DDIMScheduler::step`].
#[derive(Debug, Clone)]
pub struct DDIMSchedulerOutput {
    /// x_{t−1}: the sample to feed to the next step.
    pub prev_sample: Tensor,
    /// The predicted clean sample x̂₀ (after the optional clip).
    pub pred_original_sample: Tensor,
}

/// Deterministic (η = 0) DDIM scheduler.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    config: DdimSchedulerConfig,
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    num_inference_steps: Option<usize>,
    timesteps: Vec<usize>,
}

impl DDIMScheduler {
    /// Builds the β/ᾱ tables of `config`.
    ///
    /// Fails on configurations diffusers would reject or that are not
    /// implemented (dynamic thresholding), and on tables that are not finite.
    pub fn new(config: &DdimSchedulerConfig) -> Result<Self> {
        let t = config.num_train_timesteps;
        if t == 0 {
            return Err(invalid("num_train_timesteps must be at least 1"));
        }
        if config.thresholding {
            return Err(invalid(
                "DDIM dynamic thresholding (thresholding: true) is not supported",
            ));
        }
        if config.rescale_betas_zero_snr && t < 2 {
            return Err(invalid(
                "rescale_betas_zero_snr needs num_train_timesteps >= 2",
            ));
        }
        if config.clip_sample
            && (config.clip_sample_range.is_nan() || config.clip_sample_range <= 0.0)
        {
            return Err(invalid(format!(
                "clip_sample_range must be positive, got {}",
                config.clip_sample_range
            )));
        }
        // 1. betas (diffusers `__init__`).
        let mut betas = match config.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(config.beta_start, config.beta_end, t),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), t)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(t),
        };
        if betas.iter().any(|b| !b.is_finite()) {
            return Err(invalid("beta schedule is not finite"));
        }
        // 2. zero terminal SNR (Lin et al. 2023).
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        // 3. alphas and their cumulative product.
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod = torch_cumprod_f32(&alphas);
        if alphas_cumprod.iter().any(|a| !a.is_finite()) {
            return Err(invalid(
                "alphas_cumprod is not finite (check beta_start / beta_end)",
            ));
        }
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config: config.clone(),
            betas,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            timesteps: Vec::new(),
        })
    }

    /// The configuration the scheduler was built from.
    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    /// β_t for t = 0..T (after the optional zero-SNR rescale).
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0..T.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// ᾱ used for the step after `t = 0` (1 with `set_alpha_to_one`, else ᾱ₀).
    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// Standard deviation of the initial noise (always 1 for DDIM).
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Number of inference steps of the last [`DDIMScheduler::set_timesteps`].
    pub fn num_inference_steps(&self) -> Option<usize> {
        self.num_inference_steps
    }

    /// The inference timesteps, in decreasing order (empty before
    /// [`DDIMScheduler::set_timesteps`]).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Places `num_inference_steps` timesteps according to `timestep_spacing`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let n = num_inference_steps;
        let t = self.config.num_train_timesteps;
        if n == 0 || n > t {
            return Err(invalid(format!(
                "number of inference steps must be in 1..={t} (num_train_timesteps), got {n}"
            )));
        }
        let timesteps: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|v| v.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = t / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t as f64 / n as f64;
                numpy_arange(t as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|v| v.round_ties_even() as i64 - 1)
                    .filter(|&v| v >= 0)
                    .collect()
            }
        };
        if let Some(bad) = timesteps.iter().find(|&&v| v < 0 || v as usize >= t) {
            return Err(invalid(format!(
                "{n} steps with steps_offset {} give timestep {bad}, outside 0..{t}",
                self.config.steps_offset
            )));
        }
        self.timesteps = timesteps.into_iter().map(|v| v as usize).collect();
        self.num_inference_steps = Some(n);
        Ok(())
    }

    /// The timestep `step()` reads ᾱ_prev from: `t − T // steps` (negative at the
    /// end of the schedule, where ᾱ_prev is `final_alpha_cumprod`).
    pub fn prev_timestep(&self, timestep: usize) -> Result<i64> {
        let n = self.require_steps()?;
        Ok(timestep as i64 - (self.config.num_train_timesteps / n) as i64)
    }

    /// `DDIMScheduler.step(model_output, t, sample, eta=0)`.
    ///
    /// `model_output` and `sample` must have the same shape; the result has
    /// their dtype. The scalars √ᾱ etc. are computed in f32 and applied in the
    /// tensors' dtype, as PyTorch does with 0-dim f32 factors.
    pub fn step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
    ) -> Result<DDIMSchedulerOutput> {
        let t_count = self.config.num_train_timesteps;
        if timestep >= t_count {
            return Err(invalid(format!(
                "timestep {timestep} is outside 0..{t_count}"
            )));
        }
        if model_output.dims() != sample.dims() {
            return Err(invalid(format!(
                "model output shape {:?} differs from sample shape {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        // 1. previous step value (t − T // steps, not the next list entry).
        let prev = self.prev_timestep(timestep)?;
        // 2. alphas, betas.
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let dtype = sample.dtype();
        let scalar =
            |v: f32| -> Result<Tensor> { Ok(Tensor::new(v, sample.device())?.to_dtype(dtype)?) };
        // 3. predicted x0 and predicted noise.
        let (mut pred_original_sample, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = (sample - scale(model_output, sqrt_beta)?)?
                    .broadcast_div(&scalar(sqrt_alpha)?)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = (sample - scale(model_output, sqrt_alpha)?)?
                    .broadcast_div(&scalar(sqrt_beta)?)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (scale(sample, sqrt_alpha)? - scale(model_output, sqrt_beta)?)?;
                let eps = (scale(model_output, sqrt_alpha)? + scale(sample, sqrt_beta)?)?;
                (x0, eps)
            }
        };
        // 4. clip x0.
        if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_original_sample = pred_original_sample.clamp(-r, r)?;
        }
        // 5.-6. η = 0: σ_t = 0, the direction term is √(1 − ᾱ_prev)·ε.
        let direction = scale(&pred_epsilon, (1.0 - alpha_prod_t_prev).sqrt())?;
        // 7. x_{t−1}.
        let prev_sample = (scale(&pred_original_sample, alpha_prod_t_prev.sqrt())? + direction)?;
        Ok(DDIMSchedulerOutput {
            prev_sample,
            pred_original_sample,
        })
    }

    fn require_steps(&self) -> Result<usize> {
        self.num_inference_steps
            .ok_or_else(|| invalid("DDIM: call set_timesteps before asking for steps"))
    }
}

fn invalid(message: impl Into<String>) -> PipelineError {
    PipelineError::InvalidInput(message.into())
}

/// `xs * s` with `s` rounded to the tensor's dtype (one rounding per element,
/// like PyTorch's `tensor * 0-dim tensor`).
fn scale(xs: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    match xs.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => xs.affine(f64::from(s), 0.0),
        dt => candle_core::bail!("DDIM step expects a float tensor, got {dt:?}"),
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` on the CPU: the
/// endpoints are rounded to f32, the first half counts up from `start`, the
/// second half down from `end`, all in f32.
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// `torch.cumprod` of an f32 tensor on the CPU: accumulated in f64, each
/// partial product rounded to f32.
fn torch_cumprod_f32(xs: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    xs.iter()
        .map(|&x| {
            acc *= f64::from(x);
            acc as f32
        })
        .collect()
}

/// diffusers `betas_for_alpha_bar(T)` (cosine, `max_beta` 0.999), computed in
/// f64 like the Python floats, then stored as f32.
fn betas_for_alpha_bar(t: usize) -> Vec<f32> {
    const MAX_BETA: f64 = 0.999;
    let alpha_bar = |x: f64| {
        ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..t)
        .map(|i| {
            let t1 = i as f64 / t as f64;
            let t2 = (i + 1) as f64 / t as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(MAX_BETA) as f32
        })
        .collect()
}

/// diffusers `rescale_zero_terminal_snr(betas)` in f32 (Lin et al. 2023,
/// Algorithm 1): shift √ᾱ so the last one is 0, scale so the first keeps its
/// value, and convert back to betas. The last beta becomes exactly 1.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = torch_cumprod_f32(&alphas)
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let factor = first / (first - last);
    for v in &mut sqrt_ab {
        *v -= last;
        *v *= factor;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `numpy.arange(start, stop, step)` for f64 (NumPy 1.26): length
/// `ceil((stop − start) / step)`, elements `start + i·δ` with
/// `δ = (start + step) − start`.
fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len < 1.0 {
        return Vec::new();
    }
    let len = len as usize;
    let mut out = Vec::with_capacity(len);
    out.push(start);
    if len > 1 {
        let second = start + step;
        let delta = second - start;
        out.push(second);
        out.extend((2..len).map(|i| start + i as f64 * delta));
    }
    out
}

/// `numpy.linspace(start, stop, num)` (endpoint included) for f64.
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn echomimic(steps: usize) -> DDIMScheduler {
        let mut s = DDIMScheduler::new(&DdimSchedulerConfig::default()).unwrap();
        s.set_timesteps(steps).unwrap();
        s
    }

    #[test]
    fn trailing_timesteps_match_the_spec() {
        let t30 = echomimic(30);
        assert_eq!(t30.timesteps().len(), 30);
        assert_eq!(&t30.timesteps()[..7], &[999, 966, 932, 899, 866, 832, 799]);
        assert_eq!(&t30.timesteps()[27..], &[99, 66, 32]);
        assert_eq!(echomimic(6).timesteps(), &[999, 832, 666, 499, 332, 166]);
        assert_eq!(echomimic(5).timesteps(), &[999, 799, 599, 399, 199]);
        assert_eq!(echomimic(3).timesteps(), &[999, 666, 332]);
        assert_eq!(echomimic(1).timesteps(), &[999]);
        assert_eq!(echomimic(1000).timesteps().len(), 1000);
    }

    #[test]
    fn prev_timestep_uses_the_integer_stride() -> Result<()> {
        let t30 = echomimic(30);
        assert_eq!(t30.prev_timestep(966)?, 933);
        assert_eq!(t30.prev_timestep(32)?, -1);
        let t6 = echomimic(6);
        assert_eq!(t6.prev_timestep(999)?, 833);
        assert_eq!(t6.prev_timestep(166)?, 0);
        let t3 = echomimic(3);
        assert_eq!(t3.prev_timestep(666)?, 333);
        assert_eq!(t3.prev_timestep(332)?, -1);
        Ok(())
    }

    #[test]
    fn trailing_drops_numpy_extra_negative_timestep() {
        // np.arange(1000, 0, -1000/61) has 62 elements; the last becomes -1.
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        let t = echomimic(61);
        assert_eq!(t.timesteps().len(), 61);
        assert_eq!(t.timesteps()[0], 999);
        assert!(t.timesteps().windows(2).all(|w| w[0] > w[1]));
    }

    #[test]
    fn leading_and_linspace_spacing() -> Result<()> {
        let mut cfg = DdimSchedulerConfig {
            timestep_spacing: TimestepSpacing::Leading,
            ..DdimSchedulerConfig::default()
        };
        let mut s = DDIMScheduler::new(&cfg)?;
        s.set_timesteps(50)?;
        let ts = s.timesteps();
        assert_eq!(ts.len(), 50);
        assert_eq!((ts[0], ts[1], ts[48], ts[49]), (981, 961, 21, 1));
        assert_eq!(s.prev_timestep(981)?, 961);
        s.set_timesteps(3)?;
        assert_eq!(s.timesteps(), &[667, 334, 1]);
        // 1000 leading steps with offset 1 would reach t = 1000.
        assert!(s.set_timesteps(1000).is_err());

        cfg.timestep_spacing = TimestepSpacing::Linspace;
        let mut s = DDIMScheduler::new(&cfg)?;
        s.set_timesteps(4)?;
        // np.linspace(0, 999, 4) = [0, 333, 666, 999]
        assert_eq!(s.timesteps(), &[999, 666, 333, 0]);
        s.set_timesteps(6)?;
        // [0, 199.8, 399.6, 599.4, 799.2, 999] rounded
        assert_eq!(s.timesteps(), &[999, 799, 599, 400, 200, 0]);
        Ok(())
    }

    #[test]
    fn rejects_bad_step_counts_and_configs() {
        let mut s = DDIMScheduler::new(&DdimSchedulerConfig::default()).unwrap();
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps(1001).is_err());
        let x = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let err = s.step(&x, 999, &x).unwrap_err().to_string();
        assert!(err.contains("set_timesteps"), "{err}");
        s.set_timesteps(5).unwrap();
        assert!(s.step(&x, 1000, &x).is_err());
        let y = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
        assert!(s.step(&x, 999, &y).is_err());
        let thr = DdimSchedulerConfig {
            thresholding: true,
            ..DdimSchedulerConfig::default()
        };
        assert!(DDIMScheduler::new(&thr).is_err());
        let zero = DdimSchedulerConfig {
            num_train_timesteps: 0,
            ..DdimSchedulerConfig::default()
        };
        assert!(DDIMScheduler::new(&zero).is_err());
    }

    #[test]
    fn zero_snr_table_ends_at_zero() {
        let s = echomimic(30);
        let ac = s.alphas_cumprod();
        assert_eq!(ac.len(), 1000);
        assert_eq!(ac[999], 0.0);
        assert_eq!(s.betas()[999], 1.0);
        // The first value keeps its pre-rescale value 1 - beta_start.
        assert_eq!(ac[0], 1.0 - 0.00085f32);
        assert!(ac.windows(2).all(|w| w[1] <= w[0]));
        assert_eq!(s.final_alpha_cumprod(), 1.0);
    }

    #[test]
    fn other_beta_schedules() -> Result<()> {
        let scaled = DDIMScheduler::new(&DdimSchedulerConfig {
            beta_schedule: BetaSchedule::ScaledLinear,
            rescale_betas_zero_snr: false,
            set_alpha_to_one: false,
            ..DdimSchedulerConfig::default()
        })?;
        let b = scaled.betas();
        assert!((b[0] - 0.00085).abs() < 1e-9 && (b[999] - 0.012).abs() < 1e-8);
        // SD 1.x's well-known ᾱ_T for scaled_linear.
        assert!((scaled.alphas_cumprod()[999] - 0.0047).abs() < 1e-4);
        assert_eq!(scaled.final_alpha_cumprod(), scaled.alphas_cumprod()[0]);

        let cos = DDIMScheduler::new(&DdimSchedulerConfig {
            beta_schedule: BetaSchedule::SquaredcosCapV2,
            rescale_betas_zero_snr: false,
            ..DdimSchedulerConfig::default()
        })?;
        let b = cos.betas();
        assert!(b[0] > 0.0 && b[0] < 1e-4, "{}", b[0]);
        assert_eq!(b[999], 0.999);
        assert!(b.windows(2).all(|w| w[1] >= w[0]));
        Ok(())
    }

    /// One step against the formulas evaluated in f64.
    #[test]
    fn step_matches_the_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.25, 2.0], &dev)?;
        let m = Tensor::new(&[0.1f32, 0.7, -0.3], &dev)?;
        for pred in [
            PredictionType::Epsilon,
            PredictionType::VPrediction,
            PredictionType::Sample,
        ] {
            for clip in [false, true] {
                let mut s = DDIMScheduler::new(&DdimSchedulerConfig {
                    prediction_type: pred,
                    clip_sample: clip,
                    ..DdimSchedulerConfig::default()
                })?;
                s.set_timesteps(10)?;
                let (t, prev) = (500usize, 400usize);
                let out = s.step(&m, t, &x)?;
                let a = f64::from(s.alphas_cumprod()[t]);
                let ap = f64::from(s.alphas_cumprod()[prev]);
                let xs = x.to_vec1::<f32>()?;
                let ms = m.to_vec1::<f32>()?;
                let got = out.prev_sample.to_vec1::<f32>()?;
                let got_x0 = out.pred_original_sample.to_vec1::<f32>()?;
                for i in 0..3 {
                    let (xv, mv) = (f64::from(xs[i]), f64::from(ms[i]));
                    let (mut x0, eps) = match pred {
                        PredictionType::Epsilon => ((xv - (1.0 - a).sqrt() * mv) / a.sqrt(), mv),
                        PredictionType::Sample => (mv, (xv - a.sqrt() * mv) / (1.0 - a).sqrt()),
                        PredictionType::VPrediction => (
                            a.sqrt() * xv - (1.0 - a).sqrt() * mv,
                            a.sqrt() * mv + (1.0 - a).sqrt() * xv,
                        ),
                    };
                    if clip {
                        x0 = x0.clamp(-1.0, 1.0);
                    }
                    let want = ap.sqrt() * x0 + (1.0 - ap).sqrt() * eps;
                    assert!((f64::from(got[i]) - want).abs() < 1e-5, "{pred:?} {clip}");
                    assert!((f64::from(got_x0[i]) - x0).abs() < 1e-5, "{pred:?} {clip}");
                }
            }
        }
        Ok(())
    }

    /// At t = 999 of the zero-SNR schedule ᾱ = 0: x0 = −v and ε = x.
    #[test]
    fn first_zero_snr_step_is_exact() -> Result<()> {
        let s = echomimic(5);
        let dev = Device::Cpu;
        let x = Tensor::new(&[0.5f32, -1.25], &dev)?;
        let v = Tensor::new(&[0.1f32, 0.7], &dev)?;
        let out = s.step(&v, 999, &x)?;
        assert_eq!(out.pred_original_sample.to_vec1::<f32>()?, vec![-0.1, -0.7]);
        let ap = s.alphas_cumprod()[799];
        let want: Vec<f32> = [(0.5f32, 0.1f32), (-1.25, 0.7)]
            .iter()
            .map(|&(x, v)| ap.sqrt() * -v + (1.0 - ap).sqrt() * x)
            .collect();
        assert_eq!(out.prev_sample.to_vec1::<f32>()?, want);
        Ok(())
    }

    #[test]
    fn step_keeps_half_precision() -> Result<()> {
        let s = echomimic(5);
        let x = Tensor::ones((2, 3), DType::F16, &Device::Cpu)?;
        let out = s.step(&x, 599, &x)?;
        assert_eq!(out.prev_sample.dtype(), DType::F16);
        assert_eq!(out.pred_original_sample.dtype(), DType::F16);
        Ok(())
    }
}
