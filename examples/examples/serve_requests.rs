//! The pattern of an app server: one thread owns the loaded pipeline and serves requests that
//! arrive on a channel, so the weights are read once however many videos are made. Here `main`
//! plays the app and sends `--requests` jobs (the same inputs with different seeds).
//!
//! ```text
//! # the tiny random-weight model that ships with the tests (its videos are noise)
//! cargo run --release -p echomimic-examples --example serve_requests -- -W 128 -H 128 --requests 3
//! # the real model (see the README for the download)
//! cargo run --release -p echomimic-examples --example serve_requests -- \
//!     --weights pretrained_weights --image face.jpg --audio speech.wav --out-dir videos
//! ```
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use echomimic_pipeline::audio::{self, AudioLimits};
use echomimic_pipeline::device::{select_device, DeviceChoice};
use echomimic_pipeline::pipeline::{EchoMimicPipeline, ModelSource, ReferenceInput, SpeechInput};
use echomimic_pipeline::video::{AudioInput, Pcm, VideoSpec, VideoWriter};

const TINY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/golden/public");

/// Serve several generation requests with one loaded pipeline.
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
    /// Folder of the videos (`video-0.mp4`, ...).
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Requests to send.
    #[arg(long, default_value_t = 2)]
    requests: u32,
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

/// One request to the model thread, with the channel its answer goes back on.
struct Job {
    image: PathBuf,
    audio: PathBuf,
    output: PathBuf,
    seed: i64,
    reply: mpsc::Sender<anyhow::Result<String>>,
}

/// Loads the pipeline once, then serves jobs until every sender is gone.
fn model_thread(source: ModelSource, args: &Args, jobs: mpsc::Receiver<Job>) -> anyhow::Result<()> {
    let (device, device_name) = select_device(DeviceChoice::Auto)?;
    let t = Instant::now();
    let pipeline = EchoMimicPipeline::load(&source, &device, None)?;
    eprintln!(
        "weights loaded once, in {:.2} s ({device_name})",
        t.elapsed().as_secs_f64()
    );
    for job in jobs {
        let _ = job.reply.send(serve(&pipeline, args, &job)); // the app may have stopped waiting
    }
    Ok(())
}

/// One video with the loaded pipeline.
fn serve(pipeline: &EchoMimicPipeline, args: &Args, job: &Job) -> anyhow::Result<String> {
    let t = Instant::now();
    let limits = AudioLimits::default();
    let speech = audio::decode_file(&job.audio, &limits)?;
    let waveform = audio::to_whisper_waveform(&speech, &limits)?;
    let photo = ReferenceInput::photo_file(&job.image);
    let mut request = pipeline.request(photo, SpeechInput::Waveform16k(waveform));
    (request.width, request.height, request.seed) = (args.width, args.height, job.seed);
    request.steps = args.steps.unwrap_or(request.steps);
    let pcm = Pcm::new(speech.samples, speech.channels as u16, speech.sample_rate)?;
    let sound = AudioInput::file(&job.audio).with_pcm(pcm);
    let spec = VideoSpec::new(args.width, args.height, sound).with_fps(request.fps);
    let mut writer = VideoWriter::create(&job.output, &spec)?;
    let cancel = AtomicBool::new(false); // a real server keeps it to cancel this job
    let report = pipeline.generate(&request, &mut |_| {}, &cancel, &mut writer)?;
    let video = writer.finish()?;
    let (path, frames, secs) = (
        video.path.display(),
        video.frames_written,
        t.elapsed().as_secs_f64(),
    );
    Ok(format!(
        "{path} ({frames} frames, seed {}, {secs:.2} s)",
        report.seed
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let source = match (args.config.clone(), args.weights.clone()) {
        (_, Some(dir)) => ModelSource::WeightsDir { dir, variant: None },
        (yaml, None) => ModelSource::PromptYaml(
            yaml.unwrap_or_else(|| format!("{TINY}/configs/prompts/animation_tiny.yaml").into()),
        ),
    };
    let (jobs, inbox) = mpsc::channel::<Job>();
    thread::scope(|scope| -> anyhow::Result<()> {
        let model = scope.spawn(|| model_thread(source, &args, inbox));
        // The app: send every request at once (they queue), then collect the answers.
        let answers: Vec<_> = (0..args.requests)
            .map(|i| {
                let (reply, answer) = mpsc::channel();
                let output = args.out_dir.join(format!("video-{i}.mp4"));
                let (image, audio) = (args.image.clone(), args.audio.clone());
                jobs.send(Job {
                    image,
                    audio,
                    output,
                    seed: 420 + i64::from(i),
                    reply,
                })?;
                Ok(answer)
            })
            .collect::<anyhow::Result<_>>()?;
        drop(jobs); // no more requests: the model thread ends after the last one
        for (i, answer) in answers.into_iter().enumerate() {
            match answer.recv() {
                Ok(result) => eprintln!("request {i}: wrote {}", result?),
                Err(_) => break, // the model thread stopped early; its error follows
            }
        }
        model
            .join()
            .expect("the model thread panicked")
            .context("the model thread")
    })
}
