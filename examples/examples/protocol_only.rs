//! The wire types alone (`echomimic-protocol`, no Redis client: its `redis` feature is only for
//! the helpers of `submit_and_follow`), for a client that talks to Redis its own way: build a
//! task and validate it, print the JSON to push onto the worker's queue, and follow the progress
//! events of that task.
//!
//! ```text
//! # print the task to push, then read events (one JSON object a line) from a file or stdin
//! cargo run -p echomimic-examples --example protocol_only -- \
//!     --image-id 550e8400-e29b-41d4-a716-446655440000 \
//!     --audio-id 661f9511-f3ac-52e5-b827-557766551111 --steps 6 --events events.jsonl
//! # live: redis-cli --raw subscribe task_progress | cargo run ... -- --image-id ... --events -
//! ```
//!
//! Exit status: 0 when the task completed, 1 when it failed, 2 for an invalid task, 3 when the
//! events ended without an outcome.
#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use echomimic_protocol::{keys, ProgressEvent, Status, Task};

/// Build and validate a task, then follow its progress events.
#[derive(Parser)]
struct Args {
    /// Temp-file id of the uploaded portrait.
    #[arg(long)]
    image_id: String,
    /// Temp-file id of the uploaded speech.
    #[arg(long)]
    audio_id: String,
    /// Task id [default: a new UUID].
    #[arg(long)]
    task_id: Option<String>,
    /// Denoising steps (1..=100) [default: the worker's].
    #[arg(long)]
    steps: Option<u32>,
    /// Guidance scale (0..=20) [default: the worker's].
    #[arg(long)]
    cfg: Option<f64>,
    /// The worker's GPU id (names its queue).
    #[arg(long, default_value_t = 0)]
    gpu_id: u32,
    /// Progress events, one JSON object a line (`-` = stdin); without it, only the task.
    #[arg(long)]
    events: Option<PathBuf>,
}

fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    let task_id = args
        .task_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut task = Task::new(&task_id, "session-1", args.image_id, args.audio_id);
    (task.steps, task.cfg) = (args.steps, args.cfg);
    // The worker checks the same rules and fails the task with `invalid_task`: check first.
    if let Err(problem) = task.validate() {
        eprintln!("invalid task: {problem}");
        return Ok(ExitCode::from(2));
    }
    // What to push (RPUSH or LPUSH: the worker pops from the other end).
    println!("queue: {}", keys::task_queue(args.gpu_id));
    println!("task: {}", task.to_json());
    println!("follow: channel {}", keys::DEFAULT_PROGRESS_CHANNEL);

    let Some(path) = args.events else {
        return Ok(ExitCode::SUCCESS);
    };
    let input: Box<dyn BufRead> = match path.to_str() {
        Some("-") => Box::new(std::io::stdin().lock()),
        _ => Box::new(BufReader::new(std::fs::File::open(&path)?)),
    };
    for line in input.lines() {
        let line = line?;
        if !line.trim_start().starts_with('{') {
            continue; // e.g. redis-cli's `message` and channel lines
        }
        // Both event schemas (ours and the legacy EchoMe one) parse into one type.
        let event = match ProgressEvent::parse_any(line.as_bytes()) {
            Ok(e) if e.task_id == task.task_id => e,
            Ok(_) => continue, // another client's task on the shared channel
            Err(e) => {
                eprintln!("skipping a message that is not an event: {e}");
                continue;
            }
        };
        let percent = event
            .progress
            .map_or(String::new(), |p| format!("{p:5.1}%"));
        let text = event.message.as_deref().unwrap_or("");
        println!("[{:<14}] {percent} {text}", event.status.as_str());
        match event.status {
            Status::Completed => {
                println!("video file id: {}", event.video_file_id.unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            Status::Failed => {
                let code = event.code.map_or("-".into(), |c| c.to_string());
                println!("failed ({code}): {}", event.error.unwrap_or_default());
                return Ok(ExitCode::from(1));
            }
            _ => {}
        }
    }
    eprintln!("the events ended before the task did");
    Ok(ExitCode::from(3))
}
