//! The comparison every parity test relies on (`common::TensorDiff`) and the
//! kernel sweep harness (`common::kernel_sweep`): they must fail where a
//! kernel bug would show, so these tests check that they do.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{kernel_sweep, sweep_input, sweep_sizes, TensorDiff};

fn golden_like() -> anyhow::Result<Tensor> {
    // (2, 4, 3, 5): a CFG batch, [uncond, cond].
    sweep_input(&[2, 4, 3, 5], 7, DType::F32, &Device::Cpu)
}

/// `t` with element `flat` replaced by `v`.
fn with_value(t: &Tensor, flat: usize, v: f32) -> anyhow::Result<Tensor> {
    let mut data = t.flatten_all()?.to_vec1::<f32>()?;
    data[flat] = v;
    Ok(Tensor::from_vec(data, t.dims(), &Device::Cpu)?)
}

#[test]
fn a_non_finite_value_anywhere_fails() -> anyhow::Result<()> {
    let want = golden_like()?;
    let n = want.elem_count();
    // First, middle, last element: the last lies in the conditional half, where
    // a reduction with candle's `max` would skip a NaN.
    for flat in [0, n / 2, n - 1] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let got = with_value(&want, flat, bad)?;
            let err = TensorDiff::between("x", &got, &want)
                .unwrap_err()
                .to_string();
            assert!(err.contains("non-finite") && err.contains("ours"), "{err}");
            let err = TensorDiff::between("x", &want, &got)
                .unwrap_err()
                .to_string();
            assert!(err.contains("golden"), "{err}");
            assert!(common::assert_close("x", &got, &want, f64::INFINITY).is_err());
        }
    }
    Ok(())
}

#[test]
fn the_worst_element_is_located_and_relative_error_has_a_floor() -> anyhow::Result<()> {
    let want = Tensor::new(&[[1f32, -2.0, 0.0], [4.0, 1e-9, 0.5]], &Device::Cpu)?;
    let got = Tensor::new(
        &[[1f32, -2.0, 0.0], [4.001, 1e-9 + 1e-6, 0.5]],
        &Device::Cpu,
    )?;
    let d = TensorDiff::between("x", &got, &want)?;
    assert!((d.max_abs - 1e-3).abs() < 1e-6, "{d}");
    assert_eq!(d.worst_abs_at, vec![1, 0]);
    // The 1e-6 error on a 1e-9 value counts against the floor 1e-3 × 4, not 1e-9.
    assert_eq!(d.worst_rel_at, vec![1, 1]);
    assert!((d.max_rel - 1e-6 / 4e-3).abs() < 1e-6, "{d}");
    assert_eq!(d.max_want, 4.0);
    assert!(TensorDiff::between("x", &got, &want.reshape((3, 2))?).is_err());
    assert_eq!(TensorDiff::between("x", &want, &want)?.max_abs, 0.0);
    Ok(())
}

#[test]
fn sweep_sizes_cross_the_tile() {
    assert_eq!(sweep_sizes(16), vec![1, 2, 3, 7, 13, 15, 16, 17, 35]);
    assert_eq!(sweep_sizes(1), vec![1, 2, 3, 5, 7, 13]);
}

fn softmax_composition(x: &Tensor) -> candle_core::Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The harness passes a correct op in f32 and f16 and names the shape where
/// an op goes wrong only past one tile (a typical tail bug).
#[test]
fn kernel_sweep_passes_a_correct_op_and_catches_a_tail_bug() -> anyhow::Result<()> {
    const TILE: usize = 8;
    let shapes: Vec<Vec<usize>> = sweep_sizes(TILE).into_iter().map(|n| vec![3, n]).collect();
    let tol = |dt: DType| if dt == DType::F32 { 1e-6 } else { 2e-3 };
    let worst = kernel_sweep(
        "softmax",
        &shapes,
        &[DType::F32, DType::F16],
        tol,
        |shape, dtype| {
            let x = sweep_input(shape, 3, dtype, &Device::Cpu)?;
            Ok((
                candle_nn::ops::softmax_last_dim(&x)?,
                softmax_composition(&x)?,
            ))
        },
    )?;
    assert_eq!(worst.len(), 2);

    // "Kernel" whose elements past the first tile are off by 1e-4 relative.
    let err = kernel_sweep(
        "softmax_tail_bug",
        &shapes,
        &[DType::F32],
        tol,
        |shape, _| {
            let x = sweep_input(shape, 3, DType::F32, &Device::Cpu)?;
            let want = softmax_composition(&x)?;
            let n = shape[1];
            let got = if n > TILE {
                let head = want.narrow(1, 0, TILE)?;
                let tail = (want.narrow(1, TILE, n - TILE)? * (1.0 + 1e-4))?;
                Tensor::cat(&[head, tail], 1)?
            } else {
                want.clone()
            };
            Ok((got, want))
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("softmax_tail_bug [3, 9] f32"), "{err}");
    Ok(())
}
