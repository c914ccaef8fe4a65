//! Loading both UNets from the official files, unchanged (docs/model.md M1).
//!
//! * Reference UNet: `reference_unet.pth`, strict — every tensor the network
//!   needs must be present and the file must hold nothing else (the
//!   reference calls `load_state_dict(strict=True)`).
//! * Denoising UNet: for every key, the value in `denoising_unet*.pth` if
//!   present, else the one in `motion_module*.pth`, else the SD base UNet
//!   weight (`sd-image-variations-diffusers/unet/diffusion_pytorch_model.*`)
//!   when its shape matches — the effective result of the reference's
//!   `from_pretrained_2d` + `load_state_dict(strict=False)`. The base file is
//!   only read when the two EchoMimic files lack something (never for the
//!   released files). `pos_encoder.pe` buffers are recomputed, not read.
//!   Anything still missing fails with [`PipelineError::MissingKeys`]
//!   listing every such key: nothing is ever left randomly initialised.
//!
//! Weights are cast to the requested dtype while loading.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::{
    read_json, InferenceConfig, PromptConfig, UNet2DConditionConfig, UnetAdditionalKwargs,
};
use crate::error::{PipelineError, Result};
use crate::models::unet_2d_condition::{self, UNet2DConditionModel};
use crate::models::unet_3d::{self, UNet3DConditionModel};
use crate::weights::Checkpoint;

/// File names of the SD base UNet weights, in order of preference.
const BASE_UNET_WEIGHTS: [&str; 2] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
];

/// The files the denoising UNet is combined from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenoisingUnetFiles {
    /// `denoising_unet.pth` / `denoising_unet_acc.pth` (all non-motion tensors).
    pub denoising_unet: PathBuf,
    /// `motion_module.pth` / `motion_module_acc.pth` (the `*.motion_modules.*` tensors).
    pub motion_module: PathBuf,
    /// SD base UNet weights: a fallback for tensors both files lack.
    pub base_unet_weights: Option<PathBuf>,
}

impl DenoisingUnetFiles {
    /// The files named by a prompt yaml; the base weights are
    /// `<pretrained_base_model_path>/unet/diffusion_pytorch_model.{safetensors,bin}`
    /// when one exists.
    pub fn from_prompt(prompt: &PromptConfig) -> Self {
        let unet_dir = prompt.pretrained_base_model_path.join("unet");
        Self {
            denoising_unet: prompt.denoising_unet_path.clone(),
            motion_module: prompt.motion_module_path.clone(),
            base_unet_weights: BASE_UNET_WEIGHTS
                .iter()
                .map(|name| unet_dir.join(name))
                .find(|p| p.is_file()),
        }
    }
}

/// Path of the base UNet `config.json` of a prompt yaml.
pub fn base_unet_config_path(prompt: &PromptConfig) -> PathBuf {
    prompt
        .pretrained_base_model_path
        .join("unet")
        .join("config.json")
}

/// The base UNet config of a prompt yaml: its `unet/config.json`, or the
/// released model's config when the file does not exist.
pub fn base_unet_config(prompt: &PromptConfig) -> Result<UNet2DConditionConfig> {
    let path = base_unet_config_path(prompt);
    if path.exists() {
        read_json(&path)
    } else {
        Ok(UNet2DConditionConfig::default())
    }
}

/// The inference yaml of a prompt yaml, or the released model's
/// `inference_v2.yaml` values when the prompt names none.
pub fn inference_config(prompt: &PromptConfig) -> Result<InferenceConfig> {
    match &prompt.inference_config {
        Some(path) => InferenceConfig::from_file(path),
        None => Ok(InferenceConfig::default()),
    }
}

/// A `VarBuilder` backend that serves tensors from a primary checkpoint,
/// else (shape permitting) from a lazily read fallback file, and records —
/// instead of failing on — the keys that neither holds, so that one build
/// reports every missing key.
struct CombinedBackend {
    primary: Checkpoint,
    fallback: Option<Fallback>,
    missing: Mutex<BTreeSet<String>>,
}

struct Fallback {
    path: PathBuf,
    checkpoint: OnceLock<std::result::Result<Checkpoint, String>>,
}

impl Fallback {
    fn get(&self) -> candle_core::Result<&Checkpoint> {
        self.checkpoint
            .get_or_init(|| Checkpoint::load(&self.path).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| candle_core::Error::msg(e.clone()))
    }
}

impl CombinedBackend {
    fn new(primary: Checkpoint, fallback: Option<PathBuf>) -> Self {
        Self {
            primary,
            fallback: fallback.map(|path| Fallback {
                path,
                checkpoint: OnceLock::new(),
            }),
            missing: Mutex::new(BTreeSet::new()),
        }
    }

    fn fetch(
        &self,
        shape: Option<&Shape>,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if self.primary.contains(name) {
            return match shape {
                Some(s) => SimpleBackend::get(
                    &self.primary,
                    s.clone(),
                    name,
                    candle_nn::Init::Const(0.),
                    dtype,
                    dev,
                ),
                None => SimpleBackend::get_unchecked(&self.primary, name, dtype, dev),
            };
        }
        if let Some(fallback) = &self.fallback {
            let base = fallback.get()?;
            if let Some(t) = base.tensor(name) {
                if shape.is_none_or(|s| t.shape() == s) {
                    return t.to_dtype(dtype)?.to_device(dev);
                }
            }
        }
        if let Ok(mut m) = self.missing.lock() {
            m.insert(name.to_owned());
        }
        // A zero-stride placeholder: nothing is allocated, and the build
        // continues so that every missing key gets reported.
        match shape {
            Some(s) => Tensor::zeros((), dtype, dev)?.broadcast_as(s.clone()),
            None => Tensor::zeros((), dtype, dev),
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = self.primary.files().to_vec();
        files.extend(self.fallback.as_ref().map(|f| f.path.clone()));
        files
    }

    fn check_complete(&self) -> Result<()> {
        let keys: Vec<String> = self
            .missing
            .lock()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        if keys.is_empty() {
            Ok(())
        } else {
            Err(PipelineError::MissingKeys {
                files: self.files(),
                keys,
            })
        }
    }
}

impl SimpleBackend for CombinedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(Some(&s), name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(None, name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.primary.contains(name)
    }
}

/// Builds a network over `backend`, then turns missing keys and build
/// errors into pipeline errors that name the file(s).
fn build<M>(
    backend: CombinedBackend,
    dtype: DType,
    device: &Device,
    make: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<M>,
) -> Result<(M, Checkpoint)> {
    let primary = backend.primary.clone();
    let backend = std::sync::Arc::new(backend);
    let vb = VarBuilder::from_backend(
        Box::new(SharedBackend(backend.clone())),
        dtype,
        device.clone(),
    );
    let built = make(vb);
    // Missing keys take precedence: they explain most build failures.
    backend.check_complete()?;
    let model = built.map_err(|e| PipelineError::Weights {
        path: primary.files().first().cloned().unwrap_or_default(),
        key: None,
        message: e.to_string(),
    })?;
    Ok((model, primary))
}

/// Lets the caller keep a handle on the backend the `VarBuilder` owns.
struct SharedBackend(std::sync::Arc<CombinedBackend>);

impl SimpleBackend for SharedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

fn unsupported(path: Option<&Path>, e: &candle_core::Error) -> PipelineError {
    match path {
        Some(path) => PipelineError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
        None => PipelineError::InvalidInput(format!("unsupported UNet configuration: {e}")),
    }
}

impl UNet2DConditionModel {
    /// Loads the reference UNet from `reference_unet.pth` strictly: every
    /// tensor must be present (else [`PipelineError::MissingKeys`]) and the
    /// file may hold no other key.
    pub fn load(
        path: &Path,
        cfg: &UNet2DConditionConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        unet_2d_condition::validate(cfg).map_err(|e| unsupported(None, &e))?;
        let ck = Checkpoint::load(path)?;
        let (model, ck) = build(CombinedBackend::new(ck, None), dtype, device, |vb| {
            Self::new(vb, cfg)
        })?;
        let unused = ck.unused_keys();
        if !unused.is_empty() {
            let shown: Vec<_> = unused.iter().take(8).cloned().collect();
            return Err(PipelineError::Weights {
                path: path.to_path_buf(),
                key: None,
                message: format!(
                    "{} unexpected key(s) for the reference UNet (strict load): {}{}",
                    unused.len(),
                    shown.join(", "),
                    if unused.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            });
        }
        Ok(model)
    }

    /// Loads the reference UNet named by a prompt yaml, with the base
    /// `unet/config.json`.
    pub fn from_prompt(prompt: &PromptConfig, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = base_unet_config(prompt)?;
        unet_2d_condition::validate(&cfg)
            .map_err(|e| unsupported(Some(&base_unet_config_path(prompt)), &e))?;
        Self::load(&prompt.reference_unet_path, &cfg, dtype, device)
    }
}

impl UNet3DConditionModel {
    /// Combines the denoising UNet from the official files (see the module
    /// docs for the per-key rule).
    pub fn load(
        files: &DenoisingUnetFiles,
        cfg: &UNet2DConditionConfig,
        extra: &UnetAdditionalKwargs,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        unet_3d::validate(cfg, extra).map_err(|e| unsupported(None, &e))?;
        let denoising = Checkpoint::load(&files.denoising_unet)?;
        let motion = Checkpoint::load(&files.motion_module)?;
        let primary = Checkpoint::layered(&[&denoising, &motion]);
        let backend = CombinedBackend::new(primary, files.base_unet_weights.clone());
        let (model, ck) = build(backend, dtype, device, |vb| Self::new(vb, cfg, extra))?;
        let ignored = ck
            .unused_keys()
            .into_iter()
            .filter(|k| !k.ends_with("pos_encoder.pe"))
            .count();
        if ignored > 0 {
            tracing::warn!(
                ignored,
                "denoising UNet files hold tensors the model does not use (ignored, as the reference's strict=False load does)"
            );
        }
        Ok(model)
    }

    /// Loads the denoising UNet named by a prompt yaml, with the base
    /// `unet/config.json` and the inference yaml's `unet_additional_kwargs`.
    pub fn from_prompt(prompt: &PromptConfig, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = base_unet_config(prompt)?;
        let extra = inference_config(prompt)?.unet_additional_kwargs;
        unet_3d::validate(&cfg, &extra).map_err(|e| {
            let path = prompt
                .inference_config
                .clone()
                .unwrap_or_else(|| base_unet_config_path(prompt));
            unsupported(Some(&path), &e)
        })?;
        Self::load(
            &DenoisingUnetFiles::from_prompt(prompt),
            &cfg,
            &extra,
            dtype,
            device,
        )
    }
}
