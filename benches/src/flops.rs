//! Analytic FLOP counts of the networks, for achieved-FLOP/s figures and for
//! normalising timings of networks that do different amounts of work.
//!
//! Convention (the same as PyTorch's `torch.utils.flop_counter`, which the
//! Python baseline uses for diffusers): only matrix products count, at
//! 2 FLOPs per multiply-add —
//!
//! * convolution `k×k`, `C_in → C_out`, output `H'×W'`: `2·C_in·C_out·k²·H'·W'` per image;
//! * linear `D_in → D_out` on `T` tokens: `2·D_in·D_out·T`;
//! * attention with `L_q` queries over `L_k` keys of total width `C`
//!   (all heads): `2·L_q·L_k·C` for `q·kᵀ` plus the same for `p·v`.
//!
//! Norms, activations, softmax and element-wise ops are not counted (they are
//! memory-bound and a few percent of the total).

use echomimic_pipeline::config::{AutoencoderKLConfig, MotionModuleKwargs};
use echomimic_pipeline::config::{
    DownBlockType, UNet2DConditionConfig, UnetAdditionalKwargs, UpBlockType,
};

/// What one UNet call computes besides the plain SD-1.x network.
#[derive(Debug, Clone)]
pub struct UNetCall {
    /// Images in the call (`B·F` for the denoising UNet).
    pub rows: usize,
    /// Frames per video (the motion modules attend over them).
    pub frames: usize,
    /// Latent height and width.
    pub height: usize,
    /// Latent width.
    pub width: usize,
    /// Cross-attention context `(tokens, width)` per image; `None` = no `attn2`
    /// (the reference UNet).
    pub context: Option<(usize, usize)>,
    /// Rows whose self-attention also attends over a reference bank of the
    /// same token count (the conditional half of a CFG batch; every row in
    /// acc mode).
    pub bank_rows: usize,
    /// Motion modules (the denoising UNet's `unet_additional_kwargs`), if any.
    pub motion: Option<UnetAdditionalKwargs>,
    /// Whether `conv_norm_out`/`conv_out` run (not in the reference UNet).
    pub conv_out: bool,
    /// Rows the time embedding and the resnets' `time_emb_proj` run on
    /// (diffusers: every image; ours: 1, the timestep is shared).
    pub temb_rows: usize,
}

impl UNetCall {
    /// One reference-UNet call: a single image, no `attn2`, no bank, no motion
    /// modules, no `conv_out`.
    pub fn reference(height: usize, width: usize) -> Self {
        Self {
            rows: 1,
            frames: 1,
            height,
            width,
            context: None,
            bank_rows: 0,
            motion: None,
            conv_out: false,
            temb_rows: 1,
        }
    }

    /// One denoising-UNet call on `batch` videos of `frames` frames with the
    /// audio `context` `(tokens, width)` per frame; `bank_rows` rows read the
    /// bank; motion modules as `motion`.
    pub fn denoising(
        batch: usize,
        frames: usize,
        (height, width): (usize, usize),
        context: (usize, usize),
        bank_rows: usize,
        motion: Option<UnetAdditionalKwargs>,
    ) -> Self {
        Self {
            rows: batch * frames,
            frames,
            height,
            width,
            context: Some(context),
            bank_rows,
            motion,
            conv_out: true,
            temb_rows: 1,
        }
    }
}

fn conv(c_in: usize, c_out: usize, k: usize, hw: usize) -> f64 {
    2.0 * (c_in * c_out * k * k * hw) as f64
}

fn linear(d_in: usize, d_out: usize, tokens: usize) -> f64 {
    2.0 * (d_in * d_out * tokens) as f64
}

fn sdpa(l_q: usize, l_k: usize, width: usize) -> f64 {
    4.0 * (l_q * l_k * width) as f64
}

fn resnet(c_in: usize, c_out: usize, hw: usize, rows: usize, temb: usize, temb_rows: usize) -> f64 {
    let mut f = rows as f64 * (conv(c_in, c_out, 3, hw) + conv(c_out, c_out, 3, hw));
    if c_in != c_out {
        f += rows as f64 * conv(c_in, c_out, 1, hw);
    }
    f + linear(temb, c_out, temb_rows)
}

/// GEGLU feed-forward (`C → 8C`, `4C → C`) on `tokens` tokens.
fn feed_forward(c: usize, tokens: usize) -> f64 {
    linear(c, 8 * c, tokens) + linear(4 * c, c, tokens)
}

/// Spatial transformer (one block) at width `c` on `hw` tokens per image.
fn transformer(c: usize, hw: usize, call: &UNetCall) -> f64 {
    let t = call.rows * hw;
    // proj_in + proj_out (1×1 convs or linears: the same count)
    let mut f = 2.0 * linear(c, c, t);
    // attn1: q, k, v, out on the own tokens; keys = own (+ bank) tokens.
    // The bank's k/v projections are computed once per video, not per call.
    f += 4.0 * linear(c, c, t);
    f += (call.rows - call.bank_rows) as f64 * sdpa(hw, hw, c);
    f += call.bank_rows as f64 * sdpa(hw, 2 * hw, c);
    // attn2: q, out on the tokens; k, v on the context
    if let Some((n, d)) = call.context {
        f += 2.0 * linear(c, c, t) + 2.0 * linear(d, c, call.rows * n);
        f += call.rows as f64 * sdpa(hw, n, c);
    }
    f + feed_forward(c, t)
}

/// AnimateDiff temporal transformer at width `c` on `hw` tokens per image.
fn motion_module(c: usize, hw: usize, call: &UNetCall, kw: &MotionModuleKwargs) -> f64 {
    let t = call.rows * hw;
    let inner =
        kw.num_attention_heads * (c / kw.num_attention_heads / kw.temporal_attention_dim_div);
    let mut f = linear(c, inner, t) + linear(inner, c, t);
    let attn = 4.0 * linear(inner, inner, t) + t as f64 * 4.0 * (call.frames * inner) as f64;
    let block = kw.attention_block_types.len() as f64 * attn + feed_forward(inner, t);
    f += kw.num_transformer_block as f64 * block;
    f
}

/// FLOPs of one UNet call.
pub fn unet(cfg: &UNet2DConditionConfig, call: &UNetCall) -> f64 {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let temb = 4 * boc[0];
    let rows = call.rows;
    let motion_at = |res: usize, kind: MotionSite| -> Option<&MotionModuleKwargs> {
        let extra = call.motion.as_ref()?;
        if !extra.use_motion_module {
            return None;
        }
        let on = match kind {
            MotionSite::Down => {
                !extra.motion_module_decoder_only && extra.motion_module_resolutions.contains(&res)
            }
            MotionSite::Mid => extra.motion_module_mid_block,
            MotionSite::Up => extra.motion_module_resolutions.contains(&res),
        };
        on.then_some(&extra.motion_module_kwargs)
    };
    // Spatial size per level (stride-2 convs with padding 1 round up).
    let mut sizes = vec![(call.height, call.width)];
    for _ in 1..n {
        let (h, w) = sizes[sizes.len() - 1];
        sizes.push((h.div_ceil(2), w.div_ceil(2)));
    }
    let hw = |level: usize| sizes[level].0 * sizes[level].1;

    // time embedding, conv_in
    let mut f = linear(boc[0], temb, call.temb_rows) + linear(temb, temb, call.temb_rows);
    f += rows as f64 * conv(cfg.in_channels, boc[0], 3, hw(0));
    // down
    for (i, ty) in cfg.down_block_types.iter().enumerate() {
        let c_out = boc[i];
        for j in 0..cfg.layers_per_block {
            let c_in = if j == 0 {
                if i == 0 {
                    boc[0]
                } else {
                    boc[i - 1]
                }
            } else {
                c_out
            };
            f += resnet(c_in, c_out, hw(i), rows, temb, call.temb_rows);
            if *ty == DownBlockType::CrossAttnDownBlock {
                f += transformer(c_out, hw(i), call);
            }
            if let Some(kw) = motion_at(1 << i, MotionSite::Down) {
                f += motion_module(c_out, hw(i), call, kw);
            }
        }
        if i + 1 != n {
            f += rows as f64 * conv(c_out, c_out, 3, hw(i + 1));
        }
    }
    // mid: resnet, transformer, (motion), resnet
    let c = boc[n - 1];
    f += 2.0 * resnet(c, c, hw(n - 1), rows, temb, call.temb_rows);
    f += transformer(c, hw(n - 1), call);
    if let Some(kw) = motion_at(0, MotionSite::Mid) {
        f += motion_module(c, hw(n - 1), call, kw);
    }
    // up
    let rev = |j: usize| boc[n - 1 - j];
    for (i, ty) in cfg.up_block_types.iter().enumerate() {
        let level = n - 1 - i;
        let (c_out, c_in) = (rev(i), rev((i + 1).min(n - 1)));
        let prev = if i == 0 { rev(0) } else { rev(i - 1) };
        let layers = cfg.layers_per_block + 1;
        for j in 0..layers {
            let skip = if j + 1 == layers { c_in } else { c_out };
            let r_in = if j == 0 { prev } else { c_out };
            f += resnet(r_in + skip, c_out, hw(level), rows, temb, call.temb_rows);
            if *ty == UpBlockType::CrossAttnUpBlock {
                f += transformer(c_out, hw(level), call);
            }
            if i <= 3 {
                if let Some(kw) = motion_at(1 << (3 - i), MotionSite::Up) {
                    f += motion_module(c_out, hw(level), call, kw);
                }
            }
        }
        if i + 1 != n {
            f += rows as f64 * conv(c_out, c_out, 3, hw(level - 1));
        }
    }
    if call.conv_out {
        f += rows as f64 * conv(boc[0], cfg.out_channels, 3, hw(0));
    }
    f
}

#[derive(Clone, Copy)]
enum MotionSite {
    Down,
    Mid,
    Up,
}

/// FLOPs of the `to_k`/`to_v` projections of the bank (once per video).
pub fn bank_projections(cfg: &UNet2DConditionConfig, height: usize, width: usize) -> f64 {
    let n = cfg.block_out_channels.len();
    let mut sizes = vec![(height, width)];
    for _ in 1..n {
        let (h, w) = sizes[sizes.len() - 1];
        sizes.push((h.div_ceil(2), w.div_ceil(2)));
    }
    let mut f = 0.0;
    for (i, ty) in cfg.down_block_types.iter().enumerate() {
        if *ty == DownBlockType::CrossAttnDownBlock {
            let (c, hw) = (cfg.block_out_channels[i], sizes[i].0 * sizes[i].1);
            f += cfg.layers_per_block as f64 * 2.0 * linear(c, c, hw);
        }
    }
    let (c, hw) = (
        cfg.block_out_channels[n - 1],
        sizes[n - 1].0 * sizes[n - 1].1,
    );
    f += 2.0 * linear(c, c, hw);
    for (i, ty) in cfg.up_block_types.iter().enumerate() {
        if *ty == UpBlockType::CrossAttnUpBlock {
            let level = n - 1 - i;
            let (c, hw) = (
                cfg.block_out_channels[level],
                sizes[level].0 * sizes[level].1,
            );
            f += (cfg.layers_per_block + 1) as f64 * 2.0 * linear(c, c, hw);
        }
    }
    f
}

/// FLOPs of the VAE decoder on one `h×w` latent (`post_quant_conv`, mid
/// block with one single-head attention, up blocks).
pub fn vae_decode(cfg: &AutoencoderKLConfig, height: usize, width: usize) -> f64 {
    let boc = &cfg.block_out_channels;
    let n = boc.len();
    let lc = cfg.latent_channels;
    let mut hw = height * width;
    let top = boc[n - 1];
    let res = |c_in: usize, c_out: usize, hw: usize| resnet(c_in, c_out, hw, 1, 0, 0);
    let mut f = conv(lc, lc, 1, hw) + conv(lc, top, 3, hw);
    // mid: resnet, attention (q, k, v, out + scores), resnet
    f += 2.0 * res(top, top, hw) + 4.0 * linear(top, top, hw) + sdpa(hw, hw, top);
    let mut c_prev = top;
    for i in 0..n {
        let c = boc[n - 1 - i];
        for j in 0..=cfg.layers_per_block {
            f += res(if j == 0 { c_prev } else { c }, c, hw);
        }
        c_prev = c;
        if i + 1 != n {
            hw *= 4;
            f += conv(c, c, 3, hw);
        }
    }
    f + conv(boc[0], cfg.out_channels, 3, hw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(batch: usize, bank_rows: usize, frames: usize) -> UNetCall {
        let motion = Some(UnetAdditionalKwargs::default());
        UNetCall::denoising(batch, frames, (64, 64), (50, 384), bank_rows, motion)
    }

    /// Issue 8 puts the physical floor at ≈0.31 s (acc) and ≈2.7 s (normal)
    /// per video-second at 989 TFLOP/s: 16.2 acc calls (27 windows × 6 steps
    /// / 10 s), 81 CFG calls and 24 VAE frames per second of video.
    #[test]
    #[allow(clippy::print_stdout)]
    fn full_size_counts_match_the_issue_floor() {
        let cfg = UNet2DConditionConfig::default();
        let acc = unet(&cfg, &call(1, 12, 12));
        let cfg_call = unet(&cfg, &call(2, 12, 12));
        let vae = vae_decode(&AutoencoderKLConfig::default(), 64, 64);
        let acc_s = (16.2 * acc + 24.0 * vae) / 989e12;
        let normal_s = (81.0 * cfg_call + 24.0 * vae) / 989e12;
        println!(
            "acc call {:.3} TFLOP, CFG call {:.3} TFLOP, VAE frame {:.3} TFLOP; \
             floor acc {acc_s:.3} s, normal {normal_s:.3} s per video-second",
            acc / 1e12,
            cfg_call / 1e12,
            vae / 1e12
        );
        assert!((acc_s - 0.31).abs() < 0.03, "{acc_s}");
        // The issue's 2.7 s also counts the bank attention the official code
        // computes for the unconditional half and then throws away; ours
        // skips it, so our floor is lower (but above one acc call per CFG row).
        assert!(normal_s < 2.7 && normal_s > (81.0 * acc + 24.0 * vae) / 989e12);
        assert!(cfg_call < 2.0 * acc);
    }
}
