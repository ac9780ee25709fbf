//! What the primary and the edges share to carry app traffic: the QUIC
//! relay agents attach to and the mesh between relays ([`relay`]), pooled
//! HTTP connections to apps over tunnel streams ([`upstream`]), the app
//! proxy's phases with a pluggable source of decisions ([`pipeline`]), the
//! app-request plumbing: error pages, cookies, forwarding ([`app`]), and
//! the store app tokens are checked against ([`revocations`]).

#![forbid(unsafe_code)]

pub mod app;
pub mod pipeline;
pub mod ratelimit;
pub mod relay;
pub mod revocations;
pub mod upstream;
