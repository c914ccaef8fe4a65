//! Wire types, Redis key names and validation for the EchoMimic worker protocol.
#![deny(missing_docs)]
