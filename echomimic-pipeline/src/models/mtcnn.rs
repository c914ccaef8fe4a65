//! MTCNN face detector (P-Net, R-Net, O-Net) and its three-stage cascade.
//!
//! EchoMimic v1 finds the face of the reference photo with facenet-pytorch 2.5.0
//! (`models/mtcnn.py` classes `PNet`, `RNet`, `ONet`, `MTCNN.detect`, and
//! `models/utils/detect_face.py::detect_face`, release commit
//! `1d75625` of timesler/facenet-pytorch), created as
//! `MTCNN(image_size=320, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709)`.
//! This module reproduces that detector number for number: the scale pyramid, the
//! `F.interpolate(mode="area")` resampling (PyTorch `adaptive_avg_pool2d`, same
//! summation order), `generateBoundingBox`, torchvision NMS per scale and across
//! scales, the box regression and squaring (`rerec`), the `pad` truncation, the
//! R-Net/O-Net crops, the final `'Min'` NMS with `+1` areas, and the area sort of
//! `MTCNN.detect`. All box arithmetic is done in `f32` in the same operation order as
//! the PyTorch code; the pyramid scales are `f64` as in Python.
//!
//! Weights: the facenet-pytorch `pnet.pt` / `rnet.pt` / `onet.pt` state dicts converted to
//! one safetensors file with the key prefixes `pnet.`, `rnet.`, `onet.`
//! (`echomimic-pipeline/assets/mtcnn/mtcnn.safetensors`; see [`crate::face`] for loading).
//! Field names equal the checkpoint key segments (`conv1`, `prelu1`, `dense4`, ...).
//!
//! Layout: the networks take `(batch, 3, height, width)` `f32` images normalised as
//! `(x - 127.5) * 0.0078125`; the cascade takes an 8-bit row-major `(height, width, 3)`
//! image and feeds its channels **in the order given**. EchoMimic passes OpenCV's BGR
//! array, so for parity the caller hands BGR bytes (see [`crate::face`]).
//!
//! Deviations, all on inputs where the Python code raises instead of answering:
//! * an image too small for a single pyramid level (shorter side below `min_face_size`,
//!   20 px) yields no detection (Python: `torch.cat` of an empty list);
//! * a candidate whose clamped crop is empty is dropped (Python: the crop list and the
//!   box list go out of step and indexing fails).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, linear, prelu, Conv2d, Linear, PReLU, VarBuilder};

use rayon::prelude::*;

use crate::kernels;

/// P-Net output cell size and stride in input pixels (hard-coded in `generateBoundingBox`).
const PNET_CELL: f32 = 12.0;
const PNET_STRIDE: f32 = 2.0;
/// Side of the R-Net and O-Net input crops.
const RNET_SIZE: usize = 24;
const ONET_SIZE: usize = 48;
/// NMS thresholds hard-coded in `detect_face`.
const PNET_SCALE_NMS: f64 = 0.5;
const PNET_CROSS_SCALE_NMS: f64 = 0.7;
const RNET_NMS: f64 = 0.7;
const ONET_NMS_MIN: f32 = 0.7;
/// Most P-Net candidates kept per pyramid level, and in all, before NMS (the highest
/// scores). The reference has no cap; real photos stay far below it (hundreds to a few
/// thousand), while a large noisy or adversarial image could otherwise feed millions of boxes
/// to the quadratic NMS and to R-Net.
pub const MAX_PNET_CANDIDATES: usize = 10_000;
/// Default for [`Mtcnn::with_pnet_strip_pixels`].
const PNET_MAX_STRIP_PIXELS: usize = 1 << 20;

/// Detector hyper-parameters (the arguments of facenet's `MTCNN(...)`).
#[derive(Debug, Clone, PartialEq)]
pub struct MtcnnConfig {
    /// Smallest face side to look for, in pixels (`min_face_size`, EchoMimic: 20).
    pub min_face_size: f64,
    /// Score thresholds of P-Net, R-Net and O-Net (EchoMimic: 0.6, 0.7, 0.7).
    pub thresholds: [f32; 3],
    /// Scale step of the image pyramid (EchoMimic: 0.709).
    pub factor: f64,
}

impl Default for MtcnnConfig {
    fn default() -> Self {
        Self {
            min_face_size: 20.0,
            thresholds: [0.6, 0.7, 0.7],
            factor: 0.709,
        }
    }
}

/// `nn.MaxPool2d(k, s, ceil_mode=True)` without padding: the last window may hang
/// over the bottom/right edge and then only covers the pixels that exist.
fn max_pool2d_ceil(xs: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    let (oh, ow) = (pooled_size(h, k, s), pooled_size(w, k, s));
    let (need_h, need_w) = ((oh - 1) * s + k, (ow - 1) * s + k);
    let mut xs = xs.clone();
    if need_w > w {
        let fill = Tensor::full(f32::NEG_INFINITY, (b, c, h, need_w - w), xs.device())?;
        xs = Tensor::cat(&[&xs, &fill], 3)?;
    }
    if need_h > h {
        let fill = Tensor::full(
            f32::NEG_INFINITY,
            (b, c, need_h - h, need_w.max(w)),
            xs.device(),
        )?;
        xs = Tensor::cat(&[&xs, &fill], 2)?;
    }
    xs.max_pool2d_with_stride(k, s)
}

/// facenet `PNet`: fully convolutional 12x12 face / no-face classifier with box regression.
#[derive(Debug, Clone)]
pub struct PNet {
    conv1: Conv2d,
    prelu1: PReLU,
    conv2: Conv2d,
    prelu2: PReLU,
    conv3: Conv2d,
    prelu3: PReLU,
    conv4_1: Conv2d,
    conv4_2: Conv2d,
    /// The same weights laid out for [`PNet::forward_planes`].
    planes: PNetPlanes,
}

/// A stride-1, unpadded convolution of one CPU image given as plain values, through the
/// crate's banded CPU convolution written into a buffer the caller reuses.
#[derive(Debug, Clone)]
struct PlaneConv {
    conv: kernels::PlaneConv2d,
    cout: usize,
}

impl PlaneConv {
    /// A CPU f32 copy of `conv`, with `stacked`'s output channels after its own when given
    /// (`conv4_1` over `conv4_2`, which read the same input).
    fn new(conv: &Conv2d, stacked: Option<&Conv2d>) -> Result<Self> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for part in std::iter::once(conv).chain(stacked) {
            let weight = cpu(part.weight())?;
            let (cout, _, kh, kw) = weight.dims4()?;
            if kh != kw {
                candle_core::bail!("P-Net convolutions are square, got {kh}x{kw}");
            }
            biases.push(match part.bias() {
                Some(b) => cpu(b)?,
                None => Tensor::zeros(cout, DType::F32, &Device::Cpu)?,
            });
            weights.push(weight);
        }
        let weight = Tensor::cat(&weights, 0)?;
        let (cout, _, _, _) = weight.dims4()?;
        let conv = Conv2d::new(weight, Some(Tensor::cat(&biases, 0)?), *conv.config());
        Ok(Self {
            conv: kernels::PlaneConv2d::new(conv)?,
            cout,
        })
    }

    /// `(cin, h, w)` in `x` -> `(cout, h - k + 1, w - k + 1)` in `out`; returns the size.
    fn forward(&self, x: &[f32], h: usize, w: usize, out: &mut Vec<f32>) -> Result<(usize, usize)> {
        self.conv.forward_into(x, (1, h, w), out)
    }
}

/// candle's `PReLU` (`max(x, 0) + min(x, 0) * a`, one `a` per channel).
#[inline(always)]
fn prelu1(v: f32, a: f32) -> f32 {
    v.max(0.0) + v.min(0.0) * a
}

/// [`prelu1`] in place on `(n, c, plane)` values (`c` = `alpha.len()`), the planes split
/// over rayon's pool.
fn prelu_planes(xs: &mut [f32], alpha: &[f32], plane: usize) {
    xs.par_chunks_mut(plane.max(1))
        .enumerate()
        .for_each(|(i, chunk)| {
            let a = alpha[i % alpha.len()];
            for v in chunk {
                *v = prelu1(*v, a);
            }
        });
}

/// Output size of a ceil-mode max pool of `k` by `s` over `n` inputs, without padding
/// (PyTorch drops a last window that would start past the input).
fn pooled_size(n: usize, k: usize, s: usize) -> usize {
    let mut o = (n.saturating_sub(k)).div_ceil(s) + 1;
    if (o - 1) * s >= n {
        o -= 1;
    }
    o
}

/// [`max_pool2d_ceil`] on `(c, h, w)` planes, each value first through its channel's
/// PReLU when `alpha` is given (plane `i` has slope `alpha[i % alpha.len()]`: `prelu` then
/// pool in one pass, the same values as the two in turn), the planes split over rayon's
/// pool. The result goes to `out` (cleared
/// first); returns its size.
fn prelu_max_pool_planes(
    xs: &[f32],
    alpha: Option<&[f32]>,
    (c, h, w): (usize, usize, usize),
    (k, s): (usize, usize),
    out: &mut Vec<f32>,
) -> (usize, usize) {
    let (oh, ow) = (pooled_size(h, k, s), pooled_size(w, k, s));
    out.clear();
    out.resize(c * oh * ow, f32::NEG_INFINITY);
    out.par_chunks_mut((oh * ow).max(1))
        .zip(xs.par_chunks(h * w))
        .enumerate()
        .for_each(|(ci, (dst, src))| {
            let a = alpha.map(|a| a[ci % a.len()]);
            let f = |v: f32| a.map_or(v, |a| prelu1(v, a));
            if k == 2 && s == 2 {
                pool_2x2_plane(src, (h, w), dst, ow, f);
                return;
            }
            for oy in 0..oh {
                let rows = oy * s..(oy * s + k).min(h);
                for ox in 0..ow {
                    let (x0, x1) = (ox * s, (ox * s + k).min(w));
                    let mut m = f32::NEG_INFINITY;
                    for y in rows.clone() {
                        for &v in &src[y * w + x0..y * w + x1] {
                            m = m.max(f(v));
                        }
                    }
                    dst[oy * ow + ox] = m;
                }
            }
        });
    (oh, ow)
}

/// The 2×2, stride-2 ceil-mode pool of one `h x w` plane through `f` into `dst`
/// (`ow` wide): the two rows' maxima first, then each pair of columns; a last odd row
/// or column is a window of its own.
fn pool_2x2_plane(
    src: &[f32],
    (h, w): (usize, usize),
    dst: &mut [f32],
    ow: usize,
    f: impl Fn(f32) -> f32,
) {
    let mut pair = vec![0f32; w];
    for (oy, out_row) in dst.chunks_exact_mut(ow).enumerate() {
        let top = &src[2 * oy * w..][..w];
        if 2 * oy + 1 < h {
            let bottom = &src[(2 * oy + 1) * w..][..w];
            for ((p, &t), &b) in pair.iter_mut().zip(top).zip(bottom) {
                *p = f(t).max(f(b));
            }
        } else {
            for (p, &t) in pair.iter_mut().zip(top) {
                *p = f(t);
            }
        }
        for (o, two) in out_row.iter_mut().zip(pair.chunks(2)) {
            *o = two.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        }
    }
}

/// One R-Net/O-Net stage: `conv` ([`kernels::conv2d`]), then [`prelu_pool`].
fn conv_prelu_pool(
    conv: &Conv2d,
    prelu: &PReLU,
    xs: &Tensor,
    pool: Option<(usize, usize)>,
) -> Result<Tensor> {
    prelu_pool(&kernels::conv2d(conv, xs)?, prelu, pool)
}

/// `prelu` then, with `pool = Some((k, s))`, the ceil-mode max pool ([`max_pool2d_ceil`]) of
/// an `(n, c, h, w)` batch. On the CPU in f32 one pass over plain planes: at R-Net/O-Net
/// sizes candle's element-wise ops, the `-inf` padding and its copies cost more than the
/// convolutions (a 98-crop R-Net batch: ≈ 15 ms against ≈ 1 ms of products). Elsewhere
/// the candle ops.
fn prelu_pool(xs: &Tensor, prelu: &PReLU, pool: Option<(usize, usize)>) -> Result<Tensor> {
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
        let ys = prelu.forward(xs)?;
        return match pool {
            Some((k, s)) => max_pool2d_ceil(&ys, k, s),
            None => Ok(ys),
        };
    }
    let (n, c, h, w) = xs.dims4()?;
    let alpha = prelu.weight().flatten_all()?.to_vec1::<f32>()?;
    if alpha.len() != c {
        candle_core::bail!("PReLU with {} slopes on {c} channels", alpha.len());
    }
    let data = xs.flatten_all()?.to_vec1::<f32>()?;
    match pool {
        Some(window) => {
            let mut ys = Vec::new();
            let (oh, ow) =
                prelu_max_pool_planes(&data, Some(&alpha), (n * c, h, w), window, &mut ys);
            Tensor::from_vec(ys, (n, c, oh, ow), xs.device())
        }
        None => {
            let mut data = data;
            prelu_planes(&mut data, &alpha, h * w);
            Tensor::from_vec(data, (n, c, h, w), xs.device())
        }
    }
}

/// The P-Net weights as [`PlaneConv`]s and PReLU slopes, for [`PNet::forward_planes`].
#[derive(Debug, Clone)]
struct PNetPlanes {
    conv1: PlaneConv,
    prelu1: Vec<f32>,
    conv2: PlaneConv,
    prelu2: Vec<f32>,
    conv3: PlaneConv,
    prelu3: Vec<f32>,
    /// `conv4_1` (2 class logits) stacked over `conv4_2` (4 box offsets).
    heads: PlaneConv,
}

impl PNetPlanes {
    fn new(convs: [&Conv2d; 5], prelus: [&PReLU; 3]) -> Result<Self> {
        let alpha = |p: &PReLU| -> Result<Vec<f32>> {
            p.weight()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        let [c1, c2, c3, c41, c42] = convs;
        Ok(Self {
            conv1: PlaneConv::new(c1, None)?,
            prelu1: alpha(prelus[0])?,
            conv2: PlaneConv::new(c2, None)?,
            prelu2: alpha(prelus[1])?,
            conv3: PlaneConv::new(c3, None)?,
            prelu3: alpha(prelus[2])?,
            heads: PlaneConv::new(c41, Some(c42))?,
        })
    }
}

impl PNet {
    /// Loads `conv1..conv4_2` and `prelu1..3` from `vb` (prefix `pnet`).
    pub fn new(vb: VarBuilder<'_>) -> Result<Self> {
        let c = Default::default();
        let conv1 = conv2d(3, 10, 3, c, vb.pp("conv1"))?;
        let prelu1 = prelu(Some(10), vb.pp("prelu1"))?;
        let conv2 = conv2d(10, 16, 3, c, vb.pp("conv2"))?;
        let prelu2 = prelu(Some(16), vb.pp("prelu2"))?;
        let conv3 = conv2d(16, 32, 3, c, vb.pp("conv3"))?;
        let prelu3 = prelu(Some(32), vb.pp("prelu3"))?;
        let conv4_1 = conv2d(32, 2, 1, c, vb.pp("conv4_1"))?;
        let conv4_2 = conv2d(32, 4, 1, c, vb.pp("conv4_2"))?;
        let planes = PNetPlanes::new(
            [&conv1, &conv2, &conv3, &conv4_1, &conv4_2],
            [&prelu1, &prelu2, &prelu3],
        )?;
        Ok(Self {
            conv1,
            prelu1,
            conv2,
            prelu2,
            conv3,
            prelu3,
            conv4_1,
            conv4_2,
            planes,
        })
    }

    /// [`PNet::forward`] for one `(3, h, w)` image given as CPU values, computed on
    /// the CPU with plain loops around matrix products (candle's general
    /// convolution and element-wise ops make several passes and temporaries per
    /// layer). Returns (box regression `(4, h', w')`, probabilities `(2, h', w')`,
    /// `h'`, `w'`); the values agree with [`PNet::forward`] to rounding.
    pub fn forward_planes(
        &self,
        xs: &[f32],
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        let p = &self.planes;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // 1. conv1 -> prelu1 -> pool1 (2, 2, ceil)
        let (h1, w1) = p.conv1.forward(xs, h, w, &mut a)?;
        let (h1, w1) =
            prelu_max_pool_planes(&a, Some(&p.prelu1), (p.conv1.cout, h1, w1), (2, 2), &mut b);
        // 2. conv2 -> prelu2 -> conv3 -> prelu3
        let (h2, w2) = p.conv2.forward(&b, h1, w1, &mut a)?;
        prelu_planes(&mut a, &p.prelu2, h2 * w2);
        let (h3, w3) = p.conv3.forward(&a, h2, w2, &mut b)?;
        prelu_planes(&mut b, &p.prelu3, h3 * w3);
        // 3. heads: softmax over the two classes (candle's: max, exp, sum, divide),
        //    and the box regression
        let (oh, ow) = p.heads.forward(&b, h3, w3, &mut a)?;
        let n = oh * ow;
        let mut prob = vec![0f32; 2 * n];
        {
            let (logits, _) = a.split_at(2 * n);
            let (p0, p1) = prob.split_at_mut(n);
            for (i, (q0, q1)) in p0.iter_mut().zip(p1.iter_mut()).enumerate() {
                let (x0, x1) = (logits[i], logits[n + i]);
                let m = x0.max(x1);
                let (e0, e1) = ((x0 - m).exp(), (x1 - m).exp());
                let den = e0 + e1;
                *q0 = e0 / den;
                *q1 = e1 / den;
            }
        }
        a.drain(..2 * n);
        Ok((a, prob, oh, ow))
    }

    /// `(b, 3, h, w)` -> (box regression `(b, 4, h', w')`, softmax probabilities
    /// `(b, 2, h', w')`), with `h' = ceil((h - 2) / 2) - 4`.
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        // 1. conv1 -> prelu1 -> pool1 (2, 2, ceil)
        let xs = self.prelu1.forward(&kernels::conv2d(&self.conv1, xs)?)?;
        let xs = max_pool2d_ceil(&xs, 2, 2)?;
        // 2. conv2 -> prelu2 -> conv3 -> prelu3
        let xs = self.prelu2.forward(&kernels::conv2d(&self.conv2, &xs)?)?;
        let xs = self.prelu3.forward(&kernels::conv2d(&self.conv3, &xs)?)?;
        // 3. heads: softmax over the two classes, and the box regression
        let a = candle_nn::ops::softmax(&self.conv4_1.forward(&xs)?, 1)?;
        let b = self.conv4_2.forward(&xs)?;
        Ok((b, a))
    }
}

/// facenet `RNet`: refines 24x24 candidate crops.
#[derive(Debug, Clone)]
pub struct RNet {
    conv1: Conv2d,
    prelu1: PReLU,
    conv2: Conv2d,
    prelu2: PReLU,
    conv3: Conv2d,
    prelu3: PReLU,
    dense4: Linear,
    prelu4: PReLU,
    dense5_1: Linear,
    dense5_2: Linear,
}

impl RNet {
    /// Loads the R-Net tensors from `vb` (prefix `rnet`).
    pub fn new(vb: VarBuilder<'_>) -> Result<Self> {
        let c = Default::default();
        Ok(Self {
            conv1: conv2d(3, 28, 3, c, vb.pp("conv1"))?,
            prelu1: prelu(Some(28), vb.pp("prelu1"))?,
            conv2: conv2d(28, 48, 3, c, vb.pp("conv2"))?,
            prelu2: prelu(Some(48), vb.pp("prelu2"))?,
            conv3: conv2d(48, 64, 2, c, vb.pp("conv3"))?,
            prelu3: prelu(Some(64), vb.pp("prelu3"))?,
            dense4: linear(576, 128, vb.pp("dense4"))?,
            prelu4: prelu(Some(128), vb.pp("prelu4"))?,
            dense5_1: linear(128, 2, vb.pp("dense5_1"))?,
            dense5_2: linear(128, 4, vb.pp("dense5_2"))?,
        })
    }

    /// `(n, 3, 24, 24)` -> (box regression `(n, 4)`, probabilities `(n, 2)`).
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        // 1. three conv + PReLU stages with two ceil-mode 3x3/2 max pools
        let xs = conv_prelu_pool(&self.conv1, &self.prelu1, xs, Some((3, 2)))?;
        let xs = conv_prelu_pool(&self.conv2, &self.prelu2, &xs, Some((3, 2)))?;
        let xs = conv_prelu_pool(&self.conv3, &self.prelu3, &xs, None)?;
        // 2. flatten in (w, h, c) order: x.permute(0, 3, 2, 1).contiguous().view(n, -1)
        let xs = xs.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)?;
        // 3. dense4 -> prelu4 -> heads
        let xs = self.prelu4.forward(&self.dense4.forward(&xs)?)?;
        let a = candle_nn::ops::softmax(&self.dense5_1.forward(&xs)?, 1)?;
        let b = self.dense5_2.forward(&xs)?;
        Ok((b, a))
    }
}

/// facenet `ONet`: final 48x48 classifier with box regression and five landmarks.
#[derive(Debug, Clone)]
pub struct ONet {
    conv1: Conv2d,
    prelu1: PReLU,
    conv2: Conv2d,
    prelu2: PReLU,
    conv3: Conv2d,
    prelu3: PReLU,
    conv4: Conv2d,
    prelu4: PReLU,
    dense5: Linear,
    prelu5: PReLU,
    dense6_1: Linear,
    dense6_2: Linear,
    dense6_3: Linear,
}

impl ONet {
    /// Loads the O-Net tensors from `vb` (prefix `onet`).
    pub fn new(vb: VarBuilder<'_>) -> Result<Self> {
        let c = Default::default();
        Ok(Self {
            conv1: conv2d(3, 32, 3, c, vb.pp("conv1"))?,
            prelu1: prelu(Some(32), vb.pp("prelu1"))?,
            conv2: conv2d(32, 64, 3, c, vb.pp("conv2"))?,
            prelu2: prelu(Some(64), vb.pp("prelu2"))?,
            conv3: conv2d(64, 64, 3, c, vb.pp("conv3"))?,
            prelu3: prelu(Some(64), vb.pp("prelu3"))?,
            conv4: conv2d(64, 128, 2, c, vb.pp("conv4"))?,
            prelu4: prelu(Some(128), vb.pp("prelu4"))?,
            dense5: linear(1152, 256, vb.pp("dense5"))?,
            prelu5: prelu(Some(256), vb.pp("prelu5"))?,
            dense6_1: linear(256, 2, vb.pp("dense6_1"))?,
            dense6_2: linear(256, 4, vb.pp("dense6_2"))?,
            dense6_3: linear(256, 10, vb.pp("dense6_3"))?,
        })
    }

    /// `(n, 3, 48, 48)` -> (box regression `(n, 4)`, landmarks `(n, 10)` as
    /// `[x0..x4, y0..y4]` relative to the box, probabilities `(n, 2)`).
    pub fn forward(&self, xs: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        // 1. four conv + PReLU stages with ceil-mode max pools (3/2, 3/2, 2/2)
        let xs = conv_prelu_pool(&self.conv1, &self.prelu1, xs, Some((3, 2)))?;
        let xs = conv_prelu_pool(&self.conv2, &self.prelu2, &xs, Some((3, 2)))?;
        let xs = conv_prelu_pool(&self.conv3, &self.prelu3, &xs, Some((2, 2)))?;
        let xs = conv_prelu_pool(&self.conv4, &self.prelu4, &xs, None)?;
        // 2. flatten in (w, h, c) order
        let xs = xs.permute((0, 3, 2, 1))?.contiguous()?.flatten_from(1)?;
        // 3. dense5 -> prelu5 -> heads
        let xs = self.prelu5.forward(&self.dense5.forward(&xs)?)?;
        let a = candle_nn::ops::softmax(&self.dense6_1.forward(&xs)?, 1)?;
        let b = self.dense6_2.forward(&xs)?;
        let c = self.dense6_3.forward(&xs)?;
        Ok((b, c, a))
    }
}

/// A borrowed 8-bit, 3-channel, row-major `(height, width, channel)` image.
///
/// The cascade uses the channels in the order they are stored.
#[derive(Debug, Clone, Copy)]
pub struct ImageHwc<'a> {
    data: &'a [u8],
    height: usize,
    width: usize,
}

impl<'a> ImageHwc<'a> {
    /// Wraps `data` (`height * width * 3` bytes).
    pub fn new(data: &'a [u8], height: usize, width: usize) -> Result<Self> {
        let want = height
            .checked_mul(width)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| candle_core::Error::Msg("image size overflows".into()))?;
        if data.len() != want {
            candle_core::bail!(
                "image buffer holds {} bytes, a {height}x{width}x3 image needs {want}",
                data.len()
            );
        }
        Ok(Self {
            data,
            height,
            width,
        })
    }

    /// Rows.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Columns.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The raw bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }
}

/// One detected face, as returned by facenet's `MTCNN.detect(img, landmarks=True)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]` in input pixels (may extend past the image border).
    pub bbox: [f32; 4],
    /// O-Net face probability.
    pub prob: f32,
    /// Five landmarks `(x, y)`: eyes, nose, mouth corners (facenet order).
    pub landmarks: [[f32; 2]; 5],
}

impl Detection {
    /// `(x2 - x1) * (y2 - y1)` in `f32`, the key facenet and EchoMimic sort by.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]) * (self.bbox[3] - self.bbox[1])
    }
}

/// Intermediate values of one [`Mtcnn::detect_traced`] call, for parity checks and
/// diagnostics. Tensors live on the CPU.
#[derive(Debug, Clone, Default)]
pub struct MtcnnTrace {
    /// Pyramid scales (`f64`, as Python computes them).
    pub scales: Vec<f64>,
    /// P-Net input `(height, width)` per scale.
    pub pnet_input_hw: Vec<(usize, usize)>,
    /// P-Net input at the last (smallest) scale, `(1, 3, h, w)`, normalised.
    pub pnet_last_input: Option<Tensor>,
    /// P-Net softmax output at the last scale, `(1, 2, h', w')`.
    pub pnet_last_prob: Option<Tensor>,
    /// P-Net box regression at the last scale, `(1, 4, h', w')`.
    pub pnet_last_reg: Option<Tensor>,
    /// Number of P-Net candidates left after the cross-scale NMS.
    pub pnet_candidates: usize,
    /// R-Net input batch `(n, 3, 24, 24)`.
    pub rnet_input: Option<Tensor>,
    /// R-Net probabilities `(n, 2)`.
    pub rnet_prob: Option<Tensor>,
    /// R-Net box regression `(n, 4)`.
    pub rnet_reg: Option<Tensor>,
    /// O-Net input batch `(n, 3, 48, 48)`.
    pub onet_input: Option<Tensor>,
    /// O-Net probabilities `(n, 2)`.
    pub onet_prob: Option<Tensor>,
    /// O-Net box regression `(n, 4)`.
    pub onet_reg: Option<Tensor>,
    /// O-Net landmarks `(n, 10)`.
    pub onet_landmarks: Option<Tensor>,
}

/// The facenet-pytorch pyramid: `m = 12 / min_face_size`, scales `m * factor^k` while
/// `min(h, w) * m * factor^k >= 12`, all in `f64` with Python's operation order.
pub fn pyramid_scales(height: usize, width: usize, min_face_size: f64, factor: f64) -> Vec<f64> {
    let m = 12.0 / min_face_size;
    let mut minl = height.min(width) as f64 * m;
    let mut scale = m;
    let mut scales = Vec::new();
    // A factor >= 1 would never terminate in Python either; stop after the first level.
    while minl >= 12.0 {
        scales.push(scale);
        if !(factor > 0.0 && factor < 1.0) {
            break;
        }
        scale *= factor;
        minl *= factor;
    }
    scales
}

/// First input index of output cell `a` of `b` cells over `c` inputs: `floor(a * c / b)`.
fn start_index(a: usize, b: usize, c: usize) -> usize {
    (a / b) * c + ((a % b) * c) / b
}

/// One past the last input index of output cell `a`: `ceil((a + 1) * c / b)`.
fn end_index(a: usize, b: usize, c: usize) -> usize {
    1 + ((a + 1) * c - 1) / b
}

/// facenet `imresample` = `F.interpolate(mode="area")` = PyTorch's CPU
/// `adaptive_avg_pool2d` on the `f32` image, applied to the region `rows x cols`.
///
/// Returns `(3, out_h, out_w)` planar values (not normalised), bit-identical to
/// PyTorch's. PyTorch sums each window's `f32` pixel values row by row, then divides
/// by the window height and then by its width. The pixels are integers in 0..=255, so
/// while a window holds fewer than 2^24 / 255 pixels every partial sum is an integer
/// that `f32` holds exactly, and the sum does not depend on the order: it is taken
/// here with integers, separably (rows of the window first, into a running row, then
/// across its columns), which reads each image row once per output row instead of
/// once per output pixel. Larger windows (only on huge images) take PyTorch's order.
pub fn imresample_area(
    image: &ImageHwc<'_>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    let (in_h, in_w) = (rows.len(), cols.len());
    let mut out = vec![0f32; 3 * out_h * out_w];
    if in_h == 0 || in_w == 0 || out_h == 0 || out_w == 0 {
        return out;
    }
    let windows = |n_out: usize, n_in: usize| -> Vec<(usize, usize)> {
        (0..n_out)
            .map(|o| (start_index(o, n_out, n_in), end_index(o, n_out, n_in)))
            .collect()
    };
    let row_windows = windows(out_h, in_h);
    let col_windows = windows(out_w, in_w);
    let widest = |w: &[(usize, usize)]| w.iter().map(|&(a, b)| b - a).max().unwrap_or(0);
    let window_pixels = widest(&row_windows) * widest(&col_windows);
    if window_pixels * 255 >= 1 << 24 {
        area_in_pytorch_order(image, &rows, &cols, &row_windows, &col_windows, &mut out);
        return out;
    }
    // Output rows in blocks over rayon's pool, each block with a running row of its own
    // and the matching rows of the three planes.
    let stride = image.width * 3;
    let plane = out_h * out_w;
    let block = out_h.div_ceil(4 * rayon::current_num_threads()).max(1);
    let (r, gb) = out.split_at_mut(plane);
    let (g, b) = gb.split_at_mut(plane);
    r.par_chunks_mut(block * out_w)
        .zip(g.par_chunks_mut(block * out_w))
        .zip(b.par_chunks_mut(block * out_w))
        .enumerate()
        .for_each(|(bi, ((r, g), b))| {
            let mut running = vec![0u32; in_w * 3];
            let planes = [r, g, b];
            for (i, &(ih0, ih1)) in row_windows[bi * block..]
                .iter()
                .take(planes[0].len() / out_w)
                .enumerate()
            {
                let kh = (ih1 - ih0) as f32;
                running.fill(0);
                for ih in ih0..ih1 {
                    let start = (rows.start + ih) * stride + cols.start * 3;
                    let row = &image.data[start..start + in_w * 3];
                    for (acc, &p) in running.iter_mut().zip(row) {
                        *acc += u32::from(p);
                    }
                }
                for (ow, &(iw0, iw1)) in col_windows.iter().enumerate() {
                    let kw = (iw1 - iw0) as f32;
                    let mut sum = [0u32; 3];
                    for px in running[iw0 * 3..iw1 * 3].chunks_exact(3) {
                        sum[0] += px[0];
                        sum[1] += px[1];
                        sum[2] += px[2];
                    }
                    for (c, &s) in sum.iter().enumerate() {
                        // exact: s < 2^24
                        planes[c][i * out_w + ow] = s as f32 / kh / kw;
                    }
                }
            }
        });
    out
}

/// [`imresample_area`] with PyTorch's summation order (`f32`, row by row), for
/// windows whose sums `f32` cannot hold exactly.
fn area_in_pytorch_order(
    image: &ImageHwc<'_>,
    rows: &std::ops::Range<usize>,
    cols: &std::ops::Range<usize>,
    row_windows: &[(usize, usize)],
    col_windows: &[(usize, usize)],
    out: &mut [f32],
) {
    let stride = image.width * 3;
    let out_w = col_windows.len();
    let plane = row_windows.len() * out_w;
    for (oh, &(ih0, ih1)) in row_windows.iter().enumerate() {
        let kh = (ih1 - ih0) as f32;
        for (ow, &(iw0, iw1)) in col_windows.iter().enumerate() {
            let kw = (iw1 - iw0) as f32;
            let mut sum = [0f32; 3];
            for ih in ih0..ih1 {
                let row = (rows.start + ih) * stride;
                let px = &image.data[row + (cols.start + iw0) * 3..row + (cols.start + iw1) * 3];
                for p in px.chunks_exact(3) {
                    sum[0] += f32::from(p[0]);
                    sum[1] += f32::from(p[1]);
                    sum[2] += f32::from(p[2]);
                }
            }
            for (c, s) in sum.iter().enumerate() {
                out[c * plane + oh * out_w + ow] = s / kh / kw;
            }
        }
    }
}

/// `(x - 127.5) * 0.0078125`, the MTCNN input normalisation, in place.
fn normalise(xs: &mut [f32]) {
    for x in xs {
        *x = (*x - 127.5) * 0.0078125;
    }
}

/// A candidate box with its score and (for the P-Net stage) its regression.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    bbox: [f32; 4],
    score: f32,
    reg: [f32; 4],
}

/// The `max` highest-scoring candidates, in their original order (so NMS breaks ties as
/// before); all of them when there are no more than `max`.
fn keep_top(cands: Vec<Candidate>, max: usize) -> Vec<Candidate> {
    if cands.len() <= max {
        return cands;
    }
    let scores: Vec<f32> = cands.iter().map(|c| c.score).collect();
    let mut keep = argsort_desc_stable(&scores);
    keep.truncate(max);
    keep.sort_unstable();
    keep.into_iter().map(|i| cands[i]).collect()
}

/// Indices that sort `keys` descending, ties in index order (torch `sort(stable=True,
/// descending=True)`).
fn argsort_desc_stable(keys: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]));
    order
}

/// torchvision `nms` (CPU kernel): greedy by descending score, suppress a box when
/// `inter / (area_i + area_j - inter) > threshold`, areas without `+1`, `f32` maths,
/// comparison in `f64`. Returns kept indices in score order.
fn nms_torchvision(boxes: &[[f32; 4]], scores: &[f32], threshold: f64) -> Vec<usize> {
    let order = argsort_desc_stable(scores);
    let areas: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (pos, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[pos + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            let ovr = inter / (areas[i] + areas[j] - inter);
            if f64::from(ovr) > threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// facenet `nms_numpy(..., 'Min')`: areas with `+1`, overlap = intersection over the
/// smaller area, keep while `overlap <= threshold` (`f32`, as numpy compares a
/// float32 array with a Python float). Candidates are visited from the highest score
/// down, ties resolved like numpy's (stable for small inputs) ascending argsort.
fn nms_min(boxes: &[[f32; 4]], scores: &[f32], threshold: f32) -> Vec<usize> {
    let area: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0))
        .collect();
    let mut rest: Vec<usize> = (0..boxes.len()).collect();
    rest.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut pick = Vec::new();
    while let Some(i) = rest.pop() {
        pick.push(i);
        let bi = boxes[i];
        rest.retain(|&j| {
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0]) + 1.0).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1]) + 1.0).max(0.0);
            let inter = w * h;
            inter / area[i].min(area[j]) <= threshold
        });
    }
    pick
}

/// facenet `rerec`: grow the shorter side so the box becomes a square around the same
/// centre (`f32`, Python's operation order).
fn rerec(b: [f32; 4]) -> [f32; 4] {
    let h = b[3] - b[1];
    let w = b[2] - b[0];
    let l = w.max(h);
    let x1 = b[0] + w * 0.5 - l * 0.5;
    let y1 = b[1] + h * 0.5 - l * 0.5;
    [x1, y1, x1 + l, y1 + l]
}

/// facenet `bbreg`: apply an R-Net / O-Net regression with `+1` box sizes.
fn bbreg(b: [f32; 4], reg: [f32; 4]) -> [f32; 4] {
    let w = b[2] - b[0] + 1.0;
    let h = b[3] - b[1] + 1.0;
    [
        b[0] + reg[0] * w,
        b[1] + reg[1] * h,
        b[2] + reg[2] * w,
        b[3] + reg[3] * h,
    ]
}

/// facenet `pad`: the 1-based inclusive crop `(y, ey, x, ex)` of a box, truncated
/// toward zero and clamped to the image on the near (>= 1) and far (<= size) sides only.
fn pad(b: &[f32; 4], width: usize, height: usize) -> (i64, i64, i64, i64) {
    // `.trunc().int()`: float -> int32 truncating toward zero.
    let to_i = |v: f32| v.trunc() as i32 as i64;
    let x = to_i(b[0]).max(1);
    let y = to_i(b[1]).max(1);
    let ex = to_i(b[2]).min(width as i64);
    let ey = to_i(b[3]).min(height as i64);
    (y, ey, x, ex)
}

/// The face detector: the three networks plus the cascade of facenet's `detect_face`.
#[derive(Debug, Clone)]
pub struct Mtcnn {
    pnet: PNet,
    rnet: RNet,
    onet: ONet,
    cfg: MtcnnConfig,
    device: Device,
    pnet_strip_pixels: usize,
}

impl Mtcnn {
    /// Builds the three networks from `vb` (prefixes `pnet`, `rnet`, `onet`; `f32`).
    pub fn new(vb: VarBuilder<'_>, cfg: &MtcnnConfig) -> Result<Self> {
        let valid = cfg.min_face_size > 0.0 && cfg.factor > 0.0 && cfg.factor < 1.0;
        if !valid {
            candle_core::bail!(
                "invalid MTCNN config: min_face_size {} must be > 0 and factor {} in (0, 1)",
                cfg.min_face_size,
                cfg.factor
            );
        }
        Ok(Self {
            pnet: PNet::new(vb.pp("pnet"))?,
            rnet: RNet::new(vb.pp("rnet"))?,
            onet: ONet::new(vb.pp("onet"))?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            pnet_strip_pixels: PNET_MAX_STRIP_PIXELS,
        })
    }

    /// P-Net inputs with more than `pixels` pixels run in horizontal strips of about
    /// that size (default 2^20), bounding the activation memory on large photos. The
    /// detections do not depend on it.
    pub fn with_pnet_strip_pixels(mut self, pixels: usize) -> Self {
        self.pnet_strip_pixels = pixels.max(1);
        self
    }

    /// The P-Net.
    pub fn pnet(&self) -> &PNet {
        &self.pnet
    }

    /// The R-Net.
    pub fn rnet(&self) -> &RNet {
        &self.rnet
    }

    /// The O-Net.
    pub fn onet(&self) -> &ONet {
        &self.onet
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &MtcnnConfig {
        &self.cfg
    }

    /// The device the networks run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// All faces in `image`, largest area first (facenet `MTCNN.detect` with
    /// `select_largest=True`).
    pub fn detect(&self, image: &ImageHwc<'_>) -> Result<Vec<Detection>> {
        self.detect_impl(image, None)
    }

    /// Like [`Mtcnn::detect`], also recording the intermediate values into `trace`.
    pub fn detect_traced(
        &self,
        image: &ImageHwc<'_>,
        trace: &mut MtcnnTrace,
    ) -> Result<Vec<Detection>> {
        self.detect_impl(image, Some(trace))
    }

    /// P-Net over a whole normalised `(3, h, w)` plane set; very large inputs run in
    /// horizontal strips (output rows `[r0, r1)` need input rows `[2 r0, 2 r1 + 10)`,
    /// even offsets keep the ceil-mode pooling identical). Returns `(reg, prob, h', w')`
    /// as CPU vectors in `(c, h', w')` layout.
    fn pnet_planes(
        &self,
        data: &[f32],
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
        if h < 12 || w < 12 {
            candle_core::bail!("P-Net input {h}x{w} is smaller than its 12x12 window");
        }
        let pooled = |n: usize| (n - 2).div_ceil(2);
        let (oh, ow) = (pooled(h) - 4, pooled(w) - 4);
        let rows_per_strip = if h * w <= self.pnet_strip_pixels {
            oh
        } else {
            ((self.pnet_strip_pixels / w).saturating_sub(10) / 2).clamp(1, oh)
        };
        let mut reg = vec![0f32; 4 * oh * ow];
        let mut prob = vec![0f32; 2 * oh * ow];
        let mut r0 = 0;
        while r0 < oh {
            let r1 = (r0 + rows_per_strip).min(oh);
            let (i0, i1) = (2 * r0, (2 * r1 + 10).min(h));
            let strip: std::borrow::Cow<'_, [f32]> = if i0 == 0 && i1 == h {
                std::borrow::Cow::Borrowed(data)
            } else {
                let mut strip = Vec::with_capacity(3 * (i1 - i0) * w);
                for c in 0..3 {
                    strip.extend_from_slice(&data[c * h * w + i0 * w..c * h * w + i1 * w]);
                }
                std::borrow::Cow::Owned(strip)
            };
            let (r, p, sh, sw) = self.pnet.forward_planes(&strip, i1 - i0, w)?;
            if sh != r1 - r0 || sw != ow {
                candle_core::bail!("P-Net strip gave {sh}x{sw}, expected {}x{ow}", r1 - r0);
            }
            let n = (r1 - r0) * ow;
            for c in 0..4 {
                reg[c * oh * ow + r0 * ow..][..n].copy_from_slice(&r[c * n..(c + 1) * n]);
            }
            for c in 0..2 {
                prob[c * oh * ow + r0 * ow..][..n].copy_from_slice(&p[c * n..(c + 1) * n]);
            }
            r0 = r1;
        }
        Ok((reg, prob, oh, ow))
    }

    /// Crops every candidate (facenet `pad` + `imresample`) to `size x size`, normalised.
    /// Returns the batch and the indices of the candidates that had a non-empty crop.
    fn crop_batch(
        &self,
        image: &ImageHwc<'_>,
        boxes: &[[f32; 4]],
        size: usize,
    ) -> Result<(Option<Tensor>, Vec<usize>)> {
        let mut data = Vec::with_capacity(boxes.len() * 3 * size * size);
        let mut kept = Vec::with_capacity(boxes.len());
        for (k, b) in boxes.iter().enumerate() {
            let (y, ey, x, ex) = pad(b, image.width, image.height);
            if ey > y - 1 && ex > x - 1 {
                let rows = (y - 1) as usize..ey as usize;
                let cols = (x - 1) as usize..ex as usize;
                data.extend(imresample_area(image, rows, cols, size, size));
                kept.push(k);
            }
        }
        if kept.is_empty() {
            return Ok((None, kept));
        }
        normalise(&mut data);
        let xs = Tensor::from_vec(data, (kept.len(), 3, size, size), &self.device)?;
        Ok((Some(xs), kept))
    }

    /// The cascade of facenet's `detect_face` followed by `MTCNN.detect`'s sort.
    fn detect_impl(
        &self,
        image: &ImageHwc<'_>,
        mut trace: Option<&mut MtcnnTrace>,
    ) -> Result<Vec<Detection>> {
        let scales = pyramid_scales(
            image.height,
            image.width,
            self.cfg.min_face_size,
            self.cfg.factor,
        );
        if let Some(t) = trace.as_deref_mut() {
            t.scales = scales.clone();
        }
        let stage1 = keep_top(
            self.pnet_stage(image, &scales, trace.as_deref_mut())?,
            MAX_PNET_CANDIDATES,
        );
        let boxes = merge_scales(&stage1);
        if let Some(t) = trace.as_deref_mut() {
            t.pnet_candidates = boxes.len();
        }
        let boxes = self.rnet_stage(image, boxes, trace.as_deref_mut())?;
        let dets = self.onet_stage(image, boxes, trace)?;
        Ok(largest_first(dets))
    }

    /// P-Net on every pyramid level: candidates above `thresholds[0]`, NMS 0.5 per
    /// level, concatenated in level order.
    fn pnet_stage(
        &self,
        image: &ImageHwc<'_>,
        scales: &[f64],
        mut trace: Option<&mut MtcnnTrace>,
    ) -> Result<Vec<Candidate>> {
        let (h, w) = (image.height, image.width);
        let mut stage1 = Vec::new();
        for (si, &scale) in scales.iter().enumerate() {
            let hs = (h as f64 * scale + 1.0) as usize;
            let ws = (w as f64 * scale + 1.0) as usize;
            let mut data = imresample_area(image, 0..h, 0..w, hs, ws);
            normalise(&mut data);
            let (reg, prob, oh, ow) = self.pnet_planes(&data, hs, ws)?;
            if let Some(t) = trace.as_deref_mut() {
                t.pnet_input_hw.push((hs, ws));
                if si + 1 == scales.len() {
                    t.pnet_last_input = Some(Tensor::from_vec(data, (1, 3, hs, ws), &Device::Cpu)?);
                    t.pnet_last_prob =
                        Some(Tensor::from_slice(&prob, (1, 2, oh, ow), &Device::Cpu)?);
                    t.pnet_last_reg = Some(Tensor::from_slice(&reg, (1, 4, oh, ow), &Device::Cpu)?);
                }
            }
            let cands = keep_top(
                bounding_boxes(&prob, &reg, (oh, ow), scale, self.cfg.thresholds[0]),
                MAX_PNET_CANDIDATES,
            );
            let boxes: Vec<[f32; 4]> = cands.iter().map(|c| c.bbox).collect();
            let scores: Vec<f32> = cands.iter().map(|c| c.score).collect();
            stage1.extend(
                nms_torchvision(&boxes, &scores, PNET_SCALE_NMS)
                    .into_iter()
                    .map(|i| cands[i]),
            );
        }
        Ok(stage1)
    }

    /// R-Net on 24x24 crops of `boxes`: threshold, NMS 0.7, regression, squaring.
    fn rnet_stage(
        &self,
        image: &ImageHwc<'_>,
        boxes: Vec<[f32; 4]>,
        trace: Option<&mut MtcnnTrace>,
    ) -> Result<Vec<[f32; 4]>> {
        if boxes.is_empty() {
            return Ok(boxes);
        }
        let (xs, kept) = self.crop_batch(image, &boxes, RNET_SIZE)?;
        let boxes: Vec<[f32; 4]> = kept.iter().map(|&k| boxes[k]).collect();
        let Some(xs) = xs else {
            return Ok(boxes);
        };
        let (reg, prob) = self.rnet.forward(&xs)?;
        let (reg, prob) = (reg.to_device(&Device::Cpu)?, prob.to_device(&Device::Cpu)?);
        let reg_v = reg.to_vec2::<f32>()?;
        let prob_v = prob.to_vec2::<f32>()?;
        if let Some(t) = trace {
            t.rnet_input = Some(xs.to_device(&Device::Cpu)?);
            t.rnet_prob = Some(prob);
            t.rnet_reg = Some(reg);
        }
        let mut cands = Vec::new();
        for (k, b) in boxes.iter().enumerate() {
            let score = prob_v[k][1];
            if score > self.cfg.thresholds[1] {
                let r = &reg_v[k];
                cands.push(Candidate {
                    bbox: *b,
                    score,
                    reg: [r[0], r[1], r[2], r[3]],
                });
            }
        }
        let bx: Vec<[f32; 4]> = cands.iter().map(|c| c.bbox).collect();
        let sc: Vec<f32> = cands.iter().map(|c| c.score).collect();
        Ok(nms_torchvision(&bx, &sc, RNET_NMS)
            .into_iter()
            .map(|i| rerec(bbreg(cands[i].bbox, cands[i].reg)))
            .collect())
    }

    /// O-Net on 48x48 crops of `boxes`: threshold, landmarks, regression, 'Min' NMS 0.7.
    fn onet_stage(
        &self,
        image: &ImageHwc<'_>,
        boxes: Vec<[f32; 4]>,
        trace: Option<&mut MtcnnTrace>,
    ) -> Result<Vec<Detection>> {
        if boxes.is_empty() {
            return Ok(Vec::new());
        }
        let (xs, kept) = self.crop_batch(image, &boxes, ONET_SIZE)?;
        let Some(xs) = xs else {
            return Ok(Vec::new());
        };
        let boxes: Vec<[f32; 4]> = kept.iter().map(|&k| boxes[k]).collect();
        let (reg, points, prob) = self.onet.forward(&xs)?;
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let (reg, points, prob) = (cpu(&reg)?, cpu(&points)?, cpu(&prob)?);
        let reg_v = reg.to_vec2::<f32>()?;
        let pts_v = points.to_vec2::<f32>()?;
        let prob_v = prob.to_vec2::<f32>()?;
        if let Some(t) = trace {
            t.onet_input = Some(cpu(&xs)?);
            t.onet_prob = Some(prob);
            t.onet_reg = Some(reg);
            t.onet_landmarks = Some(points);
        }
        let mut cands = Vec::new();
        for (k, b) in boxes.iter().enumerate() {
            let score = prob_v[k][1];
            if score > self.cfg.thresholds[2] {
                // landmarks relative to the box before regression, +1 sizes
                let w_i = b[2] - b[0] + 1.0;
                let h_i = b[3] - b[1] + 1.0;
                let p = &pts_v[k];
                let mut landmarks = [[0f32; 2]; 5];
                for (j, l) in landmarks.iter_mut().enumerate() {
                    *l = [w_i * p[j] + b[0] - 1.0, h_i * p[j + 5] + b[1] - 1.0];
                }
                let r = &reg_v[k];
                cands.push(Detection {
                    bbox: bbreg(*b, [r[0], r[1], r[2], r[3]]),
                    prob: score,
                    landmarks,
                });
            }
        }
        let bx: Vec<[f32; 4]> = cands.iter().map(|c| c.bbox).collect();
        let sc: Vec<f32> = cands.iter().map(|c| c.prob).collect();
        Ok(nms_min(&bx, &sc, ONET_NMS_MIN)
            .into_iter()
            .map(|i| cands[i])
            .collect())
    }
}

/// facenet `generateBoundingBox`: a row-major scan of the face-probability plane
/// (`prob[1]`) of one level; cells scoring at least `threshold` become boxes in
/// photo pixels, with their regression.
fn bounding_boxes(
    prob: &[f32],
    reg: &[f32],
    (oh, ow): (usize, usize),
    scale: f64,
    threshold: f32,
) -> Vec<Candidate> {
    let scale_f = scale as f32;
    let plane = oh * ow;
    let q1 = |v: f32| ((PNET_STRIDE * v + 1.0) / scale_f).floor();
    let q2 = |v: f32| ((PNET_STRIDE * v + PNET_CELL) / scale_f).floor();
    let mut cands = Vec::new();
    for (i, &score) in prob[plane..2 * plane].iter().enumerate() {
        if score >= threshold {
            let (bx, by) = ((i % ow) as f32, (i / ow) as f32);
            cands.push(Candidate {
                bbox: [q1(bx), q1(by), q2(bx), q2(by)],
                score,
                reg: [
                    reg[i],
                    reg[plane + i],
                    reg[2 * plane + i],
                    reg[3 * plane + i],
                ],
            });
        }
    }
    cands
}

/// NMS 0.7 across the levels, then the P-Net regression (box size without `+1`) and
/// squaring.
fn merge_scales(stage1: &[Candidate]) -> Vec<[f32; 4]> {
    let boxes: Vec<[f32; 4]> = stage1.iter().map(|c| c.bbox).collect();
    let scores: Vec<f32> = stage1.iter().map(|c| c.score).collect();
    nms_torchvision(&boxes, &scores, PNET_CROSS_SCALE_NMS)
        .into_iter()
        .map(|i| {
            let Candidate {
                bbox: b, reg: r, ..
            } = stage1[i];
            let regw = b[2] - b[0];
            let regh = b[3] - b[1];
            rerec([
                b[0] + r[0] * regw,
                b[1] + r[1] * regh,
                b[2] + r[2] * regw,
                b[3] + r[3] * regh,
            ])
        })
        .collect()
}

/// `MTCNN.detect`'s order: largest area first (`np.argsort(area)[::-1]`).
fn largest_first(dets: Vec<Detection>) -> Vec<Detection> {
    let areas: Vec<f32> = dets.iter().map(Detection::area).collect();
    let mut order: Vec<usize> = (0..dets.len()).collect();
    order.sort_by(|&a, &b| areas[a].total_cmp(&areas[b]));
    order.into_iter().rev().map(|i| dets[i]).collect()
}

/// `f32` is the only dtype the detector runs in (the released weights are `f32`).
pub const DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pyramid_matches_python_for_512() {
        let s = pyramid_scales(512, 512, 20.0, 0.709);
        assert_eq!(s.len(), 10);
        assert_eq!(s[0], 0.6);
        assert_eq!(s[1], 0.6 * 0.709);
        // Python: int(512 * scale + 1)
        let hw: Vec<usize> = s.iter().map(|&x| (512.0 * x + 1.0) as usize).collect();
        assert_eq!(hw, [308, 218, 155, 110, 78, 56, 40, 28, 20, 14]);
        assert!(pyramid_scales(19, 400, 20.0, 0.709).is_empty());
    }

    #[test]
    fn adaptive_pool_indices_match_pytorch() {
        // 5 -> 3: windows [0,2), [1,4), [3,5)
        let w: Vec<_> = (0..3)
            .map(|i| (start_index(i, 3, 5), end_index(i, 3, 5)))
            .collect();
        assert_eq!(w, [(0, 2), (1, 4), (3, 5)]);
        // upsampling 2 -> 3: [0,1), [0,2), [1,2)
        let w: Vec<_> = (0..3)
            .map(|i| (start_index(i, 3, 2), end_index(i, 3, 2)))
            .collect();
        assert_eq!(w, [(0, 1), (0, 2), (1, 2)]);
    }

    #[test]
    fn imresample_area_averages_windows() -> Result<()> {
        // 2x3 image, channel c of pixel (y, x) = 10 * (3y + x) + c
        let data: Vec<u8> = (0..6)
            .flat_map(|i| (0..3).map(move |c| (10 * i + c) as u8))
            .collect();
        let img = ImageHwc::new(&data, 2, 3)?;
        let out = imresample_area(&img, 0..2, 0..3, 1, 2);
        // window cols [0,2) and [1,3), both rows
        assert_eq!(out[0], (0.0 + 10.0 + 30.0 + 40.0) / 2.0 / 2.0);
        assert_eq!(out[1], (10.0 + 20.0 + 40.0 + 50.0) / 2.0 / 2.0);
        assert_eq!(out[2], (1.0 + 11.0 + 31.0 + 41.0) / 2.0 / 2.0);
        // sub-region: row 1, cols 1..3 -> 1x1
        let out = imresample_area(&img, 1..2, 1..3, 1, 1);
        assert_eq!(out[0], (40.0 + 50.0) / 1.0 / 2.0);
        Ok(())
    }

    #[test]
    fn pnet_planes_agree_with_the_candle_forward() -> Result<()> {
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let pnet = PNet::new(vb)?;
        // PReLU slopes start at 0.25 for every channel; make them differ
        for (name, var) in vm.data().lock().expect("varmap").iter() {
            if name.contains("prelu") {
                let n = var.elem_count();
                var.set(&Tensor::arange(0f32, n as f32, &Device::Cpu)?.affine(-0.1, 0.3)?)?;
            }
        }
        let pnet = PNet {
            planes: PNetPlanes::new(
                [
                    &pnet.conv1,
                    &pnet.conv2,
                    &pnet.conv3,
                    &pnet.conv4_1,
                    &pnet.conv4_2,
                ],
                [&pnet.prelu1, &pnet.prelu2, &pnet.prelu3],
            )?,
            ..pnet
        };
        let (h, w) = (37, 41);
        let xs = Tensor::randn(0f32, 1.0, (1, 3, h, w), &Device::Cpu)?;
        let (reg, prob) = pnet.forward(&xs)?;
        let (r, p, oh, ow) = pnet.forward_planes(&xs.flatten_all()?.to_vec1()?, h, w)?;
        assert_eq!((oh, ow), (reg.dim(2)?, reg.dim(3)?));
        let max_diff = |a: &Tensor, b: &[f32]| -> Result<f32> {
            let a = a.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(a.len(), b.len());
            Ok(a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max))
        };
        // the matrix products sum in another order than candle's convolution, and the
        // rounding of either depends on the SIMD width of the machine: compare against the
        // scale of the output (an f32 sum over 3x3x32 products carries ~1e-6 relative error)
        let scale =
            |a: &Tensor| -> Result<f32> { Ok(a.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0)) };
        let (dr, dp) = (max_diff(&reg, &r)?, max_diff(&prob, &p)?);
        let (sr, sp) = (scale(&reg)?, scale(&prob)?);
        assert!(
            dr < 1e-5 * sr && dp < 1e-5 * sp,
            "reg {dr:e} (scale {sr}), prob {dp:e} (scale {sp})"
        );
        Ok(())
    }

    #[test]
    fn integer_area_resample_is_bit_identical_to_pytorch_order() -> Result<()> {
        // an LCG fills a 37x53 image; down-, up- and mixed resampling of sub-regions
        let (h, w) = (37, 53);
        let mut state = 12345u32;
        let data: Vec<u8> = (0..h * w * 3)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        let img = ImageHwc::new(&data, h, w)?;
        for (rows, cols, oh, ow) in [
            (0..h, 0..w, 22, 31),
            (0..h, 0..w, 5, 3),
            (3..30, 7..50, 48, 48),
            (10..12, 0..w, 24, 7),
            (0..1, 0..1, 2, 2),
        ] {
            let fast = imresample_area(&img, rows.clone(), cols.clone(), oh, ow);
            let windows = |n_out: usize, n_in: usize| -> Vec<(usize, usize)> {
                (0..n_out)
                    .map(|o| (start_index(o, n_out, n_in), end_index(o, n_out, n_in)))
                    .collect()
            };
            let mut slow = vec![0f32; 3 * oh * ow];
            let (rw, cw) = (windows(oh, rows.len()), windows(ow, cols.len()));
            area_in_pytorch_order(&img, &rows, &cols, &rw, &cw, &mut slow);
            let same = fast
                .iter()
                .zip(&slow)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{rows:?} x {cols:?} -> {oh}x{ow}");
        }
        Ok(())
    }

    #[test]
    fn torchvision_nms_keeps_score_order_and_uses_no_plus_one() {
        let boxes = [[0., 0., 10., 10.], [1., 0., 11., 10.], [20., 20., 30., 30.]];
        // IoU(0,1) = 90 / 110 = 0.818
        assert_eq!(nms_torchvision(&boxes, &[0.9, 0.95, 0.5], 0.7), [1, 2]);
        assert_eq!(nms_torchvision(&boxes, &[0.9, 0.95, 0.5], 0.85), [1, 0, 2]);
        // equal scores: stable, lower index first
        assert_eq!(nms_torchvision(&boxes, &[0.5, 0.5, 0.5], 0.85), [0, 1, 2]);
    }

    #[test]
    fn min_nms_uses_plus_one_areas_and_smaller_area() {
        // small box inside a big one: overlap / min area = 1 -> suppressed
        let boxes = [[0., 0., 99., 99.], [10., 10., 19., 19.]];
        assert_eq!(nms_min(&boxes, &[0.9, 0.99], 0.7), [1]);
        // touching boxes: inter = 1 column with +1 convention
        let boxes = [[0., 0., 9., 9.], [9., 0., 18., 9.]];
        assert_eq!(nms_min(&boxes, &[0.9, 0.8], 0.7), [0, 1]);
    }

    #[test]
    fn candidates_over_the_cap_keep_the_best_in_order() {
        let c = |score: f32| Candidate {
            bbox: [0.0, 0.0, 1.0, 1.0],
            score,
            reg: [0.0; 4],
        };
        let cands = vec![c(0.7), c(0.9), c(0.6), c(0.9), c(0.8)];
        let scores = |v: &[Candidate]| v.iter().map(|c| c.score).collect::<Vec<_>>();
        assert_eq!(
            scores(&keep_top(cands.clone(), 5)),
            [0.7, 0.9, 0.6, 0.9, 0.8]
        );
        assert_eq!(scores(&keep_top(cands, 3)), [0.9, 0.9, 0.8]);
    }

    #[test]
    fn rerec_bbreg_pad_follow_facenet() {
        assert_eq!(rerec([0., 0., 10., 4.]), [0., -3., 10., 7.]);
        assert_eq!(
            bbreg([0., 0., 9., 9.], [0.1, 0., -0.1, 0.5]),
            [1., 0., 8., 14.]
        );
        // truncation toward zero, then near-side clamp to 1 and far-side clamp to the size
        assert_eq!(pad(&[-0.7, 2.9, 120.5, 99.9], 100, 80), (2, 80, 1, 100));
    }

    #[test]
    fn ceil_mode_pool_covers_the_ragged_edge() -> Result<()> {
        let xs = Tensor::arange(0f32, 25., &Device::Cpu)?.reshape((1, 1, 5, 5))?;
        let ys = max_pool2d_ceil(&(xs.neg()?), 2, 2)?;
        assert_eq!(ys.dims4()?, (1, 1, 3, 3));
        // the last window holds only the corner pixel (-24)
        let v = ys.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v[8], -24.0);
        assert_eq!(v[0], 0.0);
        Ok(())
    }

    #[test]
    fn prelu_pool_on_planes_equals_the_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let prelu = PReLU::new(Tensor::new(&[0.25f32, -0.5, 2.0], &dev)?, false);
        // odd sizes (ragged ceil-mode windows) and even ones, two images, pools of 3/2
        // and 2/2, and none
        for (shape, pool) in [(2, 3, 9, 7), (2, 3, 8, 10)]
            .into_iter()
            .flat_map(|s| [Some((3, 2)), Some((2, 2)), None].map(|p| (s, p)))
        {
            let xs = Tensor::randn(0f32, 1., shape, &dev)?;
            let want = prelu.forward(&xs)?;
            let want = match pool {
                Some((k, s)) => max_pool2d_ceil(&want, k, s)?,
                None => want,
            };
            let got = prelu_pool(&xs, &prelu, pool)?;
            let d = crate::ops::max_abs_diff(&got, &want)?;
            assert!(d < 1e-6, "{shape:?} {pool:?}: max abs diff {d}");
        }
        Ok(())
    }
}
