//! VAE parity against `tensors/vae.safetensors`, loading the golden
//! `sd-vae-ft-mse/` folder through the real loader.
//!
//! Reference side (diffusers 0.24.0, fp32, CPU):
//!
//! ```python
//! vae = AutoencoderKL.from_pretrained("pretrained_weights/sd-vae-ft-mse")
//! dist = vae.encode(encode_input).latent_dist   # mean, logvar (clamped to [-30, 20])
//! decode_output = vae.decode(decode_input).sample
//! ```
//!
//! The parity test runs on the device and in the dtype of the run
//! (`ECHOMIMIC_DEVICE`, `ECHOMIMIC_DTYPE`, see `tests/common`); the loader
//! tests (file formats, key spellings, missing keys) check how weights are
//! read, not arithmetic, and stay on the CPU in f32.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{
    assert_close, assert_parity, assert_parity_in, get, golden, input, set_atol,
    skip_without_conv2d, test_device, test_dtype,
};
use echomimic_pipeline::config::{read_json, AutoencoderKLConfig};
use echomimic_pipeline::models::vae::AutoencoderKL;
use echomimic_pipeline::ops::max_abs_diff;
use echomimic_pipeline::weights::Checkpoint;
use echomimic_pipeline::PipelineError;

/// README tolerances of the public set (`common::set_atol`).
const MEAN_ATOL: f64 = 2e-5;
const LOGVAR_ATOL: f64 = 2e-5;
const DECODE_ATOL: f64 = 3e-5;
/// Half precision: tolerance / max|golden|, 4× the ratio measured on the CPU
/// in f16 (mean 3.93e-3, logvar 2.26e-3, decode 4.45e-3; `docs/cuda.md`,
/// parity tolerances).
const MEAN_F16_REL: f64 = 1.6e-2;
const LOGVAR_F16_REL: f64 = 9.1e-3;
const DECODE_F16_REL: f64 = 1.8e-2;

/// Encodes and decodes the golden inputs; returns (mean, logvar, decoded).
fn run(
    vae: &AutoencoderKL,
    g: &HashMap<String, Tensor>,
) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
    let dist = vae.encode(get(g, "encode.input")?)?;
    let decoded = vae.decode(get(g, "decode.input")?)?;
    Ok((dist.mean, dist.logvar, decoded))
}

/// The golden inputs on the run's device and in its dtype.
fn device_inputs(g: &HashMap<String, Tensor>) -> anyhow::Result<HashMap<String, Tensor>> {
    let mut moved = HashMap::new();
    for key in ["encode.input", "decode.input"] {
        moved.insert(key.to_owned(), input(get(g, key)?)?);
    }
    Ok(moved)
}

#[test]
fn vae_matches_reference() -> anyhow::Result<()> {
    if skip_without_conv2d("vae_matches_reference")? {
        return Ok(());
    }
    common::for_each_set(vae_matches_reference_in_set)
}

/// One golden set (`common::for_each_set`).
fn vae_matches_reference_in_set() -> anyhow::Result<()> {
    let g = golden("vae")?;
    let vae = AutoencoderKL::load(
        common::prompt()?.pretrained_vae_path,
        test_dtype()?,
        &test_device()?,
    )?;
    let (mean, logvar, decoded) = run(&vae, &device_inputs(&g)?)?;
    assert_eq!(mean.dtype(), test_dtype()?);
    assert_parity(
        "vae.encode.mean",
        &mean,
        get(&g, "encode.mean")?,
        set_atol("vae.encode.mean", MEAN_ATOL)?,
        MEAN_F16_REL,
    )?;
    assert_parity(
        "vae.encode.logvar",
        &logvar,
        get(&g, "encode.logvar")?,
        set_atol("vae.encode.logvar", LOGVAR_ATOL)?,
        LOGVAR_F16_REL,
    )?;
    assert_parity(
        "vae.decode.output",
        &decoded,
        get(&g, "decode.output")?,
        set_atol("vae.decode.output", DECODE_ATOL)?,
        DECODE_F16_REL,
    )?;
    Ok(())
}

/// `.bin` (torch zip pickle) and `.safetensors` hold the same tensors and must
/// give bit-identical results.
#[test]
fn vae_bin_and_safetensors_agree() -> anyhow::Result<()> {
    let dir = common::prompt()?.pretrained_vae_path;
    let (st, bin) = (
        dir.join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.bin"),
    );
    anyhow::ensure!(
        st.is_file() && bin.is_file(),
        "the golden VAE folder should hold both {} and {}",
        st.display(),
        bin.display()
    );
    let g = golden("vae")?;
    let cfg: AutoencoderKLConfig = read_json(&dir.join("config.json"))?;
    let from_st =
        AutoencoderKL::from_checkpoint(&Checkpoint::load(&st)?, &cfg, DType::F32, &Device::Cpu)?;
    let from_bin =
        AutoencoderKL::from_checkpoint(&Checkpoint::load(&bin)?, &cfg, DType::F32, &Device::Cpu)?;
    let a = run(&from_st, &g)?;
    let b = run(&from_bin, &g)?;
    for (what, x, y) in [
        ("mean", &a.0, &b.0),
        ("logvar", &a.1, &b.1),
        ("decode", &a.2, &b.2),
    ] {
        let d = max_abs_diff(x, y)?;
        eprintln!("vae {what}: .bin vs .safetensors max diff {d:e}");
        anyhow::ensure!(d == 0.0, "{what}: .bin and .safetensors differ by {d:e}");
    }
    Ok(())
}

fn respell(key: &str, to_new: bool) -> String {
    const PAIRS: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    if !key.contains(".mid_block.attentions.") {
        return key.to_owned();
    }
    let mut k = key.to_owned();
    for (old, new) in PAIRS {
        k = if to_new {
            k.replace(old, new)
        } else {
            k.replace(new, old)
        };
    }
    k
}

/// Both attention key spellings load to the same network.
#[test]
fn vae_accepts_both_attention_key_spellings() -> anyhow::Result<()> {
    let dir = common::prompt()?.pretrained_vae_path;
    let cfg: AutoencoderKLConfig = read_json(&dir.join("config.json"))?;
    let ck = Checkpoint::load(dir.join("diffusion_pytorch_model.safetensors"))?;
    let legacy_on_disk = ck.keys().iter().any(|k| k.ends_with(".query.weight"));
    let renamed: HashMap<String, Tensor> = ck
        .keys()
        .iter()
        .filter_map(|k| {
            ck.tensor(k)
                .map(|t| (respell(k, legacy_on_disk), t.clone()))
        })
        .collect();
    let ck2 = Checkpoint::from_tensors(renamed, "respelled.safetensors");
    let (new_key, old_key) = (
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.query.weight",
    );
    let spelled = |c: &Checkpoint| (c.contains(new_key), c.contains(old_key));
    anyhow::ensure!(spelled(&ck) != spelled(&ck2), "renaming changed nothing");

    let g = golden("vae")?;
    let a = run(
        &AutoencoderKL::from_checkpoint(&ck, &cfg, DType::F32, &Device::Cpu)?,
        &g,
    )?;
    let b = run(
        &AutoencoderKL::from_checkpoint(&ck2, &cfg, DType::F32, &Device::Cpu)?,
        &g,
    )?;
    anyhow::ensure!(max_abs_diff(&a.0, &b.0)? == 0.0 && max_abs_diff(&a.2, &b.2)? == 0.0);
    assert_close(
        "vae.encode.mean (respelled keys)",
        &b.0,
        get(&g, "encode.mean")?,
        MEAN_ATOL,
    )?;
    Ok(())
}

/// A missing tensor fails with the file and the key named.
#[test]
fn vae_missing_key_is_named() -> anyhow::Result<()> {
    let dir = common::prompt()?.pretrained_vae_path;
    let cfg: AutoencoderKLConfig = read_json(&dir.join("config.json"))?;
    let ck = Checkpoint::load(dir.join("diffusion_pytorch_model.safetensors"))?
        .filtered(|k| k != "decoder.conv_out.bias");
    let err = AutoencoderKL::from_checkpoint(&ck, &cfg, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("decoder.conv_out.bias")
            && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    assert!(matches!(err, PipelineError::MissingKeys { .. }), "{err:?}");

    let mut bad = cfg.clone();
    bad.block_out_channels.push(16);
    let err = AutoencoderKL::from_checkpoint(
        &Checkpoint::load(dir.join("diffusion_pytorch_model.safetensors"))?,
        &bad,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("block_types") || err.contains("block_out_channels"),
        "{err}"
    );
    Ok(())
}

/// Half-precision weights chosen at load time (GroupNorm statistics and the
/// mid attention in f32), in every run, on the run's device, from f32 inputs
/// (the VAE casts them): within the f16 tolerances.
#[test]
fn vae_runs_in_f16() -> anyhow::Result<()> {
    let g = golden("vae")?;
    let dev = test_device()?;
    let vae = AutoencoderKL::load(common::prompt()?.pretrained_vae_path, DType::F16, &dev)?;
    let mut on_dev = HashMap::new();
    for key in ["encode.input", "decode.input"] {
        on_dev.insert(key.to_owned(), get(&g, key)?.to_device(&dev)?);
    }
    let (mean, _, decoded) = run(&vae, &on_dev)?;
    assert_eq!(mean.dtype(), DType::F16);
    assert_parity_in(
        DType::F16,
        "vae.encode.mean (f16)",
        &mean,
        get(&g, "encode.mean")?,
        MEAN_ATOL,
        MEAN_F16_REL,
    )?;
    assert_parity_in(
        DType::F16,
        "vae.decode.output (f16)",
        &decoded,
        get(&g, "decode.output")?,
        DECODE_ATOL,
        DECODE_F16_REL,
    )?;
    Ok(())
}
