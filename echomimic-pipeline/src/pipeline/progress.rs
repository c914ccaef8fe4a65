//! Progress events and the frame sink of a generation.

use std::fmt;

use crate::error::Result;
use crate::video::VideoWriter;

/// The stages of a generation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Photo decoding, face detection, mask and crop (skipped for a prepared crop).
    Face,
    /// Audio decoding, log-mel, Whisper encoder, per-frame windows.
    AudioFeatures,
    /// Initial noise, face locator, VAE encode of the reference, reference
    /// UNet and bank preparation.
    Reference,
    /// The DDIM loop over the context windows.
    Denoising,
    /// VAE decode of each frame.
    Decoding,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Face => "face",
            Self::AudioFeatures => "audio features",
            Self::Reference => "reference",
            Self::Denoising => "denoising",
            Self::Decoding => "decoding",
        })
    }
}

/// A progress event. Counts are 1-based "done" counts, strictly increasing
/// within a stage, so `done / total` is the stage's completed fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// A stage began.
    Stage(Stage),
    /// The size of the run is known (after the audio stage, before the
    /// reference stage).
    Plan {
        /// Frames to generate: `min(L, audio_frames)`.
        frames: usize,
        /// Frames the whole audio drives.
        audio_frames: usize,
        /// Denoising-UNet calls to make (`steps × windows`).
        unet_calls: usize,
    },
    /// A denoising-UNet call finished.
    UnetCall {
        /// Step index, `0..steps`.
        step: usize,
        /// DDIM steps in the run.
        steps: usize,
        /// Window index within the step, `0..windows`.
        window: usize,
        /// Context windows per step.
        windows: usize,
        /// UNet calls finished so far, `1..=total`.
        done: usize,
        /// UNet calls in the run (`steps × windows`).
        total: usize,
    },
    /// A frame was decoded and handed to the sink.
    Frame {
        /// Frames handed out so far, `1..=total`.
        done: usize,
        /// Frames in the video.
        total: usize,
    },
}

impl Progress {
    /// `(done, total)` of the counting events, `None` for the others.
    pub fn counts(&self) -> Option<(usize, usize)> {
        match *self {
            Self::Stage(_) | Self::Plan { .. } => None,
            Self::UnetCall { done, total, .. } | Self::Frame { done, total } => Some((done, total)),
        }
    }
}

/// Receives the generated frames, in order, as soon as each one is decoded;
/// the pipeline holds at most one round of VAE calls' frames (a few small
/// frames, one large one:
/// [`EchoMimicPipeline::decode_plan`](super::EchoMimicPipeline::decode_plan)).
///
/// Implemented for closures `FnMut(usize, &[u8]) -> Result<()>` and for
/// [`VideoWriter`]. An error stops the generation and is returned by it.
pub trait FrameSink {
    /// Frame `index` (0-based): `width × height × 3` bytes of RGB24, rows top
    /// to bottom.
    fn frame(&mut self, index: usize, rgb: &[u8]) -> Result<()>;
}

impl<F> FrameSink for F
where
    F: FnMut(usize, &[u8]) -> Result<()>,
{
    fn frame(&mut self, index: usize, rgb: &[u8]) -> Result<()> {
        self(index, rgb)
    }
}

impl FrameSink for VideoWriter {
    fn frame(&mut self, _index: usize, rgb: &[u8]) -> Result<()> {
        self.write_frame(rgb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_events() {
        assert_eq!(Progress::Stage(Stage::Face).counts(), None);
        let call = Progress::UnetCall {
            step: 1,
            steps: 3,
            window: 0,
            windows: 4,
            done: 5,
            total: 12,
        };
        assert_eq!(call.counts(), Some((5, 12)));
        assert_eq!(Progress::Frame { done: 2, total: 9 }.counts(), Some((2, 9)));
        assert_eq!(Stage::AudioFeatures.to_string(), "audio features");
    }

    #[test]
    fn closures_are_frame_sinks() {
        let mut seen = Vec::new();
        let mut sink = |i: usize, rgb: &[u8]| -> Result<()> {
            seen.push((i, rgb.len()));
            Ok(())
        };
        sink.frame(0, &[0; 12]).unwrap();
        sink.frame(1, &[0; 12]).unwrap();
        assert_eq!(seen, vec![(0, 12), (1, 12)]);
    }
}
