//! `echomimic-worker`: the EchoMimic worker service.
fn main() {}
