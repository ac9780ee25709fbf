//! The IO half of devmesh's common code: sockets sized for QUIC, the QUIC
//! settings both tunnel ends use, TLS certificates and their reloading, the
//! HTTP accept loop with its limits, retry backoff, and process setup (settings files, crypto, logging).
//! Wire formats and rules live in `devmesh-shared`, which opens nothing.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod http;
pub mod quic;
pub mod runtime;
pub mod sockets;
pub mod tls;
