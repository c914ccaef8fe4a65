//! Examples for the echomimic crates (see `examples/*.rs`).
