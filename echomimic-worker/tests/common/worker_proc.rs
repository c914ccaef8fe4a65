//! The worker binary as a child process, with the tiny model.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use echomimic_protocol::keys;
use redis::Commands;

use super::redis_server::unique;
use super::world::{golden, World};

/// Model flags of the tiny random-weight model in the official layout, at a small size.
pub fn tiny_model_args(size: u32) -> Vec<String> {
    vec![
        "--config".into(),
        golden()
            .join("configs/prompts/animation_tiny.yaml")
            .display()
            .to_string(),
        "-W".into(),
        size.to_string(),
        "-H".into(),
        size.to_string(),
    ]
}

/// The worker binary running as a child process, its log in a file.
pub struct WorkerProc {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub gpu_id: u32,
}

impl WorkerProc {
    /// Starts `echomimic-worker` with `args` (the first being the subcommand).
    pub fn spawn(args: &[String], log: PathBuf, gpu_id: u32) -> WorkerProc {
        Self::spawn_with_env(args, &[], log, gpu_id)
    }

    /// [`WorkerProc::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        args: &[String],
        env: &[(&str, &str)],
        log: PathBuf,
        gpu_id: u32,
    ) -> WorkerProc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_echomimic-worker"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("worker starts");
        WorkerProc { child, log, gpu_id }
    }

    /// Starts a worker of `world` with the tiny model and `extra` flags.
    pub fn start(world: &World, extra: &[&str]) -> WorkerProc {
        Self::start_on(world, world.gpu_id, extra)
    }

    /// Like [`WorkerProc::start`] with another gpu id (several workers on one queue).
    pub fn start_on(world: &World, gpu_id: u32, extra: &[&str]) -> WorkerProc {
        let mut args = world.args(&[]);
        if let Some(i) = args.iter().position(|a| a == "--gpu-id") {
            args[i + 1] = gpu_id.to_string();
        }
        args.extend(tiny_model_args(64));
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = world
            .dir
            .path()
            .join(format!("worker-{gpu_id}-{}.log", unique("log")));
        WorkerProc::spawn(&args, log, gpu_id)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the worker reports `idle` (model loaded, serving).
    pub fn wait_ready(&mut self, world: &World, timeout: Duration) {
        let end = Instant::now() + timeout;
        let key = keys::gpu_status(self.gpu_id);
        loop {
            let status: Option<String> = world.con().get(&key).expect("get status");
            if status.as_deref() == Some("idle") || status.as_deref() == Some("busy") {
                return;
            }
            if let Ok(Some(code)) = self.child.try_wait() {
                panic!("worker exited early ({code}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < end,
                "worker not ready within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < end,
                "worker still running after {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
