//! `echomimic-worker generate` on the golden set: the flags as a user types
//! them, the MP4, and the `--dump-tensors` file against the reference's
//! `pipeline.safetensors` (`video` within the README tolerance,
//! `frames_uint8` at most 1 apart on at most 5 % of the values).
//!
//! Set `ECHOMIMIC_GOLDEN_DIR` to run against another golden set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use echomimic_pipeline::ops::max_abs_diff;
use echomimic_pipeline::pipeline::FrameDiff;
use echomimic_worker::generate::{self, GenerateArgs, GenerateOutcome};

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: GenerateArgs,
}

fn golden_dir() -> PathBuf {
    match std::env::var_os("ECHOMIMIC_GOLDEN_DIR") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/golden/public"),
    }
}

fn golden() -> anyhow::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        golden_dir().join("tensors/pipeline.safetensors"),
        &Device::Cpu,
    )?)
}

fn manifest() -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        golden_dir().join("manifest.json"),
    )?)?)
}

/// README rule: max(10 × measured over 4 seeds, 2e-6 × max|ref|, 1e-6), one significant digit up.
fn tolerance(key: &str) -> anyhow::Result<f64> {
    let m = manifest()?;
    let t = &m["tolerances_measured"][key];
    let measured = t["max_abs_diff_4seeds"]
        .as_f64()
        .or_else(|| t["max_abs_diff"].as_f64())
        .ok_or_else(|| anyhow::anyhow!("no tolerance for {key}"))?;
    let atol = (10.0 * measured)
        .max(2e-6 * t["max_abs_ref"].as_f64().unwrap_or(0.0))
        .max(1e-6);
    let unit = 10f64.powf(atol.log10().floor());
    Ok(((atol / unit) * (1.0 - 1e-9)).ceil() * unit)
}

/// The command line of the golden pipeline call, with `extra` flags appended.
fn golden_command(out_dir: &Path, extra: &[String]) -> anyhow::Result<Vec<String>> {
    let m = manifest()?;
    let c = &m["config"];
    let v = |k: &str| -> anyhow::Result<String> {
        let x = &c[k];
        anyhow::ensure!(!x.is_null(), "manifest has no config.{k}");
        Ok(x.to_string())
    };
    let yaml_path = golden_dir().join("configs/prompts/animation_tiny.yaml");
    // The photo and speech: the (single) entry of the prompt yaml's test_cases.
    let yaml: serde_norway::Value = serde_norway::from_str(&std::fs::read_to_string(&yaml_path)?)?;
    let (photo, speeches) = yaml["test_cases"]
        .as_mapping()
        .and_then(|m| m.iter().next())
        .ok_or_else(|| anyhow::anyhow!("no test_cases in {}", yaml_path.display()))?;
    let as_path = |v: &serde_norway::Value| -> anyhow::Result<PathBuf> {
        let p = v
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("test_cases entry {v:?} is not a path"))?;
        Ok(golden_dir().join(p))
    };
    let (photo, speech) = (as_path(photo)?, as_path(&speeches[0])?);
    let mut cmd: Vec<String> = vec![
        "echomimic-worker".into(),
        "--config".into(),
        yaml_path.display().to_string(),
        "--image".into(),
        photo.display().to_string(),
        "--audio".into(),
        speech.display().to_string(),
        "--output".into(),
        out_dir.join("out.mp4").display().to_string(),
        "-W".into(),
        v("W")?,
        "-H".into(),
        v("H")?,
        "-L".into(),
        v("L")?,
        "--steps".into(),
        v("steps")?,
        "--cfg".into(),
        v("cfg")?,
        "--seed".into(),
        v("pipe_seed")?,
        "--fps".into(),
        v("fps")?,
        "--context-frames".into(),
        v("context_frames")?,
        "--context-overlap".into(),
        v("context_overlap")?,
        // the golden run is f32 on the CPU, whatever this build supports
        "--device".into(),
        "cpu".into(),
    ];
    cmd.extend(extra.iter().cloned());
    Ok(cmd)
}

fn run(cmd: &[String]) -> anyhow::Result<GenerateOutcome> {
    let cli = Cli::try_parse_from(cmd)?;
    generate::run(&cli.args)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, atol: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        got.dims() == want.dims(),
        "{what}: {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    let d = max_abs_diff(got, want)?;
    eprintln!("{what}: max |ours - golden| = {d:.3e} (atol {atol:.1e})");
    anyhow::ensure!(d <= atol, "{what}: {d:.3e} > {atol:.1e}");
    Ok(())
}

/// The golden README's `frames_uint8` criterion: at most one level, on at most 5 % of the values.
fn assert_frames_close(what: &str, got: &Tensor, want: &Tensor) -> anyhow::Result<()> {
    let d = FrameDiff::between(got, want)?;
    eprintln!("{what}: {d}");
    anyhow::ensure!(d.max_levels <= 1 && d.fraction() <= 0.05, "{what}: {d}");
    Ok(())
}

#[test]
fn generate_reproduces_the_golden_video_and_frames() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dump = dir.path().join("dump.safetensors");
    let cmd = golden_command(
        dir.path(),
        &["--dump-tensors".into(), dump.display().to_string()],
    )?;
    let out = run(&cmd)?;
    let g = golden()?;
    let ours = candle_core::safetensors::load(&dump, &Device::Cpu)?;

    assert_close(
        "generate: pipeline.video",
        &ours["video"],
        &g["video"],
        tolerance("pipeline.video")?,
    )?;
    assert_frames_close(
        "generate: pipeline.frames_uint8",
        &ours["frames_uint8"],
        &g["frames_uint8"],
    )?;
    // Every golden tensor is in the dump with the same shape and dtype.
    for (name, want) in &g {
        let got = ours
            .get(name)
            .ok_or_else(|| anyhow::anyhow!("dump lacks {name}"))?;
        anyhow::ensure!(
            got.dims() == want.dims() && got.dtype() == want.dtype(),
            "{name}: {:?} {:?} vs {:?} {:?}",
            got.dims(),
            got.dtype(),
            want.dims(),
            want.dtype()
        );
    }
    // The MP4 exists and holds the frames the audio needs (the writer drops
    // the trailing extra frames, docs/model.md M11).
    let frames = g["video_length"].to_dtype(DType::I64)?.to_scalar::<i64>()? as u64;
    assert!(out.video.path.is_file());
    assert!(out.video.frames_written >= 1 && out.video.frames_written <= frames);
    assert_eq!(out.video.frames_received, frames);
    assert_eq!(out.report.frames as u64, frames);
    assert_eq!(out.dump.as_deref(), Some(dump.as_path()));
    Ok(())
}

#[test]
fn init_noise_replaces_the_seeded_draw() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let g = golden()?;
    // The golden noise with another seed on the command line: the output must
    // still be the golden video, so the file, not the seed, made the noise.
    let noise = dir.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("latents_randn".to_string(), g["latents_randn"].clone())]),
        &noise,
    )?;
    let dump = dir.path().join("dump.safetensors");
    let mut cmd = golden_command(
        dir.path(),
        &[
            "--init-noise".into(),
            noise.display().to_string(),
            "--dump-tensors".into(),
            dump.display().to_string(),
        ],
    )?;
    let seed = cmd.iter().position(|a| a == "--seed").unwrap() + 1;
    cmd[seed] = "7".into();
    let out = run(&cmd)?;
    assert!(out.report.injected_noise);
    let ours = candle_core::safetensors::load(&dump, &Device::Cpu)?;
    assert_close(
        "--init-noise: latents_init",
        &ours["latents_init"],
        &g["latents_init"],
        tolerance("pipeline.latents_init")?,
    )?;
    assert_close(
        "--init-noise: video",
        &ours["video"],
        &g["video"],
        tolerance("pipeline.video")?,
    )?;

    // A file without `latents_randn` is refused before any work.
    let bad = dir.path().join("bad.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("x".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu)?)]),
        &bad,
    )?;
    let seed_cmd = golden_command(
        dir.path(),
        &["--init-noise".into(), bad.display().to_string()],
    )?;
    let err = run(&seed_cmd).unwrap_err();
    assert!(format!("{err:#}").contains("latents_randn"), "{err:#}");
    Ok(())
}

#[test]
fn a_short_frame_limit_cuts_video_and_audio() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = golden_command(dir.path(), &[])?;
    let l = cmd.iter().position(|a| a == "-L").unwrap() + 1;
    cmd[l] = "6".into();
    let steps = cmd.iter().position(|a| a == "--steps").unwrap() + 1;
    cmd[steps] = "1".into();
    let out = run(&cmd)?;
    assert!(out.report.truncated);
    assert_eq!(out.report.frames, 6);
    // The audio was cut to the video: every frame is kept, none repeated.
    assert_eq!(out.video.frames_written, 6);
    assert_eq!(out.video.frames_repeated, 0);
    let fps: f64 = cmd[cmd.iter().position(|a| a == "--fps").unwrap() + 1].parse()?;
    assert!(
        out.video.audio_duration_s <= 6.0 / fps + 1e-9,
        "{}",
        out.video.audio_duration_s
    );
    Ok(())
}

/// A voice note (Opus in Ogg, as messaging apps send) drives a video: decoded through ffmpeg.
#[test]
fn a_voice_note_drives_a_video() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cmd = golden_command(dir.path(), &[])?;
    let a = cmd.iter().position(|a| a == "--audio").unwrap() + 1;
    let note = dir.path().join("voice-note.ogg");
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i"])
        .arg(&cmd[a])
        .args(["-c:a", "libopus", "-b:a", "24k"])
        .arg(&note)
        .status()?;
    anyhow::ensure!(status.success(), "ffmpeg could not make the voice note");
    cmd[a] = note.display().to_string();
    let l = cmd.iter().position(|a| a == "-L").unwrap() + 1;
    cmd[l] = "6".into();
    let steps = cmd.iter().position(|a| a == "--steps").unwrap() + 1;
    cmd[steps] = "1".into();
    let out = run(&cmd)?;
    assert_eq!(out.report.frames, 6);
    assert_eq!(out.video.frames_written, 6);
    assert!(out.video.audio_duration_s > 0.0);
    assert!(dir.path().join("out.mp4").metadata()?.len() > 0);
    Ok(())
}

#[test]
fn flags_parse_as_documented() -> anyhow::Result<()> {
    let base = [
        "echomimic-worker",
        "--image",
        "a.png",
        "--audio",
        "a.wav",
        "--output",
        "o.mp4",
    ];
    // One of --config / --weights, not both.
    assert!(Cli::try_parse_from(base).is_err());
    let both = [&base[..], &["--config", "c.yaml", "--weights", "w"]].concat();
    assert!(Cli::try_parse_from(both).is_err());
    let cli = Cli::try_parse_from(
        [
            &base[..],
            &[
                "--weights",
                "w",
                "-W",
                "256",
                "-H",
                "320",
                "-L",
                "48",
                "--seed",
                "-1",
                "--variant",
                "acc",
                "--device",
                "cuda:1",
                "--dtype",
                "fp16",
                "--encoder",
                "builtin",
            ],
        ]
        .concat(),
    )?;
    let a = cli.args;
    assert_eq!(
        (a.model.width, a.model.height, a.length, a.seed),
        (256, 320, 48, -1)
    );
    assert_eq!(
        a.model.variant,
        Some(echomimic_pipeline::pipeline::Variant::Accelerated)
    );
    assert_eq!(
        a.model.device,
        echomimic_pipeline::device::DeviceChoice::Cuda(1)
    );
    assert_eq!(a.model.dtype, Some(DType::F16));
    assert_eq!(
        (a.steps, a.cfg),
        (None, None),
        "defaults follow the variant"
    );
    let defaults = Cli::try_parse_from([&base[..], &["--weights", "w"]].concat())?.args;
    assert_eq!(
        (
            defaults.model.width,
            defaults.model.height,
            defaults.length,
            defaults.seed,
            defaults.model.fps,
            defaults.model.context_frames,
            defaults.model.context_overlap
        ),
        (512, 512, 1200, 420, 24.0, 12, 3)
    );
    assert!(
        Cli::try_parse_from([&base[..], &["--weights", "w", "--variant", "fast"]].concat())
            .is_err()
    );

    // Missing inputs fail at once, naming the flag.
    let err = generate::run(&defaults).unwrap_err();
    assert!(format!("{err:#}").contains("--image"), "{err:#}");
    Ok(())
}
