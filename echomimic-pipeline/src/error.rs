//! The error type of the pipeline crate.

use std::path::PathBuf;

/// Convenience alias used throughout the crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

/// What went wrong while decoding or validating an audio input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AudioError {
    /// The file holds no samples at all.
    #[error("audio is empty")]
    Empty,
    /// Every sample is (near) zero: there is no speech to drive the face.
    #[error("audio is silent (peak amplitude {peak:.2e})")]
    Silent {
        /// Largest absolute sample value in [0, 1].
        peak: f32,
    },
    /// The container or codec is not one we can decode.
    #[error("unsupported audio format: {0}")]
    Unsupported(String),
    /// The bytes could not be decoded.
    #[error("corrupt audio: {0}")]
    Corrupt(String),
    /// Longer than the configured limit.
    #[error("audio is {seconds:.1} s long, the limit is {max_seconds:.1} s")]
    TooLong {
        /// Duration of the input.
        seconds: f64,
        /// Configured maximum.
        max_seconds: f64,
    },
    /// Too short to give a single 50 Hz Whisper feature row (and so a single
    /// video frame).
    #[error("audio is {seconds:.3} s long, at least {min_seconds:.3} s is needed")]
    TooShort {
        /// Duration of the input (at 16 kHz).
        seconds: f64,
        /// The minimum.
        min_seconds: f64,
    },
}

/// Errors of the pipeline crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A config file (json / yaml) could not be read or parsed.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A weights file could not be read, or a tensor in it is wrong.
    #[error("weights {path}{}: {message}", key.as_ref().map(|k| format!(" (key `{k}`)")).unwrap_or_default())]
    Weights {
        /// The file.
        path: PathBuf,
        /// The offending tensor key, when one is known.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// Tensors the model needs are absent from the checkpoint files.
    #[error("{} weight(s) missing from {}: {}", keys.len(), files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "), preview(keys))]
    MissingKeys {
        /// The files that were searched.
        files: Vec<PathBuf>,
        /// The keys that none of them holds.
        keys: Vec<String>,
    },
    /// A file the model layout requires does not exist.
    #[error("missing file {0}")]
    MissingFile(PathBuf),
    /// Tensor arithmetic failed (shape mismatch, device error, out of memory, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The audio input is unusable.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// The reference image could not be decoded or is unusable.
    #[error("image: {0}")]
    Image(String),
    /// No face with enough confidence was found in the reference image.
    #[error("no face detected in the reference image{}", best.map(|p| format!(" (best candidate confidence {p:.2})")).unwrap_or_default())]
    NoFace {
        /// Confidence of the best rejected candidate, if any.
        best: Option<f32>,
    },
    /// A request parameter is out of range or inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The caller asked to stop (cancel flag set) between UNet calls.
    #[error("cancelled")]
    Cancelled,
    /// Video encoding or muxing failed.
    #[error("media: {0}")]
    Media(String),
    /// The requested compute device cannot be used (no CUDA in this build, no
    /// usable GPU, bad ordinal).
    #[error("device `{requested}`: {reason}")]
    Device {
        /// The device that was asked for (`cuda:0`, ...).
        requested: String,
        /// Why it cannot be used.
        reason: String,
        /// The driver / candle error behind it, when there is one.
        #[source]
        source: Option<Box<candle_core::Error>>,
    },
    /// Plain I/O on a path.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

fn preview(keys: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = keys
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", keys.len() - SHOWN));
    }
    s
}

impl PipelineError {
    /// True when the input (image, audio, request) is at fault, so retrying the
    /// same task cannot help.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Audio(_) | Self::Image(_) | Self::NoFace { .. } | Self::InvalidInput(_)
        )
    }

    /// Helper to attach a path to an I/O error.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
