//! The EchoMimic worker service.
