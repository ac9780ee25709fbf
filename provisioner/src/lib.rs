//! Workspace provisioning with Terraform.
//!
//! The devmesh Terraform provider that templates use, served by the devmesh
//! binary itself ([`provider`]), and running Terraform as a provisioner does
//! ([`terraform`]). The job queue and the daemons come next.

#![forbid(unsafe_code)]

pub mod archive;
pub mod provider;
pub mod terraform;
