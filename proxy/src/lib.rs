//! Carries app traffic to workspace agents, for the primary and the edges alike.
//!
//! The QUIC relay agents attach to and the mesh between relays
//! ([`relay`]), pooled HTTP connections to apps over tunnel streams
//! ([`upstream`]), interactive traffic to a workspace before its bulk
//! transfers ([`pace`]), the app proxy's phases with a pluggable source of
//! decisions ([`pipeline`]), the app-request plumbing: error pages, cookie
//! names, credentials in headers, the sign-in redirect ([`app`]), the store
//! app tokens are checked against ([`revocations`]), per-client rate limits
//! ([`ratelimit`]), and shell sessions spliced to agents ([`shell`]).

#![forbid(unsafe_code)]

pub mod app;
pub mod pace;
pub mod pipeline;
pub mod ratelimit;
pub mod relay;
pub mod revocations;
pub mod shell;
pub mod upstream;
