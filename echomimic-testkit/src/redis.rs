//! The Redis a test suite uses.
//!
//! Each suite has its own database (and an environment variable to point it elsewhere), so the
//! suites of different crates can run at the same time without seeing each other's keys.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Where a test suite finds its Redis.
#[derive(Debug, Clone, Copy)]
pub struct TestRedis {
    /// Environment variable that overrides [`TestRedis::default_url`].
    pub env_var: &'static str,
    /// URL used when the variable is not set.
    pub default_url: &'static str,
}

impl TestRedis {
    /// The URL: the environment variable's value, else the default.
    pub fn url(&self) -> String {
        std::env::var(self.env_var).unwrap_or_else(|_| self.default_url.into())
    }

    /// A client whose server answered, or `None` (with a `SKIPPED` message on stderr) when no
    /// Redis answers.
    ///
    /// # Panics
    ///
    /// When `ECHOMIMIC_REQUIRE_REDIS` is set and no Redis answers (CI must not skip).
    pub fn client(&self) -> Option<redis::Client> {
        let url = self.url();
        let client = match redis::Client::open(url.as_str()) {
            Ok(c) => c,
            Err(e) => {
                required_or_skip(&format!("bad redis url {url}: {e}"));
                return None;
            }
        };
        match client.get_connection_with_timeout(Duration::from_secs(2)) {
            Ok(_) => Some(client),
            Err(e) => {
                required_or_skip(&format!("no Redis answers at {url}: {e}"));
                None
            }
        }
    }
}

fn required_or_skip(why: &str) {
    assert!(
        std::env::var_os("ECHOMIMIC_REQUIRE_REDIS").is_none(),
        "ECHOMIMIC_REQUIRE_REDIS is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
}

/// A name unique to this process and call: `{prefix}-{what}-{pid}-{nanos}-{n}`.
pub fn unique(prefix: &str, what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{what}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Deletes its keys when dropped (also when the test panics).
#[derive(Debug)]
pub struct Cleanup {
    client: redis::Client,
    keys: Vec<String>,
}

impl Cleanup {
    /// Deletes `keys` on drop.
    pub fn new(client: redis::Client, keys: Vec<String>) -> Self {
        Self { client, keys }
    }

    /// One more key to delete.
    pub fn add(&mut self, key: impl Into<String>) {
        self.keys.push(key.into());
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(mut con) = self.client.get_connection() {
            for k in &self.keys {
                let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut con);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        let (a, b) = (unique("t", "q"), unique("t", "q"));
        assert_ne!(a, b);
        assert!(a.starts_with("t-q-"), "{a}");
    }
}
