//! The initial noise drawn from a seed equals PyTorch's `torch.randn` with
//! `torch.manual_seed(seed)` (golden `pipeline.latents_randn`).
//!
//! The draw is host-side f32 arithmetic (Mersenne Twister + Box-Muller as
//! PyTorch's CPU generator), the same in every run whatever
//! `ECHOMIMIC_DEVICE`/`ECHOMIMIC_DTYPE` say; the pipeline casts it to the
//! model dtype afterwards (checked by `pipeline_parity.rs`).

mod common;

use candle_core::{Device, Tensor};
use common::{assert_close, get, golden, golden_dir};

#[test]
fn seeded_noise_matches_torch_randn() -> anyhow::Result<()> {
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        golden_dir().join("manifest.json"),
    )?)?;
    let seed = manifest["config"]["pipe_seed"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("manifest has no config.pipe_seed"))?;
    let t = golden("pipeline")?;
    let want = get(&t, "latents_randn")?;
    let got = echomimic_pipeline::rng::torch_randn(seed, want.elem_count());
    let got = Tensor::from_vec(got, want.shape(), &Device::Cpu)?;
    assert_close("pipeline.latents_randn", &got, want, 1e-5)?;
    Ok(())
}
