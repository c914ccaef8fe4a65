//! `echomimic-worker generate`: one local generation, like the reference `infer_audio2vid.py`.
//!
//! ```text
//! echomimic-worker generate --config configs/prompts/animation_acc.yaml \
//!     --image face.jpg --audio speech.wav --output out.mp4
//! ```
//!
//! The photo is cropped with the reference script's face handling (all its quirks, so the crop
//! is the one the Python code makes) unless `--face-quirks` says otherwise. For parity checks,
//! `--init-noise FILE` injects the initial noise (`latents_randn` of a safetensors file) and
//! `--dump-tensors FILE` writes the intermediate tensors under the names of the golden
//! `pipeline.safetensors`.

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use echomimic_pipeline::audio::{self, AudioLimits};
use echomimic_pipeline::face::{self, FaceCropOptions, FaceQuirks, ImageLimits};
use echomimic_pipeline::pipeline::{Progress, ReferenceInput, SpeechInput, Stage, TensorDump};
use echomimic_pipeline::video::{
    AudioInput, EncoderBackend, OutputGeometry, PasteBack, VideoSpec, VideoWriter,
};
use echomimic_pipeline::PipelineError;

use crate::config::{Encoder, Geometry, ModelArgs};
use crate::engine::{plan_frames, write_wav_cut};
use crate::error::WorkerError;
use crate::pipeline_engine::{load_pipeline, SERVICE_FACE_QUIRKS};
use crate::progress::{human, Eta};

/// Which of the reference's face-handling bugs to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Quirks {
    /// `infer_audio2vid.py` exactly (BGR detector input, mask wrap, crop-bottom bug).
    Reference,
    /// The EchoMe worker (crop-bottom bug fixed).
    Echome,
    /// What `serve` uses: the EchoMe worker's, plus a clamped mask.
    Service,
    /// All three fixed.
    Corrected,
}

impl From<Quirks> for FaceQuirks {
    fn from(q: Quirks) -> FaceQuirks {
        match q {
            Quirks::Reference => FaceQuirks::REFERENCE,
            Quirks::Echome => FaceQuirks::ECHOME_WORKER,
            Quirks::Service => SERVICE_FACE_QUIRKS,
            Quirks::Corrected => FaceQuirks::CORRECTED,
        }
    }
}

/// Flags of `echomimic-worker generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub model: ModelArgs,
    /// Reference portrait (PNG, JPEG, WebP, BMP, GIF).
    #[arg(long)]
    pub image: PathBuf,
    /// Driving speech (WAV, MP3, AAC/M4A, OGG, FLAC).
    #[arg(long)]
    pub audio: PathBuf,
    /// Output MP4.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Most frames to generate (`L`); a longer audio is cut to match, and said so.
    #[arg(short = 'L', long, default_value_t = 1200)]
    pub length: u32,
    /// Denoising steps (default: 25 normal, 6 acc).
    #[arg(long)]
    pub steps: Option<u32>,
    /// Guidance scale (default: 2.5 normal, 1.0 acc; ≤ 1 disables guidance).
    #[arg(long)]
    pub cfg: Option<f64>,
    /// Seed of the initial noise; negative = random.
    #[arg(long, default_value_t = 420, allow_hyphen_values = true)]
    pub seed: i64,
    /// Safetensors file holding `latents_randn`, the initial noise `[1, 4, F, H/8, W/8]` before
    /// the ±1.5 clamp (parity with a reference run).
    #[arg(long, value_name = "FILE")]
    pub init_noise: Option<PathBuf>,
    /// Writes the intermediate tensors to this safetensors file (names as in the golden
    /// `pipeline.safetensors`).
    #[arg(long, value_name = "FILE")]
    pub dump_tensors: Option<PathBuf>,
    /// Output geometry: the W×H crop (the reference script's output) or pasted back into the photo.
    #[arg(long, value_enum, default_value = "crop")]
    pub geometry: Geometry,
    /// Video encoder: auto (ffmpeg if installed), ffmpeg or builtin.
    #[arg(long, value_enum, default_value_t)]
    pub encoder: Encoder,
    /// Face-handling quirks to reproduce.
    #[arg(long, value_enum, default_value = "reference")]
    pub face_quirks: Quirks,
    /// Longest accepted audio, in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub max_audio_secs: f64,
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct GenerateSummary {
    /// The MP4.
    pub output: PathBuf,
    /// Frames generated.
    pub frames: usize,
    /// The seed used.
    pub seed: u64,
    /// A note when `L` cut the audio.
    pub note: Option<String>,
}

fn media(e: PipelineError) -> WorkerError {
    WorkerError::Encode(e)
}

/// Runs one generation; `cancel` stops it between UNet calls (Ctrl-C).
pub fn run(args: &GenerateArgs, cancel: Arc<AtomicBool>) -> Result<GenerateSummary, WorkerError> {
    args.model.validate()?;
    for (what, p) in [("--image", &args.image), ("--audio", &args.audio)] {
        if !p.is_file() {
            return Err(WorkerError::Config(format!(
                "{what} {}: no such file",
                p.display()
            )));
        }
    }
    if args.length == 0 {
        return Err(WorkerError::Config("-L/--length must be at least 1".into()));
    }
    let t = Instant::now();
    let pipeline = load_pipeline(&args.model, 0)?;
    tracing::info!(secs = t.elapsed().as_secs_f64(), variant = ?pipeline.variant(), "model loaded");

    // Inputs: decode and crop up front, so the video writer knows the geometry.
    let photo =
        face::load_image(&args.image, &ImageLimits::default()).map_err(WorkerError::Inference)?;
    let options = FaceCropOptions {
        quirks: args.face_quirks.into(),
        ..FaceCropOptions::default()
    };
    let crop = pipeline
        .face_detector()
        .crop_face(&photo, args.model.width, args.model.height, &options)
        .map_err(WorkerError::Inference)?;
    let limits = AudioLimits {
        max_seconds: args.max_audio_secs,
        ..AudioLimits::default()
    };
    let decoded = audio::decode_file(&args.audio, &limits).map_err(WorkerError::Inference)?;
    let audio_secs = decoded.duration_seconds();
    let plan = plan_frames(audio_secs, args.model.fps, Some(args.length));
    let work = tempfile::tempdir().map_err(|source| WorkerError::Io {
        op: "create a temp folder",
        path: std::env::temp_dir(),
        source,
    })?;
    let mux_audio = match plan.keep_secs {
        Some(keep) => {
            let path = work.path().join("audio-cut.wav");
            let channels = u16::try_from(decoded.channels).unwrap_or(u16::MAX);
            write_wav_cut(&decoded.samples, channels, decoded.sample_rate, keep, &path)?;
            path
        }
        None => args.audio.clone(),
    };

    let mut req = pipeline.request(
        ReferenceInput::Crop(Box::new(crop.clone())),
        SpeechInput::File(args.audio.clone()),
    );
    req.width = args.model.width;
    req.height = args.model.height;
    req.max_frames = args.length as usize;
    if let Some(s) = args.steps {
        req.steps = s as usize;
    }
    if let Some(c) = args.cfg {
        req.cfg = c;
    }
    req.seed = args.seed;
    req.fps = args.model.fps;
    req.context_frames = args.model.context_frames;
    req.context_overlap = args.model.context_overlap;
    req.audio_limits = limits;
    if let Some(path) = &args.init_noise {
        let tensors = candle_core::safetensors::load(path, pipeline.device())
            .map_err(|e| WorkerError::Config(format!("--init-noise {}: {e}", path.display())))?;
        let noise = tensors.get("latents_randn").ok_or_else(|| {
            WorkerError::Config(format!(
                "--init-noise {}: no tensor named `latents_randn`",
                path.display()
            ))
        })?;
        req.init_noise = Some(
            noise
                .to_dtype(pipeline.dtype())
                .map_err(|e| WorkerError::Inference(PipelineError::Candle(e)))?,
        );
    }

    let backend = match args.encoder {
        Encoder::Auto => EncoderBackend::Auto,
        Encoder::Ffmpeg => EncoderBackend::Ffmpeg,
        Encoder::Builtin => EncoderBackend::Builtin,
    };
    let [x0, y0, x1, y1] = crop.square_rect.to_xyxy();
    let to_u32 = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
    let geometry = match args.geometry {
        Geometry::Crop => OutputGeometry::Crop,
        Geometry::PasteBack => OutputGeometry::PasteBack(
            PasteBack::new(photo, [to_u32(x0), to_u32(y0), to_u32(x1), to_u32(y1)])
                .map_err(media)?,
        ),
    };
    let spec = VideoSpec::new(
        args.model.width,
        args.model.height,
        AudioInput::file(&mux_audio),
    )
    .with_fps(args.model.fps)
    .with_backend(backend)
    .with_geometry(geometry);
    let mut writer = VideoWriter::create(&args.output, &spec).map_err(media)?;

    let dump = args
        .dump_tensors
        .as_ref()
        .map(|_| RefCell::new(TensorDump::new()));
    let (w, h) = (args.model.width, args.model.height);
    let mut bar = Bar::new();
    let mut progress = |p: Progress| bar.update(p);
    let mut sink = |i: usize, rgb: &[u8]| -> echomimic_pipeline::Result<()> {
        if let Some(d) = &dump {
            d.borrow_mut().record_rgb_frame(i, rgb, w, h)?;
        }
        writer.write_frame(rgb)
    };
    let report = match &dump {
        Some(d) => {
            let mut hook = |name: &str, t: &candle_core::Tensor| d.borrow_mut().record(name, t);
            pipeline.generate_with_dump(&req, &mut progress, &cancel, &mut sink, &mut hook)
        }
        None => pipeline.generate(&req, &mut progress, &cancel, &mut sink),
    }
    .map_err(|e| match e {
        PipelineError::Cancelled => WorkerError::Cancelled,
        e => WorkerError::Inference(e),
    })?;
    bar.finish();
    let video = writer.finish().map_err(media)?;
    if let (Some(d), Some(path)) = (dump, &args.dump_tensors) {
        d.into_inner().save(path).map_err(WorkerError::Inference)?;
        tracing::info!(path = %path.display(), "tensors written");
    }
    tracing::info!(
        frames = report.frames,
        seed = report.seed,
        unet_calls = report.unet_calls,
        secs = t.elapsed().as_secs_f64(),
        bytes = video.bytes,
        "video written"
    );
    Ok(GenerateSummary {
        output: video.path,
        frames: report.frames,
        seed: report.seed,
        note: plan.note.or_else(|| report.truncation_note()),
    })
}

/// A one-line progress display on a terminal (stderr), plain log lines otherwise.
struct Bar {
    tty: bool,
    eta: Eta,
    last_pct: Option<u64>,
}

impl Bar {
    fn new() -> Self {
        Bar {
            tty: std::io::stderr().is_terminal(),
            eta: Eta::new(),
            last_pct: None,
        }
    }

    fn update(&mut self, p: Progress) {
        let line = match p {
            Progress::Stage(stage) => {
                if stage == Stage::Decoding || !self.tty {
                    tracing::info!(%stage, "stage");
                }
                return;
            }
            Progress::UnetCall {
                step,
                steps,
                window,
                windows,
                done,
                total,
            } => {
                let eta = self
                    .eta
                    .update(Instant::now(), done as u64, total as u64)
                    .map(|d| format!(", {} left", human(d)))
                    .unwrap_or_default();
                let pct = (done * 100 / total.max(1)) as u64;
                if !self.tty && self.last_pct.is_some_and(|l| pct < l + 10) && done < total {
                    return;
                }
                self.last_pct = Some(pct);
                format!(
                    "denoising {pct:3}% step {}/{steps} window {}/{windows}{eta}",
                    step + 1,
                    window + 1
                )
            }
            Progress::Frame { done, total } => {
                if !self.tty && done < total {
                    return;
                }
                format!("decoding frame {done}/{total}")
            }
            _ => return,
        };
        if self.tty {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else {
            tracing::info!("{line}");
        }
    }

    fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}
