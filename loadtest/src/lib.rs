//! Library part of `devmesh-loadtest`: whole topologies from a scenario
//! file, a user-space WAN emulator, the scenarios, the baselines run beside
//! them, and the report with its plots. The binary only parses flags.
#![forbid(unsafe_code)]

pub mod agents;
pub mod baselines;
pub mod chaos;
pub mod load;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod run;
pub mod scenario;
pub mod scenarios;
pub mod soak;
pub mod stats;
pub mod topology;
pub mod wan;
