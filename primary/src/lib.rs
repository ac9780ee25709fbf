//! The primary (`devmesh server`): makes every decision and is the only component with a database.
//!
//! It owns users and keys, templates, workspaces, edges and the audit log,
//! the signing keys and the mesh CA, serves `/api/v2` and its region's
//! apps, and runs a relay of its own. `devmesh server` is a thin wrapper
//! around [`server::start`]; tests start primaries in-process the same way.

pub mod api;
pub mod auth;
pub mod config;
pub mod db;
pub mod events;
pub mod jobs;
pub mod keys;
pub mod mesh;
pub mod metrics;
pub mod provisioning;
pub use devmesh_proxy::ratelimit;
pub mod relay;
pub mod server;
pub mod vault;

pub use config::{ServerArgs, ServerConfig};
pub use server::{RunningServer, start};
