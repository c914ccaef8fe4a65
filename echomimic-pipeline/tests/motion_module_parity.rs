//! Motion module parity against the official PyTorch implementation.
//!
//! Golden tensors: `tensors/motion_module.safetensors`, produced by calling
//! one motion module of the denoising UNet (`down_blocks.1.motion_modules.0`
//! in the public set, the one named by `manifest.json` `config.motion_module`
//! in another) as `module(x, None, None)` (EchoMimic `VanillaTemporalModule`)
//! on a random `(B, C, F, h, w)` input; the weights are those of
//! `motion_module.pth`. Tolerance: the set's (`common::set_atol`, f32); in
//! half precision that of `tests/common` (`docs/cuda.md`).
//!
//! The module runs on the device and in the dtype of the run
//! (`ECHOMIMIC_DEVICE`, `ECHOMIMIC_DTYPE`). It has no 2-D convolution, so it
//! runs in bf16 on the CPU too.

mod common;

use candle_core::{DType, Device, Tensor};
use echomimic_pipeline::models::motion_module::{PositionalEncoding, VanillaTemporalModule};
use echomimic_pipeline::unet_loading::{base_unet_config, inference_config};
use echomimic_pipeline::weights::Checkpoint;

const OUTPUT_ATOL: f64 = 3e-5;
/// Half precision: tolerance / max|golden|, 4× the 1.24e-3 measured on the
/// CPU in f16 (`docs/cuda.md`, parity tolerances).
const OUTPUT_F16_REL: f64 = 5.0e-3;

/// The module the public set probes; a set's manifest may name another
/// (`config.motion_module`).
const MODULE: &str = "down_blocks.1.motion_modules.0";

/// The probed module of the current set.
fn probed_module() -> anyhow::Result<String> {
    let m = common::manifest()?;
    Ok(m["config"]["motion_module"]
        .as_str()
        .unwrap_or(MODULE)
        .to_owned())
}

/// `(b, c, f, h, w)` ↔ `(b·f, c, h, w)`, the layout of the UNet internals.
fn to_rows(x: &Tensor) -> anyhow::Result<Tensor> {
    let (b, c, f, h, w) = x.dims5()?;
    Ok(x.permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .reshape((b * f, c, h, w))?)
}

fn from_rows(x: &Tensor, b: usize, f: usize) -> anyhow::Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, f, c, h, w))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?)
}

#[test]
fn motion_module_matches_golden() -> anyhow::Result<()> {
    common::for_each_set(motion_module_matches_golden_in_set)
}

/// One golden set (`common::for_each_set`).
fn motion_module_matches_golden_in_set() -> anyhow::Result<()> {
    let p = common::prompt()?;
    let unet = base_unet_config(&p)?;
    let kwargs = inference_config(&p)?
        .unet_additional_kwargs
        .motion_module_kwargs;
    let ck = Checkpoint::load(&p.motion_module_path)?;
    let module_path = probed_module()?;
    // The module's width, read from its GroupNorm in the checkpoint; it must
    // be one of the UNet's widths.
    let norm = format!("{module_path}.temporal_transformer.norm.weight");
    let channels = ck
        .tensor(&norm)
        .ok_or_else(|| anyhow::anyhow!("no `{norm}` in the motion module checkpoint"))?
        .dim(0)?;
    assert!(unet.block_out_channels.contains(&channels), "{channels}");
    let module = VanillaTemporalModule::new(
        ck.var_builder(common::test_dtype()?, &common::test_device()?)
            .pp(&module_path),
        channels,
        &kwargs,
    )?;
    ck.check_complete()?;

    let g = common::golden("motion_module")?;
    let input = common::input(common::get(&g, "input")?)?;
    let (b, c, f, _, _) = input.dims5()?;
    assert_eq!(c, channels);
    let out = from_rows(&module.forward(&to_rows(&input)?, f)?, b, f)?;
    assert_eq!(out.dtype(), common::test_dtype()?);
    common::assert_parity(
        "motion_module.output",
        &out,
        common::get(&g, "output")?,
        common::set_atol("motion_module.output", OUTPUT_ATOL)?,
        OUTPUT_F16_REL,
    )?;
    Ok(())
}

/// The `pos_encoder.pe` buffers are recomputed; they must equal the stored ones.
#[test]
fn recomputed_position_table_equals_stored_buffers() -> anyhow::Result<()> {
    let p = common::prompt()?;
    let kwargs = inference_config(&p)?
        .unet_additional_kwargs
        .motion_module_kwargs;
    let ck = Checkpoint::load(&p.motion_module_path)?;
    let (mut checked, mut worst) = (0, 0f64);
    for key in ck.keys().iter().filter(|k| k.ends_with("pos_encoder.pe")) {
        let stored = ck.tensor(key).expect("listed key").to_dtype(DType::F32)?;
        let (one, max_len, d) = stored.dims3()?;
        assert_eq!(
            (one, max_len),
            (1, kwargs.temporal_position_encoding_max_len),
            "{key}"
        );
        let ours = Tensor::from_vec(
            PositionalEncoding::table(d, max_len),
            (1, max_len, d),
            &Device::Cpu,
        )?;
        let diff = echomimic_pipeline::ops::max_abs_diff(&ours, &stored)?;
        assert!(diff <= 1e-6, "{key}: recomputed pe differs by {diff:e}");
        worst = worst.max(diff);
        checked += 1;
    }
    eprintln!("{checked} stored pe buffers: max |recomputed - stored| = {worst:.3e}");
    assert!(
        checked > 0,
        "no pos_encoder.pe buffer in {}",
        p.motion_module_path.display()
    );
    Ok(())
}
