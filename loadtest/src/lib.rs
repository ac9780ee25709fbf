//! `devmesh-loadtest`: whole topologies on one machine, WAN emulation and
//! side-by-side baselines. Its implementation arrives with the loadtest
//! issue.

#![forbid(unsafe_code)]
