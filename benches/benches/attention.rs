//! Memory-efficient (query-chunked) attention against the naive path at the
//! real shapes of EchoMimic's largest attention: the reference attention of
//! the 64×64 level, one frame of the conditional half (8 heads × 4096
//! queries over 4096 own + 4096 bank keys, head dim 40).
//!
//! `cargo bench -p echomimic-benches --bench attention -- [iterations] [frames]`
//! (defaults 3 and 1). Prints time, peak resident memory (each variant
//! measured after resetting `VmHWM`) and the max abs difference of every
//! chunked variant from the naive one.
#![allow(clippy::print_stdout)]

use anyhow::Context;
use candle_core::{Device, Tensor};
use echomimic_benches::{gib, median_time, proc_status_bytes, reset_peak_rss};
use echomimic_pipeline::ops::{self, DEFAULT_MAX_SCORE_ELEMS};

const HEADS: usize = 8;
const QUERIES: usize = 4096;
const KEYS: usize = 8192;
const HEAD_DIM: usize = 40;

/// `softmax(q·kᵀ·scale)·v` with the whole score matrix at once.
fn naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(|a| a.parse().context("arguments: [iterations] [frames]"))
        .collect::<anyhow::Result<_>>()?;
    let iters = args.first().copied().unwrap_or(3);
    let frames = args.get(1).copied().unwrap_or(1);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1., (frames, HEADS, QUERIES, HEAD_DIM), &dev)?;
    let k = Tensor::randn(0f32, 1., (frames, HEADS, KEYS, HEAD_DIM), &dev)?;
    let v = Tensor::randn(0f32, 1., (frames, HEADS, KEYS, HEAD_DIM), &dev)?;
    let scale = 1.0 / (HEAD_DIM as f64).sqrt();
    let score_bytes = frames * HEADS * QUERIES * KEYS * 4;
    let flops = 4.0 * (frames * HEADS * QUERIES * KEYS * HEAD_DIM) as f64;
    println!(
        "attention {frames}x{HEADS} heads x {QUERIES} queries x {KEYS} keys x {HEAD_DIM} (f32 CPU, \
         {} threads, median of {iters}; scores {:.2} GiB unchunked; load average {:.1})",
        candle_core::utils::get_num_threads(),
        gib(score_bytes as u64),
        echomimic_benches::load_average().unwrap_or(f64::NAN),
    );
    let base_rss = proc_status_bytes("VmRSS").unwrap_or(0);

    reset_peak_rss();
    let (t_naive, _) = median_time(&dev, iters, || Ok(naive(&q, &k, &v, scale)?))?;
    let peak_naive = proc_status_bytes("VmHWM")
        .unwrap_or(0)
        .saturating_sub(base_rss);
    let want = naive(&q, &k, &v, scale)?;
    println!(
        "  naive                 : {:7.3} s  {:6.1} GFLOP/s  peak +{:.2} GiB",
        t_naive.as_secs_f64(),
        flops / t_naive.as_secs_f64() / 1e9,
        gib(peak_naive)
    );
    for limit in [
        DEFAULT_MAX_SCORE_ELEMS,
        16 << 20,
        4 << 20,
        1 << 20,
        256 << 10,
    ] {
        reset_peak_rss();
        let (t, _) = median_time(&dev, iters, || {
            Ok(ops::attention_chunked(&q, &k, &v, scale, limit)?)
        })?;
        let peak = proc_status_bytes("VmHWM")
            .unwrap_or(0)
            .saturating_sub(base_rss);
        let got = ops::attention_chunked(&q, &k, &v, scale, limit)?;
        println!(
            "  chunked {:>5} Ki scores: {:7.3} s  {:6.1} GFLOP/s  peak +{:.2} GiB  ratio {:.2}  max|Δ| {:.1e}",
            limit >> 10,
            t.as_secs_f64(),
            flops / t.as_secs_f64() / 1e9,
            gib(peak),
            t.as_secs_f64() / t_naive.as_secs_f64(),
            ops::max_abs_diff(&got, &want)?
        );
    }
    Ok(())
}
