//! The service inside the test process, with the stand-in engine ([`FakeEngine`]).
#![allow(unreachable_pub)]
use std::time::Duration;

use echomimic_protocol::{Status, Task};
use echomimic_worker::engine::fake::FakeEngine;
use echomimic_worker::{ShutdownHandle, Stats, Worker};

use super::recorder::Recorder;
use super::world::World;

/// Side of the fake engine's frames.
pub const W: u32 = 64;

/// The fake engine at `W`×`W`.
pub fn fake() -> FakeEngine {
    FakeEngine::new(W, W)
}

/// Starts a worker of `world` with `extra` flags and `engine`.
pub fn start(world: &World, extra: &[&str], engine: FakeEngine) -> Worker {
    Worker::start(world.config(extra), ShutdownHandle::new(), move || {
        Ok(engine)
    })
    .expect("worker starts")
}

/// Requests a stop and waits for it; the counters.
pub fn stop(worker: Worker) -> Stats {
    worker.shutdown_handle().request();
    worker.join().expect("clean stop")
}

/// A worker whose fake engine takes 0.3 s per UNet call (crop output), and a task of `steps`
/// calls submitted to it, returned once the task's inference has started: the window in
/// which a test injects its fault.
pub fn start_with_running_task(
    world: &World,
    rec: &Recorder,
    id: &str,
    steps: u32,
) -> (Worker, Task) {
    let engine = fake().with_call_delay(Duration::from_millis(300));
    let worker = start(world, &["--geometry", "crop"], engine);
    let mut task = world.task(id);
    task.steps = Some(steps);
    task.cfg = Some(1.0);
    world.submit(&task);
    rec.wait_status(&task.task_id, Status::Inference, Duration::from_secs(30));
    (worker, task)
}

/// Submits a fresh task and asserts that it completes: the worker still serves.
pub fn assert_serves_next(world: &World, rec: &Recorder, what: &str) {
    let next = world.task(&super::redis_server::unique(what));
    world.submit(&next);
    let done = rec.wait_terminal(&next.task_id, Duration::from_secs(30));
    assert_eq!(done.status, Status::Completed, "{done:?}");
}
