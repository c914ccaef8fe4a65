//! The finisher thread: encodes the frames as they arrive, muxes the audio, uploads the MP4
//! and records the task's outcome. It works on task N while the inference thread already runs
//! task N+1.

use std::time::Instant;

use crossbeam_channel::Receiver;
use echomimic_pipeline::video::{
    AudioInput, EncoderBackend, OutputGeometry, PasteBack, VideoReport, VideoSpec, VideoWriter,
};
use echomimic_protocol::Stage;
use echomimic_tempfile::TempfileClient;

use crate::config::Geometry;
use crate::error::WorkerError;
use crate::inference::{FinishJob, RunDone};
use crate::job::{Policy, Timings};
use crate::progress::{MERGE_START, UPLOAD_START};
use crate::reporter::ReporterHandle;

pub(crate) struct Finisher {
    pub(crate) http: TempfileClient,
    pub(crate) reporter: ReporterHandle,
    pub(crate) policy: Policy,
    pub(crate) geometry: Geometry,
    pub(crate) encoder: EncoderBackend,
    pub(crate) frame_size: (u32, u32),
}

impl Finisher {
    pub(crate) fn run(self, jobs: Receiver<FinishJob>) {
        for job in jobs.iter() {
            self.one(job);
        }
    }

    fn writer(&self, job: &FinishJob) -> Result<VideoWriter, WorkerError> {
        let (w, h) = self.frame_size;
        let geometry = match self.geometry {
            Geometry::Crop => OutputGeometry::Crop,
            Geometry::PasteBack => OutputGeometry::PasteBack(
                PasteBack::new(job.photo.clone(), job.crop).map_err(WorkerError::Encode)?,
            ),
        };
        let spec = VideoSpec::new(w, h, AudioInput::file(&job.mux_audio))
            .with_fps(job.params.fps)
            .with_backend(self.encoder)
            .with_geometry(geometry);
        VideoWriter::create(job.dir.path().join("video.mp4"), &spec).map_err(WorkerError::Encode)
    }

    fn one(&self, job: FinishJob) {
        let span = tracing::info_span!("task", task_id = %job.task.task_id, claim = %job.claim.id);
        let _enter = span.enter();
        let mut writer = self.writer(&job);
        let mut encode_error = None;
        for frame in job.frames_rx.iter() {
            let Ok(w) = writer.as_mut() else { break };
            if let Err(e) = w.write_frame(&frame) {
                encode_error = Some(WorkerError::Encode(e));
                break;
            }
        }
        let writer = match writer {
            Ok(w) if encode_error.is_none() => Some(w),
            Ok(_) => None,
            Err(e) => {
                encode_error = Some(e);
                None
            }
        };
        // The engine sees a closed sink if we stopped early.
        let FinishJob {
            claim,
            task,
            params: _,
            photo: _,
            crop: _,
            mux_audio: _,
            audio_secs,
            notes,
            dir,
            mut timings,
            frames_rx,
            done_rx,
        } = job;
        drop(frames_rx);
        let ids = Some((task.task_id.as_str(), task.session_id.as_str()));
        let Ok(RunDone {
            result,
            mut events,
            inference,
        }) = done_rx.recv()
        else {
            let err = WorkerError::Internal("the inference thread stopped mid-task".into());
            self.reporter
                .outcome(self.policy.after_error(&claim, ids, &err));
            return;
        };
        timings.inference = inference;
        let summary = match (result, encode_error) {
            (Err(WorkerError::Cancelled), _) => {
                tracing::info!("stopped by shutdown; task requeued");
                self.reporter.outcome(self.policy.released(&claim));
                return;
            }
            // The encoder's failure is the cause when both failed.
            (_, Some(enc)) | (Err(enc), None) => {
                tracing::warn!(error = %enc, code = %enc.failure().code, "task failed");
                self.reporter
                    .outcome(self.policy.after_error(&claim, ids, &enc));
                return;
            }
            (Ok(summary), None) => summary,
        };
        let Some(writer) = writer else {
            let err = WorkerError::Internal("video writer missing".into());
            self.reporter
                .outcome(self.policy.after_error(&claim, ids, &err));
            return;
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
        let report = match writer.finish() {
            Ok(r) => r,
            Err(e) => {
                let err = WorkerError::Encode(e);
                tracing::warn!(error = %err, "muxing failed");
                self.reporter
                    .outcome(self.policy.after_error(&claim, ids, &err));
                return;
            }
        };
        timings.encode = t.elapsed();
        events.stage(Stage::Uploading, UPLOAD_START, "uploading the video");
        let t = Instant::now();
        let name = format!("echomimic_{}.mp4", task.task_id);
        let uploaded = match self.http.upload_file_as(&report.path, &name) {
            Ok(u) => u,
            Err(e) => {
                let err = WorkerError::Upload(e);
                tracing::warn!(error = %err, "upload failed");
                self.reporter
                    .outcome(self.policy.after_error(&claim, ids, &err));
                return;
            }
        };
        timings.upload = t.elapsed();
        let message = completed_message(&report, audio_secs, &notes);
        log_timings(&timings, &report, claim.claimed_at.elapsed().as_secs_f64());
        self.reporter.outcome(
            self.policy
                .completed(&claim, &task, &uploaded.file_id, message),
        );
        drop(dir);
    }
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
        mux_s = t.encode.as_secs_f64(),
        upload_s = t.upload.as_secs_f64(),
        total_s = total,
        backend = %report.backend,
        bytes = report.bytes,
        "task completed"
    );
}
