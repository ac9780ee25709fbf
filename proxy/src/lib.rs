//! What the primary and the edges share to carry app traffic: the QUIC
//! relay agents attach to and the mesh between relays ([`relay`]), pooled
//! HTTP connections to apps over tunnel streams ([`upstream`]), and the
//! app-request plumbing: error pages, cookies, forwarding ([`app`]).

#![forbid(unsafe_code)]

pub mod app;
pub mod relay;
pub mod upstream;
