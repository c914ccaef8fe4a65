//! The denoising UNet's hot operations one by one, at the released model's 64×64 level
//! (320 channels, 8 heads of 40, 4096 tokens) and a CFG window's batch (2 × 12 frames), timed
//! on `ECHOMIMIC_DEVICE` in `ECHOMIMIC_DTYPE`: to find which operation makes a whole UNet call
//! slower than PyTorch's. `benches/python/ops_baseline.py` times the same operations in torch;
//! `scripts/gpu-bench.sh` runs both.
//!
//! ```text
//! ECHOMIMIC_DEVICE=cuda ECHOMIMIC_DTYPE=f16 cargo bench -p echomimic-benches --features cuda \
//!     --bench ops -- [--batch 24] [--iters 10]
//! ```
//!
//! Prints one JSON object (`{"results": {op: {"seconds", "times"}}}`) on stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use anyhow::ensure;
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use clap::Parser;
use echomimic_benches::{device_from_env, dtype_from_env, median_time, random_weights};
use echomimic_pipeline::kernels;
use echomimic_pipeline::models::attention::{Attention, FeedForward, LayerNorm};
use echomimic_pipeline::ops;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "The denoising UNet's hot operations at the 64x64 level")]
struct Args {
    /// Images per call (2 × 12 frames = one CFG window).
    #[arg(long, default_value_t = 24)]
    batch: usize,
    /// Latent side.
    #[arg(long, default_value_t = 64)]
    side: usize,
    #[arg(long, default_value_t = 320)]
    channels: usize,
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Timed calls per operation (median reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse_from(std::env::args().filter(|x| x != "--bench"));
    ensure!(
        a.channels % a.heads == 0 && a.channels % 32 == 0,
        "bad widths"
    );
    let dev = device_from_env()?;
    let dtype = dtype_from_env()?;
    let (n, c, s) = (a.batch, a.channels, a.side);
    let l = s * s;
    let hd = c / a.heads;
    let vb: VarBuilder<'static> = random_weights(dtype, &dev);
    let image = Tensor::randn(0f32, 1., (n, c, s, s), &dev)?.to_dtype(dtype)?;
    let tokens = Tensor::randn(0f32, 1., (n, l, c), &dev)?.to_dtype(dtype)?;
    let heads = |t: &Tensor| ops::split_heads(t, a.heads);
    let (q, k, v) = (heads(&tokens)?, heads(&tokens)?, heads(&tokens)?);
    let audio = Tensor::randn(0f32, 1., (n, 50, 384), &dev)?.to_dtype(dtype)?;

    let conv3 = candle_nn::conv2d(
        c,
        c,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb.pp("conv3"),
    )?;
    let conv1 = candle_nn::conv2d(c, c, 1, Conv2dConfig::default(), vb.pp("conv1"))?;
    let gn = kernels::group_norm(32, c, 1e-5, vb.pp("gn"))?;
    let ln = LayerNorm::new(vb.pp("ln"), c, 1e-5)?;
    let linear = candle_nn::linear(c, c, vb.pp("linear"))?;
    let self_attn = Attention::new(vb.pp("attn1"), c, None, a.heads, hd)?;
    let cross_attn = Attention::new(vb.pp("attn2"), c, Some(384), a.heads, hd)?;
    let ff = FeedForward::new(vb.pp("ff"), c)?;
    let scale = 1.0 / (hd as f64).sqrt();

    let mut results = serde_json::Map::new();
    let mut time = |name: &str, f: &mut dyn FnMut() -> candle_core::Result<Tensor>| {
        let (med, times) = median_time(&dev, a.iters, || Ok(f()?))?;
        eprintln!("{name:<28} {:>9.3} ms", med.as_secs_f64() * 1e3);
        results.insert(
            name.to_owned(),
            json!({ "seconds": med.as_secs_f64(),
                    "times": times.iter().map(|t| t.as_secs_f64()).collect::<Vec<_>>() }),
        );
        anyhow::Ok(())
    };
    time("conv3x3", &mut || kernels::conv2d(&conv3, &image))?;
    time("conv1x1", &mut || kernels::conv2d(&conv1, &image))?;
    time("group_norm_silu", &mut || gn.forward_silu(&image))?;
    time("group_norm", &mut || gn.forward(&image))?;
    time("layer_norm", &mut || ln.forward(&tokens))?;
    time("linear", &mut || linear.forward(&tokens))?;
    time("sdpa", &mut || ops::attention(&q, &k, &v, scale))?;
    time("softmax_f32_scores", &mut || {
        // One chunk's worth of scores as ops::attention makes them (4 heads' rows).
        let sc = q
            .narrow(0, 0, 1)?
            .narrow(1, 0, 4)?
            .matmul(&k.narrow(0, 0, 1)?.narrow(1, 0, 4)?.t()?)?
            .to_dtype(DType::F32)?;
        kernels::softmax_last_dim(&sc, Some(scale))
    })?;
    time("self_attention_block", &mut || {
        self_attn.forward(&tokens, None)
    })?;
    time("cross_attention_block", &mut || {
        cross_attn.forward(&tokens, Some(&audio))
    })?;
    time("feed_forward", &mut || ff.forward(&tokens))?;
    time("permute_to_tokens", &mut || {
        image.flatten_from(2)?.transpose(1, 2)?.contiguous()
    })?;
    time("add", &mut || &image + &image)?;

    // Pieces of the above, to attribute their time.
    let w = Tensor::randn(0f32, 1., (c, c), &dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1., c, &dev)?.to_dtype(dtype)?;
    let flat = tokens.reshape((n * l, c))?;
    time("matmul_3d_broadcast_weight", &mut || {
        tokens.matmul(&w.broadcast_left(n)?.t()?)
    })?;
    time("matmul_2d", &mut || flat.matmul(&w.t()?))?;
    let y = flat.matmul(&w.t()?)?;
    time("bias_broadcast_add", &mut || y.broadcast_add(&b))?;
    time("linear_2d", &mut || {
        flat.matmul(&w.t()?)?.broadcast_add(&b)?.reshape((n, l, c))
    })?;
    time("conv1x1_as_matmul", &mut || {
        w.broadcast_matmul(&image.reshape((n, c, l))?)?
            .reshape((n, c, s, s))
    })?;
    let chunk = q
        .narrow(0, 0, 1)?
        .narrow(1, 0, 4)?
        .matmul(&k.narrow(0, 0, 1)?.narrow(1, 0, 4)?.t()?)?;
    time("scores_matmul_chunk", &mut || {
        q.narrow(0, 0, 1)?
            .narrow(1, 0, 4)?
            .matmul(&k.narrow(0, 0, 1)?.narrow(1, 0, 4)?.t()?)
    })?;
    time("to_f32_chunk", &mut || chunk.to_dtype(DType::F32))?;
    time("softmax_chunk_in_dtype", &mut || {
        candle_nn::ops::softmax_last_dim(&chunk)
    })?;
    time("to_f32_image", &mut || image.to_dtype(DType::F32))?;
    let image32 = image.to_dtype(DType::F32)?;
    time("sum_over_groups_f32", &mut || {
        image32.reshape((n, 32, l * c / 32))?.sum_keepdim(2)
    })?;
    time("silu", &mut || image.silu())?;

    let out = json!({
        "tool": "echomimic-rs ops",
        "device": std::env::var("ECHOMIMIC_DEVICE").unwrap_or_else(|_| "cpu".into()),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "batch": n, "side": s, "channels": c, "heads": a.heads, "iters": a.iters,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
