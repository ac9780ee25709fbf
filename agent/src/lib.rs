//! The workspace agent (`devmesh agent`): attaches to its nearest relay and
//! serves apps, dev URLs, SSH and scripts. Its implementation arrives with
//! the agent and tunnel issue.

#![forbid(unsafe_code)]
