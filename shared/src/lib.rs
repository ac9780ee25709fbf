//! Code every devmesh component shares: the JSON shapes of `/api/v2`, the
//! naming rules that keep names hostname-safe, token formats, secrets
//! handling, the agent↔relay tunnel protocol, signed tickets and tokens.
//!
//! Nothing here opens a socket, a file or a runtime: IO lives in
//! `devmesh-net`, policy in the component that owns it.

#![forbid(unsafe_code)]

pub mod api;
pub mod apphost;
pub mod cookies;
pub mod events;
pub mod names;
pub mod secret;
pub mod signing;
pub mod token;
pub mod tunnel;

/// The version every component reports and compares.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
