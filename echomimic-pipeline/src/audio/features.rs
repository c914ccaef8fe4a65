//! Whisper features of a waveform: log-mel, 30 s segments, encoder stack
//! (`Audio2Feature.audio2feat` of the reference).

use std::io::BufReader;
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::mel::{LogMel, MelSpectrogram};
use crate::error::{PipelineError, Result};
use crate::models::whisper::{AudioEncoder, ModelDimensions, N_FRAMES};
use crate::weights::Checkpoint;

/// Key of the state dict inside an OpenAI Whisper checkpoint.
const STATE_KEY: &str = "model_state_dict";
/// Key of the model dimensions inside an OpenAI Whisper checkpoint.
const DIMS_KEY: &str = "dims";

fn weights_err(path: &Path, key: Option<&str>, message: impl Into<String>) -> PipelineError {
    PipelineError::Weights {
        path: path.to_path_buf(),
        key: key.map(str::to_owned),
        message: message.into(),
    }
}

/// Reads `dims` from an OpenAI Whisper checkpoint (`torch.save` zip pickle of
/// `{"dims": {...}, "model_state_dict": {...}}`). The head count is not
/// inferable from the weight shapes, so it has to come from here.
pub fn read_model_dimensions(path: impl AsRef<Path>) -> Result<ModelDimensions> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(PipelineError::MissingFile(path.to_path_buf()));
    }
    let file = std::fs::File::open(path).map_err(|e| PipelineError::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        weights_err(
            path,
            None,
            format!(
                "not a PyTorch zip checkpoint ({e}); re-save it with torch.save from torch >= 1.6"
            ),
        )
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|name| name.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| weights_err(path, None, "no data.pkl inside the checkpoint"))?;
    let entry = zip
        .by_name(&pkl_name)
        .map_err(|e| weights_err(path, None, format!("cannot open {pkl_name}: {e}")))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut BufReader::new(entry))
        .map_err(|e| weights_err(path, None, format!("cannot parse {pkl_name}: {e}")))?;
    let root = stack
        .finalize()
        .map_err(|e| weights_err(path, None, format!("cannot parse {pkl_name}: {e}")))?;
    let dims = dict_get(root, DIMS_KEY).ok_or_else(|| {
        weights_err(
            path,
            Some(DIMS_KEY),
            "not an OpenAI Whisper checkpoint: no `dims` entry",
        )
    })?;
    let Object::Dict(entries) = dims else {
        return Err(weights_err(path, Some(DIMS_KEY), "`dims` is not a dict"));
    };
    let field = |name: &str| -> Result<usize> {
        let value = entries
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == name))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| weights_err(path, Some(DIMS_KEY), format!("`dims` has no `{name}`")))?;
        let n = value.int_or_long().map_err(|v| {
            weights_err(
                path,
                Some(DIMS_KEY),
                format!("`{name}` is not an integer: {v:?}"),
            )
        })?;
        usize::try_from(n)
            .map_err(|_| weights_err(path, Some(DIMS_KEY), format!("`{name}` is negative: {n}")))
    };
    let dims = ModelDimensions {
        n_mels: field("n_mels")?,
        n_audio_ctx: field("n_audio_ctx")?,
        n_audio_state: field("n_audio_state")?,
        n_audio_head: field("n_audio_head")?,
        n_audio_layer: field("n_audio_layer")?,
        n_vocab: field("n_vocab")?,
        n_text_ctx: field("n_text_ctx")?,
        n_text_state: field("n_text_state")?,
        n_text_head: field("n_text_head")?,
        n_text_layer: field("n_text_layer")?,
    };
    dims.validate()
        .map_err(|m| weights_err(path, Some(DIMS_KEY), m))?;
    Ok(dims)
}

/// The value under a string key of a pickled dict.
fn dict_get(obj: Object, key: &str) -> Option<Object> {
    match obj {
        Object::Dict(entries) => entries
            .into_iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// Turns 16 kHz speech into Whisper features: the reference's
/// `Audio2Feature.audio2feat`.
///
/// ```no_run
/// # use echomimic_pipeline::audio::{self, AudioFeatureExtractor, AudioLimits};
/// # use candle_core::{DType, Device};
/// # fn main() -> echomimic_pipeline::Result<()> {
/// let extractor = AudioFeatureExtractor::load(
///     "pretrained_weights/audio_processor/whisper_tiny.pt",
///     DType::F32,
///     &Device::Cpu,
/// )?;
/// let wave = audio::load_waveform_16k("speech.mp3", &AudioLimits::default())?;
/// let features = extractor.features(&wave)?; // [N, L+1, D]
/// let windows = audio::whisper_chunks(&features, 24.0)?; // [frames, 10(L+1), D]
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AudioFeatureExtractor {
    encoder: AudioEncoder,
    mel: MelSpectrogram,
    device: Device,
}

impl AudioFeatureExtractor {
    /// Loads an OpenAI-format Whisper checkpoint (`dims` from its pickle, the
    /// encoder tensors from `model_state_dict`) with weights in `dtype` on
    /// `device`. Use f32 on CPU; f16 on CUDA matches the reference's CUDA run
    /// (LayerNorm and softmax stay f32).
    pub fn load(whisper_path: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let path = whisper_path.as_ref();
        let dims = read_model_dimensions(path)?;
        let checkpoint = Checkpoint::load_with_state_key(path, Some(STATE_KEY))?;
        Self::from_checkpoint(&dims, &checkpoint, dtype, device)
    }

    /// Builds the extractor from tensors already loaded (OpenAI key names,
    /// `encoder.` prefix).
    pub fn from_checkpoint(
        dims: &ModelDimensions,
        checkpoint: &Checkpoint,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = checkpoint.var_builder(dtype, device);
        let encoder = AudioEncoder::new(vb.pp("encoder"), dims).map_err(|e| {
            let path = checkpoint.files().first().cloned().unwrap_or_default();
            PipelineError::Weights {
                path,
                key: None,
                message: format!("whisper encoder: {e}"),
            }
        })?;
        checkpoint.check_complete()?;
        Ok(Self::new(encoder, device))
    }

    /// Builds the extractor from any `VarBuilder` rooted at the checkpoint
    /// root (for example a random `VarMap` in benchmarks).
    pub fn from_var_builder(vb: VarBuilder<'_>, dims: &ModelDimensions) -> Result<Self> {
        let device = vb.device().clone();
        let encoder = AudioEncoder::new(vb.pp("encoder"), dims)?;
        Ok(Self::new(encoder, &device))
    }

    fn new(encoder: AudioEncoder, device: &Device) -> Self {
        let mel = MelSpectrogram::new(encoder.dims().n_mels);
        Self {
            encoder,
            mel,
            device: device.clone(),
        }
    }

    /// The checkpoint's dimensions.
    pub fn dims(&self) -> &ModelDimensions {
        self.encoder.dims()
    }

    /// The device the encoder runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Log-mel spectrogram of a 16 kHz waveform (whole clip, global max).
    pub fn log_mel(&self, waveform_16k: &[f32]) -> Result<LogMel> {
        self.mel.compute(waveform_16k)
    }

    /// Whisper features `[N, L+1, D]` of a 16 kHz mono waveform (values in
    /// [−1, 1]), in the encoder's dtype and on its device; N = Σ over 30 s
    /// segments of ⌊segment frames / 2⌋ ≈ samples / 320.
    pub fn features(&self, waveform_16k: &[f32]) -> Result<Tensor> {
        let mel = self.log_mel(waveform_16k)?;
        self.features_from_mel(&mel)
    }

    /// [`features`](Self::features) from an already computed log-mel.
    pub fn features_from_mel(&self, mel: &LogMel) -> Result<Tensor> {
        if mel.n_mels() != self.dims().n_mels {
            return Err(PipelineError::InvalidInput(format!(
                "log-mel has {} bands, the whisper checkpoint expects {}",
                mel.n_mels(),
                self.dims().n_mels
            )));
        }
        let mut parts = Vec::new();
        for (start, len) in mel.segments() {
            if len / 2 == 0 {
                // A trailing 10 ms frame gives no 50 Hz row; skip the encoder.
                continue;
            }
            // 1. One 30 s segment, zero-padded in the log-mel domain.
            let segment = Tensor::from_vec(
                mel.segment_padded(start),
                (1, mel.n_mels(), N_FRAMES),
                &self.device,
            )?;
            // 2. Encoder stack (1, 1500, L+1, D); keep the rows of real audio.
            let stack = self.encoder.forward_embeddings(&segment)?;
            parts.push(stack.squeeze(0)?.narrow(0, 0, len / 2)?);
        }
        // 3. Concatenate the segments along time.
        Ok(Tensor::cat(&parts, 0)?)
    }
}
