//! Library part of the load-test tool (topologies and scenarios arrive with the loadtest issue).
#![forbid(unsafe_code)]
