//! Code every devmesh component shares: the JSON shapes of `/api/v2`, the
//! naming rules that keep names hostname-safe, token formats, secrets
//! handling, the agent↔relay tunnel codecs, signed tickets and tokens, and
//! process-wide setup (crypto provider, logging).
//!
//! Nothing here owns sockets or policy that belongs to one component.

#![forbid(unsafe_code)]

pub mod api;
pub mod apphost;
pub mod backoff;
pub mod config;
pub mod events;
pub mod http;
pub mod names;
pub mod net;
pub mod runtime;
pub mod secret;
pub mod signing;
pub mod tls;
pub mod token;
pub mod tunnel;

/// The version every component reports and compares.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
