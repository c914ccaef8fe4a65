//! Context windows per step equal the reference's (golden `step{i}.contexts`).

mod common;

use common::{get, golden, golden_dir};
use echomimic_pipeline::context::{rotate_windows, uniform_windows};

#[test]
fn context_windows_match_reference() -> anyhow::Result<()> {
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        golden_dir().join("manifest.json"),
    )?)?;
    let cfg = &manifest["config"];
    let field = |k: &str| {
        cfg[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow::anyhow!("manifest config.{k} missing"))
    };
    let (ctx, ovl, steps) = (
        field("context_frames")?,
        field("context_overlap")?,
        field("steps")?,
    );
    let t = golden("pipeline")?;
    let frames = get(&t, "video_length")?
        .to_dtype(candle_core::DType::I64)?
        .to_scalar::<i64>()? as usize;
    let windows = uniform_windows(frames, ctx, ovl).map_err(anyhow::Error::msg)?;
    for step in 0..steps {
        let want = get(&t, &format!("step{step}.contexts"))?
            .to_dtype(candle_core::DType::I64)?
            .to_vec2::<i64>()?;
        let got: Vec<Vec<i64>> = rotate_windows(&windows, step, frames)
            .into_iter()
            .map(|w| w.into_iter().map(|i| i as i64).collect())
            .collect();
        anyhow::ensure!(got == want, "step {step}: {got:?} != golden {want:?}");
    }
    Ok(())
}
