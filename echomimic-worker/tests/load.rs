//! Load: many queued tasks on the tiny model (64×64, 12 frames, 2 steps, no CFG) across two
//! worker processes with different gpu ids sharing one queue. Every task must complete exactly
//! once; the test prints (and writes to `$CARGO_TARGET_TMPDIR/worker-load-{n}.md`) the
//! throughput and per-stage times measured from the events' arrival times.
//!
//! It runs in the normal suite (about 2–3 minutes on a 2-core machine);
//! `cargo test -p echomimic-worker --test load -- --nocapture` shows the figures and
//! `ECHOMIMIC_LOAD_TASKS` sets another count.

#![allow(clippy::print_stdout)] // tests report their measurements

mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;
use echomimic_protocol::{Status, Task};

fn quick_task(world: &World, id: &str) -> Task {
    let mut t = world.task(id);
    t.steps = Some(2);
    t.cfg = Some(1.0);
    t.frames_num = Some(12);
    t
}

#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    fn summary(&self) -> String {
        let mut v = self.0.clone();
        if v.is_empty() {
            return "-".into();
        }
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        format!(
            "{mean:7.3} | {:7.3} | {:7.3} | {:7.3}",
            pct(0.5),
            pct(0.95),
            v[v.len() - 1]
        )
    }
}

fn run_load(n: usize) -> TestResult {
    let Some(world) = World::new() else {
        return Ok(());
    };
    let rec = world.recorder();
    let gpu_b = unique_gpu();
    let mut a = WorkerProc::start(&world, &[]);
    let mut b = WorkerProc::start_on(&world, gpu_b, &[]);
    a.wait_ready(&world, Duration::from_secs(120));
    b.wait_ready(&world, Duration::from_secs(120));
    let _cleanup_b = (
        echomimic_protocol::keys::gpu_status(gpu_b),
        echomimic_protocol::keys::worker_lease(gpu_b),
    );
    world.extra_keys.lock().unwrap().extend([
        _cleanup_b.0.clone(),
        _cleanup_b.1.clone(),
        echomimic_protocol::keys::processing_list(gpu_b),
    ]);

    let tasks: Vec<Task> = (0..n)
        .map(|i| quick_task(&world, &unique(&format!("load{i}"))))
        .collect();
    let submitted = Instant::now();
    for t in &tasks {
        world.submit(t);
    }
    let timeout = Duration::from_secs(60 + 30 * n as u64);
    rec.wait_terminals(n, timeout);
    let wall = submitted.elapsed();
    std::thread::sleep(Duration::from_millis(500));

    // Exactly once, all completed.
    let all = rec.all();
    let mut by_task: HashMap<&str, Vec<&Seen>> = HashMap::new();
    for s in &all {
        by_task.entry(s.event.task_id.as_str()).or_default().push(s);
    }
    let mut stages: [(&str, Series); 7] = Default::default();
    let names = [
        "claim → download start",
        "download (image + audio)",
        "face detection + audio checks",
        "waiting for the GPU",
        "inference (model + decode)",
        "finish video + mux",
        "upload",
    ];
    for (slot, name) in stages.iter_mut().zip(names) {
        slot.0 = name;
    }
    let mut end_to_end = Series::default();
    for t in &tasks {
        let events = by_task.get(t.task_id.as_str()).cloned().unwrap_or_default();
        let terminals: Vec<_> = events.iter().filter(|s| s.event.is_terminal()).collect();
        assert_eq!(terminals.len(), 1, "task {}: {terminals:#?}", t.task_id);
        assert_eq!(
            terminals[0].event.status,
            Status::Completed,
            "{:?}",
            terminals[0].event
        );
        let at = |pred: &dyn Fn(&Seen) -> bool| events.iter().find(|s| pred(s)).map(|s| s.at);
        let progress = |s: &Seen| s.event.progress.unwrap_or(-1.0);
        let marks = [
            at(&|s| s.event.status == Status::Processing),
            at(&|s| s.event.status == Status::Downloading),
            at(&|s| s.event.status == Status::FaceDetecting),
            at(&|s| s.event.status == Status::FaceDetecting && progress(s) >= 10.0),
            at(&|s| s.event.status == Status::Inference),
            at(&|s| s.event.status == Status::MergingAudio),
            at(&|s| s.event.status == Status::Uploading),
            at(&|s| s.event.status == Status::Completed),
        ];
        for (i, w) in marks.windows(2).enumerate() {
            if let (Some(a), Some(b)) = (w[0], w[1]) {
                stages[i].1.push(b.duration_since(a));
            }
        }
        if let Some(done) = marks[7] {
            end_to_end.push(done.duration_since(submitted));
        }
    }
    let completed_a = a.log_text().matches("outcome=\"completed\"").count();
    let completed_b = b.log_text().matches("outcome=\"completed\"").count();
    assert_eq!(
        completed_a + completed_b,
        n,
        "per-worker completions {completed_a} + {completed_b}"
    );
    assert!(world.queue_items().is_empty());
    assert!(world.processing_items().is_empty());

    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Worker load test: {n} tasks, 2 worker processes, one queue\n"
    );
    let _ = writeln!(
        report,
        "tiny random-weight model (testdata/golden/public), 64x64, 12 frames, 2 steps, cfg 1.0, CPU, {} cores\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    let _ = writeln!(
        report,
        "wall {:.1} s, throughput {:.2} tasks/s ({:.1} tasks/min); worker A completed {completed_a}, worker B {completed_b}\n",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        60.0 * n as f64 / wall.as_secs_f64()
    );
    let _ = writeln!(report, "| stage (s) | mean | p50 | p95 | max |");
    let _ = writeln!(report, "|---|---|---|---|---|");
    for (name, series) in &stages {
        let _ = writeln!(report, "| {name} | {} |", series.summary());
    }
    let _ = writeln!(report, "| submit → completed | {} |", end_to_end.summary());
    println!("{report}");
    let path =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("worker-load-{n}.md"));
    std::fs::write(&path, &report)?;
    println!("(written to {})", path.display());
    for w in [&mut a, &mut b] {
        w.signal("TERM");
        assert!(w.wait_exit(Duration::from_secs(30)).success());
    }
    Ok(())
}

/// The load test: 200 queued tasks across two workers (about 2–3 minutes on 2 cores
/// with the pipeline optimised in dev/test builds). `ECHOMIMIC_LOAD_TASKS` sets another count.
#[test]
fn load_200_tasks_across_two_workers() -> TestResult {
    let n = std::env::var("ECHOMIMIC_LOAD_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    run_load(n)
}
