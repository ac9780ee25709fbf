//! Workspace provisioning with Terraform.
//!
//! The devmesh Terraform provider that templates use, served by the devmesh
//! binary itself ([`provider`]), and running Terraform as a provisioner does
//! ([`terraform`]), and the daemon loop that claims jobs and runs them
//! ([`daemon`]), inside the primary or on a machine of its own.

#![forbid(unsafe_code)]

pub mod archive;
pub mod daemon;
pub mod provider;
pub mod terraform;
