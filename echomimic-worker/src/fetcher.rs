//! The fetcher thread: claims the next item, downloads and checks its inputs, and hands the
//! prepared task to the inference thread.
//!
//! The hand-over channel is a rendezvous (capacity 0): while the GPU works on one task the
//! fetcher prepares at most one more and waits with it, so a worker never hoards tasks that
//! another worker on the same queue could run. With `--prefetch false` it claims only when
//! the worker is idle. A task that fails here (bad id, 404, undecodable or faceless photo,
//! silent audio, ...) is failed at once without touching the GPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{SendTimeoutError, Sender};
use echomimic_pipeline::video::{size_budget, GeometryMode};
use echomimic_pipeline::PipelineError;
use echomimic_protocol::{Stage, Task};
use echomimic_tempfile::TempfileClient;

use crate::config::TaskDefaults;
use crate::engine::{GenParams, Inputs, Prepared, Preparer};
use crate::error::{InputKind, WorkerError};
use crate::handoff::Job;
use crate::job::{resolve_params, video_name, Claim, Policy, TaskEvents, Timings};
use crate::outbox::{Outbox, Parcel};
use crate::progress::{DOWNLOAD_AUDIO, DOWNLOAD_START, FACE_START, INFERENCE_START, UPLOAD_START};
use crate::redis_link::{is_connection_error, sleep_unless, RedisLink};
use crate::reporter::ReporterHandle;
use crate::state::Shared;
use crate::store::{process_alive, Keys, OutcomeKind};

/// Everything the fetcher needs.
pub(crate) struct Fetcher<P: Preparer> {
    pub(crate) link: RedisLink,
    pub(crate) keys: Keys,
    pub(crate) preparer: P,
    pub(crate) shared: Arc<Shared>,
    pub(crate) reporter: ReporterHandle,
    pub(crate) policy: Policy,
    pub(crate) http: TempfileClient,
    pub(crate) temp_dir: PathBuf,
    pub(crate) max_download_bytes: u64,
    /// What the video may be, checked before the GPU run.
    pub(crate) output: OutputLimits,
    pub(crate) max_audio_secs: f64,
    pub(crate) defaults: TaskDefaults,
    pub(crate) prefetch: bool,
    pub(crate) claim_timeout: Duration,
    pub(crate) jobs: Sender<Job<P::Data>>,
    /// Videos finished by an earlier attempt whose upload failed.
    pub(crate) outbox: Outbox,
}

/// The bounds on a task's video, known once its inputs are prepared: frame size
/// (`--max-output-pixels`, paste-back only) and file size (`--max-upload-bytes`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputLimits {
    pub(crate) geometry: GeometryMode,
    /// The generated frame (`W x H`), the output size with `--geometry crop`.
    pub(crate) frame_size: (u32, u32),
    pub(crate) max_pixels: u64,
    pub(crate) max_bytes: Option<u64>,
}

impl OutputLimits {
    /// Fails (a bad input) a task whose video would pass a bound: the frame of a paste-back
    /// into a huge photo, or a file that could not fit the upload limit at a watchable bit
    /// rate ([`size_budget`], the rule the encoder caps its rate with).
    fn check<D>(&self, prepared: &Prepared<D>, fps: f64) -> Result<(), WorkerError> {
        let bad = |source| WorkerError::Input {
            input: InputKind::Image,
            source,
        };
        let (w, h) = match self.geometry {
            GeometryMode::Crop => self.frame_size,
            GeometryMode::PasteBack => prepared.photo.dimensions(),
        };
        let pixels = u64::from(w) * u64::from(h);
        if self.geometry == GeometryMode::PasteBack && pixels > self.max_pixels {
            return Err(bad(PipelineError::InvalidInput(format!(
                "the photo is {w}x{h}: a video pasted back into it would have {pixels} \
                 pixels per frame, more than this worker's limit of {} (--max-output-pixels); \
                 send a smaller photo",
                self.max_pixels
            ))));
        }
        if let Some(max) = self.max_bytes {
            size_budget(max, w, h, fps, prepared.audio_secs).map_err(bad)?;
        }
        Ok(())
    }
}

/// How often the queue's delayed set is checked for tasks due again.
const PROMOTE_EVERY: Duration = Duration::from_millis(500);

/// Per-task folders are `{TASK_DIR_PREFIX}{pid}-{claim}-{random}` in the temp folder.
const TASK_DIR_PREFIX: &str = "echomimic-";

/// Removes the per-task folders that processes no longer alive on this machine left behind
/// in `temp_dir` (a worker killed mid-task cannot remove its own). Folders of live
/// processes (other workers sharing the folder) and anything not named like a task folder
/// are left alone. Returns how many were removed.
pub(crate) fn sweep_dead_task_dirs(temp_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(temp_dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(TASK_DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || pid == std::process::id() || process_alive(pid) != Some(false) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove a dead worker's task folder")
            }
        }
    }
    removed
}

/// A file extension for a downloaded file from its `Content-Type` (decoders and ffmpeg look at
/// the content anyway; the extension is a hint).
fn extension_for(content_type: Option<&str>) -> &'static str {
    let ct = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    echomimic_tempfile::types::allowed_extensions()
        .find(|ext| echomimic_tempfile::types::content_type_for_extension(ext) == ct)
        .unwrap_or("bin")
}

impl<P: Preparer> Fetcher<P> {
    /// Claims and prepares until the worker stops.
    pub(crate) fn run(mut self) {
        // Claims in flight at most: one being finished (encode/upload), one on the GPU, one
        // prepared; without prefetch, one. This also bounds memory when garbage floods the
        // queue: the next item is claimed only once the reporter has caught up.
        let limit = if self.prefetch { 3 } else { 1 };
        let mut promoted_at: Option<Instant> = None;
        while !self.shared.stopping() {
            if !self.wait_for_room(limit) {
                break;
            }
            if promoted_at.is_none_or(|t| t.elapsed() >= PROMOTE_EVERY) {
                promoted_at = Some(Instant::now());
                match self.link.run(|con| self.keys.promote_due(con)) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tasks = n, queue = %self.keys.queue,
                        "tasks put aside during a temp-file outage are due again"),
                    // The claim below meets the same trouble and deals with it.
                    Err(e) => tracing::debug!(error = %e, "could not look at the delayed tasks"),
                }
            }
            let raw = match self
                .link
                .run(|con| self.keys.claim(con, self.claim_timeout))
            {
                Ok(Some(raw)) => raw,
                Ok(None) => continue,
                Err(e) => {
                    if !is_connection_error(&e) {
                        let hint = if format!("{e}")
                            .to_ascii_lowercase()
                            .contains("unknown command")
                        {
                            " (BLMOVE needs Redis 6.2 or newer)"
                        } else {
                            ""
                        };
                        tracing::error!(error = %e, queue = %self.keys.queue, "redis refused the claim{hint}; retrying");
                    }
                    let pause = self.link.pause_after(&e);
                    sleep_unless(pause, || self.shared.stopping());
                    continue;
                }
            };
            let claim = self.policy.claim(&raw);
            self.shared.claimed(&claim.id, &raw);
            drop(raw);
            if self.shared.stopping() {
                // Claimed while the stop request came in: give it back untouched.
                self.reporter.outcome(self.policy.released(&claim));
                break;
            }
            self.handle(claim);
        }
    }

    /// Waits until fewer than `limit` claims are in flight; false when the worker stops.
    fn wait_for_room(&self, limit: usize) -> bool {
        while self.shared.inflight() >= limit {
            if self.shared.stopping() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.shared.stopping()
    }

    fn handle(&mut self, claim: Claim) {
        let task = match claim.item.task() {
            Ok(task) => task,
            Err(invalid) => {
                tracing::warn!(claim = %claim.id, error = %invalid, "invalid task (dead-lettered)");
                tracing::debug!(claim = %claim.id, payload = %invalid.raw(), "invalid task payload");
                self.reporter.outcome(self.policy.invalid(&claim, invalid));
                return;
            }
        };
        let span = tracing::info_span!("task", task_id = %task.task_id, claim = %claim.id);
        let _enter = span.enter();
        if claim.attempt() > self.policy.max_attempts {
            let err = WorkerError::AttemptsExhausted {
                attempts: claim.item.attempts(),
                reason: claim
                    .item
                    .last_error()
                    .unwrap_or("no attempts left")
                    .to_owned(),
            };
            let ids = Some((task.task_id.as_str(), task.session_id.as_str()));
            self.reporter
                .outcome(self.policy.after_error(&claim, ids, &err));
            return;
        }
        // Worked on from here (a crash now charges this task an attempt) until prepared.
        self.reporter.active(&claim.id, Some(claim.item.raw()));
        let mut events = TaskEvents::new(&claim, &task, self.reporter.clone());
        events.start(format!(
            "task claimed (attempt {} of {})",
            claim.attempt(),
            self.policy.max_attempts
        ));
        if let Some(parcel) = self.outbox.find(&claim.item) {
            self.deliver_kept(claim, &task, parcel, events);
            return;
        }
        let params = resolve_params(&task, &self.defaults, self.max_audio_secs);
        match self.prepare(&claim, &task, &params, &mut events) {
            Ok((prepared, dir, timings)) => {
                self.reporter.active(&claim.id, None);
                events.stage(
                    Stage::FaceDetecting,
                    INFERENCE_START,
                    format!(
                        "face found, audio {:.1} s ({} frames); waiting for the GPU",
                        prepared.audio_secs, prepared.frames
                    ),
                );
                let job = Job {
                    claim,
                    task,
                    params,
                    prepared,
                    events,
                    dir,
                    timings,
                    ready_at: Instant::now(),
                };
                self.hand_over(job);
            }
            Err(err) => {
                let ids = Some((task.task_id.as_str(), task.session_id.as_str()));
                let record = self.policy.after_error(&claim, ids, &err);
                if let (OutcomeKind::Deferred, Some(delay)) = (record.what, record.delay) {
                    tracing::warn!(error = %err, delay_secs = delay.as_secs(),
                        "the temp-file API is down: task put aside");
                    events.stage(
                        Stage::Downloading,
                        DOWNLOAD_START,
                        format!(
                            "the temp-file API is unavailable; the task waits {} s and is tried again",
                            delay.as_secs()
                        ),
                    );
                } else {
                    tracing::info!(error = %err, code = %err.failure().code, "task rejected before inference");
                }
                self.reporter.outcome(record);
            }
        }
    }

    /// Uploads the video an earlier attempt of this task finished (its upload failed) and
    /// records the outcome, without running the model again. A failed upload requeues the
    /// task again (the video stays kept) or fails it (the video goes).
    fn deliver_kept(&self, claim: Claim, task: &Task, parcel: Parcel, mut events: TaskEvents) {
        tracing::info!(video = %parcel.video.display(), "the video of an earlier attempt is kept: uploading it");
        events.stage(
            Stage::Uploading,
            UPLOAD_START,
            "uploading the video finished by an earlier attempt",
        );
        let name = video_name(task);
        let stopping = || self.shared.stopping();
        match self
            .http
            .upload_file_as_unless(&parcel.video, &name, &stopping)
        {
            Ok(uploaded) => {
                self.reporter.outcome(self.policy.completed(
                    &claim,
                    task,
                    &uploaded.file_id,
                    parcel.message,
                ));
                self.outbox.remove(&claim.item);
            }
            Err(e) => {
                let err = WorkerError::Upload(e);
                tracing::warn!(error = %err, "the kept video could not be uploaded");
                if !self.policy.requeues(&claim, &err) {
                    self.outbox.remove(&claim.item);
                }
                let ids = Some((task.task_id.as_str(), task.session_id.as_str()));
                self.reporter
                    .outcome(self.policy.after_error(&claim, ids, &err));
            }
        }
    }

    fn download(
        &self,
        input: InputKind,
        file_id: &str,
        dir: &Path,
        stem: &str,
    ) -> Result<PathBuf, WorkerError> {
        let tmp = dir.join(format!("{stem}.download"));
        // A stop request ends the download at the next chunk: the task would only be
        // requeued once prepared.
        let stopping = || self.shared.stopping();
        let got = self
            .http
            .download_to_unless(file_id, &tmp, self.max_download_bytes, &stopping)
            .map_err(|source| WorkerError::Download {
                input,
                file_id: file_id.to_owned(),
                source,
            })?;
        let path = dir.join(format!(
            "{stem}.{}",
            extension_for(got.content_type.as_deref())
        ));
        std::fs::rename(&tmp, &path).map_err(|source| WorkerError::Io {
            op: "rename the download",
            path: path.clone(),
            source,
        })?;
        tracing::debug!(%file_id, bytes = got.bytes, path = %path.display(), "downloaded");
        Ok(path)
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        claim: &Claim,
        task: &Task,
        params: &GenParams,
        events: &mut TaskEvents,
    ) -> Result<(Prepared<P::Data>, tempfile::TempDir, Timings), WorkerError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!(
                "{TASK_DIR_PREFIX}{}-{}-",
                std::process::id(),
                &claim.id[..8]
            ))
            .tempdir_in(&self.temp_dir)
            .map_err(|source| WorkerError::Io {
                op: "create the task folder in",
                path: self.temp_dir.clone(),
                source,
            })?;
        let mut timings = Timings::default();
        let t = Instant::now();
        events.stage(
            Stage::Downloading,
            DOWNLOAD_START,
            "downloading the reference image",
        );
        let image = self.download(InputKind::Image, &task.ref_image_id, dir.path(), "image")?;
        self.check_stop()?;
        events.stage(Stage::Downloading, DOWNLOAD_AUDIO, "downloading the audio");
        let audio = self.download(InputKind::Audio, &task.audio_id, dir.path(), "audio")?;
        timings.download = t.elapsed();
        self.check_stop()?;
        events.stage(
            Stage::FaceDetecting,
            FACE_START,
            "detecting the face and checking the audio",
        );
        let t = Instant::now();
        let inputs = Inputs {
            image: &image,
            audio: &audio,
            work_dir: dir.path(),
        };
        let prepared = self.preparer.prepare(&inputs, params)?;
        timings.prepare = t.elapsed();
        self.output.check(&prepared, params.fps)?;
        Ok((prepared, dir, timings))
    }

    /// A stop-now request aborts preparation (the task is requeued uncounted).
    fn check_stop(&self) -> Result<(), WorkerError> {
        if self.shared.cancelled() {
            Err(WorkerError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Gives the job to the inference thread, or requeues it when the worker stops first.
    fn hand_over(&self, mut job: Job<P::Data>) {
        loop {
            match self.jobs.send_timeout(job, Duration::from_millis(100)) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(j)) => {
                    if self.shared.stopping() {
                        tracing::info!(task_id = %j.task.task_id, "stopping: prepared task requeued");
                        self.reporter.outcome(self.policy.released(&j.claim));
                        return;
                    }
                    job = j;
                }
                Err(SendTimeoutError::Disconnected(j)) => {
                    self.reporter.outcome(self.policy.released(&j.claim));
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_task_folders_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("image.png"), b"x").unwrap();
            p
        };
        let dead = mk("echomimic-999999999-abcdef12-xyz");
        let mine = mk(&format!("echomimic-{}-abcdef12-xyz", std::process::id()));
        let other = mk("echomimic-cache");
        let unrelated = mk("something-999999999");
        std::fs::write(dir.path().join("echomimic-999999998-file"), b"x").unwrap();
        assert_eq!(sweep_dead_task_dirs(dir.path()), 1);
        assert!(!dead.exists());
        assert!(mine.exists() && other.exists() && unrelated.exists());
        assert!(dir.path().join("echomimic-999999998-file").exists());
        assert_eq!(sweep_dead_task_dirs(&dir.path().join("missing")), 0);
    }

    #[test]
    fn extensions_from_content_types() {
        assert_eq!(extension_for(Some("image/png")), "png");
        assert_eq!(
            extension_for(Some("audio/wav")),
            extension_for(Some("audio/wav; x=1"))
        );
        assert_eq!(extension_for(Some("application/x-unknown")), "bin");
        assert_eq!(extension_for(None), "bin");
    }
}
