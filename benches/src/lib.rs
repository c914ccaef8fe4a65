//! Benchmarks for the echomimic crates (see `benches/benches/*.rs`).
