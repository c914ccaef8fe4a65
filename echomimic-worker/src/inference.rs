//! The inference thread: owns the engine (and so the GPU), runs one task at a time.
//!
//! For each task it first hands the finisher a [`FinishJob`] holding the receiving end of a
//! bounded frame channel, so frames go into the encoder while later frames are still being
//! decoded; then it runs the engine, publishing progress after every UNet call (coalesced by
//! the reporter, never waited for), and finally sends the run's result to the finisher, which
//! records the outcome. A panic inside the engine is caught and treated as a model failure.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use echomimic_protocol::Stage;

use crate::engine::{Engine, Prepared, RunContext, SinkClosed};
use crate::error::WorkerError;
use crate::handoff::{FinishJob, Job, RunDone};
use crate::job::Policy;
use crate::progress::{
    inference_message, inference_progress, EngineProgress, Eta, INFERENCE_START,
};
use crate::reporter::ReporterHandle;
use crate::state::Shared;

/// Frames buffered between the engine and the encoder.
const FRAME_QUEUE: usize = 8;

pub(crate) struct Inference<E: Engine> {
    pub(crate) engine: E,
    pub(crate) shared: Arc<Shared>,
    pub(crate) reporter: ReporterHandle,
    pub(crate) policy: Policy,
}

impl<E: Engine> Inference<E> {
    pub(crate) fn run(mut self, jobs: Receiver<Job<E::Data>>, finish: Sender<FinishJob>) {
        for job in jobs.iter() {
            self.run_task(job, &finish);
        }
    }

    fn run_task(&mut self, job: Job<E::Data>, finish: &Sender<FinishJob>) {
        let Job {
            claim,
            task,
            params,
            prepared,
            mut events,
            dir,
            mut timings,
            ready_at,
        } = job;
        timings.wait = ready_at.elapsed();
        if self.shared.cancelled() {
            self.reporter.outcome(self.policy.released(&claim));
            return;
        }
        if self.shared.cancel_requested(&task.task_id) {
            tracing::info!(task_id = %task.task_id, claim = %claim.id, "cancelled on request before its run");
            self.reporter
                .outcome(self.policy.cancelled(&claim, &task, "before it started"));
            return;
        }
        let Prepared {
            photo,
            crop,
            mux_audio,
            audio_secs,
            frames,
            notes,
            data,
        } = prepared;
        let span = tracing::info_span!("task", task_id = %task.task_id, claim = %claim.id);
        let _enter = span.enter();
        let task_id = task.task_id.clone();
        let (frames_tx, frames_rx) = crossbeam_channel::bounded(FRAME_QUEUE);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let message = format!(
            "generating {frames} frames: {} steps, cfg {}, seed {}",
            params.steps, params.cfg, params.seed
        );
        let fj = FinishJob {
            claim,
            task,
            params: params.clone(),
            photo,
            crop,
            mux_audio,
            audio_secs,
            notes,
            dir,
            timings,
            frames_rx,
            done_rx,
        };
        // On the model (and then in the finisher) until the outcome clears the mark.
        self.reporter
            .active(&fj.claim.id, Some(fj.claim.item.raw()));
        let running = (fj.claim.id.clone(), fj.claim.item.raw().to_vec());
        if let Err(e) = finish.send(fj) {
            self.reporter.outcome(self.policy.released(&e.0.claim));
            return;
        }
        events.stage(Stage::Inference, INFERENCE_START, message);
        // The watchdog's view: refreshed by every progress report until the run returns.
        self.shared.model_started(&running.0, &running.1, &task_id);
        let started = Instant::now();
        let mut eta = Eta::new();
        let mut last_decode_bucket = None;
        // The end of the last UNet call: splits the run into inference and decoding.
        let mut last_unet: Option<Instant> = None;
        let result = {
            let shared = &self.shared;
            let mut progress = |p: EngineProgress| {
                shared.model_progress();
                let message = match p {
                    EngineProgress::Unet { done, total, .. } => {
                        let now = Instant::now();
                        if let Some(prev) = last_unet {
                            shared.metrics.unet_call((now - prev).as_secs_f64());
                        }
                        last_unet = Some(now);
                        inference_message(&p, eta.update(now, done, total))
                    }
                    EngineProgress::Decoded { done, total } => {
                        // One event per 5 % of the frames (and the last one).
                        let bucket = done * 20 / total.max(1);
                        if last_decode_bucket == Some(bucket) && done < total {
                            return;
                        }
                        last_decode_bucket = Some(bucket);
                        inference_message(&p, None)
                    }
                    EngineProgress::Phase(_) => inference_message(&p, None),
                };
                events.progress(Stage::Inference, inference_progress(&p), message);
            };
            let mut sink = |f: Vec<u8>| frames_tx.send(f).map_err(|_| SinkClosed);
            let mut ctx = RunContext {
                cancel: &self.shared.run_cancel,
                progress: &mut progress,
                frame: &mut sink,
            };
            let engine = &mut self.engine;
            catch_unwind(AssertUnwindSafe(|| engine.run(data, &params, &mut ctx))).unwrap_or_else(
                |panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(panic = %what, "the engine panicked");
                    Err(WorkerError::Internal(format!("the model panicked: {what}")))
                },
            )
        };
        self.shared.model_done();
        drop(frames_tx);
        let ended = Instant::now();
        let unet_end = last_unet.unwrap_or(ended);
        let inference = unet_end - started;
        let decode = ended - unet_end;
        match &result {
            Ok(s) => tracing::info!(
                frames = s.frames,
                unet_calls = s.unet_calls,
                secs = (inference + decode).as_secs_f64(),
                "inference done"
            ),
            Err(e) => tracing::warn!(error = %e, "inference ended with an error"),
        }
        if done_tx
            .send(RunDone {
                result,
                events,
                inference,
                decode,
            })
            .is_err()
        {
            tracing::error!("finisher gone before the run ended");
        }
    }
}
