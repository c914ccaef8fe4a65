//! What one thread hands the next: a prepared [`Job`] (fetcher → inference), a [`FinishJob`]
//! (inference → finisher) and, at the end of the run, its [`RunDone`].
//!
//! The threads depend on these types, never on each other.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use echomimic_protocol::Task;
use image::RgbImage;

use crate::engine::{GenParams, Prepared, RunSummary};
use crate::error::WorkerError;
use crate::job::{Claim, TaskEvents, Timings};

/// A task ready for the GPU.
pub(crate) struct Job<D> {
    pub(crate) claim: Claim,
    pub(crate) task: Task,
    pub(crate) params: GenParams,
    pub(crate) prepared: Prepared<D>,
    pub(crate) events: TaskEvents,
    /// The task's private temp folder; removed when the job is dropped.
    pub(crate) dir: tempfile::TempDir,
    pub(crate) timings: Timings,
    pub(crate) ready_at: Instant,
}

/// What the finisher gets for one task.
pub(crate) struct FinishJob {
    pub(crate) claim: Claim,
    pub(crate) task: Task,
    pub(crate) params: GenParams,
    pub(crate) photo: RgbImage,
    pub(crate) crop: [u32; 4],
    pub(crate) mux_audio: PathBuf,
    pub(crate) audio_secs: f64,
    pub(crate) notes: Vec<String>,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) timings: Timings,
    pub(crate) frames_rx: Receiver<Vec<u8>>,
    pub(crate) done_rx: Receiver<RunDone>,
}

/// The end of one engine run.
pub(crate) struct RunDone {
    pub(crate) result: Result<RunSummary, WorkerError>,
    pub(crate) events: TaskEvents,
    /// From the start of the run to the end of its last UNet call.
    pub(crate) inference: Duration,
    /// From there to the end of the run (VAE decoding and frames).
    pub(crate) decode: Duration,
}
