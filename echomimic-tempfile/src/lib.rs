//! Client and compatible server for the temp-file HTTP API.
#![deny(missing_docs)]
