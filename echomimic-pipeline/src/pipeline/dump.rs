//! Collecting the intermediate tensors of a generation into a safetensors
//! file laid out like the golden `pipeline.safetensors` (debugging and
//! parity checks against the reference implementation).
//!
//! [`super::EchoMimicPipeline::generate_with_dump`] hands every named tensor
//! to a hook; [`TensorDump::record`] is such a hook. Decoded frames arrive one
//! at a time as `video.frame{i}` (`[1, 3, H, W]`) and are stacked into `video`
//! (`[1, 3, F, H, W]`) when the dump is written; the RGB bytes handed to the
//! frame sink can be added with [`TensorDump::record_rgb_frame`] and become
//! `frames_uint8` (`[F, H, W, 3]`). Holding every frame is what the debug
//! dump is for; a normal generation never does it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{PipelineError, Result};

/// Name prefix of the per-frame decoded tensors the pipeline emits.
pub const VIDEO_FRAME_PREFIX: &str = "video.frame";

/// How far two `uint8` frame tensors of the same shape are apart, in 8-bit
/// levels: the figures a parity check of `frames_uint8` judges (float
/// rounding before the `u8` truncation moves a few values by one level).
///
/// Test support, not part of the pipeline: compiled only with the
/// `test-support` feature (the crate's own tests enable it).
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameDiff {
    /// Values compared.
    pub values: usize,
    /// Largest difference.
    pub max_levels: u8,
    /// Values that differ at all.
    pub differing: usize,
    /// Values that differ by more than one level.
    pub over_one: usize,
    /// Mean difference over all values.
    pub mean_levels: f64,
}

#[cfg(any(test, feature = "test-support"))]
impl FrameDiff {
    /// Compares `got` with `want`; both must be `u8` tensors of one shape.
    pub fn between(got: &Tensor, want: &Tensor) -> Result<Self> {
        if got.dims() != want.dims() || got.dtype() != DType::U8 || want.dtype() != DType::U8 {
            return Err(PipelineError::InvalidInput(format!(
                "frames to compare must be u8 tensors of one shape: {:?} {:?} vs {:?} {:?}",
                got.dims(),
                got.dtype(),
                want.dims(),
                want.dtype()
            )));
        }
        let g = got.flatten_all()?.to_vec1::<u8>()?;
        let w = want.flatten_all()?.to_vec1::<u8>()?;
        let mut diff = Self {
            values: g.len(),
            max_levels: 0,
            differing: 0,
            over_one: 0,
            mean_levels: 0.0,
        };
        let mut sum = 0u64;
        for (a, b) in g.iter().zip(&w) {
            let d = a.abs_diff(*b);
            diff.max_levels = diff.max_levels.max(d);
            diff.differing += usize::from(d > 0);
            diff.over_one += usize::from(d > 1);
            sum += u64::from(d);
        }
        diff.mean_levels = sum as f64 / g.len().max(1) as f64;
        Ok(diff)
    }

    /// Share of the values that differ.
    pub fn fraction(&self) -> f64 {
        self.differing as f64 / self.values.max(1) as f64
    }
}

#[cfg(any(test, feature = "test-support"))]
impl std::fmt::Display for FrameDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max |ours - golden| = {}, {} of {} values differ ({:.2e}), {} by more than 1, mean {:.2e} levels",
            self.max_levels,
            self.differing,
            self.values,
            self.fraction(),
            self.over_one,
            self.mean_levels
        )
    }
}

/// Tensors of one generation, converted to what the golden file stores:
/// floating tensors as `f32`, integer ones as `i64`, frames as `u8`, on the CPU.
#[derive(Debug, Default)]
pub struct TensorDump {
    tensors: BTreeMap<String, Tensor>,
    video: Vec<Tensor>,
    rgb: Vec<u8>,
    rgb_frames: usize,
    rgb_size: Option<(u32, u32)>,
}

impl TensorDump {
    /// An empty dump.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `tensor` under `name` (a later tensor with the same name
    /// replaces it). `video.frame{i}` tensors must arrive in frame order.
    pub fn record(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        let t = tensor.to_device(&Device::Cpu)?;
        let t = match t.dtype() {
            DType::F16 | DType::BF16 | DType::F64 | DType::F32 => t.to_dtype(DType::F32)?,
            DType::U8 => t,
            _ => t.to_dtype(DType::I64)?,
        };
        if let Some(index) = name.strip_prefix(VIDEO_FRAME_PREFIX) {
            let index: usize = index.parse().map_err(|_| {
                PipelineError::InvalidInput(format!("bad frame tensor name `{name}`"))
            })?;
            if index != self.video.len() {
                return Err(PipelineError::InvalidInput(format!(
                    "video frame {index} recorded after {} frames",
                    self.video.len()
                )));
            }
            self.video.push(t);
        } else {
            self.tensors.insert(name.to_owned(), t);
        }
        Ok(())
    }

    /// Records the RGB24 bytes of frame `index` as handed to the frame sink.
    pub fn record_rgb_frame(
        &mut self,
        index: usize,
        rgb: &[u8],
        width: u32,
        height: u32,
    ) -> Result<()> {
        if index != self.rgb_frames {
            return Err(PipelineError::InvalidInput(format!(
                "rgb frame {index} recorded after {} frames",
                self.rgb_frames
            )));
        }
        if *self.rgb_size.get_or_insert((width, height)) != (width, height)
            || rgb.len() != width as usize * height as usize * 3
        {
            return Err(PipelineError::InvalidInput(format!(
                "rgb frame {index} has {} bytes for {width}x{height}, or another size than frame 0",
                rgb.len()
            )));
        }
        self.rgb.extend_from_slice(rgb);
        self.rgb_frames += 1;
        Ok(())
    }

    /// The collected tensors, with `video` and `frames_uint8` assembled.
    pub fn into_tensors(self) -> Result<HashMap<String, Tensor>> {
        let mut out: HashMap<String, Tensor> = self.tensors.into_iter().collect();
        if !self.video.is_empty() {
            // [1, 3, H, W] per frame -> [1, 3, F, H, W]
            out.insert("video".into(), Tensor::stack(&self.video, 2)?);
        }
        if let Some((w, h)) = self.rgb_size {
            let frames = Tensor::from_vec(
                self.rgb,
                (self.rgb_frames, h as usize, w as usize, 3),
                &Device::Cpu,
            )?;
            out.insert("frames_uint8".into(), frames);
        }
        Ok(out)
    }

    /// Writes the tensors to a safetensors file.
    pub fn save(self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tensors = self.into_tensors()?;
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| PipelineError::io(path, std::io::Error::other(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_diff_counts_levels_and_rejects_mismatches() -> Result<()> {
        let dev = Device::Cpu;
        let want = Tensor::from_vec(vec![0u8, 10, 20, 255], (1, 2, 2), &dev)?;
        let got = Tensor::from_vec(vec![0u8, 11, 17, 255], (1, 2, 2), &dev)?;
        let d = FrameDiff::between(&got, &want)?;
        assert_eq!(
            (d.values, d.max_levels, d.differing, d.over_one),
            (4, 3, 2, 1)
        );
        assert_eq!(d.mean_levels, 1.0);
        assert_eq!(d.fraction(), 0.5);
        assert!(d.to_string().starts_with("max |ours - golden| = 3, 2 of 4"));
        let same = FrameDiff::between(&want, &want)?;
        assert_eq!((same.max_levels, same.differing), (0, 0));
        let other_shape = want.reshape((2, 2))?;
        assert!(FrameDiff::between(&other_shape, &want).is_err());
        let floats = want.to_dtype(DType::F32)?;
        assert!(FrameDiff::between(&floats, &floats).is_err());
        Ok(())
    }

    #[test]
    fn frames_are_stacked_and_dtypes_converted() -> Result<()> {
        let dev = Device::Cpu;
        let mut dump = TensorDump::new();
        dump.record("a", &Tensor::ones((2, 2), DType::F16, &dev)?)?;
        dump.record("n", &Tensor::new(&[3u32, 4], &dev)?)?;
        for i in 0..3 {
            let frame = Tensor::full(i as f32, (1, 3, 2, 2), &dev)?;
            dump.record(&format!("{VIDEO_FRAME_PREFIX}{i}"), &frame)?;
            dump.record_rgb_frame(i, &[i as u8; 12], 2, 2)?;
        }
        assert!(dump
            .record(
                &format!("{VIDEO_FRAME_PREFIX}7"),
                &Tensor::zeros((1, 3, 2, 2), DType::F32, &dev)?
            )
            .is_err());
        assert!(dump.record_rgb_frame(3, &[0; 11], 2, 2).is_err());
        let t = dump.into_tensors()?;
        assert_eq!(t["a"].dtype(), DType::F32);
        assert_eq!(t["n"].dtype(), DType::I64);
        assert_eq!(t["video"].dims(), &[1, 3, 3, 2, 2]);
        let v = t["video"].to_dtype(DType::F32)?;
        assert_eq!(
            v.narrow(2, 2, 1)?.flatten_all()?.to_vec1::<f32>()?,
            vec![2.0; 12]
        );
        assert_eq!(t["frames_uint8"].dims(), &[3, 2, 2, 3]);
        assert_eq!(t["frames_uint8"].dtype(), DType::U8);
        Ok(())
    }
}
