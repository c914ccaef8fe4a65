//! Test fixtures shared by the workspace's test suites; a dev-dependency only, never published.
//!
//! * [`redis`]: the Redis a test talks to (skipped with a message when none answers, unless
//!   `ECHOMIMIC_REQUIRE_REDIS` is set, as CI does), names unique to one test, and key clean-up.
//! * [`peers`]: HTTP peers that misbehave (a download that trickles or stalls), for the
//!   temp-file client's and the worker's transfer fault tests.
//! * [`modules`]: the check that the modules inside each crate depend on each other one way
//!   (no cycles); its test (`tests/module_cycles.rs`) runs it on every crate of the workspace.
//!
//! Why a crate and not a `test-support` feature of `echomimic-protocol`: the helpers serve the
//! worker's tests as much as the protocol's, and the module check serves every crate; a
//! feature would put test code in the published protocol crate's source and API for users to
//! switch on, while a `publish = false` dev-dependency stays out of every published crate.

pub mod modules;
pub mod peers;
pub mod redis;
