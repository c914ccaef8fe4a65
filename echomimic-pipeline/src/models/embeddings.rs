//! Timestep embedding of both UNets.
//!
//! Mirrors diffusers 0.24 `models/embeddings.py` (`get_timestep_embedding`,
//! `Timesteps`, `TimestepEmbedding`), used by EchoMimic's
//! `UNet2DConditionModel` and `EchoUNet3DConditionModel`
//! (BadToBest/EchoMimic @ 76cdab1).
//!
//! Keys: `time_embedding.linear_1.{weight,bias}`,
//! `time_embedding.linear_2.{weight,bias}`; `time_proj` has no weights.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// Sinusoidal projection of a timestep (diffusers `Timesteps`).
#[derive(Debug, Clone)]
pub struct Timesteps {
    num_channels: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
}

/// Largest period of the sinusoids (diffusers `max_period`).
const MAX_PERIOD: f64 = 10_000.0;

impl Timesteps {
    /// `num_channels` sinusoids; `[cos, sin]` order when `flip_sin_to_cos`.
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            num_channels,
            flip_sin_to_cos,
            downscale_freq_shift,
        }
    }

    /// Embeds one timestep: `[1, num_channels]` in `dtype`.
    ///
    /// Computed on the host in f32, in the order of operations of
    /// `get_timestep_embedding` (exponent, division by `half - shift`, exp,
    /// multiply by `t`, sin/cos), then cast, as the reference does.
    pub fn forward(&self, timestep: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        let half = self.num_channels / 2;
        let t = timestep as f32;
        let log_period = -(MAX_PERIOD.ln() as f32);
        let denom = half as f32 - self.downscale_freq_shift as f32;
        let args: Vec<f32> = (0..half)
            .map(|k| t * ((log_period * k as f32) / denom).exp())
            .collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        let mut emb: Vec<f32> = if self.flip_sin_to_cos {
            cos.chain(sin).collect()
        } else {
            sin.chain(cos).collect()
        };
        // Odd widths are zero-padded at the end.
        emb.resize(self.num_channels, 0.0);
        Tensor::from_vec(emb, (1, self.num_channels), device)?.to_dtype(dtype)
    }
}

/// `Linear → SiLU → Linear` (diffusers `TimestepEmbedding`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_channels → time_embed_dim → time_embed_dim`.
    pub fn new(vb: VarBuilder<'_>, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: candle_nn::linear(in_channels, time_embed_dim, vb.pp("linear_1"))?,
            linear_2: candle_nn::linear(time_embed_dim, time_embed_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cos_sin_order_and_zero_timestep() -> Result<()> {
        let tp = Timesteps::new(6, true, 0.0);
        let e = tp
            .forward(0.0, DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        assert_eq!(e[0], vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        let e = tp
            .forward(3.0, DType::F32, &Device::Cpu)?
            .to_vec2::<f32>()?;
        // k = 0 has frequency 1: [cos 3, .., sin 3, ..].
        assert!((e[0][0] - 3f32.cos()).abs() < 1e-7);
        assert!((e[0][3] - 3f32.sin()).abs() < 1e-7);
        // k = 2 has frequency 10000^(-2/3).
        let f = 10_000f64.powf(-2.0 / 3.0) * 3.0;
        assert!((e[0][5] as f64 - f.sin()).abs() < 1e-6);
        let e = Timesteps::new(6, false, 1.0).forward(3.0, DType::F32, &Device::Cpu)?;
        let e = e.to_vec2::<f32>()?;
        // shift 1: divisor half - 1 = 2, so k = 2 has frequency 1/10000.
        assert!((e[0][2] as f64 - (3e-4f64).sin()).abs() < 1e-7);
        Ok(())
    }
}
