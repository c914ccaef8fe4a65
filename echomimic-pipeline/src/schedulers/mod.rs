//! Noise schedulers (pure logic: no weights, no I/O).

pub mod ddim;

pub use ddim::{DDIMScheduler, DDIMSchedulerOutput};
