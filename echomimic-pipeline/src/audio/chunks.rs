//! Per-video-frame windows of Whisper features (`Audio2Feature.feature2chunks`
//! with `audio_feat_length = [2, 2]`).
//!
//! For video frame `i` at `fps` frames per second:
//!
//! * centre row `c = int(i * 50 / fps)` — the Python expression multiplies the
//!   integer `i` by 50 first and then does a float division by `fps`;
//! * rows `c − 4 … c + 5` (10 rows), each clamped to `[0, N − 1]`;
//! * flattened `[row][layer]`: `[10 · (L+1), D]`, token `(L+1)·t + layer`.
//!
//! The loop emits frames `i = 0, 1, …` and stops after the first `i` whose
//! `int(i * (50.0 / fps))` exceeds `N` — note the different float expression,
//! `i` times the precomputed ratio — so the count is
//! `1 + min{ i : ⌊i · (50/fps)⌋ > N }` ≈ `fps · seconds + 2`.

use candle_core::Tensor;

use crate::error::{PipelineError, Result};

/// Frames per second when the caller gives none: the official scripts' and the
/// EchoMe worker's 24. The one definition; [`crate::pipeline::DEFAULT_FPS`] and
/// [`crate::video::DEFAULT_FPS`] re-export it.
pub const DEFAULT_FPS: f64 = 24.0;

/// Whisper feature rows per second (the encoder halves the 100 Hz mel rate).
pub const FEATURE_RATE: f64 = 50.0;
/// Feature rows taken before the centre row (`audio_feat_length[0] * 2`).
const ROWS_BEFORE: usize = 4;
/// Feature rows taken from the centre row on (`(audio_feat_length[1] + 1) * 2`).
const ROWS_FROM_CENTER: usize = 6;
/// Feature rows per video frame.
pub const ROWS_PER_FRAME: usize = ROWS_BEFORE + ROWS_FROM_CENTER;
/// Highest frame rate accepted; it bounds the number of windows (and memory).
pub const MAX_FPS: f64 = 1000.0;

fn check_fps(fps: f64) -> Result<()> {
    if !(fps.is_finite() && fps > 0.0 && fps <= MAX_FPS) {
        return Err(PipelineError::InvalidInput(format!(
            "fps must be in (0, {MAX_FPS}], got {fps}"
        )));
    }
    Ok(())
}

fn check_features(n_features: usize) -> Result<()> {
    if n_features == 0 {
        return Err(PipelineError::InvalidInput(
            "no audio feature rows (audio shorter than 20 ms)".to_owned(),
        ));
    }
    Ok(())
}

/// Number of video frames the audio drives: `1 + min{ i : ⌊i · (50/fps)⌋ > N }`.
///
/// 10.0 s of audio gives `N` = 500 and 242 frames at 24 fps, 252 at 25 fps.
/// Fails with [`PipelineError::InvalidInput`] for `N` = 0 or an fps outside
/// (0, [`MAX_FPS`]].
pub fn audio_frame_count(n_features: usize, fps: f64) -> Result<usize> {
    check_features(n_features)?;
    check_fps(fps)?;
    let step = FEATURE_RATE / fps;
    let n = n_features as f64;
    // The loop terminates: i · step grows without bound since step > 0.
    let mut i = 0usize;
    loop {
        if (i as f64 * step).floor() > n {
            return Ok(i + 1);
        }
        i += 1;
    }
}

/// Centre feature row of video frame `i`: Python `int(i * 50 / fps)`.
fn center_row(i: usize, fps: f64) -> i64 {
    ((i as f64 * FEATURE_RATE) / fps).floor() as i64
}

/// The clamped feature rows of every window, `[frames][10]`
/// (golden `audio.chunk_feature_indices`).
pub fn chunk_feature_indices(n_features: usize, fps: f64) -> Result<Vec<[usize; ROWS_PER_FRAME]>> {
    let count = audio_frame_count(n_features, fps)?;
    let last = n_features as i64 - 1;
    Ok((0..count)
        .map(|i| {
            let c = center_row(i, fps);
            std::array::from_fn(|k| (c - ROWS_BEFORE as i64 + k as i64).clamp(0, last) as usize)
        })
        .collect())
}

/// Per-video-frame audio tokens: `features` `[N, L+1, D]` (any dtype and
/// device) to `[frames, 10·(L+1), D]`, token `(L+1)·t + layer`, with
/// `frames` = [`audio_frame_count`].
///
/// This materialises every window (≈ 1.2 GB in f32 for 10 min at 25 fps with
/// Whisper tiny); use [`whisper_chunks_up_to`] when only the first frames are
/// rendered.
pub fn whisper_chunks(features: &Tensor, fps: f64) -> Result<Tensor> {
    whisper_chunks_up_to(features, fps, usize::MAX)
}

/// The first `min(frames, max_frames)` windows of [`whisper_chunks`] (the
/// reference's `whisper_chunks[:video_length]`), without building the rest.
pub fn whisper_chunks_up_to(features: &Tensor, fps: f64, max_frames: usize) -> Result<Tensor> {
    let (n, layers, dim) = features.dims3()?;
    let rows: Vec<u32> = chunk_feature_indices(n, fps)?
        .iter()
        .take(max_frames)
        .flatten()
        .map(|&r| r as u32)
        .collect();
    let frames = rows.len() / ROWS_PER_FRAME;
    if frames == 0 {
        return Err(PipelineError::InvalidInput(
            "max_frames is 0: no audio window requested".to_owned(),
        ));
    }
    let index = Tensor::from_vec(rows, frames * ROWS_PER_FRAME, features.device())?;
    let picked = features.contiguous()?.index_select(&index, 0)?;
    Ok(picked
        .reshape((frames, ROWS_PER_FRAME * layers, dim))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn frame_count_rule() -> Result<()> {
        // 10.0 s -> 1000 mel frames -> N = 500.
        assert_eq!(audio_frame_count(500, 24.0)?, 242);
        assert_eq!(audio_frame_count(500, 25.0)?, 252);
        // Golden public set: 1.5 s -> N = 75 at 24 fps -> 38 chunks.
        assert_eq!(audio_frame_count(75, 24.0)?, 38);
        // 29.97 fps: the loop compares floor(i * (50/29.97)) with N.
        let step = 50.0 / 29.97;
        let want = (0..)
            .find(|&i: &usize| (i as f64 * step).floor() > 500.0)
            .unwrap()
            + 1;
        assert_eq!(audio_frame_count(500, 29.97)?, want);
        assert_eq!(audio_frame_count(1, 50.0)?, 3);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e6] {
            assert!(audio_frame_count(10, bad).is_err(), "{bad}");
        }
        assert!(audio_frame_count(0, 24.0).is_err());
        Ok(())
    }

    #[test]
    fn indices_clamp_and_follow_python_float_order() -> Result<()> {
        let idx = chunk_feature_indices(75, 24.0)?;
        assert_eq!(idx.len(), 38);
        assert_eq!(idx[0], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
        // i = 37: centre int(37*50/24) = 77 -> rows 73..82 clamped to 74.
        assert_eq!(idx[37], [73, 74, 74, 74, 74, 74, 74, 74, 74, 74]);
        // fps where i*50/fps and i*(50/fps) round differently must use the former.
        for fps in [29.97, 23.976, 59.94, 12.5, 7.0] {
            let idx = chunk_feature_indices(10_000, fps)?;
            for (i, rows) in idx.iter().enumerate() {
                let c = ((i * 50) as f64 / fps).floor() as i64;
                assert_eq!(rows[4] as i64, c.clamp(0, 9_999), "fps {fps} frame {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn chunks_gather_rows_in_row_layer_order() -> Result<()> {
        // features[r, l, d] = 100 r + 10 l + d
        let (n, l, d) = (12usize, 3usize, 2usize);
        let vals: Vec<f32> = (0..n * l * d)
            .map(|i| {
                let (r, rem) = (i / (l * d), i % (l * d));
                (100 * r + 10 * (rem / d) + rem % d) as f32
            })
            .collect();
        let feats = Tensor::from_vec(vals, (n, l, d), &Device::Cpu)?;
        let chunks = whisper_chunks(&feats, 25.0)?;
        let count = audio_frame_count(n, 25.0)?;
        let first = whisper_chunks_up_to(&feats, 25.0, 5)?;
        assert_eq!(first.dims(), &[5, ROWS_PER_FRAME * l, d]);
        assert_eq!(
            first.to_vec3::<f32>()?,
            chunks.narrow(0, 0, 5)?.to_vec3::<f32>()?
        );
        assert_eq!(whisper_chunks_up_to(&feats, 25.0, 10_000)?.dim(0)?, count);
        assert!(whisper_chunks_up_to(&feats, 25.0, 0).is_err());
        assert_eq!(chunks.dims(), &[count, ROWS_PER_FRAME * l, d]);
        let idx = chunk_feature_indices(n, 25.0)?;
        let got = chunks.to_vec3::<f32>()?;
        for (f, rows) in idx.iter().enumerate() {
            for (t, &r) in rows.iter().enumerate() {
                for layer in 0..l {
                    let want: Vec<f32> =
                        (0..d).map(|c| (100 * r + 10 * layer + c) as f32).collect();
                    assert_eq!(got[f][t * l + layer], want);
                }
            }
        }
        Ok(())
    }
}
