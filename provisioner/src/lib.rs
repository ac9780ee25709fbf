//! Workspace provisioning with Terraform: the devmesh Terraform provider
//! that templates use (served by the devmesh binary itself).
//!
//! The job queue and the provisioner daemons that run `terraform` will live
//! here too.

#![forbid(unsafe_code)]

pub mod provider;
