//! Shared fixtures of the worker's integration tests, one module per fixture:
//!
//! * [`redis_server`]: the Redis the tests use (default `redis://127.0.0.1:6379/12`, override
//!   with `ECHOMIMIC_WORKER_TEST_REDIS_URL`; the helpers are `echomimic-testkit`'s), unique
//!   names, and a private server a test may restart. When no Redis answers, tests print why
//!   and return, unless `ECHOMIMIC_REQUIRE_REDIS` is set (CI), in which case they fail.
//! * [`world`]: one test's queue, channel and gpu id, a real temp-file server on a loopback
//!   port with the inputs uploaded, and the committed inputs.
//! * [`recorder`]: a subscriber keeping every event, and the order rules of a happy task.
//! * [`in_process`]: the service inside the test process with the fake engine.
//! * [`worker_proc`]: the worker binary as a child process with the tiny model.
//! * [`media`]: ffprobe checks and process memory.
//! * [`bad_inputs`]: the protocol's bad inputs and the failures they must end in.
//!
//! Each test binary (`service`, `process`, `load`) compiles this folder on its own and uses a
//! different part of it, so the part one binary leaves unused is not dead code: hence the
//! `dead_code` and `unused_imports` (of the re-exports below) allowances, for this folder only.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub mod bad_inputs;
pub mod in_process;
pub mod media;
pub mod recorder;
pub mod redis_server;
pub mod worker_proc;
pub mod world;

pub use bad_inputs::*;
pub use in_process::*;
pub use media::*;
pub use recorder::*;
pub use redis_server::*;
pub use worker_proc::*;
pub use world::*;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;
