//! The IO devmesh's processes share: sockets, QUIC and TLS settings, HTTP serving, process setup.
//!
//! UDP sockets sized for QUIC, HTTP clients and name resolution
//! ([`sockets`]); the QUIC settings both tunnel ends use ([`quic`]); HTTPS
//! certificates, their reloading and the `--tls-*` flags ([`tls`]); the
//! HTTP accept loop with its limits ([`http`]); retry backoff
//! ([`backoff`]); settings files ([`config`]); crypto provider and logging
//! ([`runtime`]). Wire formats and rules live in `devmesh-shared`, which
//! opens nothing.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod http;
pub mod quic;
pub mod runtime;
pub mod sockets;
pub mod splice;
pub mod tls;
