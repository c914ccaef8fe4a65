//! Context windows of the sampler (EchoMimic `src/pipelines/context.py`,
//! `uniform` scheduler as the pipelines call it).
//!
//! Long videos are denoised in overlapping windows of `context_frames` frames.
//! With the arguments the pipelines pass (`step = 0`, `context_stride = 1`,
//! `closed_loop = true`) the windows start at `0, s, 2s, …` (`s =
//! context_frames − context_overlap`) while the start is below the frame
//! count, and wrap around the end of the video. At denoising step `i` every
//! index is shifted by `2·i` modulo the frame count, so the seams move from
//! step to step. When the video is no longer than one window, the single
//! window is the whole (shifted) video.

/// Frame-index windows before the per-step rotation.
///
/// Returns an error message when the sizes are inconsistent (no frames, a
/// zero-sized window or an overlap that is not smaller than the window).
pub fn uniform_windows(
    num_frames: usize,
    context_frames: usize,
    context_overlap: usize,
) -> Result<Vec<Vec<usize>>, String> {
    if num_frames == 0 {
        return Err("the video has no frames".into());
    }
    if context_frames == 0 {
        return Err("context_frames must be at least 1".into());
    }
    if num_frames <= context_frames {
        return Ok(vec![(0..num_frames).collect()]);
    }
    if context_overlap >= context_frames {
        return Err(format!(
            "context_overlap ({context_overlap}) must be smaller than context_frames ({context_frames})"
        ));
    }
    let stride = context_frames - context_overlap;
    Ok((0..num_frames)
        .step_by(stride)
        .map(|start| {
            (start..start + context_frames)
                .map(|e| e % num_frames)
                .collect()
        })
        .collect())
}

/// The windows used at denoising step `step`: every index shifted by
/// `2·step` modulo `num_frames`.
pub fn rotate_windows(windows: &[Vec<usize>], step: usize, num_frames: usize) -> Vec<Vec<usize>> {
    let shift = (2 * step) % num_frames.max(1);
    windows
        .iter()
        .map(|w| w.iter().map(|&c| (c + shift) % num_frames).collect())
        .collect()
}

/// How many windows cover each frame (the divisor of the window averaging).
pub fn coverage(windows: &[Vec<usize>], num_frames: usize) -> Vec<usize> {
    let mut count = vec![0; num_frames];
    for w in windows {
        for &i in w {
            count[i] += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_examples() {
        let w = uniform_windows(13, 12, 3).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0], (0..12).collect::<Vec<_>>());
        assert_eq!(w[1], vec![9, 10, 11, 12, 0, 1, 2, 3, 4, 5, 6, 7]);
        let w = uniform_windows(242, 12, 3).unwrap();
        assert_eq!(w.len(), 27);
        assert_eq!(
            w[26],
            vec![234, 235, 236, 237, 238, 239, 240, 241, 0, 1, 2, 3]
        );
        assert_eq!(w.len(), 242usize.div_ceil(9));
    }

    #[test]
    fn short_video_is_one_rotated_window() {
        let w = uniform_windows(5, 12, 3).unwrap();
        assert_eq!(w, vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(rotate_windows(&w, 1, 5), vec![vec![2, 3, 4, 0, 1]]);
        assert_eq!(coverage(&w, 5), vec![1; 5]);
    }

    #[test]
    fn every_frame_is_covered() {
        for n in [1, 7, 12, 13, 20, 100, 242] {
            let w = uniform_windows(n, 12, 3).unwrap();
            for step in 0..4 {
                let r = rotate_windows(&w, step, n);
                assert!(coverage(&r, n).iter().all(|&c| c >= 1), "n={n} step={step}");
            }
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert!(uniform_windows(0, 12, 3).is_err());
        assert!(uniform_windows(20, 0, 0).is_err());
        assert!(uniform_windows(20, 4, 4).is_err());
    }
}
