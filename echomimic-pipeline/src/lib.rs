//! EchoMimic v1 (audio-driven portrait animation) in pure Rust on Candle.
//!
//! The crate loads the official released checkpoint files unchanged
//! (`pretrained_weights/` layout) and knows nothing about Redis, HTTP or the
//! worker protocol: it takes plain Rust requests and reports progress through
//! callbacks.

pub mod audio;
pub mod config;
pub mod context;
pub mod device;
pub mod error;
pub mod face;
pub mod ffmpeg_program;
pub mod image_io;
pub mod kernels;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod rng;
pub mod schedulers;
pub mod unet_loading;
pub mod video;
pub mod weights;

pub use error::{AudioError, PipelineError, Result};
