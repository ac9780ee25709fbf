//! Whole-system tests: real PostgreSQL (one cluster for the run, a database
//! per test), primaries in-process and as the real `devmesh` binary, and
//! the real CLI. Cargo compiles them as `devmesh-cli`'s integration test
//! `system`, so it builds the `devmesh` binary they run first. The
//! harness they share with the load tool is the `devmesh-tests` crate
//! (`tests/`).

mod api_resources;
mod api_users;
mod apps;
mod attacks;
mod binary;
mod corpus;
mod edges;
mod jobs;
mod mesh;
mod provisioner_daemons;
mod provisioning;
mod robustness;
mod ssh;
mod support;
pub(crate) mod terminal;
mod terraform;
mod tls;
mod workspace_lifecycle;
