//! The OpenAI Whisper audio encoder, returning the per-layer stack EchoMimic uses.
//!
//! Mirrors `AudioEncoder` in `whisper/model.py` as vendored by EchoMimic
//! (`src/models/whisper/whisper/model.py` @ 76cdab1, a MuseTalk copy of
//! openai/whisper whose `forward(x, include_embeddings=True)` also returns
//! the hidden state after the positional embedding and after every block).
//!
//! Checkpoint: `pretrained_weights/audio_processor/whisper_tiny.pt`, OpenAI's
//! format `{"dims": {...}, "model_state_dict": {...}}` with fp16 tensors and
//! OpenAI key names under `encoder.`: `conv1`, `conv2`,
//! `positional_embedding` (loaded, not recomputed), `blocks.{i}.attn.{query,
//! key,value,out}` (`key` has no bias), `blocks.{i}.attn_ln`,
//! `blocks.{i}.mlp.{0,2}`, `blocks.{i}.mlp_ln`. `ln_post` exists but its output
//! is not used by EchoMimic, so it is not loaded.
//!
//! Layout: input log-mel `(batch, n_mels, 3000)`; output
//! `(batch, n_audio_ctx, n_audio_layer + 1, n_audio_state)`.
//!
//! Precision follows the reference on CUDA (fp16 activations): linear and
//! convolution weights in the chosen dtype, LayerNorm and softmax in f32, the
//! positional embedding added in f32 and rounded back.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, Linear, VarBuilder};

use crate::kernels::{self, attention};

/// LayerNorm epsilon (PyTorch default).
const LN_EPS: f32 = 1e-5;
/// Mel frames in one encoder window (30 s); the reference hard-codes it.
pub const N_FRAMES: usize = 3000;

/// `ModelDimensions` of the checkpoint's `dims` entry. Only the `n_mels` and
/// `n_audio_*` fields are used; the text-side sizes are kept for reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDimensions {
    /// Mel bands of the input (80; 128 for large-v3).
    pub n_mels: usize,
    /// Encoder positions (1500 = 3000 mel frames / 2).
    pub n_audio_ctx: usize,
    /// Encoder width D.
    pub n_audio_state: usize,
    /// Encoder attention heads (not inferable from the weight shapes).
    pub n_audio_head: usize,
    /// Encoder blocks L.
    pub n_audio_layer: usize,
    /// Vocabulary size (decoder, unused).
    pub n_vocab: usize,
    /// Decoder context (unused).
    pub n_text_ctx: usize,
    /// Decoder width (unused).
    pub n_text_state: usize,
    /// Decoder heads (unused).
    pub n_text_head: usize,
    /// Decoder blocks (unused).
    pub n_text_layer: usize,
}

impl ModelDimensions {
    /// Checks the encoder sizes; the message names the offending field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_mels == 0 || self.n_audio_state == 0 || self.n_audio_head == 0 {
            return Err(format!(
                "n_mels ({}), n_audio_state ({}) and n_audio_head ({}) must be positive",
                self.n_mels, self.n_audio_state, self.n_audio_head
            ));
        }
        if !self.n_audio_state.is_multiple_of(self.n_audio_head) {
            return Err(format!(
                "n_audio_state {} is not a multiple of n_audio_head {}",
                self.n_audio_state, self.n_audio_head
            ));
        }
        if self.n_audio_ctx * 2 != N_FRAMES {
            return Err(format!(
                "n_audio_ctx {} does not match the 30 s window ({} mel frames -> {} positions)",
                self.n_audio_ctx,
                N_FRAMES,
                N_FRAMES / 2
            ));
        }
        Ok(())
    }

    /// Feature layers per time step: the embedding plus one per block.
    pub fn n_feature_layers(&self) -> usize {
        self.n_audio_layer + 1
    }
}

/// Whisper's `LayerNorm`: computed in f32 whatever the activation dtype, then
/// cast back.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim` (kept in f32).
    pub fn new(vb: VarBuilder<'_>, dim: usize) -> Result<Self> {
        let weight = vb
            .get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?
            .to_dtype(DType::F32)?;
        let bias = vb
            .get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?
            .to_dtype(DType::F32)?;
        Ok(Self { weight, bias })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let ys = candle_nn::ops::layer_norm(
            &xs.to_dtype(DType::F32)?,
            &self.weight,
            &self.bias,
            LN_EPS,
        )?;
        ys.to_dtype(dtype)
    }
}

/// `MultiHeadAttention` (self-attention only, as in the encoder).
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    n_head: usize,
}

impl MultiHeadAttention {
    /// Loads `query` (with bias), `key` (no bias), `value`, `out`.
    pub fn new(vb: VarBuilder<'_>, n_state: usize, n_head: usize) -> Result<Self> {
        Ok(Self {
            query: candle_nn::linear(n_state, n_state, vb.pp("query"))?,
            key: candle_nn::linear_no_bias(n_state, n_state, vb.pp("key"))?,
            value: candle_nn::linear(n_state, n_state, vb.pp("value"))?,
            out: candle_nn::linear(n_state, n_state, vb.pp("out"))?,
            n_head,
        })
    }

    /// `xs`: `(batch, time, n_state)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // 1. Projections.
        let q = self.query.forward(xs)?;
        let k = self.key.forward(xs)?;
        let v = self.value.forward(xs)?;
        // 2. qkv_attention: q and k are each scaled by d_head^-0.25, the
        //    scores are soft-maxed in f32.
        let d_head = xs.dim(2)? / self.n_head;
        let scale = (d_head as f64).powf(-0.25);
        let wv = attention(&(q * scale)?, &(k * scale)?, &v, None, self.n_head, 1.0)?;
        // 3. Output projection.
        self.out.forward(&wv)
    }
}

/// `ResidualAttentionBlock` without cross-attention (encoder blocks).
#[derive(Debug, Clone)]
pub struct ResidualAttentionBlock {
    attn: MultiHeadAttention,
    attn_ln: LayerNorm,
    /// `mlp.0`: Linear(n_state, 4·n_state).
    mlp_0: Linear,
    /// `mlp.2`: Linear(4·n_state, n_state) (`mlp.1` is the GELU).
    mlp_2: Linear,
    mlp_ln: LayerNorm,
}

impl ResidualAttentionBlock {
    /// Loads one `encoder.blocks.{i}`.
    pub fn new(vb: VarBuilder<'_>, n_state: usize, n_head: usize) -> Result<Self> {
        let n_mlp = 4 * n_state;
        Ok(Self {
            attn: MultiHeadAttention::new(vb.pp("attn"), n_state, n_head)?,
            attn_ln: LayerNorm::new(vb.pp("attn_ln"), n_state)?,
            mlp_0: candle_nn::linear(n_state, n_mlp, vb.pp("mlp").pp(0))?,
            mlp_2: candle_nn::linear(n_mlp, n_state, vb.pp("mlp").pp(2))?,
            mlp_ln: LayerNorm::new(vb.pp("mlp_ln"), n_state)?,
        })
    }
}

impl Module for ResidualAttentionBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // 1. x = x + attn(attn_ln(x))
        let xs = (xs + self.attn.forward(&self.attn_ln.forward(xs)?)?)?;
        // 2. x = x + mlp(mlp_ln(x)), mlp = Linear -> GELU (erf) -> Linear
        let h = kernels::gelu_erf(&self.mlp_0.forward(&self.mlp_ln.forward(&xs)?)?)?;
        xs + self.mlp_2.forward(&h)?
    }
}

/// `AudioEncoder` up to (not including) `ln_post`.
#[derive(Debug, Clone)]
pub struct AudioEncoder {
    conv1: Conv1d,
    conv2: Conv1d,
    /// `(n_audio_ctx, n_audio_state)`, kept in f32.
    positional_embedding: Tensor,
    blocks: Vec<ResidualAttentionBlock>,
    dims: ModelDimensions,
}

impl AudioEncoder {
    /// Loads the encoder from a `VarBuilder` rooted at `encoder`; weights are
    /// cast to the builder's dtype.
    pub fn new(vb: VarBuilder<'_>, dims: &ModelDimensions) -> Result<Self> {
        dims.validate().map_err(candle_core::Error::Msg)?;
        let n_state = dims.n_audio_state;
        let conv1 = candle_nn::conv1d(
            dims.n_mels,
            n_state,
            3,
            Conv1dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("conv1"),
        )?;
        let conv2 = candle_nn::conv1d(
            n_state,
            n_state,
            3,
            Conv1dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            },
            vb.pp("conv2"),
        )?;
        let positional_embedding = vb
            .get_with_hints(
                (dims.n_audio_ctx, n_state),
                "positional_embedding",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?
            .to_dtype(DType::F32)?;
        let blocks = (0..dims.n_audio_layer)
            .map(|i| ResidualAttentionBlock::new(vb.pp("blocks").pp(i), n_state, dims.n_audio_head))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv1,
            conv2,
            positional_embedding,
            blocks,
            dims: *dims,
        })
    }

    /// The dimensions the encoder was built with.
    pub fn dims(&self) -> &ModelDimensions {
        &self.dims
    }

    /// Runs the encoder on `mel` `(batch, n_mels, 3000)` and returns the stack
    /// `[x after the positional embedding, output of block 0, …, block L−1]`
    /// as `(batch, n_audio_ctx, L + 1, n_audio_state)` in the weights' dtype.
    pub fn forward_embeddings(&self, mel: &Tensor) -> Result<Tensor> {
        let dtype = self.conv1.weight().dtype();
        let xs = mel.to_dtype(dtype)?;
        // 1. conv1 -> GELU -> conv2 (stride 2) -> GELU
        let xs = kernels::gelu_erf(&self.conv1.forward(&xs)?)?;
        let xs = kernels::gelu_erf(&self.conv2.forward(&xs)?)?;
        // 2. (batch, state, time) -> (batch, time, state), + positional embedding
        let xs = xs.transpose(1, 2)?;
        let (_, time, state) = xs.dims3()?;
        if (time, state) != self.positional_embedding.dims2()? {
            candle_core::bail!(
                "whisper encoder: input gives {time}x{state} positions, the positional embedding is {:?} (the mel input must have {N_FRAMES} frames)",
                self.positional_embedding.dims()
            );
        }
        let mut xs = xs
            .to_dtype(DType::F32)?
            .broadcast_add(&self.positional_embedding)?
            .to_dtype(dtype)?;
        // 3. Blocks, keeping every intermediate state.
        let mut stack = Vec::with_capacity(self.blocks.len() + 1);
        stack.push(xs.clone());
        for block in &self.blocks {
            xs = block.forward(&xs)?;
            stack.push(xs.clone());
        }
        // 4. (batch, time, L+1, state); ln_post is not applied.
        Tensor::stack(&stack, 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn dims(state: usize, head: usize, layer: usize) -> ModelDimensions {
        ModelDimensions {
            n_mels: 80,
            n_audio_ctx: 1500,
            n_audio_state: state,
            n_audio_head: head,
            n_audio_layer: layer,
            n_vocab: 10,
            n_text_ctx: 4,
            n_text_state: state,
            n_text_head: head,
            n_text_layer: 1,
        }
    }

    #[test]
    fn stack_shape_and_validation() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let enc = AudioEncoder::new(vb, &dims(16, 2, 3))?;
        let mel = Tensor::randn(0f32, 1.0, (1, 80, N_FRAMES), &Device::Cpu)?;
        let out = enc.forward_embeddings(&mel)?;
        assert_eq!(out.dims(), &[1, 1500, 4, 16]);
        let short = Tensor::zeros((1, 80, 100), DType::F32, &Device::Cpu)?;
        assert!(enc.forward_embeddings(&short).is_err());
        assert!(dims(16, 3, 1).validate().is_err());
        let mut bad_ctx = dims(16, 2, 1);
        bad_ctx.n_audio_ctx = 1000;
        assert!(bad_ctx.validate().is_err());
        Ok(())
    }
}
