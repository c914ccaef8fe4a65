//! Examples for the echomimic crates, each using only their public API (see `examples/*.rs`):
//!
//! * `generate_video`: the pipeline embedded in a program (photo + speech to an MP4, progress
//!   bar, Ctrl-C cancellation);
//! * `serve_requests`: one loaded pipeline serving requests from a channel on its own thread;
//! * `submit_and_follow`: a client of a running worker over Redis and the temp-file API;
//! * `protocol_only`: the wire types alone (build and validate a task, parse events).
//!
//! `tests/run_examples.rs` runs them on the tiny model of `testdata/golden/public`.
