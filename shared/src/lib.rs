//! What every devmesh component must agree on, as pure code without IO.
//!
//! The JSON shapes of `/api/v2` ([`api`]), the naming rules that keep names
//! hostname-safe ([`names`], [`apphost`]), token formats ([`token`]),
//! secrets handling ([`secret`]), signed tickets and tokens ([`signing`]),
//! the cookie rules that keep devmesh cookies away from apps ([`cookies`]),
//! the framing of the primary's event stream to edges ([`events`]), and the
//! agent↔relay tunnel protocol: codecs and the attach session ([`tunnel`]).
//!
//! Nothing here opens a socket, a file or a runtime: IO lives in
//! `devmesh-net`, policy in the component that owns it. The fuzz targets
//! build against this crate alone.

#![forbid(unsafe_code)]

pub mod api;
pub mod apphost;
pub mod cookies;
pub mod events;
pub mod names;
pub mod parameters;
pub mod provisionerd;
pub mod secret;
pub mod signing;
pub mod token;
pub mod tunnel;

/// The version every component reports and compares.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
