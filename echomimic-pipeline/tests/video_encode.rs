//! Both encoder backends produce files that pass ffprobe and our own MP4 box
//! reader: codecs, pixel format, frame count, duration against the audio,
//! audio present, fast start, even sizes, frame rate.

mod video_common;

use std::path::Path;

use anyhow::ensure;
use echomimic_pipeline::video::{
    probe_mp4, size_budget, AudioInput, EncoderBackend, EncoderKind, OutputGeometry, PasteBack,
    TrackKind, VideoReport, VideoSpec, VideoWriter, MIN_BITS_PER_PIXEL,
};
use image::{Rgb, RgbImage};
use video_common::*;

/// Everything a delivered file must satisfy, checked with ffprobe and with
/// the crate's own box reader.
fn check_file(report: &VideoReport, spec: &VideoSpec, audio_s: f64) -> anyhow::Result<()> {
    let frame_s = 1.0 / spec.fps;
    let path = &report.path;

    // ffprobe's view
    let probe = ffprobe(path)?;
    let v = stream(&probe, "video")?;
    let a = stream(&probe, "audio")?;
    ensure!(v["codec_name"] == "h264", "video codec {}", v["codec_name"]);
    ensure!(v["pix_fmt"] == "yuv420p", "pixel format {}", v["pix_fmt"]);
    let (w, h) = (num(v, "width")? as u32, num(v, "height")? as u32);
    ensure!(
        (w, h) == (report.width, report.height),
        "{w}x{h} vs report {}x{}",
        report.width,
        report.height
    );
    ensure!(w % 2 == 0 && h % 2 == 0, "odd output {w}x{h}");
    // the same colour signalling from both encoders: BT.601 matrix (the
    // conversion used), sRGB primaries and transfer, limited range
    for (key, want) in [
        ("color_space", "smpte170m"),
        ("color_primaries", "bt709"),
        ("color_transfer", "iec61966-2-1"),
        ("color_range", "tv"),
    ] {
        ensure!(v[key] == want, "{key} = {}, expected {want}", v[key]);
    }
    let frames = num(v, "nb_read_frames")? as u64;
    ensure!(
        frames == report.frames_written,
        "{frames} decoded frames, {} written",
        report.frames_written
    );
    let rate: Vec<f64> = v["avg_frame_rate"]
        .as_str()
        .unwrap_or("0/1")
        .split('/')
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let fps = rate[0] / rate[1].max(1.0);
    ensure!(
        (fps - spec.fps).abs() < 0.01,
        "frame rate {fps} vs requested {}",
        spec.fps
    );
    let expected_audio = match report.backend {
        EncoderKind::Ffmpeg => "aac",
        EncoderKind::Builtin => "opus",
    };
    ensure!(
        a["codec_name"] == expected_audio,
        "audio codec {}",
        a["codec_name"]
    );
    if report.backend == EncoderKind::Ffmpeg {
        ensure!(a["profile"] == "LC", "aac profile {}", a["profile"]);
        ensure!(v["profile"] == "High", "h264 profile {}", v["profile"]);
    } else {
        ensure!(
            v["profile"] == "Constrained Baseline",
            "h264 profile {}",
            v["profile"]
        );
    }
    let v_dur = num(v, "duration")?;
    let a_dur = num(a, "duration")?;
    ensure!(
        v_dur >= audio_s - 1e-3 && v_dur - audio_s < frame_s + 1e-3,
        "video lasts {v_dur:.4} s, audio {audio_s:.4} s: not within one frame ({frame_s:.4} s)"
    );
    ensure!(
        (a_dur - audio_s).abs() < frame_s,
        "audio stream lasts {a_dur:.4} s, input {audio_s:.4} s"
    );

    // our own box reader
    let info = probe_mp4(path)?;
    ensure!(
        info.moov_before_mdat,
        "moov after mdat: {:?}",
        info.top_level
    );
    let vt = info.track(TrackKind::Video).expect("video track");
    let at = info.track(TrackKind::Audio).expect("audio track");
    ensure!(vt.codec == "avc1", "video sample entry {}", vt.codec);
    ensure!(
        vt.sample_count == report.frames_written,
        "{} samples",
        vt.sample_count
    );
    ensure!(
        (u32::from(vt.width), u32::from(vt.height)) == (w, h),
        "sample entry {}x{}",
        vt.width,
        vt.height
    );
    ensure!(
        at.codec
            == if expected_audio == "aac" {
                "mp4a"
            } else {
                "Opus"
            },
        "audio entry {}",
        at.codec
    );
    ensure!(
        (vt.duration_s() - report.duration_s).abs() < 1e-3,
        "track {} vs {}",
        vt.duration_s(),
        report.duration_s
    );
    ensure!((report.duration_s - report.frames_written as f64 / spec.fps).abs() < 1e-9);
    ensure!(
        (report.audio_duration_s - audio_s).abs() < 1e-3,
        "report audio {}",
        report.audio_duration_s
    );
    Ok(())
}

#[test]
fn both_backends_trim_the_extra_frames_and_keep_all_speech() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = speech_spec(96, 64, backend);
        let audio_s = spec_pcm(&spec)?.duration_s();
        let needed = (audio_s * 24.0 - 1e-6).ceil() as u64;
        let out = dir.path().join(format!("speech_{backend}.mp4"));
        // the model yields about two frames more than the audio lasts
        let report = encode(&out, &spec, needed + 2)?;
        assert_eq!(report.frames_written, needed, "{backend}");
        assert_eq!(report.frames_dropped_for_trim, 2, "{backend}");
        assert_eq!(report.frames_repeated, 0, "{backend}");
        assert_eq!(report.frames_received, needed + 2);
        check_file(&report, &spec, audio_s)?;
        eprintln!("{backend}: {report:?}");
    }
    // only the two finished files: no temp files left behind
    assert_eq!(
        folder_entries(dir.path())?,
        vec!["speech_builtin.mp4", "speech_ffmpeg.mp4"]
    );
    Ok(())
}

#[test]
fn odd_sizes_become_even_and_fps_is_honoured() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pcm = tone(1.2, 44_100, 2);
    for backend in BACKENDS {
        let spec = VideoSpec::new(67, 45, AudioInput::pcm(pcm.clone()))
            .with_backend(backend)
            .with_fps(25.0);
        let out = dir.path().join(format!("odd_{backend}.mp4"));
        let report = encode(&out, &spec, 32)?;
        assert_eq!((report.width, report.height), (66, 44), "{backend}");
        assert_eq!(report.frames_written, 30, "{backend}");
        check_file(&report, &spec, 1.2)?;
    }
    Ok(())
}

#[test]
fn fractional_frame_rates_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let fps = 30_000.0 / 1001.0;
    for backend in BACKENDS {
        let spec = VideoSpec::new(64, 64, AudioInput::pcm(tone(1.0, 48_000, 1)))
            .with_backend(backend)
            .with_fps(fps);
        let out = dir.path().join(format!("ntsc_{backend}.mp4"));
        let report = encode(&out, &spec, 40)?;
        assert_eq!(report.frames_written, 30, "{backend}");
        check_file(&report, &spec, 1.0)?;
    }
    Ok(())
}

#[test]
fn too_few_frames_repeat_the_last_one_instead_of_cutting_speech() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = speech_spec(64, 48, backend);
        let audio_s = spec_pcm(&spec)?.duration_s();
        let needed = (audio_s * 24.0 - 1e-6).ceil() as u64;
        let out = dir.path().join(format!("short_{backend}.mp4"));
        let report = encode(&out, &spec, 10)?;
        assert_eq!(report.frames_written, needed, "{backend}");
        assert_eq!(report.frames_repeated, needed - 10, "{backend}");
        assert_eq!(report.frames_dropped_for_trim, 0, "{backend}");
        check_file(&report, &spec, audio_s)?;
    }
    Ok(())
}

/// The speech that comes out of the file is the speech that went in.
#[test]
fn audio_survives_the_round_trip() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec0 = speech_spec(64, 64, EncoderBackend::Ffmpeg);
    let want = mono_at(&spec_pcm(&spec0)?, 16_000);
    for backend in BACKENDS {
        let spec = speech_spec(64, 64, backend);
        let out = dir.path().join(format!("rt_{backend}.mp4"));
        encode(&out, &spec, 40)?;
        let got = decode_audio(&out, 16_000)?;
        let (corr, lag) = best_correlation(&want, &got, 400);
        eprintln!("{backend}: correlation {corr:.4} at lag {lag} samples (16 kHz)");
        ensure!(
            corr > 0.9,
            "{backend}: decoded audio correlates only {corr:.3} with the input"
        );
        ensure!(
            lag.abs() <= 16,
            "{backend}: audio is shifted by {lag} samples (1 ms = 16)"
        );
        let rms = |s: &[f32]| {
            (s.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
        };
        let ratio = rms(&got) / rms(&want);
        ensure!(
            (0.8..1.25).contains(&ratio),
            "{backend}: level changed by {ratio:.3}x"
        );
    }
    Ok(())
}

/// Samples only (no file) work for ffmpeg too (it gets a temporary WAV that is
/// removed afterwards).
#[test]
fn pcm_only_audio_works_with_ffmpeg() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = VideoSpec::new(64, 64, AudioInput::pcm(tone(1.0, 16_000, 1)))
        .with_backend(EncoderBackend::Ffmpeg);
    let out = dir.path().join("pcm.mp4");
    let report = encode(&out, &spec, 26)?;
    check_file(&report, &spec, 1.0)?;
    assert_eq!(folder_entries(dir.path())?, vec!["pcm.mp4"]);
    Ok(())
}

/// Paste-back through both encoders: the output is the (even) photo size, the
/// photo survives outside the rectangle, the frame shows inside.
#[test]
fn paste_back_videos_have_the_photo_size() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let photo = RgbImage::from_fn(161, 121, |x, y| {
        Rgb([(x / 2) as u8 + 40, (y / 2) as u8 + 60, 90])
    });
    for backend in BACKENDS {
        let paste = PasteBack::new(photo.clone(), [50, 20, 130, 100])?;
        let spec = speech_spec(64, 64, backend).with_geometry(OutputGeometry::PasteBack(paste));
        let out = dir.path().join(format!("paste_{backend}.mp4"));
        let report = encode(&out, &spec, 40)?;
        assert_eq!((report.width, report.height), (160, 120), "{backend}");
        let audio_s = spec_pcm(&spec)?.duration_s();
        check_file(&report, &spec, audio_s)?;
        let frame = decode_frame(&out, 5)?;
        assert_eq!(frame.dimensions(), (160, 120));
        let close = |got: &Rgb<u8>, want: &Rgb<u8>| {
            got.0
                .iter()
                .zip(want.0)
                .all(|(&g, w)| (i32::from(g) - i32::from(w)).abs() <= 12)
        };
        for (x, y) in [(10, 10), (150, 110), (20, 100), (140, 60)] {
            ensure!(
                close(frame.get_pixel(x, y), photo.get_pixel(x, y)),
                "{backend}: photo pixel ({x},{y}) {:?} became {:?}",
                photo.get_pixel(x, y),
                frame.get_pixel(x, y)
            );
        }
        // inside the rectangle, the (resized) generated frame: its bright
        // square does not exist in the photo
        let bright = (50..130)
            .flat_map(|x| (20..100).map(move |y| (x, y)))
            .any(|(x, y)| frame.get_pixel(x, y).0[2] < 80 && frame.get_pixel(x, y).0[0] > 220);
        ensure!(
            bright,
            "{backend}: the generated frame is not visible in the rectangle"
        );
    }
    Ok(())
}

#[test]
fn auto_picks_ffmpeg_when_it_works_and_builtin_otherwise() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let spec = speech_spec(64, 64, EncoderBackend::Auto);
    let report = encode(&dir.path().join("auto.mp4"), &spec, 40)?;
    assert_eq!(report.backend, EncoderKind::Ffmpeg);

    let mut spec = speech_spec(64, 64, EncoderBackend::Auto);
    spec.ffmpeg.binary = Some(Path::new("/nonexistent/ffmpeg").to_path_buf());
    let report = encode(&dir.path().join("auto_fallback.mp4"), &spec, 40)?;
    assert_eq!(report.backend, EncoderKind::Builtin);
    Ok(())
}

/// Frames of pseudo-random noise: nothing for the encoder to predict, so its
/// rate control alone decides the size.
fn noise(w: u32, h: u32, i: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ i.wrapping_mul(0x1000_0000_01B3);
    (0..w * h * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect()
}

/// Frame `i` of a `w × h` test clip, RGB24.
type FrameFn = fn(u32, u32, u64) -> Vec<u8>;

fn encode_with(
    path: &Path,
    spec: &VideoSpec,
    frames: u64,
    frame: FrameFn,
) -> anyhow::Result<VideoReport> {
    let mut writer = VideoWriter::create(path, spec)?;
    for i in 0..frames {
        writer.write_frame(&frame(spec.width, spec.height, i))?;
    }
    Ok(writer.finish()?)
}

#[test]
fn a_size_limit_caps_the_bit_rate_so_the_file_fits() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // x264's VBV holds a hard cap even on noise; OpenH264's rate control has no hard cap
    // (it overshoots on noise), so it is held to half the budget's rate and shown on
    // ordinary picture content, where it follows its target.
    let cases: [(EncoderBackend, u32, FrameFn, u64); 2] = [
        (EncoderBackend::Ffmpeg, 128, noise, 3),
        (EncoderBackend::Builtin, 512, moving_gradient, 2),
    ];
    for (backend, side, frame, shrink) in cases {
        let free = speech_spec(side, side, backend);
        let audio_s = spec_pcm(&free)?.duration_s();
        let frames = (audio_s * 24.0).ceil() as u64;
        let uncapped = encode_with(&dir.path().join("free.mp4"), &free, frames, frame)?;
        let max = uncapped.bytes / shrink;
        let budget = size_budget(max, side, side, 24.0, audio_s)?;
        assert!(budget.bits_per_pixel > MIN_BITS_PER_PIXEL, "{budget:?}");
        let capped_spec = speech_spec(side, side, backend).with_max_bytes(Some(max));
        let capped = encode_with(&dir.path().join("capped.mp4"), &capped_spec, frames, frame)?;
        eprintln!(
            "{backend}: free {} bytes, limit {max}, capped {} bytes ({budget:?})",
            uncapped.bytes, capped.bytes
        );
        assert!(capped.bytes <= max, "{backend}: {} > {max}", capped.bytes);
        check_file(&capped, &capped_spec, audio_s)?;
    }
    Ok(())
}

#[test]
fn a_video_that_cannot_fit_its_size_limit_is_refused_before_any_frame() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for backend in BACKENDS {
        let spec = speech_spec(1024, 1024, backend).with_max_bytes(Some(100_000));
        let err = VideoWriter::create(dir.path().join("big.mp4"), &spec).unwrap_err();
        assert!(err.is_bad_input(), "{backend}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("upload limit of 100000 bytes") && text.contains("shorter audio"),
            "{backend}: {text}"
        );
    }
    assert!(
        folder_entries(dir.path())?.is_empty(),
        "nothing left behind"
    );
    Ok(())
}

#[test]
fn size_budgets_follow_the_limit_the_length_and_the_frame() {
    let a = size_budget(200 << 20, 512, 512, 25.0, 10.0).unwrap();
    // 200 MiB over 11 s (with the one-second buffer), less audio and index: ~150 Mbit/s.
    assert!((a.video_bps - 152.3e6).abs() < 1e6, "{a:?}");
    assert!((a.bits_per_pixel - a.video_bps / (512.0 * 512.0 * 25.0)).abs() < 1e-9);
    let longer = size_budget(200 << 20, 512, 512, 25.0, 100.0).unwrap();
    assert!(longer.video_bps < a.video_bps / 8.0);
    // A 4096² paste-back of ten minutes does not fit 200 MiB at a watchable rate.
    assert!(size_budget(200 << 20, 4096, 4096, 25.0, 600.0).is_err());
    assert!(
        size_budget(1000, 64, 64, 25.0, 1.0).is_err(),
        "the index alone"
    );
}
