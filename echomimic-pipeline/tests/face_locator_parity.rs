//! Face-locator parity against `tensors/face_locator.safetensors`.
//!
//! Reference side (EchoMimic `FaceLocator` with the set's widths, fp32, CPU):
//!
//! ```python
//! fl = FaceLocator(C, conditioning_channels=1, block_out_channels=widths)
//! fl.load_state_dict(torch.load("pretrained_weights/face_locator.pth"))
//! output = fl(input)
//! fl.load_state_dict({k: v.float() for k, v in torch.load("pretrained_weights_fp16/face_locator.pth").items()})
//! output_from_fp16_weights = fl(input)
//! ```

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Module};
use common::{assert_close, get, golden, golden_dir};
use echomimic_pipeline::config::PromptConfig;
use echomimic_pipeline::models::face_locator::FaceLocator;

/// README tolerance of `face_locator.output`.
const ATOL: f64 = 2e-6;

fn face_locator_path() -> anyhow::Result<PathBuf> {
    let dir = golden_dir().join("configs/prompts");
    let mut yamls: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    yamls.sort();
    let yaml = yamls
        .first()
        .ok_or_else(|| anyhow::anyhow!("no prompt yaml in {}", dir.display()))?;
    Ok(PromptConfig::from_file(yaml)?.face_locator_path)
}

#[test]
fn face_locator_matches_reference() -> anyhow::Result<()> {
    let g = golden("face_locator")?;
    let net = FaceLocator::load(face_locator_path()?, DType::F32, &Device::Cpu)?;
    let out = net.forward(get(&g, "input")?)?;
    assert_close("face_locator.output", &out, get(&g, "output")?, ATOL)?;
    Ok(())
}

/// The fp16 copy of the weights, loaded into an f32 model, reproduces the
/// reference run made with the same fp16-rounded weights upcast to fp32.
#[test]
fn face_locator_from_fp16_file_matches_reference() -> anyhow::Result<()> {
    let g = golden("face_locator")?;
    let path = golden_dir().join("pretrained_weights_fp16/face_locator.pth");
    let net = FaceLocator::load(&path, DType::F32, &Device::Cpu)?;
    let out = net.forward(get(&g, "input")?)?;
    assert_close(
        "face_locator.output_from_fp16_weights",
        &out,
        get(&g, "output_from_fp16_weights")?,
        ATOL,
    )?;
    // And it stays within the README's fp16-rounding bound of the fp32 output.
    assert_close(
        "face_locator.output_from_fp16_weights vs output",
        &out,
        get(&g, "output")?,
        4e-4,
    )?;
    Ok(())
}

/// Half-precision weights chosen at load time: same network, loose bound.
#[test]
fn face_locator_runs_in_f16() -> anyhow::Result<()> {
    let g = golden("face_locator")?;
    let net = FaceLocator::load(face_locator_path()?, DType::F16, &Device::Cpu)?;
    let out = net.forward(&get(&g, "input")?.to_dtype(DType::F16)?)?;
    assert_eq!(out.dtype(), DType::F16);
    assert_close("face_locator.output (f16)", &out, get(&g, "output")?, 1e-3)?;
    Ok(())
}
