//! Which ffmpeg program to run: one rule for the audio decoders and the video encoder.
//! A leaf module (it uses nothing of this crate), so both can depend on it.

use std::path::{Path, PathBuf};

/// Environment variable naming the ffmpeg program (default: `ffmpeg` on `PATH`).
pub const FFMPEG_ENV: &str = "ECHOMIMIC_FFMPEG";

/// The ffmpeg program to run: `explicit`, else [`FFMPEG_ENV`], else `ffmpeg`.
pub fn resolve_ffmpeg(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(FFMPEG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from("ffmpeg"),
    }
}
