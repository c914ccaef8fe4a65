//! The finisher thread: encodes the frames as they arrive, muxes the audio, uploads the MP4
//! and records the task's outcome. It works on task N while the inference thread already runs
//! task N+1.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::Receiver;
use echomimic_pipeline::video::{
    AudioInput, EncoderBackend, GeometryMode, OutputGeometry, PasteBack, VideoReport, VideoSpec,
    VideoWriter,
};
use echomimic_protocol::Stage;
use echomimic_tempfile::TempfileClient;

use crate::error::WorkerError;
use crate::handoff::{FinishJob, RunDone};
use crate::job::{video_name, Policy, Timings};
use crate::metrics::STAGES;
use crate::outbox::Outbox;
use crate::progress::{MERGE_START, UPLOAD_START};
use crate::reporter::ReporterHandle;
use crate::state::Shared;

pub(crate) struct Finisher {
    /// For the cancel flag: an upload (riding out an outage, say) gives up when the task is
    /// cancelled.
    pub(crate) shared: Arc<Shared>,
    pub(crate) http: TempfileClient,
    pub(crate) reporter: ReporterHandle,
    pub(crate) policy: Policy,
    pub(crate) geometry: GeometryMode,
    pub(crate) encoder: EncoderBackend,
    pub(crate) frame_size: (u32, u32),
    /// Largest MP4 the temp-file API takes: the encoder's rate is capped to fit it.
    pub(crate) max_upload_bytes: Option<u64>,
    /// Where a finished video waits when its task is requeued after a failed upload.
    pub(crate) outbox: Outbox,
}

impl Finisher {
    pub(crate) fn run(self, jobs: Receiver<FinishJob>) {
        for job in jobs.iter() {
            self.finish(job);
        }
    }

    fn writer(&self, job: &FinishJob) -> Result<VideoWriter, WorkerError> {
        let (w, h) = self.frame_size;
        let geometry = match self.geometry {
            GeometryMode::Crop => OutputGeometry::Crop,
            GeometryMode::PasteBack => OutputGeometry::PasteBack(
                PasteBack::new(job.photo.clone(), job.crop).map_err(WorkerError::Encode)?,
            ),
        };
        let spec = VideoSpec::new(w, h, AudioInput::file(&job.mux_audio))
            .with_fps(job.params.fps)
            .with_backend(self.encoder)
            .with_geometry(geometry)
            .with_max_bytes(self.max_upload_bytes);
        VideoWriter::create(job.dir.path().join("video.mp4"), &spec).map_err(WorkerError::Encode)
    }

    /// Finishes one task and records its outcome: `completed`, or what the first error means
    /// ([`Policy::after_error`]: a cancelled run is released, others retried or failed).
    fn finish(&self, mut job: FinishJob) {
        let span = tracing::info_span!("task", task_id = %job.task.task_id, claim = %job.claim.id);
        let _enter = span.enter();
        let record = match self.deliver(&mut job) {
            Ok(Delivered { file_id, message }) => self
                .policy
                .completed(&job.claim, &job.task, &file_id, message),
            Err(WorkerError::Cancelled) if self.shared.cancel_requested(&job.task.task_id) => {
                tracing::info!("cancelled on request");
                self.policy
                    .cancelled(&job.claim, &job.task, "while it was running")
            }
            Err(err) => {
                match &err {
                    WorkerError::Cancelled => tracing::info!("stopped by shutdown; task requeued"),
                    _ => tracing::warn!(error = %err, code = %err.failure().code, "task failed"),
                }
                let ids = Some((job.task.task_id.as_str(), job.task.session_id.as_str()));
                self.policy.after_error(&job.claim, ids, &err)
            }
        };
        self.reporter.outcome(record);
        // The task's temp folder goes with `job`, after the outcome is on its way.
    }

    /// Encodes the frames as they come, waits for the end of the run, muxes and uploads.
    fn deliver(&self, job: &mut FinishJob) -> Result<Delivered, WorkerError> {
        let writer = self.encode_frames(job);
        let RunDone {
            result,
            mut events,
            inference,
            decode,
        } = job
            .done_rx
            .recv()
            .map_err(|_| WorkerError::Internal("the inference thread stopped mid-task".into()))?;
        job.timings.inference = inference;
        job.timings.decode = decode;
        // The encoder's failure is the cause when both failed (a cancelled run is just that).
        let (summary, writer) = match (result, writer) {
            (Err(WorkerError::Cancelled), _) => return Err(WorkerError::Cancelled),
            (_, Err(enc)) | (Err(enc), Ok(_)) => return Err(enc),
            (Ok(summary), Ok(writer)) => (summary, writer),
        };
        events.stage(
            Stage::MergingAudio,
            MERGE_START,
            format!(
                "{} frames generated; finishing the video and muxing the audio",
                summary.frames
            ),
        );
        let t = Instant::now();
        let report = writer.finish().map_err(WorkerError::Encode)?;
        job.timings.encode = t.elapsed();
        events.stage(Stage::Uploading, UPLOAD_START, "uploading the video");
        let t = Instant::now();
        let name = video_name(&job.task);
        let message = completed_message(&report, job.audio_secs, &job.notes);
        let cancelled = || self.shared.cancelled();
        let uploaded = match self
            .http
            .upload_file_as_unless(&report.path, &name, &cancelled)
        {
            Ok(uploaded) => uploaded,
            Err(e) => {
                let err = WorkerError::Upload(e);
                if self.policy.requeues(&job.claim, &err) {
                    match self.outbox.keep(&job.claim.item, &report.path, &message) {
                        Ok(()) => tracing::warn!(
                            "upload failed; the video is kept for the task's next attempt"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "upload failed; cannot keep the video")
                        }
                    }
                }
                return Err(err);
            }
        };
        job.timings.upload = t.elapsed();
        let m = &self.shared.metrics;
        let t = &job.timings;
        let took = [
            t.download,
            t.prepare,
            t.wait,
            t.inference,
            t.decode,
            t.encode,
            t.upload,
        ];
        for (stage, took) in STAGES.iter().zip(took) {
            m.stage(stage, took.as_secs_f64());
        }
        log_timings(
            &job.timings,
            &report,
            job.claim.claimed_at.elapsed().as_secs_f64(),
        );
        Ok(Delivered {
            file_id: uploaded.file_id,
            message,
        })
    }

    /// Writes the frames into the video as they arrive, until the engine's last frame or the
    /// first encoding error; then closes the frame channel (so a still running engine sees a
    /// closed sink).
    fn encode_frames(&self, job: &mut FinishJob) -> Result<VideoWriter, WorkerError> {
        let mut writer = self.writer(job);
        for frame in job.frames_rx.iter() {
            let Ok(w) = writer.as_mut() else { break };
            if let Err(e) = w.write_frame(&frame) {
                writer = Err(WorkerError::Encode(e));
                break;
            }
        }
        drop(std::mem::replace(
            &mut job.frames_rx,
            crossbeam_channel::never(),
        ));
        writer
    }
}

/// A finished task: the uploaded video and the `completed` message.
struct Delivered {
    file_id: String,
    message: String,
}

fn completed_message(report: &VideoReport, audio_secs: f64, notes: &[String]) -> String {
    let mut m = format!(
        "video ready: {}x{}, {} frames at {} fps ({:.2} s), audio {:.2} s",
        report.width,
        report.height,
        report.frames_written,
        report.fps,
        report.duration_s,
        audio_secs
    );
    for n in notes {
        m.push_str("; ");
        m.push_str(n);
    }
    m
}

fn log_timings(t: &Timings, report: &VideoReport, total: f64) {
    tracing::info!(
        download_s = t.download.as_secs_f64(),
        prepare_s = t.prepare.as_secs_f64(),
        wait_s = t.wait.as_secs_f64(),
        inference_s = t.inference.as_secs_f64(),
        decode_s = t.decode.as_secs_f64(),
        mux_s = t.encode.as_secs_f64(),
        upload_s = t.upload.as_secs_f64(),
        total_s = total,
        backend = %report.backend,
        bytes = report.bytes,
        "task completed"
    );
}
