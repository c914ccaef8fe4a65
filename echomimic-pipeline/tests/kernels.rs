//! The CPU kernels of `echomimic_pipeline::kernels` against the plain candle
//! composition they replace, over a sweep of shapes (odd and prime sizes,
//! band boundaries, channel counts that divide nothing, stride 2, padding 0
//! and 1, batches > 1). Every comparison fails on any NaN/Inf and reports the
//! largest absolute and relative difference.

use std::cell::RefCell;

use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::{Conv2d, Conv2dConfig};
use echomimic_pipeline::kernels;
use echomimic_pipeline::rng::{torch_randn_from, Mt19937};

thread_local! {
    /// One seeded generator per test thread (libtest and nextest give every test its own
    /// thread), so a test draws the same values on every run and machine: a bound that holds
    /// here holds in CI. `Tensor::randn` on the CPU cannot be seeded.
    static DRAW: RefCell<Mt19937> = RefCell::new(Mt19937::new(20_261_205));
}

/// Normal values of `shape` with the given mean and standard deviation, from the test
/// thread's seeded generator.
fn randn<S: Into<Shape>>(mean: f32, std: f32, shape: S, dev: &Device) -> Result<Tensor> {
    let shape = shape.into();
    let values = DRAW.with(|g| torch_randn_from(&mut g.borrow_mut(), shape.elem_count()));
    let values: Vec<f32> = values.into_iter().map(|v| mean + std * v).collect();
    Tensor::from_vec(values, shape, dev)
}

/// Largest |a − b| and |a − b| / max(|b|, 1e-3); errors on a shape mismatch
/// or a non-finite value on either side.
fn compare(got: &Tensor, want: &Tensor) -> Result<(f32, f32)> {
    if got.dims() != want.dims() {
        candle_core::bail!("shape {:?} != {:?}", got.dims(), want.dims());
    }
    let g = got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let w = want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut abs, mut rel) = (0f32, 0f32);
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            candle_core::bail!("non-finite value at {i}: got {a}, want {b}");
        }
        let d = (a - b).abs();
        abs = abs.max(d);
        rel = rel.max(d / b.abs().max(1e-3));
    }
    Ok((abs, rel))
}

fn random_conv(
    c_in: usize,
    c_out: usize,
    k: usize,
    cfg: Conv2dConfig,
    bias: bool,
) -> Result<Conv2d> {
    let dev = Device::Cpu;
    let scale = 1.0 / ((c_in * k * k) as f32).sqrt();
    let weight = (randn(0f32, 1., (c_out, c_in, k, k), &dev)? * scale as f64)?;
    let bias = bias.then(|| randn(0f32, 1., c_out, &dev)).transpose()?;
    Ok(Conv2d::new(weight, bias, cfg))
}

/// (batch, c_in, c_out, h, w, kernel, stride, padding, bias)
type ConvCase = (usize, usize, usize, usize, usize, usize, usize, usize, bool);

/// A random convolution for `case` and a random input for it.
fn random_case(case: ConvCase) -> Result<(Conv2d, Tensor)> {
    let (n, c_in, c_out, h, w, k, stride, padding, bias) = case;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let conv = random_conv(c_in, c_out, k, cfg, bias)?;
    Ok((conv, randn(0f32, 1., (n, c_in, h, w), &Device::Cpu)?))
}

#[test]
fn conv2d_matches_candle_over_a_sweep_of_shapes() -> Result<()> {
    let cases: &[ConvCase] = &[
        (1, 3, 5, 7, 7, 3, 1, 1, true),
        (2, 4, 8, 8, 8, 3, 1, 1, true),
        (3, 7, 11, 13, 5, 3, 1, 1, false),
        (1, 13, 17, 1, 1, 3, 1, 1, true),
        (2, 5, 3, 9, 10, 3, 2, 1, true),
        (1, 6, 6, 11, 11, 3, 2, 0, true),
        (2, 3, 4, 6, 9, 3, 1, 0, true),
        (1, 2, 3, 5, 5, 2, 1, 0, true),
        (1, 4, 4, 7, 8, 5, 1, 2, true),
        (2, 9, 7, 6, 5, 1, 1, 0, true),
        (1, 9, 7, 6, 5, 1, 2, 0, false),
        // A band is 2 Mi patch elements: at c_in 128 and width 130 a band is
        // 14 rows, so 31 rows end on a partial band (tile ± 1 around 28).
        (1, 128, 8, 31, 130, 3, 1, 1, true),
        (1, 128, 8, 29, 130, 3, 1, 1, true),
        (1, 128, 3, 15, 130, 3, 2, 1, true),
        // batches of several images (images side by side, one product per thread) and the
        // UNet's tiny-width shapes, with and without bias, 1×1 and 3×3
        (4, 32, 32, 16, 16, 3, 1, 1, true),
        (8, 32, 64, 8, 8, 1, 1, 0, true),
        (6, 16, 8, 9, 7, 3, 2, 1, false),
        (5, 7, 5, 4, 6, 1, 1, 0, false),
        // small images side by side in one product (the UNet's low levels, many frames):
        // one group of 24 2×2 and 1×1 images, 1×1 and 3×3 with and without bias, stride 2
        (24, 40, 24, 2, 2, 3, 1, 1, true),
        (24, 40, 24, 1, 1, 3, 1, 1, false),
        (24, 40, 24, 2, 2, 1, 1, 0, true),
        (24, 12, 8, 4, 4, 3, 2, 1, true),
        // groups of 6 (7 fit a band) on a thread each, and 13 images in groups of 7 and 6
        (24, 128, 16, 16, 16, 3, 1, 1, true),
        (13, 128, 8, 16, 16, 3, 1, 1, false),
        // a few output channels (conv_out of the UNet and the VAE), padding 0/1/2, 1×1 to 5×5
        (3, 16, 3, 17, 19, 3, 1, 1, true),
        (2, 40, 4, 8, 8, 3, 1, 1, false),
        (2, 9, 2, 5, 6, 1, 1, 0, true),
        (1, 4, 1, 7, 8, 5, 1, 2, true),
        (1, 5, 3, 2, 3, 3, 1, 1, true),
    ];
    for &(n, c_in, c_out, h, w, k, stride, padding, bias) in cases {
        let (conv, xs) = random_case((n, c_in, c_out, h, w, k, stride, padding, bias))?;
        let want = conv.forward(&xs)?;
        let got = kernels::conv2d(&conv, &xs)?;
        let (abs, rel) = compare(&got, &want)?;
        let case = format!("n{n} c{c_in}->{c_out} {h}x{w} k{k} s{stride} p{padding}");
        assert!(abs < 1e-4, "{case}: max abs {abs:e}, max rel {rel:e}");
        // A non-contiguous input (a transposed view) gives the same result.
        let xt = xs.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        let (abs, _) = compare(&kernels::conv2d(&conv, &xt)?, &want)?;
        assert!(abs < 1e-4, "{case} (strided input): max abs {abs:e}");
    }
    Ok(())
}

#[test]
fn conv2d_direct_and_winograd_shapes_match_candle() -> Result<()> {
    // Stride-1 convolutions on images wide enough for the direct AVX-512 path (on a CPU
    // without AVX-512F they take the banded product, against the same reference): output
    // channels that leave 1 to 5 rows for the last tile and that split unevenly over the
    // threads, more input channels than one pass sums (128), several bands, 5×5 and
    // padding 0, a 2× upsampled input, and four images. Then 3×3 ones with an even output
    // of 16 × 16 or more, 32+ input and output channels, which take Winograd's F(2×2,
    // 3×3) on every CPU: the smallest, two images, a 2× upsampled input, padding 0, several
    // bands of blocks (many blocks, or many input channels).
    let cases: &[ConvCase] = &[
        // (n, c_in, c_out, h, w, k, padding, upsample, bias)
        (1, 32, 32, 16, 16, 3, 1, 1, true),
        (2, 33, 34, 20, 34, 3, 1, 1, false),
        (1, 32, 32, 12, 12, 3, 1, 2, true),
        (1, 32, 32, 34, 34, 3, 0, 1, true),
        (1, 32, 32, 66, 66, 3, 1, 1, true),
        (1, 600, 32, 32, 32, 3, 1, 1, false),
        (1, 3, 7, 40, 40, 3, 1, 1, true),
        (1, 130, 13, 33, 64, 3, 1, 1, false),
        (1, 5, 134, 48, 48, 3, 1, 1, true),
        (1, 4, 6, 36, 70, 5, 2, 1, true),
        (1, 6, 9, 50, 50, 3, 0, 1, true),
        (1, 8, 5, 24, 24, 3, 1, 2, true),
        (1, 6, 6, 96, 96, 3, 1, 1, false),
        (4, 8, 12, 64, 64, 3, 1, 1, true),
    ];
    for &(n, c_in, c_out, h, w, k, padding, upsample, bias) in cases {
        let (conv, xs) = random_case((n, c_in, c_out, h, w, k, 1, padding, bias))?;
        let (want, got) = if upsample == 1 {
            (conv.forward(&xs)?, kernels::conv2d(&conv, &xs)?)
        } else {
            let up = xs.upsample_nearest2d(h * upsample, w * upsample)?;
            (
                conv.forward(&up)?,
                kernels::upsample_nearest2x_conv2d(&conv, &xs)?,
            )
        };
        let (abs, rel) = compare(&got, &want)?;
        assert!(
            abs < 1e-4,
            "n{n} c{c_in}->{c_out} {h}x{w} k{k} p{padding} u{upsample}: max abs {abs:e}, max rel {rel:e}"
        );
    }
    Ok(())
}

#[test]
fn upsample_then_conv_matches_candle() -> Result<()> {
    for &(n, c, h, w) in &[
        (1, 3, 4, 4),
        (2, 5, 3, 7),
        (1, 16, 9, 2),
        (3, 4, 1, 1),
        (24, 8, 2, 2),
    ] {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = random_conv(c, c + 1, 3, cfg, true)?;
        let xs = randn(0f32, 1., (n, c, h, w), &Device::Cpu)?;
        let want = conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
        let got = kernels::upsample_nearest2x_conv2d(&conv, &xs)?;
        let (abs, rel) = compare(&got, &want)?;
        assert!(
            abs < 1e-4,
            "n{n} c{c} {h}x{w}: max abs {abs:e}, max rel {rel:e}"
        );
    }
    Ok(())
}

#[test]
fn conv2d_other_dtypes_take_candles_path() -> Result<()> {
    // f16/bf16 are not implemented by the CPU kernel: the decision point must
    // hand them to candle (not error, not silently compute in another dtype).
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv32 = random_conv(4, 6, 3, cfg, true)?;
    let xs = randn(0f32, 1., (2, 4, 5, 6), &Device::Cpu)?;
    // f16 (candle's CPU matmul, and so its CPU conv, has no bf16).
    let dtype = DType::F16;
    let conv = Conv2d::new(
        conv32.weight().to_dtype(dtype)?,
        conv32.bias().map(|b| b.to_dtype(dtype)).transpose()?,
        cfg,
    );
    let got = kernels::conv2d(&conv, &xs.to_dtype(dtype)?)?;
    assert_eq!(got.dtype(), dtype);
    let (abs, _) = compare(&got, &conv32.forward(&xs)?)?;
    assert!(abs < 0.1, "{dtype:?}: max abs {abs:e}");
    Ok(())
}

fn random_group_norm(
    c: usize,
    groups: usize,
) -> Result<(kernels::GroupNorm, candle_nn::GroupNorm)> {
    let dev = Device::Cpu;
    let weight = randn(1f32, 0.5, c, &dev)?;
    let bias = randn(0f32, 0.5, c, &dev)?;
    Ok((
        kernels::GroupNorm::new(weight.clone(), bias.clone(), groups, 1e-6)?,
        candle_nn::GroupNorm::new(weight, bias, c, groups, 1e-6)?,
    ))
}

#[test]
fn group_norm_and_silu_match_candle_nn() -> Result<()> {
    // (dims, groups, offset added to the input: a large mean tests the
    // cancellation in the variance)
    let cases: &[(&[usize], usize, f64)] = &[
        (&[1, 4, 3, 3], 2, 0.0),
        (&[2, 6, 5, 7], 3, 0.0),
        (&[3, 32, 1, 1], 32, 0.0),
        (&[1, 9, 13], 3, 0.0),
        (&[2, 8, 17, 19], 4, 100.0),
        (&[1, 64, 41, 53], 32, -3.0),
        (&[1, 2, 4099], 1, 0.5),
    ];
    for &(dims, groups, offset) in cases {
        let (ours, candle) = random_group_norm(dims[1], groups)?;
        let xs = (randn(0f32, 1., dims, &Device::Cpu)? + offset)?;
        let want = candle.forward(&xs)?;
        let (abs, rel) = compare(&ours.forward(&xs)?, &want)?;
        assert!(
            abs < 1e-4,
            "{dims:?}/{groups}+{offset}: max abs {abs:e}, max rel {rel:e}"
        );
        let (abs, rel) = compare(&ours.forward_silu(&xs)?, &want.silu()?)?;
        assert!(
            abs < 1e-4,
            "{dims:?}/{groups}+{offset} silu: max abs {abs:e}, max rel {rel:e}"
        );
        // A strided view of the same values gives the same result.
        let xt = xs.transpose(1, 2)?.contiguous()?.transpose(1, 2)?;
        let (abs, _) = compare(&ours.forward(&xt)?, &want)?;
        assert!(abs < 1e-4, "{dims:?} strided: max abs {abs:e}");
    }
    Ok(())
}

#[test]
fn group_norm_half_precision_takes_candles_path() -> Result<()> {
    let dev = Device::Cpu;
    let weight = randn(1f32, 0.5, 8, &dev)?;
    let bias = randn(0f32, 0.5, 8, &dev)?;
    let candle = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 8, 4, 1e-6)?;
    let xs = randn(0f32, 1., (2, 8, 5, 5), &dev)?;
    let want = candle.forward(&xs)?.silu()?;
    // Against f32: the input and the affine weights are rounded to the half type (an error
    // that the weight scales, so absolute), then the normalised value and its SiLU are each
    // rounded on output (relative, a few units in the last place). Over 3000 draws the worst
    // error beyond the relative term was 1.4e-2 (BF16) and 1.5e-3 (F16).
    for (dtype, atol, rtol) in [
        (DType::F16, 2.5e-3, 1.0 / 512.0),
        (DType::BF16, 2e-2, 1.0 / 64.0),
    ] {
        let gn = kernels::GroupNorm::new(weight.to_dtype(dtype)?, bias.to_dtype(dtype)?, 4, 1e-6)?;
        let got = gn.forward_silu(&xs.to_dtype(dtype)?)?;
        assert_eq!(got.dtype(), dtype);
        assert_close(
            &got.to_dtype(DType::F32)?,
            &want,
            atol,
            rtol,
            &format!("{dtype:?}"),
        )?;
    }
    Ok(())
}

/// Fails unless every element satisfies `|got − want| ≤ atol + rtol·|want|` (the kernels and
/// candle round differently, and an ulp of a large product is above a fixed bound).
fn assert_close(got: &Tensor, want: &Tensor, atol: f32, rtol: f32, what: &str) -> Result<()> {
    compare(got, want)?; // shapes and finiteness
    let g = got.flatten_all()?.to_vec1::<f32>()?;
    let w = want.flatten_all()?.to_vec1::<f32>()?;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let bound = atol + rtol * b.abs();
        assert!(
            (a - b).abs() <= bound,
            "{what}: element {i}: {a} vs {b} (bound {bound:e})"
        );
    }
    Ok(())
}

#[test]
fn gelu_matches_candles_op() -> Result<()> {
    let dev = Device::Cpu;
    // a row shorter than the 8 lanes, odd widths, rows above the per-task split, a view
    for dims in [
        vec![1, 5],
        vec![3, 17],
        vec![2, 1500, 96],
        vec![1, 3, 4, 1280],
    ] {
        // values up to |8|: both tails of the GELU and its bend near 0
        let x = (randn(0f32, 1., dims.as_slice(), &dev)? * 3.0)?;
        // erf's absolute error (< 1e-6) times |x|/2 where 1 + erf is small (x < 0)
        assert_close(
            &kernels::gelu_erf(&x)?,
            &x.gelu_erf()?,
            1e-5,
            4e-6,
            &format!("{dims:?}"),
        )?;
        let t = x.t()?;
        assert_close(
            &kernels::gelu_erf(&t)?,
            &t.gelu_erf()?,
            1e-5,
            4e-6,
            &format!("{dims:?} transposed"),
        )?;
    }
    Ok(())
}

#[test]
fn geglu_matches_the_candle_composition() -> Result<()> {
    let dev = Device::Cpu;
    // (leading dims, inner): odd widths, one row, rows above the per-task split, rank 2 and 4
    let cases: &[(&[usize], usize)] = &[
        (&[1], 1),
        (&[3], 7),
        (&[2, 5], 33),
        (&[2, 77, 40], 160),
        (&[1, 3, 4], 1280),
        (&[2, 2, 3, 5], 9),
    ];
    for &(lead, inner) in cases {
        let mut dims = lead.to_vec();
        dims.push(2 * inner);
        // values up to |8|: both tails of the GELU and its bend near 0
        let h = (randn(0f32, 1., dims.as_slice(), &dev)? * 3.0)?;
        let got = kernels::geglu(&h)?;
        let x = h.narrow(candle_core::D::Minus1, 0, inner)?;
        let gate = h.narrow(candle_core::D::Minus1, inner, inner)?;
        let want = (x * gate.gelu_erf()?)?;
        // erf's absolute error (< 1e-6) times |x·gate|/2 where 1 + erf is small (gate < 0)
        assert_close(&got, &want, 2e-5, 4e-6, &format!("{dims:?}"))?;
        // a strided input (a transposed view) is made contiguous first
        let t = h.transpose(0, lead.len() - 1)?;
        if t.dim(candle_core::D::Minus1)? % 2 == 0 {
            let n = t.dim(candle_core::D::Minus1)? / 2;
            let want = (t.narrow(candle_core::D::Minus1, 0, n)?
                * t.narrow(candle_core::D::Minus1, n, n)?.gelu_erf()?)?;
            assert_close(
                &kernels::geglu(&t)?,
                &want,
                2e-5,
                4e-6,
                &format!("{dims:?} transposed"),
            )?;
        }
    }
    assert!(kernels::geglu(&Tensor::zeros((2, 3), DType::F32, &dev)?).is_err());
    // other dtypes take the composition
    let h = randn(0f32, 1., (4, 6), &dev)?.to_dtype(DType::BF16)?;
    assert_eq!(kernels::geglu(&h)?.dims(), &[4, 3]);
    Ok(())
}

#[test]
fn scaled_softmax_matches_candle_nn() -> Result<()> {
    let dev = Device::Cpu;
    // rows of 1, 7 (below the lanes), 12 and 24 (motion modules), 77 (text), 4096 (64² latents)
    let cases: &[(&[usize], Option<f64>)] = &[
        (&[1, 1], None),
        (&[3, 7], Some(0.125)),
        (&[2, 8, 12], Some(0.158)),
        (&[5, 24], None),
        (&[2, 3, 77], Some(0.0625)),
        (&[2, 4096], Some(0.05)),
    ];
    for &(dims, scale) in cases {
        // large scores: the row maximum must be subtracted
        let xs = (randn(0f32, 1., dims, &dev)? * 40.0)?;
        let got = kernels::softmax_last_dim(&xs, scale)?;
        let scaled = match scale {
            Some(s) => (&xs * s)?,
            None => xs.clone(),
        };
        let want = candle_nn::ops::softmax_last_dim(&scaled)?;
        assert_close(&got, &want, 1e-7, 4e-6, &format!("{dims:?}"))?;
        let sums = got
            .sum(candle_core::D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        // a strided view
        let t = xs.t()?;
        let want = candle_nn::ops::softmax_last_dim(&t.contiguous()?)?;
        let got = kernels::softmax_last_dim(&t, None)?;
        assert_close(&got, &want, 1e-7, 4e-6, &format!("{dims:?} transposed"))?;
    }
    // other dtypes take candle's path
    let h = randn(0f32, 1., (4, 6), &dev)?.to_dtype(DType::F16)?;
    assert_eq!(
        kernels::softmax_last_dim(&h, Some(0.5))?.dtype(),
        DType::F16
    );
    Ok(())
}

#[test]
fn layer_norm_matches_the_candle_composition() -> Result<()> {
    let dev = Device::Cpu;
    // rows of 1, 7 (below the lanes), 8, 32, 40, 160 and 1280 (the released widths), a batch of
    // rows above the per-task split, rank 2 to 4
    let cases: &[&[usize]] = &[
        &[1, 1],
        &[3, 7],
        &[2, 5, 8],
        &[2, 77, 32],
        &[24, 12, 40],
        &[2, 64, 160],
        &[1, 3, 2, 1280],
    ];
    let composition = |xs: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
        let x = xs.broadcast_sub(&xs.mean_keepdim(candle_core::D::Minus1)?)?;
        let var = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
        x.broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w)?
            .broadcast_add(b)
    };
    for &dims in cases {
        let width = dims[dims.len() - 1];
        // an offset far from 0: the variance must be of the centred values
        let xs = ((randn(0f32, 1., dims, &dev)? * 3.0)? + 20.0)?;
        let w = ((randn(0f32, 1., width, &dev)? * 0.1)? + 1.0)?;
        let b = (randn(0f32, 1., width, &dev)? * 0.05)?;
        let got = kernels::layer_norm(&xs, &w, &b, 1e-5)?;
        let want = composition(&xs, &w, &b)?;
        assert_close(&got, &want, 1e-5, 1e-5, &format!("{dims:?}"))?;
        // a strided view is made contiguous first
        let t = xs.transpose(0, dims.len() - 2)?;
        let want = composition(&t.contiguous()?, &w, &b)?;
        let got = kernels::layer_norm(&t, &w, &b, 1e-5)?;
        assert_close(&got, &want, 1e-5, 1e-5, &format!("{dims:?} transposed"))?;
    }
    // a constant row: zero variance, the output is the bias
    let xs = Tensor::full(4f32, (2, 9), &dev)?;
    let b = Tensor::arange(0f32, 9., &dev)?;
    let got = kernels::layer_norm(&xs, &Tensor::ones(9, DType::F32, &dev)?, &b, 1e-5)?;
    assert_close(
        &got,
        &b.unsqueeze(0)?.broadcast_as((2, 9))?.contiguous()?,
        0.0,
        0.0,
        "constant",
    )?;
    // a weight of the wrong width is an error, not a silent misread
    assert!(kernels::layer_norm(&xs, &Tensor::ones(8, DType::F32, &dev)?, &b, 1e-5).is_err());
    // half precision takes the composition (in f32) and keeps its dtype
    let h = randn(0f32, 1., (4, 6), &dev)?.to_dtype(DType::F16)?;
    let w = Tensor::ones(6, DType::F32, &dev)?;
    let zero = Tensor::zeros(6, DType::F32, &dev)?;
    assert_eq!(
        kernels::layer_norm(&h, &w, &zero, 1e-5)?.dtype(),
        DType::F16
    );
    Ok(())
}

/// Plain multi-head attention with candle ops: heads split, `softmax(q·kᵀ·scale)·v` per
/// head, heads merged. `q` `[N, Lq, H·d]`, `k` `[N, Lk, H·d]`, `v` `[N, Lk, H·dv]`.
fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let split = |x: &Tensor| -> Result<Tensor> {
        let (n, l, c) = x.dims3()?;
        x.reshape((n, l, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
    let o = p.matmul(&v)?;
    let (n, h, l, dv) = o.dims4()?;
    o.transpose(1, 2)?.contiguous()?.reshape((n, l, h * dv))
}

/// (items, lq, lk, heads, d, dv, shared keys, first item that sees them)
type AttentionCase = (usize, usize, usize, usize, usize, usize, usize, usize);

#[test]
fn attention_matches_the_plain_composition() -> Result<()> {
    let dev = Device::Cpu;
    let cases: &[AttentionCase] = &[
        (1, 1, 1, 1, 1, 1, 0, 0),
        (3, 7, 5, 2, 3, 3, 0, 0),
        // the denoising UNet's reference attention: own tokens + the bank for the
        // conditional half only (from item 2 of 4), all, none
        (4, 16, 16, 2, 16, 16, 16, 2),
        (4, 9, 9, 8, 5, 5, 11, 0),
        (4, 9, 9, 8, 5, 5, 11, 4),
        // queries ≠ keys (cross-attention to 10 audio tokens), v wider than k
        (6, 33, 10, 2, 8, 12, 0, 0),
        // more scores than one block holds (256 Ki): 70 keys × 4000 queries → several blocks,
        // a partial last one
        (1, 4000, 70, 1, 4, 4, 0, 0),
        (2, 300, 600, 1, 6, 6, 500, 1),
    ];
    for &(n, lq, lk, heads, d, dv, l_shared, from) in cases {
        let what = format!(
            "n {n} lq {lq} lk {lk} heads {heads} d {d} dv {dv} shared {l_shared} from {from}"
        );
        let q = randn(0f32, 1., (n, lq, heads * d), &dev)?;
        let k = (randn(0f32, 1., (n, lk, heads * d), &dev)? * 3.0)?;
        let v = randn(0f32, 1., (n, lk, heads * dv), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();
        let (got, want) = if l_shared == 0 {
            let got = kernels::attention(&q, &k, &v, None, heads, scale)?;
            (got, naive_attention(&q, &k, &v, heads, scale)?)
        } else {
            let sk = randn(0f32, 1., (1, l_shared, heads * d), &dev)?;
            let sv = randn(0f32, 1., (1, l_shared, heads * dv), &dev)?;
            let shared = kernels::SharedKv {
                k: &sk,
                v: &sv,
                from_item: from,
            };
            let got = kernels::attention(&q, &k, &v, Some(shared), heads, scale)?;
            let mut parts = Vec::new();
            if from > 0 {
                let (q, k, v) = (
                    q.narrow(0, 0, from)?,
                    k.narrow(0, 0, from)?,
                    v.narrow(0, 0, from)?,
                );
                parts.push(naive_attention(&q, &k, &v, heads, scale)?);
            }
            if from < n {
                let rest = n - from;
                let widen = |own: &Tensor, s: &Tensor| -> Result<Tensor> {
                    let c = s.dim(2)?;
                    Tensor::cat(
                        &[
                            &own.narrow(0, from, rest)?,
                            &s.broadcast_as((rest, l_shared, c))?,
                        ],
                        1,
                    )
                };
                parts.push(naive_attention(
                    &q.narrow(0, from, rest)?,
                    &widen(&k, &sk)?,
                    &widen(&v, &sv)?,
                    heads,
                    scale,
                )?);
            }
            (got, Tensor::cat(&parts, 0)?)
        };
        assert_close(&got, &want, 2e-6, 2e-5, &what)?;
    }
    // keys and values that do not pair up are an error, not a panic
    let q = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
    let k = Tensor::zeros((2, 5, 4), DType::F32, &dev)?;
    assert!(kernels::attention(
        &q,
        &k,
        &Tensor::zeros((2, 4, 4), DType::F32, &dev)?,
        None,
        2,
        1.0
    )
    .is_err());
    assert!(kernels::attention(&q, &k, &k, None, 3, 1.0).is_err());
    // other dtypes take the composition and keep their dtype
    let h = randn(0f32, 1., (2, 3, 4), &dev)?.to_dtype(DType::BF16)?;
    assert_eq!(
        kernels::attention(&h, &h, &h, None, 2, 0.5)?.dtype(),
        DType::BF16
    );
    Ok(())
}

#[test]
fn attention_over_frames_matches_the_transposed_composition() -> Result<()> {
    let dev = Device::Cpu;
    // (videos, frames, positions, heads, d): the motion modules' shapes, one frame, one position
    let cases: &[(usize, usize, usize, usize, usize)] = &[
        (2, 12, 16, 2, 16),
        (1, 1, 5, 1, 3),
        (3, 5, 1, 4, 2),
        (2, 16, 64, 8, 5),
    ];
    for &(b, f, l, heads, d) in cases {
        let what = format!("b {b} f {f} l {l} heads {heads} d {d}");
        let c = heads * d;
        let x = |s: f64| -> Result<Tensor> { randn(0f32, 1., (b * f, l, c), &dev)? * s };
        let (q, k, v) = (x(1.0)?, x(3.0)?, x(1.0)?);
        let scale = 1.0 / (d as f64).sqrt();
        let got = kernels::frame_attention(&q, &k, &v, f, heads, scale)?;
        let to_seq = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, f, l, c))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * l, f, c))
        };
        let want = naive_attention(&to_seq(&q)?, &to_seq(&k)?, &to_seq(&v)?, heads, scale)?
            .reshape((b, l, f, c))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * f, l, c))?;
        assert_close(&got, &want, 2e-6, 2e-5, &what)?;
    }
    let q = Tensor::zeros((6, 3, 4), DType::F32, &dev)?;
    assert!(kernels::frame_attention(&q, &q, &q, 4, 2, 1.0).is_err());
    Ok(())
}
