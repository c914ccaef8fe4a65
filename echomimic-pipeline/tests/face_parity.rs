//! Face detection, mask and crop against the reference (`tensors/mtcnn.safetensors`).
//!
//! The golden values come from facenet-pytorch 2.5.0 `MTCNN(image_size=320, margin=0,
//! min_face_size=20, thresholds=[0.6, 0.7, 0.7], factor=0.709, post_process=True)` with
//! its real weights, called as EchoMimic does (`detect(cv2.imread(photo))`, BGR input),
//! followed by the mask / crop / `cv2.resize` block of `infer_audio2vid.py` (opencv 4.11,
//! numpy 1.26, torch 2.2.2 on CPU, float32). The photo and the output size come from the
//! golden set's `manifest.json` (`config.photo`, `config.W`, `config.H`).
//!
//! These tests ignore `ECHOMIMIC_DEVICE` and `ECHOMIMIC_DTYPE` on purpose: the
//! pipeline (and so the worker) always runs the detector on the CPU in f32
//! (`EchoMimicPipeline::from_prompt_config`), where it was validated against
//! facenet-pytorch; its output is integer geometry (rounded box, crop
//! rectangles) that a GPU or half-precision run could move by one pixel for
//! no benefit. The image and mask tensors it hands on are checked in the run's
//! device and dtype by `pipeline_parity.rs`.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, assert_exact_i64, get, golden, golden_dir};
use echomimic_pipeline::face::{self, FaceCropOptions, FaceDetector, FaceQuirks, ImageLimits};
use echomimic_pipeline::models::mtcnn::MtcnnTrace;

struct Setup {
    photo: image::RgbImage,
    width: u32,
    height: u32,
}

fn setup() -> anyhow::Result<Setup> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("manifest.json"))?)?;
    let cfg = &manifest["config"];
    let dim = |k: &str| {
        cfg[k]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| anyhow::anyhow!("manifest config.{k} missing"))
    };
    let photo_name = cfg["photo"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("manifest config.photo missing"))?;
    let photo = face::load_image(
        golden_dir().join("inputs").join(photo_name),
        &ImageLimits::default(),
    )?;
    Ok(Setup {
        photo,
        width: dim("W")?,
        height: dim("H")?,
    })
}

fn some<'a>(t: &'a Option<Tensor>, what: &str) -> anyhow::Result<&'a Tensor> {
    t.as_ref()
        .ok_or_else(|| anyhow::anyhow!("trace has no {what}"))
}

#[test]
fn mtcnn_cascade_matches_facenet_stage_by_stage() -> anyhow::Result<()> {
    let g = golden("mtcnn")?;
    let s = setup()?;
    let (w, h) = s.photo.dimensions();
    assert_exact_i64(
        "image_hw",
        &[i64::from(h), i64::from(w)],
        get(&g, "image_hw")?,
    )?;

    let det = FaceDetector::new(&Device::Cpu)?;
    let mut trace = MtcnnTrace::default();
    let dets = det.detect_traced(&s.photo, true, &mut trace)?;

    // Pyramid (f64, computed with Python's operation order: bit-identical).
    let want = get(&g, "pyramid_scales")?.to_vec1::<f64>()?;
    assert_eq!(trace.scales, want, "pyramid scales");
    let hw: Vec<i64> = trace
        .pnet_input_hw
        .iter()
        .flat_map(|&(a, b)| [a as i64, b as i64])
        .collect();
    assert_exact_i64("pnet_input_hw", &hw, get(&g, "pnet_input_hw")?)?;

    // P-Net at the smallest scale: area-resampled input is bit-exact by construction.
    assert_close(
        "pnet_last_scale.input",
        some(&trace.pnet_last_input, "P-Net input")?,
        get(&g, "pnet_last_scale.input")?,
        1e-6,
    )?;
    assert_close(
        "pnet_last_scale.prob",
        some(&trace.pnet_last_prob, "P-Net prob")?,
        get(&g, "pnet_last_scale.prob")?,
        2e-6,
    )?;
    assert_close(
        "pnet_last_scale.reg",
        some(&trace.pnet_last_reg, "P-Net reg")?,
        get(&g, "pnet_last_scale.reg")?,
        1e-5,
    )?;

    // R-Net: same candidates in the same order (exact count), then its outputs.
    let rnet_in = some(&trace.rnet_input, "R-Net input")?;
    let shape: Vec<i64> = rnet_in.dims().iter().map(|&d| d as i64).collect();
    assert_exact_i64("rnet.input_shape", &shape, get(&g, "rnet.input_shape")?)?;
    assert_close(
        "rnet.out_prob",
        some(&trace.rnet_prob, "R-Net prob")?,
        get(&g, "rnet.out_prob")?,
        1e-5,
    )?;
    assert_close(
        "rnet.out_reg",
        some(&trace.rnet_reg, "R-Net reg")?,
        get(&g, "rnet.out_reg")?,
        1e-5,
    )?;

    // O-Net.
    assert_close(
        "onet.input",
        some(&trace.onet_input, "O-Net input")?,
        get(&g, "onet.input")?,
        1e-6,
    )?;
    assert_close(
        "onet.out_prob",
        some(&trace.onet_prob, "O-Net prob")?,
        get(&g, "onet.out_prob")?,
        1e-5,
    )?;
    assert_close(
        "onet.out_reg",
        some(&trace.onet_reg, "O-Net reg")?,
        get(&g, "onet.out_reg")?,
        1e-5,
    )?;
    assert_close(
        "onet.out_landmarks",
        some(&trace.onet_landmarks, "O-Net landmarks")?,
        get(&g, "onet.out_landmarks")?,
        1e-5,
    )?;

    // Final detections (README tolerances: boxes 6e-4, probs 2e-6).
    let boxes: Vec<f32> = dets.iter().flat_map(|d| d.bbox).collect();
    let probs: Vec<f32> = dets.iter().map(|d| d.prob).collect();
    let n = dets.len();
    assert_close(
        "det_boxes",
        &Tensor::from_vec(boxes, (n, 4), &Device::Cpu)?,
        get(&g, "det_boxes")?,
        6e-4,
    )?;
    assert_close(
        "det_probs",
        &Tensor::from_vec(probs, n, &Device::Cpu)?,
        get(&g, "det_probs")?,
        2e-6,
    )?;
    Ok(())
}

#[test]
fn face_mask_and_crop_match_infer_audio2vid() -> anyhow::Result<()> {
    let g = golden("mtcnn")?;
    let s = setup()?;
    let det = FaceDetector::new(&Device::Cpu)?;
    let crop = det.crop_face(&s.photo, s.width, s.height, &FaceCropOptions::default())?;

    assert_exact_i64(
        "select_bbox_rounded",
        &crop.rounded_box,
        get(&g, "select_bbox_rounded")?,
    )?;
    assert_exact_i64(
        "face_mask_full_rect_rows_cols",
        &crop.mask_slice,
        get(&g, "face_mask_full_rect_rows_cols")?,
    )?;
    assert_exact_i64(
        "crop_rect",
        &crop.crop_rect.to_xyxy(),
        get(&g, "crop_rect")?,
    )?;
    assert_exact_i64(
        "crop_square_rect",
        &crop.square_rect.to_xyxy(),
        get(&g, "crop_square_rect")?,
    )?;

    // cv2.resize(INTER_LINEAR) on uint8: bit-exact.
    let (w, h) = (s.width as usize, s.height as usize);
    let bgr = Tensor::from_vec(crop.face_bgr(), (h, w, 3), &Device::Cpu)?;
    let d = assert_close(
        "face_img_bgr_resized",
        &bgr,
        get(&g, "face_img_bgr_resized")?,
        0.0,
    )?;
    assert_eq!(d, 0.0);
    let mask = Tensor::from_vec(crop.mask.as_raw().clone(), (h, w), &Device::Cpu)?;
    assert_close(
        "face_mask_resized",
        &mask,
        get(&g, "face_mask_resized")?,
        0.0,
    )?;
    assert_close(
        "face_mask_tensor",
        &crop.mask_tensor(DType::F32, &Device::Cpu)?,
        get(&g, "face_mask_tensor")?,
        0.0,
    )?;

    // The reference image the pipeline encodes (VaeImageProcessor of the RGB crop).
    let p = golden("pipeline")?;
    assert_close(
        "pipeline.ref_image_tensor",
        &crop.reference_image_tensor(DType::F32, &Device::Cpu)?,
        get(&p, "ref_image_tensor")?,
        2e-6,
    )?;
    Ok(())
}

#[test]
fn corrected_mode_keeps_the_face_and_fixes_the_crop_bottom() -> anyhow::Result<()> {
    let s = setup()?;
    let det = FaceDetector::new(&Device::Cpu)?;
    let reference = det.crop_face(&s.photo, s.width, s.height, &FaceCropOptions::default())?;
    let opts = FaceCropOptions {
        quirks: FaceQuirks::CORRECTED,
        ..FaceCropOptions::default()
    };
    let fixed = det.crop_face(&s.photo, s.width, s.height, &opts)?;
    // RGB input finds the same face (boxes differ slightly).
    let [a, b] = [reference.detection.bbox, fixed.detection.bbox];
    for i in 0..4 {
        assert!((a[i] - b[i]).abs() < 8.0, "{a:?} vs {b:?}");
    }
    // bottom = re + r_pad_crop (row pad) instead of the column pad
    let [_, rb, _, re] = fixed.rounded_box;
    let r_pad = ((re - rb) as f64 * 0.5).trunc() as i64;
    assert_eq!(
        fixed.crop_rect.y1,
        (re + r_pad).min(i64::from(s.photo.height()))
    );
    assert_eq!(fixed.face_rgb.dimensions(), (s.width, s.height));
    Ok(())
}

#[test]
fn worker_preset_differs_only_in_the_crop_bottom() -> anyhow::Result<()> {
    let s = setup()?;
    let det = FaceDetector::new(&Device::Cpu)?;
    let reference = det.crop_face(&s.photo, s.width, s.height, &FaceCropOptions::default())?;
    let opts = FaceCropOptions {
        quirks: FaceQuirks::ECHOME_WORKER,
        ..FaceCropOptions::default()
    };
    let worker = det.crop_face(&s.photo, s.width, s.height, &opts)?;
    assert_eq!(reference.detection, worker.detection);
    assert_eq!(reference.mask_slice, worker.mask_slice);
    assert_eq!(reference.crop_rect.x0, worker.crop_rect.x0);
    assert_eq!(reference.crop_rect.y0, worker.crop_rect.y0);
    assert_eq!(reference.crop_rect.x1, worker.crop_rect.x1);
    Ok(())
}

#[test]
fn non_square_outputs_have_the_requested_layout() -> anyhow::Result<()> {
    // W != H (the hidden set), with 3 * W = 360 = 22 * 16 + 8 so the OpenCV scalar tail
    // of the vertical pass is exercised.
    let s = setup()?;
    let det = FaceDetector::new(&Device::Cpu)?;
    let crop = det.crop_face(&s.photo, 120, 88, &FaceCropOptions::default())?;
    assert_eq!(crop.face_rgb.dimensions(), (120, 88));
    assert_eq!(crop.mask.dimensions(), (120, 88));
    let m = crop.mask_tensor(DType::F16, &Device::Cpu)?;
    assert_eq!(m.dims(), &[1, 1, 1, 88, 120]);
    assert_eq!(m.dtype(), DType::F16);
    let r = crop.reference_image_tensor(DType::F32, &Device::Cpu)?;
    assert_eq!(r.dims(), &[1, 3, 88, 120]);
    // The square crop (same as for the golden size) is stretched to 120x88: the
    // centre pixel of the output maps to the centre of the square.
    let sq = crop.square_rect;
    let (cx, cy) = ((sq.x0 + sq.x1) / 2, (sq.y0 + sq.y1) / 2);
    let want = s.photo.get_pixel(cx as u32, cy as u32).0;
    let got = crop.face_rgb.get_pixel(60, 44).0;
    for c in 0..3 {
        assert!(want[c].abs_diff(got[c]) <= 24, "{want:?} vs {got:?}");
    }
    // the mask is 255 in the middle of the face and 0 in the crop's top corners
    assert_eq!(crop.mask.get_pixel(60, 44).0, [255]);
    assert_eq!(crop.mask.get_pixel(0, 0).0, [0]);
    Ok(())
}
