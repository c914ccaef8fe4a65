//! The sampling loop: context windows, window averaging, classifier-free
//! guidance and DDIM (docs/model.md M6).
//!
//! [`Denoiser::step`] is one iteration of the reference's `for t_i, t in
//! enumerate(timesteps)` loop. It is public so that each step can be checked
//! on its own ("teacher forcing": feed the reference's input latents of a
//! step, compare its outputs).

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::context::{coverage, rotate_windows, uniform_windows};
use crate::error::{PipelineError, Result};
use crate::models::attention::PreparedBank;
use crate::models::unet_3d::UNet3DConditionModel;
use crate::schedulers::ddim::DDIMScheduler;

/// What the denoising UNet is conditioned on, computed once per request and
/// reused by every step and window.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `to_k`/`to_v` of the reference bank, per reader block.
    pub(super) bank: PreparedBank,
    /// Face-locator features, `[zeros; c]` (`[2, C0, 1, h, w]`) with guidance,
    /// `c` (`[1, C0, 1, h, w]`) without.
    pub(super) face: Tensor,
    /// Audio tokens of every frame, `[1, F, N, D]`, in the model dtype.
    pub(super) audio: Tensor,
    /// Guidance scale.
    pub(super) cfg: f64,
}

impl Conditioning {
    /// Frames of the video (`F`).
    pub fn frames(&self) -> usize {
        self.audio.dims().get(1).copied().unwrap_or(0)
    }

    /// True when classifier-free guidance runs (`cfg > 1`).
    pub fn guidance(&self) -> bool {
        self.cfg > 1.0
    }

    /// The guidance scale.
    pub fn cfg(&self) -> f64 {
        self.cfg
    }

    /// Latent height and width (`h`, `w`), from the face features.
    pub fn latent_size(&self) -> (usize, usize) {
        match self.face.dims() {
            [.., h, w] => (*h, *w),
            _ => (0, 0),
        }
    }
}

/// One denoising-UNet call, as seen by a [`DenoiseObserver`].
#[derive(Debug, Clone, Copy)]
pub struct UnetCall<'a> {
    /// Step index, `0..steps`.
    pub step: usize,
    /// Window index within the step.
    pub window: usize,
    /// Windows per step.
    pub windows: usize,
    /// The frames of the window (already rotated for this step).
    pub frames: &'a [usize],
}

/// Hooks around each denoising-UNet call of [`Denoiser::step`]. Both default
/// to doing nothing; an error stops the step and is returned by it (return
/// [`PipelineError::Cancelled`] from `before_unet` to cancel).
pub trait DenoiseObserver {
    /// Before the call.
    fn before_unet(&mut self, _call: &UnetCall<'_>) -> Result<()> {
        Ok(())
    }

    /// After the call; `output` is the raw v-prediction `[B, C, f, h, w]`
    /// (`B` = 2 with guidance: `[uncond, cond]`).
    fn after_unet(&mut self, _call: &UnetCall<'_>, _output: &Tensor) -> Result<()> {
        Ok(())
    }

    /// After step `step` of [`Denoiser::run`].
    fn after_step(&mut self, _step: usize, _output: &StepOutput) -> Result<()> {
        Ok(())
    }
}

/// No hooks.
impl DenoiseObserver for () {}

/// The outputs of one step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The DDIM update `x_{t-1}`, `[1, C, F, h, w]`: the next step's input.
    pub latents: Tensor,
    /// The window-averaged, guidance-combined v-prediction passed to DDIM
    /// (`noise_pred` of the reference), `[1, C, F, h, w]`.
    pub noise_pred: Tensor,
    /// The windows of this step (rotated by `2 × step`).
    pub windows: Vec<Vec<usize>>,
}

/// The sampler for one request: scheduler with its timesteps, and the
/// context windows.
#[derive(Debug, Clone)]
pub struct Denoiser<'a> {
    unet: &'a UNet3DConditionModel,
    cond: &'a Conditioning,
    scheduler: DDIMScheduler,
    windows: Vec<Vec<usize>>,
    /// Windows of one step run through the UNet together (≥ 1).
    windows_per_call: usize,
    /// UNet calls run side by side on rayon's pool (≥ 1).
    concurrent_calls: usize,
}

impl<'a> Denoiser<'a> {
    /// Sets the scheduler to `steps` timesteps and computes the windows for
    /// the conditioning's frame count.
    pub(super) fn new(
        unet: &'a UNet3DConditionModel,
        cond: &'a Conditioning,
        mut scheduler: DDIMScheduler,
        steps: usize,
        context_frames: usize,
        context_overlap: usize,
    ) -> Result<Self> {
        scheduler.set_timesteps(steps)?;
        let windows = uniform_windows(cond.frames(), context_frames, context_overlap)
            .map_err(PipelineError::InvalidInput)?;
        Ok(Self {
            unet,
            cond,
            scheduler,
            windows,
            windows_per_call: 1,
            concurrent_calls: 1,
        })
    }

    /// Runs up to `n` UNet calls of a step side by side on rayon's pool (at least 1): on
    /// the CPU at small sizes, where one call's operations are too small to share the
    /// cores well. Each call computes what it would alone, and the predictions are added
    /// in window order, so the result does not depend on `n`.
    pub fn with_concurrent_calls(mut self, n: usize) -> Self {
        self.concurrent_calls = n.max(1);
        self
    }

    /// Runs up to `n` windows of a step through the UNet in one call (one
    /// batch; at least 1). The windows of a step all read the same latents
    /// and no operation of the UNet mixes batch entries, so the predictions
    /// are each window's own, to float rounding; fewer, larger calls share
    /// each operation's fixed cost. The reference's `context_batch_size`.
    pub fn with_windows_per_call(mut self, n: usize) -> Self {
        self.windows_per_call = n.max(1);
        self
    }

    /// The DDIM timesteps, one per step.
    pub fn timesteps(&self) -> &[usize] {
        self.scheduler.timesteps()
    }

    /// Number of steps.
    pub fn steps(&self) -> usize {
        self.scheduler.timesteps().len()
    }

    /// Context windows per step.
    pub fn windows_per_step(&self) -> usize {
        self.windows.len()
    }

    /// Denoising-UNet calls of the whole run.
    pub fn unet_calls(&self) -> usize {
        self.steps() * self.windows.len()
    }

    /// Every step from `latents` (the initial latents) on; returns the final latents.
    pub fn run(&self, latents: Tensor, observer: &mut dyn DenoiseObserver) -> Result<Tensor> {
        let mut latents = latents;
        for step in 0..self.steps() {
            let out = self.step(step, &latents, observer)?;
            observer.after_step(step, &out)?;
            latents = out.latents;
        }
        Ok(latents)
    }

    /// One UNet call on the windows of `group` (all of one length): their frame indexes and
    /// the raw prediction `[B·k, C, f, h, w]`, `[uncond w_1 … w_k, cond w_1 … w_k]` with
    /// guidance (zero audio, zero face features and no bank for `uncond`).
    fn predict(
        &self,
        t: usize,
        latents: &Tensor,
        group: &[UnetCall<'_>],
    ) -> Result<(Vec<Tensor>, Tensor)> {
        let device = latents.device();
        let k = group.len();
        let mut indexes = Vec::with_capacity(k);
        let mut xs = Vec::with_capacity(k);
        let mut audios = Vec::with_capacity(k);
        for call in group {
            let index: Vec<u32> = call.frames.iter().map(|&i| i as u32).collect();
            let index = Tensor::from_vec(index, call.frames.len(), device)?;
            xs.push(latents.index_select(&index, 2)?);
            audios.push(self.cond.audio.index_select(&index, 1)?);
            indexes.push(index);
        }
        let guidance = self.cond.guidance();
        let x = Tensor::cat(&xs, 0)?;
        let audio = Tensor::cat(&audios, 0)?;
        let face = repeat_rows(&self.cond.face, k)?;
        let (x, audio) = if guidance {
            (
                x.repeat((2, 1, 1, 1, 1))?,
                Tensor::cat(&[&audio.zeros_like()?, &audio], 0)?,
            )
        } else {
            (x, audio)
        };
        // `scale_model_input` is the identity for DDIM.
        let pred =
            self.unet
                .forward(&x, t as f64, &audio, Some(&face), &self.cond.bank, guidance)?;
        Ok((indexes, pred))
    }

    /// The windows used at `step`: the uniform windows shifted by `2 × step`.
    pub fn windows_at(&self, step: usize) -> Vec<Vec<usize>> {
        rotate_windows(&self.windows, step, self.cond.frames())
    }

    /// Step `step` on `latents` (`[1, C, F, h, w]`, the model dtype):
    ///
    /// 1. for every window, gather its frames of `latents` (and of the audio
    ///    tokens), run the UNet (batch `[uncond, cond]` with guidance: zero
    ///    audio, zero face features and no bank for `uncond`; up to
    ///    [`Self::with_windows_per_call`] windows in one call), and add the
    ///    prediction to the window's frames;
    /// 2. divide each frame by the number of windows that covered it —
    ///    before guidance, and also without guidance (the reference's normal
    ///    pipeline forgets this division when `cfg <= 1`, summing the
    ///    overlapping predictions; fixed here, as its acc pipeline does);
    /// 3. with guidance, `v = u + cfg · (c − u)`;
    /// 4. DDIM step to `t − T // steps`.
    ///
    /// The accumulators stay in the latents' dtype, as the reference's do.
    /// The acc pipeline's v → x̂₀ → v conversion of each prediction is an
    /// exact identity and is skipped (docs/model.md M9).
    pub fn step(
        &self,
        step: usize,
        latents: &Tensor,
        observer: &mut dyn DenoiseObserver,
    ) -> Result<StepOutput> {
        let timesteps = self.scheduler.timesteps();
        let Some(&t) = timesteps.get(step) else {
            return Err(PipelineError::InvalidInput(format!(
                "step {step} is out of range: the run has {} steps",
                timesteps.len()
            )));
        };
        let frames = self.cond.frames();
        let (b, c, f, h, w) = latents.dims5()?;
        if b != 1 || f != frames {
            return Err(PipelineError::InvalidInput(format!(
                "latents {:?} do not match one video of {frames} frames",
                latents.dims()
            )));
        }
        let guidance = self.cond.guidance();
        let batch = if guidance { 2 } else { 1 };
        let dtype = latents.dtype();
        let device = latents.device();
        let windows = self.windows_at(step);

        // 1. sum the window predictions per frame: groups of windows, one UNet call each,
        //    `concurrent_calls` groups at a time
        let groups = window_groups(&windows, self.windows_per_call);
        let mut sum = Tensor::zeros((batch, c, f, h, w), dtype, device)?;
        for round in groups.chunks(self.concurrent_calls) {
            let calls: Vec<Vec<UnetCall<'_>>> = round
                .iter()
                .map(|&(first, count)| {
                    windows[first..first + count]
                        .iter()
                        .enumerate()
                        .map(|(n, frames_n)| UnetCall {
                            step,
                            window: first + n,
                            windows: windows.len(),
                            frames: frames_n,
                        })
                        .collect()
                })
                .collect();
            for call in calls.iter().flatten() {
                observer.before_unet(call)?;
            }
            // Whole calls side by side on the pool's threads: at small sizes this keeps both
            // cores busy where one call's operations are too small to split well.
            let outputs = side_by_side(&calls, |group| self.predict(t, latents, group));
            for (group, output) in calls.iter().zip(outputs) {
                let (indexes, pred) = output?;
                let k = group.len();
                for (n, (call, index)) in group.iter().zip(&indexes).enumerate() {
                    let pred_n = if k == 1 {
                        pred.clone()
                    } else if guidance {
                        Tensor::cat(&[pred.narrow(0, n, 1)?, pred.narrow(0, k + n, 1)?], 0)?
                    } else {
                        pred.narrow(0, n, 1)?
                    };
                    observer.after_unet(call, &pred_n)?;
                    sum = sum.index_add(index, &pred_n.to_dtype(dtype)?, 2)?;
                }
            }
        }
        // 2. average over the covering windows
        let counts: Vec<f32> = coverage(&windows, frames)
            .into_iter()
            .map(|n| n as f32)
            .collect();
        let counts = Tensor::from_vec(counts, (1, 1, frames, 1, 1), device)?.to_dtype(dtype)?;
        let mean = sum.broadcast_div(&counts)?;
        // 3. guidance
        let noise_pred = if guidance {
            let uncond = mean.narrow(0, 0, 1)?;
            let cond = mean.narrow(0, 1, 1)?;
            (&uncond + scale(&(cond - &uncond)?, self.cond.cfg)?)?
        } else {
            mean
        };
        // 4. DDIM
        let latents = self.scheduler.step(&noise_pred, t, latents)?.prev_sample;
        Ok(StepOutput {
            latents,
            noise_pred,
            windows,
        })
    }
}

/// Consecutive windows of one length in groups of at most `per_call`: `(first, count)`.
fn window_groups(windows: &[Vec<usize>], per_call: usize) -> Vec<(usize, usize)> {
    let mut groups = Vec::new();
    let mut first = 0;
    while first < windows.len() {
        let len = windows[first].len();
        let count = windows[first..]
            .iter()
            .take(per_call.max(1))
            .take_while(|w| w.len() == len)
            .count();
        groups.push((first, count));
        first += count;
    }
    groups
}

/// Each row of `xs` (`[B, …]`) repeated `k` times in place: `[r_1 × k, r_2 × k, …]`,
/// so that face features `[uncond, cond]` line up with a batch of `k` windows
/// per branch.
fn repeat_rows(xs: &Tensor, k: usize) -> Result<Tensor> {
    let dims = xs.dims();
    let mut wide = dims.to_vec();
    wide.insert(1, k);
    let mut flat = dims.to_vec();
    flat[0] *= k;
    Ok(xs.unsqueeze(1)?.broadcast_as(wide)?.reshape(flat)?)
}

/// `f` over `items`, on rayon's pool side by side when there are several (one item runs on
/// the calling thread: handing it to the pool would only add a wake-up). Results in order.
pub(super) fn side_by_side<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> R + Sync + Send,
) -> Vec<R> {
    if items.len() == 1 {
        items.iter().map(f).collect()
    } else {
        items.par_iter().map(f).collect()
    }
}

/// `xs × s` with one rounding per element: half-precision tensors are
/// scaled in f32 (PyTorch's "opmath") instead of with an f16-rounded factor.
pub(super) fn scale(xs: &Tensor, s: f64) -> Result<Tensor> {
    Ok(match xs.dtype() {
        DType::F16 | DType::BF16 => xs
            .to_dtype(DType::F32)?
            .affine(s, 0.0)?
            .to_dtype(xs.dtype())?,
        _ => xs.affine(s, 0.0)?,
    })
}
