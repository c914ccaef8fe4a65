//! GroupNorm, optionally followed by SiLU, in one op.
//!
//! candle-nn's `GroupNorm` is a composition of about ten element-wise passes
//! (sum, subtract, square, sum, divide, sqrt, divide, multiply, add) and the
//! SiLU after it two or three more, each one a fresh tensor. The CPU kernel
//! reads a group twice (mean, then the centred sum of squares: the two-pass
//! variance, as candle computes it) and writes it once, with the per-channel
//! scale and shift and the SiLU folded into that write: `(x − mean)·(w·rstd) + b`. Partial sums run in
//! 16 f32 lanes over blocks of 4 Ki elements and accumulate in f64.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::cpu_input::contiguous_f32;
use super::math::silu;

/// Lanes of the partial sums (vectorised by the compiler).
const LANES: usize = 16;
/// Elements summed in f32 before a partial sum goes into the f64 total.
const BLOCK: usize = 4096;

/// GroupNorm over `[N, C, ...]` with an affine `weight`/`bias` per channel
/// (torch `nn.GroupNorm`, keys `weight`, `bias`). Statistics in f32 for
/// f16/bf16 inputs, like candle-nn's.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Loads a GroupNorm of `channels` channels in `groups` groups at `vb`
/// (same keys and checks as `candle_nn::group_norm`).
pub fn group_norm(
    groups: usize,
    channels: usize,
    eps: f64,
    vb: VarBuilder<'_>,
) -> Result<GroupNorm> {
    GroupNorm::new(
        vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?,
        vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?,
        groups,
        eps,
    )
}

impl GroupNorm {
    /// A GroupNorm from its `[C]` weight and bias.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dims1()?;
        if groups == 0 || channels % groups != 0 || bias.dims1()? != channels {
            candle_core::bail!(
                "GroupNorm: {groups} groups do not divide {channels} channels (bias {:?})",
                bias.dims()
            );
        }
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// The normalised input followed by SiLU (`silu(norm(x))`, the pre-conv
    /// activation of every resnet block).
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let _span = tracing::trace_span!("group_norm", silu).entered();
        let dims = xs.dims();
        if dims.len() < 3 || dims[1] != self.weight.dims1()? {
            candle_core::bail!(
                "GroupNorm over {} channels got input {dims:?}",
                self.weight.dims1()?
            );
        }
        if super::switch::use_cpu_kernel(xs) && self.weight.dtype() == DType::F32 {
            let op = FusedGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu,
                weight: self.weight.to_vec1()?,
                bias: self.bias.to_vec1()?,
            };
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        let ys = self.composed(xs)?;
        if silu {
            ys.silu()
        } else {
            Ok(ys)
        }
    }

    /// The plain candle composition (candle-nn's `GroupNorm::forward`).
    fn composed(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let (n, c) = (dims[0], dims[1]);
        let per_group = dims[2..].iter().product::<usize>() * c / self.groups;
        let internal = match xs.dtype() {
            DType::F16 | DType::BF16 => DType::F32,
            d => d,
        };
        let x = xs
            .reshape((n, self.groups, per_group))?
            .to_dtype(internal)?;
        let mean = (x.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_sub(&mean)?;
        let var = (x.sqr()?.sum_keepdim(2)? / per_group as f64)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut w_dims = vec![1; dims.len()];
        w_dims[1] = c;
        x.to_dtype(xs.dtype())?
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(w_dims.clone())?)?
            .broadcast_add(&self.bias.reshape(w_dims)?)
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

/// Sum of `f(x)` over `xs`, in f32 lanes per block and f64 across blocks.
fn blocked_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, &x) in lanes.iter_mut().zip(chunk) {
                *l += f(x);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// `d[i] = (s[i] − mean)·scale + shift`, then SiLU when `with_silu` (8 wide with FMA where
/// the CPU has AVX2).
fn normalise_row(d: &mut [f32], s: &[f32], mean: f32, scale: f32, shift: f32, with_silu: bool) {
    #[cfg(target_arch = "x86_64")]
    if super::x86::normalise_row(d, s, mean, scale, shift, with_silu) {
        return;
    }
    if with_silu {
        for (d, &x) in d.iter_mut().zip(s) {
            *d = silu((x - mean) * scale + shift);
        }
    } else {
        for (d, &x) in d.iter_mut().zip(s) {
            *d = (x - mean) * scale + shift;
        }
    }
}

impl CustomOp1 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(self.name(), storage, layout)?;
        let dims = layout.shape().dims();
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups * spatial;
        let mut out = vec![0f32; input.len()];
        if per_group == 0 {
            return Ok((CpuStorage::F32(out), layout.shape().clone()));
        }
        out.par_chunks_mut(per_group)
            .zip(input.par_chunks(per_group))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let count = per_group as f64;
                let mean = blocked_sum(src, |x| x) / count;
                let m = mean as f32;
                let var = blocked_sum(src, |x| (x - m) * (x - m)) / count;
                let rstd = 1.0 / (var + self.eps).sqrt();
                let first = (i % self.groups) * (c / self.groups);
                for (j, (d, s)) in dst
                    .chunks_exact_mut(spatial)
                    .zip(src.chunks_exact(spatial))
                    .enumerate()
                {
                    let ch = first + j;
                    let a = (self.weight[ch] as f64 * rstd) as f32;
                    normalise_row(d, s, m, a, self.bias[ch], self.silu);
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
