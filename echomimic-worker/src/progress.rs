//! How far along a task is: the stage bands of `progress`, the per-UNet-call inference
//! progress with an ETA, and the monotonic clamp.
//!
//! | status | `progress` | published |
//! |---|---|---|
//! | `processing` | 0 | when the task is claimed |
//! | `downloading` | 1 → 5 | before each input (image at 1, audio at 3) |
//! | `face_detecting` | 5 → 10 | before face detection and audio decoding (5), when ready for the GPU (10) |
//! | `inference` | 10 → 86 | start (10), then after every UNet call (coalesced when Redis is slow) |
//! | `inference` | 86 → 90 | while the VAE decodes frames (every 5 % of the frames) |
//! | `merging_audio` | 90 → 97 | when the frames are done and the audio is muxed in |
//! | `uploading` | 97 | before the upload (the protocol's own status; clients ignore unknown ones) |
//! | `completed` | 100 | with `video_file_id` |
//!
//! The value never decreases within one attempt ([`Monotonic`]). A requeued task starts over
//! at 0 in its next attempt.

use std::time::{Duration, Instant};

/// `downloading` starts here.
pub const DOWNLOAD_START: f32 = 1.0;
/// The audio download starts here.
pub const DOWNLOAD_AUDIO: f32 = 3.0;
/// `face_detecting` starts here.
pub const FACE_START: f32 = 5.0;
/// Inputs ready; inference starts here.
pub const INFERENCE_START: f32 = 10.0;
/// The UNet calls end and the VAE decode starts here.
pub const DECODE_START: f32 = 86.0;
/// `merging_audio` starts here.
pub const MERGE_START: f32 = 90.0;
/// `uploading` starts here.
pub const UPLOAD_START: f32 = 97.0;

/// What the engine reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineProgress {
    /// A phase without a count started (e.g. `"computing the audio features"`).
    Phase(&'static str),
    /// A UNet call finished: `done` of `total` calls, in denoising step `step` (1-based) of
    /// `steps`, context window `window` (1-based) of `windows`.
    Unet {
        /// UNet calls finished.
        done: u64,
        /// UNet calls in the whole run.
        total: u64,
        /// Current denoising step, 1-based.
        step: u32,
        /// Denoising steps.
        steps: u32,
        /// Current context window, 1-based.
        window: u32,
        /// Context windows per step.
        windows: u32,
    },
    /// `done` of `total` frames decoded by the VAE.
    Decoded {
        /// Frames decoded.
        done: u64,
        /// Frames in the video.
        total: u64,
    },
}

/// Clamps a task's progress so it never goes down.
#[derive(Debug, Clone, Copy, Default)]
pub struct Monotonic {
    last: f32,
}

impl Monotonic {
    /// `max(previous, p)`, clamped into 0..=100.
    pub fn next(&mut self, p: f32) -> f32 {
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 100.0) };
        self.last = self.last.max(p);
        self.last
    }

    /// The last value handed out.
    pub fn last(&self) -> f32 {
        self.last
    }
}

/// Estimates the time left from the pace of the UNet calls so far (the first call is excluded
/// from the rate: it includes one-off work such as the audio encoder and the reference UNet).
#[derive(Debug, Clone)]
pub struct Eta {
    first: Option<(Instant, u64)>,
}

impl Default for Eta {
    fn default() -> Self {
        Self::new()
    }
}

impl Eta {
    /// A new estimator.
    pub fn new() -> Self {
        Eta { first: None }
    }

    /// Seconds left after `done` of `total` calls at `now`, once two calls have been seen.
    pub fn update(&mut self, now: Instant, done: u64, total: u64) -> Option<Duration> {
        let (t0, d0) = *self.first.get_or_insert((now, done));
        if done <= d0 {
            return None;
        }
        let per_call = now.duration_since(t0).as_secs_f64() / (done - d0) as f64;
        Some(Duration::from_secs_f64(
            per_call * total.saturating_sub(done) as f64,
        ))
    }
}

/// `progress` for an engine report.
pub fn inference_progress(p: &EngineProgress) -> f32 {
    let frac = |done: u64, total: u64| {
        if total == 0 {
            1.0
        } else {
            (done.min(total) as f64 / total as f64) as f32
        }
    };
    match *p {
        EngineProgress::Unet { done, total, .. } => {
            INFERENCE_START + (DECODE_START - INFERENCE_START) * frac(done, total)
        }
        EngineProgress::Decoded { done, total } => {
            DECODE_START + (MERGE_START - DECODE_START) * frac(done, total)
        }
        EngineProgress::Phase(_) => INFERENCE_START,
    }
}

/// Formats a duration as `42 s`, `3 min 05 s` or `1 h 02 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// The `message` of an inference event, e.g.
/// `denoising step 3/25, window 2/4 (UNet call 10/100), about 42 s left`.
pub fn inference_message(p: &EngineProgress, eta: Option<Duration>) -> String {
    let mut m = match *p {
        EngineProgress::Unet {
            done,
            total,
            step,
            steps,
            window,
            windows,
        } => format!(
            "denoising step {step}/{steps}, window {window}/{windows} (UNet call {done}/{total})"
        ),
        EngineProgress::Decoded { done, total } => format!("decoding frame {done}/{total}"),
        EngineProgress::Phase(what) => what.to_owned(),
    };
    if let Some(eta) = eta {
        m.push_str(&format!(", about {} left", human(eta)));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_never_goes_down() {
        let mut m = Monotonic::default();
        assert_eq!(m.next(5.0), 5.0);
        assert_eq!(m.next(3.0), 5.0);
        assert_eq!(m.next(f32::NAN), 5.0);
        assert_eq!(m.next(150.0), 100.0);
        assert_eq!(m.last(), 100.0);
    }

    #[test]
    fn inference_band() {
        let unet = |done| EngineProgress::Unet {
            done,
            total: 100,
            step: 1,
            steps: 25,
            window: 1,
            windows: 4,
        };
        assert_eq!(inference_progress(&unet(0)), INFERENCE_START);
        assert_eq!(inference_progress(&unet(100)), DECODE_START);
        assert_eq!(inference_progress(&unet(200)), DECODE_START);
        let dec = EngineProgress::Decoded {
            done: 10,
            total: 10,
        };
        assert_eq!(inference_progress(&dec), MERGE_START);
        let mut prev = 0.0;
        for d in 0..=100 {
            let p = inference_progress(&unet(d));
            assert!(p >= prev);
            prev = p;
        }
    }

    #[test]
    fn eta_from_pace_excluding_first_call() {
        let mut eta = Eta::new();
        let t0 = Instant::now();
        assert_eq!(eta.update(t0, 1, 11), None);
        // 2 s per call afterwards; 5 calls left after call 6.
        let left = eta.update(t0 + Duration::from_secs(10), 6, 11).unwrap();
        assert!((left.as_secs_f64() - 10.0).abs() < 1e-6, "{left:?}");
    }

    #[test]
    fn messages() {
        let p = EngineProgress::Unet {
            done: 10,
            total: 100,
            step: 3,
            steps: 25,
            window: 2,
            windows: 4,
        };
        assert_eq!(
            inference_message(&p, Some(Duration::from_secs(125))),
            "denoising step 3/25, window 2/4 (UNet call 10/100), about 2 min 05 s left"
        );
        assert_eq!(human(Duration::from_secs(3720)), "1 h 02 min");
    }
}
