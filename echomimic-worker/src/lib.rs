//! The EchoMimic worker service.

pub mod generate;
