//! Attention, feed-forward and the spatial transformer blocks of both UNets,
//! with EchoMimic's reference attention ("bank") made explicit.
//!
//! Mirrors diffusers 0.24 `Attention` (`to_q`/`to_k`/`to_v` without bias,
//! `to_out.0` with bias), `FeedForward` + `GEGLU` (exact-erf GELU), and
//! EchoMimic's `src/models/attention.py` (`BasicTransformerBlock`,
//! `TemporalBasicTransformerBlock`) as patched by
//! `src/models/mutual_self_attention.py` (`ReferenceAttentionControl`,
//! BadToBest/EchoMimic @ 76cdab1):
//!
//! * write mode (reference UNet, [`BasicTransformerBlock`]): the `norm1`
//!   output of every block is recorded in a [`Bank`], keyed by the block's
//!   checkpoint path;
//! * read mode (denoising UNet, [`TemporalBasicTransformerBlock`]): `attn1`
//!   attends over `[own tokens, bank tokens]`, except for the unconditional
//!   half of a CFG batch, which gets plain self-attention; then the audio
//!   cross-attention (`attn2`, scaled by 3.0) and the feed-forward.
//!
//! The Python code keeps the bank as hidden module state; here it is a value
//! passed in and out. [`PreparedBank`] holds `to_k`/`to_v` of every bank
//! entry, computed once per video (they never change across steps/windows).
//!
//! Token tensors are `[N, L, C]`; in the denoising UNet `N = B·F` with
//! batch-major rows `b·F + f`.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::kernels::{self, SharedKv};

/// Weight of the audio cross-attention output (`audio_feature_ratio`, a
/// hard-coded default argument of the patched block forward).
pub const AUDIO_FEATURE_RATIO: f64 = 3.0;

/// LayerNorm eps of every transformer block (PyTorch default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// LayerNorm over the last axis with affine parameters.
///
/// Statistics are computed in two passes (mean, then variance of the centred
/// values) and in f32 for half-precision inputs, as PyTorch does; the affine
/// part is applied in f32 before casting back.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight`/`bias` of width `dim` at `vb`.
    pub fn new(vb: VarBuilder<'_>, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb
                .get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?
                .to_dtype(DType::F32)?,
            bias: vb
                .get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?
                .to_dtype(DType::F32)?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::kernels::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

/// Multi-head attention (diffusers `Attention` with the default processor):
/// `to_out.0(softmax(q·kᵀ/√d)·v)`, softmax in f32, chunked over queries.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `query_dim` in and out, keys/values from `context_dim`
    /// (`None` = self-attention), `heads × head_dim` inner width.
    pub fn new(
        vb: VarBuilder<'_>,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: candle_nn::linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: candle_nn::linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `xs`: `[N, Lq, C]`; `context`: `[N, Lk, D]` or `None` for
    /// self-attention. Returns `[N, Lq, C]`.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let _span = tracing::trace_span!("attention").entered();
        let q = self.query(xs)?;
        let (k, v) = self.key_value(context.unwrap_or(xs))?;
        self.attend(&q, &k, &v, None)
    }

    /// Self-attention of `xs` `[B·F, L, C]` over the `frames` rows of every position (the
    /// motion module's temporal attention), in the same layout.
    pub fn forward_over_frames(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let _span = tracing::trace_span!("attention").entered();
        let q = self.query(xs)?;
        let (k, v) = self.key_value(xs)?;
        let a = kernels::frame_attention(&q, &k, &v, frames, self.heads, self.scale)?;
        kernels::linear(&self.to_out, &a)
    }

    /// `to_q`: `[N, L, H·Dh]`.
    pub fn query(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::linear(&self.to_q, xs)
    }

    /// `to_k`, `to_v`: `[N, L, H·Dh]` each.
    pub fn key_value(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            kernels::linear(&self.to_k, context)?,
            kernels::linear(&self.to_v, context)?,
        ))
    }

    /// Attention of queries over keys/values (and the shared ones, for the items that see
    /// them), all as the projections wrote them, then `to_out.0`: `[N, Lq, C]`.
    pub fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        shared: Option<SharedKv<'_>>,
    ) -> Result<Tensor> {
        let a = kernels::attention(q, k, v, shared, self.heads, self.scale)?;
        kernels::linear(&self.to_out, &a)
    }
}

/// `proj` to twice the inner width, split into `[x, gate]` (in that order),
/// `x · GELU_erf(gate)` (diffusers `GEGLU`).
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
}

impl GeGlu {
    /// `dim → 2·inner` projection at `vb.proj`.
    pub fn new(vb: VarBuilder<'_>, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj: candle_nn::linear(dim, 2 * inner, vb.pp("proj"))?,
        })
    }
}

impl Module for GeGlu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        kernels::geglu(&kernels::linear(&self.proj, xs)?)
    }
}

/// diffusers `FeedForward` with GEGLU and `mult = 4`: keys `net.0.proj.*`
/// (`dim → 8·dim`) and `net.2.*` (`4·dim → dim`); `net.1` is a dropout.
#[derive(Debug, Clone)]
pub struct FeedForward {
    net_0: GeGlu,
    net_2: Linear,
}

impl FeedForward {
    /// Loads the feed-forward of width `dim` at `vb`.
    pub fn new(vb: VarBuilder<'_>, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let net = vb.pp("net");
        Ok(Self {
            net_0: GeGlu::new(net.pp("0"), dim, inner)?,
            net_2: candle_nn::linear(inner, dim, net.pp("2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _span = tracing::trace_span!("feed_forward").entered();
        kernels::linear(&self.net_2, &self.net_0.forward(xs)?)
    }
}

// ------------------------------------------------------------------------------------------
// Bank
// ------------------------------------------------------------------------------------------

/// Reference features written by the reference UNet: for every transformer
/// block, its `norm1` output `[N_ref, L, C]`, keyed by the block's checkpoint
/// path (e.g. `down_blocks.0.attentions.0.transformer_blocks.0`). The
/// denoising UNet block with the same path reads it.
#[derive(Debug, Clone, Default)]
pub struct Bank {
    entries: BTreeMap<String, Tensor>,
}

impl Bank {
    /// An empty bank.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `features` for the block at `path` (replacing any previous entry).
    pub fn insert(&mut self, path: impl Into<String>, features: Tensor) {
        self.entries.insert(path.into(), features);
    }

    /// The features of the block at `path`.
    pub fn get(&self, path: &str) -> Option<&Tensor> {
        self.entries.get(path)
    }

    /// Entries sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(String, Tensor)> for Bank {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        Self {
            entries: iter.into_iter().collect(),
        }
    }
}

/// How bank features are rounded before a reader uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BankRounding {
    /// Round to f16 and back, as the official code does whatever the model
    /// dtype (`ReferenceAttentionControl.update(dtype=torch.float16)`).
    #[default]
    F16,
    /// Use the features as written.
    Exact,
}

/// `to_k`/`to_v` of one bank entry: `[N_ref, L, H·Dh]`.
#[derive(Debug, Clone)]
pub struct BankKv {
    k: Tensor,
    v: Tensor,
}

/// The bank as the denoising UNet reads it: `to_k(bank)` and `to_v(bank)`
/// of every reader block, computed once per reference image (they do not
/// depend on the timestep or on the latents).
///
/// Build it with `UNet3DConditionModel::prepare_bank`, which checks that
/// every reader block has its entry; [`PreparedBank::empty`] runs the UNet
/// without reference features (every block does plain self-attention, as the
/// official code does with empty banks).
#[derive(Debug, Clone, Default)]
pub struct PreparedBank {
    entries: HashMap<String, BankKv>,
}

impl PreparedBank {
    /// No reference features.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Number of reader blocks covered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no block has reference features.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn insert(&mut self, path: String, kv: BankKv) {
        self.entries.insert(path, kv);
    }

    fn get(&self, path: &str) -> Option<&BankKv> {
        self.entries.get(path)
    }
}

// ------------------------------------------------------------------------------------------
// Transformer blocks
// ------------------------------------------------------------------------------------------

/// Reference-UNet transformer block in write mode: self-attention + GEGLU
/// feed-forward, no `attn2`/`norm2`. Keys: `norm1`, `attn1`, `norm3`, `ff`.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    path: String,
}

impl BasicTransformerBlock {
    /// Width `dim`, `heads` heads of `dim / heads`.
    pub fn new(vb: VarBuilder<'_>, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, dim / heads)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            path: vb.prefix(),
        })
    }

    /// The block's checkpoint path (its bank key).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `xs`: `[N, L, C]`. Records `norm1(xs)` in `bank` under [`Self::path`].
    pub fn forward(&self, xs: &Tensor, bank: &mut Bank) -> Result<Tensor> {
        let _span = tracing::trace_span!("transformer_block").entered();
        // 1. n = norm1(h); bank ← n
        let n = self.norm1.forward(xs)?;
        bank.insert(self.path.clone(), n.clone());
        // 2. h += attn1(n)
        let xs = (xs + self.attn1.forward(&n, None)?)?;
        // 3. h += ff(norm3(h))
        &xs + self.ff.forward(&self.norm3.forward(&xs)?)?
    }
}

/// Denoising-UNet transformer block in read mode. Keys: `norm1`, `attn1`,
/// `norm2`, `attn2` (keys/values from the audio width), `norm3`, `ff`.
#[derive(Debug, Clone)]
pub struct TemporalBasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    path: String,
}

impl TemporalBasicTransformerBlock {
    /// Width `dim`, `heads` heads of `dim / heads`, audio tokens of width
    /// `cross_attention_dim`.
    pub fn new(
        vb: VarBuilder<'_>,
        dim: usize,
        heads: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
            )?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, LAYER_NORM_EPS)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            path: vb.prefix(),
        })
    }

    /// The block's checkpoint path (the bank key it reads).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `to_k`/`to_v` of this block's bank entry `[N_ref, L, C]`.
    pub fn prepare_bank(&self, features: &Tensor, rounding: BankRounding) -> Result<BankKv> {
        let (n_ref, _, width) = features.dims3()?;
        if n_ref != 1 {
            candle_core::bail!(
                "bank entry of {} has batch {n_ref}; the reference UNet runs on one image",
                self.path
            );
        }
        let weight = self.attn1.to_k.weight();
        let dim = weight.dim(1)?;
        if width != dim {
            candle_core::bail!(
                "bank entry of {} has width {width}, the block has {dim} channels",
                self.path
            );
        }
        let (dtype, features) = (weight.dtype(), features.to_device(weight.device())?);
        let features = match rounding {
            BankRounding::F16 => features.to_dtype(DType::F16)?.to_dtype(dtype)?,
            BankRounding::Exact => features.to_dtype(dtype)?,
        };
        let (k, v) = self.attn1.key_value(&features)?;
        Ok(BankKv { k, v })
    }

    /// `xs`: `[B·F, L, C]`; `audio`: `[B·F, N, D]`; the first `uncond_rows`
    /// rows (the unconditional half of a CFG batch) attend without the bank.
    pub fn forward(
        &self,
        xs: &Tensor,
        audio: &Tensor,
        bank: &PreparedBank,
        uncond_rows: usize,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("temporal_transformer_block").entered();
        // 1. n = norm1(h)
        let n = self.norm1.forward(xs)?;
        // 2. reference attention: q from n, k/v from [n, bank] for the
        //    conditional rows, from n alone for the unconditional rows
        let q = self.attn1.query(&n)?;
        let (k, v) = self.attn1.key_value(&n)?;
        let shared = match bank.get(&self.path) {
            None => None,
            Some(kv) => {
                let rows = q.dim(0)?;
                if uncond_rows > rows {
                    candle_core::bail!("{uncond_rows} unconditional rows out of {rows}");
                }
                Some(SharedKv {
                    k: &kv.k,
                    v: &kv.v,
                    from_item: uncond_rows,
                })
            }
        };
        let a = self.attn1.attend(&q, &k, &v, shared)?;
        let xs = (xs + a)?;
        // 3. audio cross-attention, weighted by 3.0
        let a2 = self.attn2.forward(&self.norm2.forward(&xs)?, Some(audio))?;
        let xs = (xs + (a2 * AUDIO_FEATURE_RATIO)?)?;
        // 4. h += ff(norm3(h))
        &xs + self.ff.forward(&self.norm3.forward(&xs)?)?
    }
}
