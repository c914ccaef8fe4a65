//! Face stage benchmark: MTCNN detection + mask/crop/resize on the 512x512 golden photo.
//!
//! Run: `cargo bench -p echomimic-benches --bench face` (add `-- <iterations>` to change
//! the count, default 10). Two baselines are measured in the same run and reported as
//! ratios, so the figures compare across machines:
//!
//! * the three networks' forward passes alone (P-Net on every pyramid level, R-Net and
//!   O-Net on the batches the cascade built) against the whole `detect`;
//! * a plain `f64` bilinear resize (same geometry, no fixed point) against the
//!   OpenCV-exact `resize_bilinear_opencv` of the crop to 512x512.
#![allow(clippy::print_stdout)]

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use echomimic_pipeline::face::{self, FaceCropOptions, FaceDetector, ImageLimits};
use echomimic_pipeline::models::mtcnn::{self, ImageHwc, MtcnnTrace};

/// Runs `f` `n` times after one warm-up call; returns the mean duration.
fn time<T>(n: usize, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    black_box(f()?);
    let t = Instant::now();
    for _ in 0..n {
        black_box(f()?);
    }
    Ok(t.elapsed() / n as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Bilinear resize with `f64` weights and rounding, half-pixel centres, clamped edges.
fn naive_bilinear(src: &[u8], sw: usize, sh: usize, cn: usize, dw: usize, dh: usize) -> Vec<u8> {
    let mut out = vec![0u8; dw * dh * cn];
    let (fx, fy) = (sw as f64 / dw as f64, sh as f64 / dh as f64);
    for y in 0..dh {
        let sy = ((y as f64 + 0.5) * fy - 0.5).clamp(0.0, (sh - 1) as f64);
        let (y0, wy) = (sy.floor() as usize, sy - sy.floor());
        let y1 = (y0 + 1).min(sh - 1);
        for x in 0..dw {
            let sx = ((x as f64 + 0.5) * fx - 0.5).clamp(0.0, (sw - 1) as f64);
            let (x0, wx) = (sx.floor() as usize, sx - sx.floor());
            let x1 = (x0 + 1).min(sw - 1);
            for c in 0..cn {
                let p = |yy: usize, xx: usize| f64::from(src[(yy * sw + xx) * cn + c]);
                let v = (1.0 - wy) * ((1.0 - wx) * p(y0, x0) + wx * p(y0, x1))
                    + wy * ((1.0 - wx) * p(y1, x0) + wx * p(y1, x1));
                out[(y * dw + x) * cn + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let photo_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/golden/public/inputs/astronaut.png");
    let photo = face::load_image(&photo_path, &ImageLimits::default())?;
    let (w, h) = photo.dimensions();
    let dev = Device::Cpu;
    let det = FaceDetector::new(&dev)?;
    let opts = FaceCropOptions::default();
    println!("face bench: {w}x{h} photo, output 512x512, {iters} iterations, CPU");

    // Whole stage and detection alone.
    let full = time(iters, || Ok(det.crop_face(&photo, 512, 512, &opts)?))?;
    let detect = time(iters, || Ok(det.detect(&photo, true)?))?;

    // Networks alone, on exactly the inputs the cascade builds.
    let bgr = face::rgb_to_bgr_bytes(&photo);
    let view = ImageHwc::new(&bgr, h as usize, w as usize)?;
    let m = det.mtcnn();
    let mut trace = MtcnnTrace::default();
    m.detect_traced(&view, &mut trace)?;
    let mut pnet_inputs = Vec::new();
    for &(hs, ws) in &trace.pnet_input_hw {
        let mut x = mtcnn::imresample_area(&view, 0..h as usize, 0..w as usize, hs, ws);
        x.iter_mut().for_each(|v| *v = (*v - 127.5) * 0.0078125);
        pnet_inputs.push(Tensor::from_vec(x, (1, 3, hs, ws), &dev)?);
    }
    let rnet_in = trace.rnet_input.clone();
    let onet_in = trace.onet_input.clone();
    let pnet = time(iters, || {
        for x in &pnet_inputs {
            black_box(m.pnet().forward(x)?);
        }
        Ok(())
    })?;
    let rnet = time(iters, || {
        if let Some(x) = &rnet_in {
            black_box(m.rnet().forward(x)?);
        }
        Ok(())
    })?;
    let onet = time(iters, || {
        if let Some(x) = &onet_in {
            black_box(m.onet().forward(x)?);
        }
        Ok(())
    })?;
    let nets = pnet + rnet + onet;

    // Resize: OpenCV-exact fixed point vs naive f64, on the real crop.
    let crop = det.crop_face(&photo, 512, 512, &opts)?;
    let sq = crop.square_rect;
    let side = sq.width() as usize;
    let mut patch = Vec::with_capacity(side * side * 3);
    for y in sq.y0..sq.y1 {
        let row = (y as usize * w as usize) * 3;
        patch
            .extend_from_slice(&photo.as_raw()[row + sq.x0 as usize * 3..row + sq.x1 as usize * 3]);
    }
    let resize_iters = iters * 20;
    let cv = time(resize_iters, || {
        Ok(face::resize_bilinear_opencv(
            &patch, side, side, 3, 512, 512,
        ))
    })?;
    let naive = time(resize_iters, || {
        Ok(naive_bilinear(&patch, side, side, 3, 512, 512))
    })?;
    let a = face::resize_bilinear_opencv(&patch, side, side, 3, 512, 512)?;
    let b = naive_bilinear(&patch, side, side, 3, 512, 512);
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0);

    println!(
        "crop_face (detect + mask + crop + resize): {:8.2} ms/image",
        ms(full)
    );
    println!(
        "detect (MTCNN cascade):                    {:8.2} ms/image",
        ms(detect)
    );
    println!(
        "P/R/O-Net forwards alone:                  {:8.2} ms/image  ({} levels, R-Net batch {}, O-Net batch {})",
        ms(nets),
        pnet_inputs.len(),
        rnet_in.as_ref().map_or(0, |t| t.dims()[0]),
        onet_in.as_ref().map_or(0, |t| t.dims()[0]),
    );
    println!(
        "  P-Net {:.2} ms, R-Net {:.2} ms, O-Net {:.2} ms",
        ms(pnet),
        ms(rnet),
        ms(onet)
    );
    println!(
        "  ratio detect / networks = {:.2} (cascade overhead: resampling, NMS, crops)",
        detect.as_secs_f64() / nets.as_secs_f64()
    );
    println!(
        "resize {side}x{side} -> 512x512 x3: OpenCV-exact {:.3} ms, naive f64 {:.3} ms, ratio exact / naive = {:.2}, max |diff| {max_diff}",
        ms(cv),
        ms(naive),
        cv.as_secs_f64() / naive.as_secs_f64()
    );
    Ok(())
}
