//! Embedding the pipeline in a Rust program: a photo and a speech file in, an MP4 out, with only
//! the public API of `echomimic-pipeline` (load once, generate with a progress bar and Ctrl-C
//! cancellation, stream the frames into the crate's video writer).
//!
//! ```text
//! # the tiny random-weight model that ships with the tests (runs in seconds; its video is noise)
//! cargo run --release -p echomimic-examples --example generate_video -- -W 128 -H 128 -o out.mp4
//! # the real model: download BadToBest/EchoMimic into pretrained_weights/ (see the README), then
//! cargo run --release -p echomimic-examples --example generate_video -- \
//!     --weights pretrained_weights --image face.jpg --audio speech.wav -o out.mp4
//! ```
use std::path::PathBuf;
use std::sync::{atomic::AtomicBool, Arc};

use clap::Parser;
use echomimic_pipeline::audio::{self, AudioLimits};
use echomimic_pipeline::device::{select_device, DeviceChoice};
use echomimic_pipeline::pipeline::{EchoMimicPipeline, ModelSource, Progress};
use echomimic_pipeline::pipeline::{ReferenceInput, SpeechInput};
use echomimic_pipeline::video::{AudioInput, Pcm, VideoSpec, VideoWriter};
use echomimic_pipeline::PipelineError;

/// The tiny model and the inputs of the parity tests.
const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/golden/public");

/// Generate a talking-head MP4 from a portrait and a speech file.
#[derive(Parser)]
struct Args {
    /// Prompt yaml naming every weight file [default: the tiny test model].
    #[arg(long, conflicts_with = "weights")]
    config: Option<PathBuf>,
    /// Official `pretrained_weights/` folder (the acc weights when present).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Reference portrait [default: the test photo].
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/golden/public/inputs/astronaut.png"))]
    image: PathBuf,
    /// Driving speech [default: the test clip].
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/golden/public/inputs/speech.wav"))]
    audio: PathBuf,
    /// Output MP4.
    #[arg(short = 'o', long, default_value = "out.mp4")]
    output: PathBuf,
    /// Frame width (a multiple of 8).
    #[arg(short = 'W', long, default_value_t = 512)]
    width: u32,
    /// Frame height (a multiple of 8).
    #[arg(short = 'H', long, default_value_t = 512)]
    height: u32,
    /// DDIM steps [default: 30 normal, 6 acc].
    #[arg(long)]
    steps: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cancel = Arc::new(AtomicBool::new(false)); // Ctrl-C sets it; generate() then stops
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&cancel))?;

    // 1. Load once (an app keeps `pipeline` for every later request).
    let source = match (args.config, args.weights) {
        (_, Some(dir)) => ModelSource::WeightsDir { dir, variant: None },
        (yaml, None) => ModelSource::PromptYaml(
            yaml.unwrap_or_else(|| format!("{TINY}/configs/prompts/animation_tiny.yaml").into()),
        ),
    };
    let (device, device_name) = select_device(DeviceChoice::Auto)?;
    let pipeline = EchoMimicPipeline::load(&source, &device, None)?;
    eprintln!("loaded the {} weights ({device_name})", pipeline.variant());

    // 2. The request: the loaded variant's defaults, with our size and steps.
    let limits = AudioLimits::default();
    let speech = audio::decode_file(&args.audio, &limits)?;
    let waveform = audio::to_whisper_waveform(&speech, &limits)?;
    let photo = ReferenceInput::photo_file(&args.image);
    let mut request = pipeline.request(photo, SpeechInput::Waveform16k(waveform));
    (request.width, request.height) = (args.width, args.height);
    request.steps = args.steps.unwrap_or(request.steps);

    // 3. The MP4: W x H frames with the speech muxed in (removed again unless finished).
    let pcm = Pcm::new(speech.samples, speech.channels as u16, speech.sample_rate)?;
    let sound = AudioInput::file(&args.audio).with_pcm(pcm);
    let spec = VideoSpec::new(args.width, args.height, sound).with_fps(request.fps);
    let mut writer = VideoWriter::create(&args.output, &spec)?;

    // 4. Generate: every decoded frame goes straight into the writer.
    let mut stage = String::new();
    let mut progress = |p: Progress| match (p, p.counts()) {
        (Progress::Stage(s), _) => stage = s.to_string(),
        (_, Some((done, total))) => {
            let bar = "#".repeat(30 * done / total);
            eprint!("\r{stage:<14} [{bar:<30}] {done}/{total} ");
        }
        _ => {}
    };
    match pipeline.generate(&request, &mut progress, &cancel, &mut writer) {
        Ok(report) => {
            let video = writer.finish()?;
            let path = video.path.display();
            eprintln!(
                "\nwrote {path}: {} frames, seed {}",
                video.frames_written, report.seed
            );
            Ok(())
        }
        Err(PipelineError::Cancelled) => {
            drop(writer); // removes the unfinished file (exit skips destructors)
            eprintln!("\ncancelled; {} was not written", args.output.display());
            std::process::exit(130)
        }
        Err(e) => Err(e.into()),
    }
}
