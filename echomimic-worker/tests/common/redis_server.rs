//! Redis for the tests: the shared server (through `echomimic-testkit`), names unique to a
//! test, and a private server a test may stop and restart.
#![allow(unreachable_pub, clippy::print_stdout, clippy::print_stderr)]
use std::process::Command;
use std::time::{Duration, Instant};

use echomimic_testkit::redis::TestRedis;

/// Where the worker's tests find Redis: database 12 by default (the protocol's tests use 11),
/// `ECHOMIMIC_WORKER_TEST_REDIS_URL` to point elsewhere.
const TEST_REDIS: TestRedis = TestRedis {
    env_var: "ECHOMIMIC_WORKER_TEST_REDIS_URL",
    default_url: "redis://127.0.0.1:6379/12",
};

pub fn redis_url() -> String {
    TEST_REDIS.url()
}

/// A client, or `None` (with a message) when no Redis answers.
pub fn redis() -> Option<redis::Client> {
    TEST_REDIS.client()
}

/// A name unique to this process and call.
pub fn unique(what: &str) -> String {
    echomimic_testkit::redis::unique("wt", what)
}

/// A gpu id unlikely to collide with another test or a real worker.
pub fn unique_gpu() -> u32 {
    1_000_000 + rand::random::<u32>() % 3_000_000_000
}

/// A private `redis-server` on a free port with an append-only file in its own folder, which
/// a test may stop and start again (never the shared server).
pub struct PrivateRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    /// `None` when `redis-server` is not installed.
    pub fn start() -> Option<PrivateRedis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
                "ECHOMIMIC_REQUIRE_REDIS is set but redis-server is not installed"
            );
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let mut r = PrivateRedis {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.launch();
        Some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("url");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut con) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < end, "private redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (its data stays in the append-only file).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and folder.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
