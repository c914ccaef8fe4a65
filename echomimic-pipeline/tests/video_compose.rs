//! Paste-back shows no hard seam: across the rectangle's border the picture
//! changes gradually, where a hard paste jumps.

use echomimic_pipeline::video::PasteBack;
use echomimic_pipeline::Result;
use image::{Rgb, RgbImage};

/// Largest change between neighbouring pixels (any channel) along the row
/// `y` between columns `x0..x1`, and along the column `x` between rows
/// `y0..y1`.
fn max_step_row(img: &RgbImage, y: u32, xs: std::ops::Range<u32>) -> i32 {
    xs.map(|x| {
        let (a, b) = (img.get_pixel(x, y).0, img.get_pixel(x + 1, y).0);
        (0..3)
            .map(|c| (i32::from(a[c]) - i32::from(b[c])).abs())
            .max()
            .unwrap_or(0)
    })
    .max()
    .unwrap_or(0)
}

fn max_step_col(img: &RgbImage, x: u32, ys: std::ops::Range<u32>) -> i32 {
    ys.map(|y| {
        let (a, b) = (img.get_pixel(x, y).0, img.get_pixel(x, y + 1).0);
        (0..3)
            .map(|c| (i32::from(a[c]) - i32::from(b[c])).abs())
            .max()
            .unwrap_or(0)
    })
    .max()
    .unwrap_or(0)
}

#[test]
fn feathered_paste_back_has_no_hard_seam() -> Result<()> {
    // a smooth photo and a generated frame of a very different colour (the
    // worst case: in practice the generated background matches the photo)
    let photo = RgbImage::from_fn(321, 241, |x, y| {
        Rgb([(40 + x / 4) as u8, (50 + y / 4) as u8, 70])
    });
    let rect = [90, 40, 250, 200]; // 160 x 160, not the frame size: resized
    let frame: Vec<u8> = [230u8, 200, 40].repeat(128 * 128);

    let soft = PasteBack::new(photo.clone(), rect)?.compose(&frame, 128, 128)?;
    let hard = PasteBack::new(photo.clone(), rect)?
        .with_feather(0.0)?
        .compose(&frame, 128, 128)?;
    assert_eq!(soft.dimensions(), (320, 240));

    let [x0, y0, x1, y1] = rect;
    let ymid = (y0 + y1) / 2;
    let xmid = (x0 + x1) / 2;
    // steps across each border, over a window that covers the ramp
    let hard_steps = [
        max_step_row(&hard, ymid, x0 - 4..x0 + 20),
        max_step_row(&hard, ymid, x1 - 20..x1 + 4),
        max_step_col(&hard, xmid, y0 - 4..y0 + 20),
        max_step_col(&hard, xmid, y1 - 20..y1 + 4),
    ];
    let soft_steps = [
        max_step_row(&soft, ymid, x0 - 4..x0 + 20),
        max_step_row(&soft, ymid, x1 - 20..x1 + 4),
        max_step_col(&soft, xmid, y0 - 4..y0 + 20),
        max_step_col(&soft, xmid, y1 - 20..y1 + 4),
    ];
    eprintln!(
        "max neighbour step across the border: hard {hard_steps:?}, feathered {soft_steps:?}"
    );
    for (h, s) in hard_steps.iter().zip(soft_steps) {
        assert!(*h >= 120, "the hard paste should show the seam, step {h}");
        // 6 % of 160 px = 9.6 px ramp: a smoothstep's steepest slope is 1.5x
        // the mean, so about 1.5 * jump / 9.6 = 0.16 * jump per pixel
        assert!(
            s * 5 <= *h,
            "feathered step {s} is not much smaller than the hard step {h}"
        );
    }
    // away from the borders both agree: inside the frame, outside the photo
    assert_eq!(soft.get_pixel(xmid, ymid), hard.get_pixel(xmid, ymid));
    assert_eq!(soft.get_pixel(xmid, ymid).0, [230, 200, 40]);
    assert_eq!(soft.get_pixel(10, 10), photo.get_pixel(10, 10));
    Ok(())
}

#[test]
fn rectangles_on_the_photo_border_are_not_feathered_there() -> Result<()> {
    // a face crop touching the left and top photo edges
    let photo = RgbImage::from_pixel(200, 160, Rgb([20, 20, 20]));
    let frame: Vec<u8> = [240u8, 240, 240].repeat(100 * 100);
    let img = PasteBack::new(photo, [0, 0, 100, 100])?.compose(&frame, 100, 100)?;
    // at the photo border the frame is fully visible (nothing to blend with)
    assert_eq!(img.get_pixel(0, 50).0, [240, 240, 240]);
    assert_eq!(img.get_pixel(50, 0).0, [240, 240, 240]);
    // at the interior border it fades into the photo
    assert!(
        img.get_pixel(99, 50).0[0] < 60,
        "{:?}",
        img.get_pixel(99, 50)
    );
    Ok(())
}
