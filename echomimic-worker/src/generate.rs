//! `echomimic-worker generate`: one local run from a photo and a speech file
//! to an MP4, like the reference's `infer_audio2vid.py` (no Redis).
//!
//! ```text
//! echomimic-worker generate --weights pretrained_weights \
//!     --image face.jpg --audio speech.wav --output out.mp4 [-L 240] [--variant acc]
//! ```
//!
//! * Weights: `--weights DIR` (official `pretrained_weights/` layout) or
//!   `--config PROMPT.yaml` (`configs/prompts/animation*.yaml`).
//! * Variant: with `--weights`, `--variant` picks the UNet files; without
//!   it, `acc` is used when `denoising_unet_acc.pth` and
//!   `motion_module_acc.pth` are present (the EchoMe worker's model, about
//!   10x less compute), else `normal`. With `--config` the yaml names the
//!   files and the variant follows its denoising UNet's file name;
//!   `--variant` then only changes the defaults of `--steps`/`--cfg`.
//! * The model options (`--config`, `--weights`, `-W`, `-H`, `--fps`,
//!   `--context-*`, `--variant`, `--device`, `--dtype`) are `serve`'s
//!   ([`ModelArgs`]).
//! * Defaults (`--steps`, `--cfg`) are the official scripts': normal 30 /
//!   2.5, acc 6 / 1.0 (`serve` runs 25 normal steps:
//!   [`crate::config::serve_default_steps`] says why). The rest: 512 x 512, `-L 1200`, seed 420, 24 fps,
//!   windows of 12 frames overlapping by 3. A negative `--seed` draws one
//!   (printed).
//! * Device: `--device auto` (default) runs on CUDA device 0 when the build
//!   has the `cuda` feature and the GPU opens, else on the CPU; the dtype
//!   defaults to f32 on the CPU and to the yaml's `weight_dtype` (f16) on
//!   CUDA.
//! * The video holds the `W x H` face crop (as the reference script writes
//!   it) and the speech. When `-L` cuts the video short of the audio, a
//!   note goes to stderr and the audio is cut to the video's length (the
//!   reference's moviepy mux does the same).
//! * `--init-noise FILE` (safetensors with `latents_randn`, the pre-clamp
//!   noise `[1, 4, F, H/8, W/8]`) and `--dump-tensors FILE` (every
//!   intermediate tensor, named like the golden `pipeline.safetensors`)
//!   are for parity checks against the reference implementation.
//!
//! Progress goes to stderr: a redrawn bar on a terminal, plain lines
//! otherwise.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use candle_core::{Device, Tensor};
use echomimic_pipeline::audio::{self, AudioLimits, DecodedAudio};
use echomimic_pipeline::device;
use echomimic_pipeline::pipeline::{
    EchoMimicPipeline, GenerateReport, GenerateRequest, Progress, ReferenceInput, SpeechInput,
    Stage, TensorDump, Variant, DEFAULT_MAX_FRAMES, DEFAULT_SEED,
};
use echomimic_pipeline::video::{
    probe_ffmpeg, AudioInput, EncoderBackend, Pcm, VideoReport, VideoSpec, VideoWriter,
};
use echomimic_pipeline::PipelineError;

use crate::config::ModelArgs;

/// Arguments of `echomimic-worker generate`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    group(
        clap::ArgGroup::new("weights_source")
            .args(["config", "weights"])
            .required(true)
            .multiple(false)
    ),
    // `generate` names its weights on the command line: PRETRAINED_WEIGHTS_DIR (a `serve`
    // setting) must not count as a `--weights` that conflicts with `--config`.
    mut_arg("weights", |a| a.env(None::<&str>))
)]
pub struct GenerateArgs {
    /// The model options, shared with `serve`. `generate` needs one of `--config` and
    /// `--weights`, given on the command line.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Reference portrait (PNG, JPEG, WebP, BMP, GIF).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Driving speech (WAV, MP3, AAC or Apple Lossless in M4A, AAC (ADTS), Ogg Vorbis, FLAC).
    #[arg(long, value_name = "PATH")]
    pub audio: PathBuf,
    /// Output MP4.
    #[arg(long, short = 'o', value_name = "OUT.mp4")]
    pub output: PathBuf,
    /// Most frames to generate; the audio decides the count up to this.
    #[arg(short = 'L', long, default_value_t = DEFAULT_MAX_FRAMES)]
    pub length: usize,
    /// DDIM steps [default: 30 normal, 6 acc: the official scripts'; `serve` uses 25 for
    /// normal, see `config::serve_default_steps`].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale; classifier-free guidance runs above 1 [default: 2.5 normal, 1.0 acc].
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Seed of the initial noise; negative = random (printed).
    #[arg(long, default_value_t = DEFAULT_SEED, allow_negative_numbers = true)]
    pub seed: i64,
    /// Safetensors file holding `latents_randn`, the pre-clamp initial noise
    /// `[1, 4, F, H/8, W/8]`, used instead of the seeded draw.
    #[arg(long, value_name = "FILE")]
    pub init_noise: Option<PathBuf>,
    /// Write every intermediate tensor to this safetensors file (names as the
    /// golden `pipeline.safetensors`; holds all frames in memory).
    #[arg(long, value_name = "FILE")]
    pub dump_tensors: Option<PathBuf>,
    /// Video encoder: `auto` (ffmpeg when available), `ffmpeg` or `builtin`.
    #[arg(long, default_value = "auto", value_parser = parse_encoder)]
    pub encoder: EncoderBackend,
    /// Write the wall time of each part in seconds (load, face, audio,
    /// reference, denoising, decoding, pipeline, write; reading the speech file counts in
    /// audio and pipeline, and is also given alone as speech_read) to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub timings_json: Option<PathBuf>,
}

fn parse_encoder(s: &str) -> Result<EncoderBackend, String> {
    s.parse().map_err(|e: PipelineError| e.to_string())
}

/// What a `generate` run produced.
#[derive(Debug, Clone)]
pub struct GenerateOutcome {
    /// The pipeline's report (frames, seed, truncation, timings).
    pub report: GenerateReport,
    /// The written video.
    pub video: VideoReport,
    /// The tensor dump, when `--dump-tensors` was given.
    pub dump: Option<PathBuf>,
    /// Time spent loading the weights.
    pub load_time: Duration,
}

/// Runs `generate`: loads the weights, generates, writes the MP4 (and the
/// tensor dump). Progress and notes go to stderr.
pub fn run(args: &GenerateArgs) -> anyhow::Result<GenerateOutcome> {
    run_with_cancel(args, &AtomicBool::new(false))
}

/// [`run`] with a cancel flag (set it from a signal handler): generation stops
/// between UNet calls or decoded frames, and the partial output is removed.
pub fn run_with_cancel(
    args: &GenerateArgs,
    cancel: &AtomicBool,
) -> anyhow::Result<GenerateOutcome> {
    check_paths(args)?;
    if args.encoder != EncoderBackend::Builtin {
        // ffmpeg's check (one run, ≈ 0.05 s) overlaps the weight loading; the video writer
        // then finds it passed (`probe_ffmpeg` remembers) or checks again and reports.
        std::thread::spawn(|| {
            let _ = probe_ffmpeg(None);
        });
    }
    let (device, device_note) = device::select_device(args.model.device)?;
    let init_noise = args
        .init_noise
        .as_deref()
        .map(read_init_noise)
        .transpose()?;
    let (pipeline, variant, load_time) = load(args, &device, &device_note)?;
    let read_start = Instant::now();
    let speech = Speech::read(&args.audio)?;
    let speech_read = read_start.elapsed();
    let request = build_request(args, variant, &speech, init_noise);
    let Generated {
        report,
        writer,
        dump,
    } = generate_video(args, &pipeline, &request, &speech.decoded, cancel)?;
    let finish = Instant::now();
    let video = writer
        .finish()
        .with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(path) = &args.timings_json {
        write_timings(path, &report, load_time, speech_read, finish.elapsed())?;
    }
    let dump_path = match (dump, &args.dump_tensors) {
        (Some(dump), Some(path)) => {
            dump.save(path)
                .with_context(|| format!("writing the tensor dump {}", path.display()))?;
            Some(path.clone())
        }
        _ => None,
    };
    print_summary(args, &report, &video, dump_path.as_deref());
    Ok(GenerateOutcome {
        report,
        video,
        dump: dump_path,
        load_time,
    })
}

/// Cheap checks first: nothing heavy runs for a typo.
fn check_paths(args: &GenerateArgs) -> anyhow::Result<()> {
    for (what, path) in [("image", &args.image), ("audio", &args.audio)] {
        anyhow::ensure!(path.is_file(), "--{what} {} does not exist", path.display());
    }
    check_output_folder(&args.output)?;
    if let Some(dump) = &args.dump_tensors {
        check_output_folder(dump)?;
    }
    Ok(())
}

/// Loads the weights; returns the pipeline, the variant whose defaults apply (`--variant`, else
/// the weights') and the load time.
fn load(
    args: &GenerateArgs,
    device: &Device,
    device_note: &str,
) -> anyhow::Result<(EchoMimicPipeline, Variant, Duration)> {
    let t = Instant::now();
    let pipeline = EchoMimicPipeline::load(&args.model.source(), device, args.model.dtype)
        .context("loading the EchoMimic weights")?;
    let load_time = t.elapsed();
    let variant = args.model.variant.unwrap_or(pipeline.variant());
    if args.model.config.is_some() && variant != pipeline.variant() {
        eprintln!(
            "note: the prompt yaml names the {} weights; --variant {variant} only sets the step/cfg defaults",
            pipeline.variant()
        );
    }
    eprintln!(
        "loaded the {} weights in {:.1} s ({device_note}, {:?})",
        pipeline.variant(),
        load_time.as_secs_f64(),
        pipeline.dtype(),
    );
    Ok((pipeline, variant, load_time))
}

/// The speech, decoded once: the 16 kHz waveform for the model, the native samples for the video.
struct Speech {
    decoded: DecodedAudio,
    waveform: Vec<f32>,
    limits: AudioLimits,
}

impl Speech {
    fn read(path: &Path) -> anyhow::Result<Speech> {
        let limits = AudioLimits::default();
        let decoded = audio::decode_file(path, &limits)
            .with_context(|| format!("reading {}", path.display()))?;
        // the model's waveform through the reference's own ffmpeg call when ffmpeg runs
        let waveform = audio::load_waveform_16k(path, &limits)
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(Speech {
            decoded,
            waveform,
            limits,
        })
    }
}

fn build_request(
    args: &GenerateArgs,
    variant: Variant,
    speech: &Speech,
    init_noise: Option<Tensor>,
) -> GenerateRequest {
    let m = &args.model;
    let mut request = GenerateRequest::new(
        ReferenceInput::photo_file(&args.image),
        SpeechInput::Waveform16k(speech.waveform.clone()),
        variant,
    );
    request.width = m.width;
    request.height = m.height;
    request.max_frames = args.length;
    request.steps = args.steps.unwrap_or(variant.default_steps());
    request.cfg = args.cfg.unwrap_or(variant.default_cfg());
    request.seed = args.seed;
    request.fps = m.fps;
    request.context_frames = m.context_frames;
    request.context_overlap = m.context_overlap;
    request.init_noise = init_noise;
    request.audio_limits = speech.limits;
    request
}

/// What [`generate_video`] leaves to finish.
struct Generated {
    report: GenerateReport,
    writer: VideoWriter,
    dump: Option<TensorDump>,
}

/// Generates, streaming the frames into the video writer, which starts as soon as the frame
/// count is known (and into the tensor dump, when asked for).
fn generate_video(
    args: &GenerateArgs,
    pipeline: &EchoMimicPipeline,
    request: &GenerateRequest,
    decoded: &DecodedAudio,
    cancel: &AtomicBool,
) -> anyhow::Result<Generated> {
    let (width, height, fps) = (args.model.width, args.model.height, args.model.fps);
    let output = RefCell::new(Output {
        writer: None,
        error: None,
        dump: args.dump_tensors.as_ref().map(|_| TensorDump::new()),
    });
    let mut display = ProgressDisplay::new(std::io::stderr().is_terminal());
    let mut on_progress = |p: Progress| {
        if let Progress::Plan {
            frames,
            audio_frames,
            ..
        } = p
        {
            if frames < audio_frames {
                display.note(&format!(
                    "note: the audio drives {audio_frames} frames but -L is {frames}: the video and its audio are cut to {frames} frames ({:.2} s)",
                    frames as f64 / fps
                ));
            }
            let spec = video_spec(args, decoded, frames, audio_frames);
            let mut out = output.borrow_mut();
            match spec.and_then(|s| VideoWriter::create(&args.output, &s)) {
                Ok(w) => out.writer = Some(w),
                Err(e) => {
                    out.error = Some(e);
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
        display.update(p);
    };
    let mut sink = |index: usize, rgb: &[u8]| -> echomimic_pipeline::Result<()> {
        let mut out = output.borrow_mut();
        if let Some(dump) = out.dump.as_mut() {
            dump.record_rgb_frame(index, rgb, width, height)?;
        }
        match out.writer.as_mut() {
            Some(w) => w.write_frame(rgb),
            None => Err(PipelineError::Media(
                "the video writer was not started".into(),
            )),
        }
    };
    let result = if args.dump_tensors.is_some() {
        let mut hook = |name: &str, t: &Tensor| -> echomimic_pipeline::Result<()> {
            match output.borrow_mut().dump.as_mut() {
                Some(dump) => dump.record(name, t),
                None => Ok(()),
            }
        };
        pipeline.generate_with_dump(request, &mut on_progress, cancel, &mut sink, &mut hook)
    } else {
        pipeline.generate(request, &mut on_progress, cancel, &mut sink)
    };
    display.finish();
    let Output {
        writer,
        error,
        dump,
    } = output.into_inner();
    if let Some(e) = error {
        return Err(
            anyhow::Error::new(e).context(format!("starting the video {}", args.output.display()))
        );
    }
    let report = result.context("generating the video")?;
    let writer = writer.context("the video writer was never started")?;
    Ok(Generated {
        report,
        writer,
        dump,
    })
}

/// What was written, where the face was, and the time of each stage, on stderr.
fn print_summary(
    args: &GenerateArgs,
    report: &GenerateReport,
    video: &VideoReport,
    dump: Option<&Path>,
) {
    let t = &report.timings;
    let noise = if report.injected_noise {
        format!(
            "noise from {}",
            args.init_noise
                .as_deref()
                .unwrap_or(Path::new("?"))
                .display()
        )
    } else {
        format!("seed {}", report.seed)
    };
    eprintln!(
        "wrote {} ({} frames at {} fps, {} encoder), {noise}; face {:?}+{:?} in a {}x{} photo",
        video.path.display(),
        video.frames_written,
        args.model.fps,
        video.backend,
        (report.face.square_rect.x0, report.face.square_rect.y0),
        (
            report.face.square_rect.width(),
            report.face.square_rect.height()
        ),
        report.face.image_size.0,
        report.face.image_size.1,
    );
    eprintln!(
        "time: face {:.2} s, audio {:.2} s, reference {:.2} s, denoising {:.2} s ({} UNet calls), decoding {:.2} s, total {:.2} s",
        t.face.as_secs_f64(),
        t.audio.as_secs_f64(),
        t.reference.as_secs_f64(),
        t.denoising.as_secs_f64(),
        report.unet_calls,
        t.decoding.as_secs_f64(),
        t.total.as_secs_f64(),
    );
    if let Some(note) = report.truncation_note() {
        eprintln!("note: {note}");
    }
    if let Some(p) = dump {
        eprintln!("tensors written to {}", p.display());
    }
}

/// Shared between the progress callback (which starts the writer) and the
/// frame sink.
struct Output {
    writer: Option<VideoWriter>,
    error: Option<PipelineError>,
    dump: Option<TensorDump>,
}

fn check_output_folder(path: &Path) -> anyhow::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    anyhow::ensure!(
        folder.is_dir(),
        "the folder of {} does not exist",
        path.display()
    );
    anyhow::ensure!(!path.is_dir(), "{} is a folder", path.display());
    Ok(())
}

/// `--timings-json`: seconds per part, plus the frame and UNet-call counts. The speech file is
/// decoded before the pipeline runs (once, for the model and for the video's audio track); its
/// time `speech_read` counts in `audio` and `pipeline` (and is also given alone), as the file's
/// decoding does in the reference's audio stage.
fn write_timings(
    path: &Path,
    report: &GenerateReport,
    load: Duration,
    speech_read: Duration,
    write: Duration,
) -> anyhow::Result<()> {
    let t = &report.timings;
    let json = serde_json::json!({
        "load": load.as_secs_f64(),
        "face": t.face.as_secs_f64(),
        "speech_read": speech_read.as_secs_f64(),
        "audio": (speech_read + t.audio).as_secs_f64(),
        "reference": t.reference.as_secs_f64(),
        "denoising": t.denoising.as_secs_f64(),
        "decoding": t.decoding.as_secs_f64(),
        "pipeline": (speech_read + t.total).as_secs_f64(),
        "write": write.as_secs_f64(),
        "frames": report.frames,
        "unet_calls": report.unet_calls,
    });
    std::fs::write(path, format!("{json:#}\n"))
        .with_context(|| format!("writing --timings-json {}", path.display()))
}

/// The pre-clamp noise `latents_randn` of a safetensors file.
fn read_init_noise(path: &Path) -> anyhow::Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading --init-noise {}", path.display()))?;
    match tensors.remove("latents_randn") {
        Some(t) => Ok(t),
        None => {
            let mut names: Vec<_> = tensors.into_keys().collect();
            names.sort();
            anyhow::bail!(
                "--init-noise {} has no `latents_randn` tensor (it has: {})",
                path.display(),
                names.join(", ")
            )
        }
    }
}

/// The video: `W x H` crop at `fps` with the speech; when the frame limit
/// cut the video, the audio is cut to `frames / fps` seconds.
fn video_spec(
    args: &GenerateArgs,
    decoded: &DecodedAudio,
    frames: usize,
    audio_frames: usize,
) -> echomimic_pipeline::Result<VideoSpec> {
    let channels = u16::try_from(decoded.channels)
        .map_err(|_| PipelineError::Media(format!("{} audio channels", decoded.channels)))?;
    let audio = if frames < audio_frames {
        // floor: the cut audio never needs more than `frames` frames
        let keep =
            (frames as f64 * f64::from(decoded.sample_rate) / args.model.fps).floor() as usize;
        let keep = keep.min(decoded.frames()) * decoded.channels;
        AudioInput::pcm(Pcm::new(
            decoded.samples[..keep].to_vec(),
            channels,
            decoded.sample_rate,
        )?)
    } else {
        AudioInput::file(&args.audio).with_pcm(Pcm::new(
            decoded.samples.clone(),
            channels,
            decoded.sample_rate,
        )?)
    };
    Ok(VideoSpec::new(args.model.width, args.model.height, audio)
        .with_fps(args.model.fps)
        .with_backend(args.encoder))
}

/// Progress on stderr: one redrawn line on a terminal, plain lines otherwise
/// (stage starts, each finished step, every tenth of the frames).
struct ProgressDisplay {
    tty: bool,
    stage_start: Instant,
    stage: Option<Stage>,
    line_open: bool,
    last_draw: Option<Instant>,
    last_tenth: usize,
}

impl ProgressDisplay {
    const BAR: usize = 30;
    const REDRAW: Duration = Duration::from_millis(100);

    fn new(tty: bool) -> Self {
        Self {
            tty,
            stage_start: Instant::now(),
            stage: None,
            line_open: false,
            last_draw: None,
            last_tenth: 0,
        }
    }

    fn note(&mut self, text: &str) {
        self.end_line();
        eprintln!("{text}");
    }

    fn update(&mut self, p: Progress) {
        match p {
            Progress::Stage(stage) => {
                self.end_line();
                self.stage = Some(stage);
                self.stage_start = Instant::now();
                self.last_tenth = 0;
                if !self.tty {
                    eprintln!("{stage}...");
                }
            }
            Progress::UnetCall {
                step,
                steps,
                window,
                windows,
                done,
                total,
            } => {
                let label = format!("step {}/{steps} window {}/{windows}", step + 1, window + 1);
                if self.tty {
                    self.draw(&label, done, total);
                } else if window + 1 == windows {
                    eprintln!(
                        "  step {}/{steps} done ({})",
                        step + 1,
                        self.timing(done, total)
                    );
                }
            }
            Progress::Frame { done, total } => {
                if self.tty {
                    self.draw(&format!("frame {done}/{total}"), done, total);
                } else {
                    let tenth = done * 10 / total.max(1);
                    if tenth > self.last_tenth || done == total {
                        self.last_tenth = tenth;
                        eprintln!("  frame {done}/{total} ({})", self.timing(done, total));
                    }
                }
            }
            _ => {}
        }
    }

    fn timing(&self, done: usize, total: usize) -> String {
        let elapsed = self.stage_start.elapsed().as_secs_f64();
        let eta = elapsed / done.max(1) as f64 * (total - done.min(total)) as f64;
        format!("{elapsed:.1} s, ETA {eta:.1} s")
    }

    fn draw(&mut self, label: &str, done: usize, total: usize) {
        let now = Instant::now();
        if done < total && self.last_draw.is_some_and(|t| now - t < Self::REDRAW) {
            return;
        }
        self.last_draw = Some(now);
        let filled = Self::BAR * done / total.max(1);
        let stage = self.stage.map(|s| s.to_string()).unwrap_or_default();
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r\x1b[2K{stage:>10} [{}{}] {label} | {}",
            "#".repeat(filled),
            "-".repeat(Self::BAR - filled),
            self.timing(done, total)
        );
        let _ = err.flush();
        self.line_open = true;
    }

    fn end_line(&mut self) {
        if self.line_open {
            eprintln!();
            self.line_open = false;
        }
    }

    fn finish(&mut self) {
        self.end_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_parsers() {
        assert_eq!(parse_encoder("builtin"), Ok(EncoderBackend::Builtin));
        assert!(parse_encoder("x264").is_err());
    }

    #[test]
    fn eta_of_half_done_equals_elapsed() {
        let mut d = ProgressDisplay::new(false);
        d.stage_start = Instant::now() - Duration::from_secs(10);
        // "E s, ETA R s"
        let numbers = |s: String| -> Vec<f64> {
            s.split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .filter_map(|w| w.parse().ok())
                .collect()
        };
        let half = numbers(d.timing(5, 10));
        assert!(
            half[0] >= 10.0 && (half[1] - half[0]).abs() <= 0.11,
            "{half:?}"
        );
        assert_eq!(numbers(d.timing(10, 10))[1], 0.0);
        assert_eq!(numbers(d.timing(12, 10))[1], 0.0, "done past total");
    }
}
