//! The hooks around [`super::EchoMimicPipeline`]'s algorithm: progress events, cancellation
//! and the optional dump of intermediate tensors (named as in the golden `pipeline.safetensors`).
//! The algorithm calls them at its stage boundaries; none of them changes a result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::denoise::{DenoiseObserver, Denoiser, StepOutput, UnetCall};
use super::dump::VIDEO_FRAME_PREFIX;
use super::progress::{Progress, Stage};
use crate::error::{PipelineError, Result};
use crate::models::attention::Bank;

/// A hook receiving named intermediate tensors (see [`super::TensorDump`]).
pub type TensorHook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

/// Progress, cancellation and the tensor dump of one run.
pub(super) struct RunHooks<'a, 'd> {
    progress: &'a mut dyn FnMut(Progress),
    cancel: &'a AtomicBool,
    /// The tensor hook; names and tensors are only built when it is set.
    dump: Option<TensorHook<'d>>,
    /// UNet calls done and planned, and steps planned (for [`Progress::UnetCall`]).
    done: usize,
    total: usize,
    steps: usize,
}

impl<'a, 'd> RunHooks<'a, 'd> {
    pub(super) fn new(
        progress: &'a mut dyn FnMut(Progress),
        cancel: &'a AtomicBool,
        dump: Option<TensorHook<'d>>,
    ) -> Self {
        Self {
            progress,
            cancel,
            dump,
            done: 0,
            total: 0,
            steps: 0,
        }
    }

    /// [`PipelineError::Cancelled`] once the cancel flag is set.
    pub(super) fn check_cancel(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            Err(PipelineError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs one stage: checks the cancel flag, announces the stage, times `body` into `time`.
    pub(super) fn stage<T>(
        &mut self,
        stage: Stage,
        time: &mut Duration,
        body: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        self.check_cancel()?;
        (self.progress)(Progress::Stage(stage));
        let t = Instant::now();
        let out = body(self)?;
        *time = t.elapsed();
        Ok(out)
    }

    /// Hands tensors to the dump, if there is one.
    pub(super) fn tensors(&mut self, named: &[(&str, &Tensor)]) -> Result<()> {
        if let Some(hook) = self.dump.as_mut() {
            for (name, t) in named {
                hook(name, t)?;
            }
        }
        Ok(())
    }

    /// A tensor whose name and value are only built when there is a dump.
    fn tensor_with(
        &mut self,
        name: impl FnOnce() -> String,
        tensor: impl FnOnce() -> Result<Tensor>,
    ) -> Result<()> {
        match self.dump.as_mut() {
            Some(hook) => hook(&name(), &tensor()?),
            None => Ok(()),
        }
    }

    /// The frame count is known: [`Progress::Plan`], and the audio tokens `[1, F, …]` to the
    /// dump.
    pub(super) fn planned(
        &mut self,
        tokens: &Tensor,
        audio_frames: usize,
        unet_calls: usize,
    ) -> Result<()> {
        let frames = tokens.dims().get(1).copied().unwrap_or(0);
        (self.progress)(Progress::Plan {
            frames,
            audio_frames,
            unet_calls,
        });
        self.tensor_with(
            || "video_length".into(),
            || Ok(Tensor::new(frames as i64, &Device::Cpu)?),
        )?;
        self.tensors(&[("audio_fea_final", tokens)])
    }

    /// The reference bank (`ref_bank.{path}`) to the dump.
    pub(super) fn bank(&mut self, bank: &Bank) -> Result<()> {
        if self.dump.is_some() {
            for (path, features) in bank.iter() {
                self.tensor_with(|| format!("ref_bank.{path}"), || Ok(features.clone()))?;
            }
        }
        Ok(())
    }

    /// Sampling starts: the plan of UNet calls, and the timesteps to the dump.
    pub(super) fn sampling(&mut self, denoiser: &Denoiser<'_>) -> Result<()> {
        self.done = 0;
        self.total = denoiser.unet_calls();
        self.steps = denoiser.steps();
        self.tensor_with(
            || "timesteps".into(),
            || {
                let t: Vec<i64> = denoiser.timesteps().iter().map(|&t| t as i64).collect();
                let n = t.len();
                Ok(Tensor::from_vec(t, n, &Device::Cpu)?)
            },
        )
    }

    /// Before decoding a frame.
    pub(super) fn before_frame(&self) -> Result<()> {
        self.check_cancel()
    }

    /// A decoded frame `[1, 3, H, W]` to the dump (`video.frame{i}`).
    pub(super) fn frame_decoded(&mut self, index: usize, frame: &Tensor) -> Result<()> {
        self.tensor_with(
            || format!("{VIDEO_FRAME_PREFIX}{index}"),
            || Ok(frame.clone()),
        )
    }

    /// A frame went to the sink: [`Progress::Frame`].
    pub(super) fn frame_done(&mut self, done: usize, total: usize) {
        (self.progress)(Progress::Frame { done, total });
    }
}

impl DenoiseObserver for RunHooks<'_, '_> {
    fn before_unet(&mut self, _call: &UnetCall<'_>) -> Result<()> {
        self.check_cancel()
    }

    /// [`Progress::UnetCall`], and the per-window outputs of step 0 to the dump (as the golden
    /// file holds them).
    fn after_unet(&mut self, call: &UnetCall<'_>, output: &Tensor) -> Result<()> {
        // Windows that ran in one call are reported one by one: a cancel stops the reports
        // as it would have stopped separate calls.
        self.check_cancel()?;
        if call.step == 0 {
            self.tensor_with(
                || format!("step0.window{}.unet_out", call.window),
                || Ok(output.clone()),
            )?;
        }
        self.done += 1;
        (self.progress)(Progress::UnetCall {
            step: call.step,
            steps: self.steps,
            window: call.window,
            windows: call.windows,
            done: self.done,
            total: self.total,
        });
        Ok(())
    }

    /// The step's windows, guided prediction and new latents to the dump.
    fn after_step(&mut self, step: usize, out: &StepOutput) -> Result<()> {
        self.tensor_with(
            || format!("step{step}.contexts"),
            || windows_tensor(&out.windows),
        )?;
        self.tensors(&[
            (&format!("step{step}.noise_pred_cfg"), &out.noise_pred),
            (&format!("step{step}.latents_out"), &out.latents),
        ])
    }
}

/// `[windows, frames]` frame indices as i64 (golden `step{i}.contexts`).
fn windows_tensor(windows: &[Vec<usize>]) -> Result<Tensor> {
    let n = windows.len();
    let len = windows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = windows.iter().flatten().map(|&i| i as i64).collect();
    Ok(Tensor::from_vec(flat, (n, len), &Device::Cpu)?)
}
