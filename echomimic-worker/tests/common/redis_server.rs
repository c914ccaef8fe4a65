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
    /// TLS only, with the ACL user [`TLS_USER`] (the default user is off).
    tls: bool,
}

/// The ACL user and password of [`PrivateRedis::start_tls`].
pub const TLS_USER: (&str, &str) = ("worker", "s3cret-for-tests");

/// The test-only TLS files (`testdata/tls/make.sh`).
pub fn tls_file(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/tls")
        .join(name)
}

impl PrivateRedis {
    /// `None` when `redis-server` is not installed.
    pub fn start() -> Option<PrivateRedis> {
        PrivateRedis::start_with(false)
    }

    /// A server that speaks TLS only (certificate of `testdata/tls`, for localhost) and
    /// serves only the ACL user [`TLS_USER`]. `None` when `redis-server` is not installed.
    pub fn start_tls() -> Option<PrivateRedis> {
        PrivateRedis::start_with(true)
    }

    fn start_with(tls: bool) -> Option<PrivateRedis> {
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
            tls,
        };
        r.launch();
        Some(r)
    }

    pub fn url(&self) -> String {
        if self.tls {
            let (user, password) = TLS_USER;
            format!("rediss://{user}:{password}@localhost:{}/0", self.port)
        } else {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    /// A client of this server (trusting the test CA for a TLS server).
    pub fn client(&self) -> redis::Client {
        if self.tls {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(tls_file("ca.pem")).expect("test CA")),
            };
            redis::Client::build_with_tls(self.url().as_str(), certs).expect("tls client")
        } else {
            redis::Client::open(self.url()).expect("url")
        }
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let tls_args: Vec<String> = if self.tls {
            let (user, password) = TLS_USER;
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.clone(),
                "--tls-cert-file".into(),
                tls_file("server.pem").display().to_string(),
                "--tls-key-file".into(),
                tls_file("server.key").display().to_string(),
                "--tls-ca-cert-file".into(),
                tls_file("ca.pem").display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
                // redis-server joins the words after `--user` into one ACL rule line.
                "--user".into(),
                "default".into(),
                "off".into(),
                "--user".into(),
                user.into(),
                "on".into(),
                format!(">{password}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
            ]
        } else {
            vec!["--port".into(), port]
        };
        let child = Command::new("redis-server")
            .args(&tls_args)
            .args([
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
        let client = self.client();
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
